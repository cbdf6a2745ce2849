// A fake WebSocket and fake timers: the client's state machine driven step by step, no network.

export class FakeSocket {
  static all = [];
  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.sent = [];
    this.onopen = this.onmessage = this.onclose = this.onerror = null;
    FakeSocket.all.push(this);
  }
  static reset() {
    FakeSocket.all = [];
  }
  static last() {
    return FakeSocket.all[FakeSocket.all.length - 1];
  }
  send(data) {
    if (this.readyState !== 1) throw new Error("send on a socket that is not open");
    this.sent.push(JSON.parse(data));
  }
  close() {
    this.readyState = 3;
  }
  // Server side.
  open() {
    this.readyState = 1;
    this.onopen?.({});
  }
  frame(obj) {
    this.onmessage?.({ data: JSON.stringify(obj) });
  }
  drop(code = 1006, reason = "") {
    this.readyState = 3;
    this.onclose?.({ code, reason });
  }
  ops(op) {
    return this.sent.filter((f) => f.op === op);
  }
}

export class FakeTimers {
  constructor() {
    this.now = 0;
    this.queue = [];
    this.seq = 0;
  }
  setTimeout = (fn, ms) => {
    const t = { fn, at: this.now + ms, id: ++this.seq };
    this.queue.push(t);
    return t;
  };
  clearTimeout = (t) => {
    if (t) this.queue = this.queue.filter((x) => x !== t);
  };
  /** The delay of the next pending timer from now. */
  next() {
    const t = [...this.queue].sort((a, b) => a.at - b.at || a.id - b.id)[0];
    return t ? t.at - this.now : undefined;
  }
  async advance(ms) {
    const until = this.now + ms;
    for (;;) {
      const due = this.queue.filter((t) => t.at <= until).sort((a, b) => a.at - b.at || a.id - b.id)[0];
      if (!due) break;
      this.queue = this.queue.filter((t) => t !== due);
      this.now = due.at;
      due.fn();
      await flush();
    }
    this.now = until;
  }
}

export const flush = () => new Promise((r) => setImmediate(r));

export function msg(channel, epoch, offset, data = offset) {
  return { type: "message", channel, epoch, offset, data };
}
