// How to start another copy of this program (for `aha gpu` probes and the reference worker):
// the compiled binary runs itself; under `deno run` we run the same main.ts with Deno.

import { fileURLToPath } from "node:url";

const MAIN = new URL("../main.ts", import.meta.url);

/** True inside a `deno compile` binary (the executable is not Deno itself). */
export function isCompiled(): boolean {
  return !/(^|[\/\\])deno(\.exe)?$/.test(Deno.execPath());
}

/** The command and arguments that run `aha <args…>` in a child process. */
export function selfCommand(args: string[]): { command: string; args: string[] } {
  if (isCompiled()) return { command: Deno.execPath(), args };
  return { command: Deno.execPath(), args: ["run", "-A", fileURLToPath(MAIN), ...args] };
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
