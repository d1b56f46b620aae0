// Packed rows (GpuModel.forwardPacked): a batch's rows laid end to end in one row, each seeing
// only itself, so that rows of unequal lengths (a supervised batch's) cost their own tokens, not
// the longest row's. Against PyTorch running each row on its own
// (tests/fixtures/make_packed_golden.py): supervised fine-tuning's log-probs, loss, gradient norm
// and gradients, f32 against float64. Then which batches the policy packs. (That packed
// log-probs and gradients match the joined layout's on odd shapes, checkpointed and with LoRA,
// is in tests/shared_prompt_test.ts, beside the shared layout's.)

import assert from "node:assert/strict";
import { loadCheckpoint } from "../core/checkpoint.ts";
import { initWeights } from "../core/init.ts";
import { parseModelConfig } from "../core/model_config.ts";
import { type GrpoLossConfig, lossNormalizer } from "../core/grpo.ts";
import { Rng } from "../core/rng.ts";
import { GpuModel } from "../gpu/model.ts";
import { GpuPolicy } from "../gpu/policy.ts";
import { assertClose, gpuTest, openGpu } from "./helpers.ts";

const gpu = await openGpu();
const ROOT = new URL("../", import.meta.url).pathname;

const config = parseModelConfig({
  vocab_size: 37,
  hidden_size: 16,
  intermediate_size: 24,
  num_hidden_layers: 1,
  num_attention_heads: 2,
  num_key_value_heads: 1,
});

/** Rows of the given prompt and completion lengths, random tokens. */
function batchOf(rng: Rng, shapes: [number, number][]) {
  const rows = shapes.map(([p, c]) => Array.from({ length: p + c }, () => rng.int(37)));
  return { rows, promptLens: shapes.map(([p]) => p) };
}

/** Supervised fine-tuning's loss: the GRPO loss with A = 1 and no KL, over every token (bnpo). */
const SFT_LOSS: GrpoLossConfig = {
  beta: 0,
  epsilon: 0.2,
  epsilonHigh: 0.2,
  lossType: "bnpo",
  maxCompletionLength: 20,
};

/** Accumulate a batch's supervised gradients; the loss sums and the positions its layout took. */
async function sftGradients(policy: GpuPolicy, batch: { rows: number[][]; promptLens: number[] }) {
  const masks = batch.rows.map((r, b) => Array(r.length - batch.promptLens[b]).fill(1));
  const { sums } = await policy.accumulateGrpoGradients(batch, 1, {
    rows: masks.map((mask) => ({ oldLogp: null, mask, advantage: 1 })),
    refLogp: () => Promise.resolve(null),
    config: SFT_LOSS,
    normalizer: lossNormalizer(SFT_LOSS, masks),
  });
  const positions = (await policy.model.gpu.read(policy.model.lossGradient())).length;
  await policy.readLossSums();
  return { sums: await sums, positions };
}

Deno.test("packed rows match PyTorch running each row on its own", gpuTest, async () => {
  const golden = JSON.parse(Deno.readTextFileSync(`${ROOT}tests/fixtures/packed/expected.json`));
  const checkpoint = await loadCheckpoint(ROOT + golden.model);
  const policy = new GpuPolicy(new GpuModel(gpu, checkpoint.config, checkpoint.weights));
  const batch = { rows: golden.rows as number[][], promptLens: golden.prompt_lens as number[] };
  const logp = await policy.completionLogprobs(batch, 1);
  const flat = (rows: number[][]) => Float64Array.from(rows.flat());
  assertClose(Float32Array.from(logp.flat()), flat(golden.logprobs), 1e-5, 1e-4, "log-probs");
  const { sums: got, positions } = await sftGradients(policy, batch);
  const grads = await policy.model.readGrads();
  policy.model.destroy();
  // 45 tokens in 6 rows: 39 positions, each row's last token being no input, rounded up to 40.
  assert.equal(positions, 40, "packed into 40 positions, not joined into 6 × 11");
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
  // Each row takes its tokens but the last: 2 + 1 positions.
  model.forwardPacked([[1, 2, 3], [4, 5]], 3);
  assert.throws(() => model.forwardPacked([[1, 2, 3], [4, 5]], 2), /need 3 positions, L is 2/);
  model.destroy();
});

// The policy packs a batch when that costs fewer multiply-adds than joining it: its rows' tokens
// but each one's last, rounded up to an eighth of their power of two, against B × the longest
// row — where joined rows run the vocabulary projection from the shortest prompt's last token on
// only.
Deno.test("the policy packs a batch when that costs fewer multiply-adds", gpuTest, async () => {
  const rng = new Rng(3);
  const positions = async (batch: { rows: number[][]; promptLens: number[] }, vocab = 37) => {
    const c = { ...config, vocabSize: vocab };
    const policy = new GpuPolicy(new GpuModel(gpu, c, initWeights(c, 1)));
    const { positions } = await sftGradients(policy, batch);
    policy.model.destroy();
    return positions;
  };
  // 2 + 9 + 3 + 11 = 25 positions → 26 (a multiple of 2), against 4 × 12 joined.
  assert.equal(await positions(batchOf(rng, [[1, 2], [4, 6], [2, 2], [5, 7]])), 26);
  // 3 rows of 11: 30 positions packed, 33 joined (whose rows keep their last tokens).
  assert.equal(await positions(batchOf(rng, [[3, 8], [4, 7], [10, 1]])), 30);
  // Long prompts, short completions: 48 positions packed against 64 joined, but with 4,000
  // words the projection dominates, and joined rows run it on 4 × 7 positions, not 48.
  const longPrompts = batchOf(rng, [[10, 1], [10, 2], [10, 3], [10, 6]]);
  assert.equal(await positions(longPrompts), 48);
  assert.equal(await positions(longPrompts, 4000), 64);
});
