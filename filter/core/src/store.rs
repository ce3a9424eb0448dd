//! Layout of the challenge set in Envoy shared data.
//!
//! Shared data is per `vm_id` and process-wide, so what the elected poller writes
//! here every worker reads. One key per token keeps a request's lookup a single
//! host call; an index key lists the tokens so a later snapshot (possibly applied
//! by another root context after a takeover) knows what to remove. proxy-wasm has
//! no delete: an empty value stands for an absent key.

use crate::Error;
use crate::snapshot::Snapshot;

/// Key prefix of one token's entry.
pub const TOKEN_KEY_PREFIX: &str = "acme/v1/token/";
/// Newline-separated list of the tokens currently stored.
pub const INDEX_KEY: &str = "acme/v1/index";
/// Position of the snapshot currently stored: `<version>@<instance>`, or
/// the decimal version alone for an agent without instance ids.
pub const VERSION_KEY: &str = "acme/v1/version";
/// Poller election lease, see the lease module.
pub const LEASE_KEY: &str = "acme/v1/lease";

/// Why a shared data write did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetError {
    /// Someone else wrote the key since we read it.
    CasMismatch,
    /// Any other host status.
    Other,
}

/// Envoy shared data as the core needs it. `cas` values come from `get`.
pub trait SharedData {
    fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>);
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SetError>;
}

/// One challenge as stored for a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredChallenge {
    /// Lower-case identifier (DNS name or IP) the challenge was issued for.
    pub identifier: String,
    pub key_authorization: String,
}

impl StoredChallenge {
    /// `identifier` and `key_authorization` never contain a newline (the snapshot
    /// parser refuses them), so one separates them.
    pub fn encode(&self) -> Vec<u8> {
        format!("{}\n{}", self.identifier, self.key_authorization).into_bytes()
    }

    /// `None` for an absent (empty) or unreadable value.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(bytes).ok()?;
        let (identifier, key_authorization) = text.split_once('\n')?;
        if key_authorization.is_empty() {
            return None;
        }
        Some(Self {
            identifier: identifier.to_owned(),
            key_authorization: key_authorization.to_owned(),
        })
    }
}

pub fn token_key(token: &str) -> String {
    format!("{TOKEN_KEY_PREFIX}{token}")
}

/// Reads one token's challenge.
pub fn lookup(data: &impl SharedData, token: &str) -> Option<StoredChallenge> {
    data.get(&token_key(token))
        .0
        .and_then(|v| StoredChallenge::decode(&v))
}

/// Where the stored snapshot stands: its agent instance and version.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Position {
    pub instance: Option<String>,
    /// 0 when none was ever stored.
    pub version: u64,
}

impl Position {
    fn encode(&self) -> String {
        match &self.instance {
            Some(instance) => format!("{}@{instance}", self.version),
            None => self.version.to_string(),
        }
    }

    fn decode(text: &str) -> Option<Self> {
        let (version, instance) = match text.split_once('@') {
            Some((v, i)) => (v, Some(i.to_owned())),
            None => (text, None),
        };
        Some(Self {
            instance,
            version: version.parse().ok()?,
        })
    }

    /// Whether `snapshot` may replace what is stored here: anything from an
    /// instance not seen before (a restarted or failed-over agent, whatever
    /// version was held), else only a newer version of the same one.
    pub fn accepts(&self, snapshot: &Snapshot) -> bool {
        let other_instance = snapshot.instance.is_some() && snapshot.instance != self.instance;
        self.version == 0 || other_instance || snapshot.version > self.version
    }
}

/// Position of the stored snapshot (default when none was ever stored).
pub fn stored_position(data: &impl SharedData) -> Position {
    data.get(VERSION_KEY)
        .0
        .and_then(|v| Position::decode(std::str::from_utf8(&v).ok()?))
        .unwrap_or_default()
}

/// Version of the stored snapshot, 0 when none was ever stored.
pub fn stored_version(data: &impl SharedData) -> u64 {
    stored_position(data).version
}

fn stored_index(data: &impl SharedData) -> Vec<String> {
    data.get(INDEX_KEY)
        .0
        .and_then(|v| String::from_utf8(v).ok())
        .map(|s| {
            s.lines()
                .filter(|l| !l.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

fn write(data: &impl SharedData, key: &str, value: &[u8]) -> Result<(), Error> {
    data.set(key, value, None).map_err(|e| Error::SharedData {
        key: key.to_owned(),
        reason: match e {
            SetError::CasMismatch => "compare-and-swap mismatch",
            SetError::Other => "refused by the host",
        }
        .to_owned(),
    })
}

/// Replaces the stored challenge set with `snapshot`; returns how many tokens are
/// now known. New tokens are written before old ones are cleared, so a token
/// present in both snapshots is answerable throughout.
///
/// A snapshot of the stored instance that is not newer than the stored one
/// is not applied: a late answer to an older poll (of a poller that has
/// since lost the lease, say) must never remove a token a newer snapshot
/// holds. A snapshot of another instance is (see [`Position::accepts`]).
pub fn apply(data: &impl SharedData, snapshot: &Snapshot) -> Result<Applied, Error> {
    let stored = stored_position(data);
    if !stored.accepts(snapshot) {
        return Ok(Applied::Stale {
            stored: stored.version,
        });
    }
    let old = stored_index(data);
    for challenge in &snapshot.challenges {
        write(
            data,
            &token_key(&challenge.token),
            &StoredChallenge {
                identifier: challenge.identifier.clone(),
                key_authorization: challenge.key_authorization.clone(),
            }
            .encode(),
        )?;
    }
    let mut index = String::new();
    for challenge in &snapshot.challenges {
        index.push_str(&challenge.token);
        index.push('\n');
    }
    for gone in old
        .iter()
        .filter(|t| !snapshot.challenges.iter().any(|c| &c.token == *t))
    {
        write(data, &token_key(gone), b"")?;
    }
    write(data, INDEX_KEY, index.as_bytes())?;
    let position = Position {
        instance: snapshot.instance.clone(),
        version: snapshot.version,
    };
    write(data, VERSION_KEY, position.encode().as_bytes())?;
    Ok(Applied::Stored(snapshot.challenges.len()))
}

/// What [`apply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Stored; this many tokens are known now.
    Stored(usize),
    /// Not newer than the `stored` version: left as it was.
    Stale { stored: u64 },
}

#[cfg(test)]
pub(crate) mod memory {
    use super::{SetError, SharedData};
    use std::cell::RefCell;
    use std::collections::BTreeMap;

    /// Shared data with Envoy's semantics: a global CAS counter, CAS checked only
    /// for existing keys when non-zero.
    #[derive(Default)]
    pub struct Memory {
        pub map: RefCell<BTreeMap<String, (Vec<u8>, u32)>>,
        next_cas: RefCell<u32>,
    }

    impl SharedData for Memory {
        fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
            match self.map.borrow().get(key) {
                Some((v, cas)) => (Some(v.clone()), Some(*cas)),
                None => (None, None),
            }
        }
        fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SetError> {
            let mut map = self.map.borrow_mut();
            if let (Some(want), Some((_, have))) = (cas, map.get(key))
                && want != 0
                && want != *have
            {
                return Err(SetError::CasMismatch);
            }
            let mut next = self.next_cas.borrow_mut();
            *next += 1;
            map.insert(key.to_owned(), (value.to_vec(), *next));
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::memory::Memory;
    use super::*;
    use crate::both_targets_test;
    use crate::snapshot::Snapshot;

    fn snap(version: u64, tokens: &[&str]) -> Snapshot {
        let items: Vec<String> = tokens
            .iter()
            .map(|t| {
                format!(
                    r#"{{"token":"{t}","key_authorization":"{t}.k","identifier":"{t}.example"}}"#
                )
            })
            .collect();
        Snapshot::parse(
            format!(
                r#"{{"version":{version},"challenges":[{}]}}"#,
                items.join(",")
            )
            .as_bytes(),
            1 << 20,
        )
        .unwrap()
    }

    both_targets_test! {
        fn apply_replaces_the_set() {
            let data = Memory::default();
            assert_eq!(stored_version(&data), 0);
            assert_eq!(apply(&data, &snap(3, &["a", "b"])).unwrap(), Applied::Stored(2));
            assert_eq!(stored_version(&data), 3);
            assert_eq!(lookup(&data, "a").unwrap().key_authorization, "a.k");
            assert_eq!(lookup(&data, "b").unwrap().identifier, "b.example");

            assert_eq!(apply(&data, &snap(4, &["b", "c"])).unwrap(), Applied::Stored(2));
            assert_eq!(lookup(&data, "a"), None, "a token absent from the snapshot is removed");
            assert!(lookup(&data, "b").is_some());
            assert!(lookup(&data, "c").is_some());
            assert_eq!(stored_version(&data), 4);

            apply(&data, &snap(5, &[])).unwrap();
            assert_eq!(lookup(&data, "b"), None);
            assert_eq!(lookup(&data, "c"), None);
        }
    }

    both_targets_test! {
        fn a_late_older_snapshot_never_removes_a_newer_token() {
            let data = Memory::default();
            apply(&data, &snap(10, &["a", "b"])).unwrap();
            assert_eq!(apply(&data, &snap(9, &["a"])).unwrap(), Applied::Stale { stored: 10 });
            assert_eq!(apply(&data, &snap(10, &[])).unwrap(), Applied::Stale { stored: 10 });
            assert!(lookup(&data, "b").is_some(), "b removed by an older snapshot");
            assert_eq!(stored_version(&data), 10);
            assert_eq!(apply(&data, &snap(11, &["a"])).unwrap(), Applied::Stored(1));
            assert_eq!(lookup(&data, "b"), None);
        }
    }

    fn from(instance: &str, version: u64, tokens: &[&str]) -> Snapshot {
        Snapshot {
            instance: Some(instance.to_owned()),
            ..snap(version, tokens)
        }
    }

    both_targets_test! {
        fn another_agent_instance_is_followed_whatever_version_was_held() {
            let data = Memory::default();
            // Someone pushed the version far up (a made-up poll), then the
            // agent restarted: its new instance starts lower and must win.
            apply(&data, &from("old", 1 << 52, &["a"])).unwrap();
            assert_eq!(
                stored_position(&data),
                Position { instance: Some("old".into()), version: 1 << 52 }
            );
            assert_eq!(apply(&data, &from("new", 5, &["b"])).unwrap(), Applied::Stored(1));
            assert_eq!(lookup(&data, "a"), None);
            assert!(lookup(&data, "b").is_some());
            // Within one instance, older answers stay stale.
            assert_eq!(apply(&data, &from("new", 4, &[])).unwrap(), Applied::Stale { stored: 5 });
            assert!(lookup(&data, "b").is_some());
            // A legacy stored value (version alone) is read.
            data.set(VERSION_KEY, b"17", None).unwrap();
            assert_eq!(stored_position(&data), Position { instance: None, version: 17 });
        }
    }

    both_targets_test! {
        fn decode_refuses_garbage() {
            assert_eq!(StoredChallenge::decode(b""), None);
            assert_eq!(StoredChallenge::decode(b"no-newline"), None);
            assert_eq!(StoredChallenge::decode(b"host\n"), None);
            assert_eq!(StoredChallenge::decode(&[0xff, b'\n', b'a']), None);
        }
    }
}
