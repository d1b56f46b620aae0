// Supervised fine-tuning ("cold start"): next-token training on {prompt, completion} rows with
// the loss on completion tokens only — the mean negative log-likelihood over every completion
// token of the batch. It runs on the same PolicyEngine as GRPO.

import { grpoGradients, type OptimizerHyper, type PolicyEngine } from "./engine.ts";
import { type GrpoLossConfig, lossNormalizer, type LossSums } from "./grpo.ts";
import { AhaError } from "./errors.ts";
import { Rng } from "./rng.ts";

export interface SftRow {
  promptIds: number[];
  completionIds: number[];
}

export interface SftOptions {
  steps: number;
  batchSize: number;
  optimizer: OptimizerHyper;
  /** Linear warmup over this many steps, then linear decay to zero at the last step. */
  warmupSteps: number;
  seed: number;
  /** Called with each step's number and mean token loss once they arrive (every few steps). */
  onStep?: (step: number, loss: number) => void | Promise<void>;
}

export async function runSft(
  policy: PolicyEngine,
  rows: SftRow[],
  opts: SftOptions,
): Promise<number> {
  const rng = new Rng(opts.seed);
  let order: number[] = [], next = 0, loss = 0;
  // A step's gradient needs no log-probs back (d loss/d logp = −1/tokens), so nothing is waited
  // for within a step. Every READ_EVERY steps (and at the last) the optimizer step reads back
  // its gradient norm and, with it, the loss sums of the steps since the last read: one GPU
  // round trip per READ_EVERY steps, awaited after the next step is recorded.
  let unreported: Pending[] = [];
  let norm: { step: number; value: PromiseLike<number> } | null = null;
  const report = async () => {
    if (norm) {
      const gradNorm = await norm.value;
      if (!Number.isFinite(gradNorm)) {
        throw new AhaError(
          `sft step ${norm.step}: the gradient norm is ${gradNorm}; nothing was saved`,
        );
      }
      norm = null;
    }
    for (const { step, sums, tokens } of unreported) {
      loss = -(await sums).logpSum / tokens;
      if (!Number.isFinite(loss)) {
        throw new AhaError(`sft step ${step}: the loss is ${loss}; nothing was saved`);
      }
      await opts.onStep?.(step, loss);
    }
    unreported = [];
  };
  for (let step = 1; step <= opts.steps; step++) {
    const batch: SftRow[] = [];
    while (batch.length < opts.batchSize) {
      if (next === order.length) [order, next] = [rng.shuffle(rows.map((_, i) => i)), 0];
      batch.push(rows[order[next++]]);
    }
    const tokens = batch.reduce((n, r) => n + r.completionIds.length, 0);
    const masks = batch.map((r) => r.completionIds.map(() => 1));
    // The mean negative log-likelihood is the GRPO loss with A = 1, ρ = 1, no KL and one
    // weight 1/tokens for every token (bnpo's normalization): its gradient is −1/tokens.
    const { sums } = await grpoGradients(
      policy,
      {
        rows: batch.map((r) => [...r.promptIds, ...r.completionIds]),
        promptLens: batch.map((r) => r.promptIds.length),
      },
      1,
      {
        rows: masks.map((mask) => ({ oldLogp: null, mask, advantage: 1 })),
        refLogp: () => Promise.resolve(null),
        config: SFT_LOSS,
        normalizer: lossNormalizer(SFT_LOSS, masks),
      },
    );
    if (norm) await report();
    const warmup = Math.min(1, step / Math.max(1, opts.warmupSteps));
    const decay = (opts.steps - step + 1) / opts.steps;
    const hp = { ...opts.optimizer, lr: opts.optimizer.lr * Math.min(warmup, decay) };
    unreported.push({ step, sums, tokens });
    if (step % READ_EVERY === 0 || step === opts.steps || !policy.optimizerStepUnread) {
      norm = { step, value: policy.optimizerStep(hp) };
    } else {
      policy.optimizerStepUnread(hp);
    }
  }
  await report();
  return loss;
}

/** Steps between reads of the gradient norm and the loss sums (see runSft). */
const READ_EVERY = 10;

/** A step whose loss is still on its way. */
interface Pending {
  step: number;
  sums: PromiseLike<LossSums>;
  tokens: number;
}

/** Supervised fine-tuning as a GRPO loss (see runSft): only lossType and beta matter. */
const SFT_LOSS: GrpoLossConfig = {
  beta: 0,
  epsilon: 0.2,
  epsilonHigh: 0.2,
  lossType: "bnpo",
  maxCompletionLength: 1,
};
