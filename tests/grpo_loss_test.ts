// The GRPO loss kernel (gpu/kernels/grpo_loss.ts, through GpuPolicy.accumulateGrpoGradients)
// against its CPU twin core/grpo.ts grpoLoss on the same log-probs: d(loss)/d(logp) at every
// position and the loss, KL, clipped and token sums, for every loss type, with and without the
// sampler's and the reference's log-probs. Rows of odd lengths, masked tails, ρ on both sides
// of the clip range and advantages of both signs. Reference log-probs left on the GPU by an
// in-process reference give the loss of the same values sent from the CPU, bit for bit.
// (tests/loss_test.ts also checks the kernel end to end against PyTorch's golden losses and
// gradients.)

import assert from "node:assert/strict";
import {
  completionMask,
  grpoLoss,
  type GrpoLossConfig,
  lossNormalizer,
  type LossType,
} from "../core/grpo.ts";
import { initWeights } from "../core/init.ts";
import { parseModelConfig, PRESETS } from "../core/model_config.ts";
import { Rng } from "../core/rng.ts";
import { GpuModel } from "../gpu/model.ts";
import { GpuPolicy, GpuReference } from "../gpu/policy.ts";
import type { ReferenceLogprobs } from "../core/engine.ts";
import { gpuTest, openGpu } from "./helpers.ts";

const gpu = await openGpu();
const config = parseModelConfig(PRESETS.tiny);
const EOS = 3;

// Five rows of different prompt and completion lengths; some completions end early (EOS).
const rng = new Rng(11);
const promptLens = [3, 6, 2, 5, 4];
const completions = [[7, 8, EOS, 9], [5, 6, 7, 8, 9, 10, 11], [12], [13, EOS], [14, 15, 16]];
const batch = {
  rows: completions.map((c, b) => [
    ...Array.from({ length: promptLens[b] }, () => 20 + rng.int(50)),
    ...c,
  ]),
  promptLens,
};
const masks = completionMask(completions, [EOS]);
const advantages = [1.3, -0.7, 0.4, -1.9, 0];
const INV_T = 1 / 0.9;

// The rows' layouts (gpu/policy.ts trainingForward): packed end to end, each row without its last
// token (37 tokens, 32 positions, a multiple of 4), and joined, each row padded to the longest
// (5 × 13).
const positions = batch.rows.map((r) => r.length - 1);
const layouts = {
  packed: {
    T: 32,
    starts: positions.map((_, b) => positions.slice(0, b).reduce((n, l) => n + l, 0)),
  },
  joined: { T: 5 * 13, starts: positions.map((_, b) => b * 13) },
};

for (const lossType of ["grpo", "bnpo", "dr_grpo"] as LossType[]) {
  for (const [withOld, withRef] of [[false, false], [true, false], [false, true], [true, true]]) {
    const pack = withOld === withRef; // each layout with and without each input
    const name = `${lossType}, ${withOld ? "ρ from the sampler" : "ρ = 1"}, ${
      withRef ? "KL to the reference" : "no reference"
    }, rows ${pack ? "packed" : "joined"}`;
    Deno.test(`GPU GRPO loss equals grpoLoss: ${name}`, gpuTest, async () => {
      const model = new GpuModel(gpu, config, initWeights(config, 5));
      const policy = new GpuPolicy(model, true, pack);
      const cfg: GrpoLossConfig = {
        beta: 0.07,
        epsilon: 0.2,
        epsilonHigh: 0.28,
        lossType,
        maxCompletionLength: 7,
      };
      const normalizer = lossNormalizer(cfg, masks);
      const logp = await policy.completionLogprobs(batch, INV_T);
      const noise = new Rng(3);
      const shifted = (by: number) =>
        logp.map((row) => row.map((l) => l + by * (noise.next() - 0.5)));
      const oldLogp = withOld ? shifted(1.2) : null;
      const refLogp = withRef ? shifted(2) : null;
      const rows = masks.map((mask, b) => ({
        oldLogp: oldLogp ? oldLogp[b] : null,
        mask,
        advantage: advantages[b],
      }));

      const cpu = grpoLoss(
        rows.map((row, b) => ({ ...row, logp: logp[b], refLogp: refLogp ? refLogp[b] : null })),
        cfg,
        normalizer,
      );
      if (withOld) assert.ok(cpu.clippedTokens > 0, "the case exercises the clip");

      const { sums } = await policy.accumulateGrpoGradients(batch, INV_T, {
        rows,
        refLogp: () => Promise.resolve(refLogp),
        config: cfg,
        normalizer,
      });
      const dLogp = await gpu.read(policy.model.lossGradient());
      await policy.readLossSums();
      const got = await sums;
      policy.model.destroy();

      // Every position of the layout: the completion's gradient, zero elsewhere.
      const layout = layouts[pack ? "packed" : "joined"];
      assert.equal(dLogp.length, layout.T);
      const want = new Float64Array(layout.T);
      completions.forEach((c, b) =>
        c.forEach((_, t) => want[layout.starts[b] + promptLens[b] - 1 + t] = cpu.dLogp[b][t])
      );
      want.forEach((w, i) => {
        const scale = Math.max(1e-3, Math.abs(w));
        assert.ok(Math.abs(dLogp[i] - w) <= 2e-5 * scale, `position ${i}: ${dLogp[i]} vs ${w}`);
      });
      const close = (a: number, b: number, what: string) =>
        assert.ok(Math.abs(a - b) <= 1e-5 * Math.max(1, Math.abs(b)), `${what}: ${a} vs ${b}`);
      close(got.loss, cpu.loss, "loss");
      close(got.klSum, cpu.klSum, "KL sum");
      assert.equal(got.clippedTokens, cpu.clippedTokens, "clipped tokens");
      assert.equal(got.tokens, cpu.tokens, "tokens");
      close(got.logpSum, cpu.logpSum, "Σ logp");
    });
  }
}

Deno.test(
  "positions no row's completion claims get a zero gradient, whatever was there",
  gpuTest,
  async () => {
    const policy = new GpuPolicy(new GpuModel(gpu, config, initWeights(config, 5)));
    const cfg: GrpoLossConfig = {
      beta: 0,
      epsilon: 0.2,
      epsilonHigh: 0.2,
      lossType: "bnpo",
      maxCompletionLength: 7,
    };
    // The same rows twice, in the same positions; the second time each prompt is a token longer.
    const step = (promptLens: number[]) => {
      const rows = batch.rows.map((r, b) => ({
        oldLogp: null,
        mask: Array(r.length - promptLens[b]).fill(1),
        advantage: 1,
      }));
      const masks = rows.map((r) => r.mask);
      return policy.accumulateGrpoGradients({ rows: batch.rows, promptLens }, 1, {
        rows,
        refLogp: () => Promise.resolve(null),
        config: cfg,
        normalizer: lossNormalizer(cfg, masks),
      });
    };
    await step(promptLens);
    const longer = promptLens.map((n) => n + 1);
    await step(longer);
    const dLogp = await gpu.read(policy.model.lossGradient());
    policy.model.destroy();
    const claimed = new Set<number>();
    batch.rows.forEach((r, b) => {
      const start = layouts.packed.starts[b];
      for (let t = longer[b] - 1; t < r.length - 1; t++) claimed.add(start + t);
    });
    assert.equal(dLogp.length, layouts.packed.T);
    dLogp.forEach((d, i) => {
      if (claimed.has(i)) assert.notEqual(d, 0, `position ${i} is a completion's`);
      else assert.equal(d, 0, `position ${i}`);
    });
  },
);

Deno.test(
  "reference log-probs left on the GPU give the loss of the same values from the CPU, with no wait",
  gpuTest,
  async () => {
    const reference = new GpuReference(new GpuModel(gpu, config, initWeights(config, 8)));
    const cfg: GrpoLossConfig = {
      beta: 0.07,
      epsilon: 0.2,
      epsilonHigh: 0.2,
      lossType: "grpo",
      maxCompletionLength: 7,
    };
    // A micro-batch of rows 1–3, so the held rows are a slice that does not start at 0.
    const micro = { rows: batch.rows.slice(1, 4), promptLens: promptLens.slice(1, 4) };
    const microMasks = masks.slice(1, 4);
    const rows = microMasks.map((mask, b) => ({ oldLogp: null, mask, advantage: advantages[b] }));
    // Held log-probs last until the next scoring call on the GPU: score on the CPU first.
    const onCpu = await reference.completionLogprobs(batch, INV_T);
    const held = await reference.heldLogprobs(batch, INV_T);
    assert.deepEqual(await held.read(), onCpu);
    const run = async (ref: () => Promise<ReferenceLogprobs>) => {
      const policy = new GpuPolicy(new GpuModel(gpu, config, initWeights(config, 5)));
      const waits = gpu.waitCount;
      const { sums } = await policy.accumulateGrpoGradients(micro, INV_T, {
        rows,
        refLogp: ref,
        config: cfg,
        normalizer: lossNormalizer(cfg, microMasks),
      });
      const waited = gpu.waitCount - waits;
      const dLogp = await gpu.read(policy.model.lossGradient());
      await policy.readLossSums();
      const got = { dLogp: [...dLogp], sums: await sums, waited };
      policy.model.destroy();
      return got;
    };
    const fromGpu = await run(() => Promise.resolve(held.slice(1, 4)));
    const fromCpu = await run(() => Promise.resolve(onCpu.slice(1, 4)));
    assert.equal(fromGpu.waited, 0, "the held log-probs are not read");
    assert.ok(fromGpu.sums.klSum !== 0, "the KL term is on");
    assert.deepEqual(fromGpu.dLogp, fromCpu.dLogp);
    assert.deepEqual(fromGpu.sums, fromCpu.sums);
    await reference.close();
  },
);
