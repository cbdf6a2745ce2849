// Compiled (never run) by the unit tests: the published types accept the WebSocket of browsers
// and of the `ws` package, and the API reads as the README shows it.
import WebSocket from "ws";
import { connect, WsfleetError, type Position, type Subscription } from "../../dist/index.js";

const node = connect(["ws://10.0.0.1:8080", "ws://10.0.0.2:8080"], { WebSocket, getToken: async () => "jwt" });
const browser = connect("wss://chat.example.com", { WebSocket: globalThis.WebSocket, token: "jwt" });
const stored: Position = { epoch: "e", offset: 7 };
const sub: Subscription = node.subscribe("lobby", {
  since: stored,
  onMessage: (data: unknown, meta) => console.log(meta.channel, meta.epoch, meta.offset, meta.encoding, data),
  onDiscontinuity: (d) => console.log(d.reason, d.previous, d.next),
});
void sub.ready.then((s) => console.log(s.recovered, s.reason));
const off = node.on("disconnected", (e) => console.log(e.code, e.reason, e.reconnectInMs));
node.on("error", (e: WsfleetError) => console.log(e.code, e.fromServer, e.op, e.channel));
node.publish("lobby", { text: "hi" }).then(
  (r) => console.log(r.sent, r.url),
  (e: WsfleetError) => console.log(e.code === "buffer_full"),
);
off();
sub.unsubscribe();
node.close();
browser.close();
