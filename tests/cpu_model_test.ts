// The CPU twin against PyTorch golden log-probs (tests/fixtures/make_golden.py), and its
// gradients (of every weight, and of every LoRA matrix) against central finite differences, all
// in float64.

import assert from "node:assert/strict";
import { loadCheckpoint } from "../core/checkpoint.ts";
import {
  type CpuAdapter,
  cpuForwardBackward,
  cpuLogprobs,
  type Weights,
} from "../core/cpu_model.ts";
import { loraShapes } from "../core/lora.ts";
import { defaultLoraConfig, type LoraConfig } from "../core/train_config.ts";
import { type ModelConfig, parseModelConfig, weightShapes } from "../core/model_config.ts";
import { Rng } from "../core/rng.ts";
import { centralDifference } from "./helpers.ts";

const GOLDEN = new URL("./fixtures/golden/", import.meta.url).pathname;
const GOLDEN_NAMES = ["gqa_tied", "gqa3_untied", "mha_untied", "bf16_tied", "f16_sharded"];

for (const name of GOLDEN_NAMES) {
  Deno.test(`cpuLogprobs matches PyTorch float64 on golden/${name} within 1e-9`, async () => {
    const { config, weights } = await loadCheckpoint(GOLDEN + name);
    const expected = JSON.parse(await Deno.readTextFile(`${GOLDEN}${name}/expected.json`));
    const got = cpuLogprobs(config, weights, expected.sequences);
    assert.equal(got.length, expected.logprobs.length);
    for (let i = 0; i < got.length; i++) {
      assert.equal(got[i].length, expected.sequences[i].length - 1);
      for (let t = 0; t < got[i].length; t++) {
        const diff = Math.abs(got[i][t] - expected.logprobs[i][t]);
        assert.ok(
          diff <= 1e-9,
          `sequence ${i} token ${t}: ${got[i][t]} vs ${expected.logprobs[i][t]}`,
        );
      }
    }
  });
}

/** Random float64 weights large enough that every path matters: matrices ±√(3/fan_in),
 * biases ±0.3, norm weights 1 ± 0.3, embedding ±1. */
function randomWeights(config: ModelConfig, seed: number): Map<string, Float64Array> {
  const rng = new Rng(seed);
  const weights = new Map<string, Float64Array>();
  for (const [name, shape] of weightShapes(config)) {
    const scale = name.endsWith(".bias") || name.endsWith("norm.weight")
      ? 0.3
      : name === "model.embed_tokens.weight"
      ? 1
      : Math.sqrt(3 / shape[1]);
    const offset = name.endsWith("norm.weight") ? 1 : 0;
    const data = new Float64Array(shape.reduce((a, b) => a * b, 1));
    for (let i = 0; i < data.length; i++) data[i] = offset + scale * (2 * rng.next() - 1);
    weights.set(name, data);
  }
  return weights;
}

const SMALL_SHAPE = {
  vocab_size: 13,
  hidden_size: 16,
  intermediate_size: 11,
  num_hidden_layers: 2,
  num_attention_heads: 4,
  num_key_value_heads: 2,
  rope_theta: 100,
  rms_norm_eps: 1e-5,
};

for (const tied of [false, true]) {
  Deno.test(`cpuForwardBackward gradients match finite differences (tied=${tied})`, () => {
    const config = parseModelConfig({ ...SMALL_SHAPE, tie_word_embeddings: tied });
    const weights = randomWeights(config, tied ? 7 : 8);
    const sequences = [[3, 0, 12, 5, 5, 9], [7, 1, 2], [4]];
    const rng = new Rng(99);
    const dLogprobs = sequences.map((s) => s.slice(1).map(() => 2 * rng.next() - 1));
    // The scalar whose gradient is taken: Σ dLogprobs · logprobs.
    const objective = (w: Weights) =>
      cpuLogprobs(config, w, sequences).flat().reduce(
        (sum, lp, i) => sum + lp * dLogprobs.flat()[i],
        0,
      );
    const { logprobs, grads } = cpuForwardBackward(config, weights, sequences, dLogprobs);
    assert.deepEqual(logprobs, cpuLogprobs(config, weights, sequences));
    assert.deepEqual([...grads.keys()], [...weightShapes(config).keys()]);

    const step = 1e-5;
    let worst = 0;
    for (const [name, w] of weights) {
      // Embedding rows of tokens absent from the sequences only get gradient when tied.
      const usedRows = [...new Set(sequences.flat())];
      const entries = Array.from({ length: 4 }, () => {
        if (name !== "model.embed_tokens.weight" || tied) return rng.int(w.length);
        return usedRows[rng.int(usedRows.length)] * config.hiddenSize + rng.int(config.hiddenSize);
      });
      let sampledSize = 0;
      for (const i of entries) {
        const numeric = centralDifference(w, i, step, () => objective(weights));
        const analytic = grads.get(name)![i];
        const error = Math.abs(numeric - analytic) / Math.max(1, Math.abs(numeric));
        worst = Math.max(worst, error);
        assert.ok(error < 1e-7, `${name}[${i}]: analytic ${analytic}, numeric ${numeric}`);
        sampledSize += Math.abs(numeric);
      }
      assert.ok(sampledSize > 1e-3, `${name}: the sampled gradients are all ~0 (${sampledSize})`);
    }
    if (!tied) {
      // An embedding row never used gets exactly zero gradient.
      const unused = 6 * config.hiddenSize;
      assert.ok(
        grads.get("model.embed_tokens.weight")!.subarray(unused, unused + 16).every((g) => g === 0),
      );
    }
    console.log(`worst relative error ${worst.toExponential(2)}`);
  });
}

/** A LoRA adapter with random A and B (PEFT's B = 0 would leave A without gradient). */
function randomAdapter(config: ModelConfig, lora: LoraConfig, seed: number): CpuAdapter {
  const rng = new Rng(seed);
  const tensors = new Map<string, Float64Array>();
  for (const [name, shape] of loraShapes(config, lora)) {
    const scale = Math.sqrt(3 / shape[1]);
    tensors.set(
      name,
      Float64Array.from({ length: shape[0] * shape[1] }, () => scale * (2 * rng.next() - 1)),
    );
  }
  return { lora, tensors };
}

const LORA_CASES: [string, LoraConfig][] = [
  ["all seven targets, r 3", { ...defaultLoraConfig(), r: 3, alpha: 5 }],
  [
    "q_proj v_proj down_proj, rsLoRA r 2",
    {
      r: 2,
      alpha: 3,
      target_modules: ["q_proj", "v_proj", "down_proj"],
      use_rslora: true,
      dropout: 0,
    },
  ],
];

for (const [label, lora] of LORA_CASES) {
  Deno.test(`cpuForwardBackward LoRA gradients match finite differences (${label})`, () => {
    const config = parseModelConfig({ ...SMALL_SHAPE, tie_word_embeddings: true });
    const weights = randomWeights(config, 21);
    const adapter = randomAdapter(config, lora, 22);
    const sequences = [[3, 0, 12, 5, 5, 9], [7, 1, 2]];
    const rng = new Rng(23);
    const dLogprobs = sequences.map((s) => s.slice(1).map(() => 2 * rng.next() - 1));
    const objective = () =>
      cpuLogprobs(config, weights, sequences, adapter).flat().reduce(
        (sum, lp, i) => sum + lp * dLogprobs.flat()[i],
        0,
      );
    const { logprobs, grads } = cpuForwardBackward(config, weights, sequences, dLogprobs, adapter);
    assert.deepEqual(logprobs, cpuLogprobs(config, weights, sequences, adapter));
    // The adapter changes the model: its log-probs differ from the base's.
    assert.notDeepEqual(logprobs, cpuLogprobs(config, weights, sequences));
    assert.deepEqual(
      [...grads.keys()],
      [...weightShapes(config).keys(), ...loraShapes(config, lora).keys()],
    );
    let checked = 0;
    for (const [name, values] of adapter.tensors) {
      const w = values as Float64Array;
      let sampledSize = 0;
      for (let n = 0; n < 4; n++) {
        const i = rng.int(w.length);
        const numeric = centralDifference(w, i, 1e-5, objective);
        const analytic = grads.get(name)![i];
        const error = Math.abs(numeric - analytic) / Math.max(1, Math.abs(numeric));
        assert.ok(error < 1e-7, `${name}[${i}]: analytic ${analytic}, numeric ${numeric}`);
        sampledSize += Math.abs(numeric);
      }
      assert.ok(sampledSize > 1e-4, `${name}: the sampled gradients are all ~0 (${sampledSize})`);
      checked++;
    }
    assert.equal(checked, 2 * lora.target_modules.length * config.numLayers);
  });
}

Deno.test("cpu LoRA with B = 0 (PEFT's init) leaves the base model's log-probs exactly", () => {
  const config = parseModelConfig({ ...SMALL_SHAPE, tie_word_embeddings: false });
  const weights = randomWeights(config, 31);
  const lora = defaultLoraConfig();
  const adapter = randomAdapter(config, lora, 32);
  for (const [name, t] of adapter.tensors) if (name.includes("lora_B")) t.fill(0);
  const sequences = [[3, 0, 12, 5, 5, 9]];
  assert.deepEqual(
    cpuLogprobs(config, weights, sequences, adapter),
    cpuLogprobs(config, weights, sequences),
  );
});
