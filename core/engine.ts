// The small interfaces the training loop talks to. core/ never touches the GPU: the trainer is
// handed a policy engine (sampling, log-probs, gradients, optimizer) and a reference engine
// (frozen log-probs), so the same loop runs on the WebGPU model or on test doubles.

import {
  grpoLoss,
  type GrpoLossConfig,
  type LossNormalizer,
  type LossRow,
  type LossSums,
} from "./grpo.ts";

/** Rows of prompt + completion tokens; completion token t of row b sits at promptLens[b] + t. */
export interface TokenBatch {
  rows: number[][];
  promptLens: number[];
}

export interface SamplingOptions {
  temperature: number; // 0 = greedy
  topP: number; // 1 = off
  topK: number; // 0 = off
  maxNewTokens: number;
  eosIds: number[];
  seed: number; // the random stream; use a different one per call
  /**
   * Row b draws as row firstRow + b of the seed's stream (default 0): a batch sampled in
   * several calls, each told its first row, draws what one call would.
   */
  firstRow?: number;
}

export interface Completions {
  /** Row g·G + j is sample j of prompt g: its tokens up to and including the first end token. */
  tokens: number[][];
  /** log p of each sampled token under softmax(logits / temperature) (greedy: temperature 1). */
  logprobs: number[][];
  /** True where no end token came within maxNewTokens. */
  truncated: boolean[];
}

export interface OptimizerHyper {
  lr: number;
  beta1: number;
  beta2: number;
  eps: number;
  weightDecay: number;
  maxGradNorm: number;
}

export interface PolicyEngine {
  readonly description: string;
  generate(prompts: number[][], groupSize: number, opts: SamplingOptions): Promise<Completions>;
  /** log p of every completion token (one row per batch row), logits divided by the temperature. */
  completionLogprobs(batch: TokenBatch, invTemperature: number): Promise<number[][]>;
  /**
   * Forward, then backward of a loss the caller computes on the CPU: `loss` receives the
   * completion log-probs and returns d(loss)/d(logp) in the same shape (asynchronously: it may
   * wait for the reference engine while the policy's forward has already run). Gradients
   * accumulate.
   */
  accumulateGradients(
    batch: TokenBatch,
    invTemperature: number,
    loss: (logprobs: number[][]) => Promise<number[][]>,
  ): Promise<void>;
  /**
   * Forward, the GRPO loss (core/grpo.ts) and backward of one micro-batch, the loss computed
   * where the log-probs are (an engine without this method gets the CPU loss through
   * accumulateGradients: see `grpoGradients`). Resolves once the backward is under way, to the
   * loss's sums to come (wrapped, so that awaiting this does not wait for them), which a GPU
   * engine delivers with the next optimizerStep's read.
   */
  accumulateGrpoGradients?(
    batch: TokenBatch,
    invTemperature: number,
    loss: GrpoLossInputs,
  ): Promise<{ sums: PromiseLike<LossSums> }>;
  /**
   * Clip by global norm, AdamW, zero the gradients. Resolves to the norm before clipping; a
   * caller that does not need it now may await it later (a GPU engine then need not wait).
   */
  optimizerStep(hp: OptimizerHyper): PromiseLike<number>;
  /**
   * optimizerStep with nothing read back (no GPU round trip at all): the norm stays unknown and
   * the loss sums recorded so far arrive with the next optimizerStep's read. Optional: without
   * it a caller uses optimizerStep and leaves the result unawaited.
   */
  optimizerStepUnread?(hp: OptimizerHyper): void;
  weights(): Promise<Map<string, Float32Array>>;
  loadOptimizerState(state: { step: number; moments: ReadonlyMap<string, Float32Array> }): void;
}

/**
 * Completion log-probs left where they were computed: an in-process reference on the policy's
 * GPU. A policy on that device uses them there (no GPU→CPU wait); anything else reads them.
 */
export interface HeldLogprobs {
  /** Rows [start, end), still held. */
  slice(start: number, end: number): HeldLogprobs;
  /** The values on the CPU, one row per batch row (a GPU engine waits for them). */
  read(): Promise<number[][]>;
}

/** The reference's log-probs of a micro-batch's rows, on the CPU or held where they were made. */
export type ReferenceLogprobs = number[][] | HeldLogprobs;

/** ReferenceLogprobs on the CPU. */
export async function onCpu(ref: ReferenceLogprobs): Promise<number[][]> {
  return Array.isArray(ref) ? ref : await ref.read();
}

/** What the GRPO loss of a micro-batch needs besides the policy's own log-probs. */
export interface GrpoLossInputs {
  /** Per row: the sampler's log-probs (or null), the completion mask, the advantage. */
  rows: Omit<LossRow, "logp" | "refLogp">[];
  /** The reference's log-probs of these rows (null: no KL), asked for once the forward runs. */
  refLogp: () => Promise<ReferenceLogprobs | null>;
  config: GrpoLossConfig;
  normalizer: LossNormalizer;
}

export interface ReferenceEngine {
  readonly description: string;
  completionLogprobs(batch: TokenBatch, invTemperature: number): Promise<number[][]>;
  /**
   * completionLogprobs with the result left where it is computed (an in-process GPU reference):
   * the trainer asks for this when the engine has it, and the policy reads them only if it must.
   */
  heldLogprobs?(batch: TokenBatch, invTemperature: number): Promise<HeldLogprobs>;
  /** reference ← α·policy + (1−α)·reference (trl's sync_ref_model). */
  mixIn(policy: Map<string, Float32Array>, alpha: number): Promise<void>;
  close(): Promise<void>;
}

/**
 * One micro-batch's forward, GRPO loss and backward: on the policy's own device when it has
 * accumulateGrpoGradients, else with grpoLoss on the CPU between accumulateGradients' forward
 * and backward. Resolves once the backward is recorded, to the loss's sums (which a GPU engine
 * delivers with the optimizer step's read).
 */
export async function grpoGradients(
  policy: PolicyEngine,
  batch: TokenBatch,
  invTemperature: number,
  loss: GrpoLossInputs,
): Promise<{ sums: PromiseLike<LossSums> }> {
  if (policy.accumulateGrpoGradients) {
    return await policy.accumulateGrpoGradients(batch, invTemperature, loss);
  }
  let sums: LossSums = { loss: 0, klSum: 0, clippedTokens: 0, tokens: 0, logpSum: 0 };
  await policy.accumulateGradients(batch, invTemperature, async (logprobs) => {
    const held = await loss.refLogp();
    const ref = held && await onCpu(held);
    const rows: LossRow[] = logprobs.map((logp, i) => ({
      ...loss.rows[i],
      logp,
      refLogp: ref ? ref[i] : null,
    }));
    const { dLogp, ...rest } = grpoLoss(rows, loss.config, loss.normalizer);
    sums = rest;
    return dLogp;
  });
  return { sums: Promise.resolve(sums) };
}
