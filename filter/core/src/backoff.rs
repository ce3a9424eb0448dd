//! Capped exponential backoff for sync retries.

/// Doubles from `initial_ms` up to `max_ms`; `reset` after any success.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backoff {
    initial_ms: u64,
    max_ms: u64,
    next_ms: u64,
}

impl Backoff {
    pub fn new(initial_ms: u64, max_ms: u64) -> Self {
        Self {
            initial_ms,
            max_ms,
            next_ms: initial_ms,
        }
    }

    /// The delay to wait now; the one after it is twice as long, up to the cap.
    pub fn next_delay_ms(&mut self) -> u64 {
        let delay = self.next_ms.min(self.max_ms);
        self.next_ms = delay.saturating_mul(2).min(self.max_ms);
        delay
    }

    pub fn reset(&mut self) {
        self.next_ms = self.initial_ms;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::both_targets_test;

    both_targets_test! {
        fn doubles_to_the_cap_and_resets() {
            let mut b = Backoff::new(100, 1000);
            let delays: Vec<u64> = (0..7).map(|_| b.next_delay_ms()).collect();
            assert_eq!(delays, [100, 200, 400, 800, 1000, 1000, 1000]);
            b.reset();
            assert_eq!(b.next_delay_ms(), 100);
        }
    }
}
