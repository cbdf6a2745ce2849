/**
 * Pure: how long to wait before the next connection attempt.
 *
 * Full jitter (a uniformly random delay between 0 and an exponentially growing cap, the cap
 * bounded by `maxMs`), so a fleet's worth of clients that lost their server at the same moment
 * do not all come back at the same moment. Close codes change the rule:
 *
 * - 1012 (the server drains): come back at once (a small jitter, or the server's hint when it
 *   sends one), to another server. The server already paces its closes.
 * - 1013 (try again later: this client read too slowly, or the bus is down): back off, and never
 *   less than `tryAgainLaterMinMs`.
 * - anything else (a failed attempt, a crash, 1006): the exponential rule.
 */

export interface BackoffOptions {
  /** Cap of the first delay, in ms (default 250). */
  initialMs?: number;
  /** Largest delay, in ms (default 15000). */
  maxMs?: number;
  /** Growth of the cap per failed attempt (default 2). */
  multiplier?: number;
  /** Largest random delay after a 1012 close without a hint, in ms (default 100). */
  drainJitterMs?: number;
  /** Least delay after a 1013 close, in ms (default 1000). */
  tryAgainLaterMinMs?: number;
}

export type ResolvedBackoff = Required<BackoffOptions>;

export function resolveBackoff(o: BackoffOptions = {}): ResolvedBackoff {
  const r = {
    initialMs: o.initialMs ?? 250,
    maxMs: o.maxMs ?? 15_000,
    multiplier: o.multiplier ?? 2,
    drainJitterMs: o.drainJitterMs ?? 100,
    tryAgainLaterMinMs: o.tryAgainLaterMinMs ?? 1000,
  };
  if (!(r.initialMs > 0 && r.maxMs >= r.initialMs && r.multiplier >= 1 && r.drainJitterMs >= 0 && r.tryAgainLaterMinMs >= 0)) {
    throw new RangeError("backoff: need 0 < initialMs <= maxMs, multiplier >= 1, drainJitterMs >= 0, tryAgainLaterMinMs >= 0");
  }
  return r;
}

/** The cap of the `attempt`-th retry (0-based): `min(maxMs, initialMs * multiplier^attempt)`. */
export function backoffCap(b: ResolvedBackoff, attempt: number): number {
  return Math.min(b.maxMs, b.initialMs * Math.pow(b.multiplier, Math.max(0, attempt)));
}

/** The largest reconnect hint a wsfleet server sends (a 16-bit count of milliseconds). */
export const MAX_SERVER_HINT_MS = 65_535;

/**
 * The delay before the next attempt after a close with `code` (undefined: the attempt failed
 * before a connection was open). `random` returns a number in [0, 1); `hintMs` is the server's
 * reconnect hint, if it sent one.
 */
export function reconnectDelay(
  b: ResolvedBackoff,
  attempt: number,
  code: number | undefined,
  random: () => number,
  hintMs?: number,
): number {
  if (code === 1012) {
    // The fleet's pacing: followed as given (up to the largest hint a server sends), not cut
    // to this client's own `maxMs`, which would bring every late-hinted client back together.
    if (hintMs !== undefined && hintMs >= 0) return Math.min(hintMs, MAX_SERVER_HINT_MS);
    return Math.floor(random() * b.drainJitterMs);
  }
  const jittered = Math.floor(random() * backoffCap(b, attempt));
  if (code === 1013) return Math.min(b.maxMs, Math.max(b.tryAgainLaterMinMs, jittered));
  return jittered;
}
