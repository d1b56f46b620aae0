// aha's second, independent reference engine: a checkpoint exported to ONNX (onnx_export.ts) and
// run by onnxruntime-web's WebAssembly backend (SIMD, CPU threads). The export is cached next to
// the checkpoint as <dir>/.aha-onnx/<hash>.onnx, the hash covering the exporter version,
// config.json and the weight files, so changed weights are re-exported and unchanged ones load
// without reading the weights at all.

import * as ort from "onnxruntime-web";
import { createHash } from "node:crypto";
import { loadCheckpoint } from "../core/checkpoint.ts";
import { AhaError } from "../core/errors.ts";
import { type ModelConfig, parseModelConfig } from "../core/model_config.ts";
import { EXPORT_VERSION, exportOnnx } from "./onnx_export.ts";

export interface OnnxEngineOptions {
  /** WebAssembly threads (default: every core). Fixed by the first engine of the process. */
  threads?: number;
  /** An existing export to run instead of exporting the checkpoint. */
  onnxPath?: string;
}

/** Floats of logits (and as many of log-softmax) one run may hold: batches are cut to fit. */
const LOGITS_BUDGET = 1 << 24;
const CACHE_DIR = ".aha-onnx";

export class OnnxEngine {
  private constructor(
    private session: ort.InferenceSession,
    readonly config: ModelConfig,
    /** The WebAssembly threads actually in use (1 when threads are unavailable). */
    readonly threads: number,
    readonly description: string,
    /** The export's origin (a file, or "exported in memory"), for error messages. */
    private origin: string,
  ) {}

  /** An engine for a checkpoint directory (exported or taken from the cache) or for in-memory
   * weights (exported, not cached). */
  static async create(
    source: string | { config: ModelConfig; weights: ReadonlyMap<string, Float32Array> },
    opts: OnnxEngineOptions = {},
  ): Promise<OnnxEngine> {
    setThreads(opts.threads ?? navigator.hardwareConcurrency);
    let config: ModelConfig, model: Uint8Array, origin: string;
    if (typeof source !== "string") {
      config = source.config;
      model = opts.onnxPath ? await readModel(opts.onnxPath) : exportOnnx(config, source.weights);
      origin = opts.onnxPath ?? "exported in memory";
    } else if (opts.onnxPath) {
      config = await readConfig(source);
      model = await readModel(opts.onnxPath);
      origin = opts.onnxPath;
    } else {
      ({ config, model, origin } = await cachedExport(source));
    }
    const session = await ort.InferenceSession.create(model, {
      executionProviders: ["wasm"],
      graphOptimizationLevel: "all",
    }).catch((e) => {
      throw new AhaError(`${origin}: onnxruntime cannot load the model (${oneLine(e)})`);
    });
    if (!session.inputNames.includes("input_ids") || !session.outputNames.includes("logprobs")) {
      const found = `inputs [${session.inputNames}], outputs [${session.outputNames}]`;
      await session.release();
      throw new AhaError(
        `${origin}: expected input "input_ids" and output "logprobs" (an aha export), found ${found}`,
      );
    }
    const threads = ort.env.wasm.numThreads!;
    const description = `onnxruntime-web ${ort.env.versions.web} WASM, ${threads} ` +
      `thread${threads === 1 ? "" : "s"} (${origin})`;
    return new OnnxEngine(session, config, threads, description, origin);
  }

  /**
   * logprobs[i][t] = log p(seq_i[t+1] | seq_i[0..t]) with logits · invTemperature, the format
   * of `aha score`; with `from`, row i holds only those from t = from[i] on, and the export's
   * "first" input spares the vocabulary projection the positions before each batch's smallest.
   * Sequences are run longest first in right-padded batches (causal attention: padding never
   * changes the positions before it).
   */
  async logprobs(sequences: number[][], invTemperature = 1, from?: number[]): Promise<number[][]> {
    // Exports older than the "inv_temperature" input compute plain log-probs only.
    const scalable = this.session.inputNames.includes("inv_temperature");
    if (!scalable && invTemperature !== 1) {
      throw new AhaError(
        `${this.origin}: this ONNX export has no "inv_temperature" input, so it serves ` +
          `temperature 1 only (asked for ${1 / invTemperature}): let aha export the checkpoint`,
      );
    }
    const { vocabSize, maxPositionEmbeddings } = this.config;
    sequences.forEach((s, i) => {
      const bad = s.findIndex((t) => !Number.isInteger(t) || t < 0 || t >= vocabSize);
      if (bad >= 0) {
        throw new AhaError(
          `sequences[${i}][${bad}] = ${s[bad]} is outside the vocabulary [0, ${vocabSize})`,
        );
      }
      if (s.length > maxPositionEmbeddings) {
        throw new AhaError(
          `sequences[${i}] has ${s.length} tokens, more than max_position_embeddings ` +
            `(${maxPositionEmbeddings})`,
        );
      }
    });
    const scale = new ort.Tensor("float32", Float32Array.of(invTemperature), []);
    // Exports older than the "first" input compute every position.
    const skips = this.session.inputNames.includes("first");
    const result: number[][] = sequences.map(() => []);
    const order = sequences.map((_, i) => i).filter((i) => sequences[i].length >= 2)
      .sort((a, b) => sequences[b].length - sequences[a].length);
    while (order.length > 0) {
      const length = sequences[order[0]].length;
      const rows = Math.max(1, Math.floor(LOGITS_BUDGET / ((length - 1) * vocabSize)));
      const batch = order.splice(0, rows);
      const ids = new BigInt64Array(batch.length * length); // padded with token 0
      batch.forEach((s, b) => ids.set(sequences[s].map(BigInt), b * length));
      const input = new ort.Tensor("int64", ids, [batch.length, length]);
      // At least one position is computed, so no tensor of the graph is empty.
      const wanted = (s: number) => Math.min(from?.[s] ?? 0, sequences[s].length - 1);
      const first = skips ? Math.min(length - 2, ...batch.map(wanted)) : 0;
      const feeds: Record<string, ort.Tensor> = { input_ids: input };
      if (scalable) feeds.inv_temperature = scale;
      if (skips) feeds.first = new ort.Tensor("int64", BigInt64Array.of(BigInt(first)), [1]);
      const output = (await this.session.run(feeds)).logprobs;
      const data = output.data as Float32Array;
      batch.forEach((s, b) => {
        const offset = b * (length - 1 - first) - first;
        result[s] = Array.from(data.subarray(offset + wanted(s), offset + sequences[s].length - 1));
      });
      input.dispose();
      feeds.first?.dispose();
      output.dispose();
    }
    scale.dispose();
    return result;
  }

  async release(): Promise<void> {
    await this.session.release();
  }
}

/** Sets the WebAssembly thread count; the first session of the process fixes it for good. */
function setThreads(threads: number): void {
  if (!Number.isInteger(threads) || threads < 1) {
    throw new AhaError(`onnx engine: threads must be a positive integer, got ${threads}`);
  }
  ort.env.wasm.numThreads ??= threads;
}

const oneLine = (e: unknown) => (e as Error).message.split("\n")[0];

async function readConfig(dir: string): Promise<ModelConfig> {
  const path = `${dir}/config.json`;
  try {
    return parseModelConfig(JSON.parse(await Deno.readTextFile(path)), path);
  } catch (e) {
    if (e instanceof AhaError) throw e;
    throw new AhaError(`${path}: cannot read (${oneLine(e)})`);
  }
}

async function readModel(path: string): Promise<Uint8Array> {
  try {
    return await Deno.readFile(path);
  } catch (e) {
    throw new AhaError(`${path}: cannot read the ONNX model (${oneLine(e)})`);
  }
}

/** The files a checkpoint's export depends on: config.json and the weight file(s). */
async function checkpointFiles(dir: string): Promise<string[]> {
  const index = `${dir}/model.safetensors.index.json`;
  let shards: string[] = ["model.safetensors"];
  try {
    const map = JSON.parse(await Deno.readTextFile(index)).weight_map ?? {};
    shards = [...new Set(Object.values(map) as string[])].sort();
  } catch (e) {
    if (!(e instanceof Deno.errors.NotFound)) throw new AhaError(`${index}: not a valid index`);
  }
  return ["config.json", ...shards].map((name) => `${dir}/${name}`);
}

/** SHA-256 over the exporter version and each file's name and bytes, streamed. */
async function exportKey(dir: string): Promise<string> {
  const hash = createHash("sha256").update(`aha-onnx-export ${EXPORT_VERSION}\n`);
  const chunk = new Uint8Array(1 << 20);
  for (const path of await checkpointFiles(dir)) {
    hash.update(path.slice(dir.length) + "\n");
    using file = await Deno.open(path).catch(() => {
      throw new AhaError(`${path}: file not found`);
    });
    for (let n; (n = await file.read(chunk)) !== null;) hash.update(chunk.subarray(0, n));
  }
  return hash.digest("hex");
}

/** The checkpoint's export from <dir>/.aha-onnx/<key>.onnx, exporting (and replacing older
 * exports) when it is missing. A read-only checkpoint is exported in memory only. */
async function cachedExport(dir: string) {
  const cacheDir = `${dir}/${CACHE_DIR}`;
  const path = `${cacheDir}/${await exportKey(dir)}.onnx`;
  try {
    return { config: await readConfig(dir), model: await Deno.readFile(path), origin: path };
  } catch (e) {
    if (!(e instanceof Deno.errors.NotFound)) throw e;
  }
  const { config, weights } = await loadCheckpoint(dir);
  const model = exportOnnx(config, weights);
  try {
    await Deno.mkdir(cacheDir, { recursive: true });
    for await (const old of Deno.readDir(cacheDir)) {
      if (old.name.endsWith(".onnx")) await Deno.remove(`${cacheDir}/${old.name}`);
    }
    await Deno.writeFile(`${path}.${Deno.pid}.tmp`, model);
    await Deno.rename(`${path}.${Deno.pid}.tmp`, path);
    return { config, model, origin: path };
  } catch (e) {
    console.warn(`aha: cannot cache the ONNX export in ${cacheDir} (${(e as Error).message})`);
    return { config, model, origin: "exported in memory" };
  }
}
