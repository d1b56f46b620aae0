// The training configuration of `aha train`: its schema with defaults (the embedded arithmetic
// run), loading from YAML plus `--set key=value` overrides, validation of every key before any
// work starts, and the learning-rate schedule.
//
// Fields are snake_case, exactly as written in the YAML file, and named as in trl's GRPOConfig
// where the concept is the same. Nested sections (dataset, arithmetic, sft, lora, reference) are set
// from the command line with dotted keys: `--set dataset.path=train.jsonl`. Every problem is one
// line naming the source (the file or the --set argument), the key and what was expected.

import YAML from "yaml";
import { AhaError } from "./errors.ts";
import type { LossType } from "./grpo.ts";
import { anchorRewardModules, DEFAULT_REFLECTION_PHRASES, DEFAULT_REWARDS } from "./rewards.ts";

export type SchedulerType = "constant" | "constant_with_warmup" | "linear" | "cosine";

export interface TrainConfig {
  /** A Hugging Face model directory, or null for the built-in tiny model (arithmetic only). */
  model: string | null;
  output_dir: string;
  seed: number;

  // Sampling: prompts_per_step prompts × num_generations completions each per step.
  prompts_per_step: number;
  num_generations: number;
  max_prompt_length: number;
  max_completion_length: number;
  temperature: number;
  top_p: number;
  /** 0 = no top-k filtering. */
  top_k: number;

  // The objective (core/grpo.ts).
  beta: number;
  epsilon: number;
  /** null = epsilon (a symmetric clip range). */
  epsilon_high: number | null;
  num_iterations: number;
  loss_type: LossType;
  scale_rewards: boolean;
  reward_funcs: string[];
  /** null = weight 1 for every reward function. */
  reward_weights: number[] | null;
  /** How many times a step may draw fresh prompts to replace groups whose rewards are equal. */
  max_refill_rounds: number;
  /**
   * Prompts sampled together in one generation call. A step samples its prompts in calls of
   * this many, ahead of what its refill rounds turn out to need, and the prompts it leaves unused
   * go back to the data stream: more saves calls and costs rows and memory (deno task plan
   * counts them); which groups a step keeps does not depend on it. null: 3 × prompts_per_step
   * for the built-in model, prompts_per_step for a checkpoint (core/plan.ts generationPrompts).
   */
  prompts_per_generation: number | null;

  // Optimisation: AdamW with gradient clipping, in micro-batches of completions.
  learning_rate: number;
  lr_scheduler_type: SchedulerType;
  warmup_steps: number;
  max_steps: number;
  /** 0 = no clipping. */
  max_grad_norm: number;
  weight_decay: number;
  adam_beta1: number;
  adam_beta2: number;
  adam_epsilon: number;
  /** Completions per forward/backward micro-batch (gradient accumulation over the step). */
  micro_batch_size: number;

  // The reference model: frozen, or pulled toward the policy every ref_model_sync_steps
  // (ref ← α·policy + (1 − α)·ref) when sync_ref_model.
  sync_ref_model: boolean;
  ref_model_sync_steps: number;
  ref_model_mixup_alpha: number;

  // Logging, evaluation, checkpoints. A 0 for save_steps, eval_steps or sample_steps means only
  // at the end (save, eval) or never (samples).
  logging_steps: number;
  save_steps: number;
  /** How many checkpoint-N directories the run keeps (trl's key): after each save, the oldest
   * beyond it are removed. null keeps every one. */
  save_total_limit: number | null;
  eval_steps: number;
  sample_steps: number;
  /** How many held-out prompts a greedy evaluation uses; null: all of them when there are at
   * most EVAL_ALL_LIMIT (core/evaluate.ts), else the first EVAL_ALL_LIMIT (stated in the log). */
  eval_prompts: number | null;
  /** Besides the greedy completion, this many samples per evaluation prompt (at `temperature`)
   * for pass@k and the mean reward; 0: greedy only. */
  eval_num_samples: number;
  /** A user reward function that throws or returns a bad value: stop (fail) or score 0 (skip). */
  reward_errors: "fail" | "skip";
  /** Where metrics go besides metrics.jsonl (trl's key): "tensorboard" writes event files. */
  report_to: "tensorboard"[];

  dataset: {
    /** JSONL or Parquet file of examples; null for the built-in arithmetic task. */
    path: string | null;
    format: "jsonl" | "parquet" | "arithmetic";
    question_field: string;
    answer_field: string;
    /** How the ground truth is read from answer_field: GSM8K's "#### 42", the last number, a LaTeX \boxed{}, or the whole field. */
    answer_extractor: "gsm8k" | "last_number" | "boxed" | "none";
    /** Held-out examples from their own file, else the last eval_fraction of the dataset. */
    eval_path: string | null;
    eval_fraction: number;
    /** When `path` is a Hub dataset id (ORG/NAME): its config, its training split, and the
     * split held-out examples come from (null: eval_path, else eval_fraction of the rows). */
    config: string;
    split: string;
    eval_split: string | null;
  };
  system_prompt: string | null;
  /** Phrases whose appearance in completions is logged as the reflection rate ("aha moment"). */
  reflection_phrases: string[];

  // The built-in arithmetic task (data/arithmetic.ts): sums a+b with 0 ≤ a, b ≤ max_operand.
  arithmetic: {
    max_operand: number;
    /** Problems held out of pretraining and RL, for evaluation. */
    held_out: number;
    /** Rows of the imperfect pretraining corpus. */
    corpus_size: number;
    /** Share of rows with a carry whose answer drops the carries. */
    carry_error_rate: number;
    /** Share of rows whose answer is in a non-canonical format. */
    format_error_rate: number;
  };

  // Supervised cold start before GRPO (for the built-in model; steps 0 skips it).
  sft: {
    steps: number;
    learning_rate: number;
    batch_size: number;
  };

  // LoRA (PEFT semantics): null = full fine-tuning. With a section, only the adapters' A and B
  // matrices are trained; the base weights are frozen and the reference model is the base.
  lora: LoraConfig | null;
  /** An existing PEFT adapter directory to continue training (LoRA runs only). */
  adapter: string | null;
  /** How frozen weights are stored on the GPU; "auto" = the checkpoint's own dtype. */
  frozen_dtype: "auto" | "bf16" | "f16" | "f32";
  /** Keep only each layer's input in the training forward; recompute the layer in backward. */
  gradient_checkpointing: boolean;
  /** The generation KV cache's storage type. */
  kv_cache_dtype: "f32" | "bf16" | "f16";

  // The reference model's sibling process.
  reference: {
    adapter: "auto" | "same" | "vulkan" | "gl" | "metal" | "dx12";
    /** "auto": see referenceEngine. */
    engine: "auto" | "webgpu" | "onnx";
    /** Extra environment variables of the reference process. */
    env: Record<string, string>;
    timeout_s: number;
    /** An ONNX export of the reference model; null = export the checkpoint when needed. */
    onnx: string | null;
    max_restarts: number;
  };
}

/** The projections a LoRA adapter may target, as PEFT names them; "all-linear" is all seven. */
export const LORA_TARGETS = [
  "q_proj",
  "k_proj",
  "v_proj",
  "o_proj",
  "gate_proj",
  "up_proj",
  "down_proj",
] as const;
export type LoraTarget = typeof LORA_TARGETS[number];

export interface LoraConfig {
  r: number;
  /** PEFT's lora_alpha; the update is scaled by alpha / r (alpha / √r with use_rslora). */
  alpha: number;
  /** Projection names ("all-linear" in the file is stored as all seven). */
  target_modules: LoraTarget[];
  use_rslora: boolean;
  /** Only 0 is implemented. */
  dropout: number;
}

/** A LoRA section's defaults, used when a config names any lora key (trl's r 16 / alpha 32). */
export function defaultLoraConfig(): LoraConfig {
  return { r: 16, alpha: 32, target_modules: [...LORA_TARGETS], use_rslora: false, dropout: 0 };
}

/** The embedded default: R1-zero in miniature on the built-in arithmetic task. */
export function defaultTrainConfig(): TrainConfig {
  return {
    model: null,
    output_dir: "runs/arithmetic",
    seed: 42,
    prompts_per_step: 16,
    num_generations: 8,
    max_prompt_length: 16,
    max_completion_length: 4,
    temperature: 1.0,
    top_p: 1.0,
    top_k: 0,
    beta: 0.04,
    epsilon: 0.2,
    epsilon_high: null,
    num_iterations: 1,
    loss_type: "grpo",
    scale_rewards: true,
    reward_funcs: ["arith_correct", "arith_format"],
    reward_weights: null,
    max_refill_rounds: 2,
    prompts_per_generation: null,
    learning_rate: 1.5e-3,
    lr_scheduler_type: "linear",
    warmup_steps: 20,
    max_steps: 400,
    max_grad_norm: 1.0,
    weight_decay: 0.0,
    adam_beta1: 0.9,
    adam_beta2: 0.99,
    adam_epsilon: 1e-8,
    micro_batch_size: 128,
    sync_ref_model: false,
    ref_model_sync_steps: 512,
    ref_model_mixup_alpha: 0.6,
    logging_steps: 1,
    save_steps: 0,
    save_total_limit: null,
    eval_steps: 50,
    sample_steps: 50,
    eval_prompts: null,
    eval_num_samples: 0,
    reward_errors: "fail",
    report_to: [],
    dataset: {
      path: null,
      format: "arithmetic",
      question_field: "question",
      answer_field: "answer",
      answer_extractor: "gsm8k",
      eval_path: null,
      eval_fraction: 0.05,
      config: "default",
      split: "train",
      eval_split: null,
    },
    system_prompt: null,
    reflection_phrases: [...DEFAULT_REFLECTION_PHRASES],
    arithmetic: {
      max_operand: 29,
      held_out: 100,
      corpus_size: 20000,
      carry_error_rate: 0.6,
      format_error_rate: 0.25,
    },
    sft: { steps: 1000, learning_rate: 5e-3, batch_size: 128 },
    lora: null,
    adapter: null,
    frozen_dtype: "auto",
    gradient_checkpointing: false,
    kv_cache_dtype: "f32",
    reference: {
      adapter: "auto",
      engine: "auto",
      env: {},
      timeout_s: 120,
      onnx: null,
      max_restarts: 3,
    },
  };
}

// ---------------------------------------------------------------------------------------------
// The schema: one rule per key (dotted for sections), saying what a value must be.

interface Rule {
  expect: string;
  accepts: (v: unknown) => boolean;
  /** Turns an accepted value into the stored one (default: as is). */
  convert?: (v: unknown) => unknown;
}

const isNumber = (v: unknown): v is number => typeof v === "number" && Number.isFinite(v);

function int(min: number, max = Infinity): Rule {
  const range = max === Infinity ? `≥ ${min}` : `in [${min}, ${max}]`;
  return {
    expect: `an integer ${range}`,
    accepts: (v) => Number.isSafeInteger(v) && (v as number) >= min && (v as number) <= max,
  };
}

/** A number in a range; "(" and ")" mark open ends: num("(", 0, 1, "]") is 0 < x ≤ 1. */
function num(open: "[" | "(", min: number, max = Infinity, close: "]" | ")" = ")"): Rule {
  const expect = max === Infinity
    ? `a number ${open === "(" ? ">" : "≥"} ${min}`
    : `a number in ${open}${min}, ${max}${close}`;
  return {
    expect,
    accepts: (v) =>
      isNumber(v) && (open === "(" ? v > min : v >= min) && (close === ")" ? v < max : v <= max),
  };
}

const bool: Rule = { expect: "true or false", accepts: (v) => typeof v === "boolean" };
const str: Rule = {
  expect: "a non-empty string",
  accepts: (v) => typeof v === "string" && v !== "",
};
const strings: Rule = {
  expect: "a list of strings",
  accepts: (v) => Array.isArray(v) && v.every((s) => typeof s === "string"),
};

function oneOf(...values: string[]): Rule {
  return { expect: `one of ${values.join(" | ")}`, accepts: (v) => values.includes(v as string) };
}

function orNull(rule: Rule): Rule {
  return {
    ...rule,
    expect: `${rule.expect} or null`,
    accepts: (v) => v === null || rule.accepts(v),
  };
}

const envMap: Rule = {
  expect: "a mapping of variable names to values",
  accepts: (v) =>
    isMapping(v) &&
    Object.values(v).every((x) => ["string", "number", "boolean"].includes(typeof x)),
  convert: (v) =>
    Object.fromEntries(
      Object.entries(v as Record<string, unknown>).map(([k, x]) => [k, String(x)]),
    ),
};

const RULES: Record<string, Rule> = {
  model: orNull(str),
  output_dir: str,
  seed: int(0),
  prompts_per_step: int(1),
  num_generations: int(2),
  max_prompt_length: int(1),
  max_completion_length: int(1),
  temperature: num("(", 0),
  top_p: num("(", 0, 1, "]"),
  top_k: int(0),
  beta: num("[", 0),
  epsilon: num("[", 0, 1),
  epsilon_high: orNull(num("[", 0)),
  num_iterations: int(1),
  loss_type: oneOf("grpo", "bnpo", "dr_grpo", "dapo"),
  scale_rewards: bool,
  reward_funcs: { ...strings, expect: "a non-empty list of reward function names" },
  reward_weights: orNull({
    expect: "a list of numbers",
    accepts: (v) => Array.isArray(v) && v.every(isNumber),
  }),
  max_refill_rounds: int(0),
  prompts_per_generation: orNull(int(1)),
  learning_rate: num("(", 0),
  lr_scheduler_type: oneOf("constant", "constant_with_warmup", "linear", "cosine"),
  warmup_steps: int(0),
  max_steps: int(1),
  max_grad_norm: num("[", 0),
  weight_decay: num("[", 0),
  adam_beta1: num("[", 0, 1),
  adam_beta2: num("[", 0, 1),
  adam_epsilon: num("(", 0),
  micro_batch_size: int(1),
  sync_ref_model: bool,
  ref_model_sync_steps: int(1),
  ref_model_mixup_alpha: num("[", 0, 1, "]"),
  logging_steps: int(1),
  save_steps: int(0),
  save_total_limit: orNull(int(1)),
  eval_steps: int(0),
  sample_steps: int(0),
  eval_prompts: orNull(int(1)),
  eval_num_samples: int(0),
  reward_errors: oneOf("fail", "skip"),
  report_to: {
    expect: 'a list of "tensorboard", or "none"',
    accepts: (v) => [v].flat().every((x) => x === "tensorboard" || x === "none"),
    convert: (v) => [...new Set([v].flat().filter((x) => x !== "none"))],
  },
  "dataset.path": orNull(str),
  "dataset.format": oneOf("jsonl", "parquet", "arithmetic"),
  "dataset.question_field": str,
  "dataset.answer_field": str,
  "dataset.answer_extractor": oneOf("gsm8k", "last_number", "boxed", "none"),
  "dataset.eval_path": orNull(str),
  "dataset.eval_fraction": num("[", 0, 1),
  "dataset.config": str,
  "dataset.split": str,
  "dataset.eval_split": orNull(str),
  system_prompt: orNull({ expect: "a string", accepts: (v) => typeof v === "string" }),
  reflection_phrases: strings,
  "arithmetic.max_operand": int(1, 9999),
  "arithmetic.held_out": int(1),
  "arithmetic.corpus_size": int(1),
  "arithmetic.carry_error_rate": num("[", 0, 1, "]"),
  "arithmetic.format_error_rate": num("[", 0, 1, "]"),
  "sft.steps": int(0),
  "sft.learning_rate": num("(", 0),
  "sft.batch_size": int(1),
  "lora.r": int(1),
  "lora.alpha": num("(", 0),
  "lora.lora_alpha": num("(", 0),
  "lora.target_modules": {
    expect: `"all-linear" or a list of ${LORA_TARGETS.join(" ")}`,
    accepts: (v) =>
      v === "all-linear" ||
      (Array.isArray(v) && v.length > 0 &&
        v.every((t) => (LORA_TARGETS as readonly string[]).includes(t as string))),
    convert: (v) => v === "all-linear" ? [...LORA_TARGETS] : [...new Set(v as string[])],
  },
  "lora.use_rslora": bool,
  "lora.dropout": {
    expect: "0 (LoRA dropout is not implemented)",
    accepts: (v) => v === 0,
  },
  adapter: orNull(str),
  frozen_dtype: oneOf("auto", "bf16", "f16", "f32"),
  gradient_checkpointing: bool,
  kv_cache_dtype: oneOf("f32", "bf16", "f16"),
  "reference.adapter": oneOf("auto", "same", "vulkan", "gl", "metal", "dx12"),
  "reference.engine": oneOf("auto", "webgpu", "onnx"),
  "reference.env": envMap,
  "reference.timeout_s": num("(", 0),
  "reference.onnx": orNull(str),
  "reference.max_restarts": int(0),
};

const SECTIONS = new Set(["dataset", "arithmetic", "sft", "reference", "lora"]);

// ---------------------------------------------------------------------------------------------
// Loading.

/**
 * The defaults, then the YAML file at `path` (if any), then each `--set key=value` in order;
 * every value validated as it is applied, then the relations between keys.
 */
export function loadTrainConfig(path: string | null, sets: string[]): TrainConfig {
  const cfg = defaultTrainConfig();
  const builtinRewards = cfg.reward_funcs;
  if (path !== null) {
    let text: string;
    try {
      text = Deno.readTextFileSync(path);
    } catch (e) {
      throw new AhaError(`${path}: cannot read: ${(e as Error).message}`);
    }
    let raw: unknown;
    try {
      raw = YAML.parse(text);
    } catch (e) {
      const first = (e as Error).message.split("\n")[0].replace(/:$/, "");
      throw new AhaError(`${path}: invalid YAML: ${first}`);
    }
    if (raw !== null) applySettings(cfg, raw, path, "");
    // The user's reward modules are found relative to the config file that names them.
    const dir = path.includes("/") ? path.slice(0, path.lastIndexOf("/")) || "/" : ".";
    cfg.reward_funcs = anchorRewardModules(cfg.reward_funcs, dir);
  }
  for (const set of sets) {
    const eq = set.indexOf("=");
    if (eq <= 0) throw new AhaError(`--set ${set}: expected key=value`);
    const keys = set.slice(0, eq).split(".");
    let value: unknown = parseValue(set.slice(eq + 1));
    for (const key of keys.toReversed()) value = { [key]: value };
    applySettings(cfg, value, `--set ${set}`, "");
  }
  // …and relative to the current directory when given with --set.
  cfg.reward_funcs = anchorRewardModules(cfg.reward_funcs, Deno.cwd());
  // A dataset path without a format: the file's extension says which; a Hub id (ORG/NAME, the
  // shape data/hub.ts resolves) is read from the Parquet files the Hub publishes.
  const hubId = /^[A-Za-z0-9][\w.-]*\/[\w.-]+(@.+)?$/.test(cfg.dataset.path ?? "") &&
    !/\.(jsonl|parquet)$/.test(cfg.dataset.path!);
  const extension = hubId ? "parquet" : cfg.dataset.path?.match(/\.(jsonl|parquet)$/)?.[1];
  if (cfg.dataset.format === "arithmetic" && extension) {
    cfg.dataset.format = extension as "jsonl" | "parquet";
  }
  // Unless reward_funcs was given, a dataset is scored with the seed's rewards, not the
  // arithmetic task's.
  if (cfg.reward_funcs === builtinRewards && cfg.dataset.format !== "arithmetic") {
    cfg.reward_funcs = [...DEFAULT_REWARDS];
  }
  checkRelations(cfg, path ?? "--set");
  return cfg;
}

/**
 * A --set value as YAML ("1e-5", "true", "null", "[1, 0.5]", "{a: 1}"); text that YAML rejects,
 * or reads as a mapping without braces ("Answer: briefly"), stays text.
 */
function parseValue(text: string): unknown {
  try {
    const value = YAML.parse(text);
    return isMapping(value) && !text.trimStart().startsWith("{") ? text : value;
  } catch {
    return text;
  }
}

function isMapping(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

/** Validate each key of `raw` (the mapping of `section`, "" at the top) and store it in `target`. */
function applySettings(target: object, raw: unknown, source: string, section: string) {
  if (!isMapping(raw)) {
    const what = section === "" ? "the file" : `"${section}"`;
    throw new AhaError(`${source}: ${what} must be a mapping of keys to values`);
  }
  const fields = target as Record<string, unknown>;
  for (const [key, value] of Object.entries(raw)) {
    const name = section === "" ? key : `${section}.${key}`;
    if (name === "lora") {
      // The optional section: null turns LoRA off, any mapping turns it on with defaults.
      if (value === null) fields.lora = null;
      else applySettings((fields.lora ??= defaultLoraConfig()) as object, value, source, name);
      continue;
    }
    if (SECTIONS.has(name)) {
      if (value !== null) applySettings(fields[key] as object, value, source, name);
      continue;
    }
    const rule = RULES[name];
    if (rule === undefined) {
      const guess = didYouMean(name);
      const hint = guess === null ? "" : ` (did you mean "${guess}"?)`;
      throw new AhaError(`${source}: unknown key "${name}"${hint}`);
    }
    if (!rule.accepts(value)) {
      throw new AhaError(`${source}: "${name}" must be ${rule.expect}, got ${show(value)}`);
    }
    // PEFT's spelling of alpha is accepted and stored under one name.
    const field = name === "lora.lora_alpha" ? "alpha" : key;
    fields[field] = rule.convert ? rule.convert(value) : value;
  }
}

function show(value: unknown): string {
  // JSON would print NaN, Infinity and an empty YAML value all as "null".
  if (typeof value === "number" && !Number.isFinite(value)) return String(value);
  if (value === null) return "an empty value";
  const text = JSON.stringify(value) ?? String(value);
  return text.length > 60 ? text.slice(0, 57) + "..." : text;
}

/** Checks between keys, once everything is applied. */
function checkRelations(cfg: TrainConfig, source: string) {
  const fail = (message: string) => {
    throw new AhaError(`${source}: ${message}`);
  };
  if (cfg.reward_funcs.length === 0) fail(`"reward_funcs" must name at least one reward function`);
  if (cfg.reward_weights !== null && cfg.reward_weights.length !== cfg.reward_funcs.length) {
    fail(
      `"reward_weights" has ${cfg.reward_weights.length} values but "reward_funcs" names ` +
        `${cfg.reward_funcs.length} functions: give one weight each`,
    );
  }
  if (cfg.dataset.format === "arithmetic" && cfg.dataset.path !== null) {
    fail(`"dataset.path" ${cfg.dataset.path} is not .jsonl or .parquet: set "dataset.format"`);
  }
  if (cfg.dataset.format !== "arithmetic" && cfg.dataset.path === null) {
    fail(`"dataset.path" is required when "dataset.format" is ${cfg.dataset.format}`);
  }
  if (
    cfg.dataset.format === "arithmetic" && cfg.eval_prompts !== null &&
    cfg.eval_prompts > cfg.arithmetic.held_out
  ) {
    fail(
      `"eval_prompts" (${cfg.eval_prompts}) must be at most "arithmetic.held_out" ` +
        `(${cfg.arithmetic.held_out})`,
    );
  }
  if (cfg.adapter !== null && cfg.lora === null) {
    fail(`"adapter" continues a LoRA adapter: it needs a "lora" section (or --set lora.r=...)`);
  }
  if (cfg.lora !== null && cfg.sync_ref_model) {
    fail(`"sync_ref_model" cannot be used with "lora": a LoRA run's reference is its frozen base`);
  }
  if (cfg.model === null && cfg.dataset.format !== "arithmetic") {
    fail(`"model" must name a model directory unless "dataset.format" is arithmetic`);
  }
}

/** The known key closest to `name` (by edit distance, also matching a section's key), or null. */
function didYouMean(name: string): string | null {
  const last = name.slice(name.lastIndexOf(".") + 1);
  let best: string | null = null, bestScore = Infinity;
  for (const known of [...Object.keys(RULES), ...SECTIONS]) {
    const knownLast = known.slice(known.lastIndexOf(".") + 1);
    const score = Math.min(editDistance(name, known), editDistance(last, knownLast) + 1);
    if (score < bestScore) [best, bestScore] = [known, score];
  }
  return bestScore <= Math.max(2, Math.floor(name.length / 3)) ? best : null;
}

function editDistance(a: string, b: string): number {
  let previous = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    const current = [i];
    for (let j = 1; j <= b.length; j++) {
      const substitution = previous[j - 1] + (a[i - 1] === b[j - 1] ? 0 : 1);
      current.push(Math.min(previous[j] + 1, current[j - 1] + 1, substitution));
    }
    previous = current;
  }
  return previous[b.length];
}

// ---------------------------------------------------------------------------------------------
// The learning-rate schedule.

/**
 * The learning rate of update number `step` (0 for the first). Warmup ramps linearly as
 * (step + 1) / warmup_steps, so unlike transformers' schedulers no update runs at a rate of 0;
 * then constant, or linear / cosine decay with progress (step − warmup) / (max_steps − warmup),
 * which reaches 0 only after the last update. "constant" ignores warmup_steps, as in
 * transformers; "constant_with_warmup" uses them.
 */
export function learningRateAt(cfg: TrainConfig, step: number): number {
  const lr = cfg.learning_rate, warmup = cfg.warmup_steps;
  if (cfg.lr_scheduler_type === "constant") return lr;
  if (step < warmup) return (lr * (step + 1)) / warmup;
  if (cfg.lr_scheduler_type === "constant_with_warmup") return lr;
  const progress = Math.min(1, (step - warmup) / Math.max(1, cfg.max_steps - warmup));
  return cfg.lr_scheduler_type === "linear"
    ? lr * (1 - progress)
    : lr * 0.5 * (1 + Math.cos(Math.PI * progress));
}

/** Models up to this many bytes of f32 weights go to the ONNX engine under reference.engine auto. */
export const ONNX_AUTO_MAX_BYTES = 1 << 30;

/**
 * The engine of the reference process. "auto": onnxruntime-web's WASM engine when the policy's
 * WebGPU adapter is a software one (no GPU: the reference's adapter would be another software
 * adapter on the same CPU cores, where the WASM engine computes the same log-probs in about a
 * third of the time), the f32 weights fit comfortably in WASM's 4 GiB memory (≤ 1 GiB) and no
 * adapter is named (reference.adapter auto); else WebGPU on the reference's adapter. A given ONNX
 * export (reference.onnx) means the ONNX engine.
 */
export function referenceEngine(
  cfg: TrainConfig,
  policyAdapterIsSoftware: boolean,
  parameters: number,
): "webgpu" | "onnx" {
  const { engine, onnx, adapter } = cfg.reference;
  if (engine !== "auto") return engine;
  if (onnx !== null) return "onnx";
  const small = parameters * 4 <= ONNX_AUTO_MAX_BYTES;
  return policyAdapterIsSoftware && small && adapter === "auto" ? "onnx" : "webgpu";
}
