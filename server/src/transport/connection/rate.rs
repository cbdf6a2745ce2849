//! Pure: the token bucket behind `--publish-rate` and `--subscribe-rate`. A bucket holds at most
//! `burst` tokens, gains `per_second` of them per second, and each operation takes one; an
//! operation that finds the bucket empty is refused, never delayed. The clock is an argument, so
//! the tests below need no waiting.

use std::time::Instant;

use crate::config::Rate;

#[derive(Debug, Clone)]
pub struct TokenBucket {
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket: a new connection may use its whole burst at once.
    pub fn full(rate: Rate, now: Instant) -> Self {
        TokenBucket { tokens: f64::from(rate.burst), last: now }
    }

    /// Takes one token if there is one; always true for an unlimited rate.
    pub fn take(&mut self, rate: Rate, now: Instant) -> bool {
        if rate.per_second == 0 {
            return true;
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * f64::from(rate.per_second)).min(f64::from(rate.burst));
        self.last = self.last.max(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn taken(bucket: &mut TokenBucket, rate: Rate, now: Instant, tries: u32) -> u32 {
        (0..tries).filter(|_| bucket.take(rate, now)).count() as u32
    }

    #[test]
    fn a_burst_then_the_rate() {
        let rate = Rate { per_second: 10, burst: 5 };
        let t0 = Instant::now();
        let mut bucket = TokenBucket::full(rate, t0);
        assert_eq!(taken(&mut bucket, rate, t0, 100), 5, "the burst, no more");
        assert_eq!(taken(&mut bucket, rate, t0 + Duration::from_millis(100), 100), 1, "0.1 s at 10/s: one");
        assert_eq!(taken(&mut bucket, rate, t0 + Duration::from_millis(150), 100), 0, "half a token is none");
        assert_eq!(taken(&mut bucket, rate, t0 + Duration::from_millis(200), 100), 1, "the halves add up");
    }

    #[test]
    fn an_idle_bucket_refills_only_to_its_burst() {
        let rate = Rate { per_second: 1000, burst: 3 };
        let t0 = Instant::now();
        let mut bucket = TokenBucket::full(rate, t0);
        assert_eq!(taken(&mut bucket, rate, t0, 10), 3);
        assert_eq!(taken(&mut bucket, rate, t0 + Duration::from_secs(3600), 10), 3);
    }

    #[test]
    fn over_a_long_run_the_average_is_the_rate() {
        let rate = Rate { per_second: 50, burst: 10 };
        let t0 = Instant::now();
        let mut bucket = TokenBucket::full(rate, t0);
        // A client trying every millisecond for 10 s gets the burst plus 10 s of the rate.
        let got: u32 = (0..10_000).map(|ms| taken(&mut bucket, rate, t0 + Duration::from_millis(ms), 1)).sum();
        assert!((505..=510).contains(&got), "{got}");
    }

    #[test]
    fn a_zero_rate_is_no_limit() {
        let rate = Rate { per_second: 0, burst: 1 };
        let t0 = Instant::now();
        let mut bucket = TokenBucket::full(rate, t0);
        assert_eq!(taken(&mut bucket, rate, t0, 10_000), 10_000);
    }

    #[test]
    fn a_clock_that_goes_back_adds_nothing() {
        let rate = Rate { per_second: 10, burst: 2 };
        let t1 = Instant::now() + Duration::from_secs(1);
        let mut bucket = TokenBucket::full(rate, t1);
        assert_eq!(taken(&mut bucket, rate, t1, 10), 2);
        assert_eq!(taken(&mut bucket, rate, t1 - Duration::from_secs(1), 10), 0);
    }
}
