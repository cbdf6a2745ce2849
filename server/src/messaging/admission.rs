//! Pure: which messages from Redis pub/sub a server believes.
//!
//! Anyone who can `PUBLISH` on a channel's pub/sub name can put bytes in front of every server
//! (the Redis password is what keeps them out; this is the second line). The hub drops what it
//! already delivered — everything at or before its cursor — so one believed message with a huge
//! offset would silence the channel for good. The rule below keeps such a message from moving the
//! cursor, without a Redis round trip for legitimate traffic.
//!
//! What a legitimate server can produce: offsets come from one `HINCRBY` in the publish script,
//! and one pub/sub connection receives a channel's messages in that order, none skipped. So the
//! next message of an epoch this server knows is at most one past the larger of
//!
//! * `last`, the last position delivered here, and
//! * `head`, the highest position Redis itself reported for the channel (the read of a join, of a
//!   refill, or of a check below) — everything up to it exists in Redis.
//!
//! The rule ([`judge`]): at or before `last` in its epoch is a duplicate (dropped, as before); up
//! to that bound is delivered; anything else — further ahead, or in an epoch this server has not
//! seen Redis report — is refused unless one read of the channel's position in Redis, made
//! there and then, shows it ([`Verdict::Check`]). Legitimate gaps are rare (a channel's first
//! message racing its join's read, an epoch that starts anew after the channel idled past its
//! TTL, a publish script that failed half-way) and cost that one read. Checks are rationed per
//! channel ([`may_check`]) and per server ([`CheckBudget`]): a flood of forged messages costs
//! Redis at most one read per channel per [`CHECK_EVERY`], and [`MAX_CHECKS_PER_SECOND`] in
//! all, and is refused against the last answer meanwhile. Envelopes that do not
//! parse (prefix, offset 0, epoch, version, kind, UTF-8, JSON) never get this far
//! ([`crate::messaging::envelope`]).
//!
//! What it cannot do: tell a forged message from a real one at an offset Redis has reached. One
//! there (the next offset, or one up to a head Redis reported ahead of what was delivered) takes
//! the real one's place, and the real ones up to it then arrive as duplicates: a bounded loss of
//! messages already published, never the channel's later ones. Only the password prevents that.

use std::time::{Duration, Instant};

/// Most often one channel's position is read to check a message that is not believable as it
/// stands.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Most checks one server makes per second, all channels together: a flood over many channels
/// costs Redis (and this server's pub/sub loop, which waits for each) no more than that.
pub const MAX_CHECKS_PER_SECOND: u32 = 100;

/// Why a message from the bus was refused. Part of the metrics (`reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// It does not parse as `<offset>:<epoch>:<envelope>`.
    Undecodable,
    /// Its epoch is not the one Redis reported for the channel.
    UnknownEpoch,
    /// Its offset is ahead of anything Redis has for the channel.
    OffsetAhead,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Undecodable => "undecodable",
            Refusal::UnknownEpoch => "unknown_epoch",
            Refusal::OffsetAhead => "offset_ahead",
        }
    }
}

/// What to do with a message from pub/sub.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Deliver,
    /// At or before the last position delivered: dropped, like any duplicate.
    Duplicate,
    /// Not believable against what is known; refused with this reason unless a read of the
    /// channel's position shows it.
    Check(Refusal),
}

/// Judges a message at `(epoch, offset)` against the last position delivered here and the
/// highest position Redis reported for the channel (see the module doc).
pub fn judge(last: Option<(&str, u64)>, head: Option<(&str, u64)>, epoch: &str, offset: u64) -> Verdict {
    let in_epoch = |p: Option<(&str, u64)>| p.filter(|(e, _)| *e == epoch).map(|(_, o)| o);
    let (last, head) = (in_epoch(last), in_epoch(head));
    if last.is_some_and(|last| offset <= last) {
        return Verdict::Duplicate;
    }
    match last.max(head) {
        Some(known) if offset <= known.saturating_add(1) => Verdict::Deliver,
        Some(_) => Verdict::Check(Refusal::OffsetAhead),
        None => Verdict::Check(Refusal::UnknownEpoch),
    }
}

/// Whether a channel last checked at `checked_at` may be checked again at `now`.
pub fn may_check(checked_at: Option<Instant>, now: Instant) -> bool {
    checked_at.is_none_or(|at| now.saturating_duration_since(at) >= CHECK_EVERY)
}

/// The checks one server has left this second ([`MAX_CHECKS_PER_SECOND`]).
#[derive(Debug, Default)]
pub struct CheckBudget {
    window: Option<Instant>,
    used: u32,
}

impl CheckBudget {
    /// Whether a check may be made at `now`.
    pub fn available(&mut self, now: Instant) -> bool {
        if self.window.is_none_or(|start| now.saturating_duration_since(start) >= Duration::from_secs(1)) {
            self.window = Some(now);
            self.used = 0;
        }
        self.used < MAX_CHECKS_PER_SECOND
    }

    /// Records a check made.
    pub fn spend(&mut self) {
        self.used += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HUGE: u64 = 1_000_000_000_000;

    #[test]
    fn the_next_offsets_are_delivered_and_earlier_ones_are_duplicates() {
        let last = Some(("e", 7));
        assert_eq!(judge(last, None, "e", 8), Verdict::Deliver);
        assert_eq!(judge(last, None, "e", 7), Verdict::Duplicate);
        assert_eq!(judge(last, None, "e", 1), Verdict::Duplicate);
    }

    #[test]
    fn a_huge_offset_is_refused_unless_redis_has_it() {
        assert_eq!(judge(Some(("e", 7)), None, "e", HUGE), Verdict::Check(Refusal::OffsetAhead));
        assert_eq!(judge(Some(("e", 7)), Some(("e", 7)), "e", 9), Verdict::Check(Refusal::OffsetAhead));
        assert_eq!(judge(Some(("e", u64::MAX)), None, "e", u64::MAX), Verdict::Duplicate);
        // After a check: Redis's head covers what it has, and the one after it.
        assert_eq!(judge(Some(("e", 7)), Some(("e", 500)), "e", 300), Verdict::Deliver);
        assert_eq!(judge(Some(("e", 7)), Some(("e", 500)), "e", 501), Verdict::Deliver);
        assert_eq!(judge(Some(("e", 7)), Some(("e", 500)), "e", HUGE), Verdict::Check(Refusal::OffsetAhead));
    }

    #[test]
    fn a_refused_message_leaves_the_channel_open() {
        // Refusing moves nothing: the next real message is judged against the same position.
        let last = Some(("e", 7));
        assert_eq!(judge(last, None, "e", HUGE), Verdict::Check(Refusal::OffsetAhead));
        assert_eq!(judge(last, None, "e", 8), Verdict::Deliver);
    }

    #[test]
    fn an_epoch_redis_did_not_report_is_refused_unless_a_check_shows_it() {
        assert_eq!(judge(Some(("e", 7)), Some(("e", 9)), "forged", 8), Verdict::Check(Refusal::UnknownEpoch));
        // Nothing known yet (a message racing its channel's first join): checked.
        assert_eq!(judge(None, None, "e", 1), Verdict::Check(Refusal::UnknownEpoch));
        // A new epoch (the channel idled past its TTL) once a check saw it.
        assert_eq!(judge(Some(("old", 7)), Some(("new", 1)), "new", 1), Verdict::Deliver);
        assert_eq!(judge(Some(("new", 1)), Some(("new", 1)), "new", 2), Verdict::Deliver);
        // The join's read alone vouches for the channel's next message.
        assert_eq!(judge(None, Some(("e", 40)), "e", 41), Verdict::Deliver);
    }

    #[test]
    fn checks_are_rationed_per_channel() {
        let now = Instant::now();
        assert!(may_check(None, now));
        assert!(!may_check(Some(now), now + CHECK_EVERY / 2));
        assert!(may_check(Some(now), now + CHECK_EVERY));
        let mut budget = CheckBudget::default();
        for _ in 0..MAX_CHECKS_PER_SECOND {
            assert!(budget.available(now));
            budget.spend();
        }
        assert!(!budget.available(now + Duration::from_millis(999)));
        assert!(budget.available(now + Duration::from_secs(1)));
    }
}
