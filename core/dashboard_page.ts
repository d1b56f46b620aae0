// The one HTML page behind `aha dashboard` (live: it polls the server) and `aha report` (static:
// the runs' records are embedded). uPlot's script and stylesheet, and the page's own, are text
// imports: they travel inside the module graph, so `deno run`, `deno bundle` and `deno compile`
// all serve them with no network and no file read of aha's own sources at run time.

import uplotScript from "uplot/dist/uPlot.iife.min.js" with { type: "text" };
import uplotStyle from "uplot/dist/uPlot.min.css" with { type: "text" };
import pageScript from "./dashboard_page.js" with { type: "text" };
import pageStyle from "./dashboard_page.css" with { type: "text" };
import type { LogName, LogRecord } from "./run_logs.ts";

/** A slice of one log: its records from index `from`; `generation` changes when it restarts. */
export interface LogSlice {
  generation: number;
  from: number;
  records: LogRecord[];
}

/** What the page receives about one run (a poll's update, or everything in a report). */
export interface RunUpdate {
  dir: string;
  name: string;
  phrases?: string[];
  config?: string | null;
  metrics?: LogSlice;
  eval?: LogSlice;
  samples?: LogSlice;
}

export interface PageData {
  runs: RunUpdate[];
  written?: string;
}

export type { LogName };

/** Text safe inside a <script> element (no `</script>`, no `<!--`). */
const scriptSafe = (text: string) => text.replace(/<(?=\/script|!--)/gi, "\\x3C");

const escapeHtml = (text: string) =>
  text.replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]!);

/** The page; with `data` it is a self-contained report, without it the live dashboard. */
export function dashboardPage(title: string, data: PageData | null = null): string {
  const embedded = data === null
    ? ""
    : `<script>window.AHA_DATA = ${JSON.stringify(data).replace(/</g, "\\u003c")};</script>\n`;
  return `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>${escapeHtml(title)}</title>
<style>${uplotStyle}</style>
<style>${pageStyle}</style>
</head>
<body>
<header>
  <h1>${escapeHtml(title)}</h1>
  <span id="runs"></span>
  <label>x axis <select id="x-axis"><option value="step">step</option>` +
    `<option value="wall">wall time</option></select></label>
  <label>smoothing <input id="smoothing" type="range" min="0" max="0.99" step="0.01" value="0">
    <span id="smoothing-value">0.00</span></label>
  <span id="status"></span>
</header>
<main>
  <div id="charts"></div>
  <section>
    <h2>Held-out evaluation (greedy): first → latest</h2>
    <table id="evaluations"><thead><tr><th>run</th><th>step</th><th>accuracy</th>` +
    `<th>format rate</th><th>length</th><th>problems</th></tr></thead><tbody></tbody></table>
  </section>
  <section>
    <h2>Sampled completions <small id="samples-count"></small></h2>
    <input id="samples-filter" type="search"
      placeholder="step (50), steps (100-200) or text">
    <div id="samples"></div>
  </section>
  <section id="configs"></section>
</main>
${embedded}<script>${scriptSafe(uplotScript)}</script>
<script>${scriptSafe(pageScript)}</script>
</body>
</html>
`;
}
