//! Rate limiting of repeated error logs: when a failure repeats on every request (a full
//! disk, a damaged database), one log line per interval says it, with the number of
//! repeats left out, instead of one line per request.
//!
//! Pure: the caller passes the time, so this module reads no clock.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often a repeated failure is logged by default.
pub const DEFAULT_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Lets one event through per interval and counts the others.
#[derive(Debug)]
pub struct LogGate {
    interval: Duration,
    state: Mutex<GateState>,
}

#[derive(Debug, Default)]
struct GateState {
    last: Option<Instant>,
    suppressed: u64,
}

impl LogGate {
    pub const fn new(interval: Duration) -> Self {
        Self {
            interval,
            state: Mutex::new(GateState {
                last: None,
                suppressed: 0,
            }),
        }
    }

    /// `Some(n)` when the caller should log now, `n` being the events suppressed since the
    /// last line; `None` when this event is counted and not logged.
    pub fn admit(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match s.last {
            Some(last) if now.saturating_duration_since(last) < self.interval => {
                s.suppressed += 1;
                None
            }
            _ => {
                s.last = Some(now);
                Some(std::mem::take(&mut s.suppressed))
            }
        }
    }
}

impl Default for LogGate {
    fn default() -> Self {
        Self::new(DEFAULT_LOG_INTERVAL)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_event_per_interval_with_the_count_of_the_others() {
        let gate = LogGate::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(gate.admit(t0), Some(0));
        for i in 1..=5 {
            assert_eq!(gate.admit(t0 + Duration::from_secs(i)), None);
        }
        assert_eq!(gate.admit(t0 + Duration::from_secs(10)), Some(5));
        assert_eq!(gate.admit(t0 + Duration::from_secs(11)), None);
        assert_eq!(gate.admit(t0 + Duration::from_secs(25)), Some(1));
    }
}
