// One session's live feed over socket.io-client: connect, join (and rejoin with last_seq and
// status_since after every reconnect, which is socket.io-client's own), batches at high rates,
// presence and token refresh when the node speaks protocol 2, and window.testpulse kept current.
import { io } from "socket.io-client";
import { Stream } from "./stream.js";
import { currentToken, onTokenChange } from "./token.js";

const ACK_TIMEOUT_MS = 10000;
const BATCH_MS = 100;
const BATCH_ABOVE_PER_SECOND = 300; // detections/s: above this the page asks for detection_batch
const UNBATCH_BELOW_PER_SECOND = 50; // ... and below this (for UNBATCH_AFTER_SECONDS) it stops
const UNBATCH_AFTER_SECONDS = 10;
// connection_status follows CONNECT at once; a node that does not send it is joined after this.
const GREETING_WAIT_MS = 2000;
// Codes of a refused CONNECT after which retrying later can work (socket.io-client does not retry
// a refused CONNECT by itself).
const TRANSIENT_REFUSALS = new Set(["rate_limited", "server_draining", "unavailable"]);

// The contract's shape, exactly: tests and operators read it.
export function publish(fields) {
  const t = window.testpulse || (window.testpulse = {});
  Object.assign(t, fields);
}

export function initialTestpulse(sessionId) {
  window.testpulse = {
    connection: "reconnecting",
    node: null,
    sessionId,
    status: null,
    lastSeq: 0,
    received: 0,
    gaps: 0,
    duplicates: 0,
  };
}

export class Live {
  constructor(sessionId, { transports, onChange }) {
    this.sessionId = sessionId;
    this.onChange = onChange;
    this.stream = new Stream();
    this.connection = "reconnecting";
    this.node = null;
    this.protocol = 1;
    this.attempt = 0;
    this.nextRetryAt = null;
    this.replaying = null; // {count} while a join's replay is under way
    this.lastReplayed = null;
    this.session = null;
    this.lastChange = null; // {status, previous, actor, at, reason}
    this.statusSince = null;
    this.batched = false;
    this.quietSeconds = 0;
    this.presence = null; // {count, members: Map(sub -> role)}
    this.notice = null; // a message for the user: refused connection, join failure, token
    this.tokenExpiresAt = null;
    this.tokenInUse = currentToken();
    this.joinGeneration = 0;
    this.joinedConnection = null; // the socket id the page has joined on
    this.greetingTimer = null;
    initialTestpulse(sessionId);

    this.socket = io(location.origin, {
      transports,
      auth: (cb) => cb({ token: currentToken() }),
      reconnectionDelay: 500,
      reconnectionDelayMax: 5000,
      timeout: 10000,
    });
    this.watchBackoff();
    this.wire();
    this.stopTokenWatch = onTokenChange((token) => this.tokenChanged(token));
    this.ticker = setInterval(() => this.everySecond(), 1000);
  }

  close() {
    clearInterval(this.ticker);
    clearTimeout(this.greetingTimer);
    this.stopTokenWatch();
    this.socket.close();
  }

  // socket.io-client computes each retry delay (with jitter) in its backoff and emits no event
  // with it: record the delay it returns, so the indicator can count down to the next attempt.
  watchBackoff() {
    const backoff = this.socket.io.backoff;
    if (!backoff || typeof backoff.duration !== "function") return;
    const duration = backoff.duration.bind(backoff);
    backoff.duration = () => {
      const ms = duration();
      this.nextRetryAt = Date.now() + ms;
      this.changed();
      return ms;
    };
  }

  changed() {
    this.onChange();
  }

  setConnection(state) {
    this.connection = state;
    publish({ connection: state, node: state === "connected" ? this.node : window.testpulse.node });
    this.changed();
  }

  wire() {
    const s = this.socket;
    const manager = s.io;
    s.on("connect", () => {
      this.attempt = 0;
      this.nextRetryAt = null;
      this.notice = null;
      this.tokenInUse = currentToken();
      this.setConnection("connected");
      // The join waits for connection_status: only its `protocol` says whether this node takes
      // `presence: true`, and a join without it gets no presence_update for this connection.
      const connectionId = s.id;
      clearTimeout(this.greetingTimer);
      this.greetingTimer = setTimeout(() => this.joinOnce(connectionId), GREETING_WAIT_MS);
    });
    s.on("connection_status", (d) => {
      this.node = d && d.node ? String(d.node) : null;
      this.protocol = Number((d && d.protocol) || 1);
      this.tokenExpiresAt = (d && d.token_expires_at) || null;
      if (this.protocol < 2) this.presence = null;
      publish({ node: this.node });
      this.changed();
      this.joinOnce(s.id);
    });
    s.on("disconnect", (reason) => {
      this.replaying = null;
      this.setConnection(s.active ? "reconnecting" : "offline");
      if (!s.active) this.notice = this.notice || `disconnected by the server (${reason})`;
    });
    s.on("connect_error", (err) => {
      const code = err && err.data && err.data.code;
      if (s.active) {
        this.setConnection("reconnecting");
        return;
      }
      // The server refused this CONNECT: socket.io-client will not try again by itself.
      this.notice = `connection refused: ${code || "error"}: ${err && err.message}`;
      if (TRANSIENT_REFUSALS.has(code)) {
        this.attempt += 1;
        const ms = Math.min(5000, 500 * 2 ** Math.min(this.attempt, 4));
        this.nextRetryAt = Date.now() + ms;
        this.setConnection("reconnecting");
        setTimeout(() => s.connected || s.connect(), ms);
      } else {
        this.setConnection("offline");
      }
    });
    manager.on("reconnect_attempt", (attempt) => {
      this.attempt = attempt;
      this.nextRetryAt = null;
      this.setConnection("reconnecting");
    });
    manager.on("reconnect_failed", () => this.setConnection("offline"));
    s.on("error", (e) => {
      if (!e) return;
      if (e.reconnect === "refresh") this.notice = "the token expired: paste a fresh one to reconnect";
      else if (e.reconnect === "no") this.notice = `${e.code}: ${e.message}`;
      else if (e.code && e.event) this.notice = `${e.event}: ${e.code}: ${e.message}`;
      this.changed();
    });
    s.on("detection_event", (d) => this.detections([d]));
    s.on("detection_batch", (b) => b && b.session_id === this.sessionId && this.detections(b.items || []));
    s.on("test_session_update", (u) => this.statusUpdate(u));
    s.on("presence_update", (p) => this.presenceUpdate(p));
    s.on("token_expiring", (t) => this.tokenExpiring(t));
  }

  detections(items) {
    const now = Date.now();
    let shown = 0;
    for (const d of items) {
      if (d && d.session_id === this.sessionId && this.stream.add(d, now)) shown += 1;
    }
    if (this.replaying) this.replaying.count += shown;
    const st = this.stream;
    publish({ lastSeq: st.lastSeq, received: st.received, gaps: st.gaps, duplicates: st.duplicates });
  }

  holdStatusSince(at) {
    // The node writes one ISO 8601 format, so its times compare as strings.
    if (typeof at === "string" && (this.statusSince === null || at > this.statusSince)) this.statusSince = at;
  }

  statusUpdate(u) {
    if (!u || u.session_id !== this.sessionId) return;
    if (this.statusSince !== null && typeof u.updated_at === "string" && u.updated_at <= this.statusSince) return;
    this.holdStatusSince(u.updated_at);
    const reason = this.pendingReason && u.status === "stopped" ? this.pendingReason : null;
    this.lastChange = { status: u.status, previous: u.previous_status, actor: u.actor, at: u.updated_at, reason };
    if (this.session) this.session = { ...this.session, status: u.status, updated_at: u.updated_at };
    publish({ status: u.status });
    this.changed();
  }

  joinOnce(connectionId) {
    const s = this.socket;
    if (this.joinedConnection === connectionId || !s.connected || s.id !== connectionId) return;
    this.joinedConnection = connectionId;
    clearTimeout(this.greetingTimer);
    this.join(connectionId);
  }

  async join(connectionId, { sameConnection = false } = {}) {
    const s = this.socket;
    const generation = ++this.joinGeneration;
    while (s.connected && s.id === connectionId && generation === this.joinGeneration) {
      const request = { session_id: this.sessionId, last_seq: this.stream.lastSeq };
      if (this.statusSince !== null) request.status_since = this.statusSince;
      if (this.batched) request.batch_ms = BATCH_MS;
      if (this.protocol >= 2) request.presence = true;
      this.replaying = { count: 0 };
      this.stream.expectRepeats = sameConnection;
      this.changed();
      let ack;
      try {
        ack = await s.timeout(ACK_TIMEOUT_MS).emitWithAck("join_session", request);
      } catch {
        continue; // no ack in time: ask again on this connection (a new one would rejoin anyway)
      }
      if (generation !== this.joinGeneration) return;
      this.stream.expectRepeats = false;
      if (ack && ack.ok) {
        this.lastReplayed = Number(ack.replayed || 0);
        this.replaying = null;
        this.session = ack.session;
        this.holdStatusSince(ack.session && ack.session.updated_at);
        publish({ status: ack.session ? ack.session.status : null });
        if (this.protocol >= 2) this.loadPresence();
        this.changed();
        return;
      }
      const code = ack && ack.error ? ack.error.code : "bad_ack";
      if (code === "insufficient_state") {
        // This store does not have the position the page holds (a restored database): drop what
        // is shown and start over from the beginning of the session.
        this.clear();
        continue;
      }
      this.replaying = null;
      this.notice = `join_session: ${code}: ${ack && ack.error ? ack.error.message : ""}`;
      this.changed();
      if (code !== "unavailable" && code !== "rate_limited" && code !== "internal") return;
      await new Promise((r) => setTimeout(r, 1000));
    }
  }

  clear() {
    this.stream.reset();
    this.statusSince = null;
    this.lastChange = null;
    publish({ lastSeq: 0, received: 0 });
  }

  everySecond() {
    const rate = this.stream.recentRate(Date.now());
    if (!this.batched && rate > BATCH_ABOVE_PER_SECOND) this.switchBatching(true);
    else if (this.batched && rate < UNBATCH_BELOW_PER_SECOND) {
      this.quietSeconds += 1;
      if (this.quietSeconds >= UNBATCH_AFTER_SECONDS) this.switchBatching(false);
    } else this.quietSeconds = 0;
    this.changed();
  }

  // A join on the same connection replaces the membership (server/realtime/feeds.py): the node replays
  // from the page's last_seq, so detections in flight meanwhile arrive twice and are expected.
  switchBatching(on) {
    this.batched = on;
    this.quietSeconds = 0;
    if (this.socket.connected && !this.replaying) this.join(this.socket.id, { sameConnection: true });
  }

  async control(action, extra = {}) {
    if (action === "stop") this.pendingReason = extra.reason || null;
    try {
      const ack = await this.socket
        .timeout(ACK_TIMEOUT_MS)
        .emitWithAck(`${action}_test_session`, { session_id: this.sessionId, ...extra });
      if (ack && ack.ok) return null;
      return ack && ack.error ? `${ack.error.code}: ${ack.error.message}` : "no answer";
    } catch {
      return "no answer in time";
    }
  }

  async loadPresence() {
    try {
      const ack = await this.socket.timeout(ACK_TIMEOUT_MS).emitWithAck("get_presence", { session_id: this.sessionId });
      if (!ack || !ack.ok) return;
      const members = new Map(ack.presence.members.map((m) => [m.sub, m.role]));
      this.presence = { count: ack.presence.count, members, truncated: ack.presence.truncated };
      this.changed();
    } catch {
      /* presence is a nicety: the next presence_update fills it in */
    }
  }

  presenceUpdate(p) {
    if (!p || p.session_id !== this.sessionId) return;
    const members = this.presence ? this.presence.members : new Map();
    for (const m of p.left || []) members.delete(m.sub);
    for (const m of p.joined || []) members.set(m.sub, m.role);
    this.presence = { count: p.count, members, truncated: this.presence && this.presence.truncated };
    this.changed();
  }

  tokenExpiring(t) {
    this.tokenExpiresAt = t && t.expires_at;
    const fresh = currentToken();
    if (fresh && fresh !== this.tokenInUse) this.refresh(fresh);
    else this.notice = `the token expires in ${Math.round((t && t.in_seconds) || 0)} s: paste a fresh one`;
    this.changed();
  }

  async refresh(token) {
    try {
      const ack = await this.socket.timeout(ACK_TIMEOUT_MS).emitWithAck("refresh_token", { token });
      if (ack && ack.ok) {
        this.tokenInUse = token;
        this.tokenExpiresAt = ack.expires_at;
        this.notice = null;
      } else {
        this.notice = `refresh_token: ${ack && ack.error ? ack.error.code : "refused"}`;
      }
    } catch {
      this.notice = "refresh_token: no answer in time";
    }
    this.changed();
  }

  tokenChanged(token) {
    if (!token) return;
    if (this.socket.connected) {
      if (this.protocol >= 2 && token !== this.tokenInUse) this.refresh(token);
      // Protocol 1: the new token is used at the next connect (auth is read at every attempt).
    } else if (!this.socket.active) {
      this.notice = null;
      this.socket.connect();
    }
  }
}
