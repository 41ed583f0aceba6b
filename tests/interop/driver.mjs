// Drives the official socket.io-client v4 against a testpulse cluster for tests/interop.
//
// Config: one JSON object, as argv[2] or as the first line of stdin:
//   {url, viewer_token, detector_token, session_id,
//    viewers: [{name, transports, url?, token?, presence?}], // transports: ["websocket"], ["polling"], or ["polling","websocket"];
//                                              // url/token override the shared ones; presence: join with presence: true
//    publish: {rate, transports, pad_bytes} | null,
//    options: {reconnectionDelay, reconnectionDelayMax, timeout, ackTimeout}}
// Commands, one JSON object a line on stdin:
//   {"cmd":"report","id":n,"full":bool}   -> {"type":"report","id":n,...}
//   {"cmd":"start_publishing"} {"cmd":"stop_publishing"}
//   {"cmd":"pause_reading","viewer":"v3"} {"cmd":"resume_reading","viewer":"v3"}
//   {"cmd":"emit","viewer":"v1","event":"refresh_token","payload":{...}} -> the ack as {"type":"ack",...,"answer":ack}
//   {"cmd":"quit"}
// Output: line-delimited JSON on stdout ({"type":"ready"}, reports, {"type":"ack","cmd":...}).
//
// Reconnection is socket.io-client's own, always: this script never calls connect() again after a
// disconnect. What the tests measure is whether the server lets the real client come back.

import { io } from "socket.io-client";
import { createInterface } from "node:readline";

const lines = createInterface({ input: process.stdin });
let configured = null;
lines.on("line", (line) => {
  if (!line.trim()) return;
  if (configured === null) start(JSON.parse(line));
  else handle(line);
});
lines.on("close", () => shutdown());

function out(obj) {
  process.stdout.write(JSON.stringify(obj) + "\n");
}

function now() {
  return Number(process.hrtime.bigint() / 1000000n);
}

function clientOptions(config, transports, token) {
  const o = config.options || {};
  return {
    forceNew: true, // one Engine.IO connection per client, like separate browser tabs
    transports,
    auth: { token },
    reconnectionDelay: o.reconnectionDelay ?? 200,
    reconnectionDelayMax: o.reconnectionDelayMax ?? 2000,
    timeout: o.timeout ?? 5000,
  };
}

class Viewer {
  constructor(config, spec) {
    this.name = spec.name;
    this.sessionId = config.session_id;
    this.ackTimeout = (config.options || {}).ackTimeout ?? 5000;
    this.seqs = [];
    this.last = 0; // the highest seq held: what a rejoin asks to continue from
    this.duplicates = 0;
    this.disorder = 0;
    this.statuses = [];
    this.statusAt = null; // updated_at of the latest status change held: what a rejoin asks to continue from
    this.errors = [];
    this.disconnects = [];
    this.connectErrors = [];
    this.nodes = [];
    this.connects = 0;
    this.joins = [];
    this.joinFailures = [];
    this.reconnectAttempts = 0;
    this.paused = false;
    this.presence = !!spec.presence;
    this.presenceUpdates = [];
    this.tokenExpiring = [];
    this.socket = io(spec.url || config.url, clientOptions(config, spec.transports, spec.token || config.viewer_token));
    const s = this.socket;
    s.on("connect", () => {
      this.connects += 1;
      this.join(s.id);
    });
    s.on("connection_status", (d) => this.nodes.push(String(d && d.node)));
    s.on("detection_event", (d) => this.onDetection(d));
    s.on("presence_update", (d) => this.presenceUpdates.push(d));
    s.on("token_expiring", (d) => this.tokenExpiring.push(d));
    s.on("test_session_update", (d) => {
      if (d && d.session_id === this.sessionId) {
        this.statuses.push(d.status);
        this.holdStatusAt(d.updated_at);
      }
    });
    s.on("error", (d) => this.errors.push({ at: now(), code: d && d.code, reconnect: d && d.reconnect, message: d && d.message }));
    s.on("disconnect", (reason) => this.disconnects.push({ at: now(), reason: String(reason) }));
    s.on("connect_error", (err) => this.connectErrors.push({ at: now(), message: String(err && err.message), data: err && err.data }));
    s.io.on("reconnect_attempt", () => (this.reconnectAttempts += 1));
  }

  onDetection(d) {
    if (!d || d.session_id !== this.sessionId) return;
    const seq = Number(d.seq);
    if (this.seqs.includes(seq)) this.duplicates += 1;
    else if (seq !== this.last + 1) this.disorder += 1;
    this.seqs.push(seq);
    if (seq > this.last) this.last = seq;
  }

  holdStatusAt(at) {
    // ISO 8601 times in the node's one format compare as strings.
    if (typeof at === "string" && (this.statusAt === null || at > this.statusAt)) this.statusAt = at;
  }

  // A join is part of the application's protocol (rejoin with last_seq on every connect); a join
  // whose ack does not come is asked again on the same connection, never by reconnecting.
  async join(connectionId) {
    const s = this.socket;
    while (s.connected && s.id === connectionId) {
      const lastSeq = this.last;
      try {
        const request = { session_id: this.sessionId, last_seq: lastSeq };
        if (this.statusAt !== null) request.status_since = this.statusAt;
        if (this.presence) request.presence = true;
        const ack = await s.timeout(this.ackTimeout).emitWithAck("join_session", request);
        if (ack && ack.ok) {
          if (ack.session) this.holdStatusAt(ack.session.updated_at);
          const status = ack.session ? ack.session.status : null;
          this.joins.push({ at: now(), last_seq: lastSeq, replayed: ack.replayed, status, node: this.nodes[this.nodes.length - 1] });
          return;
        }
        this.joinFailures.push(ack && ack.error ? ack.error.code : "bad ack");
      } catch (err) {
        this.joinFailures.push("timeout");
      }
      await sleep(200);
    }
  }

  transportSocket() {
    const transport = this.socket.io.engine && this.socket.io.engine.transport;
    return transport && transport.ws && transport.ws._socket;
  }

  pauseReading() {
    const tcp = this.transportSocket();
    if (!tcp) throw new Error(`${this.name}: not on a websocket transport`);
    this.paused = true;
    this.pausedSocket = tcp;
    tcp.pause();
  }

  resumeReading() {
    this.paused = false;
    if (this.pausedSocket) this.pausedSocket.resume();
    this.pausedSocket = null;
  }

  report(full) {
    const engine = this.socket.io.engine;
    const r = {
      name: this.name,
      connected: this.socket.connected,
      active: this.socket.active,
      transport: engine && engine.transport ? engine.transport.name : null,
      connects: this.connects,
      node: this.nodes[this.nodes.length - 1] ?? null,
      nodes: this.nodes,
      count: this.seqs.length,
      last: this.last,
      duplicates: this.duplicates,
      disorder: this.disorder,
      statuses: this.statuses,
      errors: this.errors,
      disconnects: this.disconnects,
      connect_errors: this.connectErrors.slice(-5),
      connect_error_count: this.connectErrors.length,
      joins: this.joins.length,
      last_join: this.joins[this.joins.length - 1] ?? null,
      join_failures: this.joinFailures.slice(-5),
      reconnect_attempts: this.reconnectAttempts,
      paused: this.paused,
      presence_updates: this.presenceUpdates,
      token_expiring: this.tokenExpiring,
    };
    if (full) r.seqs = this.seqs;
    return r;
  }
}

class Detector {
  constructor(config) {
    const p = config.publish;
    this.sessionId = config.session_id;
    this.interval = 1000 / (p.rate || 20);
    this.ackTimeout = (config.options || {}).ackTimeout ?? 5000;
    this.pad = p.pad_bytes ? "x".repeat(p.pad_bytes) : null;
    this.runId = `${process.pid}-${now()}`;
    this.acked = [];
    this.refusals = {};
    this.disconnects = [];
    this.errors = [];
    this.nodes = [];
    this.connects = 0;
    this.attempts = 0;
    this.publishing = false;
    this.loop = null;
    this.socket = io(config.url, clientOptions(config, p.transports || ["websocket"], config.detector_token));
    const s = this.socket;
    s.on("connect", () => (this.connects += 1));
    s.on("connection_status", (d) => this.nodes.push(String(d && d.node)));
    s.on("disconnect", (reason) => this.disconnects.push({ at: now(), reason: String(reason) }));
    s.on("error", (d) => this.errors.push({ at: now(), code: d && d.code, reconnect: d && d.reconnect }));
  }

  start() {
    if (this.publishing) return;
    this.publishing = true;
    this.loop = this.run();
  }

  async stop() {
    this.publishing = false;
    if (this.loop) await this.loop;
  }

  refused(code) {
    this.refusals[code] = (this.refusals[code] || 0) + 1;
  }

  // One detection at a time; a failed or unanswered one is sent again with the same `id`, so a
  // server with idempotent publish stores it once however often it is retried.
  async run() {
    let i = 0;
    while (this.publishing) {
      i += 1;
      const detection = { session_id: this.sessionId, id: `${this.runId}-${i}`, label: `js-${i}`, confidence: 0.5, frame: i, ts: Date.now() };
      if (this.pad) detection.attributes = { pad: this.pad };
      while (this.publishing) {
        if (!this.socket.connected) {
          await this.connected();
          continue;
        }
        this.attempts += 1;
        try {
          const ack = await this.socket.timeout(this.ackTimeout).emitWithAck("publish_detection", detection);
          if (ack && ack.ok) {
            this.acked.push(Number(ack.seq));
            break;
          }
          this.refused(ack && ack.error ? ack.error.code : "bad ack");
        } catch (err) {
          this.refused("timeout");
        }
        await sleep(100);
      }
      await sleep(this.interval);
    }
  }

  connected() {
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(timer);
        this.socket.off("connect", done);
        resolve();
      };
      const timer = setTimeout(done, 200); // so that stop_publishing is noticed while offline
      this.socket.once("connect", done);
    });
  }

  report(full) {
    const r = {
      connected: this.socket.connected,
      active: this.socket.active,
      connects: this.connects,
      node: this.nodes[this.nodes.length - 1] ?? null,
      acked_count: this.acked.length,
      last_acked: this.acked[this.acked.length - 1] ?? 0,
      attempts: this.attempts,
      refusals: this.refusals,
      disconnects: this.disconnects,
      errors: this.errors,
      publishing: this.publishing,
    };
    if (full) r.acked = this.acked;
    return r;
  }
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

let viewers = [];
let detector = null;

function start(config) {
  configured = config;
  viewers = (config.viewers || []).map((spec) => new Viewer(config, spec));
  if (config.publish) {
    detector = new Detector(config);
    if (config.publish.start !== false) detector.start();
  }
  out({ type: "ready" });
}

function viewerNamed(name) {
  const v = viewers.find((x) => x.name === name);
  if (!v) throw new Error(`no viewer ${name}`);
  return v;
}

async function handle(line) {
  let cmd;
  try {
    cmd = JSON.parse(line);
  } catch (err) {
    out({ type: "problem", message: `not JSON: ${line}` });
    return;
  }
  try {
    switch (cmd.cmd) {
      case "report":
        out({ type: "report", id: cmd.id ?? null, at: now(), viewers: viewers.map((v) => v.report(!!cmd.full)), detector: detector ? detector.report(!!cmd.full) : null });
        return;
      case "start_publishing":
        detector.start();
        break;
      case "stop_publishing":
        await detector.stop();
        break;
      case "pause_reading":
        viewerNamed(cmd.viewer).pauseReading();
        break;
      case "resume_reading":
        viewerNamed(cmd.viewer).resumeReading();
        break;
      case "emit": {
        const v = viewerNamed(cmd.viewer);
        const answer = await v.socket.timeout(v.ackTimeout).emitWithAck(cmd.event, cmd.payload);
        out({ type: "ack", cmd: cmd.cmd, id: cmd.id ?? null, answer });
        return;
      }
      case "quit":
        return shutdown();
      default:
        throw new Error(`unknown command ${cmd.cmd}`);
    }
    out({ type: "ack", cmd: cmd.cmd, id: cmd.id ?? null });
  } catch (err) {
    out({ type: "ack", cmd: cmd.cmd, id: cmd.id ?? null, error: String(err && err.message) });
  }
}

let stopping = false;
function shutdown() {
  if (stopping) return;
  stopping = true;
  if (detector) detector.publishing = false;
  for (const v of viewers) v.socket.close();
  if (detector) detector.socket.close();
  setTimeout(() => process.exit(0), 100);
}

if (process.argv[2]) start(JSON.parse(process.argv[2]));
