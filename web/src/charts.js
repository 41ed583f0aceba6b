// Live charts with uPlot (canvas, made for streaming series): detections per second and a
// confidence histogram. Counts per label are plain bars in the DOM: text a screen reader can read.
import uPlot from "uplot";
import "uplot/dist/uPlot.min.css";
import { CONFIDENCE_BINS } from "./stream.js";

const WIDTH = 380;
const HEIGHT = 170;

export function rateChart(target) {
  return new uPlot(
    {
      width: WIDTH,
      height: HEIGHT,
      title: "Detections per second",
      legend: { show: false },
      cursor: { show: false },
      scales: { y: { range: (_u, _min, max) => [0, Math.max(10, max * 1.1)] } },
      series: [{}, { label: "detections/s", stroke: "#2563eb", fill: "rgba(37,99,235,0.12)", width: 1.5 }],
      axes: [{ values: (_u, ticks) => ticks.map((t) => new Date(t * 1000).toISOString().slice(14, 19)) }, {}],
    },
    [[], []],
    target,
  );
}

const bins = Array.from({ length: CONFIDENCE_BINS }, (_, i) => i / CONFIDENCE_BINS);

export function histogramChart(target) {
  return new uPlot(
    {
      width: WIDTH,
      height: HEIGHT,
      title: "Confidence",
      legend: { show: false },
      cursor: { show: false },
      scales: { x: { time: false, range: [0, 1] }, y: { range: (_u, _min, max) => [0, Math.max(1, max * 1.1)] } },
      series: [
        {},
        {
          label: "detections",
          fill: "rgba(16,185,129,0.6)",
          stroke: "#059669",
          paths: uPlot.paths.bars({ size: [0.9], align: 1 }),
          points: { show: false },
        },
      ],
    },
    [bins, new Array(CONFIDENCE_BINS).fill(0)],
    target,
  );
}

export function histogramData(histogram) {
  return [bins, histogram.slice()];
}
