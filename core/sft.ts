// Supervised fine-tuning ("cold start"): next-token training on {prompt, completion} rows with
// the loss on completion tokens only — the mean negative log-likelihood over every completion
// token of the batch. It runs on the same PolicyEngine as GRPO.

import type { OptimizerHyper, PolicyEngine } from "./engine.ts";
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
  /** Called after every step with the step number and its mean token loss. */
  onStep?: (step: number, loss: number) => void | Promise<void>;
}

export async function runSft(
  policy: PolicyEngine,
  rows: SftRow[],
  opts: SftOptions,
): Promise<number> {
  const rng = new Rng(opts.seed);
  let order: number[] = [], next = 0, loss = 0;
  // The gradient norm is not needed here: the optimizer step is not waited for (its read
  // completes with the next step's), saving a GPU round trip per step.
  let pending: PromiseLike<number> = Promise.resolve(0);
  for (let step = 1; step <= opts.steps; step++) {
    const batch: SftRow[] = [];
    while (batch.length < opts.batchSize) {
      if (next === order.length) [order, next] = [rng.shuffle(rows.map((_, i) => i)), 0];
      batch.push(rows[order[next++]]);
    }
    const tokens = batch.reduce((n, r) => n + r.completionIds.length, 0);
    await policy.accumulateGradients(
      {
        rows: batch.map((r) => [...r.promptIds, ...r.completionIds]),
        promptLens: batch.map((r) => r.promptIds.length),
      },
      1,
      (logprobs) => {
        loss = -logprobs.flat().reduce((a, b) => a + b, 0) / tokens;
        return Promise.resolve(logprobs.map((row) => row.map(() => -1 / tokens)));
      },
    );
    const warmup = Math.min(1, step / Math.max(1, opts.warmupSteps));
    const decay = (opts.steps - step + 1) / opts.steps;
    // The previous step's gradient norm arrives with this step's read (no GPU wait of its own).
    const previousNorm = await pending;
    if (!Number.isFinite(previousNorm)) {
      throw new AhaError(
        `sft step ${step - 1}: the gradient norm is ${previousNorm}; nothing was saved`,
      );
    }
    if (!Number.isFinite(loss)) {
      throw new AhaError(`sft step ${step}: the loss is ${loss}; nothing was saved`);
    }
    pending = policy.optimizerStep({
      ...opts.optimizer,
      lr: opts.optimizer.lr * Math.min(warmup, decay),
    });
    await opts.onStep?.(step, loss);
  }
  const lastNorm = await pending;
  if (!Number.isFinite(lastNorm)) {
    throw new AhaError(
      `sft step ${opts.steps}: the gradient norm is ${lastNorm}; nothing was saved`,
    );
  }
  return loss;
}
