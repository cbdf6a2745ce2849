// Records what a client delivers and tells, for assertions.
import { waitUntil } from "./fleet.js";

export function record(client, channel, opts = {}) {
  const r = { messages: [], events: [], sub: undefined };
  for (const e of ["connecting", "connected", "disconnected", "subscribed", "resubscribed", "discontinuity", "error"]) {
    client.on(e, (ev) => r.events.push({ event: e, ...(ev instanceof Error ? { code: ev.code, message: ev.message, op: ev.op, channel: ev.channel, fromServer: ev.fromServer } : ev) }));
  }
  if (channel) {
    r.sub = client.subscribe(channel, { ...opts, onMessage: (data, meta) => r.messages.push({ data, ...meta }) });
  }
  r.offsets = () => r.messages.map((m) => m.offset);
  r.data = () => r.messages.map((m) => m.data);
  r.of = (name) => r.events.filter((e) => e.event === name);
  r.waitFor = (what, f, ms = 15_000) => waitUntil(what, f, ms);
  return r;
}
