//! When to renew, and how long to wait after a failure. Pure functions of
//! their inputs (times, failure count, a random fraction) so they are tested
//! with any clock.

use std::time::{Duration, SystemTime};

/// The retry delays after a failed order: `initial`, doubled on each further
/// failure, never above `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_secs(60),
            max: Duration::from_secs(3600),
        }
    }
}

/// Least wait after a `rateLimited` problem that came without `Retry-After`:
/// retrying sooner only burns more of the limit.
pub const RATE_LIMITED_WAIT: Duration = Duration::from_secs(3600);

/// Longest `Retry-After` honoured: a CA asking for more is capped, so a typo on
/// the CA's side cannot park a certificate for weeks.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

impl Backoff {
    /// The wait after the `failures`-th consecutive failure (1 = first).
    /// `retry_after` from the CA wins when longer; a rate-limit error waits at
    /// least [`RATE_LIMITED_WAIT`].
    pub fn delay(
        &self,
        failures: u32,
        retry_after: Option<Duration>,
        rate_limited: bool,
    ) -> Duration {
        let doublings = failures.saturating_sub(1).min(30);
        let own = self.initial.saturating_mul(1u32 << doublings).min(self.max);
        let mut wait = own;
        if let Some(asked) = retry_after {
            wait = wait.max(asked.min(MAX_RETRY_AFTER));
        } else if rate_limited {
            wait = wait.max(RATE_LIMITED_WAIT);
        }
        wait
    }
}

/// Least wait between attempts however close the expiry.
pub const MIN_WAIT: Duration = Duration::from_secs(60);

/// `wait` shortened, for a certificate that expires at `not_after`, to half
/// of the life it has left (at least [`MIN_WAIT`]): short-lived certificates
/// (6-day profiles) get more attempts before they lapse than a one-hour
/// backoff or a one-day `Retry-After` would leave them.
pub fn within_life(wait: Duration, not_after: SystemTime, now: SystemTime) -> Duration {
    let left = not_after.duration_since(now).unwrap_or(Duration::ZERO);
    wait.min((left / 2).max(MIN_WAIT))
}

/// Renewal time without ARI: two thirds into the validity period, moved
/// earlier by up to 1/30 of the lifetime (`jitter` in `[0, 1)`) so that many
/// certificates issued together do not all renew in the same second.
pub fn two_thirds(not_before: SystemTime, not_after: SystemTime, jitter: f64) -> SystemTime {
    let lifetime = not_after
        .duration_since(not_before)
        .unwrap_or(Duration::ZERO);
    let at = lifetime.mul_f64(2.0 / 3.0);
    let spread = lifetime.mul_f64(jitter.clamp(0.0, 1.0) / 30.0);
    not_before + at.saturating_sub(spread)
}

/// Renewal time from an ARI suggested window (RFC 9773 section 4.2): a uniformly
/// random point inside it (`fraction` in `[0, 1)`). A window that has already
/// ended means "renew now"; a window whose end precedes its start is invalid and
/// ignored (`None`), so the caller falls back to [`two_thirds`].
pub fn in_window(
    start: SystemTime,
    end: SystemTime,
    fraction: f64,
    now: SystemTime,
) -> Option<SystemTime> {
    let width = end.duration_since(start).ok()?;
    if end <= now {
        return Some(now);
    }
    Some(start + width.mul_f64(fraction.clamp(0.0, 1.0)))
}

/// A random fraction in `[0, 1)` from the OS RNG, for jitter and window picks.
pub fn random_fraction() -> f64 {
    let mut bytes = [0u8; 8];
    // A failing OS RNG leaves 0: no jitter, still a correct schedule.
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes);
    (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn waits_never_outlast_half_the_remaining_life() {
        let hour = Duration::from_secs(3600);
        // A 6-day certificate renewed at two thirds has 2 days left: an hour
        // of backoff stands, a day of Retry-After becomes a day.
        assert_eq!(within_life(hour, t(2 * 86_400), t(0)), hour);
        assert_eq!(within_life(DAY * 3, t(2 * 86_400), t(0)), DAY);
        // Two hours left: an hour at most; a minute at least.
        assert_eq!(within_life(DAY, t(7200), t(0)), hour);
        assert_eq!(within_life(DAY, t(30), t(0)), MIN_WAIT);
        assert_eq!(within_life(DAY, t(0), t(100)), MIN_WAIT);
    }

    #[test]
    fn backoff_doubles_from_one_minute_to_one_hour() {
        let b = Backoff::default();
        let waits: Vec<u64> = (1..=9).map(|n| b.delay(n, None, false).as_secs()).collect();
        assert_eq!(waits, [60, 120, 240, 480, 960, 1920, 3600, 3600, 3600]);
        assert_eq!(b.delay(u32::MAX, None, false), Duration::from_secs(3600));
        assert_eq!(b.delay(0, None, false), Duration::from_secs(60));
    }

    #[test]
    fn retry_after_wins_when_longer_and_is_capped() {
        let b = Backoff::default();
        let ten_min = Duration::from_secs(600);
        assert_eq!(b.delay(1, Some(ten_min), false), ten_min);
        assert_eq!(b.delay(7, Some(ten_min), false), Duration::from_secs(3600));
        assert_eq!(
            b.delay(1, Some(Duration::from_secs(5)), false),
            Duration::from_secs(60)
        );
        assert_eq!(b.delay(1, Some(30 * DAY), false), MAX_RETRY_AFTER);
    }

    #[test]
    fn rate_limited_waits_an_hour_unless_told_otherwise() {
        let b = Backoff::default();
        assert_eq!(b.delay(1, None, true), RATE_LIMITED_WAIT);
        let two_hours = Duration::from_secs(7200);
        assert_eq!(b.delay(1, Some(two_hours), true), two_hours);
    }

    #[test]
    fn custom_backoff_for_short_tests() {
        let b = Backoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(4),
        };
        let waits: Vec<u64> = (1..=4).map(|n| b.delay(n, None, false).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 4]);
    }

    #[test]
    fn two_thirds_of_a_90_day_certificate_is_day_60() {
        let nb = t(1_000_000);
        let na = nb + 90 * DAY;
        assert_eq!(two_thirds(nb, na, 0.0), nb + 60 * DAY);
        // Full jitter moves it 3 days earlier, never later.
        assert_eq!(two_thirds(nb, na, 1.0), nb + 57 * DAY);
        let mid = two_thirds(nb, na, 0.5);
        assert!(mid > nb + 57 * DAY && mid < nb + 60 * DAY);
        // A six-day certificate (short-lived profile) renews on day 4.
        assert_eq!(two_thirds(nb, nb + 6 * DAY, 0.0), nb + 4 * DAY);
        // Nonsense validity (after before before) renews at once.
        assert_eq!(two_thirds(na, nb, 0.0), na);
    }

    #[test]
    fn ari_window_picks_inside_it() {
        let now = t(1_000_000);
        let start = now + 10 * DAY;
        let end = now + 12 * DAY;
        assert_eq!(in_window(start, end, 0.0, now), Some(start));
        assert_eq!(in_window(start, end, 0.5, now), Some(now + 11 * DAY));
        let last = in_window(start, end, 0.999_999, now).unwrap();
        assert!(last < end && last > now + 11 * DAY);
    }

    #[test]
    fn ari_window_in_the_past_means_now_and_inverted_is_ignored() {
        let now = t(5_000_000);
        assert_eq!(in_window(t(1), t(2), 0.5, now), Some(now));
        assert_eq!(in_window(now + DAY, now, 0.5, now), None);
        // A window already open but not closed still picks inside it, which may
        // be in the past: the caller treats a past time as due.
        assert_eq!(in_window(now - DAY, now + DAY, 0.0, now), Some(now - DAY));
    }

    #[test]
    fn random_fraction_is_in_range_and_varies() {
        let xs: Vec<f64> = (0..64).map(|_| random_fraction()).collect();
        assert!(xs.iter().all(|x| (0.0..1.0).contains(x)));
        assert!(xs.windows(2).any(|w| w[0] != w[1]));
    }
}
