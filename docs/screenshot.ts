// Makes docs/dashboard.png, the README's picture of the dashboard: serves the dashboard of a run
// directory and photographs it in headless Chromium.
//
//   deno run -A main.ts train --set output_dir=/tmp/dash-run     # the embedded default's run
//   deno run -A docs/screenshot.ts /tmp/dash-run docs/dashboard.png

import { chromium } from "playwright-core";
import { serveDashboard } from "../core/dashboard.ts";

const [runDir, out = "docs/dashboard.png", smoothing = "0.6"] = Deno.args;
const dashboard = serveDashboard([runDir]);
const userDataDir = await Deno.makeTempDir();
const context = await chromium.launchPersistentContext(userDataDir, {
  executablePath: Deno.env.get("AHA_CHROMIUM") ?? "/usr/bin/chromium",
  headless: true,
  viewport: { width: 1400, height: 1560 },
  args: ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"],
});
const page = await context.newPage();
await page.goto(dashboard.url);
await page.waitForFunction(() =>
  // deno-lint-ignore no-explicit-any
  ((globalThis as any).aha?.state.runs.values().next().value?.metrics.length ?? 0) > 0
);
await page.locator("#smoothing").fill(smoothing);
await new Promise((r) => setTimeout(r, 500));
await page.screenshot({ path: out }); // the charts, the evaluation and the newest samples
console.log(`wrote ${out}`);
await context.close();
await dashboard.close();
await Deno.remove(userDataDir, { recursive: true });
