//! Electing exactly one poller per Envoy process.
//!
//! Every worker thread has its own root context (and the main thread one more),
//! but shared data is process-wide. The poller holds a lease in shared data that
//! it renews on every tick with compare-and-swap; when it stops renewing (its VM
//! is gone), the lease goes stale and the next root context to tick claims it.
//!
//! Envoy checks CAS only for keys that exist, so two contexts that both see no
//! lease at start can both write one; the loser sees the winner's lease on its
//! next tick and steps down. That overlap lasts one tick, once per process.

use crate::store::{LEASE_KEY, SetError, SharedData};

/// A lease not renewed for this long is taken over.
pub const LEASE_TTL_MS: u64 = 2_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub owner: u64,
    pub expires_at_ms: u64,
}

impl Lease {
    pub fn encode(&self) -> String {
        format!("{:016x}:{}", self.owner, self.expires_at_ms)
    }

    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(bytes).ok()?;
        let (owner, expires) = text.split_once(':')?;
        Some(Self {
            owner: u64::from_str_radix(owner, 16).ok()?,
            expires_at_ms: expires.parse().ok()?,
        })
    }
}

/// Claims or renews the lease for `me`; returns whether `me` is the poller now.
pub fn elect(data: &impl SharedData, me: u64, now_ms: u64) -> bool {
    let (value, cas) = data.get(LEASE_KEY);
    let current = value.as_deref().and_then(Lease::decode);
    let claimable = match current {
        None => true,
        Some(lease) => lease.owner == me || lease.expires_at_ms <= now_ms,
    };
    if !claimable {
        return false;
    }
    let mine = Lease {
        owner: me,
        expires_at_ms: now_ms.saturating_add(LEASE_TTL_MS),
    };
    match data.set(LEASE_KEY, mine.encode().as_bytes(), cas) {
        Ok(()) => true,
        Err(SetError::CasMismatch | SetError::Other) => false,
    }
}

/// Gives the lease up at once (VM shutdown), so another context need not wait
/// for it to go stale. Does nothing if `me` does not hold it.
pub fn resign(data: &impl SharedData, me: u64) {
    let (value, cas) = data.get(LEASE_KEY);
    if value.as_deref().and_then(Lease::decode).map(|l| l.owner) == Some(me) {
        let expired = Lease {
            owner: me,
            expires_at_ms: 0,
        };
        // Losing this race means someone else already holds the lease: fine.
        let _ = data.set(LEASE_KEY, expired.encode().as_bytes(), cas);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::both_targets_test;
    use crate::store::memory::Memory;

    both_targets_test! {
        fn encode_roundtrip_and_garbage() {
            let l = Lease { owner: u64::MAX, expires_at_ms: 12345 };
            assert_eq!(Lease::decode(l.encode().as_bytes()), Some(l));
            assert_eq!(Lease::decode(b""), None);
            assert_eq!(Lease::decode(b"zz:1"), None);
            assert_eq!(Lease::decode(b"1"), None);
        }
    }

    both_targets_test! {
        fn one_of_three_wins_and_keeps_it() {
            let data = Memory::default();
            let winners: Vec<bool> = [1, 2, 3].iter().map(|me| elect(&data, *me, 1000)).collect();
            assert_eq!(winners, [true, false, false]);
            for now in (1100..10_000).step_by(100) {
                let winners: Vec<bool> = [1, 2, 3].iter().map(|me| elect(&data, *me, now)).collect();
                assert_eq!(winners, [true, false, false], "at {now}");
            }
        }
    }

    both_targets_test! {
        fn stale_lease_is_taken_over_once() {
            let data = Memory::default();
            assert!(elect(&data, 1, 1000));
            // 1 stops ticking; before the TTL nobody takes over.
            assert!(!elect(&data, 2, 1000 + LEASE_TTL_MS - 1));
            assert!(!elect(&data, 3, 1000 + LEASE_TTL_MS - 1));
            let now = 1000 + LEASE_TTL_MS;
            let winners: Vec<bool> = [2, 3].iter().map(|me| elect(&data, *me, now)).collect();
            assert_eq!(winners, [true, false]);
            // The old owner coming back finds a live lease that is not its own.
            assert!(!elect(&data, 1, now + 1));
        }
    }

    both_targets_test! {
        fn cas_mismatch_loses() {
            struct Racy(Memory);
            impl SharedData for Racy {
                fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
                    let got = self.0.get(key);
                    // Someone renews between our read and our write.
                    self.0.set(key, Lease { owner: 9, expires_at_ms: 1 }.encode().as_bytes(), None).unwrap();
                    got
                }
                fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SetError> {
                    self.0.set(key, value, cas)
                }
            }
            let data = Racy(Memory::default());
            data.0.set(LEASE_KEY, Lease { owner: 9, expires_at_ms: 1 }.encode().as_bytes(), None).unwrap();
            assert!(!elect(&data, 1, 1000));
        }
    }

    both_targets_test! {
        fn resign_frees_the_lease_at_once() {
            let data = Memory::default();
            assert!(elect(&data, 1, 1000));
            resign(&data, 2);
            assert!(!elect(&data, 2, 1001));
            resign(&data, 1);
            assert!(elect(&data, 2, 1002));
        }
    }
}
