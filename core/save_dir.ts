// Saving a directory whole (a checkpoint, an adapter, a merged model): it is written into a
// hidden sibling `.NAME.PID.tmp` and renamed into place, the directory it replaces moved aside to
// `.NAME.PID.old` until then, so the last good one survives any failure. A process killed
// outright (SIGKILL, V8 out of memory) cannot clean up after itself: the next save of that name,
// and a run directory's preparation (core/run_dir.ts), remove what it left, or put the old one
// back where it had been moved aside and nothing replaced it.

import { join } from "node:path";
import { AhaError } from "./errors.ts";

/** A file's content: text, bytes, or a function that writes the file at the path it is given
 * (a large one, written a piece at a time). */
export type FileContent = Uint8Array | string | ((path: string) => Promise<void>);

/** Writes files into a directory. */
export async function writeFiles(dir: string, files: Record<string, FileContent>): Promise<void> {
  for (const [name, content] of Object.entries(files)) {
    if (typeof content === "string") await Deno.writeTextFile(`${dir}/${name}`, content);
    else if (typeof content === "function") await content(`${dir}/${name}`);
    else await Deno.writeFile(`${dir}/${name}`, content);
  }
}

/** Fills a temporary sibling directory with `write`, then renames it to `dir`, replacing any
 * previous one only once the new one is complete. */
export async function writeDirectory(
  dir: string,
  write: (temporary: string) => Promise<void>,
): Promise<void> {
  const path = dir.replace(/\/+$/, "");
  const slash = path.lastIndexOf("/");
  const parent = slash < 0 ? "." : path.slice(0, slash) || "/";
  const base = path.slice(slash + 1);
  const temporary = `${parent}/.${base}.${Deno.pid}.tmp`;
  const previous = `${parent}/.${base}.${Deno.pid}.old`;
  try {
    await removeStaleTemporaries(parent, base);
    await Deno.remove(temporary, { recursive: true }).catch(() => {});
    await Deno.mkdir(temporary, { recursive: true });
    await write(temporary);
    // A directory cannot be renamed over a non-empty one: move the old one aside first, and
    // back again if the new one cannot take its place.
    const replacing = await exists(path);
    if (replacing) await Deno.rename(path, previous);
    try {
      await Deno.rename(temporary, path);
    } catch (e) {
      if (replacing) await Deno.rename(previous, path);
      throw e;
    }
    if (replacing) await Deno.remove(previous, { recursive: true });
  } catch (e) {
    await Deno.remove(temporary, { recursive: true }).catch(() => {});
    if (e instanceof AhaError) throw e;
    throw new AhaError(`${dir}: cannot save checkpoint (${(e as Error).message})`);
  }
}

/**
 * Removes the hidden temporaries (`.NAME.PID.tmp` / `.old`) in `dir` that saves of processes now
 * gone left behind, of every NAME or of `name` only (a save into a folder aha does not own
 * touches only its own name's); an `.old` whose NAME is missing is put back instead. Returns
 * what it removed or put back.
 */
export async function removeStaleTemporaries(dir: string, name?: string): Promise<string[]> {
  const removed: string[] = [];
  const entries = await Array.fromAsync(Deno.readDir(dir)).catch(() => null);
  for (const entry of entries ?? []) { // no directory yet: nothing left behind
    const m = entry.name.match(/^\.(.+)\.(\d+)\.(tmp|old)$/);
    if (!m || (name !== undefined && m[1] !== name) || processAlive(Number(m[2]))) continue;
    // A save that replaced a directory moves the old one aside, renames the new one in and only
    // then removes the old one: a crash between the two renames leaves only the old one, which
    // is then the directory itself, complete. It goes back.
    if (m[3] === "old" && !(await exists(join(dir, m[1])))) {
      await Deno.rename(join(dir, entry.name), join(dir, m[1]));
      removed.push(`${entry.name} (put back as ${m[1]})`);
      continue;
    }
    await Deno.remove(join(dir, entry.name), { recursive: true }).catch(() => {});
    removed.push(entry.name);
  }
  return removed;
}

/** True while a process with this PID exists (signal 0 probes without sending anything). */
export function processAlive(pid: number): boolean {
  if (!Number.isInteger(pid) || pid <= 0) return false;
  if (pid === Deno.pid) return true;
  try {
    Deno.kill(pid, 0 as unknown as Deno.Signal);
    return true;
  } catch (e) {
    // EPERM: it exists but belongs to someone else.
    return !(e instanceof Deno.errors.NotFound);
  }
}

/** Whether a path exists (a file or a directory). */
export const exists = (path: string) => Deno.stat(path).then(() => true, () => false);
