// The dashboard and the report in a real browser (headless Chromium through playwright-core):
// for two recorded runs made here, every chart holds one point per record that has its key,
// lines appended to metrics.jsonl show up within seconds (a half-written line only once it is
// complete), smoothing and the wall-time axis compute what they should, the samples panel lists
// the newest completions with the prompt folded and reflection phrases marked, filters by step,
// and the report file opens from file:// with no network and the same charts.

import assert from "node:assert/strict";
import { type Browser, type BrowserContext, chromium, type Page } from "playwright-core";
import { serveDashboard } from "../core/dashboard.ts";
import { writeReport } from "../core/report.ts";

const CHROMIUM = Deno.env.get("AHA_CHROMIUM") ?? "/usr/bin/chromium";
const haveChromium = await Deno.stat(CHROMIUM).then(() => true, () => false);
if (!haveChromium) {
  console.warn(
    `dashboard_test: SKIPPED — no Chromium at ${CHROMIUM} (apt-get install chromium, or set ` +
      "AHA_CHROMIUM); the browser checks of the dashboard and report did not run",
  );
}
const browserTest = { ignore: !haveChromium, sanitizeResources: false, sanitizeOps: false };

// --- Two small recorded runs.

const T0 = 1_700_000_000;

/** Step `step`'s metrics line: values that differ from step to step, a time 2 s per step. */
function metricsLine(step: number, seed: number): Record<string, number> {
  const v = (k: number) => Math.round(1000 * Math.abs(Math.sin(seed * 7 + step * 1.3 + k))) / 1000;
  return {
    step,
    reward: v(0) * 2,
    "rewards/format": v(1),
    "rewards/correctness": v(2),
    reward_std: v(3),
    accuracy: v(2),
    format_rate: v(1),
    completion_length: 5 + step,
    truncated_rate: 0,
    reflection_rate: v(4) / 4,
    frac_reward_zero_std: v(5),
    groups_trained: 4,
    learning_rate: 1e-3 * (1 - step / 100),
    generate_s: 0.5 + v(6),
    loss: v(7) - 0.5,
    kl: v(8) / 100,
    clip_ratio: v(9) / 10,
    grad_norm: v(10) * 3,
    tokens_per_s: 100,
    reference_s: 0.1,
    train_s: 0.3 + v(11),
    step_s: 2,
    time: T0 + seed * 1000 + 2 * step,
  };
}

const evalLine = (step: number, seed: number) => ({
  step,
  accuracy: 0.1 + step / 100,
  format_rate: 0.5 + step / 100,
  completion_length: 6,
  examples: 20,
  time: T0 + seed * 1000 + 2 * step + 1,
});

const sampleLine = (step: number, completion: string, total: number) => ({
  step,
  prompt: `What is ${step} + ${step}? Think, then answer.`,
  completion,
  answer: String(2 * step),
  rewards: { format: 1, correctness: total - 1, total },
  truncated: false,
  reflective: /\bwait\b/i.test(completion),
});

const jsonl = (records: object[]) => records.map((r) => JSON.stringify(r) + "\n").join("");

const root = await Deno.makeTempDir({ prefix: "aha-dashboard-test-" });
const runA = `${root}/runs/alpha`, runB = `${root}/runs/beta`;
const STEPS_A = 12, STEPS_B = 7;
async function writeRuns() {
  await Deno.mkdir(runA, { recursive: true });
  await Deno.mkdir(runB, { recursive: true });
  const range = (n: number) => Array.from({ length: n }, (_, i) => i + 1);
  await Deno.writeTextFile(
    `${runA}/metrics.jsonl`,
    jsonl(range(STEPS_A).map((s) => metricsLine(s, 1))),
  );
  await Deno.writeTextFile(
    `${runB}/metrics.jsonl`,
    jsonl(range(STEPS_B).map((s) => metricsLine(s, 2))),
  );
  await Deno.writeTextFile(`${runA}/eval.jsonl`, jsonl([0, 5, 10].map((s) => evalLine(s, 1))));
  await Deno.writeTextFile(`${runB}/eval.jsonl`, jsonl([0, 5].map((s) => evalLine(s, 2))));
  await Deno.writeTextFile(
    `${runA}/samples.jsonl`,
    jsonl([
      sampleLine(1, "<answer>2</answer>", 2),
      sampleLine(1, "2", 0),
      sampleLine(5, "<answer>11</answer> wait, let me re-check: <answer>10</answer>", 2),
      sampleLine(10, "<answer>20</answer>", 2),
      sampleLine(10, "await <answer>19</answer>", 1), // "await" is not "wait"
    ]),
  );
}

/** Points each chart must show, per series label: one per record holding its key. */
function expectedPoints(runs: [string, number, number][]): Record<string, Record<string, number>> {
  const perRun = (name: string, steps: number, evals: number) => {
    const label = (l: string) => `${name}: ${l}`;
    return {
      reward: { [label("mean")]: steps, [label("correctness")]: steps, [label("format")]: steps },
      accuracy: { [label("sampled")]: steps, [label("held-out")]: evals },
      format_rate: { [label("sampled")]: steps, [label("held-out")]: evals },
      kl: { [label("kl")]: steps },
      clip_ratio: { [label("clipped")]: steps },
      completion_length: { [label("sampled")]: steps, [label("held-out")]: evals },
      frac_reward_zero_std: { [label("fraction")]: steps },
      reflection_rate: { [label("rate")]: steps },
      learning_rate: { [label("lr")]: steps },
      grad_norm: { [label("norm")]: steps },
      time: { [label("generate")]: steps, [label("reference")]: steps, [label("train")]: steps },
      loss: { [label("loss")]: steps },
    } as Record<string, Record<string, number>>;
  };
  const all: Record<string, Record<string, number>> = {};
  for (const [name, steps, evals] of runs) {
    for (const [chart, series] of Object.entries(perRun(name, steps, evals))) {
      all[chart] = { ...all[chart], ...series };
    }
  }
  return all;
}

/** Per chart, per series label, the number of non-empty points uPlot holds. */
function chartPoints(page: Page): Promise<Record<string, Record<string, number>>> {
  return page.evaluate(() => {
    // deno-lint-ignore no-explicit-any
    const charts = (globalThis as any).aha.charts as Record<string, { plot: any }>;
    const out: Record<string, Record<string, number>> = {};
    for (const [id, { plot }] of Object.entries(charts)) {
      out[id] = {};
      plot.series.forEach((s: { label: string }, i: number) => {
        if (i === 0) return;
        out[id][s.label] = (plot.data[i] as (number | null | undefined)[])
          .filter((v) => v !== null && v !== undefined).length;
      });
    }
    return out;
  });
}

/** The (x, y) points of one series of one chart. */
function seriesPoints(page: Page, chart: string, label: string): Promise<[number, number][]> {
  return page.evaluate(([chart, label]) => {
    // deno-lint-ignore no-explicit-any
    const plot = (globalThis as any).aha.charts[chart].plot;
    const i = plot.series.findIndex((s: { label: string }) => s.label === label);
    const xs = plot.data[0] as number[], ys = plot.data[i] as (number | null)[];
    return xs.map((x, j) => [x, ys[j]]).filter(([, y]) => y !== null && y !== undefined) as [
      number,
      number,
    ][];
  }, [chart, label]);
}

async function waitFor(what: string, check: () => Promise<boolean>, seconds = 5) {
  const deadline = performance.now() + seconds * 1000;
  while (!(await check())) {
    if (performance.now() > deadline) throw new Error(`not within ${seconds} s: ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

let browser: Browser | null = null;
let context: BrowserContext | null = null;
let userDataDir = "";
async function openContext(): Promise<BrowserContext> {
  if (context) return context;
  userDataDir = await Deno.makeTempDir({ prefix: "aha-chromium-" });
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: CHROMIUM,
    headless: true,
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
      "--no-first-run",
    ],
  });
  browser = context.browser();
  return context;
}

/** A page that records every request it makes and every error it throws. */
async function newPage() {
  const page = await (await openContext()).newPage();
  const requests: string[] = [], errors: string[] = [];
  page.on("request", (r) => requests.push(r.url()));
  page.on("pageerror", (e) => errors.push(String(e)));
  page.on("console", (m) => m.type() === "error" && errors.push(m.text()));
  return { page, requests, errors };
}

Deno.test(
  "dashboard: charts, live updates, smoothing, wall time, samples",
  browserTest,
  async () => {
    await writeRuns();
    const dashboard = serveDashboard([`${root}/runs`]);
    const { page, errors } = await newPage();
    try {
      await page.goto(dashboard.url);
      await waitFor("both runs loaded", async () =>
        await page.evaluate(() =>
          // deno-lint-ignore no-explicit-any
          (globalThis as any).aha?.state.runs.size === 2
        ));
      assert.deepEqual(
        await chartPoints(page),
        expectedPoints([["alpha", STEPS_A, 3], ["beta", STEPS_B, 2]]),
      );

      // Lines appended while the page is open: a complete one, then one written in two halves.
      const path = `${runA}/metrics.jsonl`;
      await Deno.writeTextFile(path, jsonl([metricsLine(13, 1)]), { append: true });
      const half = JSON.stringify(metricsLine(14, 1));
      await Deno.writeTextFile(path, half.slice(0, 40), { append: true });
      const rewardPoints = async () => (await chartPoints(page)).reward["alpha: mean"];
      await waitFor("step 13 on the reward chart", async () => await rewardPoints() === 13);
      await new Promise((r) => setTimeout(r, 1500)); // two polls: the half line must not count
      assert.equal(await rewardPoints(), 13);
      await Deno.writeTextFile(path, half.slice(40) + "\n", { append: true });
      await waitFor("step 14 once its line is complete", async () => await rewardPoints() === 14);
      assert.deepEqual(
        (await seriesPoints(page, "reward", "alpha: mean")).at(-1),
        [14, metricsLine(14, 1).reward],
      );

      // Smoothing: TensorBoard's debiased exponential moving average.
      await page.locator("#smoothing").fill("0.9");
      const raw = Array.from({ length: 14 }, (_, i) => metricsLine(i + 1, 1).reward);
      let ema = 0;
      const smoothed = raw.map((v, i) => (ema = 0.9 * ema + 0.1 * v) / (1 - 0.9 ** (i + 1)));
      const got = (await seriesPoints(page, "reward", "alpha: mean")).map(([, y]) => y);
      got.forEach((y, i) => assert.ok(Math.abs(y - smoothed[i]) < 1e-9, `smoothed[${i}]`));
      await page.locator("#smoothing").fill("0");

      // Wall time: seconds since the run's first record (alpha's step-0 evaluation at T0 + 1001).
      await page.locator("#x-axis").selectOption("wall");
      const wall = await seriesPoints(page, "kl", "alpha: kl");
      assert.deepEqual(wall.map(([x]) => x), Array.from({ length: 14 }, (_, i) => 2 * i + 1));
      const heldOut = await seriesPoints(page, "accuracy", "alpha: held-out");
      assert.deepEqual(heldOut.map(([x]) => x), [0, 10, 20]);
      await page.locator("#x-axis").selectOption("step");

      // Samples: newest first, prompt folded, reflection phrases marked (not "await").
      const samples = page.locator("#samples .sample");
      assert.equal(await samples.count(), 5);
      assert.deepEqual(
        await samples.evaluateAll((els) => els.map((e) => e.getAttribute("data-step"))),
        ["10", "10", "5", "1", "1"],
      );
      assert.equal(await page.locator("#samples details.prompt[open]").count(), 0);
      assert.equal(await page.locator("#samples details.prompt").count(), 5);
      assert.deepEqual(await page.locator("#samples mark").allTextContents(), [
        "wait",
        "let me re-check",
      ]);
      assert.match(await samples.nth(2).innerText(), /step 5 .*reward 2\.00.*reflective/);
      await page.locator("#samples-filter").fill("5");
      assert.deepEqual(
        await samples.evaluateAll((els) => els.map((e) => e.getAttribute("data-step"))),
        ["5"],
      );
      await page.locator("#samples-filter").fill("1-5");
      assert.equal(await samples.count(), 3);
      await page.locator("#samples-filter").fill("");

      // A new sample line arrives live too.
      await Deno.writeTextFile(
        `${runA}/samples.jsonl`,
        jsonl([sampleLine(14, "<answer>28</answer>", 2)]),
        {
          append: true,
        },
      );
      await waitFor(
        "the step-14 sample",
        async () => (await samples.first().getAttribute("data-step")) === "14",
      );

      // The evaluation table: first → latest per run.
      const rows = await page.locator("#evaluations tbody tr").allInnerTexts();
      assert.equal(rows.length, 2);
      assert.match(rows[0], /alpha\s+10\s+10\.0% → 20\.0%/);
      assert.deepEqual(errors, []);
    } finally {
      await page.close();
      await dashboard.close();
    }
  },
);

Deno.test("report: one file that opens offline with the same charts", browserTest, async () => {
  await Deno.stat(`${runA}/metrics.jsonl`).catch(writeRuns);
  const out = `${root}/report.html`;
  await writeReport([runA, runB], out);
  const { page, requests, errors } = await newPage();
  try {
    await page.context().setOffline(true);
    await page.goto(`file://${out}`);
    await waitFor("charts drawn", async () =>
      await page.evaluate(() =>
        // deno-lint-ignore no-explicit-any
        Object.keys((globalThis as any).aha?.charts ?? {}).length > 0
      ));
    const steps = (await Deno.readTextFile(`${runA}/metrics.jsonl`)).trim().split("\n").length;
    assert.deepEqual(
      await chartPoints(page),
      expectedPoints([["alpha", steps, 3], ["beta", STEPS_B, 2]]),
    );
    assert.deepEqual(requests, [`file://${out}`], "the report must load nothing else");
    assert.ok(await page.locator("#samples .sample").count() > 0);
    assert.deepEqual(errors, []);
  } finally {
    await page.close();
  }
});

const MAIN = new URL("../main.ts", import.meta.url).pathname;
const aha = (...args: string[]) =>
  new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", MAIN, ...args],
    stdout: "piped",
    stderr: "piped",
  });

Deno.test("aha dashboard and aha report on the command line", async () => {
  await Deno.stat(`${runA}/metrics.jsonl`).catch(writeRuns);
  const missing = await aha("dashboard", `${root}/nowhere`).output();
  assert.equal(missing.code, 1);
  assert.equal(
    new TextDecoder().decode(missing.stderr),
    `aha: ${root}/nowhere: not a run directory (no such folder)\n`,
  );

  const child = aha("dashboard", runA, "--port", "0").spawn();
  const reader = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
  const first = (await reader.read()).value ?? "";
  const url = /^aha dashboard: 1 run\(s\) at (http:\/\/127\.0\.0\.1:\d+\/) /.exec(first)?.[1];
  assert.ok(url, first);
  const page = await (await fetch(url)).text();
  assert.match(page, /uPlot \(v1\.6\.32\)/);
  child.kill("SIGTERM");
  assert.equal((await child.status).code, 0);
  reader.releaseLock();
  await child.stdout.cancel().catch(() => {});
  await child.stderr.cancel();

  const report = await aha("report", runB).output();
  assert.equal(new TextDecoder().decode(report.stdout), `aha report: wrote ${runB}/report.html\n`);
  assert.match(await Deno.readTextFile(`${runB}/report.html`), /AHA_DATA = \{"runs":\[\{"dir":/);
  const empty = await Deno.makeTempDir({ dir: root });
  const nothing = await aha("report", empty).output();
  assert.equal(nothing.code, 1);
  assert.match(new TextDecoder().decode(nothing.stderr), /no metrics.jsonl or eval.jsonl records/);
});

Deno.test(
  "close the browser, remove the runs",
  { sanitizeResources: false, sanitizeOps: false },
  async () => {
    await context?.close();
    await browser?.close();
    await Deno.remove(userDataDir, { recursive: true }).catch(() => {});
    await Deno.remove(root, { recursive: true });
  },
);
