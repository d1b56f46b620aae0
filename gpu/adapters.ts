// The adapters this machine offers. Deno gives a process one WebGPU adapter, picked by the
// DENO_WEBGPU_BACKEND environment variable, so each backend is probed in a child process of its
// own (`aha gpu --probe` prints that process's adapter as JSON).

import { privateRuntimeDir, selfCommand } from "../core/self_command.ts";
import type { AdapterLimits } from "../core/plan.ts";
import { type AdapterSummary, isSoftwareAdapter } from "./device.ts";

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

export const UNKNOWN_MEMORY = "unknown: WebGPU does not report it; state it with --memory-gb N";

/** The adapter's limits, with its memory where known: stated, or the RAM of a software adapter. */
export function describeAdapter(
  adapter: GPUAdapter,
  memoryBytes?: number,
  maxBinding?: number,
  maxBuffer?: number,
): { limits: AdapterLimits; memoryNote: string; software: boolean } {
  const info = adapter.info;
  const software = isSoftwareAdapter(adapter);
  const memory = memoryBytes ?? (software ? Deno.systemMemoryInfo().total : null);
  return {
    limits: {
      description: info.description || info.vendor || "WebGPU adapter",
      maxStorageBufferBindingSize: maxBinding ?? adapter.limits.maxStorageBufferBindingSize,
      maxBufferSize: maxBuffer ?? adapter.limits.maxBufferSize,
      memory,
    },
    memoryNote: memoryBytes !== undefined
      ? "--memory-gb"
      : software
      ? "the system RAM: a software adapter"
      : UNKNOWN_MEMORY,
    software,
  };
}
