// `aha report`: one self-contained HTML file of a run (core/report.ts).

import { parseCommandArgs } from "./args.ts";
import { UsageError } from "../core/errors.ts";
import { writeReport } from "../core/report.ts";

export const help = `usage: aha report RUN_DIR [RUN_DIR ...] [--out report.html]

Writes one HTML file that opens offline (data and chart code inlined): the run's curves, its
held-out evaluations, its config and a few sampled completions — to attach to an issue or a
paper. Several RUN_DIRs are drawn side by side.

  --out FILE   where to write it (default: RUN_DIR/report.html for one run, report.html else)`;

export async function run(args: string[]): Promise<void> {
  const { values, positionals } = parseCommandArgs("report", args, {
    out: { type: "string" },
  }, true);
  if (positionals.length === 0) throw new UsageError(`report: expected a RUN_DIR`);
  const out = (values.out as string | undefined) ??
    (positionals.length === 1
      ? `${positionals[0].replace(/\/+$/, "")}/report.html`
      : "report.html");
  console.log(`aha report: wrote ${await writeReport(positionals, out)}`);
}
