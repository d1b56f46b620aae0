// `aha gpu`: the WebGPU adapters this machine offers and the one the trainer would use.
// Deno gives a process one adapter, picked by DENO_WEBGPU_BACKEND, so each backend is probed in
// a child process of its own.

import { parseCommandArgs } from "./args.ts";
import { BACKENDS, probeAdapter, sameAdapter } from "../gpu/adapters.ts";
import { type AdapterSummary, requestAdapter, summarizeAdapter } from "../gpu/device.ts";

export const help = `usage: aha gpu [--json]

Lists the WebGPU adapters this machine offers, one per backend Deno can use here (Deno picks
the backend from DENO_WEBGPU_BACKEND), with their key limits and features, and says which one
the trainer uses (the default backend, or DENO_WEBGPU_BACKEND when set).

  --json   print the list as JSON`;

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
  const probe = (backend: string | null) =>
    probeAdapter(backend ? { DENO_WEBGPU_BACKEND: backend } : {});
  const trainer = await probe(trainerBackend);
  for (const backend of BACKENDS) {
    const a = await probe(backend);
    if (!a) continue;
    const same = trainer !== null && trainerBackend === null
      ? sameAdapter(a, trainer)
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
