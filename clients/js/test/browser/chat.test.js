// The chat demo page in a real headless Chromium against a real fleet: two pages on different
// servers exchange messages, one server drains under them, and both keep every message in order.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdir, stat } from "node:fs/promises";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

import { fleet, sleep } from "../support/fleet.js";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const PKG = path.resolve(HERE, "../..");
const OUTPUT = path.join(PKG, "test-output");
const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";

const cleanups = [];
after(async () => {
  for (const f of cleanups.splice(0).reverse()) await f().catch(() => {});
});

function serveDemo(servers) {
  const child = spawn(process.execPath, [path.join(PKG, "examples/chat/serve.mjs"), "--port", "0", ...servers], {
    stdio: ["ignore", "pipe", "inherit"],
  });
  cleanups.push(async () => child.kill("SIGKILL"));
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error("the demo server did not start")), 10_000);
    let out = "";
    child.stdout.setEncoding("utf8");
    child.stdout.on("data", (d) => {
      out += d;
      const m = /chat demo: (\S+)/.exec(out);
      if (m) {
        clearTimeout(t);
        resolve(m[1]);
      }
    });
    child.once("exit", (code) => reject(new Error(`the demo server exited (${code})`)));
  });
}

test("two pages on different servers keep every message, in order, through a drain", async () => {
  const f = await fleet(3, ["--drain-timeout", "2"]);
  cleanups.push(f.stop);
  const pageUrl = await serveDemo(f.servers.map((s) => s.url()));
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: ["--no-sandbox", "--disable-gpu"], timeout: 30_000 });
  cleanups.push(() => browser.close());
  const errors = [];
  const open = async (name, start) => {
    const page = await browser.newPage({ viewport: { width: 1100, height: 640 } });
    page.on("pageerror", (e) => errors.push(`${name}: ${e.message}`));
    await page.goto(`${pageUrl}?name=${name}&start=${start}`);
    await page.waitForFunction(() => window.chat?.client.state === "connected", null, { timeout: 15_000 });
    return page;
  };
  const alice = await open("alice", 0); // on server 0, which will drain
  const bob = await open("bob", 1);
  const serverOf = (page) => page.evaluate(() => window.chat.client.url);
  assert.equal(await serverOf(alice), f.servers[0].url());
  assert.equal(await serverOf(bob), f.servers[1].url());
  // Both subscriptions are confirmed before anyone speaks.
  for (const page of [alice, bob]) {
    await page.waitForFunction(() => window.chat.events.some((e) => e.event === "subscribed"), null, { timeout: 10_000 });
  }

  // A message typed into the page.
  await alice.fill("#text", "hello from alice");
  await alice.click("button[type=submit]");
  await bob.waitForFunction(() => window.chat.messages.length === 1, null, { timeout: 10_000 });

  // Then both talk while alice's server drains, and a while after she moved.
  const moved = () => alice.evaluate(() => window.chat.events.some((e) => e.event === "resubscribed"));
  let MESSAGES_EACH = 0;
  for (let after = 0; MESSAGES_EACH < 400 && after < 10; ) {
    const i = ++MESSAGES_EACH;
    await alice.evaluate((i) => void window.chat.send(`alice ${i}`), i);
    await bob.evaluate((i) => void window.chat.send(`bob ${i}`), i);
    if (i === 10) f.servers[0].sigterm();
    if (i > 10 && (await moved())) after += 1;
    await sleep(25);
  }
  assert.ok(await moved(), "alice moved within the drain");
  const total = 1 + 2 * MESSAGES_EACH;
  for (const page of [alice, bob]) {
    await page.waitForFunction((n) => window.chat.messages.length >= n, total, { timeout: 30_000 });
  }
  await sleep(300);
  const seen = {};
  for (const [name, page] of [["alice", alice], ["bob", bob]]) {
    seen[name] = await page.evaluate(() => window.chat.messages);
    assert.deepEqual(seen[name].map((m) => m.offset), Array.from({ length: total }, (_, i) => i + 1), `${name}: every offset once, in order`);
    for (const who of ["alice", "bob"]) {
      const own = seen[name].filter((m) => m.from === who && m.text !== "hello from alice").map((m) => m.text);
      assert.deepEqual(own, Array.from({ length: MESSAGES_EACH }, (_, i) => `${who} ${i + 1}`), `${name} has all of ${who}'s messages in order`);
    }
  }
  assert.deepEqual(seen.alice, seen.bob, "both pages show the same conversation");
  const events = await alice.evaluate(() => window.chat.events);
  assert.ok(events.some((e) => e.event === "disconnected" && e.code === 1012), JSON.stringify(events));
  const resumed = events.filter((e) => e.event === "resubscribed");
  assert.ok(resumed.length >= 1 && resumed.every((e) => e.recovered), JSON.stringify(resumed));
  assert.notEqual(await serverOf(alice), f.servers[0].url(), "alice moved to another server");
  // Messages name the server their sender was on: alice's name two servers.
  assert.ok(new Set(seen.bob.filter((m) => m.from === "alice").map((m) => m.server)).size >= 2);
  assert.deepEqual(errors, []);

  await mkdir(OUTPUT, { recursive: true });
  const shot = path.join(OUTPUT, "chat.png");
  const png = await alice.screenshot({ path: shot, fullPage: true });
  const { size } = await stat(shot);
  assert.ok(size > 20_000, `the screenshot is not blank (${size} bytes)`);
  // Pixel variance, decoded by the browser: a blank page is one colour, this one has text.
  const probe = await browser.newPage();
  const colours = await probe.evaluate(async (b64) => {
    const img = new Image();
    img.src = `data:image/png;base64,${b64}`;
    await img.decode();
    const canvas = Object.assign(document.createElement("canvas"), { width: img.width, height: img.height });
    const ctx = canvas.getContext("2d");
    ctx.drawImage(img, 0, 0);
    const px = ctx.getImageData(0, 0, img.width, img.height).data;
    const seen = new Set();
    for (let i = 0; i < px.length; i += 4) seen.add((px[i] << 16) | (px[i + 1] << 8) | px[i + 2]);
    return seen.size;
  }, png.toString("base64"));
  assert.ok(colours > 50, `the screenshot has content (${colours} distinct colours)`);
  assert.deepEqual(await f.servers[0].waitExit(5000), { code: 0, signal: null });
});
