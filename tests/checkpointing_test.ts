// Gradient checkpointing (GpuModel's gradientCheckpointing): the training forward keeps only
// each layer's input and backward recomputes the layer before going back through it. The same
// kernels on the same inputs give the same values, so log-probs and every weight's gradient must
// equal the plain run's bit for bit, on an odd shape (3 layers, GQA, untied, several logit
// chunks), over two accumulated backward passes, and after an AdamW step. And the memory plan
// counts what checkpointing saves exactly as the engine allocates it.

import assert from "node:assert/strict";
import { initWeights } from "../core/init.ts";
import { parseModelConfig } from "../core/model_config.ts";
import { Rng } from "../core/rng.ts";
import { GpuModel } from "../gpu/model.ts";
import { planMemory } from "../core/plan.ts";
import { defaultTrainConfig, type TrainConfig } from "../core/train_config.ts";
import { allocatedBytes, gpuTest, openGpu } from "./helpers.ts";

const gpu = await openGpu();

const config = parseModelConfig({
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

Deno.test("checkpointed gradients equal plain ones bit for bit", gpuTest, async () => {
  const weights = initWeights(config, 4);
  const rng = new Rng(8);
  for (const w of weights.values()) for (let i = 0; i < w.length; i++) w[i] += 0.1 * rng.normal();
  const B = 3, L = 45; // 135 tokens in 64-token logit chunks
  const ids = Int32Array.from({ length: B * L }, () => rng.int(config.vocabSize));
  const upstream = Float32Array.from({ length: B * L }, (_, t) => t % L < L - 1 ? rng.normal() : 0);

  const run = async (gradientCheckpointing: boolean) => {
    const model = new GpuModel(gpu, config, weights, {
      logitChunkFloats: 64 * config.vocabSize,
      gradientCheckpointing,
    });
    const logp = await gpu.read(model.forward(ids, B, L));
    model.backward(upstream);
    model.forward(ids, B, L);
    model.backward(upstream);
    const grads = await model.readGrads();
    model.adamwStep({
      lr: 1e-2,
      beta1: 0.9,
      beta2: 0.999,
      eps: 1e-8,
      weightDecay: 0.01,
      step: 1,
      maxGradNorm: 1,
    });
    const after = await model.readWeights();
    model.destroy();
    return { logp, grads, after };
  };
  const plain = await run(false), checkpointed = await run(true);
  assert.deepEqual(checkpointed.logp, plain.logp);
  assert.equal(checkpointed.grads.size, weights.size);
  for (const [name, g] of plain.grads) {
    assert.ok(g.some((x) => x !== 0), `${name}: a gradient that carries signal`);
    assert.deepEqual(checkpointed.grads.get(name), g, name);
  }
  for (const [name, w] of plain.after) assert.deepEqual(checkpointed.after.get(name), w, name);
});

Deno.test(
  "the plan counts what checkpointing saves, as the engine allocates it",
  gpuTest,
  async () => {
    // One micro-batch of 2 rows × 9 tokens (prompt 6 + completion 3): what a training step's
    // forward and backward allocate, with and without checkpointing. Everything else (weights,
    // gradients, temporaries) is the same in both, so the difference is the layer buffers saved.
    const cfg: TrainConfig = {
      ...defaultTrainConfig(),
      prompts_per_step: 1,
      num_generations: 2,
      max_prompt_length: 6,
      max_completion_length: 3,
      micro_batch_size: 2,
    };
    const B = 2, L = 9, weights = initWeights(config, 1);
    const engine = (gradientCheckpointing: boolean) =>
      allocatedBytes(gpu, async () => {
        const model = new GpuModel(gpu, config, weights, { gradientCheckpointing });
        await gpu.read(model.forward(new Int32Array(B * L).fill(3), B, L));
        model.backward(new Float32Array(B * L).fill(0.1));
        await gpu.sync();
        model.destroy();
      });
    const planned = (gradient_checkpointing: boolean) =>
      planMemory({ ...cfg, gradient_checkpointing }, config).items
        .find((i) => i.what === "training activations")!.bytes;
    const saved = (await engine(false)) - (await engine(true));
    assert.ok(saved > 0);
    assert.equal(saved, planned(false) - planned(true));
  },
);
