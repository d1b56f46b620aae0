// Reading a run directory as `aha train` writes it, for the dashboard and the report:
// metrics.jsonl (one line per step), eval.jsonl (held-out evaluations), samples.jsonl (sampled
// completions) and the run's config (train_config.yaml of its newest checkpoint). The files are
// followed while they grow: each poll reads only the bytes appended since the last one, and a
// line is taken only once its newline has arrived, so a half-written line is never parsed.

import YAML from "yaml";
import { AhaError } from "./errors.ts";
import { DEFAULT_REFLECTION_PHRASES } from "./rewards.ts";

export const LOG_FILES = {
  metrics: "metrics.jsonl",
  eval: "eval.jsonl",
  samples: "samples.jsonl",
} as const;
export type LogName = keyof typeof LOG_FILES;
export type LogRecord = Record<string, unknown>;

/** One JSONL file followed as it grows. A file that shrank (a resumed run) is read again. */
export class JsonlFollower {
  records: LogRecord[] = [];
  /** True when the last poll started over (the file was rewritten): readers must too. */
  reset = false;
  private offset = 0;

  constructor(readonly path: string) {}

  /** Reads what was appended since the last poll; returns the number of new records. */
  async poll(): Promise<number> {
    const stat = await Deno.stat(this.path).catch(() => null);
    this.reset = false;
    if (stat === null) return 0;
    if (stat.size < this.offset) {
      this.records = [];
      this.offset = 0;
      this.reset = true;
    }
    if (stat.size === this.offset) return 0;
    const file = await Deno.open(this.path);
    try {
      await file.seek(this.offset, Deno.SeekMode.Start);
      const bytes = new Uint8Array(stat.size - this.offset);
      let read = 0;
      while (read < bytes.length) {
        const n = await file.read(bytes.subarray(read));
        if (n === null) break;
        read += n;
      }
      const complete = bytes.subarray(0, read).lastIndexOf(10) + 1; // up to the last newline
      this.offset += complete;
      const before = this.records.length;
      for (const line of new TextDecoder().decode(bytes.subarray(0, complete)).split("\n")) {
        if (!line.trim()) continue;
        try {
          const record = JSON.parse(line);
          if (record && typeof record === "object") this.records.push(record);
        } catch {
          // A corrupt line (a crash mid-write long ago) is skipped, not fatal to the view.
        }
      }
      return this.records.length - before;
    } finally {
      file.close();
    }
  }
}

/** A run directory's three logs, followed together. */
export class RunLogs {
  readonly logs: Record<LogName, JsonlFollower>;

  constructor(readonly dir: string, readonly name = dir) {
    this.logs = {
      metrics: new JsonlFollower(`${dir}/${LOG_FILES.metrics}`),
      eval: new JsonlFollower(`${dir}/${LOG_FILES.eval}`),
      samples: new JsonlFollower(`${dir}/${LOG_FILES.samples}`),
    };
  }

  async poll(): Promise<void> {
    await Promise.all(Object.values(this.logs).map((log) => log.poll()));
  }

  /** The run's config as written in its newest checkpoint (YAML text), or null before one. */
  async configText(): Promise<string | null> {
    const checkpoints: number[] = [];
    for await (const entry of Deno.readDir(this.dir)) {
      const m = /^checkpoint-(\d+)$/.exec(entry.name);
      if (m && entry.isDirectory) checkpoints.push(Number(m[1]));
    }
    for (const step of checkpoints.sort((a, b) => b - a)) {
      const text = await Deno.readTextFile(`${this.dir}/checkpoint-${step}/train_config.yaml`)
        .catch(() => null);
      if (text !== null) return text;
    }
    return null;
  }

  /** The phrases the run counts as reflection (its config's, or the defaults). */
  async reflectionPhrases(): Promise<string[]> {
    const text = await this.configText();
    try {
      const phrases = text ? YAML.parse(text)?.reflection_phrases : null;
      if (Array.isArray(phrases) && phrases.every((p) => typeof p === "string")) return phrases;
    } catch {
      // an unreadable config only loses the custom phrases
    }
    return [...DEFAULT_REFLECTION_PHRASES];
  }
}

const holdsLogs = async (dir: string) => {
  for (const name of Object.values(LOG_FILES)) {
    if (await Deno.stat(`${dir}/${name}`).then(() => true, () => false)) return true;
  }
  return false;
};

/**
 * The run directories named by `paths`: a path that holds logs is a run; a folder of runs
 * (`runs/`) stands for its subdirectories that hold logs; a path with neither (a run about to
 * start) is a run. A path that is not a directory is an error.
 */
export async function findRuns(paths: string[]): Promise<string[]> {
  const runs: string[] = [];
  for (const path of paths) {
    const clean = path.replace(/\/+$/, "") || "/";
    const stat = await Deno.stat(clean).catch(() => null);
    if (!stat?.isDirectory) throw new AhaError(`${path}: not a run directory (no such folder)`);
    if (await holdsLogs(clean)) {
      runs.push(clean);
      continue;
    }
    const children: string[] = [];
    for await (const entry of Deno.readDir(clean)) {
      if (entry.isDirectory && await holdsLogs(`${clean}/${entry.name}`)) {
        children.push(`${clean}/${entry.name}`);
      }
    }
    runs.push(...(children.length ? children.sort() : [clean]));
  }
  return [...new Set(runs)];
}
