//! One server process holding 15,000 idle WebSocket connections from real TCP clients. Prints the
//! server's resident memory per connection (a figure for the record, not a threshold: `make
//! bench` measures memory properly).

mod support;

use futures_util::StreamExt;
use serde_json::json;
use support::*;

const CONNECTIONS: usize = 15_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_server_holds_15000_idle_connections() {
    // This process holds one end of every connection.
    let limit = rlimit::increase_nofile_limit(u64::MAX).unwrap();
    assert!(limit as usize > CONNECTIONS + 500, "open-file limit {limit} is too low for this test");
    let server = Server::start(None, &["--max-connections", "20000"]);
    let mut probe = subscriber(&server, "probe").await;
    let before = server.rss_bytes();

    let url = server.url("/ws");
    let clients: Vec<Ws> =
        futures_util::stream::iter(0..CONNECTIONS).map(|_| connect(&url)).buffer_unordered(200).collect().await;
    wait_until("the server counts every connection", || {
        (server.metric("wsfleet_connections") as usize == CONNECTIONS + 1).then_some(())
    });
    // Let allocator and kernel settle before measuring.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let after = server.rss_bytes();
    let per_conn = (after.saturating_sub(before)) as f64 / CONNECTIONS as f64;
    eprintln!(
        "idle connections: {CONNECTIONS}; server RSS {:.1} MiB -> {:.1} MiB; {:.0} bytes ({:.2} KiB) per connection",
        before as f64 / 1048576.0,
        after as f64 / 1048576.0,
        per_conn,
        per_conn / 1024.0
    );
    // Still responsive with all of them open.
    let mut publisher = connect(&url).await;
    publish(&mut publisher, "probe", json!("alive")).await;
    assert_eq!(next_json(&mut probe).await["data"], "alive");
    drop(clients);
}
