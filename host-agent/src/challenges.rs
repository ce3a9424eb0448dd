//! The set of pending HTTP-01 challenges the filter serves, versioned for the
//! sync protocol's long-poll (`docs/challenge-sync.md`).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::watch;

/// One pending challenge, as the protocol's snapshot lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Challenge {
    pub token: String,
    pub key_authorization: String,
    pub identifier: String,
}

/// A full snapshot: the body of a `200` sync answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Snapshot {
    /// This agent process: a filter takes any version of an instance it has
    /// not seen, so a restarted or failed-over agent is followed whatever
    /// version a filter (or anyone else) held before.
    pub instance: String,
    pub version: u64,
    pub challenges: Vec<Challenge>,
}

/// A random instance id: 16 hex digits.
fn new_instance() -> String {
    let mut bytes = [0u8; 8];
    // The system's random source failing is not recoverable anyway; fall
    // back to the clock and pid, which still differ between processes.
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).is_err() {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        bytes = (nanos ^ u64::from(std::process::id()) << 40).to_be_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Pending challenges keyed by token. Every change bumps the version and wakes
/// held long-polls.
#[derive(Debug)]
pub struct ChallengeSet {
    instance: String,
    challenges: Mutex<BTreeMap<String, Challenge>>,
    version: watch::Sender<u64>,
}

impl Default for ChallengeSet {
    fn default() -> Self {
        Self::new()
    }
}

impl ChallengeSet {
    /// Versions start at the Unix time in milliseconds, so they also grow
    /// across restarts for filters that predate instance ids.
    pub fn new() -> Self {
        let start = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        Self {
            instance: new_instance(),
            challenges: Mutex::new(BTreeMap::new()),
            version: watch::Sender::new(start),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Challenge>> {
        self.challenges
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn bump(&self) {
        self.version.send_modify(|v| *v = v.saturating_add(1));
    }

    /// Adds challenges (all of an order's at once: one version, one sync).
    pub fn publish(&self, challenges: impl IntoIterator<Item = Challenge>) {
        let mut map = self.lock();
        for c in challenges {
            map.insert(c.token.clone(), c);
        }
        drop(map);
        self.bump();
    }

    /// Removes challenges by token; a no-op (and no new version) if none was there.
    pub fn remove<'a>(&self, tokens: impl IntoIterator<Item = &'a str>) {
        let mut map = self.lock();
        let mut changed = false;
        for t in tokens {
            changed |= map.remove(t).is_some();
        }
        drop(map);
        if changed {
            self.bump();
        }
    }

    /// This process's instance id (see [`Snapshot::instance`]).
    pub fn instance(&self) -> &str {
        &self.instance
    }

    pub fn version(&self) -> u64 {
        *self.version.borrow()
    }

    /// The current snapshot. Read under the lock so version and set agree.
    pub fn snapshot(&self) -> Snapshot {
        let map = self.lock();
        Snapshot {
            instance: self.instance.clone(),
            version: *self.version.borrow(),
            challenges: map.values().cloned().collect(),
        }
    }

    /// A receiver that wakes on every new version.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(token: &str) -> Challenge {
        Challenge {
            token: token.into(),
            key_authorization: format!("{token}.thumb"),
            identifier: "www.example.com".into(),
        }
    }

    #[test]
    fn versions_grow_on_change_only() {
        let set = ChallengeSet::new();
        let v0 = set.version();
        assert!(v0 > 1_600_000_000_000, "starts from the clock: {v0}");
        set.publish([c("a"), c("b")]);
        assert_eq!(set.version(), v0 + 1);
        set.remove(["zzz"]);
        assert_eq!(set.version(), v0 + 1, "removing nothing is no change");
        set.remove(["a"]);
        let snap = set.snapshot();
        assert_eq!(snap.version, v0 + 2);
        assert_eq!(snap.challenges, vec![c("b")]);
    }

    #[test]
    fn every_set_has_its_own_instance_id() {
        let (a, b) = (ChallengeSet::new(), ChallengeSet::new());
        assert_eq!(a.instance().len(), 16);
        assert!(a.instance().bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(a.instance(), b.instance());
        assert_eq!(a.snapshot().instance, a.instance());
    }

    #[test]
    fn snapshot_serializes_as_the_protocol_says() {
        let set = ChallengeSet::new();
        set.publish([c("tok")]);
        let json = serde_json::to_value(set.snapshot()).unwrap();
        assert_eq!(json["challenges"][0]["token"], "tok");
        assert_eq!(json["challenges"][0]["key_authorization"], "tok.thumb");
        assert_eq!(json["challenges"][0]["identifier"], "www.example.com");
        assert!(json["version"].is_u64());
        assert_eq!(json["instance"], set.instance());
    }
}
