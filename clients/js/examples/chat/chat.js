// The demo: one chat channel across the fleet. Servers come from `?servers=ws://a,ws://b` or
// from config.json (written by serve.mjs); `?start=N` picks the server to try first (pages
// spread over the fleet), `?name=` and `?channel=` name the user and the room.
// The server does not tell a client which server it is, so each message carries the URL its
// sender was connected to.
import { connect } from "../../dist/index.js";

const params = new URLSearchParams(location.search);
const name = params.get("name") || `guest-${Math.floor(Math.random() * 1000)}`;
const channel = params.get("channel") || "lobby";
const $ = (id) => document.getElementById(id);

async function servers() {
  const listed = params.get("servers");
  if (listed) return listed.split(",").filter(Boolean);
  const res = await fetch("config.json");
  if (!res.ok) throw new Error("no servers: pass ?servers=ws://host:port,... or serve the page with serve.mjs");
  return (await res.json()).servers;
}

function log(text, warn = false) {
  const li = document.createElement("li");
  li.textContent = `${new Date().toISOString().slice(11, 23)} ${text}`;
  if (warn) li.className = "warn";
  $("events").append(li);
  li.scrollIntoView({ block: "nearest" });
}

function setStatus(state, url) {
  $("status").className = state;
  $("status").textContent = url ? `${state}: ${url}` : state;
}

function show(data, meta) {
  const li = document.createElement("li");
  const part = (cls, text) => {
    const span = document.createElement("span");
    span.className = cls;
    span.textContent = text;
    li.append(span);
  };
  part("offset", `#${meta.offset}`);
  part("from", String(data.from ?? "?"));
  part("via", `via ${String(data.server ?? "?").replace(/^ws:\/\/|\/ws$/g, "")}`);
  li.append(document.createTextNode(String(data.text ?? JSON.stringify(data))));
  $("messages").append(li);
  li.scrollIntoView({ block: "nearest" });
}

const list = await servers();
const start = Number(params.get("start") ?? Math.floor(Math.random() * list.length)) % list.length;
const urls = [...list.slice(start), ...list.slice(0, start)];
$("me").textContent = name;
$("channel").textContent = channel;

const client = connect(urls);
const chat = { client, name, messages: [], events: [] };
window.chat = chat;

client.on("connecting", (e) => setStatus("connecting", e.url));
client.on("connected", (e) => {
  setStatus("connected", e.url);
  chat.events.push({ event: "connected", url: e.url });
  log(`connected to ${e.url}`);
});
client.on("disconnected", (e) => {
  setStatus("disconnected", e.url);
  chat.events.push({ event: "disconnected", code: e.code, url: e.url });
  const why = e.code === 1012 ? "the server drains" : e.code === 1013 ? "try again later" : e.reason || "connection lost";
  log(`closed ${e.code} (${why}); reconnecting in ${e.reconnectInMs} ms`, true);
});
client.on("subscribed", (e) => {
  chat.events.push({ event: "subscribed", epoch: e.epoch, offset: e.offset });
  log(`subscribed to ${e.channel} at offset ${e.offset}`);
});
client.on("resubscribed", (e) => {
  chat.events.push({ event: "resubscribed", recovered: e.recovered, reason: e.reason });
  log(e.recovered ? `resumed ${e.channel}: nothing missed` : `resumed ${e.channel}: messages were lost (${e.reason})`, !e.recovered);
});
client.on("discontinuity", (e) => log(`continuity lost on ${e.channel}: ${e.reason}`, true));
client.on("error", (e) => log(`error ${e.code}: ${e.message}`, true));

client.subscribe(channel, {
  onMessage: (data, meta) => {
    chat.messages.push({ ...data, offset: meta.offset, epoch: meta.epoch });
    show(data, meta);
  },
});

chat.send = (text) => client.publish(channel, { from: name, text, server: client.url });

$("send").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("text").value.trim();
  if (!text) return;
  $("text").value = "";
  chat.send(text).catch((e) => log(`not sent: ${e.code} ${e.message}`, true));
});
