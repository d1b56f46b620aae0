// `aha plan CONFIG`: the memory a training run needs (core/plan.ts) on the policy and reference
// adapters, the adapter's limits, whether it fits, and what to change. Also where `aha train`
// gets the model shape and the adapter's limits for the same check.

import { parseCommandArgs } from "../core/cli_args.ts";
import { AhaError, UsageError } from "../core/errors.ts";
import {
  type ModelConfig,
  parameterCount,
  parseModelConfig,
  PRESETS,
} from "../core/model_config.ts";
import {
  type AdapterLimits,
  advise,
  builtinShape,
  describeTensor,
  formatBytes,
  largestTensor,
  planMemory,
  planProblems,
} from "../core/plan.ts";
import { loadTrainConfig, type TrainConfig } from "../core/train_config.ts";
import { ArithmeticTokenizer } from "../data/arithmetic.ts";
import { requestAdapter } from "./device.ts";

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

export async function run(args: string[]): Promise<void> {
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
  const model = await planModel(cfg, values["model-config"] as string | undefined);
  const binding = gib("max-binding-gb"), buffer = gib("max-buffer-gb"), memory = gib("memory-gb");
  const { limits, memoryNote } = binding !== undefined && buffer !== undefined
    ? {
      limits: {
        description: "as stated by --max-binding-gb and --max-buffer-gb",
        maxStorageBufferBindingSize: binding,
        maxBufferSize: buffer,
        memory: memory ?? null,
      },
      memoryNote: memory === undefined ? UNKNOWN_MEMORY : "--memory-gb",
    }
    : describeAdapter(await requestAdapter(), memory, binding, buffer);
  console.log(planReport(positionals[0], cfg, model, limits, memoryNote).join("\n"));
}

const UNKNOWN_MEMORY = "unknown: WebGPU does not report it; state it with --memory-gb N";

/** The model's shape: --model-config, else MODEL/config.json, else the built-in table. */
export async function planModel(
  cfg: TrainConfig,
  modelConfigFile?: string,
): Promise<{ config: ModelConfig; source: string }> {
  const file = modelConfigFile ?? (cfg.model === null ? null : `${cfg.model}/config.json`);
  const text = file === null ? null : await Deno.readTextFile(file).catch((e) => {
    if (e instanceof Deno.errors.NotFound && modelConfigFile === undefined) return null;
    throw new AhaError(`${file}: cannot read: ${(e as Error).message}`);
  });
  if (file !== null && text !== null) {
    let json: unknown;
    try {
      json = JSON.parse(text);
    } catch {
      throw new AhaError(`${file}: not valid JSON`);
    }
    return { config: parseModelConfig(json, file), source: file };
  }
  if (cfg.model === null) {
    const vocab = new ArithmeticTokenizer().vocabSize;
    return {
      config: parseModelConfig({ ...PRESETS.tiny, vocab_size: vocab }),
      source: "the built-in tiny model",
    };
  }
  const shape = builtinShape(cfg.model);
  if (shape === null) {
    throw new AhaError(
      `${cfg.model}/config.json: not found, and the name is not one of the built-in Qwen2.5 ` +
        `shapes (0.5B, 1.5B, 3B, 7B): pass --model-config FILE`,
    );
  }
  return { config: parseModelConfig(shape), source: `the built-in Qwen2.5 table (no ${file})` };
}

/** The adapter's limits, with its memory where known: stated, or the RAM of a software adapter. */
export function describeAdapter(
  adapter: GPUAdapter,
  memoryBytes?: number,
  maxBinding?: number,
  maxBuffer?: number,
): { limits: AdapterLimits; memoryNote: string } {
  const info = adapter.info as GPUAdapterInfo & { isFallbackAdapter?: boolean };
  const software = info.isFallbackAdapter === true ||
    /llvmpipe|lavapipe|swiftshader|software/i.test(`${info.description} ${info.device}`);
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
  };
}

/** The printed plan: the table per adapter, the limits, the verdict and advice. */
export function planReport(
  source: string,
  cfg: TrainConfig,
  model: { config: ModelConfig; source: string },
  limits: AdapterLimits,
  memoryNote: string,
): string[] {
  const plan = planMemory(cfg, model.config);
  const c = model.config;
  const lines = [
    `plan for ${source}`,
    `model ${cfg.model ?? "(built-in)"}: ${(parameterCount(c) / 1e6).toFixed(1)}M parameters, ` +
    `${c.numLayers} layers, hidden ${c.hiddenSize}, vocab ${c.vocabSize}` +
    `${c.tieWordEmbeddings ? " (tied)" : ""}; shape from ${model.source}`,
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
    return lines;
  }
  lines.push("does not fit:", ...problems.map((p) => `  - ${p}`), "advice:");
  lines.push(...advise(cfg, c, limits, plan.referenceShared).map((a) => `  - ${a}`));
  return lines;
}
