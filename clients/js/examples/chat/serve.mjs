#!/usr/bin/env node
// Serves the chat demo and the built package (no bundler: the page imports ../../dist/index.js)
// on loopback, and tells the page which servers to use through config.json.
//
//   node examples/chat/serve.mjs --port 8090 ws://127.0.0.1:8081 ws://127.0.0.1:8082
//
// Prints one line, "chat demo: http://127.0.0.1:PORT/examples/chat/", once it listens
// (--port 0 picks a free port).
import { createServer } from "node:http";
import { readFile } from "node:fs/promises";
import path from "node:path";
import { fileURLToPath } from "node:url";

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const TYPES = { ".html": "text/html", ".js": "text/javascript", ".mjs": "text/javascript", ".map": "application/json", ".json": "application/json", ".css": "text/css" };

const args = process.argv.slice(2);
let port = 8090;
const servers = [];
for (let i = 0; i < args.length; i++) {
  if (args[i] === "--port") port = Number(args[++i]);
  else servers.push(args[i]);
}

const http = createServer(async (req, res) => {
  const url = new URL(req.url, "http://localhost");
  if (url.pathname === "/") {
    res.writeHead(302, { location: "/examples/chat/" }).end();
    return;
  }
  if (url.pathname === "/examples/chat/config.json") {
    res.writeHead(200, { "content-type": "application/json" }).end(JSON.stringify({ servers }));
    return;
  }
  const rel = path.normalize(decodeURIComponent(url.pathname)).replace(/^([/\\])+/, "");
  const file = path.join(ROOT, rel.endsWith("/") || rel === "" ? path.join(rel, "index.html") : rel);
  if (!file.startsWith(ROOT + path.sep) || !(rel.startsWith("examples/") || rel.startsWith("dist/"))) {
    res.writeHead(404).end("not found\n");
    return;
  }
  try {
    const body = await readFile(file);
    res.writeHead(200, { "content-type": TYPES[path.extname(file)] ?? "application/octet-stream", "cache-control": "no-store" }).end(body);
  } catch {
    res.writeHead(404).end("not found\n");
  }
});
http.listen(port, "127.0.0.1", () => {
  console.log(`chat demo: http://127.0.0.1:${http.address().port}/examples/chat/`);
});
for (const sig of ["SIGINT", "SIGTERM"]) process.on(sig, () => http.close(() => process.exit(0)));
