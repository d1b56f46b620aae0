// The small interfaces the training loop talks to. core/ never touches the GPU: the trainer is
// handed a policy engine (sampling, log-probs, gradients, optimizer) and a reference engine
// (frozen log-probs), so the same loop runs on the WebGPU model or on test doubles.

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
   * Clip by global norm, AdamW, zero the gradients. Resolves to the norm before clipping; a
   * caller that does not need it now may await it later (a GPU engine then need not wait).
   */
  optimizerStep(hp: OptimizerHyper): PromiseLike<number>;
  weights(): Promise<Map<string, Float32Array>>;
  optimizerState(): Promise<{ step: number; moments: Map<string, Float32Array> }>;
  loadOptimizerState(state: { step: number; moments: Map<string, Float32Array> }): void;
}

export interface ReferenceEngine {
  readonly description: string;
  completionLogprobs(batch: TokenBatch, invTemperature: number): Promise<number[][]>;
  /** reference ← α·policy + (1−α)·reference (trl's sync_ref_model). */
  mixIn(policy: Map<string, Float32Array>, alpha: number): Promise<void>;
  close(): Promise<void>;
}
