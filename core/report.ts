// `aha report`: a run as one self-contained HTML file — the dashboard page with the run's
// curves, evaluations, config and a few of its samples embedded, uPlot inlined — to attach to
// an issue or a paper and open offline.

import { dashboardPage } from "./dashboard_page.ts";
import { RunWatcher } from "./dashboard.ts";
import { AhaError } from "./errors.ts";

/** Samples kept in a report: the last few steps' worth, so the file stays small. */
export const REPORT_SAMPLES = 24;

/** The report of the runs under `paths` as HTML text. */
export async function reportHtml(paths: string[], now = new Date()): Promise<string> {
  const runs = await new RunWatcher(paths).update();
  if (runs.every((r) => !r.metrics?.records.length && !r.eval?.records.length)) {
    throw new AhaError(`${paths.join(", ")}: no metrics.jsonl or eval.jsonl records to report`);
  }
  for (const run of runs) {
    if (run.samples) run.samples.records = run.samples.records.slice(-REPORT_SAMPLES);
  }
  return dashboardPage(`aha report · ${paths.join(", ")}`, {
    runs,
    written: now.toISOString().replace(/\.\d+Z$/, "Z"),
  });
}

/** Writes the report of `paths` to `out` (through a temporary name) and returns `out`. */
export async function writeReport(paths: string[], out: string): Promise<string> {
  const html = await reportHtml(paths);
  await Deno.writeTextFile(`${out}.tmp`, html);
  await Deno.rename(`${out}.tmp`, out);
  return out;
}
