//! `publish`: publishers send timestamped messages into one channel of a wsfleet fleet (protocol
//! mode) while subscribers on every server receive them; reports the publish rate, the delivery
//! rate, gaps, and publish-to-deliver latency percentiles.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::{now_micros, percentile};

#[derive(clap::Args)]
pub struct PublishArgs {
    /// Protocol-mode URLs of the servers (`ws://127.0.0.1:PORT/ws`); publishers and subscribers
    /// are spread over them round-robin.
    #[arg(long, value_delimiter = ',', required = true)]
    urls: Vec<String>,
    /// Channel to use.
    #[arg(long, default_value = "bench")]
    channel: String,
    /// Concurrent publishing connections.
    #[arg(long, default_value_t = 4)]
    publishers: usize,
    /// Subscribing connections.
    #[arg(long, default_value_t = 3)]
    subscribers: usize,
    /// Messages in total (split among the publishers).
    #[arg(long, default_value_t = 20_000)]
    messages: usize,
    /// Payload bytes per message (besides the timestamp).
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Total publish rate in messages per second, spread over the publishers; 0 publishes as
    /// fast as the servers take them (a throughput run, where latency includes queueing).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 120)]
    deadline: u64,
}

pub async fn run(args: PublishArgs) -> anyhow::Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(args.deadline);
    let mut subs = Vec::new();
    for i in 0..args.subscribers {
        let url = &args.urls[i % args.urls.len()];
        let (mut ws, _) = tokio_tungstenite::connect_async_with_config(url.as_str(), None, true)
            .await
            .with_context(|| format!("connect {url}"))?;
        ws.send(Message::text(json!({"op": "subscribe", "channel": args.channel}).to_string())).await?;
        let reply: Value = match ws.next().await {
            Some(Ok(Message::Text(t))) => serde_json::from_str(&t)?,
            other => bail!("no subscribe reply from {url}: {other:?}"),
        };
        if reply["type"] != "subscribed" {
            bail!("subscribe refused by {url}: {reply}");
        }
        subs.push(ws);
    }
    let expected = args.messages;
    let receivers: Vec<_> = subs
        .into_iter()
        .map(|mut ws| {
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(expected);
                let mut last_offset = None::<u64>;
                let mut gaps = 0u64;
                let (mut first, mut last) = (None, Instant::now());
                // Why this subscriber stopped before it had every message.
                let mut ended = None::<String>;
                while latencies.len() < expected {
                    let next = match tokio::time::timeout_at(deadline.into(), ws.next()).await {
                        Ok(Some(Ok(Message::Text(t)))) => Ok(t),
                        Ok(Some(Ok(Message::Close(frame)))) => {
                            Err(frame.map_or("closed".into(), |f| format!("closed {} {}", u16::from(f.code), f.reason)))
                        }
                        Ok(Some(Ok(_))) => continue,
                        Ok(Some(Err(e))) => Err(e.to_string()),
                        Ok(None) => Err("connection ended".into()),
                        Err(_) => Err("deadline".into()),
                    };
                    let t = match next {
                        Ok(t) => t,
                        Err(why) => {
                            ended = Some(why);
                            break;
                        }
                    };
                    let Ok(v) = serde_json::from_str::<Value>(&t) else { continue };
                    if v["type"] != "message" {
                        continue;
                    }
                    let now = now_micros();
                    last = Instant::now();
                    first.get_or_insert(last);
                    let offset = v["offset"].as_u64().unwrap_or(0);
                    if let Some(prev) = last_offset
                        && offset != prev + 1
                    {
                        gaps += 1;
                    }
                    last_offset = Some(offset);
                    latencies.push(now.saturating_sub(v["data"]["t"].as_u64().unwrap_or(now)));
                }
                let span = first.map(|f| last.duration_since(f)).unwrap_or_default();
                (latencies, gaps, span, ended)
            })
        })
        .collect();

    let filler = "x".repeat(args.payload);
    let per = expected.div_ceil(args.publishers);
    let started = Instant::now();
    let publishers: Vec<_> = (0..args.publishers)
        .map(|p| {
            let url = args.urls[p % args.urls.len()].clone();
            let (channel, filler) = (args.channel.clone(), filler.clone());
            let count = per.min(expected.saturating_sub(p * per));
            let (rate, publishers) = (args.rate, args.publishers);
            tokio::spawn(async move {
                let (ws, _) = tokio_tungstenite::connect_async_with_config(url.as_str(), None, true).await?;
                let (mut sink, mut source) = ws.split();
                // Errors come back as frames; count them without blocking the publisher.
                let errors = tokio::spawn(async move {
                    let mut n = 0u64;
                    while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(5), source.next()).await {
                        if m.to_text().is_ok_and(|t| t.contains(r#""type":"error""#)) {
                            n += 1;
                        }
                    }
                    n
                });
                let mut pace = (rate > 0).then(|| {
                    let period = Duration::from_secs_f64(publishers as f64 / rate as f64);
                    tokio::time::interval(period)
                });
                for _ in 0..count {
                    if let Some(pace) = &mut pace {
                        pace.tick().await;
                    }
                    // Stamped right before it is handed to the socket.
                    let msg = json!({"op": "publish", "channel": channel, "data": {"t": now_micros(), "f": filler}});
                    match pace {
                        Some(_) => sink.send(Message::text(msg.to_string())).await?,
                        None => sink.feed(Message::text(msg.to_string())).await?,
                    }
                }
                sink.flush().await?;
                let sent_at = Instant::now();
                let _ = sink.close().await;
                anyhow::Ok((sent_at, errors))
            })
        })
        .collect();
    let mut publish_done = started;
    let mut error_tasks = Vec::new();
    for p in publishers {
        let (at, errors) = p.await??;
        publish_done = publish_done.max(at);
        error_tasks.push(errors);
    }
    let mut all = Vec::new();
    let (mut gaps, mut delivered, mut slowest_span, mut ends) = (0, 0usize, Duration::ZERO, Vec::new());
    for r in receivers {
        let (lat, g, span, ended) = r.await?;
        ends.extend(ended);
        delivered += lat.len();
        gaps += g;
        slowest_span = slowest_span.max(span);
        all.extend(lat);
    }
    all.sort_unstable();
    let total = started.elapsed();
    let mut publish_errors = 0;
    for e in error_tasks {
        publish_errors += e.await.unwrap_or(0);
    }
    let summary = json!({
        "messages": expected,
        "publishers": args.publishers,
        "subscribers": args.subscribers,
        "delivered": delivered,
        "missing": expected * args.subscribers - delivered,
        "subscribers_ended_early": ends,
        "gaps": gaps,
        "publish_errors": publish_errors,
        "target_rate_per_s": args.rate,
        "publish_seconds": publish_done.duration_since(started).as_secs_f64(),
        "messages_per_s": (expected as f64 / total.as_secs_f64()).round(),
        "deliveries_per_s": (delivered as f64 / total.as_secs_f64()).round(),
        "latency_ms": {"p50": percentile(&all, 0.50), "p99": percentile(&all, 0.99), "p999": percentile(&all, 0.999), "max": percentile(&all, 1.0)},
        "seconds": total.as_secs_f64(),
    });
    Ok(summary)
}
