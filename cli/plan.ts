// `aha plan CONFIG`: the memory a training run needs (core/plan.ts) on the policy and reference
// adapters, the adapter's limits, whether it fits, and what to change. `aha train` runs the
// same check (core/plan.ts checkPlan) before it loads anything.

import { parseCommandArgs } from "./args.ts";
import { UsageError } from "../core/errors.ts";
import { type ModelConfig, parameterCount } from "../core/model_config.ts";
import {
  type AdapterLimits,
  advise,
  bindingBytes,
  describeTensor,
  formatBytes,
  keptCopyBytes,
  largestTensor,
  type PlanDType,
  planMemory,
  planModel,
  planProblems,
  referenceWorker,
  softwareLimits,
  softwareOverheadBytes,
} from "../core/plan.ts";
import { loraParameterCount } from "../core/lora.ts";
import { loadTrainConfig, type TrainConfig } from "../core/train_config.ts";
import { ArithmeticTokenizer } from "../data/arithmetic.ts";
import { cachedFile } from "../data/hub.ts";
import { requestAdapter } from "../gpu/device.ts";
import { describeAdapter, UNKNOWN_MEMORY } from "../gpu/adapters.ts";
import { BUDGET_VARIABLE, keptTextureBudget } from "../gpu/kept_textures.ts";

export const help = `usage: aha plan CONFIG.yaml [--set key=value ...] [options]

Estimates the memory of a training run before anything is loaded: weights, gradients, AdamW
moments, activations, log-prob buffers, the generation KV cache, and the reference model, per
adapter; checks the largest tensor against one storage binding and the totals against the
adapter's memory; and says what to change. "aha train" runs the same check first.

  --set key=value        override one config key, as for aha train
  --model-config FILE    the model's config.json (default: MODEL/config.json, else the built-in
                         Qwen2.5 0.5B/1.5B/3B/7B shape named by the model path)
  --memory-gb N          the adapter's memory in GiB (WebGPU does not report it; default:
                         unknown, or the system RAM for a software adapter)
  --max-binding-gb N     plan for another adapter: its maxStorageBufferBindingSize in GiB
  --max-buffer-gb N      and its maxBufferSize in GiB (with both, this machine's GPU is not asked)`;

/** Prints the plan; exits 1 when the run does not fit, so scripts can check before renting. */
export async function run(args: string[]): Promise<number> {
  const { values, positionals } = parseCommandArgs("plan", args, {
    set: { type: "string", multiple: true },
    "model-config": { type: "string" },
    "memory-gb": { type: "string" },
    "max-binding-gb": { type: "string" },
    "max-buffer-gb": { type: "string" },
  }, true);
  if (positionals.length !== 1) {
    throw new UsageError(`plan: expected one config file (see "aha plan --help")`);
  }
  const cfg = loadTrainConfig(positionals[0], (values.set ?? []) as string[]);
  const gib = (name: "memory-gb" | "max-binding-gb" | "max-buffer-gb") => {
    const text = values[name];
    if (text === undefined) return undefined;
    const n = Number(text);
    if (!(n > 0)) throw new UsageError(`plan: --${name} must be a positive number, got "${text}"`);
    return n * 2 ** 30;
  };
  // A Hub id's config.json from the Hugging Face cache when it is there (nothing is fetched).
  const cachedConfig = cfg.model === null ? null : await cachedFile(cfg.model, "config.json");
  const model = await planModel(
    cfg,
    new ArithmeticTokenizer().vocabSize,
    (values["model-config"] as string | undefined) ?? cachedConfig ?? undefined,
  );
  const binding = gib("max-binding-gb"), buffer = gib("max-buffer-gb"), memory = gib("memory-gb");
  const { limits, memoryNote, software } = binding !== undefined && buffer !== undefined
    ? {
      limits: {
        description: "as stated by --max-binding-gb and --max-buffer-gb",
        maxStorageBufferBindingSize: binding,
        maxBufferSize: buffer,
        memory: memory ?? null,
      },
      memoryNote: memory === undefined ? UNKNOWN_MEMORY : "--memory-gb",
      software: false,
    }
    : describeAdapter(await requestAdapter(), memory, binding, buffer);
  // A software adapter's memory is the machine's, which the program itself also takes.
  const overhead = softwareOverheadBytes(cfg, model.config, model.dtype);
  const usable = software && limits.memory !== null ? softwareLimits(limits, overhead) : limits;
  const note = usable === limits
    ? memoryNote
    : `${memoryNote}, ${formatBytes(limits.memory!)} less ${
      formatBytes(overhead)
    } for the program and per-use copies of weights`;
  console.log(planReport(positionals[0], cfg, model, usable, note, software).join("\n"));
  const plan = planMemory(cfg, model.config, undefined, model.dtype, bindingBytes(usable));
  return planProblems(plan, usable).length === 0 ? 0 : 1;
}

/**
 * The printed plan: the table per adapter, the limits, the verdict and advice; on a software
 * adapter, also the room the run leaves for the kernels' kept texture copies.
 */
export function planReport(
  source: string,
  cfg: TrainConfig,
  model: { config: ModelConfig; source: string; dtype: PlanDType },
  limits: AdapterLimits,
  memoryNote: string,
  software = false,
): string[] {
  const plan = planMemory(cfg, model.config, undefined, model.dtype, bindingBytes(limits));
  const c = model.config;
  const lines = [
    `plan for ${source}`,
    `model ${cfg.model ?? "(built-in)"}: ${(parameterCount(c) / 1e6).toFixed(1)}M parameters, ` +
    `${c.numLayers} layers, hidden ${c.hiddenSize}, vocab ${c.vocabSize}` +
    `${c.tieWordEmbeddings ? " (tied)" : ""}; shape from ${model.source}`,
    trainingLine(cfg, c, model.dtype),
    `adapter ${limits.description}: maxStorageBufferBindingSize ` +
    `${formatBytes(limits.maxStorageBufferBindingSize)}, maxBufferSize ` +
    `${formatBytes(limits.maxBufferSize)}, memory ` +
    `${limits.memory === null ? "" : formatBytes(limits.memory) + " "}(${memoryNote})`,
    "",
  ];
  const rows: string[][] = []; // a heading, or [what, detail, bytes, largest tensor]
  for (const adapter of ["policy", "reference"] as const) {
    const items = plan.items.filter((i) => i.adapter === adapter);
    if (items.length === 0) continue;
    const where = adapter === "policy"
      ? "policy adapter"
      : plan.referenceShared && cfg.lora !== null
      ? `reference (reference.adapter ${cfg.reference.adapter}: the LoRA run's base, in the ` +
        `training process with the adapters off, sharing the policy's frozen weights)`
      : plan.referenceShared
      ? `reference (reference.adapter ${cfg.reference.adapter}: on the policy adapter, adding to it)`
      : `reference (reference.adapter ${cfg.reference.adapter}: a second adapter, same limits assumed)`;
    rows.push([where]);
    for (const item of items) {
      rows.push([
        `  ${item.what}`,
        item.detail,
        formatBytes(item.bytes),
        describeTensor(largestTensor(item)),
      ]);
    }
    const total = adapter === "policy" ? plan.policyBytes : plan.referenceBytes;
    rows.push(["  total", "", formatBytes(total), ""]);
  }
  // Columns: what, what it depends on, bytes, its largest tensor (headings stand alone).
  const cells = rows.filter((r) => r.length > 1);
  const widths = [0, 1, 2].map((i) => Math.max(...cells.map((r) => r[i].length)));
  for (const r of rows) {
    if (r.length === 1) lines.push(r[0]);
    else {
      const [what, detail, bytes, largest] = r;
      lines.push(
        [what.padEnd(widths[0]), detail.padEnd(widths[1]), bytes.padStart(widths[2]), largest]
          .join("  ").trimEnd(),
      );
    }
  }
  if (plan.referenceOnCpu) {
    lines.push(
      `reference (reference.engine ${cfg.reference.engine}): onnxruntime-web's WASM engine in ` +
        "its worker process, in CPU memory: not on an adapter",
    );
  }
  if (plan.referenceShared && plan.referenceBytes > 0) {
    lines.push(
      `policy + reference on one adapter: ${formatBytes(plan.policyBytes + plan.referenceBytes)}`,
    );
  }
  const problems = planProblems(plan, limits);
  lines.push("");
  if (problems.length === 0) {
    lines.push(
      limits.memory === null
        ? "fits the adapter's binding limits (memory unknown: compare the totals with your adapter's)"
        : "fits this adapter",
    );
    if (software && limits.memory !== null) {
      const stated = keptTextureBudget();
      const share = formatBytes(stated ?? keptCopyBytes(plan, limits.memory, cfg));
      lines.push(
        `kept texture copies (the kernels' operands on this software adapter): ${share} for ` +
          `the trainer${referenceWorker(cfg) ? ` and ${share} for the reference worker` : ""}, ` +
          (stated === null
            ? `what the run leaves of memory (${BUDGET_VARIABLE} overrides)`
            : `as ${BUDGET_VARIABLE} says`) +
          "; past it, operands are copied at each use (slower, no more memory)",
      );
    }
    return lines;
  }
  lines.push("does not fit:", ...problems.map((p) => `  - ${p}`), "advice:");
  lines.push(
    ...advise(cfg, c, limits, plan.referenceShared, true, model.dtype).map((a) => `  - ${a}`),
  );
  return lines;
}

/** What is trained and how memory is saved: LoRA or full fine-tuning, and the memory keys. */
function trainingLine(cfg: TrainConfig, c: ModelConfig, checkpointDtype: PlanDType): string {
  const lora = cfg.lora;
  const what = lora === null
    ? "full fine-tuning (every weight trained, f32)"
    : `LoRA r ${lora.r}, alpha ${lora.alpha} on ${lora.target_modules.join(", ")}: ` +
      `${(loraParameterCount(c, lora) / 1e6).toFixed(2)}M trained parameters`;
  const frozen = cfg.frozen_dtype === "auto" ? `auto = ${checkpointDtype}` : cfg.frozen_dtype;
  return `training: ${what}; frozen_dtype ${frozen}, gradient_checkpointing ` +
    `${cfg.gradient_checkpointing}, kv_cache_dtype ${cfg.kv_cache_dtype}`;
}
