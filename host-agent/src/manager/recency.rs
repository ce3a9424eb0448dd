//! On-demand names ordered by when a handshake last asked for each: the
//! rules that withdraw and remove them look only at the oldest, and a name
//! moves in O(log n), so no rule scans every certificate on each handshake
//! (10,000 names and more).

use std::collections::{BTreeSet, HashMap};
use std::time::SystemTime;

#[derive(Default)]
pub struct Recency {
    order: BTreeSet<(SystemTime, String)>,
    at: HashMap<String, SystemTime>,
}

impl Recency {
    /// Places `name` at `at`, moving it if it was elsewhere.
    pub fn set(&mut self, name: &str, at: SystemTime) {
        match self.at.insert(name.to_owned(), at) {
            Some(old) if old == at => return,
            Some(old) => {
                self.order.remove(&(old, name.to_owned()));
            }
            None => {}
        }
        self.order.insert((at, name.to_owned()));
    }

    pub fn forget(&mut self, name: &str) {
        if let Some(old) = self.at.remove(name) {
            self.order.remove(&(old, name.to_owned()));
        }
    }

    pub fn len(&self) -> usize {
        self.at.len()
    }

    /// Least recently asked for first.
    pub fn oldest(&self) -> impl Iterator<Item = (SystemTime, &str)> {
        self.order.iter().map(|(at, name)| (*at, name.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn names_come_oldest_first_and_move_when_asked_again() {
        let t = |s: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        let mut r = Recency::default();
        r.set("a", t(1));
        r.set("b", t(2));
        r.set("c", t(2));
        r.set("a", t(3));
        let names: Vec<&str> = r.oldest().map(|(_, n)| n).collect();
        assert_eq!(names, ["b", "c", "a"]);
        r.forget("c");
        r.forget("absent");
        assert_eq!(r.len(), 2);
        assert_eq!(r.oldest().next(), Some((t(2), "b")));
        r.set("b", t(2));
        assert_eq!(r.len(), 2, "set twice at the same time: held once");
        assert_eq!(r.order.len(), 2);
    }
}
