// `aha gpu`: the WebGPU adapters this machine offers and the one the trainer would use.
// Deno gives a process one adapter, picked by DENO_WEBGPU_BACKEND, so each backend is probed in
// a child process of its own.

import { parseCommandArgs } from "../core/cli_args.ts";
import { selfCommand } from "../core/self_command.ts";
import { type AdapterSummary, requestAdapter, summarizeAdapter } from "./device.ts";

export const help = `usage: aha gpu [--json]

Lists the WebGPU adapters this machine offers, one per backend Deno can use here (Deno picks
the backend from DENO_WEBGPU_BACKEND), with their key limits and features, and says which one
the trainer uses (the default backend, or DENO_WEBGPU_BACKEND when set).

  --json   print the list as JSON`;

const BACKENDS = Deno.build.os === "darwin"
  ? ["metal"]
  : Deno.build.os === "windows"
  ? ["dx12", "vulkan"]
  : ["vulkan", "gl"];

export async function run(args: string[]): Promise<void> {
  const { values } = parseCommandArgs("gpu", args, {
    json: { type: "boolean" },
    probe: { type: "boolean" },
  });
  if (values.probe) {
    console.log(JSON.stringify(summarizeAdapter(await requestAdapter())));
    return;
  }
  const trainerBackend = Deno.env.get("DENO_WEBGPU_BACKEND") ?? null;
  const found: (AdapterSummary & { usedByTrainer: boolean })[] = [];
  const probe = async (backend: string | null) => {
    const self = selfCommand(["gpu", "--probe"]);
    const env: Record<string, string> = { XDG_RUNTIME_DIR: privateRuntimeDir() };
    if (backend) env.DENO_WEBGPU_BACKEND = backend;
    const out = await new Deno.Command(self.command, {
      args: self.args,
      env,
      stdout: "piped",
      stderr: "null",
    }).output();
    if (!out.success) return null;
    return JSON.parse(new TextDecoder().decode(out.stdout)) as AdapterSummary;
  };
  const trainer = await probe(trainerBackend);
  for (const backend of BACKENDS) {
    const a = await probe(backend);
    if (!a) continue;
    const same = trainer !== null && trainerBackend === null
      ? a.description === trainer.description &&
        JSON.stringify(a.features) === JSON.stringify(trainer.features)
      : trainerBackend === backend;
    found.push({ ...a, backend, usedByTrainer: same });
  }
  if (values.json) {
    console.log(JSON.stringify(found, null, 2));
    return;
  }
  if (found.length === 0) {
    console.log(
      "no WebGPU adapter found (install Mesa: llvmpipe, or lavapipe via mesa-vulkan-drivers)",
    );
  }
  for (const a of found) {
    console.log(
      `${a.usedByTrainer ? "*" : " "} ${a.backend.padEnd(7)} ${a.description}${
        a.isFallbackAdapter ? " (software fallback)" : ""
      }`,
    );
    console.log(
      `          maxBufferSize ${a.limits.maxBufferSize}, maxStorageBufferBindingSize ${a.limits.maxStorageBufferBindingSize}, storage buffers/stage ${a.limits.maxStorageBuffersPerShaderStage}`,
    );
    console.log(`          features: ${a.features.join(", ") || "(none)"}`);
  }
  if (found.length) {
    console.log(
      `* = the adapter the trainer uses${
        trainerBackend ? ` (DENO_WEBGPU_BACKEND=${trainerBackend})` : " (default backend)"
      }`,
    );
  }
}

/** A private XDG_RUNTIME_DIR for children, so Mesa's Vulkan driver does not print warnings. */
export function privateRuntimeDir(): string {
  const existing = Deno.env.get("XDG_RUNTIME_DIR");
  if (existing) return existing;
  const dir = Deno.makeTempDirSync({ prefix: "aha-xdg-" });
  Deno.chmodSync(dir, 0o700);
  return dir;
}
