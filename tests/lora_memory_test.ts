// LoRA together with the memory features: an adapter over a base frozen in bf16, trained with
// gradient checkpointing, computes exactly what the same adapter computes over the f32 base
// rounded to bf16 without checkpointing — log-probs, base log-probs and every LoRA gradient.

import assert from "node:assert/strict";
import { initWeights } from "../core/init.ts";
import { parseModelConfig, weightShapes } from "../core/model_config.ts";
import { Rng } from "../core/rng.ts";
import { initLora } from "../core/lora.ts";
import { defaultLoraConfig } from "../core/train_config.ts";
import { frozenWeightDtypes, roundThrough } from "../core/half.ts";
import { GpuModel } from "../gpu/model.ts";
import { gpuTest, openGpu } from "./helpers.ts";

const gpu = await openGpu();
const config = parseModelConfig({
  vocab_size: 37,
  hidden_size: 48,
  intermediate_size: 70,
  num_hidden_layers: 3,
  num_attention_heads: 6,
  num_key_value_heads: 2,
  tie_word_embeddings: false,
});

Deno.test(
  "LoRA over a bf16 base with checkpointing = LoRA over the rounded f32 base",
  gpuTest,
  async () => {
    const weights = initWeights(config, 4), rng = new Rng(8);
    for (const w of weights.values()) for (let i = 0; i < w.length; i++) w[i] += 0.1 * rng.normal();
    const lora = { ...defaultLoraConfig(), r: 3, alpha: 7 };
    const tensors = initLora(config, lora, new Rng(2));
    for (const [n, t] of tensors) {
      if (n.includes("lora_B")) {
        for (let i = 0; i < t.length; i++) {
          t[i] = 0.3 * rng.normal();
        }
      }
    }
    const weightDtypes = frozenWeightDtypes("bf16", weightShapes(config), new Map(), false);
    const rounded = new Map(
      [...weights].map(([n, w]) => [n, weightDtypes.has(n) ? roundThrough(w, "bf16") : w]),
    );
    const B = 2, L = 45;
    const ids = Int32Array.from({ length: B * L }, () => rng.int(37));
    const up = Float32Array.from({ length: B * L }, (_, t) => t % L < L - 1 ? rng.normal() : 0);
    const run = async (m: GpuModel) => {
      const logp = await gpu.read(m.forward(ids, B, L));
      const base = await gpu.read(m.forward(ids, B, L, 1, false, false));
      m.backward(up);
      const grads = await m.readGrads();
      m.destroy();
      return { logp, base, grads };
    };
    const a = await run(new GpuModel(gpu, config, rounded, { lora: { lora, tensors } }));
    const b = await run(
      new GpuModel(gpu, config, weights, {
        lora: { lora, tensors },
        weightDtypes,
        gradientCheckpointing: true,
      }),
    );
    assert.deepEqual(b.logp, a.logp);
    assert.deepEqual(b.base, a.base);
    assert.ok(a.grads.size > 0);
    for (const [n, g] of a.grads) assert.deepEqual(b.grads.get(n), g, n);
  },
);
