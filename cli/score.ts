// `aha score`: per-token log-probs of token sequences under a checkpoint — the stable public
// interface for comparing aha's numbers with any other implementation.

import { checkOutputPath, intOption, parseCommandArgs, required, writeOutput } from "./args.ts";
import { loadCheckpoint, readJson } from "../core/checkpoint.ts";
import { parseModelConfig, weightShapes } from "../core/model_config.ts";
import { type FrozenDtype, frozenWeightDtypes } from "../core/half.ts";
import { AhaError, UsageError } from "../core/errors.ts";
import { loadAdapter } from "../core/lora.ts";
import { Gpu, modelNeeds } from "../gpu/device.ts";
import { GpuModel } from "../gpu/model.ts";
import { scoreSequences } from "../gpu/score.ts";
import { resolveModel } from "../data/hub.ts";

export const help =
  `usage: aha score --model DIR [--adapter DIR] --input IN.json [--output OUT.json]
                 [--engine webgpu|onnx] [--frozen-dtype auto|bf16|f16|f32]

Computes per-token log-probabilities. IN.json is {"sequences": [[token ids...], ...]} (lengths
may differ); the output is {"logprobs": [[...], ...]} where row i has len(seq_i) - 1 values and
value t is log p(seq_i[t+1] | seq_i[0..t]).

  --model DIR|ID   Hugging Face checkpoint directory (config.json + model.safetensors), or a
                   Hub id ORG/NAME[@revision] (fetched into the Hugging Face cache if missing)
  --adapter DIR    a PEFT LoRA adapter of that model (adapter_config.json +
                   adapter_model.safetensors); webgpu engine only
  --input FILE     the sequences
  --output FILE    where to write the result (default: standard output)
  --engine NAME    webgpu (default: aha's own kernels) or onnx (onnxruntime-web, WASM)
  --threads N      threads for the onnx engine (default 2)
  --frozen-dtype T how the webgpu engine stores the weight matrices: auto (default: each
                   tensor's dtype in the checkpoint, so BF16 stays 16-bit, widened exactly in
                   the kernels), bf16, f16 (needs shader-f16) or f32`;

export async function run(args: string[]): Promise<void> {
  const { values } = parseCommandArgs("score", args, {
    model: { type: "string" },
    adapter: { type: "string" },
    input: { type: "string" },
    output: { type: "string" },
    engine: { type: "string", default: "webgpu" },
    threads: { type: "string" },
    "frozen-dtype": { type: "string", default: "auto" },
  });
  const modelDir = await resolveModel(required("score", "model", values.model));
  const inputPath = required("score", "input", values.input);
  const engine = values.engine;
  if (engine !== "webgpu" && engine !== "onnx") {
    throw new UsageError(`score: --engine must be webgpu or onnx, got "${engine}"`);
  }
  const threads = intOption("score", "threads", values.threads, 2);
  if (values.output) await checkOutputPath(values.output as string);
  const frozenDtype = values["frozen-dtype"];
  if (!["auto", "bf16", "f16", "f32"].includes(frozenDtype)) {
    throw new UsageError(
      `score: --frozen-dtype must be auto, bf16, f16 or f32, got "${frozenDtype}"`,
    );
  }
  if (values.adapter !== undefined && engine === "onnx") {
    throw new UsageError("score: --adapter needs --engine webgpu (or merge it first: aha merge)");
  }
  const sequences = await readSequences(inputPath);
  const configPath = `${modelDir}/config.json`;
  const config = parseModelConfig(await readJson(configPath), configPath);
  checkTokenIds(inputPath, sequences, config.vocabSize);
  // Both engines refuse what the model cannot hold (positions past its RoPE table).
  sequences.forEach((s, i) => {
    if (s.length > config.maxPositionEmbeddings) {
      throw new AhaError(
        `${inputPath}: sequences[${i}] has ${s.length} tokens, more than the model's ` +
          `max_position_embeddings (${config.maxPositionEmbeddings})`,
      );
    }
  });

  let logprobs: number[][];
  if (engine === "onnx") {
    const { scoreWithOnnx } = await import("../reference/score_onnx.ts");
    logprobs = await scoreWithOnnx(modelDir, sequences, threads);
  } else {
    const checkpoint = await loadCheckpoint(modelDir);
    const lora = values.adapter === undefined
      ? undefined
      : await loadAdapter(values.adapter, checkpoint.config);
    const gpu = await Gpu.open(modelNeeds(checkpoint.config));
    const weightDtypes = frozenWeightDtypes(
      frozenDtype as FrozenDtype,
      weightShapes(checkpoint.config),
      checkpoint.dtypes,
      gpu.hasF16,
    );
    const model = new GpuModel(gpu, checkpoint.config, checkpoint.weights, { weightDtypes, lora });
    logprobs = await scoreSequences(model, sequences);
    model.destroy();
    gpu.destroy();
  }
  const text = JSON.stringify({ logprobs });
  if (values.output) await writeOutput(values.output, text + "\n");
  else console.log(text);
}

async function readSequences(path: string): Promise<number[][]> {
  let json: unknown;
  try {
    json = JSON.parse(await Deno.readTextFile(path));
  } catch (e) {
    throw new AhaError(
      `${path}: ${e instanceof SyntaxError ? "not valid JSON" : (e as Error).message}`,
    );
  }
  const sequences = (json as { sequences?: unknown })?.sequences;
  if (!Array.isArray(sequences)) {
    throw new AhaError(`${path}: field "sequences" must be an array of token-id arrays`);
  }
  sequences.forEach((s, i) => {
    if (!Array.isArray(s) || !s.every((t) => Number.isInteger(t))) {
      throw new AhaError(`${path}: sequences[${i}] must be an array of integer token ids`);
    }
  });
  return sequences as number[][];
}

export function checkTokenIds(path: string, sequences: number[][], vocabSize: number): void {
  sequences.forEach((s, i) => {
    const bad = s.findIndex((t) => t < 0 || t >= vocabSize);
    if (bad >= 0) {
      throw new AhaError(
        `${path}: sequences[${i}][${bad}] = ${s[bad]} is outside the vocabulary [0, ${vocabSize})`,
      );
    }
  });
}
