// What the page holds of one session's detection stream: the latest rows, the integrity counters
// and the numbers the charts draw. Pure (no socket, no DOM), so its rules are easy to check.
export const MAX_ROWS = 5000; // the table keeps the latest rows only: memory stays bounded at any rate
export const RATE_WINDOW_SECONDS = 60;
export const CONFIDENCE_BINS = 10;

export class Stream {
  constructor() {
    this.reset();
  }

  reset() {
    this.rows = new Array(MAX_ROWS);
    this.head = 0; // index of the next write
    this.size = 0;
    this.lastSeq = 0;
    this.received = 0;
    this.gaps = 0;
    this.duplicates = 0;
    // While a rejoin on the same connection replays from a position the page already passed (a
    // switch to batches), the re-sent seqs are expected and are not duplicates.
    this.expectRepeats = false;
    this.histogram = new Array(CONFIDENCE_BINS).fill(0);
    this.labels = new Map();
    this.perSecond = new Map(); // unix second -> detections shown
    this.version = 0;
  }

  // Returns true when the detection was shown (not a repeat).
  add(d, nowMs) {
    const seq = Number(d.seq);
    if (!(seq > this.lastSeq)) {
      if (!this.expectRepeats) this.duplicates += 1;
      return false;
    }
    if (seq !== this.lastSeq + 1) this.gaps += 1;
    this.lastSeq = seq;
    this.received += 1;
    const received = Date.parse(d.received_at);
    const row = {
      seq,
      label: String(d.label),
      confidence: Number(d.confidence),
      frame: d.frame,
      bbox: d.bbox,
      latency: typeof d.ts === "number" && !Number.isNaN(received) ? received - d.ts : null,
    };
    this.rows[this.head] = row;
    this.head = (this.head + 1) % MAX_ROWS;
    if (this.size < MAX_ROWS) this.size += 1;
    const bin = Math.min(CONFIDENCE_BINS - 1, Math.max(0, Math.floor(row.confidence * CONFIDENCE_BINS)));
    this.histogram[bin] += 1;
    this.labels.set(row.label, (this.labels.get(row.label) || 0) + 1);
    const second = Math.floor(nowMs / 1000);
    this.perSecond.set(second, (this.perSecond.get(second) || 0) + 1);
    this.version += 1;
    return true;
  }

  // The i-th newest row (0 = newest).
  newest(i) {
    if (i >= this.size) return undefined;
    return this.rows[(this.head - 1 - i + MAX_ROWS) % MAX_ROWS];
  }

  // [seconds[], counts[]] for the last RATE_WINDOW_SECONDS complete seconds; older ones are dropped.
  rateSeries(nowMs) {
    const current = Math.floor(nowMs / 1000);
    const xs = [];
    const ys = [];
    for (let s = current - RATE_WINDOW_SECONDS; s < current; s++) {
      xs.push(s);
      ys.push(this.perSecond.get(s) || 0);
    }
    for (const s of this.perSecond.keys()) if (s < current - RATE_WINDOW_SECONDS) this.perSecond.delete(s);
    return [xs, ys];
  }

  recentRate(nowMs) {
    const current = Math.floor(nowMs / 1000);
    return Math.max(this.perSecond.get(current - 1) || 0, this.perSecond.get(current - 2) || 0);
  }

  topLabels(n) {
    return [...this.labels.entries()].sort((a, b) => b[1] - a[1] || (a[0] < b[0] ? -1 : 1)).slice(0, n);
  }
}
