// `aha loss` on the GPU against an independent PyTorch GRPO computation
// (tests/fixtures/make_loss_golden.py): loss, advantages, gradient norm, gradients.

import assert from "node:assert/strict";
import { loadCheckpoint } from "../core/checkpoint.ts";
import { completionMask, groupAdvantages, grpoLoss, lossNormalizer } from "../core/grpo.ts";

import { computeLoss } from "../cli/loss.ts";
import { GpuModel } from "../gpu/model.ts";
import { GpuPolicy } from "../gpu/policy.ts";
import { fixtureCases, gpuTest, LOSS_CASES, openGpu } from "./helpers.ts";

const gpu = await openGpu();
const ROOT = new URL("../", import.meta.url).pathname;
const CASES = `${ROOT}tests/fixtures/loss/`;

for (const name of fixtureCases(CASES, LOSS_CASES)) {
  const entry = { name };
  Deno.test(`aha loss matches PyTorch: ${entry.name}`, gpuTest, async () => {
    const batch = JSON.parse(Deno.readTextFileSync(`${CASES}${entry.name}/batch.json`));
    const expected = JSON.parse(Deno.readTextFileSync(`${CASES}${entry.name}/expected.json`));
    const checkpoint = await loadCheckpoint(ROOT + expected.model);
    const policy = new GpuPolicy(new GpuModel(gpu, checkpoint.config, checkpoint.weights));
    const got = await computeLoss(policy, batch);
    policy.model.destroy();
    // f32 GPU math against float64 PyTorch on the same weights.
    assert.ok(Math.abs(got.loss - expected.loss) < 1e-5, `loss ${got.loss} vs ${expected.loss}`);
    // Lengths first: a missing value must fail, not be skipped.
    assert.equal(got.advantages.length, batch.sequences.length, "one advantage per sequence");
    assert.equal(expected.advantages.length, batch.sequences.length);
    got.advantages.forEach((a, i) => assert.ok(Math.abs(a - expected.advantages[i]) < 1e-9));
    assert.ok(Number.isFinite(got.loss) && Number.isFinite(got.grad_norm));
    assert.ok(
      Math.abs(got.grad_norm - expected.grad_norm) < 1e-4 * Math.max(1, expected.grad_norm),
    );
    assert.deepEqual(Object.keys(got.grads).sort(), Object.keys(expected.grads).sort());
    for (const [name, values] of Object.entries(expected.grads) as [string, number[]][]) {
      assert.equal(got.grads[name].length, values.length, `${name}: values`);
      values.forEach((v, i) => {
        assert.ok(
          Math.abs(got.grads[name][i] - v) < 1e-5 + 1e-3 * Math.abs(v),
          `${name}[${i}]: ${got.grads[name][i]} vs ${v}`,
        );
      });
    }
  });
}

Deno.test("aha loss rejects a malformed batch with one line naming the field", async () => {
  const dir = await Deno.makeTempDir();
  const path = `${dir}/batch.json`;
  const batch = JSON.parse(Deno.readTextFileSync(`${CASES}gqa_tied_ref/batch.json`));
  await Deno.writeTextFile(path, JSON.stringify({ ...batch, group_size: 5 }));
  const out = await new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "-A",
      `${ROOT}main.ts`,
      "loss",
      "--model",
      `${ROOT}tests/fixtures/golden/gqa_tied`,
      "--batch",
      path,
    ],
    stdout: "piped",
    stderr: "piped",
  }).output();
  const stderr = new TextDecoder().decode(out.stderr).trim().split("\n").filter((l) =>
    !l.includes("XDG")
  );
  assert.equal(out.code, 1);
  assert.equal(stderr.length, 1);
  assert.match(stderr[0], /batch\.json: field "group_size" must be/);
  await Deno.remove(dir, { recursive: true });
});

Deno.test("gradients summed over micro-batches equal the un-split batch's", gpuTest, async () => {
  const batch = JSON.parse(Deno.readTextFileSync(`${CASES}gqa3_untied_clip/batch.json`));
  const expected = JSON.parse(Deno.readTextFileSync(`${CASES}gqa3_untied_clip/expected.json`));
  const checkpoint = await loadCheckpoint(ROOT + expected.model);
  const P = batch.prompt_len, B = batch.sequences.length;
  const cfg = {
    beta: batch.beta,
    epsilon: batch.epsilon,
    epsilonHigh: batch.epsilon_high,
    lossType: "grpo" as const,
    maxCompletionLength: batch.sequences[0].length - P,
  };
  const advantages = groupAdvantages(batch.rewards, batch.group_size, true);
  const masks = completionMask(batch.sequences.map((s: number[]) => s.slice(P)), [batch.pad_id]);
  const normalizer = lossNormalizer(cfg, masks);
  const gradsWith = async (microBatch: number) => {
    const policy = new GpuPolicy(new GpuModel(gpu, checkpoint.config, checkpoint.weights));
    for (let start = 0; start < B; start += microBatch) {
      const rows = batch.sequences.slice(start, start + microBatch);
      await policy.accumulateGradients(
        { rows, promptLens: rows.map(() => P) },
        1,
        (logprobs) =>
          Promise.resolve(
            grpoLoss(
              logprobs.map((logp, i) => ({
                logp,
                oldLogp: batch.old_logprobs[start + i],
                refLogp: batch.ref_logprobs[start + i],
                mask: masks[start + i],
                advantage: advantages[start + i],
              })),
              cfg,
              normalizer,
            ).dLogp,
          ),
      );
    }
    const grads = await policy.model.readGrads();
    policy.model.destroy();
    return grads;
  };
  const whole = await gradsWith(B), split = await gradsWith(2);
  for (const [name, g] of whole) {
    const h = split.get(name)!;
    // Same sums in a different grouping: equal up to f32 rounding.
    g.forEach((x, i) =>
      assert.ok(Math.abs(x - h[i]) <= 1e-6 + 1e-5 * Math.abs(x), `${name}[${i}]`)
    );
  }
});
