/**
 * The client: one WebSocket at a time to one server of a fleet, in protocol mode (`/ws`), and
 * everything that keeps the application's view whole across reconnects.
 *
 * Contract (the package README says it for users):
 *
 * - Every subscription remembers the `(epoch, offset)` of the last message it delivered. On every
 *   (re)connect it subscribes again with `since` = that position; the server replays what was
 *   missed, then the live stream. A message at or below the last delivered offset of the same
 *   epoch is dropped, so the seam has no duplicate; an offset that skips one is reported, so it
 *   has no silent gap. When the server cannot recover (`recovered: false`, `epoch_changed`,
 *   `history_gap`, `offset_ahead`) or a live message arrives in a new epoch, the application is
 *   told (`resubscribed` / `discontinuity` events) and delivery goes on from the new position.
 * - Reconnects: full-jitter exponential backoff; 1012 (drain) reconnects at once to the next
 *   server; 1013 (try again later) backs off. A token is fetched (`getToken`) before every
 *   connection attempt and sent as `?access_token=`, which browsers can send too.
 * - `publish` sends at once when connected; while disconnected it buffers, bounded by count and
 *   bytes. The server does not acknowledge publishes: see {@link Client.publish} for what the
 *   returned promise means.
 * - Nothing here is unbounded: the publish buffer has limits, every timer is cleared on close,
 *   and a stale socket's events are ignored.
 */

import { reconnectDelay, resolveBackoff, type BackoffOptions, type ResolvedBackoff } from "./backoff.js";
import { WsfleetError, type ServerErrorCode } from "./errors.js";

/**
 * The subset of the WHATWG WebSocket the client uses (browsers, Node 22+, the `ws` package).
 * Handlers take `any`: each implementation has its own event types, and the client reads only
 * `data` of a message and `code` and `reason` of a close.
 */
export interface WebSocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((ev: any) => void) | null;
  onmessage: ((ev: any) => void) | null;
  onclose: ((ev: any) => void) | null;
  onerror: ((ev: any) => void) | null;
}

export type WebSocketConstructor = new (url: string) => WebSocketLike;

const OPEN = 1;

/** A place in a channel's order. */
export interface Position {
  epoch: string;
  offset: number;
}

export interface MessageMeta {
  channel: string;
  epoch: string;
  offset: number;
  /** `"base64"` when the message was published as binary (raw mode) and `data` is its base64. */
  encoding?: "base64";
}

export interface SubscribeOptions {
  /** Called for every message, in the channel's order, exactly once. */
  onMessage: (data: unknown, meta: MessageMeta) => void;
  /** Resume after this position (replaying what came after it) instead of starting live. */
  since?: Position;
  /** Called on every `subscribed` answer (the first and each resubscription). */
  onSubscribed?: (info: SubscribedEvent) => void;
  /** Called when continuity was lost (see the `discontinuity` event). */
  onDiscontinuity?: (info: DiscontinuityEvent) => void;
  /** Called when the server refused the subscription for good (e.g. `subscription_limit`). */
  onError?: (error: WsfleetError) => void;
}

export interface Subscription {
  readonly channel: string;
  /** The last delivered position (or the subscribed one), if any. */
  readonly position: Position | undefined;
  /** Settles with the first `subscribed` answer, or rejects if the server refused. */
  readonly ready: Promise<SubscribedEvent>;
  /** Stops delivery at once; tells the server when connected. Idempotent. */
  unsubscribe(): void;
}

export interface SubscribedEvent {
  channel: string;
  epoch: string;
  /** The channel's current offset on the server. */
  offset: number;
  /** True when every message after the requested `since` follows. */
  recovered: boolean;
  /** Why not recovered: `epoch_changed`, `history_gap`, `offset_ahead`; absent on a fresh subscribe. */
  reason?: string;
  /** True when this answers a resubscription after a reconnect. */
  resumed: boolean;
}

export interface DiscontinuityEvent {
  channel: string;
  /** `epoch_changed`, `history_gap`, `offset_ahead` (the server's reasons) or `offset_skipped` (a live gap seen by the client). */
  reason: string;
  /** The last position delivered before the discontinuity. */
  previous: Position | undefined;
  /** Where delivery goes on from. */
  next: Position;
}

export interface ConnectingEvent {
  url: string;
  attempt: number;
}
export interface ConnectedEvent {
  url: string;
}
export interface DisconnectedEvent {
  url: string;
  /** The close code (1006 when the connection failed or dropped without a close frame). */
  code: number;
  reason: string;
  /** When the next attempt starts, in ms; undefined when the client was closed. */
  reconnectInMs: number | undefined;
}

export interface ClientEvents {
  connecting: ConnectingEvent;
  connected: ConnectedEvent;
  disconnected: DisconnectedEvent;
  subscribed: SubscribedEvent;
  resubscribed: SubscribedEvent;
  discontinuity: DiscontinuityEvent;
  error: WsfleetError;
  closed: void;
}

export type ClientState = "connecting" | "connected" | "disconnected" | "closed";

export interface Timers {
  setTimeout(fn: () => void, ms: number): unknown;
  clearTimeout(handle: unknown): void;
}

export interface ConnectOptions {
  /** A fixed token (JWT), sent as `?access_token=`. */
  token?: string;
  /**
   * Called before every connection attempt; its token is used for that attempt. It is also
   * called `refreshLeadMs` before the token of an open connection expires (when its `exp` can
   * be read), and the fresh token is handed to that connection (`refresh`), so it stays open.
   */
  getToken?: () => string | Promise<string>;
  /** How long before a token's `exp` it is refreshed on the open connection (default 30000 ms). */
  refreshLeadMs?: number;
  /** The WebSocket implementation (e.g. the `ws` package); default the global one. */
  WebSocket?: WebSocketConstructor;
  backoff?: BackoffOptions;
  /** An attempt that is not open by then is abandoned (default 10000 ms). */
  connectTimeoutMs?: number;
  /** A connection open this long resets the backoff (default 5000 ms). */
  stableAfterMs?: number;
  /** Most publishes buffered while disconnected (default 1000). */
  maxBufferedPublishes?: number;
  /** Most bytes of publish frames buffered while disconnected (default 1 MiB). */
  maxBufferedBytes?: number;
  /** A buffered publish not sent within this many ms is rejected with `timeout` (default 0: never). */
  publishTimeoutMs?: number;
  /**
   * Delay before retrying a subscribe the server refused for now (`bus_unavailable`,
   * `rate_limited`, `channel_limit`, `timeout`; default 1000 ms, jittered).
   */
  subscribeRetryMs?: number;
  /**
   * Reads a reconnect hint (ms) from a close. The server's 1012 close ends its reason in
   * `reconnect_after_ms=N` (README, "Reconnect hints"), which the default reads.
   */
  reconnectHint?: (code: number, reason: string) => number | undefined;
  /** For tests: randomness in [0, 1) and timers. */
  random?: () => number;
  timers?: Timers;
}

export interface PublishResult {
  /** Always true: the frame was handed to an open connection (see {@link Client.publish}). */
  sent: true;
  /** The server URL it was handed to. */
  url: string;
}

const CHANNEL_RULE = /^[A-Za-z0-9_\-.:@]{1,128}$/;

export function validChannel(channel: string): boolean {
  return typeof channel === "string" && CHANNEL_RULE.test(channel);
}

function defaultHint(_code: number, reason: string): number | undefined {
  const m = /reconnect_after_ms=(\d+)\s*$/.exec(reason);
  return m ? Number(m[1]) : undefined;
}

/** The `/ws` endpoint of a server URL given with or without its path. */
export function protocolUrl(url: string): string {
  const u = new URL(url);
  if (u.pathname === "" || u.pathname === "/") u.pathname = "/ws";
  return u.toString();
}

/** The `exp` claim (seconds) of a JWT, when it can be read. */
export function tokenExpiry(token: string | undefined): number | undefined {
  const payload = token?.split(".")[1];
  if (!payload) return undefined;
  try {
    const json = atob(payload.replace(/-/g, "+").replace(/_/g, "/"));
    const exp = JSON.parse(json)?.exp;
    return typeof exp === "number" && Number.isFinite(exp) ? exp : undefined;
  } catch {
    return undefined;
  }
}

function withToken(url: string, token: string | undefined): string {
  if (token === undefined) return url;
  const u = new URL(url);
  u.searchParams.set("access_token", token);
  return u.toString();
}

type SubState = "waiting" | "pending" | "active";

class SubscriptionImpl implements Subscription {
  state: SubState = "waiting";
  position: Position | undefined;
  /** Subscribed at least once (a later answer is a resubscription). */
  answered = false;
  retryTimer: unknown;
  ready: Promise<SubscribedEvent>;
  resolveReady!: (e: SubscribedEvent) => void;
  rejectReady!: (e: WsfleetError) => void;
  closed = false;

  constructor(
    readonly client: Client,
    readonly channel: string,
    readonly opts: SubscribeOptions,
  ) {
    this.position = opts.since ? { ...opts.since } : undefined;
    this.ready = new Promise((res, rej) => {
      this.resolveReady = res;
      this.rejectReady = rej;
    });
    // An unobserved refusal must not crash the process; onError and the `error` event carry it.
    this.ready.catch(() => {});
  }

  unsubscribe(): void {
    this.client.removeSubscription(this);
  }
}

interface BufferedPublish {
  id: string;
  frame: string;
  bytes: number;
  resolve: (r: PublishResult) => void;
  reject: (e: WsfleetError) => void;
  timer: unknown;
}

/** What the client expects the server to answer, in order (replies keep the client's order). */
interface Expected {
  op: "subscribe" | "unsubscribe";
  channel: string;
  /** The subscription it was sent for; undefined once that subscription is gone. */
  sub: SubscriptionImpl | undefined;
}

type Listener<T> = (ev: T) => void;

/** Most times one publish is sent again after `outcome_unknown`. */
const MAX_PUBLISH_RETRIES = 3;

export class Client {
  readonly urls: readonly string[];
  private readonly opts: ConnectOptions;
  private readonly backoff: ResolvedBackoff;
  private readonly Ws: WebSocketConstructor;
  private readonly timers: Timers;
  private readonly random: () => number;
  private readonly listeners = new Map<keyof ClientEvents, Set<Listener<any>>>();
  private readonly subs = new Map<string, SubscriptionImpl>();
  private readonly buffer: BufferedPublish[] = [];
  private bufferedBytes = 0;
  /**
   * Publishes sent on the current connection and not yet answered, by id: the frame to send
   * again if the server answers `outcome_unknown`, and how often it was. Bounded like the buffer
   * (the oldest is forgotten first); emptied when the connection ends.
   */
  private readonly inFlight = new Map<string, { frame: string; retries: number }>();
  /** This client's publish ids: a random prefix and a counter. */
  private readonly idPrefix: string;
  private idCounter = 0;

  private ws: WebSocketLike | undefined;
  private expected: Expected[] = [];
  private urlIndex = 0;
  private attempt = 0;
  private openedAt = 0;
  private reconnectTimer: unknown;
  private connectTimer: unknown;
  private refreshTimer: unknown;
  /** The token of the current (or last) connection. */
  private token: string | undefined;
  private _state: ClientState = "disconnected";
  private _url: string | undefined;

  constructor(urls: string | readonly string[], opts: ConnectOptions = {}) {
    const list = (typeof urls === "string" ? [urls] : [...urls]).map(protocolUrl);
    if (list.length === 0) throw new RangeError("connect: at least one server URL");
    this.urls = list;
    this.opts = opts;
    this.backoff = resolveBackoff(opts.backoff);
    const Ws = opts.WebSocket ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
    if (!Ws) {
      throw new TypeError("connect: this runtime has no global WebSocket; pass one, e.g. { WebSocket } from the `ws` package");
    }
    this.Ws = Ws;
    this.timers = opts.timers ?? {
      setTimeout: (fn, ms) => globalThis.setTimeout(fn, ms),
      clearTimeout: (h) => globalThis.clearTimeout(h as ReturnType<typeof globalThis.setTimeout>),
    };
    this.random = opts.random ?? Math.random;
    this.idPrefix = Math.floor(this.random() * 2 ** 48).toString(36);
  }

  /** `connecting`, `connected`, `disconnected` (waiting to reconnect) or `closed`. */
  get state(): ClientState {
    return this._state;
  }

  /** The server URL of the current (or last) connection, without the token. */
  get url(): string | undefined {
    return this._url;
  }

  /** Publishes waiting for a connection, and their bytes. */
  get buffered(): { count: number; bytes: number } {
    return { count: this.buffer.length, bytes: this.bufferedBytes };
  }

  on<K extends keyof ClientEvents>(event: K, fn: Listener<ClientEvents[K]>): () => void {
    let set = this.listeners.get(event);
    if (!set) this.listeners.set(event, (set = new Set()));
    set.add(fn);
    return () => set!.delete(fn);
  }

  private emit<K extends keyof ClientEvents>(event: K, ev: ClientEvents[K]): void {
    for (const fn of [...(this.listeners.get(event) ?? [])]) callSafely(fn, ev);
  }

  /** Starts connecting (`connect()` calls it). */
  start(): this {
    if (this._state === "disconnected" && !this.ws && this.reconnectTimer === undefined) void this.open();
    return this;
  }

  /**
   * Subscribes to `channel`. Messages reach `onMessage` in the channel's order, each once, across
   * reconnects and servers. One subscription per channel and client.
   */
  subscribe(channel: string, opts: SubscribeOptions): Subscription {
    if (this._state === "closed") throw new WsfleetError("closed", "the client is closed", { op: "subscribe", channel });
    if (!validChannel(channel)) {
      throw new WsfleetError("invalid_channel", `channel ${JSON.stringify(channel)}: 1-128 of A-Z a-z 0-9 _ - . : @`, {
        op: "subscribe",
        channel,
      });
    }
    if (this.subs.has(channel)) {
      throw new WsfleetError("already_subscribed", `already subscribed to ${channel}; unsubscribe first`, {
        op: "subscribe",
        channel,
      });
    }
    const sub = new SubscriptionImpl(this, channel, opts);
    this.subs.set(channel, sub);
    if (this.isOpen()) this.sendSubscribe(sub);
    return sub;
  }

  /** @internal */
  removeSubscription(sub: SubscriptionImpl): void {
    if (sub.closed) return;
    sub.closed = true;
    this.timers.clearTimeout(sub.retryTimer);
    if (this.subs.get(sub.channel) === sub) this.subs.delete(sub.channel);
    for (const e of this.expected) if (e.sub === sub) e.sub = undefined;
    // The server has (or will have) this subscription on the current connection: end it there.
    // On the next connection it is simply not subscribed again.
    if (sub.state !== "waiting" && this.isOpen()) {
      this.send({ op: "unsubscribe", channel: sub.channel });
      this.expected.push({ op: "unsubscribe", channel: sub.channel, sub: undefined });
    }
    sub.state = "waiting";
  }

  /**
   * Publishes `data` (any JSON value but null) to `channel`.
   *
   * Every publish carries an id of this client's. The promise says only what the client can
   * know when it settles:
   *
   * - resolves (`{ sent: true }`) once the frame was handed to an open connection, at once when
   *   connected, or when a connection opens if it was buffered. This is not proof that it was
   *   published: if that connection drops right after, the outcome is unknown (it may or may not
   *   have reached the bus), and the client never sends it again, so there is no duplicate. If the
   *   server answers `outcome_unknown` (its bus took the publish but never said whether it ran),
   *   the client sends it again on the same connection with the same id, which the bus publishes
   *   at most once, up to three times. If the server's bus refuses it, or the retries run out, an
   *   `error` event with code `bus_unavailable` or `outcome_unknown` and `op: "publish"` follows.
   * - rejects with a {@link WsfleetError} when it was certainly not published: `buffer_full` (the
   *   buffer for disconnected time is at its count or byte limit), `closed` (the client closed
   *   before it was sent), `timeout` (buffered past `publishTimeoutMs`), `invalid_channel`,
   *   `invalid_data`.
   *
   * Publishes are sent in call order, and the server gives one connection's publishes to one
   * channel consecutive offsets in that order.
   */
  publish(channel: string, data: unknown): Promise<PublishResult> {
    if (this._state === "closed") {
      return Promise.reject(new WsfleetError("closed", "the client is closed", { op: "publish", channel }));
    }
    if (!validChannel(channel)) {
      return Promise.reject(
        new WsfleetError("invalid_channel", `channel ${JSON.stringify(channel)}: 1-128 of A-Z a-z 0-9 _ - . : @`, {
          op: "publish",
          channel,
        }),
      );
    }
    let frame: string | undefined;
    const id = `${this.idPrefix}-${(this.idCounter += 1).toString(36)}`;
    try {
      frame = data === null || data === undefined ? undefined : JSON.stringify({ op: "publish", channel, data, id });
    } catch (e) {
      return Promise.reject(new WsfleetError("invalid_data", `data is not JSON: ${e}`, { op: "publish", channel, cause: e }));
    }
    if (frame === undefined || !frame.includes('"data":')) {
      return Promise.reject(new WsfleetError("invalid_data", "data must be a JSON value other than null", { op: "publish", channel }));
    }
    if (this.isOpen() && this.buffer.length === 0) {
      this.sendPublish(id, frame);
      return Promise.resolve({ sent: true, url: this._url! });
    }
    const bytes = utf8Length(frame);
    const maxCount = this.opts.maxBufferedPublishes ?? 1000;
    const maxBytes = this.opts.maxBufferedBytes ?? 1024 * 1024;
    if (this.buffer.length + 1 > maxCount || this.bufferedBytes + bytes > maxBytes) {
      return Promise.reject(
        new WsfleetError(
          "buffer_full",
          `publish buffer full (${this.buffer.length} messages, ${this.bufferedBytes} bytes; limits ${maxCount} and ${maxBytes}): not sent`,
          { op: "publish", channel },
        ),
      );
    }
    return new Promise((resolve, reject) => {
      const item: BufferedPublish = { id, frame, bytes, resolve, reject, timer: undefined };
      const timeout = this.opts.publishTimeoutMs ?? 0;
      if (timeout > 0) {
        item.timer = this.timers.setTimeout(() => {
          const i = this.buffer.indexOf(item);
          if (i < 0) return;
          this.buffer.splice(i, 1);
          this.bufferedBytes -= item.bytes;
          reject(new WsfleetError("timeout", `not sent within ${timeout} ms: not published`, { op: "publish", channel }));
        }, timeout);
      }
      this.buffer.push(item);
      this.bufferedBytes += bytes;
    });
  }

  /** Closes the connection for good: no reconnect; buffered publishes reject with `closed`. */
  close(): void {
    if (this._state === "closed") return;
    this._state = "closed";
    this.timers.clearTimeout(this.reconnectTimer);
    this.timers.clearTimeout(this.connectTimer);
    this.timers.clearTimeout(this.refreshTimer);
    this.reconnectTimer = undefined;
    const ws = this.ws;
    this.ws = undefined;
    if (ws) {
      detach(ws);
      try {
        ws.close(1000, "client closed");
      } catch {
        // already closing
      }
    }
    for (const sub of this.subs.values()) this.timers.clearTimeout(sub.retryTimer);
    for (const p of this.buffer.splice(0)) {
      this.timers.clearTimeout(p.timer);
      p.reject(new WsfleetError("closed", "the client closed before this publish was sent: not published", { op: "publish" }));
    }
    this.bufferedBytes = 0;
    if (ws && this._url) this.emit("disconnected", { url: this._url, code: 1000, reason: "client closed", reconnectInMs: undefined });
    this.emit("closed", undefined);
  }

  /** Read after an await: `close()` may have run meanwhile. */
  private isClosed(): boolean {
    return this._state === "closed";
  }

  private isOpen(): boolean {
    return this._state === "connected" && this.ws !== undefined && this.ws.readyState === OPEN;
  }

  private send(op: object): void {
    this.ws!.send(JSON.stringify(op));
  }

  /** Sends a publish frame and remembers it until the server answers it. */
  private sendPublish(id: string, frame: string): void {
    this.ws!.send(frame);
    this.inFlight.set(id, { frame, retries: 0 });
    const max = this.opts.maxBufferedPublishes ?? 1000;
    if (this.inFlight.size > max) this.inFlight.delete(this.inFlight.keys().next().value!);
  }

  /** One connection attempt: a fresh token, then the socket. */
  private async open(): Promise<void> {
    this.reconnectTimer = undefined;
    const url = this.urls[this.urlIndex % this.urls.length]!;
    this._state = "connecting";
    this._url = url;
    this.emit("connecting", { url, attempt: this.attempt });
    let token = this.opts.token;
    if (this.opts.getToken) {
      try {
        token = await this.opts.getToken();
        if (typeof token !== "string") throw new TypeError(`getToken returned ${typeof token}`);
      } catch (e) {
        if (this.isClosed()) return;
        this.emit("error", new WsfleetError("token_failed", `getToken failed: ${e}`, { cause: e }));
        this.scheduleReconnect(url, 1006, "no token", undefined);
        return;
      }
    }
    if (this.isClosed()) return;
    this.token = token;
    let ws: WebSocketLike;
    try {
      ws = new this.Ws(withToken(url, token));
    } catch (e) {
      this.emit("error", new WsfleetError("closed", `cannot open ${url}: ${e}`, { cause: e }));
      this.scheduleReconnect(url, 1006, String(e), undefined);
      return;
    }
    this.ws = ws;
    this.expected = [];
    const timeout = this.opts.connectTimeoutMs ?? 10_000;
    this.connectTimer = this.timers.setTimeout(() => {
      if (this.ws !== ws || ws.readyState === OPEN) return;
      this.lost(ws, 1006, `not open within ${timeout} ms`);
    }, timeout);
    ws.onopen = () => {
      if (this.ws === ws) this.opened(ws, url);
    };
    ws.onmessage = (ev: { data: unknown }) => {
      if (this.ws === ws) this.onFrame(ev.data);
    };
    ws.onclose = (ev: { code?: number; reason?: string }) => {
      if (this.ws === ws) this.lost(ws, ev.code || 1006, ev.reason || "");
    };
    ws.onerror = () => {
      // Always followed by a close event, which carries what there is to say.
    };
  }

  private opened(ws: WebSocketLike, url: string): void {
    this.timers.clearTimeout(this.connectTimer);
    this._state = "connected";
    this.openedAt = Date.now();
    this.emit("connected", { url });
    if (this.ws !== ws || !this.isOpen()) return; // a listener closed it
    this.authenticated();
    // A `connected` listener may have subscribed already.
    for (const sub of this.subs.values()) if (sub.state === "waiting") this.sendSubscribe(sub);
    while (this.buffer.length > 0 && this.isOpen()) {
      const p = this.buffer.shift()!;
      this.bufferedBytes -= p.bytes;
      this.timers.clearTimeout(p.timer);
      this.sendPublish(p.id, p.frame);
      p.resolve({ sent: true, url });
    }
  }

  /**
   * Schedules the refresh of the connection's token: `refreshLeadMs` before its `exp`, a fresh
   * one from `getToken` goes to the server as `{"op":"refresh"}`. Without it the server closes
   * the connection with 4001 when the token expires (and the client reconnects with a fresh
   * token anyway).
   */
  private authenticated(): void {
    this.timers.clearTimeout(this.refreshTimer);
    const exp = tokenExpiry(this.token);
    const getToken = this.opts.getToken;
    const ws = this.ws;
    if (exp === undefined || !getToken || !ws) return;
    const lead = this.opts.refreshLeadMs ?? 30_000;
    this.refreshTimer = this.timers.setTimeout(async () => {
      if (this.ws !== ws || !this.isOpen()) return;
      let token: string;
      try {
        token = await getToken();
        if (typeof token !== "string") throw new TypeError(`getToken returned ${typeof token}`);
      } catch (e) {
        this.emit("error", new WsfleetError("token_failed", `getToken failed: ${e}`, { cause: e, op: "refresh" }));
        return;
      }
      if (this.ws !== ws || !this.isOpen()) return;
      this.token = token;
      ws.send(JSON.stringify({ op: "refresh", token }));
    }, Math.max(0, exp * 1000 - Date.now() - lead));
  }

  private lost(ws: WebSocketLike, code: number, reason: string): void {
    this.timers.clearTimeout(this.connectTimer);
    this.timers.clearTimeout(this.refreshTimer);
    detach(ws);
    if (ws.readyState !== 3) {
      try {
        ws.close();
      } catch {
        // closing already
      }
    }
    this.ws = undefined;
    this.expected = [];
    // What was in flight is of unknown outcome; it is not sent again (see `publish`).
    this.inFlight.clear();
    const wasOpen = this._state === "connected";
    for (const sub of this.subs.values()) {
      this.timers.clearTimeout(sub.retryTimer);
      sub.state = "waiting";
    }
    if (this._state === "closed") return;
    if (wasOpen && Date.now() - this.openedAt >= (this.opts.stableAfterMs ?? 5000)) this.attempt = 0;
    const hint = (this.opts.reconnectHint ?? defaultHint)(code, reason);
    this.scheduleReconnect(this._url!, code, reason, hint);
  }

  private scheduleReconnect(url: string, code: number, reason: string, hintMs: number | undefined): void {
    const delay = reconnectDelay(this.backoff, this.attempt, code === 1012 || code === 1013 ? code : undefined, this.random, hintMs);
    // After a drain, the server that closed us is the last one to try; after a failure too.
    this.urlIndex = (this.urlIndex + 1) % this.urls.length;
    if (code !== 1012) this.attempt += 1;
    this._state = "disconnected";
    this.emit("disconnected", { url, code, reason, reconnectInMs: delay });
    if ((this._state as ClientState) === "closed") return;
    this.reconnectTimer = this.timers.setTimeout(() => void this.open(), delay);
  }

  private sendSubscribe(sub: SubscriptionImpl): void {
    const op: { op: string; channel: string; since?: Position } = { op: "subscribe", channel: sub.channel };
    if (sub.position) op.since = sub.position;
    this.send(op);
    sub.state = "pending";
    this.expected.push({ op: "subscribe", channel: sub.channel, sub });
  }

  private onFrame(raw: unknown): void {
    const text = typeof raw === "string" ? raw : new TextDecoder().decode(raw as ArrayBuffer);
    let f: any;
    try {
      f = JSON.parse(text);
    } catch {
      return;
    }
    switch (f?.type) {
      case "message":
        return this.onMessage(f);
      case "subscribed":
        return this.onSubscribed(f);
      case "unsubscribed":
        if (!this.takeExpected("unsubscribe", f.channel) && f.reason) this.endedByServer(f.channel, f.reason);
        return;
      case "published":
        this.inFlight.delete(String(f.id));
        return;
      case "gap":
        return this.onGap(f);
      case "refreshed":
        // The new token is in force; its own expiry is the next refresh.
        this.authenticated();
        return;
      case "error":
        return this.onError(f);
    }
  }

  private takeExpected(op: Expected["op"], channel: string): Expected | undefined {
    const i = this.expected.findIndex((e) => e.op === op && e.channel === channel);
    return i < 0 ? undefined : this.expected.splice(i, 1)[0];
  }

  private onSubscribed(f: { channel: string; epoch: string; offset: number; recovered: boolean; reason?: string }): void {
    const exp = this.takeExpected("subscribe", f.channel);
    const sub = exp?.sub;
    if (!sub || sub.closed || sub.state !== "pending") return; // answers a subscription since dropped
    const resumed = sub.answered;
    const requested = sub.position;
    const ev: SubscribedEvent = {
      channel: f.channel,
      epoch: f.epoch,
      offset: f.offset,
      recovered: f.recovered === true,
      resumed,
      ...(f.reason ? { reason: f.reason } : {}),
    };
    sub.state = "active";
    sub.answered = true;
    if (ev.recovered) {
      // The replay follows: everything after `requested`, then live messages.
      sub.position = { epoch: f.epoch, offset: requested?.offset ?? f.offset };
    } else {
      // Nothing is replayed: delivery goes on from the channel's current position.
      sub.position = { epoch: f.epoch, offset: f.offset };
      if (requested) {
        this.discontinuity(sub, {
          channel: sub.channel,
          reason: f.reason ?? "not_recovered",
          previous: requested,
          next: { ...sub.position },
        });
      }
    }
    callSafely(sub.opts.onSubscribed, ev);
    this.emit(resumed ? "resubscribed" : "subscribed", ev);
    sub.resolveReady(ev);
  }

  private onMessage(f: { channel: string; epoch: string; offset: number; data: unknown; encoding?: "base64" }): void {
    const sub = this.subs.get(f.channel);
    // Before its `subscribed` answer a message belongs to an earlier subscription on this
    // connection (the server answers a subscribe before any of its messages).
    if (!sub || sub.state !== "active") return;
    const pos = sub.position;
    if (pos && pos.epoch === f.epoch) {
      if (f.offset <= pos.offset) return; // already delivered: the seam of a resume
      if (f.offset > pos.offset + 1) {
        this.discontinuity(sub, {
          channel: f.channel,
          reason: "offset_skipped",
          previous: { ...pos },
          next: { epoch: f.epoch, offset: f.offset },
        });
      }
    } else if (pos) {
      this.discontinuity(sub, {
        channel: f.channel,
        reason: "epoch_changed",
        previous: { ...pos },
        next: { epoch: f.epoch, offset: f.offset },
      });
    }
    sub.position = { epoch: f.epoch, offset: f.offset };
    const meta: MessageMeta = { channel: f.channel, epoch: f.epoch, offset: f.offset };
    if (f.encoding) meta.encoding = f.encoding;
    callSafely(sub.opts.onMessage, f.data, meta);
  }

  /**
   * The server says offsets `from` to `to` of an epoch will not arrive (its bus lost them). With
   * `to`, that is a discontinuity now, and delivery goes on after `to`; without it (the epoch
   * ended), the next message, in a new epoch, tells.
   */
  private onGap(f: { channel: string; epoch: string; from: number; to?: number; reason?: string }): void {
    const sub = this.subs.get(f.channel);
    const pos = sub?.position;
    if (!sub || sub.state !== "active" || typeof f.to !== "number" || !pos || pos.epoch !== f.epoch || f.to <= pos.offset) return;
    this.discontinuity(sub, {
      channel: f.channel,
      reason: f.reason ?? "history_gap",
      previous: { ...pos },
      next: { epoch: f.epoch, offset: f.to },
    });
    sub.position = { epoch: f.epoch, offset: f.to };
  }

  private discontinuity(sub: SubscriptionImpl, ev: DiscontinuityEvent): void {
    callSafely(sub.opts.onDiscontinuity, ev);
    this.emit("discontinuity", ev);
  }

  /** The server ended a subscription on its own (a refreshed token no longer allows it). */
  private endedByServer(channel: string, reason: string): void {
    const sub = this.subs.get(channel);
    const err = new WsfleetError(reason === "forbidden" ? "forbidden" : "closed", `the server ended the subscription: ${reason}`, {
      fromServer: true,
      op: "subscribe",
      channel,
    });
    if (sub && !sub.closed) {
      sub.closed = true;
      this.subs.delete(channel);
      callSafely(sub.opts.onError, err);
    }
    this.emit("error", err);
  }

  private onError(f: { code: ServerErrorCode; message: string; channel?: string; id?: string }): void {
    const message = String(f.message ?? "");
    // A publish whose outcome the server could not learn: sent again with the same id, which the
    // bus publishes at most once. Reported only when the retries run out.
    const sent = f.id === undefined ? undefined : this.inFlight.get(f.id);
    if (f.id !== undefined) this.inFlight.delete(f.id);
    if (sent && f.code === "outcome_unknown" && sent.retries < MAX_PUBLISH_RETRIES && this.isOpen()) {
      this.ws!.send(sent.frame);
      this.inFlight.set(f.id!, { frame: sent.frame, retries: sent.retries + 1 });
      return;
    }
    if (f.code === "invalid_token") {
      this.emit("error", new WsfleetError(f.code, message, { fromServer: true, op: "refresh" }));
      return;
    }
    // A refusal that names its channel answers that channel's subscribe when one waits, else
    // a publish.
    if (f.code === "forbidden" && f.channel !== undefined && !this.expected.some((e) => e.op === "subscribe" && e.channel === f.channel)) {
      this.emit("error", new WsfleetError(f.code, message, { fromServer: true, op: "publish", channel: f.channel }));
      return;
    }
    if (f.code === "forbidden" && f.channel !== undefined) {
      const i = this.expected.findIndex((e) => e.op === "subscribe" && e.channel === f.channel);
      this.expected.unshift(...this.expected.splice(i, 1));
    }
    // A refused publish, or one whose outcome is unknown: the frame names no message of this
    // client (it sends no publish ids; see `publish`).
    if (message.startsWith("not published") || f.code === "outcome_unknown") {
      this.emit("error", new WsfleetError(f.code, message, { fromServer: true, op: "publish" }));
      return;
    }
    // Otherwise it answers the oldest subscribe or unsubscribe still waiting for its answer.
    const exp = this.expected.shift();
    const err = new WsfleetError(f.code, message, { fromServer: true, op: exp?.op, channel: exp?.channel });
    const sub = exp?.sub;
    if (exp?.op === "subscribe" && sub && !sub.closed && sub.state === "pending") {
      if (RETRIED_SUBSCRIBE_CODES.has(f.code)) {
        // Refused for now (the bus is down, a limit of the server's): try again on this
        // connection, jittered.
        sub.state = "waiting";
        const base = this.opts.subscribeRetryMs ?? 1000;
        sub.retryTimer = this.timers.setTimeout(() => {
          if (!sub.closed && sub.state === "waiting" && this.isOpen()) this.sendSubscribe(sub);
        }, base / 2 + this.random() * base);
      } else {
        // Refused for good (e.g. subscription_limit): the subscription ends.
        sub.closed = true;
        if (this.subs.get(sub.channel) === sub) this.subs.delete(sub.channel);
        callSafely(sub.opts.onError, err);
        sub.rejectReady(err);
      }
    }
    this.emit("error", err);
  }
}

/** Subscribe refusals that may pass later: retried after `subscribeRetryMs`, jittered. */
const RETRIED_SUBSCRIBE_CODES: ReadonlySet<ServerErrorCode> = new Set<ServerErrorCode>([
  "bus_unavailable",
  "rate_limited",
  "channel_limit",
  "timeout",
]);

/**
 * Calls an application callback. Its exception must not break the connection's state machine:
 * it is rethrown on its own (an uncaught error the runtime reports), after the client's step.
 */
function callSafely<A extends unknown[]>(fn: ((...args: A) => void) | undefined, ...args: A): void {
  if (!fn) return;
  try {
    fn(...args);
  } catch (e) {
    globalThis.queueMicrotask(() => {
      throw e;
    });
  }
}

function detach(ws: WebSocketLike): void {
  ws.onopen = null;
  ws.onmessage = null;
  ws.onclose = null;
  ws.onerror = null;
}

function utf8Length(s: string): number {
  let n = 0;
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (c < 0x80) n += 1;
    else if (c < 0x800) n += 2;
    else if (c >= 0xd800 && c <= 0xdbff) {
      n += 4;
      i++;
    } else n += 3;
  }
  return n;
}

/**
 * Connects to a fleet: one URL (a load balancer) or several servers, tried in turn. Returns at
 * once; the client connects in the background and reconnects until {@link Client.close}.
 */
export function connect(urls: string | readonly string[], opts: ConnectOptions = {}): Client {
  return new Client(urls, opts).start();
}
