// The whole GPU model against independent math: log-probs against golden values from a PyTorch
// Qwen2 (tests/fixtures/make_golden.py), every weight's gradient against the float64 CPU twin,
// and save → load → score.

import assert from "node:assert/strict";
import { loadCheckpoint, saveCheckpoint } from "../core/checkpoint.ts";
import { cpuForwardBackward } from "../core/cpu_model.ts";
import { initWeights } from "../core/init.ts";
import { parseModelConfig, toHfConfig } from "../core/model_config.ts";
import { Rng } from "../core/rng.ts";

import { GpuModel } from "../gpu/model.ts";
import { scoreSequences } from "../gpu/score.ts";
import { assertRowsClose, fixtureCases, GOLDEN_CASES, gpuTest, openGpu } from "./helpers.ts";

const gpu = await openGpu();
const GOLDEN = new URL("./fixtures/golden/", import.meta.url).pathname;

for (const name of fixtureCases(GOLDEN, GOLDEN_CASES)) {
  const entry = { name };
  Deno.test(`GPU log-probs match PyTorch golden values: ${entry.name}`, gpuTest, async () => {
    const dir = GOLDEN + entry.name;
    const expected = JSON.parse(Deno.readTextFileSync(`${dir}/expected.json`));
    const checkpoint = await loadCheckpoint(dir);
    const model = new GpuModel(gpu, checkpoint.config, checkpoint.weights);
    const logprobs = await scoreSequences(model, expected.sequences);
    model.destroy();
    // f32 on the GPU against float64 in PyTorch, on the same (rounded) weights.
    assertRowsClose(logprobs, expected.logprobs, 1e-4, entry.name);
  });
}

// An odd shape: 3 layers, 6 query heads over 2 kv heads, vocab 37, untied, hidden 48.
const oddConfig = parseModelConfig({
  vocab_size: 37,
  hidden_size: 48,
  intermediate_size: 70,
  num_hidden_layers: 3,
  num_attention_heads: 6,
  num_key_value_heads: 2,
  rope_theta: 5000,
  rms_norm_eps: 1e-5,
  tie_word_embeddings: false,
});

function randomWeights(seed: number) {
  // Larger than init scale so every path (norm weights, biases) carries signal.
  const weights = initWeights(oddConfig, seed);
  const rng = new Rng(seed + 1);
  for (const [name, w] of weights) {
    for (let i = 0; i < w.length; i++) {
      w[i] = name.endsWith("norm.weight") ? 1 + 0.3 * rng.normal() : 0.15 * rng.normal();
    }
  }
  return weights;
}

Deno.test("GPU gradients of every weight match the float64 CPU twin", gpuTest, async () => {
  const weights = randomWeights(7);
  const rng = new Rng(3);
  // 3 × 61 = 183 tokens: with 64-token logit chunks, three chunks, the last one partial.
  const B = 3, L = 61;
  const sequences = Array.from({ length: B }, () => Array.from({ length: L }, () => rng.int(37)));
  const dLogprobs = sequences.map((s) => Array.from({ length: s.length - 1 }, () => rng.normal()));
  const cpu = cpuForwardBackward(oddConfig, weights, sequences, dLogprobs);

  const model = new GpuModel(gpu, oddConfig, weights, {
    logitChunkFloats: 64 * oddConfig.vocabSize,
  });
  const ids = Int32Array.from(sequences.flat());
  const logp = await gpu.read(model.forward(ids, B, L));
  const upstream = new Float32Array(B * L);
  dLogprobs.forEach((row, b) => row.forEach((d, t) => upstream[b * L + t] = d));
  // Twice, to check gradients accumulate.
  model.backward(upstream);
  model.forward(ids, B, L);
  model.backward(upstream);
  const grads = await model.readGrads();
  model.destroy();

  for (let b = 0; b < B; b++) {
    for (let t = 0; t < L - 1; t++) {
      assert.ok(Math.abs(logp[b * L + t] - cpu.logprobs[b][t]) < 1e-4);
    }
  }
  for (const [name, expected] of cpu.grads) {
    const got = grads.get(name)!;
    const scale = Math.max(...expected.map(Math.abs));
    let worst = 0;
    for (let i = 0; i < expected.length; i++) {
      worst = Math.max(worst, Math.abs(got[i] / 2 - expected[i]));
    }
    // f32 accumulation over a few hundred terms: 1e-4 of the gradient's largest entry.
    assert.ok(worst <= 1e-4 * scale + 1e-6, `${name}: max error ${worst} (scale ${scale})`);
  }
});

Deno.test("save → load → score gives identical log-probs", gpuTest, async () => {
  const weights = randomWeights(11);
  const dir = await Deno.makeTempDir();
  await saveCheckpoint(dir, toHfConfig(oddConfig), weights);
  const loaded = await loadCheckpoint(dir);
  const sequences = [[1, 5, 9, 2], [3, 3, 3, 3, 3, 36, 0]];
  const a = new GpuModel(gpu, oddConfig, weights),
    b = new GpuModel(gpu, loaded.config, loaded.weights);
  assert.deepEqual(await scoreSequences(a, sequences), await scoreSequences(b, sequences));
  a.destroy();
  b.destroy();
  await Deno.remove(dir, { recursive: true });
});
