// `aha sft`: supervised fine-tuning of a checkpoint on {"prompt", "completion"} JSONL rows, the
// loss on completion tokens only — the "cold start" many GRPO recipes run first.

import { intOption, parseCommandArgs, required } from "./args.ts";
import { loadCheckpoint, saveCheckpoint } from "../core/checkpoint.ts";
import { AhaError, UsageError } from "../core/errors.ts";
import { runSft, type SftRow } from "../core/sft.ts";
import { loadTokenizer, type TextTokenizer } from "../core/tokenizer.ts";
import { ArithmeticTokenizer } from "../data/arithmetic.ts";
import { ARITHMETIC_TOKENIZER_FILE } from "../data/tasks.ts";
import { Gpu, modelNeeds } from "../gpu/device.ts";
import { GpuModel } from "../gpu/model.ts";
import { resolveModel } from "../data/hub.ts";
import { GpuPolicy } from "../gpu/policy.ts";

export const help = `usage: aha sft --model DIR --data FILE.jsonl [--out DIR] [options]

Fine-tunes a checkpoint on {"prompt": ..., "completion": ...} rows (one JSON object per line),
the loss on completion tokens only. Text is tokenized as is with the model's tokenizer (no chat
template): put the template into the prompts if the model expects one.

  --model DIR|ID       the checkpoint to start from (with its tokenizer files), or a Hub id
  --data FILE          JSONL rows {"prompt", "completion"}
  --out DIR            where to write the result (default: DIR-sft)
  --steps N            optimizer steps (default 200)
  --batch-size N       rows per step (default 32)
  --learning-rate X    AdamW learning rate (default 1e-3; 1e-5 suits large pretrained models)
  --seed N             row order (default 0)`;

export async function run(args: string[]): Promise<void> {
  const { values } = parseCommandArgs("sft", args, {
    model: { type: "string" },
    data: { type: "string" },
    out: { type: "string" },
    steps: { type: "string" },
    "batch-size": { type: "string" },
    "learning-rate": { type: "string" },
    seed: { type: "string" },
  });
  const modelArg = required("sft", "model", values.model);
  const dataPath = required("sft", "data", values.data);
  const modelDir = await resolveModel(modelArg);
  // Beside a local model; in the current directory for a Hub id (never inside the cache).
  const out = values.out ??
    `${modelDir === modelArg ? modelArg.replace(/\/+$/, "") : modelArg.split(/[@/]/)[1]}-sft`;
  const steps = intOption("sft", "steps", values.steps, 200);
  const batchSize = intOption("sft", "batch-size", values["batch-size"], 32);
  const seed = intOption("sft", "seed", values.seed, 0);
  const lr = Number(values["learning-rate"] ?? 1e-3);
  if (!(lr > 0)) throw new UsageError(`sft: --learning-rate must be a positive number`);
  if (steps < 1 || batchSize < 1) {
    throw new UsageError(`sft: --steps and --batch-size must be at least 1`);
  }

  const checkpoint = await loadCheckpoint(modelDir);
  const tokenizer = await modelTokenizer(modelDir);
  const rows = await readRows(dataPath, tokenizer, checkpoint.config.vocabSize);
  const gpu = await Gpu.open(modelNeeds(checkpoint.config));
  const policy = new GpuPolicy(new GpuModel(gpu, checkpoint.config, checkpoint.weights));
  console.log(
    `aha sft: ${rows.length} rows, ${steps} steps of ${batchSize} on "${gpu.description}"`,
  );
  await runSft(policy, rows, {
    steps,
    batchSize,
    optimizer: { lr, beta1: 0.9, beta2: 0.99, eps: 1e-8, weightDecay: 0, maxGradNorm: 1 },
    warmupSteps: Math.min(10, steps),
    seed,
    onStep: (step, loss) => {
      if (step % 10 === 0 || step === steps) {
        console.log(`step ${step}/${steps}: loss ${loss.toFixed(4)}`);
      }
    },
  });
  const files: Record<string, Uint8Array> = {};
  for (const entry of Deno.readDirSync(modelDir)) {
    if (entry.isFile && !/^(model.*\.safetensors.*|config\.json)$/.test(entry.name)) {
      files[entry.name] = Deno.readFileSync(`${modelDir}/${entry.name}`);
    }
  }
  await saveCheckpoint(out, checkpoint.hfConfig, await policy.weights(), files);
  policy.model.destroy();
  console.log(`saved ${out}`);
}

/** The tokenizer a checkpoint was trained with: the arithmetic task's, or its Hugging Face one. */
export async function modelTokenizer(dir: string): Promise<TextTokenizer> {
  const arithmetic = await Deno.stat(`${dir}/${ARITHMETIC_TOKENIZER_FILE}`).then(
    () => true,
    () => false,
  );
  return arithmetic ? new ArithmeticTokenizer() : await loadTokenizer(dir);
}

async function readRows(
  path: string,
  tokenizer: TextTokenizer,
  vocabSize: number,
): Promise<SftRow[]> {
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (e) {
    throw new AhaError(`${path}: cannot read (${(e as Error).message})`);
  }
  const rows: SftRow[] = [];
  text.split("\n").forEach((line, i) => {
    if (line.trim() === "") return;
    let row: { prompt?: unknown; completion?: unknown };
    try {
      row = JSON.parse(line);
    } catch {
      throw new AhaError(`${path}:${i + 1}: not valid JSON`);
    }
    if (
      typeof row.prompt !== "string" || typeof row.completion !== "string" || row.completion === ""
    ) {
      throw new AhaError(
        `${path}:${i + 1}: expected {"prompt": string, "completion": non-empty string}`,
      );
    }
    const promptIds = tokenizer.encode(row.prompt),
      completionIds = tokenizer.encode(row.completion);
    if (promptIds.length === 0) {
      throw new AhaError(`${path}:${i + 1}: the prompt must not be empty`);
    }
    if ([...promptIds, ...completionIds].some((id) => id >= vocabSize)) {
      throw new AhaError(
        `${path}:${i + 1}: a token id is outside the model's vocabulary of ${vocabSize}`,
      );
    }
    rows.push({ promptIds, completionIds });
  });
  if (rows.length === 0) throw new AhaError(`${path}: no rows`);
  return rows;
}
