// Shared prompts (GpuModel.forwardShared): a GRPO batch's groups of rows with one prompt, each
// prompt computed once; and packed rows (GpuModel.forwardPacked): the rows end to end in one row,
// each seeing only itself. Both are the same function as the plain forward over the joined rows,
// so their log-probs, and the gradients of a backward from them, must match the plain path's
// (within float rounding: the prefix's key and value gradients are summed over a group's rows in
// another order, the weight gradients over the tokens in other chunks; log-probs within 1e-5 +
// 1e-4 relative, gradients within 1e-4 of their largest element + 1e-4 relative) on odd shapes:
// GQA, untied, prompts of different lengths, groups of unequal size, a prompt of one token (an
// empty prefix), a batch with no prefixes at all, packed rows with and without padding after
// them, with and without checkpointing, and with LoRA. Then a whole GRPO step both ways, and when
// a batch shares (tests/packed_rows_test.ts has the rest of packing).

import assert from "node:assert/strict";
import { initWeights } from "../core/init.ts";
import { parseModelConfig } from "../core/model_config.ts";
import { Rng } from "../core/rng.ts";
import { completionMask, type GrpoLossConfig, lossNormalizer } from "../core/grpo.ts";
import { initLora } from "../core/lora.ts";
import type { LoraConfig } from "../core/train_config.ts";
import {
  GpuModel,
  type GpuModelOptions,
  sharedTokens,
  sharePrompts,
  tailPositions,
  worthSharing,
} from "../gpu/model.ts";
import { GpuPolicy, GpuReference } from "../gpu/policy.ts";
import { scoreSequences } from "../gpu/score.ts";
import { assertClose, gpuTest, openGpu } from "./helpers.ts";

const gpu = await openGpu();

const config = parseModelConfig({
  vocab_size: 37,
  hidden_size: 48,
  intermediate_size: 70,
  num_hidden_layers: 2,
  num_attention_heads: 6,
  num_key_value_heads: 2,
  rope_theta: 5000,
  rms_norm_eps: 1e-5,
  tie_word_embeddings: false,
});

/**
 * A gradient's absolute tolerance: 1e-4 of its largest element (its sums over tokens run in
 * another order and cancel; the hardware path's tiled matmul rounds differently again).
 */
const gradientAtol = (g: Float32Array) => 1e-4 * g.reduce((m, x) => Math.max(m, Math.abs(x)), 0);

/** Groups of rows: each a prompt and its completions (lengths vary). */
function batchOf(rng: Rng, groups: { prompt: number; completions: number[] }[]) {
  const rows: number[][] = [], promptLens: number[] = [];
  for (const { prompt, completions } of groups) {
    const p = Array.from({ length: prompt }, () => rng.int(config.vocabSize));
    for (const n of completions) {
      rows.push([...p, ...Array.from({ length: n }, () => rng.int(config.vocabSize))]);
      promptLens.push(prompt);
    }
  }
  return { rows, promptLens };
}

/**
 * The log-probs of `rows`' completions and every gradient of a backward from `upstream` (one
 * value per completion token), through the joined layout, the shared one, or the packed one (in
 * `packed` positions).
 */
async function logprobsAndGrads(
  model: GpuModel,
  rows: number[][],
  promptLens: number[],
  upstream: number[][],
  layout: "joined" | "shared" | { packed: number },
) {
  const B = rows.length;
  let logp: Float32Array, at: (b: number, t: number) => number, size: number;
  if (typeof layout === "object") {
    const starts = rows.map((_, b) => rows.slice(0, b).reduce((n, r) => n + r.length - 1, 0));
    logp = await gpu.read(model.forwardPacked(rows, layout.packed));
    assert.equal(logp.length, layout.packed);
    at = (b, t) => starts[b] + promptLens[b] - 1 + t;
    size = layout.packed;
  } else if (layout === "shared") {
    const shared = sharePrompts(rows, promptLens);
    const C = Math.max(1, ...shared.tails.map((t) => t.length - 1)); // each but its last token
    logp = await gpu.read(model.forwardShared(shared));
    at = (b, t) => b * C + t;
    size = B * C;
  } else {
    const L = Math.max(...rows.map((r) => r.length)), ids = new Int32Array(B * L);
    rows.forEach((r, b) => ids.set(r, b * L));
    logp = await gpu.read(model.forward(ids, B, L));
    at = (b, t) => b * L + promptLens[b] - 1 + t;
    size = B * L;
  }
  const dLogp = new Float32Array(size);
  upstream.forEach((u, b) => u.forEach((d, t) => dLogp[at(b, t)] = d));
  model.backward(dLogp);
  return {
    logp: Float32Array.from(upstream.flatMap((u, b) => u.map((_, t) => logp[at(b, t)]))),
    grads: await model.readGrads(),
  };
}

Deno.test("shared-prompt and packed layouts match the plain path", gpuTest, async () => {
  const weights = initWeights(config, 4);
  const rng = new Rng(8);
  for (const w of weights.values()) for (let i = 0; i < w.length; i++) w[i] += 0.1 * rng.normal();
  const mixed = batchOf(rng, [
    { prompt: 9, completions: [5, 7, 2] },
    { prompt: 1, completions: [6, 3] },
    { prompt: 13, completions: [4, 7, 7, 1] },
    { prompt: 4, completions: [3] },
  ]);
  assert.equal(sharePrompts(mixed.rows, mixed.promptLens).prefixes.length, 4);
  // Every prompt one token long: no prefixes at all.
  const bare = batchOf(rng, [{ prompt: 1, completions: [5, 3] }, {
    prompt: 1,
    completions: [4],
  }]);
  assert.equal(
    Math.max(...sharePrompts(bare.rows, bare.promptLens).prefixes.map((p) => p.length)),
    0,
  );
  const lora = {
    r: 3,
    alpha: 5,
    target_modules: ["q_proj", "v_proj", "down_proj"],
    use_rslora: false,
    dropout: 0,
  } as LoraConfig;
  const adapterTensors = initLora(config, lora, new Rng(2));
  for (const t of adapterTensors.values()) {
    for (let i = 0; i < t.length; i++) t[i] += 0.05 * rng.normal();
  }
  // Each case's packed positions past its rows' tokens (padding after the last row).
  const cases: [string, typeof mixed, GpuModelOptions, number][] = [
    ["plain", mixed, {}, 0],
    ["checkpointed", mixed, { gradientCheckpointing: true }, 5],
    ["LoRA", mixed, { lora: { lora, tensors: adapterTensors } }, 3],
    ["one-token prompts", bare, {}, 2],
  ];
  for (const [name, { rows, promptLens }, options, padding] of cases) {
    const upstream = rows.map((r, b) =>
      Array.from({ length: r.length - promptLens[b] }, () => rng.normal())
    );
    const model = new GpuModel(gpu, config, weights, {
      ...options,
      logitChunkFloats: 16 * config.vocabSize,
    });
    const want = await logprobsAndGrads(model, rows, promptLens, upstream, "joined");
    const positions = rows.reduce((n, r) => n + r.length - 1, 0); // each row but its last token
    for (const layout of ["shared", { packed: positions + padding }] as const) {
      model.zeroGrads();
      const got = await logprobsAndGrads(model, rows, promptLens, upstream, layout);
      const what = `${name}, ${layout === "shared" ? "shared" : "packed"}`;
      assertClose(got.logp, want.logp, 1e-5, 1e-4, `${what}: logp`);
      assert.ok(want.grads.size > 0);
      for (const [tensor, g] of want.grads) {
        assert.ok(g.some((x) => x !== 0), `${what} ${tensor}: a gradient that carries signal`);
        assertClose(got.grads.get(tensor)!, g, gradientAtol(g), 1e-4, `${what} ${tensor}`);
      }
    }
    model.destroy();
  }
});

Deno.test(
  "a GRPO step with shared prompts: policy loss, gradients and the reference's log-probs match",
  gpuTest,
  async () => {
    const rng = new Rng(21);
    // 3 prompts × 3 samples (one group of 2), completions of different lengths.
    const { rows, promptLens } = batchOf(rng, [
      { prompt: 11, completions: [4, 6, 1] },
      { prompt: 7, completions: [5, 5] },
      { prompt: 15, completions: [2, 6, 3] },
    ]);
    const batch = { rows, promptLens };
    assert.ok(worthSharing(rows, promptLens), "the batch takes the shared layout");
    const completions = rows.map((r, b) => r.slice(promptLens[b]));
    const masks = completionMask(completions, [5]);
    const cfg: GrpoLossConfig = {
      beta: 0.05,
      epsilon: 0.2,
      epsilonHigh: 0.28,
      lossType: "grpo",
      maxCompletionLength: 6,
    };
    const normalizer = lossNormalizer(cfg, masks);
    const weights = initWeights(config, 6);
    const reference = new GpuReference(new GpuModel(gpu, config, initWeights(config, 9)));
    // The reference's log-probs scored whole (no `from`: the joined layout) and as a GRPO batch.
    const whole = await scoreSequences(reference.model, rows);
    const wantRef = whole.map((r, b) => r.slice(promptLens[b] - 1));
    const gotRef = await reference.completionLogprobs(batch, 1);
    assertClose(
      Float32Array.from(gotRef.flat()),
      Float32Array.from(wantRef.flat()),
      1e-5,
      1e-4,
      "reference",
    );

    const step = async (share: boolean) => {
      const policy = new GpuPolicy(new GpuModel(gpu, config, weights), share, false);
      const logp = await policy.completionLogprobs(batch, 1 / 0.9);
      const lossRows = masks.map((mask, b) => ({
        oldLogp: logp[b].map((l, t) => l + 0.3 * Math.sin(t + b)),
        mask,
        advantage: [1.1, -0.4, 0.2, -1.3, 0.9, 0.5, -0.8, 0.1][b],
      }));
      const { sums } = await policy.accumulateGrpoGradients(batch, 1 / 0.9, {
        rows: lossRows,
        refLogp: () => reference.heldLogprobs(batch, 1 / 0.9),
        config: cfg,
        normalizer,
      });
      await policy.readLossSums();
      const result = { logp, sums: await sums, grads: await policy.model.readGrads() };
      policy.model.destroy();
      return result;
    };
    const plain = await step(false), shared = await step(true);
    reference.model.destroy();
    assertClose(
      Float32Array.from(shared.logp.flat()),
      Float32Array.from(plain.logp.flat()),
      1e-5,
      1e-4,
      "policy log-probs",
    );
    for (const key of ["loss", "klSum", "logpSum"] as const) {
      assertClose([shared.sums[key]], [plain.sums[key]], 1e-6, 1e-4, key);
    }
    assert.ok(plain.sums.clippedTokens > 0, "the case exercises the clip");
    assert.equal(shared.sums.clippedTokens, plain.sums.clippedTokens);
    assert.equal(shared.sums.tokens, plain.sums.tokens);
    for (const [name, g] of plain.grads) {
      assert.ok(g.some((x) => x !== 0), `${name}: a gradient that carries signal`);
      assertClose(shared.grads.get(name)!, g, gradientAtol(g), 1e-4, name);
    }
  },
);

Deno.test("a batch shares its prompts only where that saves a tenth of the tokens", () => {
  const row = (prompt: number[], completion: number) => [...prompt, ...Array(completion).fill(9)];
  const p7 = [1, 2, 3, 4, 5, 6, 7], q7 = [1, 2, 3, 4, 5, 6, 8];
  // 16 prompts × 8 samples of 6 tokens (the default step): 864 positions instead of 1,664 (a
  // tail of 7 tokens takes 6: its last is no input).
  const prompts = Array.from({ length: 16 }, (_, g) => [g, 2, 3, 4, 5, 6, 7]);
  const rows = Array.from({ length: 128 }, (_, b) => row(prompts[b >> 3], 6));
  const shared = worthSharing(rows, rows.map(() => 7));
  assert.ok(shared);
  assert.deepEqual(shared.prefixes, prompts.map((p) => p.slice(0, 6)));
  assert.deepEqual(shared.groupOf.slice(6, 10), [0, 0, 1, 1]);
  assert.deepEqual(shared.tails[0], [7, 9, 9, 9, 9, 9, 9]);
  assert.equal(tailPositions(shared.tails), 6);
  assert.equal(sharedTokens(128, 6, 16, 6), 864);
  // Distinct prompts; two rows whose padding to 64 tokens outweighs a short prompt; an empty
  // prompt: joined.
  assert.equal(worthSharing([row(p7, 3), row(q7, 3)], [7, 7]), null);
  assert.equal(worthSharing([row(p7, 3), row(p7, 4)], [7, 7]), null);
  assert.equal(worthSharing([row([], 5), row([], 5)], [0, 0]), null);
  // Two rows of a 200-token prompt do share.
  const long = Array.from({ length: 200 }, (_, i) => i % 30);
  assert.ok(worthSharing([row(long, 30), row(long, 20)], [200, 200]));
});
