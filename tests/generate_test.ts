// Generation with the KV cache against full recomputation, sampling statistics, truncation.

import assert from "node:assert/strict";
import { initWeights } from "../core/init.ts";
import { parseModelConfig } from "../core/model_config.ts";
import { Rng } from "../core/rng.ts";

import { generate } from "../gpu/generate.ts";
import { loraModules } from "../core/lora.ts";
import { LORA_TARGETS, type LoraConfig } from "../core/train_config.ts";
import { PREFILL_BATCH_TOKENS, prefillPrompts } from "../core/plan.ts";
import { GpuModel } from "../gpu/model.ts";
import { FOLDED_NORM_MAX_HIDDEN } from "../gpu/kernels/matmul.ts";
import { scoreSequences } from "../gpu/score.ts";
import { assertClose, gpuTest, openGpu } from "./helpers.ts";

const gpu = await openGpu();
const V = 23;
const config = parseModelConfig({
  vocab_size: V,
  hidden_size: 32,
  intermediate_size: 45,
  num_hidden_layers: 2,
  num_attention_heads: 4,
  num_key_value_heads: 2,
  tie_word_embeddings: false,
});

// The same model with an intermediate size that is a multiple of 4: on software adapters its
// generation folds the RMSNorms and SwiGLU into the products (matmul's generationFusions);
// config's 45 keeps the separate kernels. A hidden size past FOLDED_NORM_MAX_HIDDEN keeps the
// norms' kernels and fuses SwiGLU alone. Greedy decoding is checked on all three.
const fusingConfig = parseModelConfig({
  vocab_size: V,
  hidden_size: 32,
  intermediate_size: 44,
  num_hidden_layers: 2,
  num_attention_heads: 4,
  num_key_value_heads: 2,
  tie_word_embeddings: false,
});
const wideConfig = parseModelConfig({
  vocab_size: V,
  hidden_size: FOLDED_NORM_MAX_HIDDEN + 8,
  intermediate_size: 44,
  num_hidden_layers: 2,
  num_attention_heads: 4,
  num_key_value_heads: 2,
  tie_word_embeddings: false,
});

/**
 * Random weights of `scale`; the norms' weights 1, or 1 ± `normSpread` (so that a norm applied
 * twice, or not at all, changes the logits).
 */
function sharpWeights(seed: number, scale: number, modelConfig = config, normSpread = 0) {
  const weights = initWeights(modelConfig, seed);
  const rng = new Rng(seed);
  for (const [name, w] of weights) {
    const norm = name.endsWith("norm.weight");
    if (norm && normSpread === 0) continue;
    for (let i = 0; i < w.length; i++) {
      w[i] = norm ? 1 + normSpread * rng.normal() : scale * rng.normal();
    }
  }
  return weights;
}

/** A LoRA adapter on `targets` whose A and B are both non-zero, so that it moves the logits. */
function sharpAdapter(targets: LoraConfig["target_modules"], seed: number) {
  const lora: LoraConfig = {
    r: 4,
    alpha: 8,
    target_modules: targets,
    use_rslora: false,
    dropout: 0,
  };
  const rng = new Rng(seed), tensors = new Map<string, Float32Array>();
  for (const m of loraModules(fusingConfig, lora)) {
    tensors.set(m.a, Float32Array.from({ length: 4 * m.inFeatures }, () => 0.3 * rng.normal()));
    tensors.set(m.b, Float32Array.from({ length: 4 * m.outFeatures }, () => 0.3 * rng.normal()));
  }
  return { lora, tensors };
}

// `fusions`: what generationFusions picks for the model on a software adapter.
const GREEDY_CASES = [
  {
    name: "separate norm and SwiGLU kernels",
    model: () => new GpuModel(gpu, config, sharpWeights(5, 0.3, config, 0.3)),
    fusions: { norms: false, swiglu: false },
  },
  {
    name: "norms and SwiGLU fused into the products",
    model: () => new GpuModel(gpu, fusingConfig, sharpWeights(5, 0.3, fusingConfig, 0.3)),
    fusions: { norms: true, swiglu: true },
  },
  {
    name: "SwiGLU fused, the norms' kernels kept for a wide hidden size",
    model: () => new GpuModel(gpu, wideConfig, sharpWeights(5, 0.3, wideConfig, 0.3)),
    fusions: { norms: false, swiglu: true },
  },
  {
    // Every product's adapter reads the folded norm; gate/up's adapter keeps SwiGLU apart.
    name: "fused, with a LoRA adapter on every projection",
    model: () =>
      new GpuModel(gpu, fusingConfig, sharpWeights(5, 0.3, fusingConfig, 0.3), {
        lora: sharpAdapter([...LORA_TARGETS], 6),
      }),
    fusions: { norms: true, swiglu: true },
  },
  {
    name: "fused, with a LoRA adapter on the attention's projections only",
    model: () =>
      new GpuModel(gpu, fusingConfig, sharpWeights(5, 0.3, fusingConfig, 0.3), {
        lora: sharpAdapter(["q_proj", "v_proj"], 7),
      }),
    fusions: { norms: true, swiglu: true },
  },
];

for (const { name, model: makeModel, fusions } of GREEDY_CASES) {
  Deno.test(
    `greedy decoding with the cache picks the argmax of a full recomputation at every step (${name})`,
    gpuTest,
    async () => {
      const model = makeModel();
      if (gpu.software) assert.deepEqual(model.generationFusions(), fusions);
      const prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10, 11]]; // different lengths share one batch
      const eos = 0;
      const out = await generate(model, prompts, 2, {
        temperature: 0,
        topP: 1,
        topK: 0,
        maxNewTokens: 6,
        eosIds: [eos],
        seed: 1,
      });
      assert.equal(out.tokens.length, 6);
      for (let row = 0; row < 6; row++) {
        const prompt = prompts[Math.floor(row / 2)];
        // Both samples of a prompt are identical under greedy decoding.
        assert.deepEqual(out.tokens[row], out.tokens[row - (row % 2)]);
        for (let s = 0; s < out.tokens[row].length; s++) {
          const prefix = [...prompt, ...out.tokens[row].slice(0, s)];
          // Score every candidate next token without any cache; the chosen one must be the best.
          const candidates = Array.from({ length: V }, (_, v) => [...prefix, v]);
          const scores = (await scoreSequences(model, candidates)).map((r) => r.at(-1)!);
          const best = scores.indexOf(Math.max(...scores));
          assert.equal(out.tokens[row][s], best, `row ${row} step ${s}`);
          // Greedy log-probs are under temperature 1: the full recomputation's value.
          assert.ok(Math.abs(out.logprobs[row][s] - scores[best]) < 1e-4);
        }
        const ended = out.tokens[row].at(-1) === eos;
        assert.equal(out.truncated[row], !ended);
        if (!ended) assert.equal(out.tokens[row].length, 6);
      }
      model.destroy();
    },
  );
}

Deno.test("sampled tokens follow the model's probabilities", gpuTest, async () => {
  const model = new GpuModel(gpu, config, sharpWeights(8, 0.1));
  const prompt = [3, 1, 4];
  const temperature = 0.7, G = 3000;
  const out = await generate(model, [prompt], G, {
    temperature,
    topP: 1,
    topK: 0,
    maxNewTokens: 1,
    eosIds: [],
    seed: 42,
  });
  // The model's distribution at temperature 0.7, from a full recomputation.
  const lp = (await scoreSequences(model, Array.from({ length: V }, (_, v) => [...prompt, v]))).map(
    (r) => r.at(-1)!,
  );
  const scaled = lp.map((x) => x / temperature);
  const z = Math.log(scaled.reduce((a, x) => a + Math.exp(x), 0));
  const p = scaled.map((x) => Math.exp(x - z));
  const counts = new Array(V).fill(0);
  for (const t of out.tokens) counts[t[0]]++;
  for (let v = 0; v < V; v++) {
    // Binomial count within 5 standard deviations (+1 for tiny p).
    const sd = Math.sqrt(G * p[v] * (1 - p[v]));
    assert.ok(
      Math.abs(counts[v] - G * p[v]) <= 5 * sd + 1,
      `token ${v}: ${counts[v]} vs ${G * p[v]}`,
    );
  }
  // Each reported log-prob is the token's log-prob at that temperature.
  for (const [i, t] of out.tokens.entries()) {
    assert.ok(Math.abs(out.logprobs[i][0] - Math.log(p[t[0]])) < 1e-4);
  }
  model.destroy();
});

Deno.test(
  "sampling is reproducible for a seed, and a completion at the length limit is truncated",
  gpuTest,
  async () => {
    const model = new GpuModel(gpu, config, sharpWeights(9, 0.1));
    const sampling = {
      temperature: 1,
      topP: 0.9,
      topK: 10,
      maxNewTokens: 5,
      eosIds: [22],
      seed: 7,
    };
    const a = await generate(model, [[1, 2], [3]], 4, sampling);
    const b = await generate(model, [[1, 2], [3]], 4, sampling);
    const c = await generate(model, [[1, 2], [3]], 4, { ...sampling, seed: 8 });
    assert.deepEqual(a, b);
    assert.notDeepEqual(a.tokens, c.tokens);
    a.tokens.forEach((tokens, i) => {
      const ended = tokens.indexOf(22);
      if (ended >= 0) assert.equal(ended, tokens.length - 1); // nothing after the end token
      assert.equal(a.truncated[i], ended < 0);
      if (ended < 0) assert.equal(tokens.length, 5);
    });
    model.destroy();
  },
);

Deno.test(
  "a batch sampled in calls, each told its first row, draws what one call draws",
  gpuTest,
  async () => {
    // The trainer samples a step's prompts in calls of prompts_per_generation and relies on a
    // prompt's completions not depending on how the calls split the step (core/trainer.ts).
    const model = new GpuModel(gpu, config, sharpWeights(9, 0.1));
    const sampling = {
      temperature: 1,
      topP: 0.95,
      topK: 0,
      maxNewTokens: 6,
      eosIds: [22],
      seed: 11,
    };
    const prompts = [[1, 2], [3], [4, 5, 6, 7, 8], [9, 10], [11, 12, 13]], G = 3;
    const whole = await generate(model, prompts, G, sampling);
    const head = await generate(model, prompts.slice(0, 2), G, sampling);
    const tail = await generate(model, prompts.slice(2), G, { ...sampling, firstRow: 2 * G });
    assert.deepEqual([...head.tokens, ...tail.tokens], whole.tokens);
    assert.deepEqual([...head.truncated, ...tail.truncated], whole.truncated);
    // Each row computes alone; 1e-6 allows for kernels that order a sum by the batch's size.
    assertClose(
      [...head.logprobs, ...tail.logprobs].flat(),
      whole.logprobs.flat(),
      1e-6,
      1e-6,
      "log-probs",
    );
    // Without its first row the tail draws as the batch's first rows do: other tokens.
    const unshifted = await generate(model, prompts.slice(2), G, sampling);
    assert.notDeepEqual(unshifted.tokens, tail.tokens);
    model.destroy();
  },
);

Deno.test(
  "later tokens follow the model given the earlier ones, drawn with fresh random numbers",
  gpuTest,
  async () => {
    const model = new GpuModel(gpu, config, sharpWeights(8, 0.1));
    const prompt = [3, 1, 4];
    const temperature = 0.9, G = 4000;
    const out = await generate(model, [prompt], G, {
      temperature,
      topP: 1,
      topK: 0,
      maxNewTokens: 2,
      eosIds: [],
      seed: 5,
    });
    /** The model's next-token probabilities at `temperature` after `prefix`. */
    const probabilities = async (prefix: number[]) => {
      const candidates = Array.from({ length: V }, (_, v) => [...prefix, v]);
      const lp = (await scoreSequences(model, candidates)).map((r) => r.at(-1)! / temperature);
      const z = Math.log(lp.reduce((a, x) => a + Math.exp(x), 0));
      return lp.map((x) => Math.exp(x - z));
    };
    // For each first token seen often enough, the second token's counts must follow
    // p(· | prompt, first): a decode step that reused the first step's random number would draw
    // the second token from a narrow slice of its distribution.
    let checked = 0;
    for (let first = 0; first < V; first++) {
      const rows = out.tokens.filter((t) => t[0] === first);
      if (rows.length < 300) continue;
      checked++;
      const p = await probabilities([...prompt, first]);
      const counts = new Array(V).fill(0);
      for (const t of rows) counts[t[1]]++;
      for (let v = 0; v < V; v++) {
        const n = rows.length, sd = Math.sqrt(n * p[v] * (1 - p[v]));
        assert.ok(
          Math.abs(counts[v] - n * p[v]) <= 5 * sd + 1,
          `after ${first}, token ${v}: ${counts[v]} of ${n} vs ${n * p[v]}`,
        );
      }
      for (const [i, t] of out.tokens.entries()) {
        if (t[0] === first) assert.ok(Math.abs(out.logprobs[i][1] - Math.log(p[t[1]])) < 1e-4);
      }
    }
    assert.ok(checked >= 2, `only ${checked} first tokens were drawn 300 times`);
    model.destroy();
  },
);

Deno.test(
  "long prompts are prefilled in batches: the same as one prompt at a time",
  gpuTest,
  async () => {
    const model = new GpuModel(gpu, config, sharpWeights(12, 0.3));
    // Prefills of 1099–1299 tokens: one prompt per PREFILL_BATCH_TOKENS (2048) batch.
    const rng = new Rng(4);
    const prompts = [1100, 1300, 1200].map((n) => Array.from({ length: n }, () => rng.int(V)));
    assert.equal(prefillPrompts(prompts.length, 1299, PREFILL_BATCH_TOKENS), 1);
    const opts = { temperature: 0, topP: 1, topK: 0, maxNewTokens: 3, eosIds: [], seed: 1 };
    const together = await generate(model, prompts, 2, opts);
    for (let p = 0; p < prompts.length; p++) {
      const alone = await generate(model, [prompts[p]], 2, opts);
      for (const j of [0, 1]) {
        assert.deepEqual(together.tokens[2 * p + j], alone.tokens[j], `prompt ${p}`);
        together.logprobs[2 * p + j].forEach((x, t) =>
          assert.ok(Math.abs(x - alone.logprobs[j][t]) < 1e-5, `prompt ${p} token ${t}`)
        );
      }
    }
    model.destroy();
  },
);

Deno.test(
  "kept generation buffers: any order of shapes gives what a fresh model gives",
  gpuTest,
  async () => {
    // Buffers are kept per kind of call (two at a time), grown to the largest call and reused:
    // nothing from an earlier call (done flags, positions, cache rows, old tokens) may leak.
    const sampling = {
      temperature: 1,
      topP: 1,
      topK: 0,
      maxNewTokens: 6,
      eosIds: [12, 21, 7],
      seed: 3,
    };
    const calls: [number[][], number, number][] = [
      [[[1, 2, 3], [4]], 3, 6],
      [[[7, 8, 9, 10, 11, 12], [2, 2]], 2, 4],
      [[[1, 2, 3], [4]], 3, 6],
      [[[3]], 5, 6],
      [[[6, 6, 6, 6, 6]], 1, 3],
      [[[7, 8, 9, 10, 11, 12], [2, 2]], 2, 4],
      [[[1, 2, 3], [4]], 3, 6],
      [[[2, 1]], 3, 6], // fewer prompts: the kept buffers serve
      [[[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]], 3, 6], // longer: they grow
      [[[1, 2, 3], [4]], 3, 6],
    ];
    const weights = sharpWeights(4, 0.3);
    const kept = new GpuModel(gpu, config, weights);
    for (const [i, [prompts, G, maxNewTokens]] of calls.entries()) {
      const fresh = new GpuModel(gpu, config, weights);
      const want = await generate(fresh, prompts, G, { ...sampling, maxNewTokens });
      fresh.destroy();
      const got = await generate(kept, prompts, G, { ...sampling, maxNewTokens });
      assert.deepEqual(got, want, `call ${i}`);
    }
    assert.ok(kept.kept.size <= 1, "one kind of call kept");
    kept.destroy();
  },
);

Deno.test(
  "a decode step copies only the cache positions it wrote to attention's textures: as from storage",
  gpuTest,
  async () => {
    // Long prompts make each layer's cache large against the rows' few new positions, so the
    // caches' texture copies (software adapters) take each step's positions alone; rows of
    // different prompt lengths write different positions. Reading every input from storage
    // instead must give the same tokens and log-probs, and a second call (the copies kept, the
    // caches rewritten) too.
    const rng = new Rng(9);
    const prompts = [700, 650].map((n) => Array.from({ length: n }, () => rng.int(V)));
    const sampling = {
      temperature: 1,
      topP: 1,
      topK: 0,
      maxNewTokens: 8,
      eosIds: [],
      seed: 3,
    };
    const model = new GpuModel(gpu, config, sharpWeights(6, 0.3));
    const before = gpu.textureInputs;
    try {
      const kept = [];
      for (let call = 0; call < 2; call++) kept.push(await generate(model, prompts, 2, sampling));
      gpu.textureInputs = "never";
      const storage = await generate(model, prompts, 2, sampling);
      for (const got of kept) {
        assert.deepEqual(got.tokens, storage.tokens);
        got.logprobs.forEach((row, r) =>
          assertClose(row, storage.logprobs[r], 1e-6, 0, `row ${r}'s log-probs`)
        );
      }
    } finally {
      gpu.textureInputs = before;
      model.destroy();
    }
  },
);

Deno.test(
  "generation stops within two checks of every row finishing, its checks read while steps run",
  gpuTest,
  async () => {
    // Every token is an end of sequence: each row is done after its first token. The flags read
    // at step 4 are looked at, without stalling, at step 8: so 8 steps run, not 40, whatever an
    // earlier call with more rows left in the kept buffers.
    const model = new GpuModel(gpu, config, sharpWeights(9, 0.3));
    const prompts = [[1, 2], [3, 4, 5]];
    const opts = { temperature: 1, topP: 1, topK: 0, eosIds: [...Array(V).keys()], seed: 3 };
    const dispatches = async (maxNewTokens: number, eosIds = opts.eosIds) => {
      const before = gpu.dispatchCount;
      const out = await generate(model, prompts, 3, { ...opts, eosIds, maxNewTokens });
      return { out, count: gpu.dispatchCount - before };
    };
    // Dispatches of one decode step: a generation of 2 steps less one of 1 (no EOS: no stop).
    const one = (await dispatches(1, [])).count, perStep = (await dispatches(2, [])).count - one;
    // First a larger call on the same kept buffers whose rows never end (its end ids are out of
    // the vocabulary): the flags of its rows past this call's must not hold the stop back.
    const neverEnds = Array.from({ length: V }, (_, i) => V + i);
    await generate(model, [...prompts, [6]], 3, { ...opts, eosIds: neverEnds, maxNewTokens: 40 });
    const { out, count } = await dispatches(40);
    assert.equal(count, one + 7 * perStep, "8 decode steps");
    for (const tokens of out.tokens) assert.equal(tokens.length, 1);
    assert.ok(out.truncated.every((t) => !t));
    model.destroy();
  },
);
