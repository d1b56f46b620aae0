// Batched sampling with a KV cache: the policy's completions for a set of prompts.
//
// Each prompt is prefilled once and its cache copied to the rows of its group — prompts in
// batches of at most PREFILL_BATCH_TOKENS tokens (fewer when a pass's buffers would be over one
// storage binding: core/plan.ts passTokens), so a large evaluation batch needs no more prefill
// memory than a few prompts. The group's rows draw their first tokens from the logits
// of its prompt's last position (they would all compute the same ones), and then every row
// decodes one token per step: embedding → layers over the cache → final norm → logits → sample,
// all on the GPU.
// Sampled tokens feed the next step without a CPU round trip (nor any upload); the CPU reads
// the "done" flags every few steps, while later steps run, to stop early. The cache is f32 or
// 16 bits (kv_cache_dtype). The buffers of a shape are kept on the model between calls
// (`GpuModel.kept`).

import type { Completions, SamplingOptions } from "../core/engine.ts";
import type { ModelConfig } from "../core/model_config.ts";
import {
  CAPACITY_ROUND,
  passTokens,
  PREFILL_BATCH_TOKENS,
  PREFILL_ROUND,
  prefillPrompts,
} from "../core/plan.ts";
import { type Gpu, Tensor } from "./device.ts";
import { copyCacheToGroups, type KvDtype } from "./kernels/attention.ts";
import { rmsnorm } from "./kernels/rmsnorm.ts";
import { embedding } from "./kernels/embedding.ts";
import { afterSample, sample } from "./kernels/sample.ts";
import { type GpuModel, type LayerActivations, layerBuffers } from "./model.ts";
import { KeptTextures } from "./kept_textures.ts";

/**
 * How often (in decode steps) the CPU checks whether every row has finished. A check looks at
 * the "done" flags as they were at the previous check, a read started then and made while the
 * steps between ran: so the GPU never idles for Deno's ~10 ms per GPU→CPU wait (a GPU whose
 * decode step takes a few ms would spend most of its time waiting), at the price of up to
 * DONE_CHECK_EVERY more steps run past the end, and no early stop before step 2·DONE_CHECK_EVERY.
 */
const DONE_CHECK_EVERY = 4;

type KvCache = { k: Tensor; v: Tensor }[];

/**
 * Everything one generation shape needs, made once and kept across calls (as training keeps its
 * activations): the KV caches, the prefill and decode buffers, the outputs.
 */
class Buffers {
  readonly cache: KvCache;
  /** Prompts per prefill pass these buffers hold. */
  readonly batch: number;
  readonly promptCache: KvCache;
  readonly prefill: LayerActivations;
  readonly prefillIds: Tensor;
  readonly prefillPositions: Tensor;
  readonly prefillKvLens: Tensor;
  readonly step: LayerActivations;
  readonly hidden: Tensor;
  readonly logits: Tensor;
  readonly ids: Tensor;
  readonly positions: Tensor;
  readonly kvLens: Tensor;
  readonly sampled: Tensor;
  readonly logp: Tensor;
  readonly done: Tensor;
  readonly eos: Tensor;
  readonly outTokens: Tensor;
  readonly outLogp: Tensor;
  /**
   * The decode caches' texture copies for attention (software adapters): made whole after the
   * prefill, then each step copies only the position every row wrote (`markWritten`).
   */
  readonly cacheTextures: KeptTextures;

  constructor(
    gpu: Gpu,
    c: ModelConfig,
    readonly P: number,
    readonly G: number,
    readonly capacity: number,
    readonly prefillLen: number,
    readonly maxNew: number,
    readonly numEos: number,
    readonly kvDtype: KvDtype,
    prefillTokens: number,
  ) {
    const B = P * G;
    // Prompts are prefilled `batch` at a time (core/plan.ts prefillPrompts).
    const batch = this.batch = prefillPrompts(P, prefillLen, prefillTokens);
    this.cache = kvCache(gpu, c, B, capacity, kvDtype);
    this.promptCache = kvCache(gpu, c, batch, capacity, kvDtype);
    const T = batch * prefillLen;
    this.prefill = layerBuffers(gpu, c, batch, prefillLen);
    this.prefillIds = gpu.zeros([T], "i32");
    this.prefillPositions = gpu.zeros([T], "i32");
    this.prefillKvLens = gpu.zeros([batch], "i32");
    this.step = layerBuffers(gpu, c, B, 1);
    this.hidden = gpu.zeros([B, c.hiddenSize]);
    this.logits = gpu.zeros([B, c.vocabSize]);
    this.ids = gpu.zeros([B], "i32");
    this.positions = gpu.zeros([B], "i32");
    this.kvLens = gpu.zeros([B], "i32");
    this.sampled = gpu.zeros([B], "i32");
    this.logp = gpu.zeros([B]);
    this.done = gpu.zeros([B], "i32");
    this.eos = gpu.zeros([Math.max(numEos, 1)], "i32");
    this.outTokens = gpu.zeros([maxNew, B], "i32");
    this.outLogp = gpu.zeros([maxNew, B]);
    this.cacheTextures = new KeptTextures(gpu);
  }

  /** Buffers are kept per group size, completion length and EOS count (see buffersFor). */
  static key(G: number, maxNew: number, numEos: number): string {
    return `generate ${G},${maxNew},${numEos}`;
  }

  /** Whether these buffers hold a call of P prompts, cache length and prefill length. */
  holds(P: number, capacity: number, prefillLen: number): boolean {
    return this.P >= P && this.capacity >= capacity && this.prefillLen >= prefillLen;
  }

  release(gpu: Gpu): void {
    this.cacheTextures.destroy();
    for (const layer of [...this.cache, ...this.promptCache]) {
      gpu.release(layer.k);
      gpu.release(layer.v);
    }
    for (const t of [...Object.values(this.prefill), ...Object.values(this.step)]) gpu.release(t);
    for (const t of Object.values(this)) if (t instanceof Tensor) gpu.release(t);
  }
}

/**
 * Kinds of call kept per model. One: an evaluation (every eval_steps) replaces the sampling
 * buffers and the next step remakes them, so memory never holds both (core/plan.ts counts one).
 */
const KEPT_SHAPES = 1;

/**
 * The buffers for a call: kept ones when they are large enough, else new ones sized for the
 * largest call seen, so that refill rounds (fewer prompts) and shorter prompts reuse them.
 * Kernels are told the call's own sizes; rows and positions past them are never read.
 */
function buffersFor(...dims: [GpuModel, ...ConstructorParameters<typeof Buffers>]): Buffers {
  const [model, gpu, c, P, G, capacity, prefillLen, maxNew, numEos, kvDtype, prefillTokens] = dims;
  const key = Buffers.key(G, maxNew, numEos);
  let buffers = model.kept.get(key) as Buffers | undefined;
  if (buffers) model.kept.delete(key); // re-inserted below as the most recent
  if (buffers && !buffers.holds(P, capacity, prefillLen)) {
    buffers.release(gpu);
    gpu.flush(); // destroyed now, before the new ones are made
    buffers = new Buffers(
      gpu,
      c,
      Math.max(P, buffers.P),
      G,
      Math.max(capacity, buffers.capacity),
      Math.max(prefillLen, buffers.prefillLen),
      maxNew,
      numEos,
      kvDtype,
      prefillTokens,
    );
  }
  if (!buffers) {
    const ours = [...model.kept.entries()].filter(([, b]) => b instanceof Buffers);
    if (ours.length >= KEPT_SHAPES) {
      const [oldest, old] = ours[0];
      old.release(gpu);
      gpu.flush();
      model.kept.delete(oldest);
    }
    buffers = new Buffers(
      gpu,
      c,
      P,
      G,
      capacity,
      prefillLen,
      maxNew,
      numEos,
      kvDtype,
      prefillTokens,
    );
  }
  model.kept.set(key, buffers);
  return buffers;
}

export async function generate(
  model: GpuModel,
  prompts: number[][],
  groupSize: number,
  opts: SamplingOptions,
): Promise<Completions> {
  const gpu = model.gpu, c = model.config;
  const P = prompts.length, B = P * groupSize, maxNew = opts.maxNewTokens;
  if (prompts.some((p) => p.length === 0)) {
    throw new Error("generate: every prompt needs at least one token");
  }
  const longest = Math.max(...prompts.map((p) => p.length));
  // Rounding up pads the prefill: its padding lands in the cache at positions the decode steps
  // overwrite before any query can see them, and causal attention hides it from real tokens.
  const prefillLen = roundUp(longest, PREFILL_ROUND);
  const capacity = roundUp(Math.max(longest + maxNew, prefillLen), CAPACITY_ROUND);
  const eosIds = opts.eosIds.length ? opts.eosIds : [-1];
  const prefillTokens = passTokens(c, model.maxBinding, PREFILL_BATCH_TOKENS);
  const bufs = buffersFor(
    model,
    gpu,
    c,
    P,
    groupSize,
    capacity,
    prefillLen,
    maxNew,
    eosIds.length,
    model.kvCacheDtype,
    prefillTokens,
  );
  const { cache, step } = bufs;
  const perPrefill = Math.min(prefillPrompts(P, prefillLen, prefillTokens), bufs.batch);
  for (let first = 0; first < P; first += perPrefill) {
    const part = prompts.slice(first, first + perPrefill);
    prefill(model, part, prefillLen, first, bufs);
    const promptLen = Math.max(...part.map((p) => p.length));
    copyToGroups(gpu, bufs.promptCache, cache, groupSize, first, part.length, promptLen);
  }
  bufs.cacheTextures.stale(); // the prompts were written: the copies are made again, whole
  // step.input holds each prompt's last position's layer output: its logits go to rows 0…P−1,
  // and every row of its group draws its first token from them (they would all compute them).
  headLogits(model, bufs, P);

  const rowLen = (b: number) => prompts[Math.floor(b / groupSize)].length;
  gpu.write(bufs.eos, Int32Array.from(eosIds));
  gpu.write(bufs.done, new Int32Array(B));
  // Each row's last prompt position: afterSample moves it on to its first token's.
  gpu.write(bufs.positions, Int32Array.from({ length: B }, (_, b) => rowLen(b) - 1));
  gpu.write(bufs.kvLens, Int32Array.from({ length: B }, (_, b) => rowLen(b)));
  const shape = {
    B,
    Lq: 1,
    capacity: bufs.capacity,
    nHeads: c.numHeads,
    nKvHeads: c.numKvHeads,
    headDim: c.headDim,
  };

  let steps = 0;
  // The flags as of the previous check, in flight while the steps since then were recorded.
  let doneRead: ReturnType<Gpu["readLater"]> | null = null;
  for (let s = 0; s < maxNew; s++) {
    // The first tokens come from the prompts' logits; each later step runs every row on.
    if (s > 0) {
      model.embed(bufs.ids, step.input, B);
      markWritten(bufs, c, B, (b) => rowLen(b) + s - 1);
      // Each layer writes its output over its own input (read only before it is written).
      for (let i = 0; i < c.numLayers; i++) {
        model.layerForward(i, step, step.input, {
          T: B,
          positions: bufs.positions,
          kvLens: bufs.kvLens,
          shape,
          cache: { ...cache[i], kept: bufs.cacheTextures },
        });
      }
      headLogits(model, bufs, B);
    }
    sample(
      gpu,
      bufs.logits,
      B,
      c.vocabSize,
      { ...opts, step: s, groupSize: s === 0 ? groupSize : 1 },
      bufs.done,
      bufs.sampled,
      bufs.logp,
    );
    afterSample(gpu, bufs, B, opts.eosIds.length, s);
    // Submit each step as soon as it is recorded: the GPU starts on it while the next one is.
    gpu.flush();
    steps = s + 1;
    if (steps % DONE_CHECK_EVERY !== 0 || steps === maxNew) continue;
    if (doneRead) {
      await new Promise((resolve) => setTimeout(resolve, 0)); // let an arrived read land
      const [done] = await doneRead;
      // Only this call's rows: kept buffers sized for a larger call hold its flags past them.
      if (done.subarray(0, B).every((d) => d !== 0)) break;
    }
    // Read the flags now only if a later check can still save steps.
    doneRead = steps + DONE_CHECK_EVERY < maxNew ? gpu.readLater([bufs.done]) : null;
  }

  const [tokenData, logpData] = await gpu.readMany([bufs.outTokens, bufs.outLogp]);
  await doneRead; // made before the read above, so arrived: settled before anything is destroyed
  const result: Completions = { tokens: [], logprobs: [], truncated: [] };
  for (let b = 0; b < B; b++) {
    const tokens: number[] = [], lps: number[] = [];
    let finished = false;
    for (let s = 0; s < steps && !finished; s++) {
      tokens.push(tokenData[s * B + b]);
      lps.push(logpData[s * B + b]);
      finished = opts.eosIds.includes(tokenData[s * B + b]);
    }
    result.tokens.push(tokens);
    result.logprobs.push(lps);
    result.truncated.push(!finished);
  }
  return result;
}

function roundUp(n: number, multiple: number): number {
  return Math.ceil(n / multiple) * multiple;
}

/** Every layer's keys and values, in f32 or 16 bits (kv_cache_dtype). */
function kvCache(gpu: Gpu, c: ModelConfig, B: number, capacity: number, dtype: KvDtype): KvCache {
  return Array.from({ length: c.numLayers }, () => ({
    k: gpu.zeros([B, capacity, c.numKvHeads, c.headDim], dtype),
    v: gpu.zeros([B, capacity, c.numKvHeads, c.headDim], dtype),
  }));
}

/** bufs.logits rows 0…n−1 from the layers' outputs in bufs.step.input: final norm, projection. */
function headLogits(model: GpuModel, bufs: Buffers, n: number): void {
  const c = model.config, x = bufs.step;
  if (model.generationFusions().norms) return model.vocabLogits(x.input, bufs.logits, n, true);
  rmsnorm(model.gpu, x.input, model.p("model.norm.weight"), bufs.hidden, x.rstd1, n, c.rmsNormEps);
  model.vocabLogits(bufs.hidden, bufs.logits, n);
}

/**
 * Run these prompts (one prefill batch, prompts first…, each padded to L tokens) through the
 * layers, into rows 0… of the prompt cache, and gather each one's last position's output into
 * rows first… of bufs.step.input.
 */
function prefill(model: GpuModel, prompts: number[][], L: number, first: number, bufs: Buffers) {
  const gpu = model.gpu, c = model.config, P = prompts.length, T = P * L, H = c.hiddenSize;
  const ids = new Int32Array(T), positions = new Int32Array(T);
  prompts.forEach((prompt, p) => ids.set(prompt, p * L));
  for (let t = 0; t < T; t++) positions[t] = t % L;
  gpu.write(bufs.prefillIds, ids);
  gpu.write(bufs.prefillPositions, positions);
  gpu.write(bufs.prefillKvLens, new Int32Array(P).fill(L));
  const x = bufs.prefill;
  const shape = {
    B: P,
    Lq: L,
    capacity: bufs.capacity,
    nHeads: c.numHeads,
    nKvHeads: c.numKvHeads,
    headDim: c.headDim,
  };
  model.embed(bufs.prefillIds, x.input, T);
  for (let i = 0; i < c.numLayers; i++) {
    model.layerForward(i, x, x.input, {
      T,
      positions: bufs.prefillPositions,
      kvLens: bufs.prefillKvLens,
      shape,
      cache: bufs.promptCache[i],
    });
  }
  // bufs.ids is free until the first tokens are drawn: it lists the rows to gather.
  gpu.write(bufs.ids, Int32Array.from(prompts, (prompt, p) => p * L + prompt.length - 1));
  embedding(gpu, bufs.ids, x.input, bufs.hidden, P);
  gpu.copy(bufs.hidden, bufs.step.input, P * H, 0, first * H);
}

/**
 * Tell the caches' texture copies what a decode step writes: row b's keys and values at position
 * `position(b)` (every row moves on one position a step, finished or not: afterSample).
 */
function markWritten(bufs: Buffers, c: ModelConfig, B: number, position: (b: number) => number) {
  const rowSize = c.numKvHeads * c.headDim;
  const ranges = Array.from(
    { length: B },
    (_, b): [number, number] => [(b * bufs.capacity + position(b)) * rowSize, rowSize],
  );
  for (const layer of bufs.cache) {
    bufs.cacheTextures.changed(layer.k, ranges);
    bufs.cacheTextures.changed(layer.v, ranges);
  }
}

/**
 * Copy the first `positions` of rows 0…count−1 of the prompt cache (prompts first…first+count−1)
 * to rows (first + p)·G … (first + p)·G + G − 1 of the decode cache.
 */
function copyToGroups(
  gpu: Gpu,
  from: KvCache,
  to: KvCache,
  G: number,
  first: number,
  count: number,
  positions: number,
): void {
  from.forEach((layer, i) => {
    for (const key of ["k", "v"] as const) {
      copyCacheToGroups(gpu, layer[key], to[i][key], G, first, count, positions);
    }
  });
}
