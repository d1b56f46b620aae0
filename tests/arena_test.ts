// Arenas (gpu/arena.ts): the packing's invariants on random shapes, and a model whose trained
// tensors span several arenas taking AdamW steps that match a float64 twin built from its own
// gradients, in a few dispatches however many tensors it has.

import assert from "node:assert/strict";
import { initWeights } from "../core/init.ts";
import { parseModelConfig } from "../core/model_config.ts";
import { Rng } from "../core/rng.ts";
import { packArenas } from "../gpu/arena.ts";
import { GpuModel } from "../gpu/model.ts";
import { assertClose, gpuTest, openGpu } from "./helpers.ts";

const gpu = await openGpu();

Deno.test("packArenas: aligned, disjoint, within the cap unless alone, every tensor placed", () => {
  const rng = new Rng(5);
  for (const maxBytes of [256, 1000, 4096, 65536]) {
    const cap = Math.floor(maxBytes / 256) * 64; // elements
    const shapes = Array.from(
      { length: 200 },
      () => rng.next() < 0.1 ? [1 + rng.int(3 * cap)] : [1 + rng.int(40), 1 + rng.int(40)],
    );
    const layout = packArenas(shapes, maxBytes);
    assert.equal(layout.places.length, shapes.length);
    const spans = layout.sizes.map(() => [] as [number, number][]);
    shapes.forEach((shape, i) => {
      const { arena, start } = layout.places[i], size = shape.reduce((a, b) => a * b, 1);
      assert.equal(start % 64, 0, `tensor ${i} starts on a binding boundary`);
      assert.ok(start + size <= layout.sizes[arena], `tensor ${i} inside its arena`);
      spans[arena].push([start, start + size]);
    });
    spans.forEach((s, arena) => {
      s.sort((a, b) => a[0] - b[0]);
      for (let j = 1; j < s.length; j++) assert.ok(s[j][0] >= s[j - 1][1], `arena ${arena}`);
      assert.ok(layout.sizes[arena] <= cap || s.length === 1, `arena ${arena} over the cap`);
    });
  }
});

Deno.test(
  "a model over several arenas: AdamW steps equal the float64 twin of its gradients",
  gpuTest,
  async () => {
    // 2 KiB bindings: arenas of 512 floats, so the 2-layer model's 27 tensors (the embedding
    // and gate/up in row slices) take many arenas, some tensors sharing one.
    const config = parseModelConfig({
      vocab_size: 41,
      hidden_size: 16,
      intermediate_size: 24,
      num_hidden_layers: 2,
      num_attention_heads: 2,
      num_key_value_heads: 1,
      tie_word_embeddings: false,
    });
    const weights = initWeights(config, 3);
    const model = new GpuModel(gpu, config, weights, { maxBindingBytes: 2048 });
    const rng = new Rng(4), B = 2, L = 7;
    model.forward(Int32Array.from({ length: B * L }, () => rng.int(41)), B, L);
    model.backward(
      Float32Array.from({ length: B * L }, (_, t) => t % L < L - 1 ? rng.normal() : 0),
    );
    const grads = await model.readGrads();
    // The twin: torch.optim.AdamW after clip_grad_norm_ over every gradient, in float64.
    const norm = Math.sqrt(
      [...grads.values()].reduce((s, g) => s + g.reduce((a, x) => a + x * x, 0), 0),
    );
    const hp = { lr: 1e-2, beta1: 0.9, beta2: 0.99, eps: 1e-8, weightDecay: 0.1, maxGradNorm: 0.5 };
    assert.ok(norm > 2 * hp.maxGradNorm, `the gradients are clipped (norm ${norm})`);
    const clip = Math.min(1, hp.maxGradNorm / (norm + 1e-6));
    const want = new Map([...weights].map(([n, w]) => [n, {
      p: Float64Array.from(w),
      m: new Float64Array(w.length),
      v: new Float64Array(w.length),
    }]));
    const dispatches: number[] = [];
    for (let step = 1; step <= 2; step++) {
      const before = gpu.dispatchCount;
      model.adamwStep({ ...hp, step }); // gradients stay as they are: the same both steps
      dispatches.push(gpu.dispatchCount - before);
      const bc1 = 1 - hp.beta1 ** step, bc2 = 1 - hp.beta2 ** step;
      for (const [name, s] of want) {
        grads.get(name)!.forEach((g, i) => {
          const gi = g * clip;
          s.p[i] *= 1 - hp.lr * hp.weightDecay;
          s.m[i] = hp.beta1 * s.m[i] + (1 - hp.beta1) * gi;
          s.v[i] = hp.beta2 * s.v[i] + (1 - hp.beta2) * gi * gi;
          s.p[i] -= (hp.lr / bc1) * s.m[i] / (Math.sqrt(s.v[i]) / Math.sqrt(bc2) + hp.eps);
        });
      }
    }
    const got = await model.readWeights(), moments = await model.readOptimizerState();
    for (const [name, s] of want) {
      // f32: weights within 1e-6 of their ~1e-2 moves, moments within 1e-6 of their scale.
      assertClose(got.get(name)!, Float32Array.from(s.p), 1e-6, 0, `${name} weight`);
      const scale = (a: Float64Array) => Math.max(1e-30, ...a.map(Math.abs));
      assertClose(
        moments.get(`${name}.exp_avg`)!,
        Float32Array.from(s.m),
        1e-6 * scale(s.m),
        0,
        `${name} m`,
      );
      assertClose(
        moments.get(`${name}.exp_avg_sq`)!,
        Float32Array.from(s.v),
        1e-6 * scale(s.v),
        0,
        `${name} v`,
      );
    }
    // Per step: the norm's block sums and an update per arena, and the norm's final sum.
    const tensors = [...model.trained.values()].flat().length;
    assert.ok(dispatches[0] < tensors, `${dispatches[0]} dispatches for ${tensors} tensors`);
    assert.equal(dispatches[0] % 2, 1);
    assert.deepEqual(dispatches, [dispatches[0], dispatches[0]]);
    model.destroy();
  },
);
