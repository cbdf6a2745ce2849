//! RFC 6455 conformance, by the categories of the Autobahn test suite: framing, pings and pongs,
//! reserved bits, opcodes, fragmentation, UTF-8 handling, close handling and limits.
//!
//! The client here is independent of the server's codec: it builds every frame byte by byte
//! ([`support::masked_frame`]: masked, with any flags, lengths and fragmentation, including
//! invalid ones) and reads the server's frames itself. The server runs in raw mode on the in-process bus, where a client is
//! a subscriber of its own channel: every message it sends comes back to it, so a raw-mode
//! connection is an echo endpoint, as the Autobahn cases expect.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use support::{Server, TIMEOUT, masked_frame, raw_socket};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CONTINUATION: u8 = 0x0;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const PONG: u8 = 0xA;

/// The server's `--max-message-size` in these tests.
const MAX_MESSAGE: usize = 65_536;

/// One frame as the server sent it.
#[derive(Debug, PartialEq)]
struct Frame {
    fin: bool,
    opcode: u8,
    payload: Vec<u8>,
}

/// A raw WebSocket client.
struct Client {
    s: TcpStream,
}

impl Client {
    /// Upgrades on a channel of its own (so the cases do not hear each other).
    async fn open(server: &Server) -> Client {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = format!("/ws/case-{}", N.fetch_add(1, Ordering::Relaxed));
        Client { s: raw_socket(server, &path).await }
    }

    /// The bytes of one masked client frame with the given first-byte flags.
    fn encode(fin: bool, rsv: u8, opcode: u8, payload: &[u8]) -> Vec<u8> {
        masked_frame(fin, rsv, opcode, payload, [0x37, 0xfa, 0x21, 0x3d])
    }

    async fn send_frame(&mut self, fin: bool, rsv: u8, opcode: u8, payload: &[u8]) {
        self.s.write_all(&Self::encode(fin, rsv, opcode, payload)).await.unwrap();
    }

    async fn send(&mut self, opcode: u8, payload: &[u8]) {
        self.send_frame(true, 0, opcode, payload).await;
    }

    /// The next frame, or `None` when the server closed the TCP connection.
    async fn next(&mut self) -> Option<Frame> {
        let read = async {
            let mut h = [0u8; 2];
            self.s.read_exact(&mut h).await.ok()?;
            assert_eq!(h[1] & 0x80, 0, "a server frame must not be masked");
            assert_eq!(h[0] & 0x70, 0, "no reserved bit without an extension");
            let len = match h[1] & 0x7F {
                126 => {
                    let mut b = [0u8; 2];
                    self.s.read_exact(&mut b).await.ok()?;
                    u16::from_be_bytes(b) as usize
                }
                127 => {
                    let mut b = [0u8; 8];
                    self.s.read_exact(&mut b).await.ok()?;
                    u64::from_be_bytes(b) as usize
                }
                n => n as usize,
            };
            let mut payload = vec![0u8; len];
            self.s.read_exact(&mut payload).await.ok()?;
            Some(Frame { fin: h[0] & 0x80 != 0, opcode: h[0] & 0x0F, payload })
        };
        tokio::time::timeout(TIMEOUT, read).await.expect("the server answered within the timeout")
    }

    /// Expects `opcode` with `payload` back, whole (the server does not fragment).
    async fn expect(&mut self, opcode: u8, payload: &[u8], case: &str) {
        let f = self.next().await.unwrap_or_else(|| panic!("{case}: connection closed"));
        assert_eq!((f.fin, f.opcode, f.payload.len()), (true, opcode, payload.len()), "{case}");
        assert!(f.payload == payload, "{case}: payload differs");
    }

    /// Expects a close frame with `code` (skipping frames before it), then the end of the TCP
    /// connection.
    async fn expect_close(&mut self, code: Option<u16>, case: &str) {
        loop {
            let f = self.next().await.unwrap_or_else(|| panic!("{case}: TCP closed without a close frame"));
            if f.opcode != CLOSE {
                continue;
            }
            let got = (f.payload.len() >= 2).then(|| u16::from_be_bytes([f.payload[0], f.payload[1]]));
            assert_eq!(got, code, "{case}: close code");
            assert!(std::str::from_utf8(f.payload.get(2..).unwrap_or_default()).is_ok(), "{case}: UTF-8 reason");
            break;
        }
        let mut rest = Vec::new();
        let end = tokio::time::timeout(TIMEOUT, self.s.read_to_end(&mut rest)).await;
        assert!(end.is_ok(), "{case}: the server closed the TCP connection after its close frame");
    }
}

/// One server for a category's cases: raw mode, in-process bus.
fn server() -> Server {
    Server::start(None, &["--max-message-size", &MAX_MESSAGE.to_string()])
}

/// Text messages valid in UTF-8 (`κόσμε`, four-byte characters, the boundaries of the ranges).
const VALID_UTF8: &[&str] = &["", "Hello-µ@ßöäüàá-UTF-8!!", "κόσμε", "\u{10FFFF}\u{FFFF}\u{80}\u{7F}", "𝄞𝄞𝄞"];

/// Byte strings that are not UTF-8: a lone continuation byte, an overlong encoding, a
/// surrogate, a code point past U+10FFFF, a truncated sequence.
const INVALID_UTF8: &[&[u8]] = &[
    b"\x80",
    b"\xc0\xaf",
    b"\xed\xa0\x80",
    b"\xf4\x90\x80\x80",
    b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80edited",
    b"\xe2\x82",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn category_1_framing_text_and_binary_of_every_length_form() {
    let server = server();
    for len in [0usize, 1, 125, 126, 127, 128, 65_535, MAX_MESSAGE] {
        for opcode in [TEXT, BINARY] {
            let payload: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
            let mut c = Client::open(&server).await;
            c.send(opcode, &payload).await;
            c.expect(opcode, &payload, &format!("opcode {opcode}, {len} bytes")).await;
        }
    }
    // A frame written one byte per segment still arrives whole.
    let mut c = Client::open(&server).await;
    for b in Client::encode(true, 0, TEXT, b"written byte by byte") {
        c.s.write_all(&[b]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    c.expect(TEXT, b"written byte by byte", "byte by byte").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn category_2_pings_get_their_payload_back_and_bad_control_frames_close_with_1002() {
    let server = server();
    for len in [0usize, 10, 125] {
        let mut c = Client::open(&server).await;
        let payload = vec![0xfe; len];
        c.send(PING, &payload).await;
        c.expect(PONG, &payload, &format!("ping of {len} bytes")).await;
    }
    let mut c = Client::open(&server).await;
    for i in 0..10u8 {
        c.send(PING, &[i]).await;
    }
    for i in 0..10u8 {
        c.expect(PONG, &[i], "ten pings, ten pongs in order").await;
    }
    // An unsolicited pong is ignored.
    let mut c = Client::open(&server).await;
    c.send(PONG, b"unsolicited").await;
    c.send(TEXT, b"after the pong").await;
    c.expect(TEXT, b"after the pong", "unsolicited pong").await;
    // A control frame longer than 125 bytes, or fragmented.
    let mut c = Client::open(&server).await;
    c.send(PING, &[0; 126]).await;
    c.expect_close(Some(1002), "ping of 126 bytes").await;
    let mut c = Client::open(&server).await;
    c.send_frame(false, 0, PING, b"fragmented").await;
    c.expect_close(Some(1002), "fragmented ping").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn category_3_reserved_bits_close_with_1002() {
    let server = server();
    for rsv in 1..=7u8 {
        for opcode in [TEXT, BINARY, PING] {
            let mut c = Client::open(&server).await;
            c.send_frame(true, rsv, opcode, b"reserved").await;
            c.expect_close(Some(1002), &format!("rsv {rsv:03b} on opcode {opcode}")).await;
        }
    }
    // The valid frame before a bad one is still echoed.
    let mut c = Client::open(&server).await;
    c.send(TEXT, b"fine").await;
    c.send_frame(true, 1, TEXT, b"bad").await;
    c.expect(TEXT, b"fine", "the message before").await;
    c.expect_close(Some(1002), "rsv after a good frame").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn category_4_reserved_opcodes_close_with_1002() {
    let server = server();
    for opcode in (3..=7).chain(0xB..=0xF) {
        let mut c = Client::open(&server).await;
        c.send(opcode, b"reserved opcode").await;
        c.expect_close(Some(1002), &format!("opcode {opcode:#x}")).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn category_5_fragments_are_reassembled_and_misordered_ones_close_with_1002() {
    let server = server();
    for opcode in [TEXT, BINARY] {
        let mut c = Client::open(&server).await;
        c.send_frame(false, 0, opcode, b"frag").await;
        c.send_frame(false, 0, CONTINUATION, b"ment").await;
        c.send_frame(true, 0, CONTINUATION, b"ed").await;
        c.expect(opcode, b"fragmented", "three fragments").await;
    }
    // Control frames between fragments are answered at once.
    let mut c = Client::open(&server).await;
    c.send_frame(false, 0, TEXT, b"one ").await;
    c.send(PING, b"between").await;
    c.send_frame(true, 0, CONTINUATION, b"two").await;
    c.expect(PONG, b"between", "ping between fragments").await;
    c.expect(TEXT, b"one two", "the message around the ping").await;
    // One byte per fragment.
    let mut c = Client::open(&server).await;
    let text = b"single bytes";
    c.send_frame(false, 0, TEXT, &text[..1]).await;
    for (i, b) in text.iter().enumerate().skip(1) {
        c.send_frame(i == text.len() - 1, 0, CONTINUATION, &[*b]).await;
    }
    c.expect(TEXT, text, "one byte per fragment").await;
    // Empty fragments.
    let mut c = Client::open(&server).await;
    c.send_frame(false, 0, TEXT, b"").await;
    c.send_frame(false, 0, CONTINUATION, b"").await;
    c.send_frame(true, 0, CONTINUATION, b"").await;
    c.expect(TEXT, b"", "empty fragments").await;

    let mut c = Client::open(&server).await;
    c.send_frame(true, 0, CONTINUATION, b"nothing to continue").await;
    c.expect_close(Some(1002), "continuation first").await;
    let mut c = Client::open(&server).await;
    c.send_frame(false, 0, CONTINUATION, b"nothing to continue").await;
    c.expect_close(Some(1002), "unfinished continuation first").await;
    let mut c = Client::open(&server).await;
    c.send_frame(false, 0, TEXT, b"first ").await;
    c.send_frame(true, 0, TEXT, b"second").await;
    c.expect_close(Some(1002), "a new message inside a fragmented one").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn category_6_utf8_is_checked_whole_even_split_across_fragments() {
    let server = server();
    for text in VALID_UTF8 {
        let mut c = Client::open(&server).await;
        c.send(TEXT, text.as_bytes()).await;
        c.expect(TEXT, text.as_bytes(), &format!("valid {text:?}")).await;
        // Split at every byte, inside multi-byte characters too.
        let bytes = text.as_bytes();
        if bytes.len() > 1 {
            let mut c = Client::open(&server).await;
            c.send_frame(false, 0, TEXT, &bytes[..1]).await;
            for (i, b) in bytes.iter().enumerate().skip(1) {
                c.send_frame(i == bytes.len() - 1, 0, CONTINUATION, &[*b]).await;
            }
            c.expect(TEXT, bytes, &format!("valid {text:?} split at every byte")).await;
        }
    }
    for bytes in INVALID_UTF8 {
        let mut c = Client::open(&server).await;
        c.send(TEXT, bytes).await;
        c.expect_close(Some(1007), &format!("invalid {bytes:x?}")).await;
        let mut c = Client::open(&server).await;
        let (a, b) = bytes.split_at(bytes.len() / 2);
        c.send_frame(false, 0, TEXT, a).await;
        c.send_frame(true, 0, CONTINUATION, b).await;
        c.expect_close(Some(1007), &format!("invalid {bytes:x?} in two fragments")).await;
    }
    // Binary messages are not UTF-8 checked.
    let mut c = Client::open(&server).await;
    c.send(BINARY, b"\xff\xfe\xc0\xaf").await;
    c.expect(BINARY, b"\xff\xfe\xc0\xaf", "binary").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn category_7_close_handshakes_and_invalid_close_frames() {
    let server = server();
    // An empty close is answered with an empty close.
    let mut c = Client::open(&server).await;
    c.send(CLOSE, b"").await;
    c.expect_close(None, "empty close").await;
    // Valid codes are echoed.
    for code in [1000u16, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999, 4000, 4999] {
        let mut c = Client::open(&server).await;
        let mut payload = code.to_be_bytes().to_vec();
        payload.extend_from_slice("bye: κόσμε".as_bytes());
        c.send(CLOSE, &payload).await;
        c.expect_close(Some(code), &format!("close {code}")).await;
    }
    // A reason of the longest size a control frame allows.
    let mut c = Client::open(&server).await;
    let mut payload = 1000u16.to_be_bytes().to_vec();
    payload.extend_from_slice(&[b'*'; 123]);
    c.send(CLOSE, &payload).await;
    c.expect_close(Some(1000), "close with a 123-byte reason").await;
    // Codes that must not be sent, a one-byte body, a reason that is not UTF-8.
    for code in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535] {
        let mut c = Client::open(&server).await;
        c.send(CLOSE, &code.to_be_bytes()).await;
        c.expect_close(Some(1002), &format!("invalid close code {code}")).await;
    }
    let mut c = Client::open(&server).await;
    c.send(CLOSE, b"\x03").await;
    c.expect_close(Some(1002), "one-byte close body").await;
    let mut c = Client::open(&server).await;
    c.send(CLOSE, b"\x03\xe8\xce\xba\xed\xa0\x80").await;
    c.expect_close(Some(1007), "close reason not UTF-8").await;
    // Frames after a close are ignored: the close is answered, nothing else is.
    let mut c = Client::open(&server).await;
    // (One write: the server may close the TCP connection as soon as it answered, and a second
    // write would then fail on the client's side.)
    let mut after = Client::encode(true, 0, CLOSE, &1000u16.to_be_bytes());
    after.extend(Client::encode(true, 0, TEXT, b"after the close"));
    after.extend(Client::encode(true, 0, PING, b"after the close"));
    c.s.write_all(&after).await.unwrap();
    c.expect_close(Some(1000), "frames after the close").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn category_9_limits_the_largest_message_passes_one_byte_more_closes_with_1009() {
    let server = server();
    let mut c = Client::open(&server).await;
    let payload = vec![b'x'; MAX_MESSAGE];
    c.send(BINARY, &payload).await;
    c.expect(BINARY, &payload, "the largest message").await;
    // Larger in one frame: refused from the header, before the payload arrives.
    let mut c = Client::open(&server).await;
    let header = &Client::encode(true, 0, BINARY, &vec![0; MAX_MESSAGE + 1])[..14];
    c.s.write_all(header).await.unwrap();
    c.expect_close(Some(1009), "one byte over the limit, in one frame").await;
    // Larger across fragments: refused when the sum passes the limit.
    let mut c = Client::open(&server).await;
    let half = vec![b'y'; MAX_MESSAGE / 2];
    c.send_frame(false, 0, TEXT, &half).await;
    c.send_frame(false, 0, CONTINUATION, &half).await;
    c.send_frame(true, 0, CONTINUATION, b"!").await;
    c.expect_close(Some(1009), "one byte over the limit, in fragments").await;
    // A 64-bit length with its top bit set is a protocol error.
    let mut c = Client::open(&server).await;
    let mut bad = vec![0x80 | BINARY, 0x80 | 127];
    bad.extend_from_slice(&u64::MAX.to_be_bytes());
    c.s.write_all(&bad).await.unwrap();
    c.expect_close(Some(1002), "64-bit length with the top bit").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unmasked_client_frame_closes_with_1002() {
    let server = server();
    let mut c = Client::open(&server).await;
    c.s.write_all(&[0x80 | TEXT, 5, b'h', b'e', b'l', b'l', b'o']).await.unwrap();
    c.expect_close(Some(1002), "unmasked frame").await;
}
