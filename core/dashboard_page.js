// The dashboard page's script, shared by the live dashboard and the static report. It keeps
// each run's records (metrics, eval, samples) as the server sends them — or as the report
// embeds them in `globalThis.AHA_DATA` — and draws one uPlot chart per quantity, one series per run
// and sub-quantity, a table of the latest evaluations and a panel of sampled completions.
// `globalThis.aha` exposes the charts and state, for the browser tests.
/* global uPlot */

const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b"];
const DASHES = [[], [6, 4], [2, 3], [10, 3, 2, 3]];

// What each chart plots: [log, key, label] triples per run ("metrics" per step, "eval" held-out).
const rewardKeys = (run) => {
  const keys = new Set();
  for (const m of run.metrics) {
    for (const k of Object.keys(m)) if (k.startsWith("rewards/")) keys.add(k);
  }
  return [...keys].sort();
};
const CHARTS = [
  {
    id: "reward",
    title: "reward (mean and per function)",
    series: (run) => [
      ["metrics", "reward", "mean"],
      ...rewardKeys(run).map((k) => ["metrics", k, k.slice(8)]),
    ],
  },
  {
    id: "accuracy",
    title: "accuracy",
    series: () => [["metrics", "accuracy", "sampled"], ["eval", "accuracy", "held-out"]],
  },
  {
    id: "format_rate",
    title: "format rate",
    series: () => [["metrics", "format_rate", "sampled"], ["eval", "format_rate", "held-out"]],
  },
  { id: "kl", title: "KL to the reference", series: () => [["metrics", "kl", "kl"]] },
  { id: "clip_ratio", title: "clip ratio", series: () => [["metrics", "clip_ratio", "clipped"]] },
  {
    id: "completion_length",
    title: "completion length (tokens)",
    series: () => [
      ["metrics", "completion_length", "sampled"],
      ["eval", "completion_length", "held-out"],
    ],
  },
  {
    id: "frac_reward_zero_std",
    title: "groups with equal rewards (frac_reward_zero_std)",
    series: () => [["metrics", "frac_reward_zero_std", "fraction"]],
  },
  {
    id: "reflection_rate",
    title: "reflection rate",
    series: () => [["metrics", "reflection_rate", "rate"]],
  },
  {
    id: "learning_rate",
    title: "learning rate",
    series: () => [["metrics", "learning_rate", "lr"]],
  },
  { id: "grad_norm", title: "gradient norm", series: () => [["metrics", "grad_norm", "norm"]] },
  {
    id: "time",
    title: "time per step (s)",
    series: () => [
      ["metrics", "generate_s", "generate"],
      ["metrics", "reference_s", "reference"],
      ["metrics", "train_s", "train"],
    ],
  },
  { id: "loss", title: "loss", series: () => [["metrics", "loss", "loss"]] },
];

const state = {
  runs: new Map(), // dir → { dir, name, color, phrases, config, metrics, eval, samples, cursor }
  xAxis: "step",
  smoothing: 0,
  filter: "",
  live: !globalThis.AHA_DATA,
};
const charts = {}; // chart id → { plot, key }
globalThis.aha = { charts, state, updates: 0 };

// ---------------------------------------------------------------------------------------------
// Data in.

/** Takes in one update; returns whether anything changed (else the page is not redrawn). */
function ingest(update) {
  // Each update lists every run being watched: one no longer listed (a folder of runs that
  // stood for itself until its first run appeared) is dropped.
  const listed = new Set(update.runs.map((r) => r.dir));
  let changed = false;
  for (const dir of state.runs.keys()) {
    if (!listed.has(dir)) changed = state.runs.delete(dir);
  }
  for (const r of update.runs) {
    let run = state.runs.get(r.dir);
    if (!run) {
      run = {
        dir: r.dir,
        name: r.name,
        color: COLORS[state.runs.size % COLORS.length],
        metrics: [],
        eval: [],
        samples: [],
        cursor: {},
      };
      state.runs.set(r.dir, run);
      changed = true;
    }
    if (r.phrases) run.phrases = r.phrases;
    if (r.config !== undefined && r.config !== run.config) {
      run.config = r.config;
      changed = true;
    }
    for (const log of ["metrics", "eval", "samples"]) {
      const part = r[log];
      if (!part) continue;
      if (part.from === 0 && run[log].length) {
        run[log] = [];
        changed = true;
      }
      run[log].push(...part.records);
      changed ||= part.records.length > 0;
      run.cursor[log] = [part.generation, run[log].length];
    }
  }
  globalThis.aha.updates++;
  return changed;
}

async function poll() {
  const since = {};
  for (const run of state.runs.values()) since[run.dir] = run.cursor;
  try {
    const response = await fetch("api/update", { method: "POST", body: JSON.stringify(since) });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const changed = ingest(await response.json());
    setStatus(`live · ${state.runs.size} run(s) · updated ${new Date().toLocaleTimeString()}`);
    if (changed || !Object.keys(charts).length) render();
  } catch (e) {
    setStatus(`disconnected (${e.message}); retrying`, true);
  }
  setTimeout(poll, 1000);
}

function setStatus(text, offline = false) {
  const el = document.getElementById("status");
  el.textContent = text;
  el.className = offline ? "offline" : "";
}

// ---------------------------------------------------------------------------------------------
// Charts.

/** Seconds since the run's start for each record: its `time`, else the sum of step times. */
function wallClock(run) {
  const times = [...run.metrics, ...run.eval].map((r) => r.time).filter(Number.isFinite);
  const t0 = times.length ? Math.min(...times) : 0;
  const byStep = new Map();
  let elapsed = 0;
  for (const m of run.metrics) {
    elapsed += m.step_s ?? (m.generate_s ?? 0) + (m.reference_s ?? 0) + (m.train_s ?? 0);
    byStep.set(m.step, Number.isFinite(m.time) ? m.time - t0 : elapsed);
  }
  return (r) => Number.isFinite(r.time) ? r.time - t0 : (byStep.get(r.step) ?? 0);
}

/** TensorBoard's smoothing: an exponential moving average, debiased at the start. */
function smooth(values, weight) {
  if (!(weight > 0)) return values;
  let last = 0, n = 0;
  return values.map((v) => {
    last = last * weight + (1 - weight) * v;
    n++;
    return last / (1 - weight ** n);
  });
}

function chartData(chart) {
  const tables = [], series = [];
  for (const run of state.runs.values()) {
    const x = state.xAxis === "step" ? (r) => r.step : wallClock(run);
    chart.series(run).forEach(([log, key, label], j) => {
      const byX = new Map();
      for (const r of run[log]) if (Number.isFinite(r[key])) byX.set(x(r), r[key]);
      if (byX.size === 0) return;
      const xs = [...byX.keys()].sort((a, b) => a - b);
      const ys = smooth(xs.map((v) => byX.get(v)), log === "metrics" ? state.smoothing : 0);
      tables.push([xs, ys]);
      // One run: a colour per quantity. Several: a colour per run, a dash per quantity.
      const several = state.runs.size > 1;
      series.push({
        label: several ? `${run.name}: ${label}` : label,
        stroke: several ? run.color : COLORS[j % COLORS.length],
        dash: several ? DASHES[j % DASHES.length] : [],
        width: 1.5,
        spanGaps: true,
        points: { show: log === "eval" || xs.length < 30, size: log === "eval" ? 6 : 4 },
      });
    });
  }
  const data = tables.length ? uPlot.join(tables) : [[]];
  return { data, series };
}

/** A y tick: three significant digits, exponents for the very small or large (learning rates). */
function tickLabel(v) {
  if (v === 0) return "0";
  const a = Math.abs(v);
  return a < 0.01 || a >= 1e5 ? v.toExponential(1) : String(Number(v.toPrecision(3)));
}

/** The y range: uPlot's padded one, but [0, 1] rather than [0, 100] for a flat zero. */
function yRange(_u, min, max) {
  if (min === max) return min === 0 ? [0, 1] : [min - Math.abs(min) / 2, max + Math.abs(max) / 2];
  return uPlot.rangeNum(min, max, 0.1, true);
}

function render() {
  const container = document.getElementById("charts");
  for (const chart of CHARTS) {
    let el = document.getElementById(`chart-${chart.id}`);
    if (!el) {
      el = document.createElement("div");
      el.className = "chart";
      el.id = `chart-${chart.id}`;
      el.dataset.chart = chart.id;
      container.appendChild(el);
    }
    const width = Math.max(300, el.clientWidth - 12);
    const { data, series } = chartData(chart);
    const key = JSON.stringify([state.xAxis, series.map((s) => [s.label, s.stroke])]);
    const current = charts[chart.id];
    if (current && current.key === key) {
      current.plot.setData(data);
      continue;
    }
    current?.plot.destroy();
    const plot = new uPlot(
      {
        title: chart.title,
        width,
        height: 240,
        scales: { x: { time: false }, y: { range: yRange } },
        axes: [
          { label: state.xAxis === "step" ? "step" : "wall time (s)" },
          { size: 60, values: (_u, ticks) => ticks.map(tickLabel) },
        ],
        series: [{ label: state.xAxis }, ...series],
        legend: { live: true },
      },
      data,
      el,
    );
    charts[chart.id] = { plot, key };
  }
  renderEvaluations();
  renderSamples();
  renderRunKeys();
}

function resizeCharts() {
  for (const { plot } of Object.values(charts)) {
    const w = plot.root.parentElement.clientWidth - 12;
    if (w > 0) plot.setSize({ width: w, height: 240 });
  }
}

// ---------------------------------------------------------------------------------------------
// Runs, evaluations, samples, config.

function renderRunKeys() {
  const el = document.getElementById("runs");
  el.replaceChildren(...[...state.runs.values()].map((run) => {
    const span = document.createElement("span");
    span.className = "run-key";
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = run.color;
    span.append(swatch, `${run.name} (${run.metrics.length} steps)`);
    return span;
  }));
  const configs = document.getElementById("configs");
  configs.replaceChildren(...[...state.runs.values()].map((run) => {
    const details = document.createElement("details");
    details.className = "config";
    const summary = document.createElement("summary");
    summary.textContent = `config of ${run.name}`;
    const pre = document.createElement("pre");
    pre.textContent = run.config ?? "(not recorded yet: the config is saved with each checkpoint)";
    details.append(summary, pre);
    return details;
  }));
}

const pct = (v) => Number.isFinite(v) ? `${(100 * v).toFixed(1)}%` : "–";

function renderEvaluations() {
  const body = document.querySelector("#evaluations tbody");
  const rows = [];
  for (const run of state.runs.values()) {
    const first = run.eval[0], last = run.eval.at(-1);
    if (!last) continue;
    const tr = document.createElement("tr");
    for (
      const text of [
        run.name,
        String(last.step),
        `${pct(first.accuracy)} → ${pct(last.accuracy)}`,
        `${pct(first.format_rate)} → ${pct(last.format_rate)}`,
        Number.isFinite(last.completion_length) ? last.completion_length.toFixed(1) : "–",
        String(last.examples ?? "–"),
      ]
    ) {
      const td = document.createElement("td");
      td.textContent = text;
      tr.appendChild(td);
    }
    rows.push(tr);
  }
  body.replaceChildren(...rows);
}

/** The completion as text nodes and <mark>s around each reflection phrase (whole words). */
function highlighted(text, phrases) {
  const escaped = (phrases ?? []).map((p) => p.replace(/[.*+?^${}()|[\]\\]/g, "\\$&"));
  if (!escaped.length) return [document.createTextNode(text)];
  const pattern = new RegExp(
    `(?<![\\p{L}\\p{N}_])(?:${escaped.join("|")})(?![\\p{L}\\p{N}_])`,
    "giu",
  );
  const nodes = [];
  let at = 0;
  for (const m of text.replaceAll("\u2019", "'").matchAll(pattern)) {
    nodes.push(document.createTextNode(text.slice(at, m.index)));
    const mark = document.createElement("mark");
    mark.textContent = text.slice(m.index, m.index + m[0].length);
    nodes.push(mark);
    at = m.index + m[0].length;
  }
  nodes.push(document.createTextNode(text.slice(at)));
  return nodes;
}

/** The filter: a step ("50"), a range of steps ("100-200"), or text in prompt or completion. */
function sampleFilter(query) {
  const q = query.trim();
  if (!q) return () => true;
  const one = /^\d+$/.exec(q), range = /^(\d+)\s*[-–]\s*(\d+)$/.exec(q);
  if (one) return (s) => s.step === Number(q);
  if (range) return (s) => s.step >= Number(range[1]) && s.step <= Number(range[2]);
  const needle = q.toLowerCase();
  return (s) => `${s.prompt}\n${s.completion}`.toLowerCase().includes(needle);
}

const SAMPLES_SHOWN = 30;

function renderSamples() {
  const keep = sampleFilter(state.filter);
  const all = [];
  for (const run of state.runs.values()) {
    for (const s of run.samples) if (keep(s)) all.push({ run, s });
  }
  all.sort((a, b) => b.s.step - a.s.step); // newest first (stable within a step)
  const list = document.getElementById("samples");
  list.replaceChildren(
    ...all.slice(0, SAMPLES_SHOWN).map(({ run, s }) => {
      const div = document.createElement("div");
      const rewards = s.rewards ?? {};
      div.className = "sample" + (s.reflective ? " reflective" : "") +
        (Object.entries(rewards).some(([k, v]) => /correct/.test(k) && v > 0) ? " correct" : "");
      div.dataset.step = String(s.step);
      const head = document.createElement("div");
      head.className = "sample-head";
      const parts = Object.entries(rewards).filter(([k]) => k !== "total")
        .map(([k, v]) => `${k} ${Number(v).toFixed(2)}`);
      head.textContent = `step ${s.step}` + (state.runs.size > 1 ? ` · ${run.name}` : "") +
        ` · reward ${Number(rewards.total).toFixed(2)}` +
        (parts.length ? ` (${parts.join(", ")})` : "") +
        (s.answer !== undefined ? ` · answer ${s.answer}` : "") +
        (s.truncated ? " · truncated" : "") + (s.reflective ? " · reflective" : "");
      const prompt = document.createElement("details");
      prompt.className = "prompt";
      const summary = document.createElement("summary");
      summary.textContent = "prompt";
      const promptText = document.createElement("pre");
      promptText.textContent = String(s.prompt ?? "");
      prompt.append(summary, promptText);
      const completion = document.createElement("pre");
      completion.className = "completion";
      completion.append(...highlighted(String(s.completion ?? ""), run.phrases));
      div.append(head, prompt, completion);
      return div;
    }),
  );
  document.getElementById("samples-count").textContent = `${
    Math.min(all.length, SAMPLES_SHOWN)
  } of ${all.length} shown`;
}

// ---------------------------------------------------------------------------------------------
// Controls and start.

document.getElementById("smoothing").addEventListener("input", (e) => {
  state.smoothing = Number(e.target.value);
  document.getElementById("smoothing-value").textContent = state.smoothing.toFixed(2);
  render();
});
document.getElementById("x-axis").addEventListener("change", (e) => {
  state.xAxis = e.target.value;
  render();
});
document.getElementById("samples-filter").addEventListener("input", (e) => {
  state.filter = e.target.value;
  renderSamples();
});
globalThis.addEventListener("resize", resizeCharts);

if (state.live) {
  poll();
} else {
  ingest(globalThis.AHA_DATA);
  setStatus(`report written ${globalThis.AHA_DATA.written ?? ""}`);
  render();
}
