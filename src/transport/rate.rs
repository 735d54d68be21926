//! A socket's message rate limit: a bucket of `burst` messages refilled at
//! `per_second`, every message counted.
//!
//! It is GCRA, the algorithm governor runs, kept as one number per socket: a
//! governor limiter keeps its quota and its clock's start in every instance,
//! 40 bytes of every idle socket, where the quota is the server's and the
//! start is the socket's own.

use std::time::Duration;

/// When the next message is due, in nanoseconds since the socket opened.
#[derive(Default)]
pub struct Rate {
    due: u64,
}

impl Rate {
    /// Whether a message `elapsed` after the socket opened is within the
    /// limit; counts it when it is.
    pub fn check(&mut self, elapsed: Duration, per_second: u32, burst: u32) -> bool {
        let now = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        let interval = 1_000_000_000 / u64::from(per_second.max(1));
        let tolerance = interval * u64::from(burst.max(1) - 1);
        let due = self.due.max(now);
        if due - now > tolerance {
            return false;
        }
        self.due = due + interval;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_burst_then_the_sustained_rate() {
        // 100 a second (one every 10 ms), bursts of 5.
        let mut rate = Rate::default();
        let check = |rate: &mut Rate, at: Duration| rate.check(at, 100, 5);
        for _ in 0..5 {
            assert!(check(&mut rate, MS));
        }
        assert!(!check(&mut rate, MS), "the sixth at once is over");
        assert!(!check(&mut rate, 9 * MS));
        assert!(check(&mut rate, 11 * MS), "one more after one interval");
        assert!(!check(&mut rate, 11 * MS));
        // At the sustained rate, for as long as it lasts.
        for i in 0..1000 {
            assert!(check(&mut rate, 21 * MS + i * 10 * MS), "message {i}");
        }
        // A long pause fills the bucket again, and no more.
        let later = Duration::from_secs(60);
        for _ in 0..5 {
            assert!(check(&mut rate, later));
        }
        assert!(!check(&mut rate, later));
    }

    #[test]
    fn a_burst_of_one_allows_one_message_an_interval() {
        let mut rate = Rate::default();
        assert!(rate.check(Duration::ZERO, 1, 1));
        assert!(!rate.check(Duration::from_millis(999), 1, 1));
        assert!(rate.check(Duration::from_secs(1), 1, 1));
    }
}
