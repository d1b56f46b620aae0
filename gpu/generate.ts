// Batched sampling with a KV cache: the policy's completions for a set of prompts.
//
// Each prompt is prefilled once (all but its last token), its cache copied to the rows of its
// group — prompts in batches of at most PREFILL_BATCH_TOKENS tokens, so a large evaluation
// batch needs no more prefill memory than a few prompts — and then every row decodes one token per step: embedding → layers over the cache →
// final norm → logits → sample, all on the GPU. Sampled tokens feed the next step without a
// CPU round trip; the CPU reads the "done" flags only every few steps to stop early.

import type { Completions, SamplingOptions } from "../core/engine.ts";
import type { ModelConfig } from "../core/model_config.ts";
import type { Gpu, Tensor } from "./device.ts";
import { rmsnorm } from "./kernels/rmsnorm.ts";
import { markDone, sample } from "./kernels/sample.ts";
import { prefillPrompts } from "../core/plan.ts";
import type { KvDtype } from "./kernels/attention.ts";
import { type GpuModel, layerBuffers } from "./model.ts";

/** How often (in decode steps) the CPU checks whether every row has finished. */
const DONE_CHECK_EVERY = 4;

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
  const capacity = Math.max(...prompts.map((p) => p.length)) + maxNew;
  const cache = kvCache(gpu, c, B, capacity, model.kvCacheDtype);
  const prefillLen = Math.max(...prompts.map((p) => p.length - 1));
  const perPrefill = prefillPrompts(P, prefillLen);
  for (let first = 0; prefillLen > 0 && first < P; first += perPrefill) {
    const part = prompts.slice(first, first + perPrefill);
    const promptCache = kvCache(gpu, c, part.length, capacity, model.kvCacheDtype);
    prefill(model, part, prefillLen, capacity, promptCache);
    copyToGroups(gpu, promptCache, cache, groupSize, first);
    gpu.flush(); // this batch's buffers go once its work is submitted
  }

  // Decode buffers: one token per row.
  const step = layerBuffers(gpu, c, B, 1);
  const hidden = gpu.zeros([B, c.hiddenSize]), scratch = gpu.zeros([B, c.hiddenSize]);
  const logits = gpu.zeros([B, c.vocabSize]);
  const ids = gpu.zeros([B], "i32"),
    positions = gpu.zeros([B], "i32"),
    kvLens = gpu.zeros([B], "i32");
  const sampled = gpu.zeros([B], "i32"), logp = gpu.zeros([B]), done = gpu.zeros([B], "i32");
  const eos = gpu.upload(Int32Array.from(opts.eosIds.length ? opts.eosIds : [-1]));
  const outTokens = gpu.zeros([maxNew, B], "i32"), outLogp = gpu.zeros([maxNew, B]);
  const rowLen = (b: number) => prompts[Math.floor(b / groupSize)].length;
  gpu.write(
    ids,
    Int32Array.from({ length: B }, (_, b) => prompts[Math.floor(b / groupSize)].at(-1)!),
  );

  let steps = 0;
  for (let s = 0; s < maxNew; s++) {
    if (s > 0) gpu.copy(sampled, ids, B);
    gpu.write(positions, Int32Array.from({ length: B }, (_, b) => rowLen(b) - 1 + s));
    gpu.write(kvLens, Int32Array.from({ length: B }, (_, b) => rowLen(b) + s));
    model.embed(ids, step.input, B);
    const shape = {
      B,
      Lq: 1,
      capacity,
      nHeads: c.numHeads,
      nKvHeads: c.numKvHeads,
      headDim: c.headDim,
    };
    // Each layer writes its output over its own input (read only before the output is written).
    for (let i = 0; i < c.numLayers; i++) {
      model.layerForward(i, step, step.input, {
        T: B,
        positions,
        kvLens,
        shape,
        scratch,
        cache: cache[i],
      });
    }
    rmsnorm(gpu, step.input, model.p("model.norm.weight"), hidden, step.rstd1, B, c.rmsNormEps);
    model.vocabLogits(hidden, logits, B);
    sample(gpu, logits, B, c.vocabSize, { ...opts, step: s }, done, sampled, logp);
    markDone(gpu, sampled, eos, done, B, opts.eosIds.length);
    gpu.copy(sampled, outTokens, B, 0, s * B);
    gpu.copy(logp, outLogp, B, 0, s * B);
    steps = s + 1;
    if (steps % DONE_CHECK_EVERY === 0 && (await gpu.readInt(done)).every((d) => d !== 0)) break;
  }

  const [tokenData, logpData] = await gpu.readMany([outTokens, outLogp]);
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
  for (
    const t of [
      ...Object.values(step),
      hidden,
      scratch,
      logits,
      ids,
      positions,
      kvLens,
      sampled,
      logp,
      done,
      eos,
      outTokens,
      outLogp,
    ]
  ) {
    gpu.release(t);
  }
  for (const layer of cache) {
    gpu.release(layer.k);
    gpu.release(layer.v);
  }
  gpu.flush();
  return result;
}

type KvCache = { k: Tensor; v: Tensor }[];

/** Every layer's keys and values, in f32 or 16 bits (kv_cache_dtype). */
function kvCache(gpu: Gpu, c: ModelConfig, B: number, capacity: number, dtype: KvDtype): KvCache {
  return Array.from({ length: c.numLayers }, () => ({
    k: gpu.zeros([B, capacity, c.numKvHeads, c.headDim], dtype),
    v: gpu.zeros([B, capacity, c.numKvHeads, c.headDim], dtype),
  }));
}

/** Run all but the last token of each prompt through the layers, filling rows 0..P-1 of the cache. */
function prefill(
  model: GpuModel,
  prompts: number[][],
  L: number,
  capacity: number,
  cache: KvCache,
): void {
  const gpu = model.gpu, c = model.config, P = prompts.length, T = P * L;
  const ids = new Int32Array(T), positions = new Int32Array(T);
  prompts.forEach((prompt, p) => ids.set(prompt.slice(0, -1), p * L));
  for (let t = 0; t < T; t++) positions[t] = t % L;
  const idsT = gpu.upload(ids), positionsT = gpu.upload(positions);
  // Rows shorter than L are padded; their padding lands in the cache at positions the decode
  // steps overwrite before any query can see them.
  const kvLens = gpu.upload(new Int32Array(P).fill(L));
  const x = layerBuffers(gpu, c, P, L);
  const scratch = gpu.zeros([T, c.hiddenSize]);
  const shape = {
    B: P,
    Lq: L,
    capacity,
    nHeads: c.numHeads,
    nKvHeads: c.numKvHeads,
    headDim: c.headDim,
  };
  model.embed(idsT, x.input, T);
  for (let i = 0; i < c.numLayers; i++) {
    model.layerForward(i, x, x.input, {
      T,
      positions: positionsT,
      kvLens,
      shape,
      scratch,
      cache: cache[i],
    });
  }
  for (const t of [idsT, positionsT, kvLens, scratch, ...Object.values(x)]) gpu.release(t);
}

/**
 * Copy row p of a batch's prompt cache (prompt first + p) to rows (first + p)·G … +G−1 of the
 * decode cache; frees `from`.
 */
function copyToGroups(gpu: Gpu, from: KvCache, to: KvCache, G: number, first: number): void {
  from.forEach((layer, i) => {
    for (const key of ["k", "v"] as const) {
      const src = layer[key], row = src.size / src.shape[0];
      for (let p = 0; p < src.shape[0]; p++) {
        for (let j = 0; j < G; j++) {
          gpu.copy(src, to[i][key], row, p * row, ((first + p) * G + j) * row);
        }
      }
      gpu.release(src);
    }
  });
}
