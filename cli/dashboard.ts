// `aha dashboard`: the live view of one or several runs in the browser (core/dashboard.ts
// serves it). Runs until Ctrl-C.

import { intOption, parseCommandArgs } from "./args.ts";
import { UsageError } from "../core/errors.ts";
import { serveDashboard } from "../core/dashboard.ts";
import { findRuns } from "../core/run_logs.ts";

export const help = `usage: aha dashboard [RUN_DIR ...] [--port N]

Serves a page on 127.0.0.1 with the curves of one or several runs side by side (reward, per
reward function, accuracy and format rate sampled and held-out, KL, clip ratio, completion
length, frac_reward_zero_std, reflection rate, learning rate, gradient norm, time per step),
smoothing, step or wall-time axis, and the latest sampled completions. It follows the runs'
metrics.jsonl, eval.jsonl and samples.jsonl as they grow. A RUN_DIR that holds no logs but has
subdirectories that do (runs/) shows each of them. Default RUN_DIR: runs/.

  --port N   the port to listen on (default: a free one; the address is printed)`;

export async function run(args: string[]): Promise<void> {
  const { values, positionals } = parseCommandArgs("dashboard", args, {
    port: { type: "string" },
  }, true);
  const port = intOption("dashboard", "port", values.port as string | undefined, 0);
  if (port < 0 || port > 65535) throw new UsageError(`dashboard: --port must be 0..65535`);
  const paths = positionals.length ? positionals : ["runs"];
  const runs = await findRuns(paths); // a missing directory is an error before serving
  const dashboard = serveDashboard(paths, port);
  console.log(`aha dashboard: ${runs.length} run(s) at ${dashboard.url} (Ctrl-C to stop)`);
  await new Promise<void>((resolve) => {
    const stop = () => resolve();
    Deno.addSignalListener("SIGINT", stop);
    Deno.addSignalListener("SIGTERM", stop);
  });
  await dashboard.close();
}
