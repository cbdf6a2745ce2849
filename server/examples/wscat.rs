//! A minimal interactive WebSocket client for trying a fleet by hand:
//! every line typed is sent as a text frame, every frame received is printed.
//!
//! ```text
//! cargo run --example wscat -- ws://127.0.0.1:8081/ws/lobby
//! cargo run --example wscat -- ws://127.0.0.1:8082/ws
//! {"op":"subscribe","channel":"lobby"}
//! ```

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_tungstenite::tungstenite::Message;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let Some(url) = std::env::args().nth(1) else {
        eprintln!("usage: wscat ws://HOST:PORT/ws[/<channel>]");
        std::process::exit(2);
    };
    let (ws, _) = tokio_tungstenite::connect_async(url.as_str()).await?;
    eprintln!("connected to {url}; type lines to send, Ctrl-D to quit");
    let (mut sink, mut source) = ws.split();
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    loop {
        tokio::select! {
            line = lines.next_line() => match line? {
                Some(line) => sink.send(Message::text(line)).await?,
                None => {
                    sink.send(Message::Close(None)).await?;
                    return Ok(());
                }
            },
            msg = source.next() => match msg {
                Some(Ok(Message::Text(t))) => println!("{t}"),
                Some(Ok(Message::Binary(b))) => println!("<{} binary bytes>", b.len()),
                Some(Ok(Message::Close(frame))) => {
                    eprintln!("closed by server: {frame:?}");
                    return Ok(());
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.into()),
                None => return Ok(()),
            },
        }
    }
}
