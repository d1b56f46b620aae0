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
// without a shutdown the trainer is gone: the worker removes the channel directory and exits.

import { parseCommandArgs, required } from "../core/cli_args.ts";
import { loadCheckpoint } from "../core/checkpoint.ts";
import { AhaError, UsageError } from "../core/errors.ts";
import { type ModelConfig, parseModelConfig, weightShapes } from "../core/model_config.ts";
import { readSafetensors } from "../core/safetensors.ts";
import { type AdapterSummary, Gpu, summarizeAdapter } from "../gpu/device.ts";
import { GpuModel } from "../gpu/model.ts";
import { Channel, LineReader, type PackedBatch, writeMessage } from "./channel.ts";
import { OnnxEngine } from "./onnx_engine.ts";

export const help =
  `usage: aha ref-worker --model DIR --channel DIR [--engine webgpu|onnx] [--onnx FILE]
                      [--weights FILE] [--threads N]

(internal) The reference model's process, started by "aha train": loads the checkpoint in DIR
(or its weights from --weights FILE), reports its adapter on stdout, then answers one JSON
request per line on stdin, exchanging tensors as files in the --channel directory.`;

/** Tokens per forward pass of the WebGPU engine (GpuModel keeps every activation). */
const TOKENS_PER_PASS = 4096;

interface Engine {
  readonly name: "webgpu" | "onnx";
  readonly description: string;
  readonly adapter: AdapterSummary | null;
  /** [B, C] log-probs of the completion tokens (layout in channel.ts). */
  completionLogprobs(batch: PackedBatch, invTemperature: number): Promise<Float32Array>;
  weights(): Promise<Map<string, Float32Array>>;
  setWeights(weights: Map<string, Float32Array>): Promise<void>;
}

/** Scatters per-position log-probs of rows [first, first + n) into the [B, C] result. */
function pickCompletions(
  batch: PackedBatch,
  out: Float32Array,
  first: number,
  n: number,
  logpAt: (row: number, position: number) => number,
) {
  const C = out.length / batch.B;
  for (let b = first; b < first + n; b++) {
    const P = batch.promptLens[b];
    for (let t = 0; t < batch.completionLens[b]; t++) out[b * C + t] = logpAt(b - first, P - 1 + t);
  }
}

const widest = (batch: PackedBatch) => Math.max(0, ...batch.completionLens);

class WebGpuEngine implements Engine {
  readonly name = "webgpu";
  constructor(private readonly model: GpuModel) {}

  get description(): string {
    return `aha WebGPU on "${this.model.gpu.description}"`;
  }

  get adapter(): AdapterSummary {
    return summarizeAdapter(this.model.gpu.adapter);
  }

  async completionLogprobs(batch: PackedBatch, invTemperature: number): Promise<Float32Array> {
    const { B, L } = batch, out = new Float32Array(B * widest(batch));
    const rowsPerPass = Math.max(1, Math.floor(TOKENS_PER_PASS / L));
    for (let first = 0; first < B; first += rowsPerPass) {
      const n = Math.min(rowsPerPass, B - first);
      const ids = batch.ids.subarray(first * L, (first + n) * L);
      const logp = await this.model.gpu.read(this.model.forward(ids, n, L, invTemperature));
      pickCompletions(batch, out, first, n, (row, position) => logp[row * L + position]);
    }
    return out;
  }

  weights(): Promise<Map<string, Float32Array>> {
    return this.model.readWeights();
  }

  setWeights(weights: Map<string, Float32Array>): Promise<void> {
    this.model.setWeights(weights);
    return Promise.resolve();
  }
}

class OnnxReferenceEngine implements Engine {
  readonly name = "onnx";
  readonly adapter = null;

  constructor(
    private engine: OnnxEngine,
    private readonly config: ModelConfig,
    private readonly modelDir: string,
    private readonly onnxPath: string | undefined,
    /** The current weights when they differ from the checkpoint's (after --weights or a sync). */
    private current: Map<string, Float32Array> | null,
  ) {}

  get description(): string {
    return this.engine.description;
  }

  async completionLogprobs(batch: PackedBatch, invTemperature: number): Promise<Float32Array> {
    if (invTemperature !== 1) {
      throw new AhaError(
        `the onnx engine computes log-probs at temperature 1 only (asked for ${
          1 / invTemperature
        })`,
      );
    }
    const { B, L } = batch, out = new Float32Array(B * widest(batch));
    const sequences = Array.from({ length: B }, (_, b) => {
      const end = b * L + batch.promptLens[b] + batch.completionLens[b];
      return Array.from(batch.ids.subarray(b * L, end));
    });
    const logp = await this.engine.logprobs(sequences);
    pickCompletions(batch, out, 0, B, (row, position) => logp[row][position]);
    return out;
  }

  async weights(): Promise<Map<string, Float32Array>> {
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
): Promise<{ engine: Engine; config: ModelConfig }> {
  let config: ModelConfig, weights: Map<string, Float32Array> | null = null;
  if (weightsFile) {
    const path = `${modelDir}/config.json`;
    config = parseModelConfig(JSON.parse(await Deno.readTextFile(path)), path);
    weights = checkWeights(weightsFile, config, await readSafetensors(weightsFile));
  } else if (engineName === "webgpu") {
    ({ config, weights } = await loadCheckpoint(modelDir));
  } else {
    const path = `${modelDir}/config.json`;
    config = parseModelConfig(JSON.parse(await Deno.readTextFile(path)), path);
  }
  if (engineName === "webgpu") {
    const gpu = await Gpu.open();
    return { engine: new WebGpuEngine(new GpuModel(gpu, config, weights!)), config };
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
    const started = performance.now();
    const seconds = () => (performance.now() - started) / 1000;
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
      const logprobs = await engine.completionLogprobs(batch, invTemperature);
      const computeSeconds = (performance.now() - computeStart) / 1000;
      const file = await channel.write(
        replyName(path),
        new Map([["logprobs", { shape: [batch.B, logprobs.length / batch.B], data: logprobs }]]),
      );
      return { reply: { id, ok: true, file, compute_s: computeSeconds } };
    }
    if (request.op === "load_weights") {
      const alpha = request.alpha;
      if (typeof alpha !== "number" || !(alpha >= 0 && alpha <= 1)) {
        throw new AhaError(`"alpha" must be a number in [0, 1]`);
      }
      const path = await channel.resolve(request.file);
      const policy = checkWeights(path, config, await readSafetensors(path));
      const mixed = new Map<string, Float32Array>();
      for (const [name, ref] of await engine.weights()) {
        const pol = policy.get(name)!;
        mixed.set(name, ref.map((r, i) => alpha * pol[i] + (1 - alpha) * r));
      }
      await engine.setWeights(mixed);
      const flat = new Map(
        [...mixed].map(([name, data]) => [name, { shape: [data.length], data }]),
      );
      const file = await channel.write(replyName(path), flat);
      return { reply: { id, ok: true, file, compute_s: seconds() } };
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

export async function run(args: string[]): Promise<void> {
  const { values } = parseCommandArgs("ref-worker", args, {
    model: { type: "string" },
    channel: { type: "string" },
    engine: { type: "string", default: "webgpu" },
    onnx: { type: "string" },
    weights: { type: "string" },
    threads: { type: "string" },
  });
  const modelDir = required("ref-worker", "model", values.model);
  const channelDir = required("ref-worker", "channel", values.channel);
  if (values.engine !== "webgpu" && values.engine !== "onnx") {
    throw new UsageError(`ref-worker: --engine must be webgpu or onnx, got "${values.engine}"`);
  }
  // Ctrl-C reaches the whole process group; the trainer decides when this process ends.
  Deno.addSignalListener("SIGINT", () => {});
  const out = Deno.stdout.writable.getWriter();

  let channel: Channel, loaded: { engine: Engine; config: ModelConfig };
  try {
    channel = await Channel.open(channelDir);
    const threads = values.threads === undefined ? undefined : Number(values.threads);
    loaded = await loadEngine(modelDir, values.engine, values.onnx, values.weights, threads);
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
    await writeMessage(out, reply);
    if (stop) return;
  }
  channel.removeAll(); // stdin ended without a shutdown: the trainer is gone
}
