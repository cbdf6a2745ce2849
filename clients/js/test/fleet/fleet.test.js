// The client against a real fleet: redis-server and wsfleet-server processes on loopback.
// Cross-server delivery, a drain under a publisher, Redis losing its data, tokens, a full buffer.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import WebSocket from "ws";

import { connect } from "../../dist/index.js";
import { Server, fleet, freePort, jwt, sleep } from "../support/fleet.js";
import { record } from "../support/recorder.js";

const clients = [];
const fleets = [];
function client(urls, opts = {}) {
  const c = connect(urls, { WebSocket, ...opts });
  clients.push(c);
  return c;
}
async function startFleet(n, extra) {
  const f = await fleet(n, extra);
  fleets.push(f);
  return f;
}
// Whatever happens in a test, its clients and processes end.
async function cleanUp() {
  for (const c of clients.splice(0)) c.close();
  for (const f of fleets.splice(0)) await f.stop();
}
after(cleanUp);

test("a message published on one server reaches subscribers on the others", async (t) => {
  t.after(cleanUp);
  const { servers } = await startFleet(3);
  const recs = [];
  for (const s of servers) {
    const r = record(client(s.url()), "lobby");
    await r.sub.ready;
    recs.push(r);
  }
  const publisher = client(servers[0].url());
  assert.deepEqual(await publisher.publish("lobby", { text: "hello", n: 1 }), { sent: true, url: servers[0].url() });
  const from2 = recs[2];
  await from2.waitFor("every server delivered", () => recs.every((r) => r.messages.length === 1));
  for (const r of recs) assert.deepEqual(r.data(), [{ text: "hello", n: 1 }]);
  // And back the other way, from the last server to all.
  const back = client(servers[2].url());
  await back.publish("lobby", "reply");
  await from2.waitFor("the reply everywhere", () => recs.every((r) => r.messages.length === 2));
  for (const r of recs) assert.deepEqual(r.offsets(), [1, 2]);
});

test("a drained server's clients resume on another with zero loss while a publisher publishes", async (t) => {
  t.after(cleanUp);
  const { servers } = await startFleet(3, ["--drain-timeout", "2"]);
  const urls = servers.map((s) => s.url());
  // Every subscriber starts on server 0, the one that drains.
  const subs = [];
  for (let i = 0; i < 4; i++) {
    const r = record(client(i % 2 ? [urls[0], urls[2], urls[1]] : urls), "stream");
    await r.sub.ready;
    subs.push(r);
  }
  const publisher = client([urls[1], urls[2]]);
  const published = [];
  const moved = () => subs.every((r) => r.of("resubscribed").length > 0);
  // Publishing goes on through the whole drain (its closes are spread over 1.5 s), and a while after.
  let after = 0;
  for (let n = 1; n <= 3000 && after < 50; n++) {
    published.push(publisher.publish("stream", { n }));
    if (n === 50) servers[0].sigterm();
    if (n > 50 && moved()) after += 1;
    await sleep(5);
  }
  assert.ok(moved(), "every subscriber moved within the drain");
  const MESSAGES = published.length;
  const results = await Promise.allSettled(published);
  assert.deepEqual(results.filter((r) => r.status === "rejected"), [], "every publish was sent");
  for (const r of subs) {
    await r.waitFor(`every message (${r.messages.length})`, () => r.messages.length >= MESSAGES, 30_000);
    await sleep(100);
    assert.deepEqual(r.offsets(), Array.from({ length: MESSAGES }, (_, i) => i + 1), "each message once, in order");
    assert.deepEqual(r.data(), Array.from({ length: MESSAGES }, (_, i) => ({ n: i + 1 })));
    const closes = r.of("disconnected");
    assert.equal(closes[0].code, 1012, "closed by the drain");
    const resub = r.of("resubscribed");
    assert.ok(resub.length >= 1 && resub.every((e) => e.recovered), JSON.stringify(resub));
    assert.equal(r.of("discontinuity").length, 0);
    assert.notEqual(r.events.filter((e) => e.event === "connected").at(-1).url, urls[0]);
  }
  const exit = await servers[0].waitExit(5000);
  assert.deepEqual(exit, { code: 0, signal: null }, "the drained server exits cleanly");
});

test("Redis restarted empty: the application is told the epoch changed", async (t) => {
  t.after(cleanUp);
  const { redis, servers } = await startFleet(2);
  const r = record(client([servers[0].url(), servers[1].url()]), "news");
  const first = await r.sub.ready;
  // This one stays connected through the outage.
  const live = record(client(servers[1].url()), "news");
  await live.sub.ready;
  const publisher = client(servers[1].url());
  await publisher.publish("news", "before");
  await r.waitFor("the first message", () => r.messages.length === 1 && live.messages.length === 1);
  await redis.kill();
  await redis.restart(); // empty: the test Redis keeps nothing on disk
  for (const s of servers) await s.waitBusUp();
  // The subscriber moves server meanwhile (a drain), so it resumes on a bus that lost the channel.
  servers[0].sigterm();
  await r.waitFor("resubscribed elsewhere", () => r.of("resubscribed").length >= 1);
  const resub = r.of("resubscribed")[0];
  assert.equal(resub.recovered, false);
  assert.equal(resub.reason, "epoch_changed");
  assert.notEqual(resub.epoch, first.epoch);
  const d = r.of("discontinuity");
  assert.equal(d.length, 1);
  assert.deepEqual(d[0].previous, { epoch: first.epoch, offset: 1 });
  await publisher.publish("news", "after");
  await r.waitFor("the message of the new epoch", () => r.messages.length === 2);
  assert.deepEqual(r.data(), ["before", "after"]);
  assert.equal(r.messages[1].epoch, resub.epoch);
  // The subscriber that never disconnected sees the new epoch in the live stream, and is told.
  await live.waitFor("the live subscriber's message", () => live.messages.length === 2);
  assert.deepEqual(live.data(), ["before", "after"]);
  assert.equal(live.of("disconnected").length, 0);
  assert.deepEqual(
    live.of("discontinuity").map((d) => [d.reason, d.previous, d.next]),
    [["epoch_changed", { epoch: first.epoch, offset: 1 }, { epoch: resub.epoch, offset: 1 }]],
  );
});

test("with a JWT secret, getToken is called for every connection and a refused token is retried", async (t) => {
  t.after(cleanUp);
  const SECRET = "a-secret-of-at-least-thirty-two-bytes!";
  const { servers } = await startFleet(2, ["--jwt-secret", SECRET, "--drain-timeout", "1"]);
  const tokens = [];
  const c = client(
    servers.map((s) => s.url()),
    {
      backoff: { initialMs: 50, maxMs: 200 },
      getToken: async () => {
        // The first token is signed with the wrong key: the upgrade gets 401.
        // A token grants channels by name (see the README's Tokens section).
        const grant = { channels: { subscribe: ["private"], publish: ["private"] } };
        const token =
          tokens.length === 0
            ? jwt("not-the-right-secret-of-32-bytes!!", { n: 0, ...grant })
            : jwt(SECRET, { n: tokens.length, ...grant });
        tokens.push(token);
        return token;
      },
    },
  );
  const r = record(c, "private");
  await r.sub.ready;
  assert.equal(tokens.length, 2, "refused once, then a fresh token");
  assert.equal(r.of("disconnected")[0].code, 1006);
  servers[r.of("connected")[0].url === servers[0].url() ? 0 : 1].sigterm();
  await r.waitFor("resubscribed on the other server", () => r.of("resubscribed").length === 1);
  assert.equal(tokens.length, 3, "a fresh token for the reconnect");
  assert.equal(new Set(tokens).size, 3);
  await c.publish("private", "ok");
  await r.waitFor("own message", () => r.messages.length === 1);
});

test("a token is refreshed on the open connection before it expires, and a forbidden publish names its channel", async (t) => {
  t.after(cleanUp);
  const SECRET = "a-secret-of-at-least-thirty-two-bytes!";
  const { servers } = await startFleet(1, ["--jwt-secret", SECRET]);
  const grant = { sub: "reader-1", channels: { subscribe: ["news"], publish: ["news"] } };
  let issued = 0;
  // Tokens that live 3 s, refreshed 2 s before they expire: without the refresh the server
  // closes the connection with 4001 after 3 s.
  const c = client(servers[0].url(), {
    getToken: () => (issued++, jwt(SECRET, grant, 3)),
    refreshLeadMs: 2000,
  });
  const r = record(c, "news");
  await r.sub.ready;
  await sleep(4500);
  assert.equal(r.of("disconnected").length, 0, "the connection outlived its first token");
  assert.ok(issued >= 3, `a token for the connection, then refreshes (${issued} issued)`);
  await c.publish("news", "still here");
  await r.waitFor("own message", () => r.messages.length === 1);
  // A publish the token does not allow is refused with the channel named; the connection stays.
  await c.publish("elsewhere", "no");
  await r.waitFor("the refusal", () => r.of("error").some((e) => e.code === "forbidden"));
  const refusal = r.of("error").find((e) => e.code === "forbidden");
  assert.equal(refusal.channel, "elsewhere");
  assert.equal(refusal.op, "publish");
  await c.publish("news", "after the refusal");
  await r.waitFor("the next message", () => r.messages.length === 2);
});

test("publishes buffer while no server answers, up to the limit, and go out on reconnect", async (t) => {
  t.after(cleanUp);
  const f = await startFleet(1);
  const port = await freePort();
  let revived = await Server.start(f.redis, [], "revived", `127.0.0.1:${port}`);
  f.servers.push(revived);
  const c = client([f.servers[0].url(), revived.url()], { maxBufferedPublishes: 3, backoff: { initialMs: 50, maxMs: 200 } });
  const r = record(c, "jobs");
  await r.sub.ready;
  await f.servers[0].stop();
  await revived.stop();
  await r.waitFor("disconnected", () => c.state !== "connected");
  const states = [undefined, undefined, undefined, undefined, undefined];
  const publishes = [1, 2, 3, 4, 5].map((n, i) =>
    c.publish("jobs", n).then(
      (v) => ((states[i] = "sent"), v),
      (e) => ((states[i] = e.code), undefined),
    ),
  );
  await sleep(50);
  assert.deepEqual(states, [undefined, undefined, undefined, "buffer_full", "buffer_full"], "over the limit: refused at once");
  assert.equal(c.buffered.count, 3);
  revived = await Server.start(f.redis, [], "revived-again", `127.0.0.1:${port}`);
  f.servers.push(revived);
  await Promise.all(publishes);
  assert.deepEqual(states, ["sent", "sent", "sent", "buffer_full", "buffer_full"]);
  await r.waitFor("the buffered messages", () => r.messages.length === 3);
  assert.deepEqual(r.data(), [1, 2, 3]);
  assert.equal(c.buffered.count, 0);
});
