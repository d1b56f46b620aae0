// How to start another copy of this program (for `aha gpu` probes and the reference worker):
// the compiled binary runs itself; under `deno run` we run the same entry module with Deno —
// main.ts from a checkout, or the bundle (dist/aha.js) it was bundled into. main.ts names
// itself at start-up, because inside a bundle no module can find main.ts by a relative path.

import { fileURLToPath } from "node:url";

let entry = new URL("../main.ts", import.meta.url);

/** Called by main.ts with its own URL: the module a child copy of aha is started from. */
export function setEntryModule(url: string): void {
  entry = new URL(url);
}

/** True inside a `deno compile` binary (the executable is not Deno itself). */
export function isCompiled(): boolean {
  return !/(^|[\/\\])deno(\.exe)?$/.test(Deno.execPath());
}

/** The command and arguments that run `aha <args…>` in a child process. */
export function selfCommand(args: string[]): { command: string; args: string[] } {
  if (isCompiled()) return { command: Deno.execPath(), args };
  return { command: Deno.execPath(), args: ["run", "-A", fileURLToPath(entry), ...args] };
}

/**
 * A private XDG_RUNTIME_DIR, so Mesa's Vulkan driver does not print warnings: the one set, or
 * one directory per user under the system's temporary directory (made once, mode 0700).
 */
export function privateRuntimeDir(): string {
  const existing = Deno.env.get("XDG_RUNTIME_DIR");
  if (existing) return existing;
  const tmp = Deno.env.get("TMPDIR") ?? "/tmp";
  const dir = `${tmp}/aha-xdg-${Deno.uid() ?? "user"}`;
  Deno.mkdirSync(dir, { recursive: true, mode: 0o700 });
  return dir;
}
