// The 16-bit KV cache (kv_cache_dtype bf16/f16, gpu/kernels/attention.ts): writeKvCache rounds
// each new key and value to the CPU's packing of them (core/half.ts, round to nearest even), and
// attention over the 16-bit cache equals, bit for bit, attention over an f32 cache holding the
// same rounded values (the f32 kernel is checked against its twin in attention_test.ts). A whole
// generation with a 16-bit cache stays close to the f32 cache: greedy tokens equal and log-probs
// within 0.02 on a small model whose keys are O(1) (bf16 keeps 8 bits of mantissa: ~0.4% per
// key; f16 11 bits), not equal: sampling is no longer bit-identical to the f32 cache. The plan
// counts the cache as generation allocates it.

import assert from "node:assert/strict";
import { type HalfDType, packHalves, roundThrough } from "../core/half.ts";
import { initWeights } from "../core/init.ts";
import { parseModelConfig } from "../core/model_config.ts";
import { Rng } from "../core/rng.ts";
import { generate } from "../gpu/generate.ts";
import { attention, type AttentionShape, writeKvCache } from "../gpu/kernels/attention.ts";
import { GpuModel } from "../gpu/model.ts";
import { allocatedBytes, gpuTest, openGpu, randoms } from "./helpers.ts";
import { planMemory, PREFILL_BATCH_TOKENS, prefillPrompts } from "../core/plan.ts";
import { defaultTrainConfig, type TrainConfig } from "../core/train_config.ts";

const gpu = await openGpu();

for (const dtype of ["bf16", "f16"] as const) {
  // headDim 6 reads the cache in vec2 chunks (one word), headDim 8 in vec4 chunks (two words).
  for (const headDim of [6, 8]) {
    Deno.test(
      `a ${dtype} cache holds the rounded keys, and attention over it is f32 attention over them (D ${headDim})`,
      gpuTest,
      async () => {
        const s: AttentionShape = { B: 3, Lq: 5, capacity: 11, nHeads: 4, nKvHeads: 2, headDim };
        const row = s.nKvHeads * headDim, rng = new Rng(headDim);
        const kvLens = gpu.upload(new Int32Array([5, 9, 11]));
        const kNew = randoms(s.B * s.Lq * row, rng, 2), vNew = randoms(s.B * s.Lq * row, rng, 2);
        const q = gpu.upload(randoms(s.B * s.Lq * s.nHeads * headDim, rng));
        // Earlier positions already cached (random), then this call's 5 positions written.
        const earlier = roundThrough(randoms(s.B * s.capacity * row, rng), dtype as HalfDType);
        const cache16 = (values: Float32Array) => {
          const t = gpu.zeros([s.B, s.capacity, s.nKvHeads, headDim], dtype);
          gpu.write(t, packHalves(values, dtype));
          return t;
        };
        const k16 = cache16(earlier), v16 = cache16(earlier);
        const kT = gpu.upload(kNew), vT = gpu.upload(vNew);
        writeKvCache(gpu, kT, k16, kvLens, s);
        writeKvCache(gpu, vT, v16, kvLens, s);
        // The f32 twin: the same writes of the CPU-rounded values.
        const k32 = gpu.upload(earlier.slice()), v32 = gpu.upload(earlier.slice());
        const kR = gpu.upload(roundThrough(kNew, dtype)),
          vR = gpu.upload(roundThrough(vNew, dtype));
        writeKvCache(gpu, kR, k32, kvLens, s);
        writeKvCache(gpu, vR, v32, kvLens, s);
        const out = () => gpu.zeros([s.B * s.Lq * s.nHeads * headDim]);
        const lse = () => gpu.zeros([s.B * s.nHeads * s.Lq]);
        const [o16, l16, o32, l32] = [out(), lse(), out(), lse()];
        attention(gpu, q, k16, v16, kvLens, o16, l16, s);
        attention(gpu, q, k32, v32, kvLens, o32, l32, s);
        const [words, want, ...results] = await gpu.readMany([k16, k32, o16, l16, o32, l32]);
        assert.deepEqual(words, packHalves(want as Float32Array, dtype), "cache contents");
        assert.deepEqual(results[0], results[2], "attention output");
        assert.deepEqual(results[1], results[3], "log-sum-exp");
      },
    );
  }
}

Deno.test("generation with a 16-bit cache stays close to the f32 cache", gpuTest, async () => {
  const config = parseModelConfig({
    vocab_size: 23,
    hidden_size: 32,
    intermediate_size: 45,
    num_hidden_layers: 2,
    num_attention_heads: 4,
    num_key_value_heads: 2,
    tie_word_embeddings: false,
  });
  const weights = initWeights(config, 5), rng = new Rng(5);
  for (const [name, w] of weights) {
    if (!name.endsWith("norm.weight")) {
      for (let i = 0; i < w.length; i++) w[i] = 0.3 * rng.normal();
    }
  }
  const prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10, 11]];
  const opts = { temperature: 0, topP: 1, topK: 0, maxNewTokens: 8, eosIds: [], seed: 1 };
  const run = async (kvCacheDtype: "f32" | "bf16" | "f16") => {
    const model = new GpuModel(gpu, config, weights, { kvCacheDtype });
    const out = await generate(model, prompts, 2, opts);
    model.destroy();
    return out;
  };
  const f32 = await run("f32");
  for (const dtype of ["bf16", "f16"] as const) {
    const half = await run(dtype);
    assert.deepEqual(half.tokens, f32.tokens, dtype);
    let worst = 0, differs = false;
    half.logprobs.forEach((row, r) =>
      row.forEach((x, t) => {
        worst = Math.max(worst, Math.abs(x - f32.logprobs[r][t]));
        differs ||= x !== f32.logprobs[r][t];
      })
    );
    assert.ok(worst <= 0.02, `${dtype}: log-probs differ by up to ${worst}`);
    assert.ok(differs, `${dtype}: the cache is really 16-bit`);
  }
});

Deno.test(
  "the plan counts what a 16-bit cache saves, as generation allocates it",
  gpuTest,
  async () => {
    // 5 prompts of 4 tokens × 3 samples, 6 new tokens: the decode cache and the prompt caches
    // (one prefill batch: the plan counts one, as the engine frees each before the next).
    const config = parseModelConfig({
      vocab_size: 23,
      hidden_size: 32,
      intermediate_size: 45,
      num_hidden_layers: 2,
      num_attention_heads: 4,
      num_key_value_heads: 2,
    });
    const weights = initWeights(config, 2);
    const prompts = Array.from({ length: 5 }, (_, p) => [p + 1, 2, 3, 4]);
    assert.equal(prefillPrompts(5, 3, PREFILL_BATCH_TOKENS), 5);
    const cfg: TrainConfig = {
      ...defaultTrainConfig(),
      prompts_per_step: 5,
      prompts_per_generation: 5,
      num_generations: 3,
      max_prompt_length: 4,
      max_completion_length: 6,
      eval_prompts: 1,
    };
    const opts = { temperature: 1, topP: 1, topK: 0, maxNewTokens: 6, eosIds: [], seed: 3 };
    const model = new GpuModel(gpu, config, weights);
    const half = new GpuModel(gpu, config, weights, { kvCacheDtype: "bf16" });
    const engine = (m: GpuModel) => allocatedBytes(gpu, () => generate(m, prompts, 3, opts));
    const planned = (kv_cache_dtype: "f32" | "bf16") =>
      planMemory({ ...cfg, kv_cache_dtype }, config).items
        .find((i) => i.what === "generation KV cache")!.bytes;
    const saved = (await engine(model)) - (await engine(half));
    assert.ok(saved > 0);
    assert.equal(saved, planned("f32") - planned("bf16"));
    assert.equal(planned("bf16") * 2, planned("f32"));
    model.destroy();
    half.destroy();
  },
);
