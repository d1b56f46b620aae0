// The GRPO objective on the CPU: group-relative advantages, the completion mask, and the clipped
// surrogate loss with its KL penalty, returning d(loss)/d(logp) per completion token so that any
// engine (the GPU model, the CPU twin) can backpropagate it through the network.
//
// The definitions follow Hugging Face trl's GRPOTrainer (and simple_GRPO for loss_type "grpo"):
//   per token   ℓ = −(min(ρA, clip(ρ, 1−ε, 1+ε_high)A) − β·KL),  ρ = exp(logp − logp_old),
//               KL = exp(ref − logp) − (ref − logp) − 1  (the k3 estimator, ≥ 0)
//   grpo        mean over each completion's tokens, then mean over completions
//   bnpo, dapo  sum over all tokens / number of tokens
//   dr_grpo     sum over all tokens / (completions · max_completion_length)
// Where aha differs from trl: trl normalises grpo and bnpo per micro-batch and divides by the
// number of accumulation steps, and dapo by the token count of the global batch over all
// processes. aha runs one process and computes every denominator once from the WHOLE batch
// (lossNormalizer), so bnpo and dapo are the same thing here, and splitting a batch into
// micro-batches of any sizes gives exactly the loss and gradients of the unsplit batch.

export type LossType = "grpo" | "bnpo" | "dr_grpo" | "dapo";

export interface GrpoLossConfig {
  beta: number;
  epsilon: number;
  epsilonHigh: number;
  lossType: LossType;
  maxCompletionLength: number;
}

/**
 * The batch `aha loss` reads (JSON, snake_case as in the file): sequences are prompt +
 * completion, all the same length, completions right-padded with pad_id; log-prob rows hold one
 * value per completion token.
 */
export interface LossBatch {
  prompt_len: number;
  sequences: number[][];
  pad_id: number;
  rewards: number[];
  group_size: number;
  beta: number;
  epsilon: number;
  epsilon_high?: number;
  loss_type?: LossType;
  ref_logprobs?: number[][];
  old_logprobs?: number[][];
}

/**
 * Advantages per group of `groupSize` consecutive rewards: (r − mean) / (std + 1e-4) with the
 * unbiased std, or r − mean when `scaleRewards` is false. A group whose rewards are all equal
 * gets 0 everywhere; a group of one has no spread and gets 0 too.
 */
export function groupAdvantages(
  rewards: number[],
  groupSize: number,
  scaleRewards: boolean,
): number[] {
  if (!Number.isInteger(groupSize) || groupSize < 1 || rewards.length % groupSize !== 0) {
    throw new RangeError(`${rewards.length} rewards do not split into groups of ${groupSize}`);
  }
  const advantages: number[] = [];
  for (let start = 0; start < rewards.length; start += groupSize) {
    const group = rewards.slice(start, start + groupSize);
    const mean = group.reduce((a, b) => a + b, 0) / groupSize;
    const squares = group.reduce((a, r) => a + (r - mean) ** 2, 0);
    const std = groupSize > 1 ? Math.sqrt(squares / (groupSize - 1)) : 0;
    for (const r of group) advantages.push(scaleRewards ? (r - mean) / (std + 1e-4) : r - mean);
  }
  return advantages;
}

/**
 * 1 for every completion token up to and including the first end token (any of `eosIds`), 0
 * after it; padding only ever follows an end token, so it is 0. The end token itself is trained
 * on, so the policy learns to stop (simple_GRPO masks it away with the pad id; aha does not).
 */
export function completionMask(completions: number[][], eosIds: number[]): number[][] {
  return completions.map((ids) => {
    const end = ids.findIndex((id) => eosIds.includes(id));
    return ids.map((_, t) => (end === -1 || t <= end ? 1 : 0));
  });
}

/** One completion: per-token log-probs under the policy, the sampler, the reference. */
export interface LossRow {
  logp: number[];
  /** null: logp_old = logp detached (ρ = 1, its gradient still flows through ρ). */
  oldLogp: number[] | null;
  /** null: the reference is the policy itself, detached (KL = 0 and no gradient). */
  refLogp: number[] | null;
  mask: number[];
  advantage: number;
}

/** A loss contribution and the masked sums behind trl's metrics (see grpoLoss). */
export interface LossSums {
  loss: number;
  klSum: number;
  clippedTokens: number;
  tokens: number;
  /** Σ logp over the unmasked tokens (supervised fine-tuning's loss is −logpSum / tokens). */
  logpSum: number;
}

/** The denominators of the loss, computed once from the masks of the whole batch. */
export interface LossNormalizer {
  lossType: LossType;
  numCompletions: number;
  numTokens: number;
  maxCompletionLength: number;
}

export function lossNormalizer(cfg: GrpoLossConfig, masks: number[][]): LossNormalizer {
  let numTokens = 0;
  for (const mask of masks) for (const m of mask) numTokens += m;
  return {
    lossType: cfg.lossType,
    numCompletions: masks.length,
    numTokens,
    maxCompletionLength: cfg.maxCompletionLength,
  };
}

/** The weight of each unmasked token of a row with `rowTokens` unmasked tokens in the loss. */
export function tokenWeight(norm: LossNormalizer, rowTokens: number): number {
  switch (norm.lossType) {
    case "grpo":
      return 1 / (Math.max(1, rowTokens) * norm.numCompletions);
    case "bnpo":
    case "dapo":
      return 1 / Math.max(1, norm.numTokens);
    case "dr_grpo":
      return 1 / (norm.numCompletions * norm.maxCompletionLength);
  }
}

/**
 * The loss contribution of `rows` (a whole batch or one micro-batch of it) and d(loss)/d(logp)
 * for each of their tokens (0 where masked). Also masked sums for metrics: `klSum` (KL over
 * tokens), `clippedTokens` (tokens where the clip is active, as trl counts its clip_ratio:
 * ρ < 1−ε with A < 0, or ρ > 1+ε_high with A > 0 — exactly the tokens with no surrogate
 * gradient), and `tokens`.
 */
export function grpoLoss(
  rows: LossRow[],
  cfg: GrpoLossConfig,
  norm: LossNormalizer,
): LossSums & { dLogp: number[][] } {
  let loss = 0, klSum = 0, clippedTokens = 0, tokens = 0, logpSum = 0;
  const dLogp = rows.map((row) => {
    const rowTokens = row.mask.reduce((a, b) => a + b, 0);
    const weight = tokenWeight(norm, rowTokens);
    const A = row.advantage;
    return row.logp.map((logp, t) => {
      if (row.mask[t] === 0) return 0;
      tokens++;
      logpSum += logp;
      // Surrogate: ρA while unclipped (dρ/dlogp = ρ), the constant clip(ρ)A once clipped.
      const ratio = row.oldLogp === null ? 1 : Math.exp(logp - row.oldLogp[t]);
      const lowClipped = ratio < 1 - cfg.epsilon && A < 0;
      const highClipped = ratio > 1 + cfg.epsilonHigh && A > 0;
      const clipped = lowClipped || highClipped;
      if (clipped) clippedTokens++;
      const clippedRatio = Math.min(Math.max(ratio, 1 - cfg.epsilon), 1 + cfg.epsilonHigh);
      let tokenLoss = -Math.min(ratio * A, clippedRatio * A);
      let grad = clipped ? 0 : -ratio * A;
      // KL penalty: d/dlogp [exp(ref − logp) − (ref − logp) − 1] = 1 − exp(ref − logp).
      if (row.refLogp !== null) {
        const diff = row.refLogp[t] - logp;
        const kl = Math.exp(diff) - diff - 1;
        klSum += kl;
        tokenLoss += cfg.beta * kl;
        grad += cfg.beta * (1 - Math.exp(diff));
      }
      loss += weight * tokenLoss;
      return weight * grad;
    });
  });
  return { loss, dLogp, klSum, clippedTokens, tokens, logpSum };
}

/**
 * What the loss of one `aha loss` batch needs besides the policy's log-probs: its loss config,
 * advantages, per-row masks and sampler/reference log-probs, and the normalizer. Completion
 * tokens up to and including the first pad_id (the end token) count.
 */
export function lossBatchInputs(batch: LossBatch) {
  const P = batch.prompt_len;
  const config: GrpoLossConfig = {
    beta: batch.beta,
    epsilon: batch.epsilon,
    epsilonHigh: batch.epsilon_high ?? batch.epsilon,
    lossType: batch.loss_type ?? "grpo",
    maxCompletionLength: batch.sequences[0].length - P,
  };
  const advantages = groupAdvantages(batch.rewards, batch.group_size, true);
  const masks = completionMask(batch.sequences.map((s) => s.slice(P)), [batch.pad_id]);
  const rows = masks.map((mask, i) => ({
    oldLogp: batch.old_logprobs?.[i] ?? null,
    refLogp: batch.ref_logprobs?.[i] ?? null,
    mask,
    advantage: advantages[i],
  }));
  return { config, advantages, rows, normalizer: lossNormalizer(config, masks) };
}

/**
 * The objective of one `aha loss` batch, given the policy's log-probs of its completion tokens
 * (row i, one value per token): its advantages, and the whole batch's loss and d(loss)/d(logp).
 */
export function lossBatchObjective(batch: LossBatch, logprobs: number[][]) {
  const { config, advantages, rows, normalizer } = lossBatchInputs(batch);
  const withLogp: LossRow[] = rows.map((row, i) => ({ ...row, logp: logprobs[i] }));
  return { advantages, ...grpoLoss(withLogp, config, normalizer) };
}
