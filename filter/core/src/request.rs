//! The request facts a decision needs, taken from proxy-wasm's serialized
//! request header map.
//!
//! The filter reads all request headers in one host call instead of one call
//! per pseudo-header: every host call that returns data makes the host enter
//! the VM again to allocate guest memory, and in Envoy's V8 that entry costs
//! more than copying and scanning a whole header map here.

use std::borrow::Cow;

/// `:path`, `:method` and `:authority` of one request. Values that are not
/// UTF-8 are replaced lossily: such a path can never name a valid token.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RequestHeaders<'a> {
    pub path: Option<Cow<'a, str>>,
    pub method: Option<Cow<'a, str>>,
    pub authority: Option<Cow<'a, str>>,
}

impl<'a> RequestHeaders<'a> {
    /// Reads proxy-wasm's header map serialization: a little-endian `u32`
    /// count, one (name length, value length) `u32` pair per header, then each
    /// name and each value followed by a NUL byte.
    ///
    /// Never fails: a map that is cut short or whose lengths disagree yields
    /// the headers read before the fault, and a request without `:path`
    /// passes untouched.
    pub fn parse(map: &'a [u8]) -> Self {
        let mut headers = Self::default();
        let Some(count) = word(map, 0) else {
            return headers;
        };
        // Each header takes at least 8 bytes of sizes and 2 NULs, so a count
        // larger than that is a lie that must not drive the loop.
        let count = count.min(map.len() / 10);
        let mut data = 4 + count * 8;
        for n in 0..count {
            let at = 4 + n * 8;
            let (Some(name_len), Some(value_len)) = (word(map, at), word(map, at + 4)) else {
                break;
            };
            let Some(name) = field(map, data, name_len) else {
                break;
            };
            data += name_len + 1;
            let Some(value) = field(map, data, value_len) else {
                break;
            };
            data += value_len + 1;
            let slot = match name {
                b":path" => &mut headers.path,
                b":method" => &mut headers.method,
                b":authority" => &mut headers.authority,
                _ => continue,
            };
            // The first occurrence wins, as with Envoy's own single-value lookup.
            if slot.is_none() {
                *slot = Some(String::from_utf8_lossy(value));
            }
        }
        headers
    }

    pub fn path(&self) -> Option<&str> {
        self.path.as_deref()
    }

    pub fn method(&self) -> Option<&str> {
        self.method.as_deref()
    }

    pub fn authority(&self) -> Option<&str> {
        self.authority.as_deref()
    }
}

fn word(map: &[u8], at: usize) -> Option<usize> {
    let bytes: [u8; 4] = map.get(at..at.checked_add(4)?)?.try_into().ok()?;
    usize::try_from(u32::from_le_bytes(bytes)).ok()
}

/// `len` bytes at `at`, which must be followed by the NUL terminator.
fn field(map: &[u8], at: usize, len: usize) -> Option<&[u8]> {
    let end = at.checked_add(len)?;
    (map.get(end) == Some(&0)).then(|| map.get(at..end))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::both_targets_test;

    /// Envoy's serialization of `pairs`.
    fn serialize(pairs: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = u32::try_from(pairs.len()).unwrap().to_le_bytes().to_vec();
        for (name, value) in pairs {
            out.extend(u32::try_from(name.len()).unwrap().to_le_bytes());
            out.extend(u32::try_from(value.len()).unwrap().to_le_bytes());
        }
        for (name, value) in pairs {
            out.extend(name.as_bytes());
            out.push(0);
            out.extend(*value);
            out.push(0);
        }
        out
    }

    both_targets_test! {
        fn reads_the_three_pseudo_headers() {
            let map = serialize(&[
                (":authority", b"www.example.com"),
                (":path", b"/.well-known/acme-challenge/tok"),
                (":method", b"GET"),
                (":scheme", b"http"),
                ("user-agent", b"curl"),
            ]);
            let h = RequestHeaders::parse(&map);
            assert_eq!(h.path(), Some("/.well-known/acme-challenge/tok"));
            assert_eq!(h.method(), Some("GET"));
            assert_eq!(h.authority(), Some("www.example.com"));
            assert!(matches!(h.path, Some(Cow::Borrowed(_))), "valid UTF-8 is not copied");
        }
    }

    both_targets_test! {
        fn empty_values_and_missing_headers() {
            let map = serialize(&[(":path", b""), ("x", b"")]);
            let h = RequestHeaders::parse(&map);
            assert_eq!((h.path(), h.method(), h.authority()), (Some(""), None, None));
            assert_eq!(RequestHeaders::parse(&serialize(&[])), RequestHeaders::default());
        }
    }

    both_targets_test! {
        fn first_occurrence_wins() {
            let map = serialize(&[(":method", b"GET"), (":method", b"POST")]);
            let h = RequestHeaders::parse(&map);
            assert_eq!(h.method(), Some("GET"));
        }
    }

    both_targets_test! {
        fn non_utf8_values_are_replaced() {
            let map = serialize(&[(":path", b"/.well-known/acme-challenge/\xff")]);
            let h = RequestHeaders::parse(&map);
            assert_eq!(h.path(), Some("/.well-known/acme-challenge/\u{fffd}"));
        }
    }

    both_targets_test! {
        fn malformed_maps_never_panic_and_keep_what_came_before() {
            let good = serialize(&[(":method", b"GET"), (":path", b"/a")]);
            // Every truncation.
            for end in 0..good.len() {
                let h = RequestHeaders::parse(&good[..end]);
                assert_eq!(h.path, None, "cut at {end}");
            }
            assert_eq!(RequestHeaders::parse(&good).path(), Some("/a"));
            // A second header whose value length runs past the end.
            let mut long = good.clone();
            long[16..20].copy_from_slice(&1000u32.to_le_bytes());
            let h = RequestHeaders::parse(&long);
            assert_eq!((h.method(), h.path()), (Some("GET"), None));
            // Lengths that disagree with the NUL terminators.
            let mut shifted = good.clone();
            shifted[8..12].copy_from_slice(&2u32.to_le_bytes());
            assert_eq!(RequestHeaders::parse(&shifted), RequestHeaders::default());
            // A count far beyond the data, and lengths near u32::MAX.
            let mut huge = good.clone();
            huge[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
            assert_eq!(RequestHeaders::parse(&huge).path, None);
            let mut max = good;
            max[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
            assert_eq!(RequestHeaders::parse(&max), RequestHeaders::default());
            // Arbitrary bytes.
            for seed in 0u32..200 {
                let junk: Vec<u8> = (0..seed).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
                let _ = RequestHeaders::parse(&junk);
            }
        }
    }
}
