// The Node.js baseline: socket.io v4 with @socket.io/redis-adapter, the stock server's events and
// nothing more (loadtests/bench/stock_server.py is the reference; keep the two alike).
//
// socket.io's defaults, no authentication, no database:
// - `join_session {session_id}` enters the room `session:<id>` and acks {ok: true, session, replayed: 0};
// - `publish_detection {...}` takes a seq from Redis (INCR per session, the same key as the stock
//   server, so seqs are cluster-wide), emits `detection_event` to the room and acks {ok: true, seq};
// - `publish_detections {session_id, detections}` does the same for a batch (INCRBY).
//
// Run as `NODE_BASELINE_REDIS_URL=redis://... NODE_BASELINE_NODE_ID=node1 node server.js --port P`.
// `GET /health` answers 200; `GET /stats` reports connected clients and, for the routing comparison,
// how many messages this node read from Redis, how many came from other nodes, how many of those
// were for rooms with no member here, and how many the adapter decoded. The counting wraps the
// adapter's message handler and changes nothing else.

import http from "node:http";
import { parseArgs } from "node:util";

import { RedisAdapter } from "@socket.io/redis-adapter";
import { createClient } from "redis";
import { Server } from "socket.io";

const { values: args } = parseArgs({
  options: { host: { type: "string", default: "127.0.0.1" }, port: { type: "string" } },
});
if (!args.port) {
  console.error("usage: node server.js --port P [--host H]");
  process.exit(2);
}
const REDIS_URL = process.env.NODE_BASELINE_REDIS_URL || "redis://127.0.0.1:6379/0";
const NODE_ID = process.env.NODE_BASELINE_NODE_ID || "node";

const stats = { clients: 0, redis_received: 0, remote_emits: 0, remote_emits_unwatched: 0, redis_decoded: 0 };

// msgpack of [uid, packet, opts] (the adapter's default parser) starts with fixarray(3), fixstr(6),
// then the 6-character uid: whose message it is can be told without decoding it (decoding here would
// add work that the plain adapter does not do).
const UID_AT = 2;

class CountingRedisAdapter extends RedisAdapter {
  // socket.io constructs the adapter of each namespace itself (`new Adapter(nsp)`).
  constructor(nsp) {
    super(nsp, pubClient, subClient);
  }

  onmessage(pattern, channel, msg) {
    stats.redis_received += 1;
    const name = channel.toString();
    const room = name.startsWith(this.channel) ? name.slice(this.channel.length, -1) : "";
    const watched = room === "" || this.rooms.has(room);
    if (watched) stats.redis_decoded += 1; // the adapter skips unknown rooms before decoding
    if (msg.toString("latin1", UID_AT, UID_AT + this.uid.length) !== this.uid) {
      stats.remote_emits += 1;
      if (!watched) stats.remote_emits_unwatched += 1;
    }
    return super.onmessage(pattern, channel, msg);
  }
}

const pubClient = createClient({ url: REDIS_URL });
const subClient = pubClient.duplicate();
// The seq counter has its own connection, like the stock server's pool beside its manager's.
const seqClient = pubClient.duplicate();
for (const client of [pubClient, subClient, seqClient]) {
  client.on("error", (err) => console.error(`redis: ${err.message}`));
}
await Promise.all([pubClient.connect(), subClient.connect(), seqClient.connect()]);

const httpServer = http.createServer((req, res) => {
  const path = (req.url || "").split("?")[0];
  let status = 200;
  let body;
  if (path === "/health") body = { status: "healthy" };
  else if (path === "/stats") body = { node: NODE_ID, ...stats };
  else [status, body] = [404, { error: "not found" }];
  res.writeHead(status, { "content-type": "application/json" });
  res.end(JSON.stringify(body));
});

const io = new Server(httpServer, {
  cors: { origin: "*" },
  adapter: CountingRedisAdapter,
});

function event(sessionId, seq, item, receivedAt) {
  return {
    session_id: sessionId,
    seq,
    label: item.label ?? null,
    confidence: item.confidence ?? null,
    bbox: item.bbox ?? null,
    frame: item.frame ?? null,
    ts: item.ts ?? null,
    attributes: item.attributes ?? null,
    received_at: receivedAt,
  };
}

// A handler that throws sends no ack, as python-socketio does when the stock handler raises.
function handle(socket, name, handler) {
  socket.on(name, async (data, ack) => {
    try {
      const answer = await handler(data);
      if (typeof ack === "function") ack(answer);
    } catch (err) {
      console.error(`${name}: ${err.message}`);
    }
  });
}

io.on("connection", (socket) => {
  stats.clients += 1;
  socket.on("disconnect", () => {
    stats.clients -= 1;
  });

  handle(socket, "join_session", async (data) => {
    const sessionId = String(data.session_id);
    socket.join(`session:${sessionId}`);
    return { ok: true, session: { id: sessionId }, replayed: 0 };
  });

  handle(socket, "publish_detection", async (data) => {
    const sessionId = String(data.session_id);
    const seq = Number(await seqClient.incr(`stock:seq:${sessionId}`));
    io.to(`session:${sessionId}`).emit("detection_event", event(sessionId, seq, data, new Date().toISOString()));
    return { ok: true, seq };
  });

  handle(socket, "publish_detections", async (data) => {
    const sessionId = String(data.session_id);
    const items = Array.from(data.detections);
    const last = Number(await seqClient.incrBy(`stock:seq:${sessionId}`, items.length));
    const first = last - items.length + 1;
    const receivedAt = new Date().toISOString();
    const room = io.to(`session:${sessionId}`);
    items.forEach((item, offset) => room.emit("detection_event", event(sessionId, first + offset, item, receivedAt)));
    return { ok: true, first_seq: first, last_seq: last };
  });
});

httpServer.listen(Number(args.port), args.host);

// SIGTERM (how the benchmark stops a node): close the clients' connections and Redis, then exit;
// a second signal, or a close that hangs, exits at once.
let stopping = false;
process.on("SIGTERM", () => {
  if (stopping) process.exit(0);
  stopping = true;
  setTimeout(() => process.exit(0), 5000).unref();
  io.close(() => {
    Promise.allSettled([pubClient.quit(), subClient.quit(), seqClient.quit()]).then(() => process.exit(0));
  });
});
