// The live dashboard's server: Deno's HTTP server on 127.0.0.1 serving the page
// (core/dashboard_page.ts) and one JSON endpoint the page polls every second. A poll sends,
// per run, how many records of each log it holds; the answer holds only the newer ones, so a
// long run costs the same per poll as a short one. The run directories are looked up again on
// each poll: a run that starts inside a watched `runs/` folder appears by itself.

import { dashboardPage, type LogSlice, type RunUpdate } from "./dashboard_page.ts";
import { findRuns, type LogName, RunLogs } from "./run_logs.ts";

/** What the page says it has: per run directory, per log, [generation, record count]. */
type Cursors = Record<string, Partial<Record<LogName, [number, number]>>>;

/** The runs behind a set of paths, followed between polls. */
export class RunWatcher {
  private readonly runs = new Map<string, { logs: RunLogs; generation: Record<string, number> }>();
  private configPolled = new Map<string, number>();

  constructor(readonly paths: string[]) {}

  /** The records each run gained since `cursors`; a log that was rewritten is sent whole. */
  async update(cursors: Cursors = {}): Promise<RunUpdate[]> {
    const dirs = await findRuns(this.paths);
    // A run is named by its folder's name, or by its path where two folders share a name.
    const base = (dir: string) => dir.split("/").at(-1)!;
    const nameOf = (dir: string) =>
      dirs.filter((d) => base(d) === base(dir)).length > 1 ? dir : base(dir);
    const updates: RunUpdate[] = [];
    for (const dir of dirs) {
      let run = this.runs.get(dir);
      if (!run) {
        run = { logs: new RunLogs(dir), generation: { metrics: 0, eval: 0, samples: 0 } };
        this.runs.set(dir, run);
      }
      await run.logs.poll();
      const update: RunUpdate = { dir, name: nameOf(dir) };
      for (const log of ["metrics", "eval", "samples"] as const) {
        const follower = run.logs.logs[log];
        if (follower.reset) run.generation[log]++;
        const generation = run.generation[log];
        const [seenGeneration, seen] = cursors[dir]?.[log] ?? [-1, 0];
        const from = seenGeneration === generation && seen <= follower.records.length ? seen : 0;
        const slice: LogSlice = { generation, from, records: follower.records.slice(from) };
        update[log] = slice;
      }
      // The config and phrases change only when a checkpoint is written: read them when the
      // page is new to this run or every 10 s.
      const last = this.configPolled.get(dir) ?? 0;
      if (!cursors[dir] || Date.now() - last > 10_000) {
        this.configPolled.set(dir, Date.now());
        update.config = await run.logs.configText();
        update.phrases = await run.logs.reflectionPhrases();
      }
      updates.push(update);
    }
    return updates;
  }
}

export interface Dashboard {
  url: string;
  port: number;
  close(): Promise<void>;
}

/** Serves the dashboard of `paths` on 127.0.0.1 (`port` 0: a free one). */
export function serveDashboard(paths: string[], port = 0): Dashboard {
  const watcher = new RunWatcher(paths);
  const page = dashboardPage(`aha · ${paths.join(", ")}`);
  const server = Deno.serve({ hostname: "127.0.0.1", port, onListen: () => {} }, async (req) => {
    const url = new URL(req.url);
    if (req.method === "GET" && url.pathname === "/") {
      return new Response(page, { headers: { "content-type": "text/html; charset=utf-8" } });
    }
    if (req.method === "POST" && url.pathname === "/api/update") {
      let cursors: Cursors = {};
      try {
        cursors = await req.json();
      } catch {
        return new Response("body: expected a JSON object of cursors", { status: 400 });
      }
      try {
        const runs = await watcher.update(cursors);
        return Response.json({ runs }, { headers: { "cache-control": "no-store" } });
      } catch (e) {
        return new Response((e as Error).message, { status: 500 });
      }
    }
    return new Response("not found", { status: 404 });
  });
  const actualPort = server.addr.port;
  return {
    url: `http://127.0.0.1:${actualPort}/`,
    port: actualPort,
    close: () => server.shutdown(),
  };
}
