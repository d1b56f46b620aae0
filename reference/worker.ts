// `aha ref-worker` (internal): the reference model's process. The trainer starts it
// (reference/client.ts) with an environment of its own — DENO_WEBGPU_BACKEND picks its adapter —
// and the worker loads the reference checkpoint itself, then answers requests through the
// channel directory (reference/channel.ts, which also describes the tensor files).
//
// Messages, one JSON object per line (stdout carries nothing else; logs go to stderr):
//   → {"ready": true, "pid", "engine", "engine_description", "adapter", "vocab_size"}
//     (adapter: the WebGPU adapter's summary, null for onnx) or {"ready": false, "error"}
//   ← {"op": "logprobs", "id", "file", "inv_temperature"}
//   → {"id", "ok": true, "file", "compute_s"}   file: <request>.reply.safetensors ("logprobs")
//   ← {"op": "load_weights", "id", "file", "alpha"}   file: the policy's weights (F32, any shape)
//   → {"id", "ok": true, "file", "compute_s"}   reference ← α·policy + (1−α)·reference; file:
//     the new reference weights, which a restarted worker loads with --weights
//   ← {"op": "shutdown", "id"}  → {"id", "ok": true}, then exit
// A bad request gets {"id", "ok": false, "error"} and the worker keeps serving. When stdin ends
// without a shutdown, or a reply cannot be written, the trainer is gone: the worker removes the
// channel directory and exits.

import { loadCheckpoint } from "../core/checkpoint.ts";
import { AhaError } from "../core/errors.ts";
import { type ModelConfig, parseModelConfig, weightShapes } from "../core/model_config.ts";
import { readSafetensors } from "../core/safetensors.ts";
import { type AdapterSummary, Gpu, summarizeAdapter } from "../gpu/device.ts";
import { GpuModel } from "../gpu/model.ts";
import { scoreSequences } from "../gpu/score.ts";
import { Channel, LineReader, type PackedBatch, writeMessage } from "./channel.ts";
import { OnnxEngine } from "./onnx_engine.ts";
import { type FrozenDtype, frozenWeightDtypes } from "../core/half.ts";

/** A reference engine: log-probs in `aha score`'s format, and the weights for syncing. */
interface Engine {
  readonly name: "webgpu" | "onnx";
  readonly description: string;
  readonly adapter: AdapterSummary | null;
  /** logprobs[i][t] = log p(seq_i[t+1] | seq_i[0..t]) with logits · invTemperature. */
  /** As gpu/score.ts scoreSequences: with `from`, row i starts at position from[i]. */
  logprobs(sequences: number[][], invTemperature: number, from?: number[]): Promise<number[][]>;
  weights(): Promise<ReadonlyMap<string, Float32Array>>;
  setWeights(weights: Map<string, Float32Array>): Promise<void>;
}

/** The [B, C] completion log-probs of a request (layout in channel.ts). */
async function completionLogprobs(engine: Engine, batch: PackedBatch, invTemperature: number) {
  const { B, L, promptLens, completionLens } = batch;
  const sequences = Array.from({ length: B }, (_, b) => {
    const start = b * L;
    return Array.from(batch.ids.subarray(start, start + promptLens[b] + completionLens[b]));
  });
  // Only the completions' log-probs: from each prompt's last token on.
  const from = Array.from(promptLens, (n) => n - 1);
  const logp = await engine.logprobs(sequences, invTemperature, from);
  const C = Math.max(0, ...completionLens), out = new Float32Array(B * C);
  for (let b = 0; b < B; b++) {
    for (let t = 0; t < completionLens[b]; t++) out[b * C + t] = logp[b][t];
  }
  return { data: out, shape: [B, C] };
}

/** aha's own WebGPU forward pass (gpu/score.ts: token-bounded batches, no backward buffers). */
class WebGpuEngine implements Engine {
  readonly name = "webgpu";
  constructor(private readonly model: GpuModel) {}

  get description(): string {
    return `aha WebGPU on "${this.model.gpu.description}"`;
  }

  get adapter(): AdapterSummary {
    return summarizeAdapter(this.model.gpu.adapter);
  }

  logprobs(sequences: number[][], invTemperature: number, from?: number[]): Promise<number[][]> {
    return scoreSequences(this.model, sequences, invTemperature, true, from);
  }

  weights(): Promise<ReadonlyMap<string, Float32Array>> {
    return this.model.readWeights();
  }

  setWeights(weights: Map<string, Float32Array>): Promise<void> {
    this.model.setWeights(weights);
    return Promise.resolve();
  }
}

/** onnxruntime-web on an ONNX export (onnx_engine.ts); a sync exports the new weights anew. */
class OnnxReferenceEngine implements Engine {
  readonly name = "onnx";
  readonly adapter = null;

  constructor(
    private engine: OnnxEngine,
    private readonly config: ModelConfig,
    private readonly modelDir: string,
    private readonly onnxPath: string | undefined,
    /** The current weights when they differ from the checkpoint's (after --weights or a sync). */
    private current: ReadonlyMap<string, Float32Array> | null,
  ) {}

  get description(): string {
    return this.engine.description;
  }

  logprobs(sequences: number[][], invTemperature: number, from?: number[]): Promise<number[][]> {
    return this.engine.logprobs(sequences, invTemperature, from);
  }

  async weights(): Promise<ReadonlyMap<string, Float32Array>> {
    return this.current ?? (await loadCheckpoint(this.modelDir)).weights;
  }

  async setWeights(weights: Map<string, Float32Array>): Promise<void> {
    if (this.onnxPath) {
      throw new AhaError(
        `cannot sync the reference into the given ONNX export ${this.onnxPath} (reference.onnx)`,
      );
    }
    const next = await OnnxEngine.create({ config: this.config, weights });
    await this.engine.release();
    this.engine = next;
    this.current = weights;
  }
}

/** `weights` checked against the config (every weight, its element count), in its order. */
function checkWeights(
  file: string,
  config: ModelConfig,
  weights: Map<string, { data: Float32Array }>,
): Map<string, Float32Array> {
  const checked = new Map<string, Float32Array>();
  for (const [name, shape] of weightShapes(config)) {
    const size = shape.reduce((a, b) => a * b, 1), data = weights.get(name)?.data;
    if (!data || data.length !== size) {
      throw new AhaError(
        `${file}: weight "${name}" needs ${size} values, found ${data ? data.length : "none"}`,
      );
    }
    checked.set(name, data);
  }
  return checked;
}

async function loadEngine(
  modelDir: string,
  engineName: string,
  onnxPath: string | undefined,
  weightsFile: string | undefined,
  threads: number | undefined,
  frozenDtype: FrozenDtype,
): Promise<{ engine: Engine; config: ModelConfig }> {
  let config: ModelConfig, weights: ReadonlyMap<string, Float32Array> | null = null;
  // Each weight's dtype in its file; weights after a sync (--weights) are F32.
  let dtypes = new Map<string, string>();
  if (engineName === "webgpu" && !weightsFile) {
    ({ config, weights, dtypes } = await loadCheckpoint(modelDir));
  } else {
    const path = `${modelDir}/config.json`;
    config = parseModelConfig(JSON.parse(await Deno.readTextFile(path)), path);
    if (weightsFile) {
      weights = checkWeights(weightsFile, config, await readSafetensors(weightsFile));
    }
  }
  if (engineName === "webgpu") {
    const gpu = await Gpu.open();
    const weightDtypes = frozenWeightDtypes(
      frozenDtype,
      weightShapes(config),
      dtypes,
      gpu.hasF16,
    );
    return {
      engine: new WebGpuEngine(new GpuModel(gpu, config, weights!, { weightDtypes })),
      config,
    };
  }
  const source = weights ? { config, weights } : modelDir;
  const onnx = await OnnxEngine.create(source, { threads, onnxPath });
  return { engine: new OnnxReferenceEngine(onnx, config, modelDir, onnxPath, weights), config };
}

type Reply = { id: unknown; ok: boolean; [key: string]: unknown };

/** Answers one request line; never throws. `stop` after a shutdown request. */
async function serve(
  line: string,
  channel: Channel,
  engine: Engine,
  config: ModelConfig,
): Promise<{ reply: Reply; stop?: boolean }> {
  let id: unknown = null;
  try {
    let request: Record<string, unknown>;
    try {
      request = JSON.parse(line);
    } catch {
      throw new AhaError(`not a JSON line: ${JSON.stringify(line.slice(0, 80))}`);
    }
    if (typeof request !== "object" || request === null || Array.isArray(request)) {
      throw new AhaError("a request must be a JSON object");
    }
    id = request.id ?? null;
    if (request.op === "logprobs") {
      const invTemperature = request.inv_temperature;
      if (
        typeof invTemperature !== "number" || !(invTemperature > 0 && invTemperature < Infinity)
      ) {
        throw new AhaError(`"inv_temperature" must be a positive number`);
      }
      const path = await channel.resolve(request.file);
      const batch = await channel.readBatch(path);
      if (batch.L > config.maxPositionEmbeddings) {
        throw new AhaError(
          `${path}: rows of ${batch.L} tokens exceed max_position_embeddings ` +
            `(${config.maxPositionEmbeddings})`,
        );
      }
      const bad = batch.ids.findIndex((t) => t < 0 || t >= config.vocabSize);
      if (bad >= 0) {
        throw new AhaError(
          `${path}: input_ids[${Math.floor(bad / batch.L)}][${bad % batch.L}] = ` +
            `${batch.ids[bad]} is outside the vocabulary [0, ${config.vocabSize})`,
        );
      }
      const computeStart = performance.now();
      const logprobs = await completionLogprobs(engine, batch, invTemperature);
      const computeSeconds = (performance.now() - computeStart) / 1000;
      const file = await channel.write(replyName(path), new Map([["logprobs", logprobs]]));
      return { reply: { id, ok: true, file, compute_s: computeSeconds } };
    }
    if (request.op === "load_weights") {
      const alpha = request.alpha;
      if (typeof alpha !== "number" || !(alpha >= 0 && alpha <= 1)) {
        throw new AhaError(`"alpha" must be a number in [0, 1]`);
      }
      const path = await channel.resolve(request.file);
      const policy = checkWeights(path, config, await readSafetensors(path));
      const computeStart = performance.now();
      const mixed = new Map<string, Float32Array>();
      for (const [name, ref] of await engine.weights()) {
        const pol = policy.get(name)!;
        mixed.set(name, ref.map((r, i) => alpha * pol[i] + (1 - alpha) * r));
      }
      await engine.setWeights(mixed);
      const computeSeconds = (performance.now() - computeStart) / 1000;
      const flat = new Map(
        [...mixed].map(([name, data]) => [name, { shape: [data.length], data }]),
      );
      const file = await channel.write(replyName(path), flat);
      return { reply: { id, ok: true, file, compute_s: computeSeconds } };
    }
    if (request.op === "shutdown") return { reply: { id, ok: true }, stop: true };
    throw new AhaError(
      `unknown op ${JSON.stringify(request.op)} (expected logprobs, load_weights or shutdown)`,
    );
  } catch (e) {
    return { reply: { id, ok: false, error: e instanceof Error ? e.message : String(e) } };
  }
}

const replyName = (path: string) =>
  path.slice(path.lastIndexOf("/") + 1).replace(/(\.safetensors)?$/, ".reply.safetensors");

/** What the worker is started with (`aha ref-worker`'s options, cli/ref_worker.ts). */
export interface WorkerOptions {
  modelDir: string;
  channelDir: string;
  engine: "webgpu" | "onnx";
  onnxPath?: string;
  weightsFile?: string;
  threads?: number;
  /** How the webgpu engine stores the weight matrices (default auto: the checkpoint's dtype). */
  frozenDtype?: FrozenDtype;
}

/** Load the reference engine, report ready on stdout, then serve requests until shutdown. */
export async function serveReference(opts: WorkerOptions): Promise<void> {
  // Ctrl-C reaches the whole process group; the trainer decides when this process ends.
  Deno.addSignalListener("SIGINT", () => {});
  const out = Deno.stdout.writable.getWriter();

  let channel: Channel, loaded: { engine: Engine; config: ModelConfig };
  try {
    channel = await Channel.open(opts.channelDir);
    loaded = await loadEngine(
      opts.modelDir,
      opts.engine,
      opts.onnxPath,
      opts.weightsFile,
      opts.threads,
      opts.frozenDtype ?? "auto",
    );
  } catch (e) {
    await writeMessage(out, { ready: false, error: e instanceof Error ? e.message : String(e) });
    throw e instanceof AhaError ? e : new AhaError(`ref-worker: ${(e as Error).message}`);
  }
  const { engine, config } = loaded;
  await writeMessage(out, {
    ready: true,
    pid: Deno.pid,
    engine: engine.name,
    engine_description: engine.description,
    adapter: engine.adapter,
    vocab_size: config.vocabSize,
  });

  const input = new LineReader(Deno.stdin.readable);
  for (let line; (line = await input.next()) !== null;) {
    if (line.trim() === "") continue;
    const { reply, stop } = await serve(line, channel, engine, config);
    // A reply nobody reads (the trainer was killed while this request ran) ends the loop too.
    if (!(await writeMessage(out, reply).then(() => true, () => false))) break;
    if (stop) return;
  }
  channel.removeAll(); // stdin ended without a shutdown, or stdout did: the trainer is gone
}
