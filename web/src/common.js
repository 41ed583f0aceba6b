// Small pieces both views use: the token gate, HTTP with the token in a header, time formatting.
import { html } from "htm/preact";
import { useState } from "preact/hooks";
import { currentToken, forgetToken, setToken, claims } from "./token.js";

export async function api(path, { method = "GET", body } = {}) {
  const headers = { Authorization: `Bearer ${currentToken()}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = data.error || {};
    throw new Error(`${error.code || response.status}: ${error.message || response.statusText}`);
  }
  return data;
}

export function time(iso) {
  if (!iso) return "—";
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? String(iso) : d.toLocaleTimeString([], { hour12: false });
}

export function TokenForm({ onDone, message }) {
  const [value, setValue] = useState("");
  const submit = (e) => {
    e.preventDefault();
    setToken(value);
    setValue("");
    onDone && onDone();
  };
  return html`<form class="token-form" onSubmit=${submit}>
    <p>${message || "This page needs a token. Open a link made by `testpulse token --url …`, or paste one."}</p>
    <label for="token-input">Token</label>
    <input id="token-input" type="password" autocomplete="off" value=${value} onInput=${(e) => setValue(e.target.value)} />
    <button type="submit" disabled=${!value.trim()}>Use token</button>
  </form>`;
}

export function Header({ children }) {
  const token = currentToken();
  const who = token ? claims(token) : {};
  return html`<header class="top">
    <a class="brand" href="/">testpulse</a>
    <span class="crumbs">${children}</span>
    ${token &&
    html`<span class="who">${who.sub || "?"} (${who.role || "?"})
      <button class="link" type="button" onClick=${() => { forgetToken(); location.reload(); }}>forget token</button></span>`}
  </header>`;
}
