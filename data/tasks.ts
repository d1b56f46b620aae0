// The Task (core/task.ts) a training config describes: the built-in arithmetic task, or a
// question/answer dataset rendered through a Hugging Face tokenizer and chat template.

import type { SamplerState, Task, TaskExample } from "../core/task.ts";
import type { TrainConfig } from "../core/train_config.ts";
import { EpochSampler, type Example, loadDataset, splitHeldOut } from "./dataset.ts";
import {
  arithCorrect,
  arithFormat,
  ARITHMETIC_REWARDS,
  ArithmeticTokenizer,
  splitProblems,
} from "./arithmetic.ts";
import { AhaError } from "../core/errors.ts";
import {
  type BatchRewardFunction,
  correctnessReward,
  DEFAULT_SYSTEM_PROMPT,
  formatReward,
  isRewardModule,
  loadRewardModule,
  REWARD_FUNCTIONS,
  type RewardFunction,
  rewardModuleName,
  type WeightedReward,
} from "../core/rewards.ts";
import { loadTokenizer, type TextTokenizer } from "../core/tokenizer.ts";

/** Marks a checkpoint whose tokenizer is the arithmetic task's character tokenizer. */
export const ARITHMETIC_TOKENIZER_FILE = "aha_tokenizer.json";

/**
 * Reward functions by name from `registry`, or from the user's modules (`file.ts#export`:
 * `modules` holds them once loaded by loadRewardModules, else each loads on first use), weighted
 * as the config says.
 */
export function configRewards(
  cfg: TrainConfig,
  registry: Record<string, RewardFunction>,
  modules: Map<string, BatchRewardFunction> = new Map(),
): WeightedReward[] {
  return cfg.reward_funcs.map((name, i) => {
    const weight = cfg.reward_weights?.[i] ?? 1;
    if (isRewardModule(name)) {
      let loaded = modules.get(name);
      const batch: BatchRewardFunction = async (rows) => {
        loaded ??= await loadRewardModule(name);
        return await loaded(rows);
      };
      return { name: rewardModuleName(name), batch, source: name, weight };
    }
    const fn = registry[name];
    if (!fn) {
      throw new AhaError(
        `reward_funcs: unknown reward function "${name}" for this task (known: ${
          Object.keys(registry).join(", ")
        })`,
      );
    }
    return { name, fn, weight };
  });
}

/** The user's reward modules of a config, imported now so a bad one stops before any work. */
export async function loadRewardModules(
  cfg: TrainConfig,
): Promise<Map<string, BatchRewardFunction>> {
  const modules = new Map<string, BatchRewardFunction>();
  for (const name of cfg.reward_funcs.filter(isRewardModule)) {
    modules.set(name, await loadRewardModule(name));
  }
  return modules;
}

/**
 * The task a training config describes, with the user's reward modules imported first (a bad
 * one stops before any work): the built-in arithmetic task, or the dataset rendered through the
 * model's tokenizer (cfg.model must be a directory by now: resolve Hub ids first).
 */
export async function configTask(
  cfg: TrainConfig,
  warn: (message: string) => void = console.warn,
): Promise<Task> {
  const modules = await loadRewardModules(cfg);
  if (cfg.dataset.format === "arithmetic") return arithmeticTask(cfg, modules);
  const isDir = cfg.model !== null &&
    await Deno.stat(cfg.model).then((s) => s.isDirectory, () => false);
  if (!isDir) {
    throw new AhaError(
      `model: "${cfg.model}" is not a directory: a ${cfg.dataset.format} dataset needs a ` +
        "Hugging Face model directory (config.json, weights, tokenizer files) or a Hub id",
    );
  }
  return await datasetTask(cfg, await loadTokenizer(cfg.model!), warn, modules);
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
export function arithmeticTask(
  cfg: TrainConfig,
  modules?: Map<string, BatchRewardFunction>,
): Task & { tokenizer: ArithmeticTokenizer } {
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
    configRewards(cfg, ARITHMETIC_REWARDS, modules),
    train.map(toExample),
    heldOut.map(toExample),
    cfg.seed,
    (ids) => tokenizer.decode(ids), // keeps "<end>": the rewards read it
    (text, example) => arithCorrect(example.prompt, text, example) > 0,
    (text, example) => arithFormat(example.prompt, text) > 0,
  );
  return Object.assign(task, { tokenizer });
}

/** More characters than any one token of a real vocabulary spans. */
const MAX_CHARS_PER_TOKEN = 256;

/**
 * A question/answer dataset (the config's `dataset` section) for a Hugging Face model: each
 * question becomes the user message after the system prompt (system_prompt, else the seed's;
 * "" for none), rendered through the model's chat template up to the assistant's reply.
 *
 * Prompts are encoded when first drawn, then cached: encoding all of GSM8K up front takes
 * ~15 s. A prompt longer than max_prompt_length is skipped, never truncated (a cut question is
 * another question): the first skip is reported through `warn`, and a dataset whose prompts are
 * all too long is an error. Held-out examples come from dataset.eval_path, else a seeded
 * eval_fraction of the rows; `heldOut` holds the first eval_prompts of them that fit.
 */
export async function datasetTask(
  cfg: TrainConfig,
  tokenizer: TextTokenizer,
  warn: (message: string) => void = console.warn,
  modules?: Map<string, BatchRewardFunction>,
): Promise<Task> {
  const { path, eval_path: evalPath } = cfg.dataset;
  if (path === null) {
    throw new AhaError(`dataset.path: required for a ${cfg.dataset.format} dataset`);
  }
  const template = tokenizer.chatTemplate;
  if (template === null) {
    throw new AhaError(
      `${cfg.model}: the tokenizer has no chat template (tokenizer_config.json "chat_template")`,
    );
  }
  const load = (file: string, split = cfg.dataset.split) =>
    loadDataset({
      path: file,
      hub: { config: cfg.dataset.config, split },
      // The file name's ending says the format, else dataset.format does.
      format: /\.(jsonl|parquet)$/.test(file) || cfg.dataset.format === "arithmetic"
        ? undefined
        : cfg.dataset.format,
      question_field: cfg.dataset.question_field,
      answer_field: cfg.dataset.answer_field,
      answer_extractor: cfg.dataset.answer_extractor,
    }, warn);
  const rows = await load(path);
  const { train, heldOut } = evalPath !== null
    ? { train: rows, heldOut: await load(evalPath) }
    : cfg.dataset.eval_split !== null
    ? { train: rows, heldOut: await load(path, cfg.dataset.eval_split) }
    : splitHeldOut(rows, cfg.dataset.eval_fraction, cfg.seed);

  const system = cfg.system_prompt ?? DEFAULT_SYSTEM_PROMPT;
  const encoded = new Map<Example, TaskExample | null>(); // null: the prompt is too long
  let warned = false;
  const prepare = (row: Example): TaskExample | null => {
    if (encoded.has(row)) return encoded.get(row)!;
    const prompt = template.prompt(row.question, system === "" ? undefined : system);
    // Measured before it is tokenized whole: no token spans MAX_CHARS_PER_TOKEN characters, so a
    // longer text cannot fit (a 50 MB line would otherwise exhaust the tokenizer's memory).
    const measurable = prompt.length <= cfg.max_prompt_length * MAX_CHARS_PER_TOKEN;
    const promptIds = measurable ? tokenizer.encode(prompt) : [];
    const fits = measurable && promptIds.length <= cfg.max_prompt_length;
    if (!fits && !warned) {
      warned = true;
      const start = JSON.stringify(row.question.slice(0, 50) + "…");
      const size = measurable ? `${promptIds.length} tokens` : `${prompt.length} characters`;
      warn(
        `${path}: skipping prompts longer than max_prompt_length (${cfg.max_prompt_length} ` +
          `tokens); the first has ${size}: ${start}`,
      );
    }
    const example = fits ? { ...row, prompt, promptIds } : null;
    encoded.set(row, example);
    return example;
  };

  const evaluation: TaskExample[] = [];
  for (const row of heldOut) {
    if (evaluation.length === cfg.eval_prompts) break;
    const example = prepare(row);
    if (example) evaluation.push(example);
  }
  // Qwen2.5 base checkpoints end generation only at <|endoftext|>, while the chat template ends
  // the assistant's turn with <|im_end|>: stop at either.
  const turnEnd = tokenizer.tokenToId("<|im_end|>");
  const eosIds = [...new Set([...tokenizer.eosIds, ...(turnEnd === undefined ? [] : [turnEnd])])];
  return new DatasetTask(
    path,
    eosIds,
    configRewards(cfg, REWARD_FUNCTIONS, modules),
    train,
    evaluation,
    cfg.seed,
    prepare,
    (ids) => tokenizer.decode(ids, true),
  );
}

/** Draws dataset rows in seeded epochs, passing over rows whose prompt does not fit. */
class DatasetTask implements Task {
  private sampler: EpochSampler<Example>;
  private readonly tooLong = new Set<Example>();

  constructor(
    readonly name: string,
    readonly eosIds: number[],
    readonly rewards: WeightedReward[],
    private readonly train: Example[],
    readonly heldOut: TaskExample[],
    seed: number,
    private readonly prepare: (row: Example) => TaskExample | null,
    readonly decode: (ids: number[]) => string,
  ) {
    this.sampler = new EpochSampler(train, seed);
  }

  nextExamples(n: number): TaskExample[] {
    const out: TaskExample[] = [];
    while (out.length < n) {
      const [row] = this.sampler.take(1);
      const example = this.prepare(row);
      if (example) out.push(example);
      else if (this.tooLong.add(row).size === this.train.length) {
        throw new AhaError(`${this.name}: every prompt is longer than max_prompt_length`);
      }
    }
    return out;
  }

  samplerState(): SamplerState {
    return this.sampler.save();
  }

  restoreSampler(state: SamplerState): void {
    this.sampler = new EpochSampler(this.train, state);
  }

  isCorrect(completion: string, example: TaskExample): boolean {
    return correctnessReward(example.prompt, completion, example) > 0;
  }

  isFormatted(completion: string, example: TaskExample): boolean {
    return formatReward(example.prompt, completion) > 0;
  }
}

/** Tokenizer files of a model directory (those it has), copied into checkpoints beside weights. */
export async function tokenizerFiles(dir: string): Promise<Record<string, Uint8Array>> {
  const files: Record<string, Uint8Array> = {};
  const names = [
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
    "special_tokens_map.json",
    ARITHMETIC_TOKENIZER_FILE,
  ];
  for (const name of names) {
    try {
      files[name] = await Deno.readFile(`${dir}/${name}`);
    } catch {
      // not every model has every file
    }
  }
  return files;
}
