// `aha sft`: supervised fine-tuning of a checkpoint on {"prompt", "completion"} JSONL rows, the
// loss on completion tokens only — the "cold start" many GRPO recipes run first.

import { intOption, parseCommandArgs, required } from "./args.ts";
import { type Checkpoint, loadCheckpoint, saveCheckpoint } from "../core/checkpoint.ts";
import type { ModelConfig } from "../core/model_config.ts";
import { LOCK_FILE, lockRunDir } from "../core/run_dir.ts";
import { AhaError, UsageError } from "../core/errors.ts";
import { runSft, type SftRow } from "../core/sft.ts";
import { TRAINING_STATE_FILES } from "../core/train_state.ts";
import { loadTokenizer, type TextTokenizer } from "../core/tokenizer.ts";
import { ArithmeticTokenizer } from "../data/arithmetic.ts";
import { ARITHMETIC_TOKENIZER_FILE } from "../data/tasks.ts";
import { Gpu, modelNeeds } from "../gpu/device.ts";
import { GpuModel } from "../gpu/model.ts";
import { resolveModel } from "../data/hub.ts";
import { GpuPolicy } from "../gpu/policy.ts";

export const help = `usage: aha sft --model DIR --data FILE.jsonl [--out DIR] [--force] [options]

Fine-tunes a checkpoint on {"prompt": ..., "completion": ...} rows (one JSON object per line),
the loss on completion tokens only. Text is tokenized as is with the model's tokenizer (no chat
template): put the template into the prompts if the model expects one.

  --model DIR|ID       the checkpoint to start from (with its tokenizer files), or a Hub id
  --data FILE          JSONL rows {"prompt", "completion"}
  --out DIR            where to write the result (default: DIR-sft); refused if it exists, is
                       not empty and is not a checkpoint (config.json + model weights)
  --force              replace DIR whatever it holds
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
    force: { type: "boolean" },
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
  if (!(lr > 0 && lr < Infinity)) {
    throw new UsageError(
      `sft: --learning-rate must be a positive finite number, got "${values["learning-rate"]}"`,
    );
  }
  if (steps < 1 || batchSize < 1) {
    throw new UsageError(`sft: --steps and --batch-size must be at least 1`);
  }

  const checkpoint = await loadCheckpoint(modelDir);
  const tokenizer = await modelTokenizer(modelDir);
  const rows = await readRows(dataPath, tokenizer, checkpoint.config);
  await checkOutputDir(out, values.force === true);
  const lock = await lockRunDir(out, "sft");
  try {
    await train(modelDir, out, checkpoint, rows, { steps, batchSize, lr, seed });
  } finally {
    lock.release();
  }
}

/** The output may be missing, empty, or a checkpoint (replaced); anything else needs --force. */
async function checkOutputDir(out: string, force: boolean): Promise<void> {
  const names: string[] = [];
  try {
    for await (const entry of Deno.readDir(out)) names.push(entry.name);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return;
    if (e instanceof Deno.errors.NotADirectory) {
      throw new AhaError(`sft: --out ${out} is a file, not a directory`);
    }
    throw new AhaError(`sft: --out ${out}: cannot read (${(e as Error).message})`);
  }
  const own = new Set([LOCK_FILE]);
  const rest = names.filter((n) => !own.has(n));
  const isCheckpoint = rest.includes("config.json") &&
    rest.some((n) => /^model.*\.safetensors/.test(n));
  if (rest.length === 0 || isCheckpoint || force) return;
  throw new AhaError(
    `sft: --out ${out} exists and is not an aha checkpoint (it holds ${
      rest.slice(0, 3).join(", ")
    }` +
      `${rest.length > 3 ? ", ..." : ""}): use --force to replace it and everything in it`,
  );
}

async function train(
  modelDir: string,
  out: string,
  checkpoint: Checkpoint,
  rows: SftRow[],
  { steps, batchSize, lr, seed }: { steps: number; batchSize: number; lr: number; seed: number },
): Promise<void> {
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
  // Beside the new weights: the model's other files (tokenizer, generation config), not how its
  // old weights were trained.
  const files: Record<string, Uint8Array> = {};
  for (const entry of Deno.readDirSync(modelDir)) {
    const weightsOrConfig = /^(model.*\.safetensors.*|config\.json)$/.test(entry.name);
    if (entry.isFile && !weightsOrConfig && !TRAINING_STATE_FILES.includes(entry.name)) {
      files[entry.name] = Deno.readFileSync(`${modelDir}/${entry.name}`);
    }
  }
  await saveCheckpoint(out, checkpoint.hfConfig, policy.forSaving().weights, files);
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

/** The longest row read: far beyond any prompt + completion a model holds. */
const MAX_ROW_CHARS = 1_000_000;

async function readRows(
  path: string,
  tokenizer: TextTokenizer,
  config: ModelConfig,
): Promise<SftRow[]> {
  const vocabSize = config.vocabSize;
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (e) {
    throw new AhaError(`${path}: cannot read (${(e as Error).message})`);
  }
  const rows: SftRow[] = [];
  text.split("\n").forEach((line, i) => {
    if (line.trim() === "") return;
    // Measured before it is tokenized whole: a huge line is refused, not a V8 out-of-memory.
    if (line.length > MAX_ROW_CHARS) {
      throw new AhaError(
        `${path}:${i + 1}: a row of ${line.length} characters (at most ${MAX_ROW_CHARS})`,
      );
    }
    let row: { prompt?: unknown; completion?: unknown } | null;
    try {
      row = JSON.parse(line);
    } catch {
      throw new AhaError(`${path}:${i + 1}: not valid JSON`);
    }
    if (
      typeof row !== "object" || row === null ||
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
    const length = promptIds.length + completionIds.length;
    if (length > config.maxPositionEmbeddings) {
      throw new AhaError(
        `${path}:${i + 1}: prompt + completion are ${length} tokens, more than the model's ` +
          `max_position_embeddings (${config.maxPositionEmbeddings})`,
      );
    }
    rows.push({ promptIds, completionIds });
  });
  if (rows.length === 0) throw new AhaError(`${path}: no rows`);
  return rows;
}
