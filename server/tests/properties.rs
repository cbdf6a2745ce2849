//! Property tests of everything that parses what a client or the bus sends: the frame reader,
//! the upgrade parser, the protocol's JSON and the bus envelope. For any input: no panic, no
//! allocation beyond the configured limits, and an answer (a value or an error) for every
//! input; for valid input, the same result however it is split across reads.

mod support;

use bytes::Bytes;
use proptest::prelude::*;
use support::masked_frame;
use wsfleet_server::messaging::envelope::{Envelope, Payload, Sequenced};
use wsfleet_server::protocol::parse_client_frame;
use wsfleet_server::transport::frame::{FrameError, Incoming, Reader};
use wsfleet_server::transport::upgrade::parse_head;

const MAX_MESSAGE: usize = 4096;

/// A masked client frame.
fn client_frame(fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    masked_frame(fin, 0, opcode, payload, mask)
}

/// Feeds `data` in the pieces `cuts` makes, checking the reader's memory after every read.
fn feed_in_pieces(data: &[u8], cuts: &[usize]) -> (Vec<Incoming>, Option<String>) {
    let mut reader = Reader::new(MAX_MESSAGE);
    let mut out = Vec::new();
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (data.len() + 1)).collect();
    points.push(0);
    points.push(data.len());
    points.sort_unstable();
    for w in points.windows(2) {
        if let Err(e) = reader.feed(&data[w[0]..w[1]], &mut out) {
            return (out, Some(error_kind(&e)));
        }
        // A frame header is at most 14 bytes; a message at most MAX_MESSAGE.
        assert!(
            reader.buffered() <= 2 * (MAX_MESSAGE + 14),
            "the reader holds {} bytes with a {MAX_MESSAGE}-byte limit",
            reader.buffered()
        );
    }
    (out, None)
}

fn error_kind(e: &FrameError) -> String {
    match e {
        FrameError::TooLarge { .. } => "too large".into(),
        FrameError::InvalidUtf8 => "invalid utf-8".into(),
        FrameError::Protocol(why) => format!("protocol: {why}"),
    }
}

/// One client message and how it is cut into fragments.
fn message() -> impl Strategy<Value = (bool, Vec<u8>, Vec<usize>, [u8; 4])> {
    (
        any::<bool>(),
        prop_oneof![proptest::collection::vec(any::<u8>(), 0..300), ".{0,100}".prop_map(|s: String| s.into_bytes()),],
        proptest::collection::vec(any::<usize>(), 0..4),
        any::<[u8; 4]>(),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn any_bytes_in_any_pieces_never_panic_and_stay_bounded(
        data in proptest::collection::vec(any::<u8>(), 0..2048),
        cuts in proptest::collection::vec(any::<usize>(), 0..16),
    ) {
        let _ = feed_in_pieces(&data, &cuts);
    }

    #[test]
    fn valid_messages_read_the_same_however_they_are_split_and_fragmented(
        messages in proptest::collection::vec(message(), 1..6),
        cuts in proptest::collection::vec(any::<usize>(), 0..16),
    ) {
        let mut wire = Vec::new();
        let mut expected = Vec::new();
        for (text, payload, fragments, mask) in &messages {
            let text = *text && std::str::from_utf8(payload).is_ok();
            let mut points: Vec<usize> = fragments.iter().map(|f| f % (payload.len() + 1)).collect();
            points.push(0);
            points.push(payload.len());
            points.sort_unstable();
            points.dedup();
            if points.len() == 1 {
                points.push(0);
            }
            let pieces: Vec<&[u8]> = points.windows(2).map(|w| &payload[w[0]..w[1]]).collect();
            for (i, piece) in pieces.iter().enumerate() {
                let opcode = if i > 0 { 0x0 } else if text { 0x1 } else { 0x2 };
                wire.extend(client_frame(i == pieces.len() - 1, opcode, piece, *mask));
            }
            expected.push(if text {
                Incoming::Text(String::from_utf8(payload.clone()).unwrap().into())
            } else {
                Incoming::Binary(Bytes::from(payload.clone()))
            });
        }
        let (got, error) = feed_in_pieces(&wire, &cuts);
        prop_assert_eq!(error, None);
        prop_assert_eq!(got, expected);
    }

    #[test]
    fn a_message_over_the_limit_is_refused_in_any_pieces(
        extra in 1usize..64,
        fragments in 1usize..5,
        cuts in proptest::collection::vec(any::<usize>(), 0..8),
    ) {
        let payload = vec![b'x'; MAX_MESSAGE + extra];
        let size = payload.len().div_ceil(fragments);
        let chunks: Vec<&[u8]> = payload.chunks(size).collect();
        let mut wire = Vec::new();
        for (i, chunk) in chunks.iter().enumerate() {
            wire.extend(client_frame(i == chunks.len() - 1, if i == 0 { 0x2 } else { 0x0 }, chunk, [1, 2, 3, 4]));
        }
        let (got, error) = feed_in_pieces(&wire, &cuts);
        prop_assert!(got.is_empty());
        prop_assert_eq!(error.as_deref(), Some("too large"));
    }

    #[test]
    fn the_upgrade_parser_answers_any_bytes(data in proptest::collection::vec(any::<u8>(), 0..1024)) {
        let _ = parse_head(&data);
    }

    #[test]
    fn the_upgrade_parser_answers_any_header_lines(
        path in "/[ -~]{0,40}",
        headers in proptest::collection::vec(("[A-Za-z-]{1,20}", "[ -~]{0,40}"), 0..12),
    ) {
        let mut request = format!("GET {path} HTTP/1.1\r\n");
        for (name, value) in &headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        let _ = parse_head(request.as_bytes());
    }

    #[test]
    fn the_protocol_answers_any_text(text in ".{0,200}") {
        let _ = parse_client_frame(&text);
    }

    #[test]
    fn the_protocol_answers_any_json_object(
        op in prop_oneof![
            Just("subscribe".to_owned()),
            Just("unsubscribe".to_owned()),
            Just("publish".to_owned()),
            ".{0,10}",
        ],
        channel in prop_oneof![Just(serde_json::json!("room")), any::<i64>().prop_map(serde_json::Value::from), ".{0,300}".prop_map(serde_json::Value::from)],
        offset in prop_oneof![any::<i64>().prop_map(serde_json::Value::from), any::<f64>().prop_map(serde_json::Value::from), ".{0,5}".prop_map(serde_json::Value::from)],
        epoch in ".{0,80}",
    ) {
        let frame = serde_json::json!({"op": op, "channel": channel, "data": {"x": 1}, "since": {"epoch": epoch, "offset": offset}});
        let _ = parse_client_frame(&frame.to_string());
    }

    #[test]
    fn the_bus_envelope_answers_any_bytes(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = Sequenced::decode(Bytes::from(data.clone()));
        let _ = Envelope::decode(Bytes::from(data));
    }

    #[test]
    fn bus_envelopes_decode_to_what_was_encoded(
        offset in any::<u64>(),
        epoch in "[A-Za-z0-9-]{1,64}",
        kind in 0u8..3,
        body in ".{0,100}",
    ) {
        let payload = match kind {
            0 => Payload::Text(Bytes::from(body.into_bytes())),
            1 => Payload::Binary(Bytes::from(body.into_bytes())),
            // A JSON payload is one JSON value (here a string holding the text).
            _ => Payload::Json(Bytes::from(serde_json::to_vec(&body).unwrap())),
        };
        let sent = Sequenced { epoch: epoch.as_str().into(), offset, envelope: Envelope::new(payload) };
        prop_assert_eq!(Sequenced::decode(sent.encode()).unwrap(), sent);
    }
}
