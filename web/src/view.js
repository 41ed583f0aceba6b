// GET /sessions/{id}: one session live. Rendering is throttled (RENDER_MS): detections only update
// the Stream and window.testpulse, so the main thread keeps up with thousands per second.
import { html } from "htm/preact";
import { useEffect, useRef, useState } from "preact/hooks";
import { Header, time, TokenForm } from "./common.js";
import { Live } from "./live.js";
import { currentToken, mayControl, onTokenChange } from "./token.js";
import { histogramChart, histogramData, rateChart } from "./charts.js";

const RENDER_MS = 250;
const ROW_HEIGHT = 24;
const TABLE_HEIGHT = 432;

export function LiveView({ sessionId, transports }) {
  const [token, setTokenState] = useState(currentToken());
  const [live, setLive] = useState(null);
  const [, setFrame] = useState(0);

  useEffect(() => onTokenChange(setTokenState), []);
  // One Live for as long as there is a token: a new token goes to the Live's own listener (sent
  // with refresh_token on protocol 2, used at the next connect before), so it must not close and
  // recreate the connection, which would drop the feed the refresh is meant to keep.
  const hasToken = Boolean(token);
  useEffect(() => {
    if (!hasToken) return undefined;
    let dirty = true;
    const created = new Live(sessionId, { transports, onChange: () => (dirty = true) });
    let version = -1;
    const timer = setInterval(() => {
      if (dirty || created.stream.version !== version) {
        dirty = false;
        version = created.stream.version;
        setFrame((n) => n + 1);
      }
    }, RENDER_MS);
    setLive(created);
    return () => {
      clearInterval(timer);
      created.close();
      setLive(null);
    };
  }, [hasToken]);

  if (!token) return html`<${Header}>${sessionId}<//><main><${TokenForm} /></main>`;
  if (!live) return html`<${Header}>${sessionId}<//><main><p>Connecting…</p></main>`;
  const session = live.session;
  return html`<${Header}><a href="/">Sessions</a> / ${session ? session.name || sessionId : sessionId}<//>
    <main class="live">
      <section class="bar" aria-label="connection and integrity">
        <${Indicator} live=${live} />
        <${Integrity} stream=${live.stream} />
      </section>
      ${live.notice && html`<p class="notice" role="alert">${live.notice}</p>`}
      ${live.notice && /token/.test(live.notice) && html`<${TokenForm} message="Paste a fresh token:" />`}
      <section class="status-row">
        <${Status} live=${live} />
        ${mayControl(token) && html`<${Controls} live=${live} />`}
        ${live.protocol >= 2 && live.presence && html`<${Presence} presence=${live.presence} />`}
      </section>
      <section class="charts" aria-label="charts">
        <${Charts} live=${live} />
        <${Labels} stream=${live.stream} />
      </section>
      <${DetectionTable} stream=${live.stream} />
    </main>`;
}

function Indicator({ live }) {
  let text;
  if (live.connection === "connected") text = `connected to ${live.node || "…"}`;
  else if (live.connection === "reconnecting") {
    const wait = live.nextRetryAt ? Math.max(0, Math.ceil((live.nextRetryAt - Date.now()) / 1000)) : null;
    text = `reconnecting (attempt ${live.attempt}${wait !== null ? `, next in ${wait} s` : ""})`;
  } else text = "offline";
  return html`<span class=${`conn conn-${live.connection}`} role="status" aria-live="polite" data-testid="connection">
    ${text}${live.replaying && live.connection === "connected" ? html` · <b>replaying ${live.replaying.count} missed</b>` : ""}
  </span>`;
}

function Integrity({ stream }) {
  return html`<dl class="integrity">
    <dt>last seq</dt><dd data-testid="last-seq">${stream.lastSeq}</dd>
    <dt>shown</dt><dd>${stream.received}</dd>
    <dt>gaps</dt><dd class=${stream.gaps ? "bad" : ""}>${stream.gaps}</dd>
    <dt>duplicates</dt><dd class=${stream.duplicates ? "bad" : ""}>${stream.duplicates}</dd>
  </dl>`;
}

function Status({ live }) {
  const status = live.session ? live.session.status : null;
  const change = live.lastChange;
  return html`<div class="status-box">
    <span class=${`status status-${status}`} data-testid="status">${status || "…"}</span>
    ${change
      ? html`<span class="change">${change.previous} → ${change.status} by ${change.actor} at ${time(change.at)}${
          change.reason ? html`: “${change.reason}”` : ""
        }</span>`
      : live.session && html`<span class="change">since ${time(live.session.updated_at)}</span>`}
  </div>`;
}

const ACTIONS = {
  created: ["start"],
  running: ["pause", "stop"],
  paused: ["resume", "stop"],
  stopped: [],
};

function Controls({ live }) {
  const [error, setError] = useState(null);
  const [reason, setReason] = useState("");
  const [busy, setBusy] = useState(false);
  const status = live.session ? live.session.status : null;
  const act = async (action) => {
    setBusy(true);
    setError(null);
    const failed = await live.control(action, action === "stop" && reason ? { reason } : {});
    setBusy(false);
    if (failed) setError(`${action}: ${failed}`);
    else if (action === "stop") setReason("");
  };
  // Every verb is offered (those the state machine allows first): a refused one shows its error.
  const allowed = ACTIONS[status] || [];
  return html`<div class="controls" role="group" aria-label="operator controls" data-testid="controls">
    ${["start", "pause", "resume", "stop"].map(
      (action) => html`<button type="button" data-action=${action} class=${allowed.includes(action) ? "primary" : ""}
        disabled=${busy || live.connection !== "connected"} onClick=${() => act(action)}>${action}</button>`,
    )}
    <label for="stop-reason" class="sr-only">reason for stopping</label>
    <input id="stop-reason" maxlength="500" placeholder="reason (stop)" value=${reason} onInput=${(e) => setReason(e.target.value)} />
    ${error && html`<span class="error" role="alert" data-testid="control-error">${error}</span>`}
  </div>`;
}

function Presence({ presence }) {
  const members = [...presence.members.entries()].sort((a, b) => (a[0] < b[0] ? -1 : 1));
  return html`<div class="presence" data-testid="presence">
    <b>${presence.count} watching</b>
    <ul>${members.slice(0, 20).map(([sub, role]) => html`<li key=${sub}>${sub} <small>${role}</small></li>`)}</ul>
  </div>`;
}

function Charts({ live }) {
  const rateBox = useRef(null);
  const histBox = useRef(null);
  const charts = useRef(null);
  useEffect(() => {
    charts.current = { rate: rateChart(rateBox.current), hist: histogramChart(histBox.current), second: 0 };
    return () => {
      charts.current.rate.destroy();
      charts.current.hist.destroy();
    };
  }, []);
  useEffect(() => {
    const c = charts.current;
    if (!c) return;
    const now = Date.now();
    const second = Math.floor(now / 1000);
    if (second !== c.second) {
      c.second = second;
      c.rate.setData(live.stream.rateSeries(now));
    }
    c.hist.setData(histogramData(live.stream.histogram));
  });
  return html`<div class="chart" ref=${rateBox} role="img" aria-label="detections per second, last minute"></div>
    <div class="chart" ref=${histBox} role="img" aria-label="confidence histogram"></div>`;
}

function Labels({ stream }) {
  const top = stream.topLabels(8);
  const max = top.length ? top[0][1] : 1;
  return html`<div class="labels"><h2>Counts per label</h2>
    <ol>
      ${top.map(
        ([label, count]) => html`<li key=${label}>
          <span class="label-name">${label}</span>
          <meter min="0" max=${max} value=${count}></meter>
          <span class="num">${count}</span>
        </li>`,
      )}
    </ol></div>`;
}

// Only the rows in view are in the DOM, whatever the stream holds (up to MAX_ROWS).
function DetectionTable({ stream }) {
  const [top, setTop] = useState(0);
  const first = Math.floor(top / ROW_HEIGHT);
  const count = Math.ceil(TABLE_HEIGHT / ROW_HEIGHT) + 2;
  const rows = [];
  for (let i = first; i < Math.min(stream.size, first + count); i++) rows.push([i, stream.newest(i)]);
  return html`<section class="detections">
    <h2>Latest detections <small>(newest first, ${stream.size} held)</small></h2>
    <div class="thead" role="row">
      <span>seq</span><span>label</span><span>confidence</span><span>frame</span><span>bbox</span><span>latency</span>
    </div>
    <div class="viewport" tabindex="0" role="table" aria-label="latest detections, newest first" aria-rowcount=${stream.size}
      onScroll=${(e) => setTop(e.currentTarget.scrollTop)}>
      <div class="spacer" style=${{ height: `${stream.size * ROW_HEIGHT}px` }}>
        ${rows.map(
          ([i, r]) => html`<div class="row" role="row" aria-rowindex=${i + 1} key=${r.seq} style=${{ transform: `translateY(${i * ROW_HEIGHT}px)` }}>
            <span class="num">${r.seq}</span><span>${r.label}</span><span class="num">${r.confidence.toFixed(3)}</span>
            <span class="num">${r.frame ?? "—"}</span><span>${r.bbox ? r.bbox.map((v) => Math.round(v)).join(", ") : "—"}</span>
            <span class="num">${r.latency === null ? "—" : `${Math.round(r.latency)} ms`}</span>
          </div>`,
        )}
      </div>
    </div>
  </section>`;
}
