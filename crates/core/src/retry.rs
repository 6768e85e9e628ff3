//! The one retry policy: exponential backoff with full jitter, and a bound on attempts.
//!
//! The wait before the retry that follows the `n`-th failed attempt is drawn uniformly from
//! `[0, min(cap, base · 2ⁿ)]` ("full jitter": many workers that hit the same limit at the same
//! moment come back spread out instead of together). After `max_attempts` failed attempts
//! there is no next one. Pure: the caller brings the random source and does the sleeping.

use rand::Rng;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// The ceiling after the first failure is `2 × base`, and it doubles with every failure.
    pub base: Duration,
    /// No wait is longer than this.
    pub cap: Duration,
    /// Attempts in all, the first included: after this many failures the caller gives up.
    pub max_attempts: u32,
}

impl RetryPolicy {
    pub const fn new(base: Duration, cap: Duration, max_attempts: u32) -> Self {
        Self {
            base,
            cap,
            max_attempts,
        }
    }

    /// The same cap and attempts with another base: an error class that knows how long its
    /// cause lasts (a rate limit, a quota) brings its own.
    pub const fn with_base(self, base: Duration) -> Self {
        Self { base, ..self }
    }

    /// Whether another attempt may follow `failures` failed ones.
    pub const fn allows_retry(&self, failures: u32) -> bool {
        failures < self.max_attempts
    }

    /// The longest wait after `failures` failed attempts: `min(cap, base · 2^failures)`, with
    /// no overflow however large `failures` gets.
    pub fn ceiling(&self, failures: u32) -> Duration {
        // 2^32 × even a nanosecond base is past any cap worth having; saturating_mul does the rest.
        let factor = 1u64 << failures.min(32);
        let nanos = (self.base.as_nanos() as u64).saturating_mul(factor);
        Duration::from_nanos(nanos).min(self.cap)
    }

    /// The wait before the next attempt after `failures` failed ones (the first failure is 1),
    /// drawn from `[0, ceiling(failures)]`; `None` when the attempts are used up.
    pub fn backoff(&self, failures: u32, rng: &mut impl Rng) -> Option<Duration> {
        if !self.allows_retry(failures) {
            return None;
        }
        let ceiling = self.ceiling(failures).as_nanos() as u64;
        Some(Duration::from_nanos(rng.gen_range(0..=ceiling)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn ceiling_doubles_up_to_the_cap() {
        let p = RetryPolicy::new(Duration::from_millis(500), Duration::from_secs(30), 6);
        let ceilings: Vec<u64> = (0..8).map(|n| p.ceiling(n).as_millis() as u64).collect();
        assert_eq!(ceilings, [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000]);
        // A base past the cap is held to the cap from the first failure on.
        let quota = p.with_base(Duration::from_secs(120));
        assert_eq!(quota.ceiling(1), Duration::from_secs(30));
    }

    #[test]
    fn ceiling_never_overflows() {
        let p = RetryPolicy::new(Duration::from_secs(3600), Duration::MAX, u32::MAX);
        for n in [31, 32, 33, 64, 1000, u32::MAX] {
            assert!(p.ceiling(n) >= p.ceiling(30), "{n}");
        }
        let capped = RetryPolicy::new(S, Duration::from_secs(300), u32::MAX);
        assert_eq!(capped.ceiling(u32::MAX), Duration::from_secs(300));
    }

    #[test]
    fn jitter_stays_within_zero_and_the_ceiling_and_spreads() {
        let p = RetryPolicy::new(Duration::from_millis(100), Duration::from_secs(5), 100);
        let mut rng = StdRng::seed_from_u64(7);
        for n in 1..12 {
            let ceiling = p.ceiling(n);
            let draws: Vec<Duration> = (0..500)
                .map(|_| p.backoff(n, &mut rng).expect("attempts left"))
                .collect();
            assert!(draws.iter().all(|d| *d <= ceiling), "{n}: {ceiling:?}");
            // Full jitter: waits land all over the range, not at its top.
            assert!(draws.iter().any(|d| *d < ceiling / 4), "{n}");
            assert!(draws.iter().any(|d| *d > ceiling * 3 / 4), "{n}");
        }
    }

    #[test]
    fn attempts_stop_at_the_cap() {
        let p = RetryPolicy::new(S, S, 3);
        let mut rng = StdRng::seed_from_u64(1);
        assert!(p.backoff(1, &mut rng).is_some());
        assert!(p.backoff(2, &mut rng).is_some());
        assert_eq!(p.backoff(3, &mut rng), None);
        assert_eq!(p.backoff(40, &mut rng), None);
        assert!(!RetryPolicy::new(S, S, 0).allows_retry(0));
    }

    #[test]
    fn a_zero_cap_means_no_wait() {
        let p = RetryPolicy::new(S, Duration::ZERO, 5);
        let mut rng = StdRng::seed_from_u64(3);
        assert_eq!(p.backoff(4, &mut rng), Some(Duration::ZERO));
    }
}
