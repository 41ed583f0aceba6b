// Drives Debian's chromium (headless) with playwright-core for tests/browser and the page benchmark.
//
// One JSON command a line on stdin, one JSON answer a line on stdout ({"id", "ok", "result"|"error"}):
//   {"id":1,"cmd":"open","page":"p1","url":"http://..."}        a new browser context (own sessionStorage)
//   {"id":2,"cmd":"eval","page":"p1","js":"() => window.testpulse"}   the function's JSON result
//   {"id":3,"cmd":"click","page":"p1","selector":"button[data-action=pause]"}
//   {"id":4,"cmd":"fill","page":"p1","selector":"#stop-reason","value":"done"}
//   {"id":5,"cmd":"press","page":"p1","key":"Tab"}
//   {"id":6,"cmd":"screenshot","page":"p1","path":"/tmp/x.png"}
//   {"id":7,"cmd":"problems","page":"p1"}     console errors, page errors, failed requests so far
//   {"id":11,"cmd":"traffic","page":"p1"}    every request and WebSocket URL and every console message so far
//   {"id":8,"cmd":"metrics","page":"p1"}      CDP Performance.getMetrics (TaskDuration, JSHeapUsedSize, ...)
//   {"id":9,"cmd":"close","page":"p1"}  {"id":10,"cmd":"quit"}
// The browser is never downloaded: CHROMIUM (default /usr/bin/chromium) is the system's.
import { chromium } from "playwright-core";
import { createInterface } from "node:readline";

const ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ARGS,
});
const pages = new Map(); // name -> {page, context, problems, cdp}

function out(obj) {
  process.stdout.write(JSON.stringify(obj) + "\n");
}

async function open(name, url, viewport) {
  const context = await browser.newContext({ viewport: viewport || { width: 1280, height: 1000 } });
  const page = await context.newPage();
  const entry = { page, context, problems: [], cdp: null, urls: [], console: [] };
  page.on("request", (req) => entry.urls.push(req.url()));
  page.on("websocket", (ws) => entry.urls.push(ws.url()));
  page.on("console", (msg) => {
    entry.console.push(`${msg.type()}: ${msg.text()}`);
    if (msg.type() !== "error" && msg.type() !== "warning") return;
    const where = msg.location() && msg.location().url ? ` (${msg.location().url.split("#")[0]})` : "";
    entry.problems.push(`console.${msg.type()}: ${msg.text()}${where}`);
  });
  page.on("pageerror", (err) => entry.problems.push(`pageerror: ${err.message}`));
  page.on("requestfailed", (req) => {
    // A long-poll cut by a node kill is the outage under test, not a page defect.
    if (!req.url().includes("/socket.io/")) entry.problems.push(`requestfailed: ${req.url()} ${req.failure()?.errorText}`);
  });
  pages.set(name, entry);
  await page.goto(url, { waitUntil: "load" });
  return null;
}

async function handle(msg) {
  const entry = pages.get(msg.page);
  switch (msg.cmd) {
    case "open":
      return open(msg.page, msg.url, msg.viewport);
    case "eval":
      return entry.page.evaluate(`(${msg.js})()`);
    case "click":
      await entry.page.click(msg.selector, { timeout: 10000 });
      return null;
    case "fill":
      await entry.page.fill(msg.selector, msg.value, { timeout: 10000 });
      return null;
    case "press":
      await entry.page.keyboard.press(msg.key);
      return null;
    case "screenshot":
      await entry.page.screenshot({ path: msg.path, fullPage: true });
      return msg.path;
    case "problems":
      return entry.problems;
    case "traffic":
      return { urls: entry.urls, console: entry.console };
    case "metrics": {
      if (!entry.cdp) {
        entry.cdp = await entry.context.newCDPSession(entry.page);
        await entry.cdp.send("Performance.enable");
      }
      const { metrics } = await entry.cdp.send("Performance.getMetrics");
      return Object.fromEntries(metrics.map((m) => [m.name, m.value]));
    }
    case "close":
      await entry.context.close();
      pages.delete(msg.page);
      return null;
    case "quit":
      await browser.close();
      out({ id: msg.id, ok: true, result: null });
      process.exit(0);
    default:
      throw new Error(`unknown command ${msg.cmd}`);
  }
}

// Commands run one after another, in the order they came.
let queue = Promise.resolve();
const lines = createInterface({ input: process.stdin });
lines.on("line", (line) => {
  if (!line.trim()) return;
  const msg = JSON.parse(line);
  queue = queue.then(async () => {
    try {
      out({ id: msg.id, ok: true, result: (await handle(msg)) ?? null });
    } catch (err) {
      out({ id: msg.id, ok: false, error: String((err && err.stack) || err) });
    }
  });
});
lines.on("close", () => {
  queue = queue.then(async () => {
    await browser.close();
    process.exit(0);
  });
});
out({ type: "ready" });
