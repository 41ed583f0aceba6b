// The TestExecution page: `/` lists the sessions, `/sessions/{id}` is one session live.
import { render } from "preact";
import { html } from "htm/preact";
import { SessionList } from "./list.js";
import { LiveView } from "./view.js";
import { takeTokenFromFragment } from "./token.js";
import "./style.css";

takeTokenFromFragment();
window.addEventListener("hashchange", () => takeTokenFromFragment());

function transportsFromLocation() {
  // `?transport=polling` keeps the page on long-polling (proxies that block WebSocket, and tests).
  const wanted = new URLSearchParams(location.search).get("transport");
  if (wanted === "polling") return ["polling"];
  if (wanted === "websocket") return ["websocket"];
  return ["polling", "websocket"];
}

const match = location.pathname.match(/^\/sessions\/([^/]{1,64})\/?$/);
const root = document.getElementById("app");
root.textContent = "";
if (match) {
  render(html`<${LiveView} sessionId=${decodeURIComponent(match[1])} transports=${transportsFromLocation()} />`, root);
} else {
  render(html`<${SessionList} />`, root);
}
