//! Pure: what clients may say and what the server says back.
//!
//! * Channel names: 1-128 bytes of `A-Z a-z 0-9 _ - . : @`, the same in both modes, so a name is
//!   always safe in a URL path, a Redis key and a log line.
//! * Protocol mode (`/ws`) frames are JSON text. [`parse_client_frame`] turns one into a
//!   [`ClientOp`] or a [`ProtocolError`] that names the bad field (or, for a refusal, the
//!   channel); nothing here does I/O and nothing here judges tokens.
//! * [`encode_message`] renders a published [`Payload`] for each mode. The hub calls it once per
//!   message and mode and shares the result among all recipients.
//!
//! Both halves speak this vocabulary: the transport parses what clients send, the hub renders
//! what they receive. It imports only the pure messaging types (envelope, history positions),
//! never a bus backend.

use std::borrow::Cow;
use std::fmt;

use base64::Engine as _;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::messaging::envelope::{Payload, valid_epoch};
use crate::messaging::history::{MAX_PUBLISH_ID_LEN, Placed, Replay, Since};

pub const MAX_CHANNEL_LEN: usize = 128;

/// Checks a channel name; the error says what is wrong with it.
pub fn validate_channel(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("channel must not be empty".into());
    }
    if name.len() > MAX_CHANNEL_LEN {
        return Err(format!("channel is {} bytes long; the limit is {MAX_CHANNEL_LEN}", name.len()));
    }
    match name.bytes().find(|b| !(b.is_ascii_alphanumeric() || b"_-.:@".contains(b))) {
        Some(b) => Err(format!("channel contains {:?}; allowed are A-Z a-z 0-9 _ - . : @", b as char)),
        None => Ok(()),
    }
}

/// Checks a publish `id`: 1 to [`MAX_PUBLISH_ID_LEN`] bytes of `A-Z a-z 0-9 _ - . : @ + / =`
/// (a UUID, a counter, base64 all fit); the error says what is wrong with it.
pub fn validate_publish_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_PUBLISH_ID_LEN {
        return Err(format!("field `id` must be 1 to {MAX_PUBLISH_ID_LEN} bytes long; it is {}", id.len()));
    }
    match id.bytes().find(|b| !(b.is_ascii_alphanumeric() || b"_-.:@+/=".contains(b))) {
        Some(b) => Err(format!("field `id` contains {:?}; allowed are A-Z a-z 0-9 _ - . : @ + / =", b as char)),
        None => Ok(()),
    }
}

/// What a protocol-mode client asked for.
#[derive(Debug, PartialEq, Eq)]
pub enum ClientOp<'a> {
    /// `since`: resume after this position, replaying what was missed.
    Subscribe {
        channel: &'a str,
        since: Option<Since>,
    },
    Unsubscribe {
        channel: &'a str,
    },
    /// `data` is the client's JSON value exactly as sent (never re-serialised). `id`: the
    /// client's name for this message ([`validate_publish_id`]); a retry with the same id is
    /// published once, and the server acknowledges the publish (`published`).
    Publish {
        channel: &'a str,
        data: &'a str,
        id: Option<&'a str>,
    },
    /// A fresh token to replace the connection's, before the current one expires.
    Refresh {
        token: &'a str,
    },
}

/// Error codes of `{"type":"error"}` frames. Part of the public interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The frame is not a JSON object.
    InvalidJson,
    /// `op` is missing or not one of subscribe / unsubscribe / publish / refresh.
    UnknownOp,
    /// A required field is missing or has the wrong type.
    InvalidField,
    /// The channel name breaks the naming rule.
    InvalidChannel,
    /// The connection already has `--max-subscriptions` channels.
    SubscriptionLimit,
    /// `unsubscribe` for a channel the connection is not subscribed to.
    NotSubscribed,
    /// `subscribe` for a channel the connection is already subscribed to.
    AlreadySubscribed,
    /// Binary frames have no meaning in protocol mode.
    BinaryNotSupported,
    /// The message bus is down; the operation did not happen. Retry later.
    BusUnavailable,
    /// The connection's token does not allow this operation on this channel (or has expired).
    Forbidden,
    /// A `refresh` whose token was refused; the connection's token stays in force.
    InvalidToken,
    /// The connection publishes faster than `--publish-rate`, or subscribes to new channels
    /// faster than `--subscribe-rate`: the operation did not happen. Slow down.
    RateLimited,
    /// The server holds `--max-channels` channels and this one is not among them: not
    /// subscribed. Retry later (or on another server).
    ChannelLimit,
    /// The subscribe took longer than `--subscribe-timeout`: not subscribed. Retry.
    Timeout,
    /// A publish was sent to the bus but its answer never came: it may or may not have been
    /// published. Retry with the same `id` (published once either way).
    OutcomeUnknown,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::UnknownOp => "unknown_op",
            ErrorCode::InvalidField => "invalid_field",
            ErrorCode::InvalidChannel => "invalid_channel",
            ErrorCode::SubscriptionLimit => "subscription_limit",
            ErrorCode::NotSubscribed => "not_subscribed",
            ErrorCode::AlreadySubscribed => "already_subscribed",
            ErrorCode::BinaryNotSupported => "binary_not_supported",
            ErrorCode::BusUnavailable => "bus_unavailable",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::InvalidToken => "invalid_token",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::ChannelLimit => "channel_limit",
            ErrorCode::Timeout => "timeout",
            ErrorCode::OutcomeUnknown => "outcome_unknown",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError {
    pub code: ErrorCode,
    pub message: String,
    /// The channel the refused operation named, when the refusal is about that channel.
    pub channel: Option<String>,
    /// The `id` of the publish this error answers, when it had one.
    pub id: Option<String>,
}

impl ProtocolError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ProtocolError { code, message: message.into(), channel: None, id: None }
    }

    /// The same error, about `channel` (the frame then carries a `channel` field).
    pub fn on_channel(mut self, channel: &str) -> Self {
        self.channel = Some(channel.to_owned());
        self
    }

    /// The same error, answering the publish with this `id` (the frame then carries it).
    pub fn for_id(mut self, id: Option<&str>) -> Self {
        self.id = id.map(str::to_owned);
        self
    }

    /// The `{"type":"error",...}` frame for this error.
    pub fn to_frame(&self) -> String {
        let mut v = serde_json::json!({"type": "error", "code": self.code.as_str(), "message": self.message});
        if let Some(channel) = &self.channel {
            v["channel"] = channel.as_str().into();
        }
        if let Some(id) = &self.id {
            v["id"] = id.as_str().into();
        }
        v.to_string()
    }
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)
    }
}

#[derive(Deserialize)]
struct WireOp<'a> {
    #[serde(borrow, default)]
    op: Option<&'a RawValue>,
    #[serde(borrow, default)]
    channel: Option<&'a RawValue>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
    #[serde(borrow, default)]
    since: Option<&'a RawValue>,
    #[serde(borrow, default)]
    token: Option<&'a RawValue>,
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireSince {
    epoch: serde_json::Value,
    offset: serde_json::Value,
}

fn parse_since(raw: &RawValue) -> Result<Option<Since>, ProtocolError> {
    let invalid = |m: &str| ProtocolError::new(ErrorCode::InvalidField, m.to_owned());
    if raw.get() == "null" {
        return Ok(None);
    }
    let since: WireSince = serde_json::from_str(raw.get())
        .map_err(|_| invalid("field `since` must be an object {\"epoch\": string, \"offset\": integer}"))?;
    let epoch = since.epoch.as_str().ok_or_else(|| invalid("field `since.epoch` must be a string"))?;
    if !valid_epoch(epoch) {
        return Err(invalid("field `since.epoch` is not an epoch this server issues"));
    }
    let offset = since.offset.as_u64().ok_or_else(|| invalid("field `since.offset` must be a non-negative integer"))?;
    Ok(Some(Since { epoch: epoch.to_owned(), offset }))
}

/// Parses one protocol-mode text frame.
pub fn parse_client_frame(text: &str) -> Result<ClientOp<'_>, ProtocolError> {
    // serde would also accept a JSON array for a struct; the protocol speaks objects only.
    if !text.trim_start().starts_with('{') {
        return Err(ProtocolError::new(ErrorCode::InvalidJson, "frame is not a JSON object"));
    }
    let wire: WireOp<'_> = serde_json::from_str(text)
        .map_err(|e| ProtocolError::new(ErrorCode::InvalidJson, format!("frame is not a JSON object: {e}")))?;
    let op = match wire.op {
        None => {
            return Err(ProtocolError::new(ErrorCode::UnknownOp, "missing field `op`"));
        }
        Some(raw) => str_field(raw, "op").map_err(|e| ProtocolError { code: ErrorCode::UnknownOp, ..e })?,
    };
    let channel = || -> Result<&str, ProtocolError> {
        let raw = wire.channel.ok_or_else(|| ProtocolError::new(ErrorCode::InvalidField, "missing field `channel`"))?;
        let name = str_field(raw, "channel")?;
        validate_channel(name).map_err(|m| ProtocolError::new(ErrorCode::InvalidChannel, m))?;
        Ok(name)
    };
    match op {
        "subscribe" => {
            let channel = channel()?;
            let since = wire.since.map(parse_since).transpose()?.flatten();
            Ok(ClientOp::Subscribe { channel, since })
        }
        "unsubscribe" => Ok(ClientOp::Unsubscribe { channel: channel()? }),
        "publish" => {
            let channel = channel()?;
            let data = wire.data.map(RawValue::get).filter(|d| *d != "null").ok_or_else(|| {
                ProtocolError::new(ErrorCode::InvalidField, "missing field `data` (any JSON value but null)")
            })?;
            let id = wire.id.filter(|raw| raw.get() != "null").map(|raw| str_field(raw, "id")).transpose()?;
            if let Some(id) = id {
                validate_publish_id(id).map_err(|m| ProtocolError::new(ErrorCode::InvalidField, m))?;
            }
            Ok(ClientOp::Publish { channel, data, id })
        }
        "refresh" => {
            let raw = wire.token.ok_or_else(|| ProtocolError::new(ErrorCode::InvalidField, "missing field `token`"))?;
            Ok(ClientOp::Refresh { token: str_field(raw, "token")? })
        }
        other => Err(ProtocolError::new(
            ErrorCode::UnknownOp,
            format!("unknown op {other:?}; expected subscribe, unsubscribe, publish or refresh"),
        )),
    }
}

/// A field that must be a JSON string without escapes (ops, channel names and JWTs never need
/// any).
fn str_field<'a>(raw: &'a RawValue, field: &str) -> Result<&'a str, ProtocolError> {
    let s = raw.get();
    match s.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
        Some(inner) if !inner.contains('\\') => Ok(inner),
        Some(_) => {
            let code = if field == "channel" { ErrorCode::InvalidChannel } else { ErrorCode::InvalidField };
            Err(ProtocolError::new(code, format!("field `{field}` must not contain escapes")))
        }
        None => Err(ProtocolError::new(ErrorCode::InvalidField, format!("field `{field}` must be a string"))),
    }
}

/// How a message is shown to raw-mode clients: the payload unwrapped. A JSON string becomes its
/// text; any other JSON value is sent as its JSON text.
pub enum RawFrame {
    Text(Bytes),
    Binary(Bytes),
}

pub fn encode_raw(payload: &Payload) -> RawFrame {
    match payload {
        Payload::Text(b) => RawFrame::Text(b.clone()),
        Payload::Binary(b) => RawFrame::Binary(b.clone()),
        Payload::Json(json) => {
            if json.first() == Some(&b'"')
                && let Ok(s) = serde_json::from_slice::<Cow<'_, str>>(json)
            {
                return RawFrame::Text(match s {
                    Cow::Borrowed(_) => json.slice(1..json.len() - 1),
                    Cow::Owned(s) => Bytes::from(s),
                });
            }
            RawFrame::Text(json.clone())
        }
    }
}

/// How a message is shown to protocol-mode clients: a `{"type":"message"}` frame with the
/// message's place in the channel's order. Text payloads become JSON strings; binary payloads
/// become base64 strings with `"encoding":"base64"`.
pub fn encode_message(channel: &str, epoch: &str, offset: u64, payload: &Payload) -> String {
    // Channel names and epochs need no escaping (validate_channel, valid_epoch), so the frame is
    // assembled directly.
    let mut out = String::with_capacity(80 + channel.len() + epoch.len() + payload_len(payload));
    out.push_str(r#"{"type":"message","channel":""#);
    out.push_str(channel);
    out.push_str(r#"","epoch":""#);
    out.push_str(epoch);
    out.push_str(r#"","offset":"#);
    out.push_str(&offset.to_string());
    out.push_str(r#","data":"#);
    match payload {
        Payload::Json(json) => out.push_str(std::str::from_utf8(json).unwrap_or("null")),
        Payload::Text(text) => {
            let text = std::str::from_utf8(text).unwrap_or_default();
            out.push_str(&serde_json::to_string(text).unwrap_or_default());
        }
        Payload::Binary(bin) => {
            out.push('"');
            base64::engine::general_purpose::STANDARD.encode_string(bin, &mut out);
            out.push_str(r#"","encoding":"base64""#);
        }
    }
    out.push('}');
    out
}

fn payload_len(p: &Payload) -> usize {
    match p {
        Payload::Text(b) | Payload::Json(b) => b.len() + 8,
        Payload::Binary(b) => b.len() * 4 / 3 + 30,
    }
}

/// The reply to a subscribe: the channel's position, and whether the missed messages follow.
pub fn subscribed_frame(channel: &str, replay: &Replay) -> String {
    let mut v = serde_json::json!({
        "type": "subscribed",
        "channel": channel,
        "epoch": &*replay.epoch,
        "offset": replay.head,
        "recovered": replay.recovered(),
    });
    if let Some(Err(lost)) = replay.recovery {
        v["reason"] = lost.as_str().into();
    }
    v.to_string()
}

pub fn unsubscribed_frame(channel: &str) -> String {
    format!(r#"{{"type":"unsubscribed","channel":"{channel}"}}"#)
}

/// The server ended a subscription because a refreshed token no longer allows it.
pub fn revoked_frame(channel: &str) -> String {
    format!(r#"{{"type":"unsubscribed","channel":"{channel}","reason":"forbidden"}}"#)
}

/// The reply to a `refresh` that was taken: the new token's `exp` (seconds since the epoch).
pub fn refreshed_frame(exp: u64) -> String {
    format!(r#"{{"type":"refreshed","exp":{exp}}}"#)
}

/// The acknowledgement of a publish that carried an `id`: where the message is in the channel's
/// order. `duplicate`: an earlier publish with this id had put it there (a retry after
/// `outcome_unknown`), and it was not published again.
pub fn published_frame(channel: &str, id: &str, epoch: &str, placed: Placed) -> String {
    serde_json::json!({
        "type": "published",
        "channel": channel,
        "id": id,
        "epoch": epoch,
        "offset": placed.offset,
        "duplicate": placed.duplicate,
    })
    .to_string()
}

/// Messages a subscriber will not receive: offsets `from` to `to` (inclusive) of `epoch` were
/// published while this server's bus link was down and history no longer holds them. `to` is
/// `None` when the epoch ended (every message of it after `from` is lost); the new epoch's
/// messages follow. `reason` is a [`crate::messaging::history::Lost`] code.
pub fn gap_frame(channel: &str, epoch: &str, from: u64, to: Option<u64>, reason: &str) -> String {
    let mut v = serde_json::json!({"type": "gap", "channel": channel, "epoch": epoch, "from": from, "reason": reason});
    if let Some(to) = to {
        v["to"] = to.into();
    }
    v.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn parse_err(text: &str) -> ProtocolError {
        parse_client_frame(text).unwrap_err()
    }

    #[test]
    fn parses_every_op() {
        assert_eq!(
            parse_client_frame(r#"{"op":"subscribe","channel":"news"}"#),
            Ok(ClientOp::Subscribe { channel: "news", since: None })
        );
        assert_eq!(
            parse_client_frame(r#"{"op":"subscribe","channel":"news","since":{"epoch":"a-1","offset":7}}"#),
            Ok(ClientOp::Subscribe { channel: "news", since: Some(Since { epoch: "a-1".into(), offset: 7 }) })
        );
        assert_eq!(
            parse_client_frame(r#"{"op":"unsubscribe","channel":"a:b"}"#),
            Ok(ClientOp::Unsubscribe { channel: "a:b" })
        );
        assert_eq!(
            parse_client_frame(r#"{"op":"publish","channel":"c","data":{"x":[1, 2]}}"#),
            Ok(ClientOp::Publish { channel: "c", data: r#"{"x":[1, 2]}"#, id: None })
        );
        assert_eq!(
            parse_client_frame(r#"{"op":"publish","channel":"c","data":1,"id":"3f2a-9:b/+="}"#),
            Ok(ClientOp::Publish { channel: "c", data: "1", id: Some("3f2a-9:b/+=") })
        );
        let too_long = format!("{:?}", "x".repeat(MAX_PUBLISH_ID_LEN + 1));
        for bad in [r#""""#, "7", r#""a b""#, r#""a\u0041""#, too_long.as_str()] {
            let e = parse_err(&format!(r#"{{"op":"publish","channel":"c","data":1,"id":{bad}}}"#));
            assert_eq!(e.code, ErrorCode::InvalidField, "{bad}");
            assert!(e.message.contains("`id`"), "{bad}: {}", e.message);
        }
        assert_eq!(parse_client_frame(r#"{"op":"refresh","token":"a.b.c"}"#), Ok(ClientOp::Refresh { token: "a.b.c" }));
        let e = parse_err(r#"{"op":"refresh"}"#);
        assert_eq!(e.code, ErrorCode::InvalidField);
        assert!(e.message.contains("`token`"));
        assert_eq!(parse_err(r#"{"op":"refresh","token":7}"#).code, ErrorCode::InvalidField);
    }

    #[test]
    fn bad_frames_name_what_is_wrong() {
        assert_eq!(parse_err("not json").code, ErrorCode::InvalidJson);
        assert_eq!(parse_err("[1,2]").code, ErrorCode::InvalidJson);
        assert_eq!(parse_err(r#"{"channel":"c"}"#).code, ErrorCode::UnknownOp);
        let e = parse_err(r#"{"op":"shout","channel":"c"}"#);
        assert_eq!(e.code, ErrorCode::UnknownOp);
        assert!(e.message.contains("shout"));
        let e = parse_err(r#"{"op":"subscribe"}"#);
        assert_eq!(e.code, ErrorCode::InvalidField);
        assert!(e.message.contains("`channel`"));
        let e = parse_err(r#"{"op":"subscribe","channel":7}"#);
        assert_eq!(e.code, ErrorCode::InvalidField);
        assert!(e.message.contains("`channel`"));
        assert_eq!(parse_err(r#"{"op":"subscribe","channel":"a b"}"#).code, ErrorCode::InvalidChannel);
        assert_eq!(parse_err(r#"{"op":"subscribe","channel":""}"#).code, ErrorCode::InvalidChannel);
        let e = parse_err(r#"{"op":"publish","channel":"c"}"#);
        assert!(e.message.contains("`data`"));
        assert_eq!(parse_err(r#"{"op":"publish","channel":"c","data":null}"#).code, ErrorCode::InvalidField);
    }

    #[test]
    fn bad_since_values_name_the_field() {
        for (since, field) in [
            (r#""yesterday""#, "`since`"),
            (r#"{"epoch":"e"}"#, "`since`"),
            (r#"{"epoch":5,"offset":1}"#, "`since.epoch`"),
            (r#"{"epoch":"has space","offset":1}"#, "`since.epoch`"),
            (r#"{"epoch":"e","offset":-1}"#, "`since.offset`"),
            (r#"{"epoch":"e","offset":"7"}"#, "`since.offset`"),
            (r#"{"epoch":"e","offset":1.5}"#, "`since.offset`"),
            (r#"{"epoch":"e","offset":1,"extra":true}"#, "`since`"),
        ] {
            let e = parse_err(&format!(r#"{{"op":"subscribe","channel":"c","since":{since}}}"#));
            assert_eq!(e.code, ErrorCode::InvalidField, "{since}");
            assert!(e.message.contains(field), "{since}: {}", e.message);
        }
    }

    #[test]
    fn channel_rule() {
        assert!(validate_channel("room-1.a_b:c@d").is_ok());
        assert!(validate_channel(&"x".repeat(MAX_CHANNEL_LEN)).is_ok());
        assert!(validate_channel(&"x".repeat(MAX_CHANNEL_LEN + 1)).is_err());
        for bad in ["a/b", "a b", "ü", "a%20", "a\"b"] {
            assert!(validate_channel(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn error_frames_are_json() {
        let frame = ProtocolError::new(ErrorCode::UnknownOp, "say \"what\"").to_frame();
        let v: Value = serde_json::from_str(&frame).unwrap();
        assert_eq!(v, json!({"type":"error","code":"unknown_op","message":"say \"what\""}));
        let frame = ProtocolError::new(ErrorCode::Forbidden, "no").on_channel("room:b").to_frame();
        let v: Value = serde_json::from_str(&frame).unwrap();
        assert_eq!(v, json!({"type":"error","code":"forbidden","channel":"room:b","message":"no"}));
        let v: Value = serde_json::from_str(&refreshed_frame(1_700_000_000)).unwrap();
        assert_eq!(v, json!({"type":"refreshed","exp":1_700_000_000u64}));
        let v: Value = serde_json::from_str(&revoked_frame("c")).unwrap();
        assert_eq!(v, json!({"type":"unsubscribed","channel":"c","reason":"forbidden"}));
        let frame = ProtocolError::new(ErrorCode::OutcomeUnknown, "m").on_channel("c").for_id(Some("i1")).to_frame();
        let v: Value = serde_json::from_str(&frame).unwrap();
        assert_eq!(v, json!({"type":"error","code":"outcome_unknown","channel":"c","id":"i1","message":"m"}));
        let v: Value =
            serde_json::from_str(&published_frame("c", "i1", "e", Placed { offset: 4, duplicate: true })).unwrap();
        assert_eq!(v, json!({"type":"published","channel":"c","id":"i1","epoch":"e","offset":4,"duplicate":true}));
        let v: Value = serde_json::from_str(&gap_frame("c", "e", 3, Some(9), "history_gap")).unwrap();
        assert_eq!(v, json!({"type":"gap","channel":"c","epoch":"e","from":3,"to":9,"reason":"history_gap"}));
        let v: Value = serde_json::from_str(&gap_frame("c", "e", 3, None, "epoch_changed")).unwrap();
        assert_eq!(v, json!({"type":"gap","channel":"c","epoch":"e","from":3,"reason":"epoch_changed"}));
    }

    #[test]
    fn message_frames_for_each_payload_kind() {
        let parse = |p: &Payload| serde_json::from_str::<Value>(&encode_message("c", "e-1", 9, p)).unwrap();
        let frame = |extra: Value| {
            let mut v = json!({"type":"message","channel":"c","epoch":"e-1","offset":9});
            v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            v
        };
        assert_eq!(parse(&Payload::Json(Bytes::from_static(br#"{"a":1}"#))), frame(json!({"data":{"a":1}})));
        assert_eq!(
            parse(&Payload::Text(Bytes::from_static(b"he said \"hi\"\n"))),
            frame(json!({"data":"he said \"hi\"\n"}))
        );
        assert_eq!(
            parse(&Payload::Binary(Bytes::from_static(&[0, 255, 1]))),
            frame(json!({"data":"AP8B","encoding":"base64"}))
        );
    }

    #[test]
    fn raw_frames_unwrap_json_strings() {
        let text = |p: Payload| match encode_raw(&p) {
            RawFrame::Text(b) => String::from_utf8(b.to_vec()).unwrap(),
            RawFrame::Binary(_) => panic!("binary"),
        };
        assert_eq!(text(Payload::Json(Bytes::from_static(br#""plain""#))), "plain");
        assert_eq!(text(Payload::Json(Bytes::from_static(br#""tab\there""#))), "tab\there");
        assert_eq!(text(Payload::Json(Bytes::from_static(br#"{"a":1}"#))), r#"{"a":1}"#);
        assert_eq!(text(Payload::Text(Bytes::from_static(b"hello"))), "hello");
        assert!(matches!(encode_raw(&Payload::Binary(Bytes::from_static(b"\x00"))), RawFrame::Binary(_)));
    }
}
