// The Task (core/task.ts) a training config describes: the built-in arithmetic task, or a
// question/answer dataset rendered through a Hugging Face tokenizer and chat template.

import type { Task, TaskExample } from "../core/task.ts";
import type { TrainConfig } from "../core/train_config.ts";
import { type SamplerState, EpochSampler } from "./dataset.ts";
import {
  ARITHMETIC_REWARDS,
  ArithmeticTokenizer,
  arithCorrect,
  arithFormat,
  splitProblems,
} from "./arithmetic.ts";
import { AhaError } from "../core/errors.ts";
import type { WeightedReward } from "../core/rewards.ts";

/** Marks a checkpoint whose tokenizer is the arithmetic task's character tokenizer. */
export const ARITHMETIC_TOKENIZER_FILE = "aha_tokenizer.json";

/** Reward functions by name from `registry`, weighted as the config says. */
export function configRewards(
  cfg: TrainConfig,
  registry: Record<string, WeightedReward["fn"]>,
): WeightedReward[] {
  return cfg.reward_funcs.map((name, i) => {
    const fn = registry[name];
    if (!fn) {
      throw new AhaError(
        `reward_funcs: unknown reward function "${name}" for this task (known: ${Object.keys(registry).join(", ")})`,
      );
    }
    return { name, fn, weight: cfg.reward_weights?.[i] ?? 1 };
  });
}

/** A task over fixed example lists, drawing training examples in seeded epochs. */
class ExampleTask implements Task {
  private sampler: EpochSampler<TaskExample>;

  constructor(
    readonly name: string,
    readonly eosIds: number[],
    readonly rewards: WeightedReward[],
    private readonly train: TaskExample[],
    readonly heldOut: TaskExample[],
    seed: number,
    readonly decode: (ids: number[]) => string,
    readonly isCorrect: (completion: string, example: TaskExample) => boolean,
    readonly isFormatted: (completion: string, example: TaskExample) => boolean,
  ) {
    this.sampler = new EpochSampler(train, seed);
  }

  nextExamples(n: number): TaskExample[] {
    return this.sampler.take(n);
  }

  samplerState(): SamplerState {
    return this.sampler.save();
  }

  restoreSampler(state: SamplerState): void {
    this.sampler = new EpochSampler(this.train, state);
  }
}

/** The built-in task: "17+25=" → "42<end>", on a character-level tokenizer. */
export function arithmeticTask(cfg: TrainConfig): Task & { tokenizer: ArithmeticTokenizer } {
  const tokenizer = new ArithmeticTokenizer();
  const { train, heldOut } = splitProblems(cfg.arithmetic);
  const toExample = (p: { question: string; answer: string }): TaskExample => ({
    ...p,
    prompt: p.question,
    promptIds: tokenizer.encode(p.question),
  });
  const task = new ExampleTask(
    "arithmetic",
    tokenizer.eosIds,
    configRewards(cfg, ARITHMETIC_REWARDS),
    train.map(toExample),
    heldOut.map(toExample),
    cfg.seed,
    (ids) => tokenizer.decode(ids), // keeps "<end>": the rewards read it
    (text, example) => arithCorrect(example.prompt, text, example) > 0,
    (text, example) => arithFormat(example.prompt, text) > 0,
  );
  return Object.assign(task, { tokenizer });
}
