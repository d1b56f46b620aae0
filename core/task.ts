// What the trainer needs from a task: prompts as token ids, a way to read completions back as
// text, reward functions, and the two yes/no judgements the metrics report (is the answer
// right, is the format right). The built-in arithmetic task and file datasets (GSM8K) both
// provide one (data/tasks.ts).

import type { WeightedReward } from "./rewards.ts";

export interface TaskExample {
  /** The prompt as the model sees it (chat template applied). */
  prompt: string;
  promptIds: number[];
  /** Ground truth, as the reward functions read it. */
  answer: string;
  [field: string]: unknown;
}

export interface Task {
  readonly name: string;
  readonly eosIds: number[];
  readonly rewards: WeightedReward[];
  /** Held-out examples for greedy evaluation; never drawn for training. */
  readonly heldOut: TaskExample[];
  /** The next `n` training examples (seeded shuffle, epoch by epoch). */
  nextExamples(n: number): TaskExample[];
  /** Where the training stream is, for checkpoints, and how to continue from there. */
  samplerState(): SamplerState;
  restoreSampler(state: SamplerState): void;
  /** Completion tokens as text (end token dropped). */
  decode(ids: number[]): string;
  isCorrect(completion: string, example: TaskExample): boolean;
  isFormatted(completion: string, example: TaskExample): boolean;
}

/** Where an EpochSampler is, for checkpoints: resuming from it continues the same order. */
export interface SamplerState {
  epoch: number;
  position: number;
  rng: string; // Rng state at the start of this epoch's shuffle
}
