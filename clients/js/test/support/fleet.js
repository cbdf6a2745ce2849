// Real processes for the fleet and browser tests: redis-server and wsfleet-server on loopback
// ports chosen at run time (servers bind port 0 and report it in their `listening` log line).
// Every process started here is stopped by its pid: by the test's `stop`, and in any case when
// this process exits.

import { spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { createServer, connect as tcpConnect } from "node:net";
import { get as httpGet } from "node:http";
import { fileURLToPath } from "node:url";
import path from "node:path";

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../../..");
export const SERVER_BIN = process.env.WSFLEET_SERVER_BIN ?? path.join(REPO, "target/debug/wsfleet-server");
const VERBOSE = !!process.env.WSFLEET_TEST_LOGS;

const children = new Set();
function killAll() {
  for (const c of children) {
    try {
      process.kill(c.pid, "SIGKILL");
    } catch {
      // gone already
    }
  }
  children.clear();
}
process.on("exit", killAll);
for (const sig of ["SIGINT", "SIGTERM"]) {
  process.on(sig, () => {
    killAll();
    process.exit(130);
  });
}

function track(child) {
  children.add(child);
  child.once("exit", () => children.delete(child));
  return child;
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

export async function waitUntil(what, f, timeoutMs = 10_000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await f();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting until ${what}`);
    await sleep(25);
  }
}

export function freePort() {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

function exited(child, timeoutMs) {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve({ code: child.exitCode, signal: child.signalCode });
  return new Promise((resolve) => {
    const t = setTimeout(() => resolve(undefined), timeoutMs);
    child.once("exit", (code, signal) => {
      clearTimeout(t);
      resolve({ code, signal });
    });
  });
}

async function kill(child) {
  if (!child || child.exitCode !== null || child.signalCode !== null) return;
  try {
    process.kill(child.pid, "SIGKILL");
  } catch {
    return;
  }
  await exited(child, 5000);
}

function redisPing(port) {
  return new Promise((resolve) => {
    const s = tcpConnect(port, "127.0.0.1");
    let buf = "";
    s.setTimeout(1000, () => (s.destroy(), resolve(false)));
    s.on("error", () => resolve(false));
    s.on("connect", () => s.write("PING\r\n"));
    s.on("data", (d) => {
      buf += d;
      if (buf.includes("\r\n")) {
        s.destroy();
        resolve(buf.startsWith("+PONG"));
      }
    });
  });
}

export class Redis {
  static async start() {
    const r = new Redis(await freePort());
    await r.restart();
    return r;
  }
  constructor(port) {
    this.port = port;
    this.child = undefined;
  }
  get url() {
    return `redis://127.0.0.1:${this.port}`;
  }
  /** Starts (again) on the same port, with no data. */
  async restart() {
    this.child = track(
      spawn("redis-server", ["--port", String(this.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], {
        stdio: "ignore",
      }),
    );
    await waitUntil("redis answers PING", () => redisPing(this.port));
  }
  async kill() {
    await kill(this.child);
    this.child = undefined;
  }
}

export class Server {
  static async start(redis, extra = [], name = "test", listen = "127.0.0.1:0") {
    const args = ["--listen", listen, "--http-listen", "127.0.0.1:0", "--pod-name", name, "--worker-threads", "1"];
    if (redis) args.push("--redis-url", redis.url);
    args.push(...extra);
    const child = track(spawn(SERVER_BIN, args, { stdio: ["ignore", "ignore", "pipe"], env: { ...process.env, WSFLEET_LOG: "info" } }));
    const s = new Server(child, name);
    const line = await new Promise((resolve, reject) => {
      let buf = "";
      const t = setTimeout(() => reject(new Error(`${name}: no listening line in 10 s`)), 10_000);
      child.once("error", reject);
      child.once("exit", (code) => reject(new Error(`${name} exited (${code}) before listening:\n${buf}`)));
      child.stderr.setEncoding("utf8");
      child.stderr.on("data", (d) => {
        if (VERBOSE) process.stderr.write(d.replace(/^/gm, `[${name}] `));
        buf += d;
        const l = buf.split("\n").find((x) => x.includes("listening"));
        if (l) {
          clearTimeout(t);
          resolve(l);
        }
      });
    });
    const field = (k) => new RegExp(`${k}=(\\S+)`).exec(line.replace(/\x1b\[[0-9;]*m/g, ""))[1];
    s.ws = field("websocket");
    s.http = field("http");
    if (redis) await waitUntil(`${name} /readyz is 200`, async () => (await s.get("/readyz")).status === 200);
    return s;
  }
  constructor(child, name) {
    this.child = child;
    this.name = name;
  }
  get pid() {
    return this.child.pid;
  }
  url(p = "/ws") {
    return `ws://${this.ws}${p}`;
  }
  get(p) {
    return new Promise((resolve) => {
      const req = httpGet(`http://${this.http}${p}`, (res) => {
        let body = "";
        res.setEncoding("utf8");
        res.on("data", (d) => (body += d));
        res.on("end", () => resolve({ status: res.statusCode, body }));
      });
      req.setTimeout(2000, () => req.destroy());
      req.on("error", () => resolve({ status: 0, body: "" }));
    });
  }
  async metric(prefix) {
    const { body } = await this.get("/metrics");
    const l = body.split("\n").find((x) => x.startsWith(prefix));
    return l ? Number(l.split(" ").at(-1)) : 0;
  }
  async waitBusUp() {
    await waitUntil(`${this.name}'s bus is up`, async () => (await this.metric("wsfleet_bus_up")) === 1);
  }
  /** SIGTERM: the server drains (1012 to every client) and exits. */
  sigterm() {
    process.kill(this.pid, "SIGTERM");
  }
  /** Waits for the process to exit; undefined if it did not within `timeoutMs`. */
  waitExit(timeoutMs) {
    return exited(this.child, timeoutMs);
  }
  async stop() {
    await kill(this.child);
  }
}

/** One redis-server and `n` servers on it; `stop()` ends them all. */
export async function fleet(n, extra = []) {
  const redis = await Redis.start();
  const servers = [];
  try {
    for (let i = 0; i < n; i++) servers.push(await Server.start(redis, extra, `server-${i}`));
  } catch (e) {
    await Promise.all(servers.map((s) => s.stop()));
    await redis.kill();
    throw e;
  }
  return {
    redis,
    servers,
    stop: async () => {
      await Promise.all(servers.map((s) => s.stop()));
      await redis.kill();
    },
  };
}

/** An HS256 JWT signed with `secret`, expiring in `expInSecs`. */
export function jwt(secret, claims = {}, expInSecs = 60) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  const body = `${b64({ alg: "HS256", typ: "JWT" })}.${b64({ exp: Math.floor(Date.now() / 1000) + expInSecs, ...claims })}`;
  return `${body}.${createHmac("sha256", secret).update(body).digest("base64url")}`;
}
