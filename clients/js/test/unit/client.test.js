// The client's state machine against a fake socket: seams, epochs, backoff, close codes, the
// publish buffer, unsubscribes during reconnects.
import { test } from "node:test";
import assert from "node:assert/strict";

import { Client, reconnectDelay, resolveBackoff, backoffCap, WsfleetError } from "../../dist/index.js";
import { FakeSocket, FakeTimers, flush, msg } from "./fake.js";

function setup(opts = {}, urls = ["ws://a:1", "ws://b:2", "ws://c:3"]) {
  FakeSocket.reset();
  const timers = new FakeTimers();
  const events = [];
  const client = new Client(urls, { WebSocket: FakeSocket, timers, random: () => 0.5, ...opts });
  for (const e of ["connecting", "connected", "disconnected", "subscribed", "resubscribed", "discontinuity", "error"]) {
    client.on(e, (ev) => events.push([e, ev]));
  }
  client.start();
  return { client, timers, events };
}

async function connected(opts, urls) {
  const s = setup(opts, urls);
  await flush();
  FakeSocket.last().open();
  return s;
}

function collect(client, channel, since) {
  const got = [];
  const sub = client.subscribe(channel, { since, onMessage: (data, meta) => got.push([meta.epoch, meta.offset, data]) });
  return { got, sub };
}

test("resubscribes with the last delivered position and drops duplicates at the seam", async () => {
  const { client, timers, events } = await connected();
  const ws1 = FakeSocket.last();
  const { got } = collect(client, "news");
  assert.deepEqual(ws1.ops("subscribe"), [{ op: "subscribe", channel: "news" }]);
  ws1.frame({ type: "subscribed", channel: "news", epoch: "e1", offset: 4, recovered: false });
  ws1.frame(msg("news", "e1", 5));
  ws1.frame(msg("news", "e1", 6));
  ws1.drop(1006);
  await timers.advance(timers.next());
  const ws2 = FakeSocket.last();
  assert.equal(ws2.url, "ws://b:2/ws", "the next server");
  ws2.open();
  assert.deepEqual(ws2.ops("subscribe"), [{ op: "subscribe", channel: "news", since: { epoch: "e1", offset: 6 } }]);
  ws2.frame({ type: "subscribed", channel: "news", epoch: "e1", offset: 8, recovered: true });
  // A replay that overlaps what was delivered (as a live message racing the seam would).
  for (const o of [5, 6, 7, 8, 7, 9]) ws2.frame(msg("news", "e1", o));
  assert.deepEqual(got.map(([, o]) => o), [5, 6, 7, 8, 9], "each offset once, in order");
  const resub = events.find(([e]) => e === "resubscribed")[1];
  assert.equal(resub.recovered, true);
  assert.equal(events.filter(([e]) => e === "discontinuity").length, 0);
  client.close();
});

test("an epoch change on resume is told, and delivery goes on from the new epoch", async () => {
  const { client, timers, events } = await connected();
  const ws1 = FakeSocket.last();
  const { got } = collect(client, "news");
  ws1.frame({ type: "subscribed", channel: "news", epoch: "e1", offset: 0, recovered: false });
  ws1.frame(msg("news", "e1", 1));
  ws1.drop(1012, "server draining");
  await timers.advance(timers.next());
  const ws2 = FakeSocket.last();
  ws2.open();
  ws2.frame({ type: "subscribed", channel: "news", epoch: "e2", offset: 3, recovered: false, reason: "epoch_changed" });
  ws2.frame(msg("news", "e2", 3)); // at the subscribed head: not new
  ws2.frame(msg("news", "e2", 4));
  assert.deepEqual(got, [["e1", 1, 1], ["e2", 4, 4]]);
  const resub = events.find(([e]) => e === "resubscribed")[1];
  assert.equal(resub.recovered, false);
  assert.equal(resub.reason, "epoch_changed");
  const d = events.find(([e]) => e === "discontinuity")[1];
  assert.deepEqual(d, { channel: "news", reason: "epoch_changed", previous: { epoch: "e1", offset: 1 }, next: { epoch: "e2", offset: 3 } });
  client.close();
});

test("a live message in a new epoch or past a skipped offset is a discontinuity", async () => {
  const { client, events } = await connected();
  const ws = FakeSocket.last();
  const { got } = collect(client, "c");
  ws.frame({ type: "subscribed", channel: "c", epoch: "e1", offset: 0, recovered: false });
  ws.frame(msg("c", "e1", 1));
  ws.frame(msg("c", "e1", 3));
  ws.frame(msg("c", "e9", 1));
  assert.equal(got.length, 3);
  assert.deepEqual(
    events.filter(([e]) => e === "discontinuity").map(([, d]) => d.reason),
    ["offset_skipped", "epoch_changed"],
  );
  client.close();
});

test("history_gap on resume is reported, not hidden", async () => {
  const { client, timers, events } = await connected();
  const ws1 = FakeSocket.last();
  const { sub } = collect(client, "c", { epoch: "e1", offset: 2 });
  assert.deepEqual(ws1.ops("subscribe")[0].since, { epoch: "e1", offset: 2 });
  ws1.frame({ type: "subscribed", channel: "c", epoch: "e1", offset: 5000, recovered: false, reason: "history_gap" });
  assert.deepEqual(sub.position, { epoch: "e1", offset: 5000 });
  assert.equal(events.find(([e]) => e === "discontinuity")[1].reason, "history_gap");
  assert.equal(events.find(([e]) => e === "subscribed")[1].reason, "history_gap");
  void timers;
  client.close();
});

test("backoff: full jitter under an exponential cap, bounded", () => {
  const b = resolveBackoff({ initialMs: 100, maxMs: 2000 });
  assert.deepEqual([0, 1, 2, 3, 4, 5, 10].map((a) => backoffCap(b, a)), [100, 200, 400, 800, 1600, 2000, 2000]);
  for (let attempt = 0; attempt < 12; attempt++) {
    const cap = backoffCap(b, attempt);
    assert.equal(reconnectDelay(b, attempt, undefined, () => 0), 0);
    assert.equal(reconnectDelay(b, attempt, undefined, () => 0.999999), Math.floor(0.999999 * cap));
    assert.ok(reconnectDelay(b, attempt, undefined, Math.random) <= 2000);
  }
  // Spread: many clients do not pick the same delay.
  const delays = new Set(Array.from({ length: 200 }, () => reconnectDelay(b, 4, undefined, Math.random)));
  assert.ok(delays.size > 100, `jitter spreads delays (${delays.size} distinct)`);
  assert.throws(() => resolveBackoff({ initialMs: 0 }), RangeError);
  assert.throws(() => resolveBackoff({ initialMs: 500, maxMs: 100 }), RangeError);
  // A drain's hint is the fleet's pacing: followed past maxMs, up to the largest a server sends.
  assert.equal(reconnectDelay(b, 0, 1012, () => 0, 30_000), 30_000);
  assert.equal(reconnectDelay(b, 0, 1012, () => 0, 90_000), 65_535);
});

test("1012 reconnects at once to the next server; 1013 backs off", async () => {
  const b = resolveBackoff({});
  assert.ok(reconnectDelay(b, 7, 1012, () => 0.99) < 100, "drain: at once (small jitter)");
  assert.equal(reconnectDelay(b, 7, 1012, () => 0.99, 2500), 2500, "drain: the server's hint wins");
  assert.ok(reconnectDelay(b, 0, 1013, () => 0) >= 1000, "too slow: never less than the floor");

  const { client, timers, events } = await connected({ backoff: { initialMs: 200, maxMs: 5000 } });
  FakeSocket.last().drop(1012, "server draining");
  const drain = events.filter(([e]) => e === "disconnected").at(-1)[1];
  assert.equal(drain.code, 1012);
  assert.ok(drain.reconnectInMs < 100, `drain reconnects at once (${drain.reconnectInMs} ms)`);
  await timers.advance(drain.reconnectInMs);
  assert.equal(FakeSocket.last().url, "ws://b:2/ws");
  FakeSocket.last().open();
  FakeSocket.last().drop(1013, "client too slow");
  const slow = events.filter(([e]) => e === "disconnected").at(-1)[1];
  assert.equal(slow.code, 1013);
  assert.ok(slow.reconnectInMs >= 1000, `too slow backs off (${slow.reconnectInMs} ms)`);
  const sockets = FakeSocket.all.length;
  await timers.advance(slow.reconnectInMs - 1);
  assert.equal(FakeSocket.all.length, sockets, "no attempt before the delay");
  await timers.advance(1);
  assert.equal(FakeSocket.all.length, sockets + 1);
  assert.equal(FakeSocket.last().url, "ws://c:3/ws");
  client.close();
});

test("failed attempts grow the delay; a stable connection resets it", async () => {
  const { client, timers, events } = setup({ random: () => 0.999, backoff: { initialMs: 100, maxMs: 1000 } });
  await flush();
  const delays = [];
  for (let i = 0; i < 6; i++) {
    FakeSocket.last().drop(1006);
    const d = events.filter(([e]) => e === "disconnected").at(-1)[1].reconnectInMs;
    delays.push(d);
    await timers.advance(d);
  }
  assert.deepEqual(delays, [99, 199, 399, 799, 999, 999]);
  FakeSocket.last().open();
  await new Promise((r) => setTimeout(r, 30));
  client.close();
  const { client: c2, timers: t2, events: e2 } = setup({ random: () => 0.999, stableAfterMs: 10, backoff: { initialMs: 100, maxMs: 1000 } });
  await flush();
  for (let i = 0; i < 3; i++) {
    FakeSocket.last().drop(1006);
    await t2.advance(e2.filter(([e]) => e === "disconnected").at(-1)[1].reconnectInMs);
  }
  FakeSocket.last().open();
  await new Promise((r) => setTimeout(r, 30));
  FakeSocket.last().drop(1006);
  assert.equal(e2.filter(([e]) => e === "disconnected").at(-1)[1].reconnectInMs, 99, "reset after a stable connection");
  c2.close();
});

test("a connection that never opens is abandoned after connectTimeoutMs", async () => {
  const { client, timers, events } = setup({ connectTimeoutMs: 3000 });
  await flush();
  await timers.advance(3000);
  const d = events.find(([e]) => e === "disconnected")[1];
  assert.match(d.reason, /not open within 3000 ms/);
  client.close();
});

test("getToken is called before every connection attempt; its failure is a failed attempt", async () => {
  let n = 0;
  const { client, timers, events } = setup({
    getToken: async () => {
      n += 1;
      if (n === 2) throw new Error("auth server down");
      return `t${n}`;
    },
  });
  await flush();
  assert.equal(new URL(FakeSocket.last().url).searchParams.get("access_token"), "t1");
  FakeSocket.last().open();
  FakeSocket.last().drop(1012);
  await timers.advance(timers.next());
  assert.equal(events.filter(([e]) => e === "error").at(-1)[1].code, "token_failed");
  assert.equal(FakeSocket.all.length, 1, "no socket without a token");
  await timers.advance(timers.next());
  assert.equal(new URL(FakeSocket.last().url).searchParams.get("access_token"), "t3");
  assert.equal(n, 3);
  client.close();
});

test("publishes buffer while disconnected, in order, up to a count and a byte limit", async () => {
  const { client, timers } = setup({ maxBufferedPublishes: 3, maxBufferedBytes: 10_000 });
  await flush();
  const sent = [client.publish("c", 1), client.publish("c", 2), client.publish("c", 3)];
  await assert.rejects(client.publish("c", 4), (e) => e instanceof WsfleetError && e.code === "buffer_full");
  assert.deepEqual(client.buffered.count, 3);
  FakeSocket.last().open();
  const results = await Promise.all(sent);
  assert.ok(results.every((r) => r.sent === true && r.url === "ws://a:1/ws"));
  assert.deepEqual(FakeSocket.last().ops("publish").map((f) => f.data), [1, 2, 3]);
  assert.deepEqual(client.buffered, { count: 0, bytes: 0 });
  // Connected: sent at once.
  assert.deepEqual(await client.publish("c", { x: 1 }), { sent: true, url: "ws://a:1/ws" });
  FakeSocket.last().drop(1006);
  const big = "x".repeat(6000);
  const first = client.publish("c", big);
  await assert.rejects(client.publish("c", big), (e) => e.code === "buffer_full" && /bytes/.test(e.message));
  client.close();
  await assert.rejects(first, (e) => e.code === "closed");
  await assert.rejects(client.publish("c", 1), (e) => e.code === "closed");
  void timers;
});

test("a buffered publish past publishTimeoutMs rejects with timeout; bad input never leaves", async () => {
  const { client, timers } = setup({ publishTimeoutMs: 500 });
  await flush();
  const late = assert.rejects(client.publish("c", "late"), (e) => e.code === "timeout");
  await timers.advance(500);
  await late;
  assert.equal(client.buffered.count, 0);
  await assert.rejects(client.publish("bad channel", 1), (e) => e.code === "invalid_channel");
  await assert.rejects(client.publish("c", null), (e) => e.code === "invalid_data");
  await assert.rejects(client.publish("c", undefined), (e) => e.code === "invalid_data");
  const cyclic = {};
  cyclic.self = cyclic;
  await assert.rejects(client.publish("c", cyclic), (e) => e.code === "invalid_data");
  client.close();
});

test("a publish the bus refused is reported as a server error event", async () => {
  const { client, events } = await connected();
  await client.publish("c", 1);
  FakeSocket.last().frame({ type: "error", code: "bus_unavailable", message: "not published: bus down" });
  const e = events.find(([n]) => n === "error")[1];
  assert.ok(e instanceof WsfleetError);
  assert.equal(e.code, "bus_unavailable");
  assert.equal(e.op, "publish");
  assert.equal(e.fromServer, true);
  client.close();
});

test("a publish whose outcome is unknown is sent again with the same id, a few times at most", async () => {
  const { client, events } = await connected();
  await client.publish("c", 1);
  await client.publish("c", 2);
  const socket = FakeSocket.last();
  const [first, second] = socket.ops("publish");
  assert.ok(first.id && second.id && first.id !== second.id, "every publish has its own id");
  // The first is acknowledged; the second's answer was lost on the server's side.
  socket.frame({ type: "published", channel: "c", id: first.id, epoch: "e", offset: 1, duplicate: false });
  for (let i = 0; i < 4; i++) {
    socket.frame({ type: "error", code: "outcome_unknown", channel: "c", id: second.id, message: "m" });
  }
  const resent = socket.ops("publish").slice(2);
  assert.equal(resent.length, 3, "sent again three times, then reported");
  assert.ok(resent.every((f) => f.id === second.id && f.data === 2));
  const errors = events.filter(([n]) => n === "error").map(([, e]) => e);
  assert.deepEqual(errors.map((e) => [e.code, e.op]), [["outcome_unknown", "publish"]]);
  // An acknowledged publish is never sent again.
  socket.frame({ type: "error", code: "outcome_unknown", channel: "c", id: first.id, message: "m" });
  assert.equal(socket.ops("publish").length, 5);
  client.close();
});

test("a gap the server announces is a discontinuity at once, and the messages after it follow", async () => {
  const { client, events } = await connected();
  const { got } = collect(client, "c");
  const socket = FakeSocket.last();
  socket.frame({ type: "subscribed", channel: "c", epoch: "e", offset: 1, recovered: false });
  socket.frame({ type: "message", channel: "c", epoch: "e", offset: 2, data: "a" });
  socket.frame({ type: "gap", channel: "c", epoch: "e", from: 3, to: 8, reason: "history_gap" });
  const gaps = events.filter(([n]) => n === "discontinuity").map(([, e]) => e);
  assert.deepEqual(gaps, [{ channel: "c", reason: "history_gap", previous: { epoch: "e", offset: 2 }, next: { epoch: "e", offset: 8 } }]);
  socket.frame({ type: "message", channel: "c", epoch: "e", offset: 9, data: "b" });
  assert.equal(events.filter(([n]) => n === "discontinuity").length, 1, "the message after the gap is no second one");
  assert.deepEqual(got.map(([, offset]) => offset), [2, 9]);
  client.close();
});

test("unsubscribe during a reconnect: not subscribed again, nothing delivered", async () => {
  const { client, timers } = await connected();
  const ws1 = FakeSocket.last();
  const a = collect(client, "a");
  const b = collect(client, "b");
  ws1.frame({ type: "subscribed", channel: "a", epoch: "e", offset: 0, recovered: false });
  ws1.frame({ type: "subscribed", channel: "b", epoch: "e", offset: 0, recovered: false });
  ws1.drop(1006);
  a.sub.unsubscribe();
  a.sub.unsubscribe();
  await timers.advance(timers.next());
  const ws2 = FakeSocket.last();
  ws2.open();
  assert.deepEqual(ws2.sent, [{ op: "subscribe", channel: "b", since: { epoch: "e", offset: 0 } }]);
  ws2.frame(msg("a", "e", 1));
  assert.equal(a.got.length, 0);
  // Subscribing again to the channel works, from a fresh position.
  const a2 = collect(client, "a");
  assert.deepEqual(ws2.sent.at(-1), { op: "subscribe", channel: "a" });
  ws2.frame({ type: "subscribed", channel: "a", epoch: "e", offset: 1, recovered: false });
  ws2.frame(msg("a", "e", 2));
  assert.deepEqual(a2.got, [["e", 2, 2]]);
  client.close();
});

test("unsubscribe before the answer: the late answer and messages are ignored, a new subscription is not confused", async () => {
  const { client } = await connected();
  const ws = FakeSocket.last();
  const first = collect(client, "a");
  first.sub.unsubscribe();
  const second = collect(client, "a");
  assert.deepEqual(ws.sent.map((f) => f.op), ["subscribe", "unsubscribe", "subscribe"]);
  ws.frame({ type: "subscribed", channel: "a", epoch: "e", offset: 10, recovered: false });
  ws.frame(msg("a", "e", 11)); // the first subscription's, before the server's unsubscribe
  ws.frame({ type: "unsubscribed", channel: "a" });
  ws.frame({ type: "subscribed", channel: "a", epoch: "e", offset: 11, recovered: false });
  ws.frame(msg("a", "e", 12));
  assert.equal(first.got.length, 0);
  assert.deepEqual(second.got, [["e", 12, 12]]);
  assert.equal((await second.sub.ready).offset, 11);
  client.close();
});

test("a subscribe refused for good rejects ready; bus_unavailable is retried", async () => {
  const { client, timers } = await connected({ subscribeRetryMs: 1000 });
  const ws = FakeSocket.last();
  const retried = collect(client, "busy");
  const refused = collect(client, "many");
  ws.frame({ type: "error", code: "bus_unavailable", message: 'could not subscribe to "busy": down; retry' });
  ws.frame({ type: "error", code: "subscription_limit", message: "this connection already has 100 subscriptions" });
  await assert.rejects(refused.sub.ready, (e) => e.code === "subscription_limit" && e.channel === "many");
  assert.throws(() => client.subscribe("busy", { onMessage() {} }), (e) => e.code === "already_subscribed");
  await timers.advance(1000);
  assert.equal(ws.ops("subscribe").filter((f) => f.channel === "busy").length, 2, "retried on the same connection");
  ws.frame({ type: "subscribed", channel: "busy", epoch: "e", offset: 0, recovered: false });
  assert.equal((await retried.sub.ready).channel, "busy");
  client.close();
});

test("a subscribe refused by a server's limit is retried, not given up", async () => {
  const { client, timers } = await connected({ subscribeRetryMs: 1000 });
  const ws = FakeSocket.last();
  const subs = ["rl", "cl", "to"].map((c) => collect(client, c));
  ws.frame({ type: "error", code: "rate_limited", channel: "rl", message: 'not subscribed to "rl": slow down' });
  ws.frame({ type: "error", code: "channel_limit", channel: "cl", message: 'not subscribed to "cl": server full' });
  ws.frame({ type: "error", code: "timeout", channel: "to", message: 'not subscribed to "to": took too long' });
  await timers.advance(1500);
  for (const c of ["rl", "cl", "to"]) {
    assert.equal(ws.ops("subscribe").filter((f) => f.channel === c).length, 2, `${c} retried`);
    ws.frame({ type: "subscribed", channel: c, epoch: "e", offset: 0, recovered: false });
  }
  for (const s of subs) assert.ok((await s.sub.ready).channel);
  client.close();
});

test("close stops everything: no timer left, no reconnect", async () => {
  const { client, timers } = await connected();
  FakeSocket.last().drop(1006);
  assert.ok(timers.queue.length > 0);
  client.close();
  assert.equal(timers.queue.length, 0, "no timer left behind");
  assert.equal(client.state, "closed");
  assert.throws(() => client.subscribe("c", { onMessage() {} }), (e) => e.code === "closed");
});

test("a subscribe made by a connected listener is sent once", async () => {
  const { client } = setup();
  await flush();
  const first = collect(client, "a");
  client.on("connected", () => collect(client, "b"));
  FakeSocket.last().open();
  assert.deepEqual(FakeSocket.last().ops("subscribe").map((f) => f.channel).sort(), ["a", "b"]);
  void first;
  client.close();
});

test("an application callback that throws does not stop delivery; its error is reported on its own", async () => {
  // The client rethrows an application's exception in a microtask of its own: capture those.
  const uncaught = [];
  const queueMicrotask = globalThis.queueMicrotask;
  globalThis.queueMicrotask = (fn) => {
    try {
      fn();
    } catch (e) {
      uncaught.push(e.message);
    }
  };
  try {
    const { client } = await connected();
    const ws = FakeSocket.last();
    const got = [];
    client.on("subscribed", () => {
      throw new Error("listener bug");
    });
    const sub = client.subscribe("c", {
      onMessage: (data) => {
        got.push(data);
        if (data === 1) throw new Error("handler bug");
      },
    });
    ws.frame({ type: "subscribed", channel: "c", epoch: "e", offset: 0, recovered: false });
    ws.frame(msg("c", "e", 1));
    ws.frame(msg("c", "e", 2));
    globalThis.queueMicrotask = queueMicrotask;
    assert.equal((await sub.ready).epoch, "e");
    assert.deepEqual(got, [1, 2]);
    assert.deepEqual(uncaught.sort(), ["handler bug", "listener bug"]);
    client.close();
  } finally {
    globalThis.queueMicrotask = queueMicrotask;
  }
});
