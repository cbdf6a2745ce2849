//! Pure: per-channel order and recovery, as every bus backend must provide it.
//!
//! Every channel has an *epoch* and a *head*. Each publish atomically takes the next offset
//! (`head + 1`), appends the message to the channel's history (the last `--history-size`
//! entries, kept `--history-ttl` seconds after the channel's last publish) and publishes it
//! with its offset and epoch. The epoch is replaced whenever the channel's state is lost (Redis
//! restarted empty, or the channel idle past its TTL), and offsets start again from 1 under the
//! new epoch, so "same epoch" always means "same sequence".
//!
//! A read answers a resume: given the client's last `(epoch, offset)` ([`Since`]), it returns
//! the channel's position and the missed entries when history still covers them, or says why
//! it cannot ([`Replay`], [`Lost`]).
//!
//! This module holds only the types of that contract; the implementations are the backends'
//! ([`crate::messaging::local`] in process, [`crate::messaging::redis`] in Lua scripts). No
//! I/O and no backend imports here, so the protocol can speak these types.

use std::sync::Arc;
use std::time::Duration;

use crate::messaging::envelope::{Envelope, Sequenced};

#[derive(Debug, Clone, Copy)]
pub struct HistoryConfig {
    /// Entries kept per channel; 0 keeps none (offsets and epochs still work).
    pub size: u64,
    /// Seconds a channel's state outlives its last publish.
    pub ttl: Duration,
    /// Most messages one resume (or one gap refill) replays; a longer gap is reported as
    /// `history_gap`. Below the per-client queue, so a replay never overflows it.
    pub max_replay: u64,
    /// Most bytes of entries (as stored) one read returns; a gap of more is reported as
    /// `history_gap` too. Below the per-client byte budget, so a backend never builds a reply
    /// no client could take. (What a replay renders to is checked again against the client's
    /// budget by the hub: rendering only grows it.)
    pub max_replay_bytes: u64,
}

/// Where a client left off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Since {
    pub epoch: String,
    pub offset: u64,
}

/// Why missed messages cannot be replayed. Part of the public interface (`reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lost {
    /// The channel's epoch is not the client's: its history was lost or it never existed.
    EpochChanged,
    /// The client claims an offset the channel has not reached.
    OffsetAhead,
    /// History no longer reaches back to the client's offset (trimmed, expired or disabled).
    HistoryGap,
}

impl Lost {
    pub fn as_str(self) -> &'static str {
        match self {
            Lost::EpochChanged => "epoch_changed",
            Lost::OffsetAhead => "offset_ahead",
            Lost::HistoryGap => "history_gap",
        }
    }
    /// The reason a backend reports, back to its variant.
    pub fn parse(s: &str) -> Option<Lost> {
        [Lost::EpochChanged, Lost::OffsetAhead, Lost::HistoryGap].into_iter().find(|l| l.as_str() == s)
    }
}

/// The answer to a subscribe: the channel's position now, and what was missed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replay {
    pub epoch: Arc<str>,
    pub head: u64,
    /// `None` when no `since` was given.
    pub recovery: Option<Result<(), Lost>>,
    /// Entries after `since`, up to `head`, in order (empty unless recovered).
    pub entries: Vec<Sequenced>,
}

impl Replay {
    pub fn recovered(&self) -> bool {
        matches!(self.recovery, Some(Ok(())))
    }
}

/// Most messages one publish carries (one script call); a client's longer run of publishes is
/// split into several.
pub const MAX_PUBLISH_BATCH: usize = 64;

/// Longest publish id a client may give (`"id"` of a protocol-mode publish), in bytes.
pub const MAX_PUBLISH_ID_LEN: usize = 64;

/// Fewest publish ids a channel remembers, whatever `--history-size` is (0 included): a retry
/// right after an unknown outcome must still find its id.
pub const MIN_ID_WINDOW: u64 = 128;

impl HistoryConfig {
    /// How many of a channel's latest offsets keep their publish ids: a retry with an id whose
    /// message is among them is not published again. The history window, and at least
    /// [`MIN_ID_WINDOW`].
    pub fn id_window(&self) -> u64 {
        self.size.max(MIN_ID_WINDOW)
    }
}

/// One message to publish, with the id its client gave it (to make a retry safe), if any.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub envelope: Envelope,
    pub id: Option<Box<str>>,
}

/// Where one published message went: its offset, and whether an earlier publish with the same
/// id had already put it there (a retry, not published again).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placed {
    pub offset: u64,
    pub duplicate: bool,
}

/// What a publish run did: the channel's epoch, and each message's place, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub epoch: Arc<str>,
    pub placed: Vec<Placed>,
}
