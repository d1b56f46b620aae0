// The GRPO training loop (DESIGN.md, "Data flow of one training step"):
//
//   1. draw prompts_per_step prompts; sample num_generations completions for each;
//   2. score them; groups whose rewards are all equal teach nothing: drop them and refill from
//      fresh prompts, up to max_refill_rounds times (the refills may have been sampled ahead,
//      in the same generation call: prompts_per_generation);
//   3. advantages per group; the batch goes to the reference engine at once, and the policy's
//      forward runs while it computes (a reference in another process gets each call's kept
//      groups as soon as they are scored, so that it also computes during the later calls);
//   4. the GRPO loss per completion token (core/grpo.ts), backward in micro-batches with
//      gradient accumulation, clip, AdamW — num_iterations times over the same batch;
//   5. metrics, samples, a greedy evaluation now and then, checkpoints.
//
// A step's scalars (the loss sums, the gradient norm) are read one step late: a GPU engine
// delivers them with a read recorded after its optimizer step, and waiting for that read would
// leave the GPU idle for Deno's ~10 ms per GPU→CPU wait. So run() lets step N + 1 sample (which
// waits for the GPU anyway) before it takes step N's scalars, checks them and writes step N's
// metrics line; then step N + 1 trains. Before anything reads the policy (evaluation, reference
// sync, a checkpoint, the last step, a stop) the step's scalars are taken first, so a diverged
// step is never evaluated or saved.
//
// Everything device-specific sits behind PolicyEngine / ReferenceEngine (core/engine.ts).

import {
  grpoGradients,
  type PolicyEngine,
  type ReferenceEngine,
  type ReferenceLogprobs,
  type TokenBatch,
} from "./engine.ts";
import { AhaError } from "./errors.ts";
import {
  completionMask,
  groupAdvantages,
  type GrpoLossConfig,
  lossNormalizer,
  type LossSums,
} from "./grpo.ts";
import { type EvalOptions, evalSelection, evaluatePolicy, type Evaluation } from "./evaluate.ts";
import { generationPrompts } from "./plan.ts";
import { reflectionMatcher, scoreBatch } from "./rewards.ts";
import type { Task, TaskExample } from "./task.ts";
import type { SamplerState } from "./task.ts";
import { learningRateAt, type TrainConfig } from "./train_config.ts";

/** One line of metrics.jsonl. */
export type Metrics = Record<string, number>;

/** Where the trainer reports, and how it is told to stop; implemented by the CLI. */
export interface TrainerIO {
  metrics(step: number, metrics: Metrics): Promise<void>;
  samples(step: number, samples: Record<string, unknown>[]): Promise<void>;
  evaluation(step: number, result: Evaluation): Promise<void>;
  /**
   * Write a checkpoint of the current policy and trainer state; `sampler` overrides the task's
   * current data position (used when the step after `step` failed midway).
   */
  save(step: number, sampler?: SamplerState): Promise<void>;
  /** True once the user asked to stop (Ctrl-C): the loop saves and returns. */
  stopRequested(): boolean;
}

export type { Evaluation } from "./evaluate.ts";

/** Training produced NaN or infinity: the state in memory is not worth saving. */
export class DivergedError extends AhaError {}

/** Throws DivergedError unless `value` is finite. */
export function checkFinite(value: number, what: string, step: number): void {
  if (!Number.isFinite(value)) {
    throw new DivergedError(
      `step ${step}: ${what} is ${value}; training diverged (lower the learning rate?) and ` +
        `nothing was saved from this step on`,
    );
  }
}

/** One sampled completion with its scores. */
interface Scored {
  example: TaskExample;
  tokens: number[];
  logprobs: number[];
  text: string;
  rewards: Record<string, number>; // per function, plus `total`
  /** User reward functions that failed on it (scored 0 instead: reward_errors skip). */
  rewardErrors: number;
  truncated: boolean;
}

/** The rows of sampled completions (prompt, then completion) as a batch for an engine. */
function tokenBatch(completions: Scored[]): TokenBatch {
  return {
    rows: completions.map((c) => [...c.example.promptIds, ...c.tokens]),
    promptLens: completions.map((c) => c.example.promptIds.length),
  };
}

/** A stable 32-bit seed for step `step` of a run seeded `seed`. */
export function streamSeed(seed: number, step: number): number {
  const h = (Math.imul(((seed ^ 0x9e3779b9) >>> 0) ^ step, 0x85ebca6b) + 0x632be5ab) >>> 0;
  return h ^ (h >>> 15);
}

export function grpoLossConfig(cfg: TrainConfig): GrpoLossConfig {
  return {
    beta: cfg.beta,
    epsilon: cfg.epsilon,
    epsilonHigh: cfg.epsilon_high ?? cfg.epsilon,
    lossType: cfg.loss_type,
    maxCompletionLength: cfg.max_completion_length,
  };
}

/** The evaluation options a training config implies (core/evaluate.ts). */
export function evalOptions(cfg: TrainConfig): EvalOptions {
  return {
    numSamples: cfg.eval_num_samples,
    temperature: cfg.temperature,
    topP: cfg.top_p,
    topK: cfg.top_k,
    maxNewTokens: cfg.max_completion_length,
    // In batches no larger than a training step's, so evaluation never needs more memory.
    batchRows: cfg.prompts_per_step * cfg.num_generations,
    seed: cfg.seed,
    rewardErrors: cfg.reward_errors,
  };
}

/** The held-out evaluation logged during training: evalSelection's prompts, evaluatePolicy's
 * figures. */
export async function evaluate(
  cfg: TrainConfig,
  task: Task,
  policy: PolicyEngine,
): Promise<Evaluation> {
  const { count } = evalSelection(cfg.eval_prompts, task.heldOut.length);
  return await evaluatePolicy(task, policy, task.heldOut.slice(0, count), evalOptions(cfg));
}

export class GrpoTrainer {
  private readonly lossConfig: GrpoLossConfig;
  private readonly reflects: (text: string) => boolean;
  /** The step being recorded has already stepped the optimizer (num_iterations > 1). */
  private updated = false;

  constructor(
    private readonly cfg: TrainConfig,
    private readonly task: Task,
    private readonly policy: PolicyEngine,
    private readonly reference: ReferenceEngine | null,
    private readonly io: TrainerIO,
  ) {
    this.lossConfig = grpoLossConfig(cfg);
    this.reflects = reflectionMatcher(cfg.reflection_phrases);
  }

  /** Train from `startStep` (the number of steps already done) to max_steps. */
  async run(startStep: number): Promise<number> {
    const cfg = this.cfg;
    // The step recorded last whose scalars have not been taken yet.
    let unsettled: { step: number; metrics: () => Promise<Metrics> } | null = null;
    const settle = async () => {
      if (!unsettled) return;
      const { step, metrics } = unsettled;
      unsettled = null;
      await this.io.metrics(step, await metrics());
    };
    for (let step = startStep + 1; step <= cfg.max_steps; step++) {
      // A step that fails leaves the weights and optimizer as the previous step left them:
      // save that step (with the data position it ended at) before giving up.
      const sampler = this.task.samplerState();
      try {
        // The previous step's scalars came while this step sampled.
        const recorded = await this.recordStep(step, settle);
        unsettled = { step, metrics: recorded.metrics };
      } catch (error) {
        // A diverged step may have written NaN into the weights: keep the last checkpoint. So
        // does a step that failed after one of its updates (a later pass of num_iterations):
        // the weights are neither the previous step's nor this one's.
        if (!(error instanceof DivergedError)) {
          await settle(); // a previous step that diverged is the error to report
          if (step - 1 > startStep && !this.updated) {
            await this.saveGivingUp(error, step - 1, sampler);
          }
        }
        throw error;
      }
      const last = step === cfg.max_steps;
      const evaluating = (cfg.eval_steps > 0 && step % cfg.eval_steps === 0) || last;
      const syncing = cfg.sync_ref_model && this.reference !== null &&
        step % cfg.ref_model_sync_steps === 0;
      const periodic = (cfg.save_steps > 0 && step % cfg.save_steps === 0) || last;
      try {
        if (evaluating || syncing || periodic || this.io.stopRequested()) await settle();
        if (evaluating) {
          await this.io.evaluation(step, await evaluate(cfg, this.task, this.policy));
        }
        if (syncing) {
          await this.reference!.mixIn(await this.policy.weights(), cfg.ref_model_mixup_alpha);
        }
      } catch (error) {
        // The step trained and its scalars were finite: keep it, then give up.
        if (!(error instanceof DivergedError)) await this.saveGivingUp(error, step);
        throw error;
      }
      // Asked again after the evaluation and the sync: a stop that came during them saves too.
      const stopping = this.io.stopRequested();
      if (periodic || stopping) await this.io.save(step);
      if (stopping) return step;
    }
    return cfg.max_steps; // the last step took its scalars before saving
  }

  /**
   * Saves `step` as the run gives up on `error`. A save that fails too (a full disk fails both)
   * must not hide the error that stopped the run: that error is thrown, with the save's failure
   * added when it is a one-line AhaError.
   */
  private async saveGivingUp(error: unknown, step: number, sampler?: SamplerState) {
    try {
      await this.io.save(step, sampler);
    } catch (saveError) {
      if (!(error instanceof AhaError)) throw error;
      throw new AhaError(
        `${error.message} (saving step ${step} failed too: ${(saveError as Error).message})`,
      );
    }
  }

  /** One GRPO step; returns its metrics once its scalars have been read. */
  async step(step: number): Promise<Metrics> {
    return await (await this.recordStep(step)).metrics();
  }

  /**
   * One GRPO step, up to its optimizer step: resolves once the step's work is recorded (and,
   * on a GPU engine, submitted), to a function that takes the step's scalars and returns its
   * metrics, rejecting with DivergedError if the loss or gradient norm is not finite. Nothing
   * awaits the scalars before that function is called: a GPU engine counts an early await
   * as a wait. `afterSampling` runs once the step's completions are sampled and scored.
   */
  private async recordStep(
    step: number,
    afterSampling: () => Promise<void> = () => Promise.resolve(),
  ): Promise<{ metrics: () => Promise<Metrics> }> {
    const cfg = this.cfg, G = cfg.num_generations;
    const started = performance.now();
    this.updated = false;

    // The reference's log-probs of the kept rows. One that computes in another process (a
    // worker: no heldLogprobs) is asked for the groups kept so far before each later generation
    // call, so that it computes while that call samples; its requests are answered in order,
    // and the parts join in the order of `kept`. An in-process one shares the policy's device
    // and is asked once, for the whole batch, when sampling is done (step 3).
    const invTemperature = 1 / cfg.temperature;
    const reference = cfg.beta > 0 ? this.reference : null;
    const earlyReference = reference && !reference.heldLogprobs ? reference : null;
    const referenceParts: Promise<number[][]>[] = [];

    // 1–2. Sample groups; keep those whose rewards differ, refilling the rest. Prompts are drawn
    // in order and sampled in calls of prompts_per_generation, which may run ahead of what the
    // refill rounds turn out to need: the rounds are then decided from groups already sampled,
    // and the prompts left unused go back to the data stream. A prompt's completions depend on
    // the step and its position in the step only (the sampler's stream is keyed by row), so
    // the rounds keep the same groups however the calls split them.
    const P = cfg.prompts_per_step, perCall = generationPrompts(cfg);
    const mostPrompts = P * (cfg.max_refill_rounds + 1); // every round refills P prompts at most
    const seed = streamSeed(cfg.seed, step);
    const samplerAtStart = this.task.samplerState();
    const drawn: Scored[][] = []; // every group sampled this step, in the order drawn
    const kept: Scored[][] = [];
    // A micro-batch pads its rows to its longest. When micro-batches split the batch, each kept
    // group's completions go longest first, so that rows of like length share micro-batches
    // (the loss and a group's advantages do not depend on the order within it). When one
    // micro-batch holds the whole batch, the order cannot change its padding: rows keep the
    // order they were sampled in.
    const sortRows = cfg.micro_batch_size < P * G;
    let generateSeconds = 0, used = 0, round = 0, roundEnd = P, zeroStdFirstRound = 0;
    let askedReference = 0; // groups of `kept` the worker reference was asked for
    const askReference = () => {
      if (!earlyReference || askedReference === kept.length) return;
      const part = earlyReference.completionLogprobs(
        tokenBatch(kept.slice(askedReference).flat()),
        invTemperature,
      );
      // Awaited in the loss below; a failure meanwhile must wait for that await.
      part.catch(() => {});
      referenceParts.push(part);
      askedReference = kept.length;
    };
    while (true) {
      if (used === roundEnd) {
        if (kept.length === P || round === cfg.max_refill_rounds) break;
        round++;
        roundEnd = used + P - kept.length;
      }
      if (used === drawn.length) {
        askReference(); // the groups kept so far, while the next call samples
        const count = Math.min(perCall, mostPrompts - used);
        const t0 = performance.now();
        drawn.push(...await this.sample(this.task.nextExamples(count), seed, used));
        generateSeconds += (performance.now() - t0) / 1000;
      }
      const group = drawn[used++];
      const totals = group.map((s) => s.rewards.total);
      const hasSignal = totals.some((r) => r !== totals[0]);
      if (hasSignal) kept.push(sortRows ? longestFirst(group) : group);
      if (round === 0 && !hasSignal) zeroStdFirstRound++;
    }
    askReference();
    if (drawn.length > used) {
      this.task.restoreSampler(samplerAtStart);
      this.task.nextExamples(used);
    }
    const firstRound = drawn.slice(0, P).flat();
    await afterSampling();

    const metrics: Metrics = {
      ...this.sampleMetrics(firstRound),
      frac_reward_zero_std: zeroStdFirstRound / cfg.prompts_per_step,
      groups_trained: kept.length,
      prompts_sampled: drawn.length,
      learning_rate: learningRateAt(cfg, step - 1), // step counts from 1, updates from 0
      generate_s: generateSeconds,
    };
    if (cfg.reward_errors === "skip") {
      // Of the groups this step used: those sampled ahead and handed back are counted when used.
      const scored = drawn.slice(0, used).flat();
      metrics.reward_errors = scored.reduce((n, c) => n + c.rewardErrors, 0);
    }
    if (cfg.sample_steps > 0 && (step % cfg.sample_steps === 0 || step === 1)) {
      await this.io.samples(step, this.pickSamples(firstRound));
    }
    // Completion tokens sampled per second of the step: every call's, refills and prompts
    // sampled ahead included (those are sampled again by the step that uses them).
    const sampledTokens = drawn.flat().reduce((n, c) => n + c.tokens.length, 0);
    const throughput = () => {
      const stepSeconds = (performance.now() - started) / 1000;
      return { tokens_per_s: sampledTokens / stepSeconds, step_s: stepSeconds };
    };
    if (kept.length === 0) {
      // Every group had equal rewards even after refilling: nothing to learn from this step.
      const timing = throughput();
      return {
        metrics: () =>
          Promise.resolve({
            ...metrics,
            loss: 0,
            kl: 0,
            clip_ratio: 0,
            grad_norm: 0,
            reference_s: 0,
            train_s: 0,
            ...timing,
          }),
      };
    }

    // 3. The batch, its advantages and masks; an in-process reference starts at once.
    const completions = kept.flat();
    const batch = tokenBatch(completions);
    const advantages = groupAdvantages(
      completions.map((c) => c.rewards.total),
      G,
      cfg.scale_rewards,
    );
    const masks = completionMask(completions.map((c) => c.tokens), this.task.eosIds);
    let referenceSeconds = 0;
    // An in-process GPU reference leaves its log-probs on the GPU for the policy's loss; a
    // worker's parts were asked for round by round above.
    const refPromise: Promise<ReferenceLogprobs | null> = !reference
      ? Promise.resolve(null)
      : earlyReference
      ? Promise.all(referenceParts).then((parts) => parts.flat())
      : reference.heldLogprobs!(batch, invTemperature);
    // Awaited in the loss below; a failure meanwhile must wait for that await, not end the process.
    refPromise.catch(() => {});
    const referenceLogprobs = async () => {
      const waitStart = performance.now();
      const ref = await refPromise;
      referenceSeconds += (performance.now() - waitStart) / 1000;
      return ref;
    };

    // 4. The update: num_iterations passes over the batch, each in micro-batches. The loss
    // runs where the log-probs are (grpoGradients); each pass's sums and gradient norm come
    // with the read its optimizer step records, and nothing here waits for them.
    const trainStart = performance.now();
    const normalizer = lossNormalizer(this.lossConfig, masks);
    const passes: { gradNorm: PromiseLike<number>; sums: PromiseLike<LossSums>[] }[] = [];
    for (let iteration = 0; iteration < cfg.num_iterations; iteration++) {
      const pendingSums: PromiseLike<LossSums>[] = [];
      for (let start = 0; start < completions.length; start += cfg.micro_batch_size) {
        const end = Math.min(start + cfg.micro_batch_size, completions.length);
        const micro: TokenBatch = {
          rows: batch.rows.slice(start, end),
          promptLens: batch.promptLens.slice(start, end),
        };
        const { sums } = await grpoGradients(this.policy, micro, invTemperature, {
          rows: completions.slice(start, end).map((c, i) => ({
            // With one pass the sampling policy is the current one: ρ = 1 (trl's shortcut).
            oldLogp: cfg.num_iterations > 1 ? c.logprobs : null,
            mask: masks[start + i],
            advantage: advantages[start + i],
          })),
          refLogp: async () => (await referenceLogprobs())?.slice(start, end) ?? null,
          config: this.lossConfig,
          normalizer,
        });
        pendingSums.push(sums);
      }
      const gradNorm = this.policy.optimizerStep({
        lr: learningRateAt(cfg, step - 1),
        beta1: cfg.adam_beta1,
        beta2: cfg.adam_beta2,
        eps: cfg.adam_epsilon,
        weightDecay: cfg.weight_decay,
        maxGradNorm: cfg.max_grad_norm,
      });
      this.updated = true;
      passes.push({ gradNorm, sums: pendingSums });
    }
    // On a GPU engine these times cover recording and submitting the update; the GPU's work on
    // it that outlasts the recording counts in the next step's generate_s.
    const trainSeconds = (performance.now() - trainStart) / 1000 - referenceSeconds;
    const timing = { ...throughput(), reference_s: referenceSeconds, train_s: trainSeconds };
    // Every pass is checked; the metrics report the last one.
    const scalars = async () => {
      let loss = 0, klSum = 0, clipped = 0, tokens = 0, gradNorm = 0;
      for (const pass of passes) {
        gradNorm = await pass.gradNorm;
        const sums = await Promise.all(pass.sums);
        loss = sums.reduce((a, s) => a + s.loss, 0);
        klSum = sums.reduce((a, s) => a + s.klSum, 0);
        clipped = sums.reduce((a, s) => a + s.clippedTokens, 0);
        tokens = sums.reduce((a, s) => a + s.tokens, 0);
        checkFinite(loss, "the loss", step);
        checkFinite(gradNorm, "the gradient norm", step);
      }
      return {
        ...metrics,
        loss,
        kl: tokens ? klSum / tokens : 0,
        clip_ratio: tokens ? clipped / tokens : 0,
        grad_norm: gradNorm,
        ...timing,
      };
    };
    return { metrics: scalars };
  }

  /**
   * Generate G completions per example and score them; one group per example. The examples
   * are the step's prompts from position `first` on: their draws are those rows of the step's
   * random stream.
   */
  private async sample(examples: TaskExample[], seed: number, first: number): Promise<Scored[][]> {
    const cfg = this.cfg, G = cfg.num_generations;
    const out = await this.policy.generate(examples.map((e) => e.promptIds), G, {
      temperature: cfg.temperature,
      topP: cfg.top_p,
      topK: cfg.top_k,
      maxNewTokens: cfg.max_completion_length,
      eosIds: this.task.eosIds,
      seed,
      firstRow: first * G,
    });
    // Every reward function scores the whole batch at once (a user's async ones concurrently).
    // They cannot overlap the next generation: which groups are kept, and so whether more
    // prompts must be sampled, depends on these scores, and the next step samples from weights
    // that this step's advantages update.
    const texts = out.tokens.map((tokens) => this.task.decode(tokens));
    const { scores, errors } = await scoreBatch(
      this.task.rewards,
      texts.map((completion, i) => {
        const example = examples[Math.floor(i / G)];
        return { prompt: example.prompt, completion, example };
      }),
      cfg.reward_errors,
    );
    return examples.map((example, g) =>
      Array.from({ length: G }, (_, j) => {
        const i = g * G + j;
        return {
          example,
          tokens: out.tokens[i],
          logprobs: out.logprobs[i],
          text: texts[i],
          rewards: scores[i],
          rewardErrors: errors[i],
          truncated: out.truncated[i],
        };
      })
    );
  }

  /** Reward, accuracy and format statistics of a set of sampled completions. */
  private sampleMetrics(scored: Scored[]): Metrics {
    const n = Math.max(1, scored.length), G = this.cfg.num_generations;
    const mean = (f: (s: Scored) => number) => scored.reduce((a, s) => a + f(s), 0) / n;
    const metrics: Metrics = {
      reward: mean((s) => s.rewards.total),
      reward_std: groupStdMean(scored.map((s) => s.rewards.total), G),
      accuracy: mean((s) => Number(this.task.isCorrect(s.text, s.example))),
      format_rate: mean((s) => Number(this.task.isFormatted(s.text, s.example) && !s.truncated)),
      completion_length: mean((s) => s.tokens.length),
      truncated_rate: mean((s) => Number(s.truncated)),
      reflection_rate: mean((s) => Number(this.reflects(s.text))),
    };
    for (const { name } of this.task.rewards) {
      metrics[`rewards/${name}`] = mean((s) => s.rewards[name]);
    }
    return metrics;
  }

  /** The best and worst completion of the first group, and the latest reflective one. */
  private pickSamples(scored: Scored[]): Record<string, unknown>[] {
    const group = scored.slice(0, this.cfg.num_generations);
    const sorted = [...group].sort((a, b) => b.rewards.total - a.rewards.total);
    const picks = [sorted[0], sorted.at(-1)!];
    const reflective = scored.find((s) => this.reflects(s.text));
    if (reflective) picks.push(reflective);
    return picks.map((s) => ({
      prompt: s.example.prompt,
      completion: s.text,
      answer: s.example.answer,
      rewards: s.rewards,
      truncated: s.truncated,
      reflective: this.reflects(s.text),
    }));
  }
}

/** A group's completions, longest first; equal lengths keep their order (a stable sort). */
function longestFirst(group: Scored[]): Scored[] {
  return [...group].sort((a, b) => b.tokens.length - a.tokens.length);
}

/** The mean over groups of each group's (unbiased) reward standard deviation. */
function groupStdMean(rewards: number[], G: number): number {
  let total = 0, groups = 0;
  for (let g = 0; g + G <= rewards.length; g += G) {
    const r = rewards.slice(g, g + G);
    const mean = r.reduce((a, b) => a + b, 0) / G;
    total += Math.sqrt(r.reduce((a, b) => a + (b - mean) ** 2, 0) / Math.max(1, G - 1));
    groups++;
  }
  return groups ? total / groups : 0;
}
