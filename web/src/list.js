// GET /: every session the token may see, refreshed every two seconds, and (for operators) a form
// that creates and starts a session.
import { html } from "htm/preact";
import { useEffect, useRef, useState } from "preact/hooks";
import { api, Header, time, TokenForm } from "./common.js";
import { currentToken, mayControl, onTokenChange } from "./token.js";
import { publish, initialTestpulse } from "./live.js";

const REFRESH_MS = 2000;

export function SessionList() {
  const [token, setTokenState] = useState(currentToken());
  const [sessions, setSessions] = useState(null);
  const [error, setError] = useState(null);
  const activity = useRef(new Map()); // id -> [last_seq, when the page saw it change]

  useEffect(() => onTokenChange(setTokenState), []);
  useEffect(() => {
    initialTestpulse(null);
    if (!token) return undefined;
    let stopped = false;
    let timer = null;
    const load = async () => {
      try {
        const data = await api("/api/sessions");
        const now = new Date().toISOString();
        for (const s of data.sessions) {
          const seen = activity.current.get(s.id);
          if (!seen || seen[0] !== s.last_seq) activity.current.set(s.id, [s.last_seq, seen ? now : null]);
        }
        if (!stopped) {
          setSessions(data.sessions);
          setError(null);
          publish({ connection: "connected" });
        }
      } catch (e) {
        if (!stopped) setError(String(e.message || e));
        publish({ connection: "reconnecting" });
      }
      if (!stopped) timer = setTimeout(load, REFRESH_MS);
    };
    load();
    return () => {
      stopped = true;
      clearTimeout(timer);
    };
  }, [token]);

  if (!token) return html`<${Header} /><main><${TokenForm} /></main>`;
  const lastActivity = (s) => {
    const seen = activity.current.get(s.id);
    const changed = seen && seen[1];
    return changed && changed > s.updated_at ? changed : s.updated_at;
  };
  const ordered = (sessions || []).slice().sort((a, b) => (lastActivity(b) > lastActivity(a) ? 1 : -1));
  return html`<${Header}>Sessions<//>
    <main>
      ${mayControl(token) && html`<${CreateForm} />`}
      ${error && html`<p class="error" role="alert">${error}</p>`}
      ${sessions === null
        ? html`<p>Loading sessions…</p>`
        : html`<table class="sessions">
            <caption>
              ${sessions.length} sessions, refreshed every ${REFRESH_MS / 1000} s
            </caption>
            <thead>
              <tr><th scope="col">Session</th><th scope="col">Status</th><th scope="col">Last seq</th><th scope="col">Last activity</th></tr>
            </thead>
            <tbody>
              ${ordered.map(
                (s) => html`<tr key=${s.id}>
                  <td><a href=${`/sessions/${encodeURIComponent(s.id)}`}>${s.name || s.id}</a> <small>${s.id}</small></td>
                  <td><span class=${`status status-${s.status}`}>${s.status}</span></td>
                  <td class="num">${s.last_seq}</td>
                  <td>${time(lastActivity(s))}</td>
                </tr>`,
              )}
            </tbody>
          </table>`}
    </main>`;
}

function CreateForm() {
  const [name, setName] = useState("");
  const [error, setError] = useState(null);
  const [busy, setBusy] = useState(false);
  const submit = async (e) => {
    e.preventDefault();
    setBusy(true);
    setError(null);
    try {
      const created = await api("/api/sessions", { method: "POST", body: { name } });
      const id = created.session.id;
      await api(`/api/sessions/${encodeURIComponent(id)}/start`, { method: "POST" });
      location.assign(`/sessions/${encodeURIComponent(id)}`);
    } catch (err) {
      setError(String(err.message || err));
      setBusy(false);
    }
  };
  return html`<form class="create" onSubmit=${submit}>
    <label for="new-name">New session</label>
    <input id="new-name" maxlength="200" placeholder="name" value=${name} onInput=${(e) => setName(e.target.value)} />
    <button type="submit" disabled=${busy}>Create and start</button>
    ${error && html`<span class="error" role="alert">${error}</span>`}
  </form>`;
}
