//! When each certificate's next job starts, indexed: the loop takes the due
//! ones and its next wake-up from the front of two ordered sets (restores,
//! everything else) and counts running jobs as they start and end, so
//! neither costs a scan of every certificate. With 100,000 certificates a
//! scan per event made start quadratic: none was served after 8 minutes.
//!
//! Jobs due at the same time start in the order their certificates expire:
//! those blocked by a CA limit all wait until its next free order, and the
//! one that expires first must get it (a year simulated with a saturated
//! budget let 6-day certificates lapse behind 90-day ones, taken by name).
//! And those waiting for the account's orders limit queue by expiry: each
//! is told to come back when its turn's order is free, not all at the next
//! one (200 waiting looked again at every free order, 200 looks for one).

use std::collections::{BTreeSet, HashMap};
use std::time::SystemTime;

/// Where one certificate stands in the schedule.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Slot {
    /// Its next job starts at this time, before others due then that
    /// expire after `expires`; `restore` says which cap it counts against.
    Waiting {
        at: SystemTime,
        expires: SystemTime,
        restore: bool,
    },
    /// A job runs for it.
    Running { restore: bool },
    /// Nothing is scheduled (a withdrawn on-demand certificate).
    Idle,
}

type Queue = BTreeSet<(SystemTime, SystemTime, String)>;

#[derive(Default)]
pub struct Agenda {
    restores: Queue,
    others: Queue,
    slots: HashMap<String, Slot>,
    running_restores: usize,
    running_others: usize,
    /// Waiting for the account's orders limit, by expiry: configured
    /// certificates, and on-demand ones (which never take the share left to
    /// configured ones, so they are not counted ahead of them).
    budget: [BTreeSet<(SystemTime, String)>; 2],
    budget_at: HashMap<String, (SystemTime, bool)>,
}

impl Agenda {
    /// Places `name` in `slot` (`None`: the certificate is gone).
    pub fn set(&mut self, name: &str, slot: Option<Slot>) {
        // Most calls change nothing (every event reindexes its entry).
        if slot.is_some() && self.slots.get(name) == slot.as_ref() {
            return;
        }
        let old = match slot {
            Some(slot) => self.slots.insert(name.to_owned(), slot),
            None => self.slots.remove(name),
        };
        if old == slot {
            return;
        }
        if let Some(old) = old {
            self.leave(name, old);
        }
        if let Some(slot) = slot {
            self.enter(name, slot);
        }
    }

    fn enter(&mut self, name: &str, slot: Slot) {
        match slot {
            Slot::Waiting {
                at,
                expires,
                restore,
            } => {
                self.queue(restore).insert((at, expires, name.to_owned()));
            }
            Slot::Running { restore: true } => self.running_restores += 1,
            Slot::Running { restore: false } => self.running_others += 1,
            Slot::Idle => {}
        }
    }

    fn leave(&mut self, name: &str, slot: Slot) {
        match slot {
            Slot::Waiting {
                at,
                expires,
                restore,
            } => {
                self.queue(restore).remove(&(at, expires, name.to_owned()));
            }
            Slot::Running { restore: true } => self.running_restores -= 1,
            Slot::Running { restore: false } => self.running_others -= 1,
            Slot::Idle => {}
        }
    }

    fn queue(&mut self, restore: bool) -> &mut Queue {
        if restore {
            &mut self.restores
        } else {
            &mut self.others
        }
    }

    /// Queues `name` (expiring at `expires`; `on_demand` or configured)
    /// for the account's orders limit, or takes it out (`None`).
    pub fn queue_for_budget(&mut self, name: &str, place: Option<(SystemTime, bool)>) {
        let old = match place {
            Some(place) => self.budget_at.insert(name.to_owned(), place),
            None => self.budget_at.remove(name),
        };
        if old == place {
            return;
        }
        if let Some((at, on_demand)) = old {
            self.budget[usize::from(on_demand)].remove(&(at, name.to_owned()));
        }
        if let Some((at, on_demand)) = place {
            self.budget[usize::from(on_demand)].insert((at, name.to_owned()));
        }
    }

    /// How many queued for the account's orders limit go before one
    /// expiring at `expires`: of a configured certificate, the configured
    /// ones; of an on-demand one, all.
    pub fn budget_rank(&self, name: &str, expires: SystemTime, on_demand: bool) -> usize {
        let ahead = |queue: &BTreeSet<(SystemTime, String)>| {
            queue.range(..(expires, name.to_owned())).count()
        };
        ahead(&self.budget[0]) + if on_demand { ahead(&self.budget[1]) } else { 0 }
    }

    /// Jobs running now of one kind.
    pub fn running(&self, restore: bool) -> usize {
        if restore {
            self.running_restores
        } else {
            self.running_others
        }
    }

    /// Up to `max` names of one kind due at `now`, earliest first (and of
    /// those due at once, the first to expire).
    pub fn due(&self, restore: bool, now: SystemTime, max: usize) -> Vec<String> {
        let queue = if restore {
            &self.restores
        } else {
            &self.others
        };
        queue
            .iter()
            .take_while(|(at, _, _)| *at <= now)
            .take(max)
            .map(|(_, _, name)| name.clone())
            .collect()
    }

    /// The earliest time a waiting job of a kind whose cap is not reached
    /// is due; for a capped kind, the first one after `now` (the due ones
    /// start as running ones end, and an ending wakes the loop anyway).
    pub fn next(&self, now: SystemTime, capped: [bool; 2]) -> Option<SystemTime> {
        // A range, not a walk past the due ones: 100,000 restores due at
        // start behind a cap of 64 made every wake-up a walk over them.
        let after = now
            .checked_add(std::time::Duration::from_nanos(1))
            .unwrap_or(now);
        let first = |queue: &Queue, capped: bool| {
            let mut from = queue.range((after, SystemTime::UNIX_EPOCH, String::new())..);
            let mut all = queue.iter();
            let next = if capped { from.next() } else { all.next() };
            next.map(|(at, _, _)| *at)
        };
        first(&self.restores, capped[0])
            .into_iter()
            .chain(first(&self.others, capped[1]))
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn t(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(s)
    }

    fn waiting(at: u64, restore: bool) -> Option<Slot> {
        Some(Slot::Waiting {
            at: t(at),
            expires: t(1_000),
            restore,
        })
    }

    #[test]
    fn due_names_come_earliest_first_per_kind_and_move_when_set_again() {
        let mut a = Agenda::default();
        a.set("late", waiting(30, false));
        a.set("early", waiting(10, false));
        a.set("restore", waiting(20, true));
        a.set("gone", waiting(5, false));
        a.set("gone", None);
        assert_eq!(a.due(false, t(30), 10), ["early", "late"]);
        assert_eq!(a.due(false, t(29), 10), ["early"]);
        assert_eq!(a.due(true, t(30), 10), ["restore"]);
        assert_eq!(a.due(false, t(30), 1), ["early"]);
        a.set("early", waiting(40, false));
        assert_eq!(a.due(false, t(30), 10), ["late"]);
        assert_eq!(a.next(t(0), [false, false]), Some(t(20)));
    }

    #[test]
    fn running_jobs_are_counted_until_they_end_and_leave_the_queue() {
        let mut a = Agenda::default();
        a.set("a", waiting(1, true));
        a.set("a", Some(Slot::Running { restore: true }));
        a.set("b", Some(Slot::Running { restore: false }));
        a.set("b", Some(Slot::Running { restore: false }));
        assert_eq!((a.running(true), a.running(false)), (1, 1));
        assert!(a.due(true, t(10), 10).is_empty());
        a.set("a", waiting(50, false));
        a.set("b", Some(Slot::Idle));
        assert_eq!((a.running(true), a.running(false)), (0, 0));
        assert_eq!(a.due(false, t(50), 10), ["a"]);
        a.set("a", None);
        assert_eq!(a.next(t(0), [false, false]), None);
    }

    #[test]
    fn of_the_jobs_due_at_once_the_first_to_expire_starts_first() {
        let mut a = Agenda::default();
        let slot = |expires| {
            Some(Slot::Waiting {
                at: t(10),
                expires: t(expires),
                restore: false,
            })
        };
        a.set("a-90-days", slot(90 * 86_400));
        a.set("b-6-days", slot(6 * 86_400));
        a.set("c-45-days", slot(45 * 86_400));
        assert_eq!(a.due(false, t(10), 1), ["b-6-days"]);
        assert_eq!(
            a.due(false, t(10), 3),
            ["b-6-days", "c-45-days", "a-90-days"]
        );
    }

    #[test]
    fn the_budget_queue_ranks_by_expiry_and_forgets() {
        let mut a = Agenda::default();
        a.queue_for_budget("late", Some((t(90), false)));
        a.queue_for_budget("soon", Some((t(6), false)));
        a.queue_for_budget("mid", Some((t(45), false)));
        assert_eq!(a.budget_rank("soon", t(6), false), 0);
        assert_eq!(a.budget_rank("late", t(90), false), 2);
        assert_eq!(a.budget_rank("new", t(10), false), 1, "one not queued yet");
        a.queue_for_budget("soon", None);
        a.queue_for_budget("mid", Some((t(100), false)));
        assert_eq!(a.budget_rank("late", t(90), false), 0);
        assert_eq!(a.budget_rank("mid", t(100), false), 1);
        // On-demand names wait behind configured ones, never ahead of them.
        a.queue_for_budget("od", Some((t(1), true)));
        assert_eq!(a.budget_rank("late", t(90), false), 0);
        assert_eq!(a.budget_rank("od-2", t(2), true), 1);
        assert_eq!(a.budget_rank("od-3", t(95), true), 2);
    }

    #[test]
    fn a_capped_kind_wakes_the_loop_only_for_what_is_due_later() {
        let mut a = Agenda::default();
        a.set("due", waiting(5, false));
        a.set("later", waiting(50, false));
        a.set("restore", waiting(7, true));
        assert_eq!(a.next(t(10), [false, true]), Some(t(7)));
        assert_eq!(a.next(t(50), [false, true]), Some(t(7)));
        assert_eq!(a.next(t(50), [true, true]), None, "nothing after 50");
        assert_eq!(a.next(t(10), [true, true]), Some(t(50)));
        assert_eq!(a.next(t(10), [false, false]), Some(t(5)));
    }
}
