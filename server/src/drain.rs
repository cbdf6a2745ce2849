//! How a draining server sends its clients away and tells them when to come back.
//!
//! A drain closes every client with 1012 and a reconnect hint in the close reason
//! ([`close_reason`]: `server draining; reconnect_after_ms=N`, the format client authors parse).
//! Three things pace it:
//!
//! * the [`Schedule`]: without a budget, this server's closes go out in equal batches over the
//!   first three quarters of `--drain-timeout` (the last quarter is for the clients to leave
//!   before the pod's grace period ends);
//! * the [`ReconnectBudget`] (`--drain-max-reconnects-per-second`): a token bucket that every
//!   server of the fleet draws from at once (in Redis, so two pods draining together share
//!   one rate; without Redis, the server's own). With a budget every close is due at once and
//!   the budget alone paces them: spreading each server's closes over its own window would
//!   leave the fleet's budget unused while the window runs out. A close the budget refuses
//!   waits for a later tick;
//! * the window wins: whoever is still open when the three quarters are over is closed at once
//!   (a forced close), because a pod killed at the end of its grace period would drop its clients
//!   with no close and no hint at all. Forced closes still take their places in the budget (it
//!   goes into debt, [`ReconnectBudget::force`]), and their hints spread them over those places,
//!   so they too come back at the budget's rate, behind any other server's forced clients.
//!
//! Each client's hint is drawn uniformly from a window ([`Jitter`]), so clients closed in the
//! same batch do not come back in the same instant.
//!
//! Pure apart from [`ReconnectBudget::take`] and [`ReconnectBudget::force`], which may call Redis: no connection and no outbox
//! here; `server::drain` applies it.

use std::hash::{BuildHasher, RandomState};
use std::time::Duration;

use tokio::time::Instant;

use crate::messaging::redis::budget::RedisBudget;

/// The key of the hint in a 1012 close reason; its value, the digits after `=`, ends the reason.
pub const HINT_KEY: &str = "reconnect_after_ms";
/// Longest close reason the WebSocket protocol carries (a 125-byte control payload less the code).
pub const MAX_CLOSE_REASON: usize = 123;
/// The window every hint of a paced close is drawn from: a batch's clients come back spread over
/// the second after their close rather than in the same instant. Batches of more than one
/// client go out every [`TICK`] at most (the budget's at most every [`BUDGET_TICK`]), so the
/// returns are as even as the closes; a longer window would only keep clients away longer.
pub const HINT_WINDOW: Duration = Duration::from_secs(1);
/// After the fleet's budget in Redis did not answer, a server holds to the budget on its own
/// this long before it asks Redis again.
const RETRY_REDIS: Duration = Duration::from_secs(1);
/// Batches of the schedule are at least this far apart.
pub const TICK: Duration = Duration::from_millis(100);
/// A server the budget holds back asks again this often, on average (at a random moment within
/// half of it either way). Every draining server asks at the same pace and none always right
/// after another, so each takes about its share of what the bucket refills.
pub const BUDGET_TICK: Duration = Duration::from_millis(25);
/// The longest hint: a hint is a `u16` of milliseconds (it keeps every connection's close
/// reason small). The JS client follows a hint up to this.
pub const MAX_HINT: Duration = Duration::from_millis(u16::MAX as u64);

/// The reason of a drain's close: `server draining; reconnect_after_ms=N`, at most 41 bytes.
pub fn close_reason(reconnect_after_ms: u16) -> String {
    format!("server draining; {HINT_KEY}={reconnect_after_ms}")
}

/// The hint at the end of a close reason, as a client reads it.
pub fn parse_hint(reason: &str) -> Option<u16> {
    let (_, value) = reason.rsplit_once(HINT_KEY)?;
    value.strip_prefix('=')?.trim_end().parse().ok()
}

/// The close of a client that finished its handshake as the drain began (after the drain took
/// its list of clients), with a hint from [`HINT_WINDOW`]. Not inlined: it keeps the
/// hint's state out of every connection's task.
#[inline(never)]
pub fn late_close() -> crate::transport::outbox::CloseReason {
    crate::transport::outbox::CloseReason::Draining { reconnect_after_ms: Jitter::default().hint(HINT_WINDOW) }
}

/// When this server's closes are due: `total` clients in equal batches, at least [`TICK`]
/// apart, the first at once and the last at the end of the window (three quarters of the drain
/// timeout).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    total: usize,
    per_batch: usize,
    period: Duration,
    window: Duration,
}

impl Schedule {
    pub fn new(total: usize, drain_timeout: Duration) -> Self {
        let window = drain_timeout * 3 / 4;
        let most_batches = (window.as_millis() / TICK.as_millis()).max(1) as usize;
        let per_batch = total.div_ceil(most_batches).max(1);
        let batches = total.div_ceil(per_batch).max(1);
        let period = if batches > 1 { window / (batches as u32 - 1) } else { window };
        Schedule { total, per_batch, period, window }
    }

    /// Every client due at once: with a reconnect budget, the budget paces the drain (as fast
    /// as the fleet's budget allows), so no server holds back leave the fleet has to give. The
    /// window still bounds it.
    pub fn at_once(total: usize, drain_timeout: Duration) -> Self {
        Schedule { total, per_batch: total.max(1), period: TICK, window: drain_timeout * 3 / 4 }
    }

    /// The window: by its end every client is closed, with the budget's leave or without.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// How many clients are due `elapsed` after the start.
    pub fn due(&self, elapsed: Duration) -> usize {
        if elapsed >= self.window {
            return self.total;
        }
        let batches_out = (elapsed.as_nanos() / self.period.as_nanos().max(1)) as usize + 1;
        self.total.min(self.per_batch.saturating_mul(batches_out))
    }

    /// When, counted from the start, the next batch after `elapsed` is due.
    pub fn next_batch(&self, elapsed: Duration) -> Duration {
        let period = self.period.as_nanos().max(1);
        let next = (elapsed.as_nanos() / period + 1) * period;
        Duration::from_nanos(next.min(self.window.as_nanos()) as u64)
    }
}

/// The hint window of `left` clients closed at once when the window ends: their returns are
/// spread at the budget's rate (after the debt others ran up before them: see
/// [`ReconnectBudget::force`]), and at least over `base`.
pub fn forced_hint_window(left: usize, per_second: u32, base: Duration) -> Duration {
    if per_second == 0 {
        return base;
    }
    base.max(Duration::from_secs_f64(left as f64 / f64::from(per_second))).min(MAX_HINT)
}

/// Uniform reconnect hints over a window, from a seed no two servers share.
pub struct Jitter {
    state: u64,
}

impl Default for Jitter {
    fn default() -> Self {
        Jitter::seeded(RandomState::new().hash_one(std::process::id()))
    }
}

impl Jitter {
    pub fn seeded(seed: u64) -> Self {
        Jitter { state: seed }
    }

    /// A hint in milliseconds, uniform in `[0, window)`; a window is at most [`MAX_HINT`].
    pub fn hint(&mut self, window: Duration) -> u16 {
        let ms = window.as_millis().clamp(1, MAX_HINT.as_millis()) as u64;
        (self.next() % ms) as u16
    }

    /// A hint in milliseconds, uniform in `[after, after + window)`, at most [`MAX_HINT`].
    pub fn hint_after(&mut self, after: Duration, window: Duration) -> u16 {
        let ms = after.as_millis() + u128::from(self.hint(window));
        ms.min(MAX_HINT.as_millis()) as u16
    }

    /// The hint of the `i`-th of `n` clients spread over `[after, after + window)`: uniform
    /// within its own slot of `window / n`, so the `n` returns come at an even rate (plain
    /// uniform draws bunch by chance), at most [`MAX_HINT`].
    /// The spread is squeezed under [`MAX_HINT`]: hints past it would all read `MAX_HINT` and
    /// bring their clients back in one instant (an `after` past `MAX_HINT - HINT_WINDOW` leaves
    /// the last [`HINT_WINDOW`] to spread over).
    pub fn slot_hint(&mut self, after: Duration, window: Duration, i: usize, n: usize) -> u16 {
        let after = after.min(MAX_HINT.saturating_sub(HINT_WINDOW));
        let window = window.min(MAX_HINT - after);
        let slot = window / n.max(1) as u32;
        self.hint_after(after + slot * i as u32, slot)
    }

    /// splitmix64: small, fast and evenly spread; no secrecy is needed.
    fn next(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// A token bucket of `per_second` closes, holding at most a tenth of a second's worth (at least
/// one), so that no one-second window sees more than 1.1 times the rate.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenBucket {
    per_second: u32,
    burst: f64,
    tokens: f64,
    at: Instant,
}

/// The bucket's size for a rate: a tenth of a second's worth, at least one.
pub fn burst_of(per_second: u32) -> u32 {
    (per_second / 10).max(1)
}

impl TokenBucket {
    pub fn new(per_second: u32, now: Instant) -> Self {
        let burst = f64::from(burst_of(per_second));
        TokenBucket { per_second, burst, tokens: burst, at: now }
    }

    /// Takes up to `want` tokens at `now`; returns how many it took.
    pub fn take(&mut self, want: usize, now: Instant) -> usize {
        self.refill(now);
        let granted = (self.tokens.max(0.0).floor() as usize).min(want);
        self.tokens -= granted as f64;
        granted
    }

    /// Takes `n` tokens at `now` whatever the bucket holds, into debt that later takes repay;
    /// returns how long until the bucket would have held the first of them.
    pub fn force(&mut self, n: usize, now: Instant) -> Duration {
        self.refill(now);
        let wait = Duration::from_secs_f64((-self.tokens).max(0.0) / f64::from(self.per_second.max(1)));
        self.tokens -= n as f64;
        wait
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * f64::from(self.per_second)).min(self.burst);
        self.at = self.at.max(now);
    }
}

/// Where the drain's closes get their leave (`--drain-max-reconnects-per-second`).
pub enum ReconnectBudget {
    /// No budget: the schedule alone paces the drain.
    Unlimited,
    /// This server's own bucket (no Redis).
    Local(TokenBucket),
    /// The fleet's bucket in Redis; while Redis does not answer, this server's own (`warned`:
    /// that was logged, once per drain). After a failure Redis is asked again only at `retry`:
    /// a Redis that times out would otherwise slow every tick by the timeout.
    Fleet { redis: Box<RedisBudget>, fallback: TokenBucket, warned: bool, retry: Instant },
}

impl ReconnectBudget {
    /// The budget for `per_second` closes a second (0: none), in Redis when there is one.
    pub fn new(per_second: u32, redis: Option<RedisBudget>) -> Self {
        let bucket = TokenBucket::new(per_second, Instant::now());
        match (per_second, redis) {
            (0, _) => ReconnectBudget::Unlimited,
            (_, None) => ReconnectBudget::Local(bucket),
            (_, Some(redis)) => ReconnectBudget::Fleet {
                redis: Box::new(redis),
                fallback: bucket,
                warned: false,
                retry: Instant::now(),
            },
        }
    }

    /// The budget's rate (0: none).
    pub fn per_second(&self) -> u32 {
        match self {
            ReconnectBudget::Unlimited => 0,
            ReconnectBudget::Local(b) | ReconnectBudget::Fleet { fallback: b, .. } => b.per_second,
        }
    }

    /// Takes leave for up to `want` closes now; returns how many may go.
    pub async fn take(&mut self, want: usize) -> usize {
        match self {
            ReconnectBudget::Unlimited => want,
            ReconnectBudget::Local(bucket) => bucket.take(want, Instant::now()),
            ReconnectBudget::Fleet { fallback, retry, .. } if Instant::now() < *retry => {
                fallback.take(want, Instant::now())
            }
            ReconnectBudget::Fleet { redis, fallback, warned, retry } => match redis.take(want, false).await {
                Ok((granted, _)) => granted.min(want),
                Err(e) => {
                    unreachable(warned, retry, &e);
                    fallback.take(want, Instant::now())
                }
            },
        }
    }

    /// Takes leave for `n` closes that go now whatever the budget holds (the window's end); the
    /// budget goes into debt, so closes elsewhere wait for it. Returns when, from now, the first
    /// of them would have had leave: their hints start there.
    pub async fn force(&mut self, n: usize) -> Duration {
        match self {
            ReconnectBudget::Unlimited => Duration::ZERO,
            ReconnectBudget::Local(bucket) => bucket.force(n, Instant::now()),
            ReconnectBudget::Fleet { fallback, retry, .. } if Instant::now() < *retry => {
                fallback.force(n, Instant::now())
            }
            ReconnectBudget::Fleet { redis, fallback, warned, retry } => match redis.take(n, true).await {
                Ok((_, wait)) => wait,
                Err(e) => {
                    unreachable(warned, retry, &e);
                    fallback.force(n, Instant::now())
                }
            },
        }
    }
}

/// After the fleet's budget did not answer: ask it again in a second, and log it once per drain.
fn unreachable(warned: &mut bool, retry: &mut Instant, error: &dyn std::fmt::Display) {
    *retry = Instant::now() + RETRY_REDIS;
    if !std::mem::replace(warned, true) {
        tracing::warn!(%error, "the fleet's reconnect budget is unreachable; this server holds to the budget on its own");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_close_reason_fits_and_ends_in_the_hint() {
        for hint in [0, 1, 999, 30_000, u16::MAX] {
            let reason = close_reason(hint);
            assert!(reason.len() <= MAX_CLOSE_REASON, "{} bytes: {reason}", reason.len());
            assert!(reason.ends_with(&format!("reconnect_after_ms={hint}")), "{reason}");
            assert_eq!(parse_hint(&reason), Some(hint));
        }
        assert_eq!(close_reason(1500), "server draining; reconnect_after_ms=1500");
        assert_eq!(parse_hint("server draining"), None);
        // The frame carries the reason whole.
        let frame = crate::transport::outbox::CloseReason::Draining { reconnect_after_ms: 65_535 }.frame();
        assert!(frame.ends_with(b"reconnect_after_ms=65535"));
    }

    #[test]
    fn the_schedule_spreads_batches_over_three_quarters_of_the_timeout() {
        let s = Schedule::new(300, Duration::from_secs(4));
        assert_eq!(s.window(), Duration::from_secs(3));
        assert_eq!(s.due(Duration::ZERO), 10, "30 batches of 10, the first at once");
        assert_eq!(s.due(Duration::from_millis(1500)), 150, "15 batches out, ~103 ms apart");
        assert_eq!(s.due(Duration::from_secs(3)), 300);
        assert_eq!(s.next_batch(Duration::ZERO), s.period);
        assert_eq!(s.next_batch(Duration::from_secs(5)), s.window(), "never past the window");
        let few = Schedule::new(3, Duration::from_secs(20));
        assert_eq!((few.due(Duration::ZERO), few.due(Duration::from_millis(7_499))), (1, 1));
        assert_eq!(few.due(Duration::from_millis(7_500)), 2);
        assert_eq!(Schedule::new(0, Duration::from_secs(1)).due(Duration::ZERO), 0);
        let paced_by_a_budget = Schedule::at_once(500, Duration::from_secs(8));
        assert_eq!((paced_by_a_budget.due(Duration::ZERO), paced_by_a_budget.window()), (500, Duration::from_secs(6)));
    }

    #[test]
    fn hints_are_uniform_over_their_window() {
        let mut jitter = Jitter::seeded(7);
        let window = Duration::from_secs(2);
        let hints: Vec<u16> = (0..10_000).map(|_| jitter.hint(window)).collect();
        assert!(hints.iter().all(|&h| h < 2000));
        // Ten buckets of 200 ms each hold about a tenth.
        for bucket in 0..10 {
            let n = hints.iter().filter(|&&h| h / 200 == bucket).count();
            assert!((800..1200).contains(&n), "bucket {bucket}: {n}");
        }
        assert_eq!(Jitter::seeded(1).hint(Duration::ZERO), 0);
    }

    #[test]
    fn the_bucket_holds_to_its_rate_in_any_second() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(100, start);
        let mut granted_at = Vec::new();
        // A server asking for far more than the rate every 10 ms, for 5 s.
        for tick in 0..500u32 {
            let now = start + Duration::from_millis(10) * tick;
            let n = bucket.take(1000, now);
            granted_at.extend(std::iter::repeat_n(now - start, n));
        }
        for from in (0..4000).step_by(50) {
            let from = Duration::from_millis(from);
            let n = granted_at.iter().filter(|&&t| t >= from && t < from + Duration::from_secs(1)).count();
            assert!(n <= 110, "{n} grants in the second from {from:?}");
        }
        assert!(granted_at.len() >= 490, "the rate is used: {}", granted_at.len());
        assert_eq!(burst_of(5), 1);
    }

    #[test]
    fn forced_closes_put_the_bucket_into_debt_that_later_ones_wait_for() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(100, start);
        assert_eq!(bucket.take(1000, start), 10, "a tenth of a second's worth");
        // A first server forces 150 at once: nothing owed before it.
        assert_eq!(bucket.force(150, start), Duration::ZERO);
        // A second one right after waits for the first's 150 (1.5 s at 100/s).
        assert_eq!(bucket.force(150, start), Duration::from_millis(1500));
        // Until the debt is repaid, nobody takes anything.
        assert_eq!(bucket.take(10, start + Duration::from_secs(2)), 0);
        assert!(bucket.take(10, start + Duration::from_millis(3100)) > 0);
        assert_eq!(Jitter::seeded(1).hint_after(Duration::from_secs(70), Duration::from_secs(1)), u16::MAX);
        let h = Jitter::seeded(1).hint_after(Duration::from_millis(1500), Duration::from_secs(1));
        assert!((1500..2500).contains(&h), "{h}");
        // Slots: 300 clients over 3 s, every 100 ms holds ten of them.
        let mut jitter = Jitter::seeded(9);
        let hints: Vec<u16> =
            (0..300).map(|i| jitter.slot_hint(Duration::ZERO, Duration::from_secs(3), i, 300)).collect();
        for slot in 0..30 {
            assert_eq!(hints.iter().filter(|&&h| h / 100 == slot).count(), 10, "slot {slot}");
        }
        // Owed 50 s already, 5,000 clients over 50 s: squeezed into the 15.5 s left, not piled
        // up at the last hint.
        let mut jitter = Jitter::seeded(3);
        let late: Vec<u16> =
            (0..5000).map(|i| jitter.slot_hint(Duration::from_secs(50), Duration::from_secs(50), i, 5000)).collect();
        assert!(late.iter().all(|&h| h >= 50_000), "none before what is owed");
        let at_cap = late.iter().filter(|&&h| h == u16::MAX).count();
        assert!(at_cap <= 2, "{at_cap} hints at the cap");
        let last_second = late.iter().filter(|&&h| h >= 64_535).count();
        assert!(last_second < 400, "{last_second} in the last second: spread, not piled up");
    }

    #[test]
    fn forced_hints_spread_at_the_budgets_rate() {
        let base = Duration::from_secs(1);
        assert_eq!(forced_hint_window(500, 100, base), Duration::from_secs(5));
        assert_eq!(forced_hint_window(50, 100, base), base);
        assert_eq!(forced_hint_window(500, 0, base), base);
        assert_eq!(forced_hint_window(1_000_000, 1, base), MAX_HINT);
    }
}
