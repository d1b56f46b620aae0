// The two independent engines of the same model agree: aha's WebGPU kernels and an ONNX export
// run by onnxruntime-web (WASM), on fresh checkpoints neither has seen, at temperature 1 and at
// the sampling temperature 0.7 (logits · 1/0.7 before the log-softmax).

import assert from "node:assert/strict";
import { initWeights } from "../core/init.ts";
import { parseModelConfig, PRESETS } from "../core/model_config.ts";
import { Rng } from "../core/rng.ts";

import { GpuModel } from "../gpu/model.ts";
import { scoreSequences } from "../gpu/score.ts";
import { OnnxEngine } from "../reference/onnx_engine.ts";
import { gpuTest, openGpu } from "./helpers.ts";

const gpu = await openGpu();

const CASES = {
  "tiny preset (tied, 4 query heads over 2 kv heads)": PRESETS.tiny,
  "untied embeddings, 3 layers, 6 over 3 heads, odd vocab": {
    ...PRESETS.tiny,
    vocab_size: 61,
    hidden_size: 48,
    intermediate_size: 100,
    num_hidden_layers: 3,
    num_attention_heads: 6,
    num_key_value_heads: 3,
    rope_theta: 1e6,
    tie_word_embeddings: false,
  },
};

for (const [name, hf] of Object.entries(CASES)) {
  Deno.test(`webgpu and onnx engines agree to 1e-4: ${name}`, gpuTest, async () => {
    const config = parseModelConfig(hf);
    const weights = initWeights(config, 5);
    // Wider than init scale so the log-probs are far from uniform.
    const rng = new Rng(6);
    for (const [w, data] of weights) {
      if (!w.endsWith("norm.weight")) {
        for (let i = 0; i < data.length; i++) data[i] = 0.1 * rng.normal();
      }
    }
    const sequences = [17, 2, 40, 9].map((n) =>
      Array.from({ length: n }, () => rng.int(config.vocabSize))
    );
    const model = new GpuModel(gpu, config, weights);
    const onnx = await OnnxEngine.create({ config, weights }, { threads: 1 });
    const assertAgree = (webgpu: number[][], other: number[][], what: string) => {
      assert.deepEqual(webgpu.map((r) => r.length), other.map((r) => r.length), what);
      const worst = Math.max(
        ...webgpu.flatMap((row, i) => row.map((x, t) => Math.abs(x - other[i][t]))),
      );
      assert.ok(worst <= 1e-4, `${what}: max difference ${worst}`);
    };
    for (const invTemperature of [1, 1 / 0.7]) {
      const webgpu = await scoreSequences(model, sequences, invTemperature);
      const other = await onnx.logprobs(sequences, invTemperature);
      assertAgree(webgpu, other, `inv_temperature ${invTemperature}`);
      // Batches of at most 40 tokens: [17, 2] padded to 17, [40], [9], and from each row's
      // `from` on; one GPU wait for the three.
      const from = [5, 0, 30, 8], waits = gpu.waitCount;
      const batched = await scoreSequences(model, sequences, invTemperature, true, from, 40);
      assert.equal(gpu.waitCount - waits, 1, "one wait for three batches");
      const tails = other.map((row, i) => row.slice(from[i]));
      assertAgree(batched, tails, `batches of 40 tokens, inv_temperature ${invTemperature}`);
    }
    model.destroy();
    await onnx.release();
  });
}
