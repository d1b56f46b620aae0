// The trainer's side of the reference process. `WorkerReference` starts `aha ref-worker`
// (reference/worker.ts) as a child with an environment of its own — DENO_WEBGPU_BACKEND picks
// its adapter — and asks it for reference log-probs through the channel (reference/channel.ts).
//
// Faults: a worker that exits or does not answer within reference.timeout_s is killed,
// restarted (with the reference weights of the last sync) and sent the same request again, up to
// reference.max_restarts times per request; then the run stops with a clear message. Requests
// run one at a time, so each batch is answered exactly once. close() stops the worker and
// removes the channel directory; an unload handler does the same when the program exits early.

import { createHash } from "node:crypto";
import type { ReferenceEngine, TokenBatch } from "../core/engine.ts";
import { AhaError } from "../core/errors.ts";
import { readSafetensors } from "../core/safetensors.ts";
import { privateRuntimeDir, selfCommand } from "../core/self_command.ts";
import type { TrainConfig } from "../core/train_config.ts";
import { ARITHMETIC_TOKENIZER_FILE } from "../data/tasks.ts";
import { BACKENDS, probeAdapter, sameAdapter } from "../gpu/adapters.ts";
import type { AdapterSummary } from "../gpu/device.ts";
import { Channel, LineReader, writeMessage } from "./channel.ts";

export interface WorkerReferenceOptions {
  /** The reference checkpoint; the worker loads it itself. */
  modelDir: string;
  adapter: TrainConfig["reference"]["adapter"];
  /** reference.engine resolved (core/train_config.ts referenceEngine). */
  engine: "webgpu" | "onnx";
  /** Extra environment variables of the worker (reference.env). */
  env: Record<string, string>;
  timeoutS: number;
  maxRestarts: number;
  /** An existing ONNX export (reference.onnx). */
  onnxPath: string | null;
  /** How the webgpu engine stores the frozen weights (frozen_dtype; default auto). */
  frozenDtype?: TrainConfig["frozen_dtype"];
  /** The policy's vocabulary size, model directory (for its tokenizer files) and adapter. */
  policy: { vocabSize: number; dir: string; adapter: AdapterSummary };
  /** Where progress lines go (default: console.log). */
  log?: (line: string) => void;
}

/** The worker's ready message. */
interface Ready {
  pid: number;
  engine: string;
  engine_description: string;
  adapter: AdapterSummary | null;
  vocab_size: number;
}

interface Running {
  child: Deno.ChildProcess;
  stdin: WritableStreamDefaultWriter<Uint8Array>;
  stdout: LineReader;
  ready: Ready | null;
}

type Message = Record<string, unknown>;

/** The worker crashed, hung or cannot be reached: worth a restart. */
class WorkerFault extends Error {}

/** Files that define a tokenizer; the policy's and the reference's must be identical. */
const TOKENIZER_FILES = ["tokenizer.json", "vocab.json", "merges.txt", ARITHMETIC_TOKENIZER_FILE];

export class WorkerReference implements ReferenceEngine {
  private worker: Running | null = null;
  private nextId = 1;
  private queue: Promise<unknown> = Promise.resolve();
  /** The reference weights after the last sync (in the channel), for restarts. */
  private weightsFile: string | null = null;
  private closed = false;
  /** Totals over the run: answered requests, restarts, the worker's compute time and the
   * trainer's time from writing a request to having its reply (channel included). */
  readonly stats = { requests: 0, restarts: 0, computeSeconds: 0, roundTripSeconds: 0 };
  private readonly log: (line: string) => void;
  private readonly onUnload = () => {
    try {
      this.worker?.child.kill("SIGKILL");
    } catch {
      // already gone
    }
    this.channel.removeAll();
  };

  private constructor(
    private readonly opts: WorkerReferenceOptions,
    readonly channel: Channel,
    private readonly env: Record<string, string>,
  ) {
    this.log = opts.log ?? console.log;
    globalThis.addEventListener("unload", this.onUnload);
  }

  /** Starts the worker and waits for its ready message; refuses a reference whose vocabulary or
   * tokenizer differs from the policy's. */
  static async start(opts: WorkerReferenceOptions): Promise<WorkerReference> {
    await checkTokenizers(opts.modelDir, opts.policy.dir);
    const runtime = { XDG_RUNTIME_DIR: privateRuntimeDir(), ...opts.env };
    const env = { ...runtime, ...await chooseBackend(opts, runtime) };
    const reference = new WorkerReference(opts, await Channel.create(), env);
    try {
      const ready = (await reference.spawn()).ready!;
      if (ready.vocab_size !== opts.policy.vocabSize) {
        throw new AhaError(
          `the reference model ${opts.modelDir} has vocab_size ${ready.vocab_size} but the ` +
            `policy has ${opts.policy.vocabSize}: they must share one vocabulary`,
        );
      }
      reference.logStart(ready);
      return reference;
    } catch (e) {
      await reference.close();
      throw e instanceof WorkerFault ? new AhaError(`the reference worker ${e.message}`) : e;
    }
  }

  get description(): string {
    const ready = this.worker?.ready;
    if (!ready) return "reference worker (not running)";
    const backend = ready.adapter ? ` (backend ${ready.adapter.backend})` : "";
    return `worker pid ${ready.pid}, ${ready.engine_description}${backend}`;
  }

  /** The worker's adapter (null for the onnx engine or while it is not running). */
  get adapter(): AdapterSummary | null {
    return this.worker?.ready?.adapter ?? null;
  }

  /** The pid of the running worker (null between a crash and its restart). */
  get pid(): number | null {
    return this.worker?.child.pid ?? null;
  }

  async completionLogprobs(batch: TokenBatch, invTemperature: number): Promise<number[][]> {
    const B = batch.rows.length;
    if (B === 0) return [];
    const started = performance.now();
    const id = this.nextId++;
    const file = await this.channel.writeBatch(`logprobs-${id}.safetensors`, batch);
    const reply = await this.request({
      op: "logprobs",
      id,
      file,
      inv_temperature: invTemperature,
    });
    const replyFile = await this.channel.resolve(reply.file);
    const { shape, data } = await this.channel.readF32(replyFile, "logprobs", 2);
    const lengths = batch.rows.map((row, b) => row.length - batch.promptLens[b]);
    const C = shape[1];
    if (shape[0] !== B || C < Math.max(...lengths)) {
      throw new AhaError(`${replyFile}: logprobs has shape [${shape}] for ${B} rows`);
    }
    await this.channel.remove(file);
    await this.channel.remove(replyFile);
    this.stats.requests++;
    this.stats.computeSeconds += reply.compute_s as number;
    this.stats.roundTripSeconds += (performance.now() - started) / 1000;
    return lengths.map((n, b) => Array.from(data.subarray(b * C, b * C + n)));
  }

  async mixIn(policy: Map<string, Float32Array>, alpha: number): Promise<void> {
    const id = this.nextId++;
    const flat = new Map([...policy].map(([name, data]) => [name, { shape: [data.length], data }]));
    const file = await this.channel.write(`weights-${id}.safetensors`, flat);
    const reply = await this.request({ op: "load_weights", id, file, alpha });
    const weightsFile = await this.channel.resolve(reply.file);
    await this.channel.remove(file);
    if (this.weightsFile) await this.channel.remove(this.weightsFile);
    this.weightsFile = weightsFile;
  }

  /** The reference weights after the last sync (flat), or null before any: what a checkpoint
   * saves so a resumed run continues with the same reference (sync_ref_model). */
  async syncedWeights(): Promise<Map<string, Float32Array> | null> {
    if (!this.weightsFile) return null;
    const tensors = await readSafetensors(this.weightsFile);
    return new Map([...tensors].map(([name, t]) => [name, t.data]));
  }

  /** Stops the worker (politely, then by force) and removes the channel; safe to call twice. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    globalThis.removeEventListener("unload", this.onUnload);
    const w = this.worker;
    if (w) {
      await writeMessage(w.stdin, { op: "shutdown", id: "shutdown" }).catch(() => {});
      await within(w.child.status, 5000, () => new Error("slow to stop")).catch(() => {});
      await this.stop();
    }
    this.channel.removeAll();
    if (this.stats.requests > 0) {
      const s = this.stats;
      this.log(
        `reference worker: ${s.requests} requests, ${s.computeSeconds.toFixed(2)} s computing, ` +
          `${s.roundTripSeconds.toFixed(2)} s round trip, ${s.restarts} restarts`,
      );
    }
  }

  // ---- the worker process -------------------------------------------------------------------

  private async spawn(): Promise<Running> {
    const o = this.opts;
    const args = ["ref-worker", "--model", o.modelDir, "--channel", this.channel.dir];
    args.push("--engine", o.engine);
    if (o.onnxPath) args.push("--onnx", o.onnxPath);
    if (o.frozenDtype) args.push("--frozen-dtype", o.frozenDtype);
    if (this.weightsFile) args.push("--weights", this.weightsFile);
    const self = selfCommand(args);
    const child = new Deno.Command(self.command, {
      args: self.args,
      env: this.env,
      stdin: "piped",
      stdout: "piped",
      stderr: "inherit",
    }).spawn();
    const w: Running = {
      child,
      stdin: child.stdin.getWriter(),
      stdout: new LineReader(child.stdout),
      ready: null,
    };
    this.worker = w;
    const message = await this.receive(w, (m) => "ready" in m);
    if (message.ready !== true) {
      throw new AhaError(`the reference worker cannot start: ${message.error}`);
    }
    w.ready = message as unknown as Ready;
    return w;
  }

  /** Kills the worker (if any) and waits for it to be gone. */
  private async stop(): Promise<void> {
    const w = this.worker;
    this.worker = null;
    if (!w) return;
    try {
      w.child.kill("SIGKILL");
    } catch {
      // it had exited
    }
    await w.child.status;
    await w.stdout.cancel();
    await w.stdin.close().catch(() => {});
  }

  /** The next message on the worker's stdout that `matches`, within reference.timeout_s. */
  private async receive(w: Running, matches: (m: Message) => boolean): Promise<Message> {
    const deadline = performance.now() + this.opts.timeoutS * 1000;
    for (;;) {
      const line = await within(
        w.stdout.next(),
        deadline - performance.now(),
        () =>
          new WorkerFault(`did not answer within ${this.opts.timeoutS} s (reference.timeout_s)`),
      );
      if (line === null) {
        const { code, signal } = await w.child.status;
        throw new WorkerFault(`exited (${signal ? `signal ${signal}` : `status ${code}`})`);
      }
      let message: unknown;
      try {
        message = JSON.parse(line);
      } catch {
        console.error(line); // not a protocol line (a library printing): pass it on
        continue;
      }
      if (typeof message === "object" && message !== null && matches(message as Message)) {
        return message as Message;
      }
    }
  }

  /** Sends one request and returns its reply, restarting a faulty worker; one at a time. */
  private request(message: Message): Promise<Message> {
    const max = this.opts.maxRestarts;
    const attempt = async () => {
      for (let restarts = 0;; restarts++) {
        if (this.closed) throw new AhaError("the reference worker has been stopped");
        try {
          const w = this.worker ?? await this.spawn();
          await writeMessage(w.stdin, message).catch((e) => {
            throw new WorkerFault(`cannot be reached (${(e as Error).message})`);
          });
          const reply = await this.receive(w, (m) => m.id === message.id);
          if (reply.ok !== true) {
            throw new AhaError(
              `the reference worker refused a ${message.op} request: ${reply.error}`,
            );
          }
          return reply;
        } catch (e) {
          if (!(e instanceof WorkerFault)) throw e;
          if (this.closed) throw new AhaError("the reference worker has been stopped");
          await this.stop();
          if (restarts >= max) {
            throw new AhaError(
              `the reference worker ${e.message}; giving up after ${max} restarts ` +
                `(reference.max_restarts)`,
            );
          }
          this.stats.restarts++;
          this.log(
            `reference worker ${e.message}; restarting it and resending request ${message.id} ` +
              `(${restarts + 1}/${max})`,
          );
        }
      }
    };
    const reply = this.queue.then(attempt);
    this.queue = reply.catch(() => {}); // also: a request nobody awaits never goes unhandled
    return reply;
  }

  private logStart(ready: Ready) {
    const policy = this.opts.policy.adapter;
    const name = (a: AdapterSummary) =>
      `"${a.description}" (backend ${a.backend}${a.isFallbackAdapter ? ", software" : ""})`;
    this.log(
      `reference: worker pid ${ready.pid}, ${ready.engine} engine ` +
        (ready.adapter ? `on ${name(ready.adapter)}` : `(${ready.engine_description})`) +
        `; policy on ${name(policy)}; channel ${this.channel.dir}`,
    );
    if (ready.adapter && sameAdapter(ready.adapter, policy)) {
      this.log(
        `warning: the reference shares the policy's adapter ${name(policy)}: no other adapter ` +
          `was found (see "aha gpu"; reference.adapter and reference.env choose one)`,
      );
    }
  }
}

/** `promise`, or the `late` error once `ms` have passed. */
async function within<T>(promise: Promise<T>, ms: number, late: () => Error): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(late()), Math.max(0, ms));
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** DENO_WEBGPU_BACKEND for the worker: none (inherit the trainer's) for `same` and the onnx
 * engine, the named backend, or for `auto` the first backend whose adapter is not the policy's. */
async function chooseBackend(
  opts: WorkerReferenceOptions,
  env: Record<string, string>,
): Promise<Record<string, string>> {
  if (opts.engine === "onnx" || opts.adapter === "same") return {};
  if (opts.adapter !== "auto") return { DENO_WEBGPU_BACKEND: opts.adapter };
  const backend = await otherAdapterBackend(opts.policy.adapter, env, opts.timeoutS);
  return backend ? { DENO_WEBGPU_BACKEND: backend } : {};
}

/** A backend whose adapter is not the policy's (probed in a child with `env`), or null. */
export async function otherAdapterBackend(
  policy: AdapterSummary,
  env: Record<string, string>,
  timeoutS: number,
): Promise<string | null> {
  for (const backend of BACKENDS) {
    if (backend === Deno.env.get("DENO_WEBGPU_BACKEND")) continue;
    const found = await probeAdapter({ ...env, DENO_WEBGPU_BACKEND: backend }, timeoutS);
    if (found && !sameAdapter(found, policy)) return backend;
  }
  return null;
}

/** Refuses a reference whose tokenizer files differ from the policy's (files both have). */
async function checkTokenizers(referenceDir: string, policyDir: string): Promise<void> {
  const read = (path: string) => Deno.readFile(path).catch(() => null);
  const sha256 = (bytes: Uint8Array) => createHash("sha256").update(bytes).digest("hex");
  for (const name of TOKENIZER_FILES) {
    const ref = await read(`${referenceDir}/${name}`), pol = await read(`${policyDir}/${name}`);
    if (!ref || !pol) continue;
    const [refHash, polHash] = [sha256(ref), sha256(pol)];
    if (refHash !== polHash) {
      throw new AhaError(
        `the reference model's ${referenceDir}/${name} (sha256 ${refHash.slice(0, 12)}) differs ` +
          `from the policy's ${policyDir}/${name} (sha256 ${polHash.slice(0, 12)}): they must ` +
          `share one tokenizer`,
      );
    }
  }
}
