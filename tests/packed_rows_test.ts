// Packed rows (GpuModel.forwardPacked): a batch's rows laid end to end in one row, each seeing
// only itself, so that rows of unequal lengths (a supervised batch's) cost their own tokens, not
// the longest row's. It is the same function as the plain forward over the rows joined, so its
// log-probs, and the gradients of a backward from them, must match the joined layout's (within
// float rounding: the weight gradients sum over the tokens in chunks that fall elsewhere;
// log-probs within 1e-5 + 1e-4 relative, gradients within 1e-4 of their largest element + 1e-4
// relative) on odd shapes: GQA, untied, rows of 5 to 19 tokens, padding after the last row,
// with and without checkpointing, with LoRA. Against PyTorch running each row on its own
// (tests/fixtures/make_packed_golden.py): supervised fine-tuning's log-probs, loss and gradients.
// Then which batches the policy packs.

import assert from "node:assert/strict";
import { loadCheckpoint } from "../core/checkpoint.ts";
import { initWeights } from "../core/init.ts";
import { parseModelConfig } from "../core/model_config.ts";
import { type GrpoLossConfig, lossNormalizer } from "../core/grpo.ts";
import { Rng } from "../core/rng.ts";
import { initLora } from "../core/lora.ts";
import type { LoraConfig } from "../core/train_config.ts";
import { GpuModel, type GpuModelOptions } from "../gpu/model.ts";
import { GpuPolicy } from "../gpu/policy.ts";
import { assertClose, gpuTest, openGpu } from "./helpers.ts";

const gpu = await openGpu();
const ROOT = new URL("../", import.meta.url).pathname;

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

const gradientAtol = (g: Float32Array) => 1e-4 * g.reduce((m, x) => Math.max(m, Math.abs(x)), 0);

/** Rows of the given prompt and completion lengths, random tokens. */
function batchOf(rng: Rng, shapes: [number, number][]) {
  const rows = shapes.map(([p, c]) => Array.from({ length: p + c }, () => rng.int(37)));
  return { rows, promptLens: shapes.map(([p]) => p) };
}

/**
 * The log-probs of the completions and every gradient of a backward from `upstream` (one value
 * per completion token), through the joined layout or the packed one (in `L` positions).
 */
async function logprobsAndGrads(
  model: GpuModel,
  rows: number[][],
  promptLens: number[],
  upstream: number[][],
  packedL: number | null,
) {
  const B = rows.length;
  let logp: Float32Array, at: (b: number, t: number) => number, size: number;
  if (packedL !== null) {
    const starts = rows.map((_, b) => rows.slice(0, b).reduce((n, r) => n + r.length, 0));
    logp = await gpu.read(model.forwardPacked(rows, packedL));
    at = (b, t) => starts[b] + promptLens[b] - 1 + t;
    size = packedL;
  } else {
    const L = Math.max(...rows.map((r) => r.length)), ids = new Int32Array(B * L);
    rows.forEach((r, b) => ids.set(r, b * L));
    logp = await gpu.read(model.forward(ids, B, L));
    at = (b, t) => b * L + promptLens[b] - 1 + t;
    size = B * L;
  }
  assert.equal(logp.length, size);
  const dLogp = new Float32Array(size);
  upstream.forEach((u, b) => u.forEach((d, t) => dLogp[at(b, t)] = d));
  model.backward(dLogp);
  return {
    logp: Float32Array.from(upstream.flatMap((u, b) => u.map((_, t) => logp[at(b, t)]))),
    grads: await model.readGrads(),
  };
}

Deno.test("packed forward and backward match the joined path", gpuTest, async () => {
  const weights = initWeights(config, 4);
  const rng = new Rng(8);
  for (const w of weights.values()) for (let i = 0; i < w.length; i++) w[i] += 0.1 * rng.normal();
  // 68 tokens in rows of 5 to 19: a one-token prompt, a one-token completion.
  const mixed = batchOf(rng, [[9, 5], [1, 6], [13, 4], [4, 1], [2, 17], [3, 3]]);
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
  const cases: [string, number, GpuModelOptions][] = [
    ["no padding", 68, {}],
    ["padding after the rows", 75, {}],
    ["checkpointed", 72, { gradientCheckpointing: true }],
    ["LoRA", 72, { lora: { lora, tensors: adapterTensors } }],
  ];
  const { rows, promptLens } = mixed;
  for (const [name, packedL, options] of cases) {
    const upstream = rows.map((r, b) =>
      Array.from({ length: r.length - promptLens[b] }, () => rng.normal())
    );
    const model = new GpuModel(gpu, config, weights, {
      ...options,
      logitChunkFloats: 16 * config.vocabSize,
    });
    const want = await logprobsAndGrads(model, rows, promptLens, upstream, null);
    model.zeroGrads();
    const got = await logprobsAndGrads(model, rows, promptLens, upstream, packedL);
    model.destroy();
    assertClose(got.logp, want.logp, 1e-5, 1e-4, `${name}: logp`);
    assert.ok(want.grads.size > 0);
    for (const [tensor, g] of want.grads) {
      assert.ok(g.some((x) => x !== 0), `${name} ${tensor}: a gradient that carries signal`);
      assertClose(got.grads.get(tensor)!, g, gradientAtol(g), 1e-4, `${name} ${tensor}`);
    }
  }
});

Deno.test("packed rows match PyTorch running each row on its own", gpuTest, async () => {
  const golden = JSON.parse(Deno.readTextFileSync(`${ROOT}tests/fixtures/packed/expected.json`));
  const checkpoint = await loadCheckpoint(ROOT + golden.model);
  const policy = new GpuPolicy(new GpuModel(gpu, checkpoint.config, checkpoint.weights));
  const batch = { rows: golden.rows as number[][], promptLens: golden.prompt_lens as number[] };
  const logp = await policy.completionLogprobs(batch, 1);
  const flat = (rows: number[][]) => Float64Array.from(rows.flat());
  assertClose(Float32Array.from(logp.flat()), flat(golden.logprobs), 1e-5, 1e-4, "log-probs");
  // Supervised fine-tuning's gradient: the GRPO loss with A = 1 and no KL over every completion
  // token, normalized by their number (bnpo), as runSft computes it.
  const masks = batch.rows.map((r, b) => Array(r.length - batch.promptLens[b]).fill(1));
  const loss: GrpoLossConfig = {
    beta: 0,
    epsilon: 0.2,
    epsilonHigh: 0.2,
    lossType: "bnpo",
    maxCompletionLength: 7,
  };
  const { sums } = await policy.accumulateGrpoGradients(batch, 1, {
    rows: masks.map((mask) => ({ oldLogp: null, mask, advantage: 1 })),
    refLogp: () => Promise.resolve(null),
    config: loss,
    normalizer: lossNormalizer(loss, masks),
  });
  const positions = (await gpu.read(policy.model.lossGradient())).length;
  await policy.readLossSums();
  const got = await sums;
  const grads = await policy.model.readGrads();
  policy.model.destroy();
  assert.equal(positions, 48, "45 tokens packed into 48 positions, not joined into 6 × 11");
  const sft = -got.logpSum / got.tokens;
  assert.ok(Math.abs(sft - golden.loss) < 1e-5, `loss ${sft} vs ${golden.loss}`);
  let norm = 0;
  for (const g of grads.values()) for (const x of g) norm += x * x;
  norm = Math.sqrt(norm);
  assert.ok(Math.abs(norm - golden.grad_norm) < 1e-4 * golden.grad_norm, `norm ${norm}`);
  assert.deepEqual([...grads.keys()].sort(), Object.keys(golden.grads).sort());
  for (const [name, values] of Object.entries(golden.grads) as [string, number[]][]) {
    values.forEach((v, i) => {
      const g = grads.get(name)![i];
      assert.ok(Math.abs(g - v) < 1e-5 + 1e-3 * Math.abs(v), `${name}[${i}]: ${g} vs ${v}`);
    });
  }
});

Deno.test("forwardPacked refuses rows longer than its positions", gpuTest, () => {
  const model = new GpuModel(gpu, config, initWeights(config, 1));
  assert.throws(() => model.forwardPacked([[1, 2, 3], [4, 5]], 4), /need 5 positions, L is 4/);
  model.destroy();
});

// The policy packs a batch when that costs fewer multiply-adds than joining it: its rows' tokens
// rounded up to an eighth of their power of two, against B × the longest row — where joined
// rows run the vocabulary projection from the shortest prompt's last token on only.
Deno.test("the policy packs rows of unequal lengths, not rows of one length", gpuTest, async () => {
  const rng = new Rng(3);
  const positions = async (batch: { rows: number[][]; promptLens: number[] }, vocab = 37) => {
    const c = { ...config, vocabSize: vocab };
    const policy = new GpuPolicy(new GpuModel(gpu, c, initWeights(c, 1)));
    const masks = batch.rows.map((r, b) => Array(r.length - batch.promptLens[b]).fill(1));
    const loss: GrpoLossConfig = {
      beta: 0,
      epsilon: 0.2,
      epsilonHigh: 0.2,
      lossType: "bnpo",
      maxCompletionLength: 20,
    };
    await policy.accumulateGrpoGradients(batch, 1, {
      rows: masks.map((mask) => ({ oldLogp: null, mask, advantage: 1 })),
      refLogp: () => Promise.resolve(null),
      config: loss,
      normalizer: lossNormalizer(loss, masks),
    });
    const T = (await gpu.read(policy.model.lossGradient())).length;
    policy.model.destroy();
    return T;
  };
  // 3 + 10 + 4 + 12 = 29 tokens → 30 positions (a multiple of 2), against 4 × 12 joined.
  assert.equal(await positions(batchOf(rng, [[1, 2], [4, 6], [2, 2], [5, 7]])), 30);
  // 3 rows of 11: packing takes 33 → 36 positions (a multiple of 4), joining 33.
  assert.equal(await positions(batchOf(rng, [[3, 8], [4, 7], [10, 1]])), 33);
  // Long prompts, short completions: 52 positions packed against 64 joined, but with 4,000
  // words the projection dominates, and joined rows run it on 4 × 7 positions, not 52.
  const longPrompts = batchOf(rng, [[10, 1], [10, 2], [10, 3], [10, 6]]);
  assert.equal(await positions(longPrompts), 52);
  assert.equal(await positions(longPrompts, 4000), 64);
});
