// Measuring a policy on held-out prompts. One function serves both `aha eval` and the
// evaluations `aha train` logs at eval_steps, so the two report the same figures:
//
//   accuracy, format_rate   of one greedy completion per prompt (the task's judgements)
//   reward                  the mean weighted reward of the greedy completions
//   pass@k, sample_reward   with num_samples n > 0: n sampled completions per prompt, pass@k by
//                           the unbiased estimator 1 − C(n−c, k) / C(n, k) (Chen et al. 2021,
//                           c = correct samples), averaged over prompts; and their mean reward
//
// Generation goes in batches of at most `batchRows` rows (a training step's, so evaluation
// never needs more memory). Scoring a batch — the user's async reward functions included — runs
// while the next batch generates: nothing learns from an evaluation, so the overlap is safe.

import type { PolicyEngine } from "./engine.ts";
import { type RewardErrors, scoreBatch } from "./rewards.ts";
import type { Task, TaskExample } from "./task.ts";

/** With eval_prompts unset, held-out sets up to this size are evaluated whole, larger ones by
 * their first EVAL_ALL_LIMIT prompts. */
export const EVAL_ALL_LIMIT = 200;

export interface EvalOptions {
  /** Sampled completions per prompt besides the greedy one; 0 for greedy only. */
  numSamples: number;
  temperature: number;
  topP: number;
  topK: number;
  maxNewTokens: number;
  /** The most rows one generate call may hold. */
  batchRows: number;
  seed: number;
  rewardErrors: RewardErrors;
}

/** Summary figures (also one line of eval.jsonl); pass@k keys only with samples. */
export interface Evaluation {
  accuracy: number;
  format_rate: number;
  completion_length: number;
  reward: number;
  examples: number;
  reward_errors: number;
  [figure: string]: number;
}

/** One evaluated prompt: completions[0] is the greedy one, then the samples. */
export interface EvalRecord {
  prompt: string;
  answer: string;
  completions: string[];
  rewards: Record<string, number>[];
  correct: boolean[];
  formatted: boolean[];
}

/** How many held-out prompts an evaluation uses, and a sentence saying so for the log. */
export function evalSelection(
  evalPrompts: number | null,
  available: number,
): { count: number; note: string } {
  if (evalPrompts !== null) {
    const count = Math.min(evalPrompts, available);
    return { count, note: `the first ${count} of ${available} held-out prompts (eval_prompts)` };
  }
  if (available <= EVAL_ALL_LIMIT) {
    return { count: available, note: `all ${available} held-out prompts` };
  }
  return {
    count: EVAL_ALL_LIMIT,
    note: `a fixed sample: the first ${EVAL_ALL_LIMIT} of ${available} held-out prompts ` +
      `(set eval_prompts to change)`,
  };
}

/** The unbiased pass@k of one prompt with `correct` right among `n` samples. */
export function passAtK(n: number, correct: number, k: number): number {
  if (k > n || k < 1) throw new RangeError(`pass@${k} needs 1 ≤ k ≤ n = ${n}`);
  if (n - correct < k) return 1;
  // 1 − C(n−c, k)/C(n, k) = 1 − ∏_{i=n−c+1}^{n} (1 − k/i), stable for large n.
  let none = 1;
  for (let i = n - correct + 1; i <= n; i++) none *= 1 - k / i;
  return 1 - none;
}

/** The k that pass@k is reported for: powers of two below n, and n. */
export function reportedKs(n: number): number[] {
  const ks: number[] = [];
  for (let k = 1; k < n; k *= 2) ks.push(k);
  return n > 0 ? [...ks, n] : [];
}

/** Greedy (and sampled) completions of `examples`, scored and judged. */
export async function evaluatePolicy(
  task: Task,
  policy: PolicyEngine,
  examples: TaskExample[],
  opts: EvalOptions,
  onRecord: (record: EvalRecord) => void | Promise<void> = () => {},
): Promise<Evaluation> {
  const n = opts.numSamples;
  const perCall = Math.max(1, Math.floor(opts.batchRows / Math.max(1, n)));
  let rewardErrors = 0;
  let scoring: Promise<void> = Promise.resolve();
  const totals = {
    correct: 0,
    formatted: 0,
    length: 0,
    reward: 0,
    sampleReward: 0,
    pass: new Map(reportedKs(n).map((k) => [k, 0])),
  };

  for (let start = 0; start < examples.length; start += perCall) {
    const chunk = examples.slice(start, start + perCall);
    const prompts = chunk.map((e) => e.promptIds);
    const sampling = { maxNewTokens: opts.maxNewTokens, eosIds: task.eosIds, topP: 1, topK: 0 };
    const greedy = await policy.generate(prompts, 1, { ...sampling, temperature: 0, seed: 0 });
    const sampled = n > 0
      ? await policy.generate(prompts, n, {
        ...sampling,
        temperature: opts.temperature,
        topP: opts.topP,
        topK: opts.topK,
        seed: (opts.seed + start) >>> 0,
      })
      : null;
    // Score this batch while the next one generates; its failure surfaces at the next await.
    const previous = scoring;
    scoring = (async () => {
      await previous;
      const rows = chunk.flatMap((example, g) => [
        { example, tokens: greedy.tokens[g], truncated: greedy.truncated[g] },
        ...Array.from({ length: n }, (_, j) => ({
          example,
          tokens: sampled!.tokens[g * n + j],
          truncated: sampled!.truncated[g * n + j],
        })),
      ]);
      const texts = rows.map((r) => task.decode(r.tokens));
      const { scores, errors } = await scoreBatch(
        task.rewards,
        rows.map((r, i) => ({
          prompt: r.example.prompt,
          completion: texts[i],
          example: r.example,
        })),
        opts.rewardErrors,
      );
      rewardErrors += errors.reduce((a, b) => a + b, 0);
      for (let g = 0; g < chunk.length; g++) {
        const at = g * (n + 1), example = chunk[g];
        const completions = texts.slice(at, at + n + 1);
        const correct = completions.map((t) => task.isCorrect(t, example));
        const formatted = completions.map((t, i) =>
          task.isFormatted(t, example) && !rows[at + i].truncated
        );
        const rewards = scores.slice(at, at + n + 1);
        totals.correct += Number(correct[0]);
        totals.formatted += Number(formatted[0]);
        totals.length += rows[at].tokens.length;
        totals.reward += rewards[0].total;
        const right = correct.slice(1).filter(Boolean).length;
        for (const k of totals.pass.keys()) {
          totals.pass.set(k, totals.pass.get(k)! + passAtK(n, right, k));
        }
        for (const r of rewards.slice(1)) totals.sampleReward += r.total / n;
        await onRecord({
          prompt: example.prompt,
          answer: example.answer,
          completions,
          rewards,
          correct,
          formatted,
        });
      }
    })();
    scoring.catch(() => {}); // awaited below or by the next batch
  }
  await scoring;

  const count = Math.max(1, examples.length);
  const result: Evaluation = {
    accuracy: totals.correct / count,
    format_rate: totals.formatted / count,
    completion_length: totals.length / count,
    reward: totals.reward / count,
    examples: examples.length,
    reward_errors: rewardErrors,
  };
  for (const [k, sum] of totals.pass) result[`pass@${k}`] = sum / count;
  if (n > 0) result.sample_reward = totals.sampleReward / count;
  return result;
}
