// The adapters this machine offers. Deno gives a process one WebGPU adapter, picked by the
// DENO_WEBGPU_BACKEND environment variable, so each backend is probed in a child process of its
// own (`aha gpu --probe` prints that process's adapter as JSON).

import { selfCommand } from "../core/self_command.ts";
import type { AdapterSummary } from "./device.ts";

/** The backends Deno offers on this system, in its order of preference. */
export const BACKENDS = Deno.build.os === "darwin"
  ? ["metal"]
  : Deno.build.os === "windows"
  ? ["dx12", "vulkan"]
  : ["vulkan", "gl"];

/** The adapter a process with `env` gets, or null when it gets none (or takes too long). */
export async function probeAdapter(
  env: Record<string, string>,
  timeoutS = 60,
): Promise<AdapterSummary | null> {
  const self = selfCommand(["gpu", "--probe"]);
  try {
    const out = await new Deno.Command(self.command, {
      args: self.args,
      env: { XDG_RUNTIME_DIR: privateRuntimeDir(), ...env },
      stdout: "piped",
      stderr: "null",
      signal: AbortSignal.timeout(timeoutS * 1000),
    }).output();
    return out.success ? JSON.parse(new TextDecoder().decode(out.stdout)) : null;
  } catch {
    return null;
  }
}

/** Two probes found the same device (both software rasterizers say "llvmpipe"; features differ). */
export function sameAdapter(a: AdapterSummary, b: AdapterSummary): boolean {
  return a.description === b.description && a.isFallbackAdapter === b.isFallbackAdapter &&
    a.features.join() === b.features.join();
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
