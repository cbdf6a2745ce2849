// The baseline: the broadcast server of the article wsfleet grew from, written fresh. One
// process: a `ws` server; every message a client sends is published to Redis with `ioredis`;
// every message from Redis is sent to every local client with `forEach`. Cluster-wide through
// Redis, no order guarantees, no history, no backpressure: exactly the seed's architecture.
//
//   node server.js <port> <redis-port>
'use strict';
const { WebSocketServer, WebSocket } = require('ws');
const Redis = require('ioredis');

const port = Number(process.argv[2]);
const redisPort = Number(process.argv[3]);
if (!port || !redisPort) {
  console.error('usage: node server.js <port> <redis-port>');
  process.exit(2);
}

const publisher = new Redis({ host: '127.0.0.1', port: redisPort });
const subscriber = new Redis({ host: '127.0.0.1', port: redisPort });
subscriber.subscribe('broadcast');
subscriber.on('message', (_channel, message) => {
  wss.clients.forEach((client) => {
    if (client.readyState === WebSocket.OPEN) {
      client.send(message);
    }
  });
});

const wss = new WebSocketServer({ host: '127.0.0.1', port, backlog: 65535 });
wss.on('connection', (ws) => {
  ws.on('message', (message) => publisher.publish('broadcast', message));
});
wss.on('listening', () => console.error(`listening port=${port}`));
process.on('SIGTERM', () => process.exit(0));
