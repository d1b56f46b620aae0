// A run's output directory, which `aha train` and `aha sft` write into: who may write there, what
// a fresh run or a resume finds there, and where a resumed checkpoint's paths point.
//
//   - lockRunDir: one process per directory. An exclusive advisory lock on `.aha.lock` (which
//     names its holder's PID) is taken without waiting; one held by a live process is refused
//     with one line naming it. The lock goes when the run ends or the process exits, however.
//   - prepareRunDir: before any work — the directory is created and must be writable; stale
//     temporaries of killed saves (`.checkpoint-N.PID.tmp`) are removed; a fresh run refuses a
//     directory that already holds a run (or clears it with --overwrite); a resume trims the
//     logs to the step it resumes from, tolerating a torn last line (a full disk mid-append), and
//     refuses to leave checkpoints of later steps beside its own (or removes them with
//     --overwrite).
//   - resolveResume: a checkpoint's run directory is the one it sits in, wherever that was moved
//     or copied: paths saved under the old run directory are rebased onto the new one.
//   - removeOldCheckpoints: save_total_limit's pruning, through hidden temporaries.
//   - appendLine: a whole JSON line in one write; a failure is one line, never a stack trace.
//
// Device-free and small on purpose: the CLI calls it before opening a GPU.

import { basename, dirname, join, resolve } from "node:path";
import { AhaError } from "./errors.ts";
import { removeStaleTemporaries } from "./save_dir.ts";
import { TRAINER_STATE_FILE } from "./train_state.ts";

/** The lock file inside a run directory. */
export const LOCK_FILE = ".aha.lock";
/** The logs a training run appends to, one JSON object per line with a `step`. */
export const RUN_LOGS = ["metrics.jsonl", "samples.jsonl", "eval.jsonl"];
/** TensorBoard's event files (core/tensorboard.ts), which --overwrite removes with the logs. */
const TENSORBOARD_EVENTS = /^events\.out\.tfevents\./;

/** An AhaError for a directory that cannot be created or written, naming why. */
function notWritable(dir: string, e: unknown): AhaError {
  if (e instanceof AhaError) return e;
  const why = e instanceof Deno.errors.AlreadyExists || e instanceof Deno.errors.NotADirectory
    ? "a file is in the way"
    : (e as Error).message.split("\n")[0];
  return new AhaError(`output directory ${dir}: cannot create or write it (${why})`);
}

/** Creates `dir` (and parents) and checks that it is a directory this process can write. */
export async function ensureWritableDir(dir: string): Promise<void> {
  try {
    const info = await Deno.stat(dir).catch((e) => {
      if (e instanceof Deno.errors.NotFound) return null;
      throw e;
    });
    if (info && !info.isDirectory) {
      throw new AhaError(`output directory ${dir}: exists and is a file, not a directory`);
    }
    await Deno.mkdir(dir, { recursive: true });
    const probe = join(dir, `.aha-write-test.${Deno.pid}`);
    await Deno.writeTextFile(probe, "");
    await Deno.remove(probe);
  } catch (e) {
    throw notWritable(dir, e);
  }
}

export interface RunLock {
  readonly path: string;
  release(): void;
}

/**
 * Takes the run directory's lock for this process (creating the directory), or refuses with one
 * line naming the process that holds it. Released by `release()` or when the process exits.
 *
 * The lock is the operating system's (an exclusive advisory lock on `.aha.lock`, held while the
 * file stays open): a process that dies releases it with its files, so a lock file left behind is
 * simply locked again, and two processes can never both take it over. The PID written into the
 * file only names the holder in the refusal.
 */
export async function lockRunDir(dir: string, command: string): Promise<RunLock> {
  await ensureWritableDir(dir);
  const path = join(dir, LOCK_FILE);
  const content = JSON.stringify({ pid: Deno.pid, command, started: new Date().toISOString() });
  for (let attempt = 0; attempt < 3; attempt++) {
    let file: Deno.FsFile;
    try {
      file = await Deno.open(path, { read: true, write: true, create: true });
    } catch (e) {
      throw notWritable(dir, e);
    }
    let locked: boolean;
    try {
      locked = file.tryLockSync(true);
    } catch (e) {
      // A filesystem without advisory locks (some network and FUSE mounts).
      file.close();
      throw new AhaError(
        `output directory ${dir}: cannot lock ${path} (${(e as Error).message.split("\n")[0]}); ` +
          `choose an output_dir on a local filesystem`,
      );
    }
    if (!locked) {
      file.close();
      throw inUse(dir, path);
    }
    // A holder releasing the lock removes the file before unlocking it: a lock taken on the file
    // it removed is on no one's lock file. Try again with the file now at `path`.
    const named = await Deno.stat(path).catch(() => null);
    const opened = file.statSync();
    if (named === null || named.ino !== opened.ino || named.dev !== opened.dev) {
      file.close();
      continue;
    }
    file.truncateSync(0);
    file.writeSync(new TextEncoder().encode(content + "\n"));
    let released = false;
    const release = () => {
      if (released) return;
      released = true;
      globalThis.removeEventListener("unload", release);
      // Removed while still locked, so a waiting process never locks a file about to go.
      try {
        Deno.removeSync(path);
      } catch {
        // removed by hand meanwhile
      }
      file.close();
    };
    globalThis.addEventListener("unload", release);
    return { path, release };
  }
  throw new AhaError(`output directory ${dir}: could not take the lock ${path}`);
}

/** The refusal for a lock another process holds, naming it from what it wrote in the file. */
function inUse(dir: string, path: string): AhaError {
  let holder: { pid?: unknown; command?: unknown; started?: unknown } = {};
  try {
    holder = JSON.parse(Deno.readTextFileSync(path));
  } catch {
    // not written yet: the holder took the lock a moment ago
  }
  return new AhaError(
    `output directory ${dir} is in use by process ${holder.pid ?? "?"} (aha ${
      holder.command ?? "?"
    }, started ${holder.started ?? "?"}): wait for it to finish or stop it`,
  );
}

/**
 * Removes a run's oldest checkpoint-N directories beyond the newest `keep` (save_total_limit),
 * returning their names. Each is renamed to a hidden temporary first, so that a removal cut short
 * never leaves a partial directory that a resume would take for a checkpoint (the next run's
 * preparation removes the temporary).
 */
export async function removeOldCheckpoints(dir: string, keep: number): Promise<string[]> {
  const steps = await checkpointSteps(dir);
  const removed: string[] = [];
  for (const step of steps.slice(0, Math.max(0, steps.length - keep))) {
    const name = `checkpoint-${step}`, doomed = join(dir, `.${name}.${Deno.pid}.tmp`);
    await Deno.rename(join(dir, name), doomed);
    await Deno.remove(doomed, { recursive: true });
    removed.push(name);
  }
  return removed;
}

/** The checkpoint-N directories of a run, by step. */
export async function checkpointSteps(dir: string): Promise<number[]> {
  const steps: number[] = [];
  try {
    for await (const entry of Deno.readDir(dir)) {
      const m = entry.name.match(/^checkpoint-(\d+)$/);
      if (m && entry.isDirectory) steps.push(Number(m[1]));
    }
  } catch {
    // no directory: no checkpoints
  }
  return steps.sort((a, b) => a - b);
}

/**
 * The JSON objects of a log's complete lines. A last line that is not valid JSON (a torn append)
 * is dropped and reported in `torn`; a bad line before the last is an error naming it.
 */
export function parseLog(
  path: string,
  text: string,
): { records: { step: number }[]; torn: boolean } {
  const lines = text.split("\n");
  if (lines.at(-1) === "") lines.pop();
  const records: { step: number }[] = [];
  let torn = false;
  lines.forEach((line, i) => {
    if (line.trim() === "") return;
    try {
      const record = JSON.parse(line);
      if (typeof record?.step !== "number") throw new Error("no step");
      records.push(record);
    } catch {
      if (i === lines.length - 1) torn = true;
      else throw new AhaError(`${path}:${i + 1}: not a JSON object with a "step"`);
    }
  });
  return { records, torn };
}

export interface PrepareOptions {
  /** The step a resume continues from, or null for a fresh run. */
  resumeStep: number | null;
  /**
   * The run directory the resumed checkpoint sits in. Only there does a resume trim the logs to
   * its step; any other directory is new to the run, and one holding another run's logs or
   * checkpoints is refused (or cleared with overwrite), as for a fresh run.
   */
  resumeRunDir?: string;
  /** A fresh run may clear an old run's logs and checkpoints (`--overwrite`). */
  overwrite: boolean;
  /** Lines to show the user (what was cleaned up or trimmed). */
  log?: (line: string) => void;
}

/**
 * Makes `dir` ready for a run: removes stale temporaries; a fresh run refuses a directory that
 * holds a run's logs (or, with overwrite, removes the logs and checkpoints); a resume in its own
 * run directory trims each log to the lines at or before its step and refuses checkpoints of
 * later steps (with overwrite, removes them), and one sent elsewhere (output_dir set) treats that
 * directory as a fresh run does. Checks everything before changing anything.
 */
export async function prepareRunDir(dir: string, opts: PrepareOptions): Promise<void> {
  const log = opts.log ?? (() => {});
  await ensureWritableDir(dir);
  const stale = await removeStaleTemporaries(dir);
  if (stale.length) {
    log(`cleaned up ${stale.length} unfinished save(s) in ${dir}: ${stale.join(", ")}`);
  }
  const logs = new Map<string, string>();
  for (const name of RUN_LOGS) {
    const text = await Deno.readTextFile(join(dir, name)).catch(() => null);
    if (text !== null) logs.set(name, text);
  }
  const checkpoints = await checkpointSteps(dir);
  const ownRunDir = opts.resumeRunDir === undefined || resolve(opts.resumeRunDir) === resolve(dir);
  const resumeStep = ownRunDir ? opts.resumeStep : null;
  if (resumeStep === null) {
    if (logs.size === 0 && checkpoints.length === 0) return;
    if (!opts.overwrite) {
      const what = logs.size ? [...logs.keys()][0] : `checkpoint-${checkpoints.at(-1)}`;
      throw new AhaError(
        checkpoints.length
          ? `output_dir ${dir} already holds a run (${what}): resume it with --resume ` +
            `${join(dir, `checkpoint-${checkpoints.at(-1)}`)}, start over with --overwrite, ` +
            `or choose another --set output_dir=...`
          : `output_dir ${dir} holds a run that stopped before its first checkpoint (${what}): ` +
            `there is nothing to resume; start over with --overwrite (or remove the directory), ` +
            `or choose another --set output_dir=...`,
      );
    }
    for (const name of logs.keys()) await Deno.remove(join(dir, name));
    // TensorBoard reads every event file in the directory: the old run's would show beside the
    // new one's.
    for await (const entry of Deno.readDir(dir)) {
      if (TENSORBOARD_EVENTS.test(entry.name)) await Deno.remove(join(dir, entry.name));
    }
    for (const step of checkpoints) {
      await Deno.remove(join(dir, `checkpoint-${step}`), { recursive: true });
    }
    log(`--overwrite: removed ${dir}'s logs and ${checkpoints.length} checkpoint(s)`);
    return;
  }
  // Checkpoints after the resumed step belong to the steps the resume replaces: left beside the
  // new ones, a later resume of "the latest" would continue the old trajectory on the new logs.
  const later = checkpoints.filter((step) => step > resumeStep);
  if (later.length && !opts.overwrite) {
    throw new AhaError(
      `--resume ${join(dir, `checkpoint-${resumeStep}`)}: ${dir} also holds later checkpoints ` +
        `(${later.map((step) => `checkpoint-${step}`).join(", ")}) that this resume would ` +
        `replace: resume the latest, pass --overwrite to remove them, or --set ` +
        `output_dir=... to branch into a new directory`,
    );
  }
  // Parse every log before rewriting any.
  const trimmed = new Map<string, string>();
  for (const [name, text] of logs) {
    const path = join(dir, name);
    const { records, torn } = parseLog(path, text);
    if (torn) log(`${path}: dropped a torn last line`);
    const kept = records.filter((r) => r.step <= resumeStep);
    trimmed.set(name, kept.map((r) => JSON.stringify(r) + "\n").join(""));
  }
  for (const [name, text] of trimmed) {
    const path = join(dir, name), temporary = `${path}.${Deno.pid}.tmp`;
    try {
      await Deno.writeTextFile(temporary, text);
      await Deno.rename(temporary, path);
    } catch (e) {
      await Deno.remove(temporary).catch(() => {});
      throw new AhaError(`${path}: cannot rewrite (${(e as Error).message.split("\n")[0]})`);
    }
  }
  for (const step of later) {
    await Deno.remove(join(dir, `checkpoint-${step}`), { recursive: true });
  }
  if (later.length) {
    log(`--overwrite: removed ${later.length} checkpoint(s) after step ${resumeStep}`);
  }
}

/** Appends one JSON line in a single write; any failure (a full disk) is one AhaError. */
export async function appendLine(path: string, record: Record<string, unknown>): Promise<void> {
  const bytes = new TextEncoder().encode(JSON.stringify(record) + "\n");
  let file: Deno.FsFile | null = null;
  try {
    file = await Deno.open(path, { append: true, create: true });
    const written = await file.write(bytes);
    if (written !== bytes.length) throw new Error(`wrote ${written} of ${bytes.length} bytes`);
  } catch (e) {
    throw new AhaError(
      `${path}: cannot append a log line (${(e as Error).message.split("\n")[0]}); ` +
        `the run stops here (its last checkpoint is intact)`,
    );
  } finally {
    file?.close();
  }
}

/** Where a resumed run's paths point, resolved against the checkpoint's own run directory. */
export interface ResumeTarget {
  /** The checkpoint directory, as given. */
  checkpoint: string;
  /** The directory the checkpoint sits in: the run being resumed, wherever it is now. */
  runDir: string;
  /** `path` if it does not lie under `savedOutputDir` (the run directory when the checkpoint
   * was written), else the same place under runDir. */
  rebase(path: string, savedOutputDir: string): string;
}

/** The run directory of `checkpointDir`, which must be a training checkpoint (checkpoint-N with
 * a trainer_state.json). */
export async function resolveResume(checkpointDir: string): Promise<ResumeTarget> {
  const checkpoint = checkpointDir.replace(/\/+$/, "") || "/";
  const info = await Deno.stat(checkpoint).catch(() => null);
  if (!info?.isDirectory) throw new AhaError(`--resume ${checkpointDir}: no such directory`);
  const hasState = await Deno.stat(join(checkpoint, TRAINER_STATE_FILE)).then(
    () => true,
    () => false,
  );
  if (!/^checkpoint-\d+$/.test(basename(resolve(checkpoint))) || !hasState) {
    throw new AhaError(
      `--resume ${checkpointDir}: not a training checkpoint (expected a checkpoint-N directory ` +
        `with trainer_state.json, inside a run's output directory)`,
    );
  }
  const runDir = dirname(checkpoint);
  return {
    checkpoint,
    runDir,
    rebase: (path, savedOutputDir) => {
      const saved = resolve(savedOutputDir), full = resolve(path);
      if (full === saved) return runDir;
      if (full.startsWith(saved + "/")) return join(runDir, full.slice(saved.length + 1));
      return path;
    },
  };
}
