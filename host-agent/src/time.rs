//! Time as the agent stores and shows it: Unix seconds and RFC 3339.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Unix seconds of `t` (0 before the epoch).
pub fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

pub fn from_unix(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

/// `t` as RFC 3339 in UTC, to the second (`2026-11-28T10:52:37Z`).
pub fn rfc3339(t: SystemTime) -> Option<String> {
    time::OffsetDateTime::from(t)
        .replace_nanosecond(0)
        .ok()?
        .format(&time::format_description::well_known::Rfc3339)
        .ok()
}

/// Where the services read the time. The system clock in production; in a
/// simulation, a clock that runs with tokio's, so a paused runtime with
/// auto-advance (`tokio::time::pause`) drives the sleeps and the dates
/// together and a year passes in seconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct Clock {
    /// `None`: the system clock. Else the date at a tokio instant.
    anchor: Option<(SystemTime, tokio::time::Instant)>,
}

impl Clock {
    pub const fn system() -> Self {
        Self { anchor: None }
    }

    /// A clock that reads `start` now and then advances with tokio's clock.
    pub fn following_tokio(start: SystemTime) -> Self {
        Self {
            anchor: Some((start, tokio::time::Instant::now())),
        }
    }

    pub fn now(&self) -> SystemTime {
        match self.anchor {
            None => SystemTime::now(),
            Some((start, at)) => start + tokio::time::Instant::now().saturating_duration_since(at),
        }
    }
}
