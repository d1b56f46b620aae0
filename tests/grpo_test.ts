// GRPO math on the CPU: advantages against hand-computed values, the completion mask, and the
// loss's d(loss)/d(logp) against central finite differences for every loss type; splitting a
// batch into micro-batches must give exactly the unsplit result.

import assert from "node:assert/strict";
import { Rng } from "../core/rng.ts";
import {
  completionMask,
  groupAdvantages,
  grpoLoss,
  type GrpoLossConfig,
  lossNormalizer,
  type LossRow,
  type LossType,
} from "../core/grpo.ts";

const LOSS_TYPES: LossType[] = ["grpo", "bnpo", "dr_grpo", "dapo"];

function assertClose(actual: number, expected: number, tol: number, what = "") {
  assert.ok(
    Math.abs(actual - expected) <= tol * Math.max(1, Math.abs(expected)),
    `${what} ${actual} vs ${expected}`,
  );
}

Deno.test("groupAdvantages: hand-computed values, equal groups, unscaled", () => {
  // Group [1, 2, 3]: mean 2, unbiased std 1. Group [0, 0, 4]: mean 4/3, std sqrt(16/3).
  const adv = groupAdvantages([1, 2, 3, 0, 0, 4], 3, true);
  const s = Math.sqrt(16 / 3);
  const expected = [-1 / 1.0001, 0, 1 / 1.0001, -4 / 3 / (s + 1e-4), -4 / 3 / (s + 1e-4)];
  expected.push((4 - 4 / 3) / (s + 1e-4));
  adv.forEach((a, i) => assertClose(a, expected[i], 1e-12, `advantage ${i}`));
  assert.deepEqual(groupAdvantages([0.5, 0.5, 2, 2], 2, true), [0, 0, 0, 0]);
  const unscaled = groupAdvantages([1, 2, 3, 0, 0, 4], 3, false);
  [-1, 0, 1, -4 / 3, -4 / 3, 8 / 3].forEach((e, i) => assertClose(unscaled[i], e, 1e-12));
  assert.deepEqual(groupAdvantages([7], 1, true), [0]);
  assert.throws(() => groupAdvantages([1, 2, 3], 2, true), RangeError);
});

Deno.test("completionMask: end token trained on, padding and later tokens masked", () => {
  const EOS = 9, PAD = 0, OTHER_EOS = 8;
  assert.deepEqual(
    completionMask([
      [EOS, PAD, PAD, PAD], // end at position 0: only it
      [3, 4, 5, 6], // no end token: truncated, all trained on
      [3, 4, EOS, PAD], // padding after the end
      [3, EOS, 5, EOS], // tokens after the first end are masked even if not padding
      [OTHER_EOS, 2, 2, 2], // any of the end ids
      [],
    ], [EOS, OTHER_EOS]),
    [[1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0], []],
  );
});

/** A random batch: ρ spread inside and outside [1−ε, 1+ε_high], advantages of both signs. */
function randomRows(rng: Rng, lengths: number[], withOld: boolean, withRef: boolean): LossRow[] {
  const uniform = (lo: number, hi: number) => lo + (hi - lo) * rng.next();
  return lengths.map((length, i) => {
    const logp = Array.from({ length }, () => uniform(-4, -0.1));
    const mask = Array.from({ length }, (_, t) => (t < length - (i % 3) ? 1 : 0));
    return {
      logp,
      oldLogp: withOld ? logp.map((l) => l + uniform(-0.6, 0.6)) : null,
      refLogp: withRef ? logp.map((l) => l + uniform(-1, 1)) : null,
      mask,
      advantage: i % 4 === 3 ? 0 : uniform(-2, 2),
    };
  });
}

function config(lossType: LossType, beta = 0.04): GrpoLossConfig {
  return { beta, epsilon: 0.2, epsilonHigh: 0.28, lossType, maxCompletionLength: 9 };
}

Deno.test("grpoLoss: dLogp equals central finite differences, every loss type", () => {
  const rng = new Rng(7);
  for (const lossType of LOSS_TYPES) {
    for (const [withOld, withRef] of [[false, false], [true, false], [false, true], [true, true]]) {
      const rows = randomRows(rng, [5, 9, 3, 7, 1], withOld, withRef);
      const cfg = config(lossType);
      const norm = lossNormalizer(cfg, rows.map((r) => r.mask));
      const { dLogp, clippedTokens } = grpoLoss(rows, cfg, norm);
      if (withOld) assert.ok(clippedTokens > 0, "some ratios should lie outside the clip range");
      // A null old/ref is logp detached: for finite differences, freeze it as a copy.
      const frozen = rows.map((r) => ({
        ...r,
        oldLogp: r.oldLogp ?? [...r.logp],
        refLogp: r.refLogp ?? [...r.logp],
      }));
      const lossAt = (i: number, t: number, h: number) => {
        const moved = frozen.map((r, j) =>
          j === i ? { ...r, logp: r.logp.map((l, u) => (u === t ? l + h : l)) } : r
        );
        return grpoLoss(moved, cfg, norm).loss;
      };
      const h = 1e-6;
      frozen.forEach((row, i) =>
        row.logp.forEach((_, t) => {
          const numeric = (lossAt(i, t, h) - lossAt(i, t, -h)) / (2 * h);
          assertClose(dLogp[i][t], numeric, 1e-7, `${lossType} old=${withOld} ref=${withRef}`);
          if (row.mask[t] === 0) assert.equal(dLogp[i][t], 0);
        })
      );
      // Null old/ref and their frozen copies give the same loss and gradient.
      const same = grpoLoss(frozen, cfg, norm);
      assertClose(same.loss, grpoLoss(rows, cfg, norm).loss, 1e-14);
      same.dLogp.flat().forEach((g, k) => assertClose(g, dLogp.flat()[k], 1e-14));
    }
  }
});

Deno.test("grpoLoss: clipping, hand-computed tokens", () => {
  const cfg = { ...config("bnpo", 0), epsilon: 0.2, epsilonHigh: 0.2 };
  const row = (ratio: number, advantage: number): LossRow => ({
    logp: [Math.log(ratio)],
    oldLogp: [0],
    refLogp: null,
    mask: [1],
    advantage,
  });
  const cases: [number, number, number, number, boolean][] = [
    // ratio, A, expected loss, expected dLogp, clipped
    [1.5, 2, -1.2 * 2, 0, true], // above 1+ε with A > 0: clipped, no gradient
    [1.5, -2, 1.5 * 2, 1.5 * 2, false], // above 1+ε with A < 0: the unclipped term is smaller
    [0.5, -2, 0.8 * 2, 0, true], // below 1−ε with A < 0: clipped
    [0.5, 2, -0.5 * 2, -0.5 * 2, false], // below 1−ε with A > 0: unclipped
    [1.1, 2, -1.1 * 2, -1.1 * 2, false], // inside the range
  ];
  for (const [ratio, A, loss, grad, clipped] of cases) {
    const rows = [row(ratio, A)];
    const out = grpoLoss(rows, cfg, lossNormalizer(cfg, [[1]]));
    assertClose(out.loss, loss, 1e-12, `loss ρ=${ratio} A=${A}`);
    assertClose(out.dLogp[0][0], grad, 1e-12, `grad ρ=${ratio} A=${A}`);
    assert.equal(out.clippedTokens, clipped ? 1 : 0);
  }
});

Deno.test("grpoLoss: micro-batches sum to the whole batch, every loss type", () => {
  const rng = new Rng(11);
  const rows = randomRows(rng, [4, 8, 8, 2, 6, 5, 8], true, true);
  for (const lossType of LOSS_TYPES) {
    const cfg = config(lossType, 0.1);
    const norm = lossNormalizer(cfg, rows.map((r) => r.mask));
    const whole = grpoLoss(rows, cfg, norm);
    const parts = [rows.slice(0, 3), rows.slice(3, 4), rows.slice(4)].map((p) =>
      grpoLoss(p, cfg, norm)
    );
    assertClose(parts.reduce((a, p) => a + p.loss, 0), whole.loss, 1e-14, lossType);
    assert.deepEqual(parts.flatMap((p) => p.dLogp), whole.dLogp);
    assertClose(parts.reduce((a, p) => a + p.klSum, 0), whole.klSum, 1e-14);
    assert.equal(parts.reduce((a, p) => a + p.clippedTokens, 0), whole.clippedTokens);
    assert.equal(parts.reduce((a, p) => a + p.tokens, 0), whole.tokens);
  }
});

Deno.test("grpoLoss: normalisation of each loss type, β = 0", () => {
  // Without old log-probs ρ = 1, so each token's surrogate loss is −A; no ref means KL = 0.
  const rows: LossRow[] = [
    { logp: [-1, -2, -3], oldLogp: null, refLogp: null, mask: [1, 1, 0], advantage: 1 },
    { logp: [-1, -2, -3], oldLogp: null, refLogp: null, mask: [1, 1, 1], advantage: -2 },
  ];
  const masks = rows.map((r) => r.mask);
  const expected: Record<LossType, number> = {
    grpo: ((-1 * 2) / 2 + (2 * 3) / 3) / 2,
    bnpo: (-1 * 2 + 2 * 3) / 5,
    dapo: (-1 * 2 + 2 * 3) / 5,
    dr_grpo: (-1 * 2 + 2 * 3) / (2 * 9),
  };
  for (const lossType of LOSS_TYPES) {
    const cfg = config(lossType, 0);
    const out = grpoLoss(rows, cfg, lossNormalizer(cfg, masks));
    assertClose(out.loss, expected[lossType], 1e-14, lossType);
    assert.equal(out.klSum, 0);
    assert.equal(out.tokens, 5);
  }
  // β = 0 with a reference: the KL is still measured but contributes neither loss nor gradient.
  const withRef = rows.map((r) => ({ ...r, refLogp: [-0.5, -2.5, -1] }));
  const cfg = config("grpo", 0);
  const norm = lossNormalizer(cfg, masks);
  const a = grpoLoss(rows, cfg, norm), b = grpoLoss(withRef, cfg, norm);
  assert.equal(b.loss, a.loss);
  assert.deepEqual(b.dLogp, a.dLogp);
  assert.ok(b.klSum > 0);
});
