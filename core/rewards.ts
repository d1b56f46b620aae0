// The reward functions of the seed (simple_GRPO on GSM8K), the registry that names them in
// configs, reward functions of the user's own (modules named in reward_funcs, called on batches
// as trl calls them), and the reflection-rate metric that measures the "aha moment".
//
//   format       +1.25 when the completion is exactly <think>…</think> <answer>…</answer>, else −1
//   correctness  +1 when the final number equals the ground truth, else −1

import { AhaError } from "./errors.ts";

export interface Example {
  answer: string;
  [field: string]: unknown;
}

/** Scores one completion of `prompt`; `example` is the dataset row it answers. */
export type RewardFunction = (prompt: string, completion: string, example: Example) => number;

export const DEFAULT_SYSTEM_PROMPT =
  "You are a helpful assistant. A conversation between User and " +
  "Assistant. The user asks a question, and the Assistant solves it. The Assistant first thinks " +
  "about the reasoning process in the mind and then provides the user with the answer. The " +
  "reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, " +
  "respectively, i.e., <think> reasoning process here </think><answer> answer here </answer>";

const TAGS = ["<think>", "</think>", "<answer>", "</answer>"];
const FORMAT = /^<think>[\s\S]*<\/think>\s*<answer>[\s\S]*<\/answer>\s*$/;

/** +1.25 for `<think>…</think>`, optional whitespace, `<answer>…</answer>`, each tag once. */
export function formatReward(_prompt: string, completion: string): number {
  const once = TAGS.every((tag) => completion.split(tag).length === 2);
  return once && FORMAT.test(completion) ? 1.25 : -1;
}

/** +1 when the answer (the answer tag's content, else the completion) ends in the right number. */
export function correctnessReward(_prompt: string, completion: string, example: Example): number {
  const tagged = [...completion.matchAll(/<answer>([\s\S]*?)<\/answer>/g)].at(-1);
  return answersMatch(tagged ? tagged[1] : completion, example.answer) ? 1 : -1;
}

// A number as people write it: optional sign and "$", thousands separators, decimals, a simple
// fraction, a trailing "%". Not inside a word, and a "-" between two terms is not a sign.
const NUMBER =
  /(?<![\w.])[-−]?\$?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+|(?=\.\d))(?:\.\d+)?(?:\s*\/\s*\d+)?%?/g;

/** The last number written in `text`, as a value ("1,234" → 1234, "3/4" → 0.75), or null. */
export function lastNumber(text: string): number | null {
  const written = [...text.matchAll(NUMBER)].at(-1)?.[0];
  if (written === undefined) return null;
  const [numerator, denominator = "1"] = written.replace(/[$,%\s]/g, "").replace("−", "-")
    .split("/");
  const value = Number(numerator) / Number(denominator);
  return Number.isFinite(value) ? value : null;
}

/** Whether `candidate` ends in the ground truth's number (or equals it, for non-numeric truths). */
export function answersMatch(candidate: string, truth: string): boolean {
  const expected = lastNumber(truth);
  if (expected === null) return candidate.trim().toLowerCase() === truth.trim().toLowerCase();
  const got = lastNumber(candidate);
  return got !== null && Math.abs(got - expected) <= 1e-9 * Math.max(1, Math.abs(expected));
}

/** Reward functions by the names configs use (`reward_funcs`). */
export const REWARD_FUNCTIONS: Record<string, RewardFunction> = {
  format: formatReward,
  correctness: correctnessReward,
};

export const DEFAULT_REWARDS = ["format", "correctness"];

/**
 * What a user's reward function receives, as trl's do: the prompts, the completions (text), and
 * every column of each completion's dataset row, one array entry per completion.
 */
export interface RewardBatch {
  prompts: string[];
  completions: string[];
  [column: string]: unknown[];
}

/** A user's reward function: one number per completion, or a Promise of them. */
export type BatchRewardFunction = (
  batch: RewardBatch,
) => ArrayLike<number> | Promise<ArrayLike<number>>;

/** A built-in scores one completion (`fn`); a user's module scores a batch (`batch`). */
export type WeightedReward =
  & { name: string; weight: number }
  & ({ fn: RewardFunction; batch?: undefined } | { batch: BatchRewardFunction; source: string });

/** The named reward functions with their weights (all 1 when none given). */
export function selectRewards(names: string[], weights?: number[]): WeightedReward[] {
  if (weights !== undefined && weights.length !== names.length) {
    throw new RangeError(
      `${names.length} reward functions but ${weights.length} weights: give one weight each`,
    );
  }
  return names.map((name, i) => {
    const fn = REWARD_FUNCTIONS[name];
    if (!fn) {
      const known = Object.keys(REWARD_FUNCTIONS).join(", ");
      throw new RangeError(`unknown reward function "${name}" (known: ${known})`);
    }
    return { name, fn, weight: weights?.[i] ?? 1 };
  });
}

/** Each built-in function's reward and their weighted sum, `total` (user modules: scoreBatch). */
export function scoreCompletion(
  rewards: WeightedReward[],
  prompt: string,
  completion: string,
  example: Example,
): Record<string, number> {
  const scores: Record<string, number> = {};
  let total = 0;
  for (const reward of rewards) {
    if (reward.batch) throw new Error(`${reward.name} scores batches: use scoreBatch`);
    scores[reward.name] = reward.fn(prompt, completion, example);
    total += reward.weight * scores[reward.name];
  }
  return { ...scores, total };
}

/** One completion to score: its prompt, its text and the dataset row it answers. */
export interface ToScore {
  prompt: string;
  completion: string;
  example: Example;
}

/** What a failing user function does: stop the run (`fail`), or score 0 and count (`skip`). */
export type RewardErrors = "fail" | "skip";

/**
 * Every reward function on every completion, the functions concurrently (a user's async function
 * overlaps the others); per completion each function's score and the weighted `total`.
 * A user function that throws, returns the wrong count or a non-finite number either stops with
 * one line naming the function and the completion, or (skip) scores 0 there: `errors[i]` counts
 * the functions that failed on completion i (so a caller counts only the completions it uses).
 */
export async function scoreBatch(
  rewards: WeightedReward[],
  items: ToScore[],
  onError: RewardErrors = "fail",
): Promise<{ scores: Record<string, number>[]; errors: number[] }> {
  const errors = items.map(() => 0);
  const columns = await Promise.all(rewards.map(async (reward) => {
    if (!reward.batch) return items.map((x) => reward.fn(x.prompt, x.completion, x.example));
    const what = `reward function "${reward.name}" (${reward.source})`;
    const stop = (problem: string, i: number) =>
      new AhaError(
        `${what} ${problem} for completion ${i + 1} of ${items.length} (question ` +
          `${describeRow(items[i])}); set reward_errors: skip to score such completions 0`,
      );
    const result = await runUserReward(reward.batch, items);
    if (result.kind === "ok") return result.values;
    if (result.kind === "count") {
      // Not one completion's fault: the whole batch scores 0.
      if (onError === "fail") {
        throw new AhaError(
          `${what} ${result.problem} (a batch beginning with question ${describeRow(items[0])})`,
        );
      }
      items.forEach((_, i) => errors[i]++);
      return items.map(() => 0);
    }
    if (result.kind === "value") {
      const bad = result.values.map((v, i) => Number.isFinite(v) ? -1 : i).filter((i) => i >= 0);
      if (onError === "fail") throw stop(`returned ${result.values[bad[0]]}`, bad[0]);
      for (const i of bad) errors[i]++;
      return result.values.map((v) => Number.isFinite(v) ? v : 0);
    }
    // It threw: call it on one completion at a time to name the ones it fails on.
    const values: number[] = [];
    let failed = 0;
    for (let i = 0; i < items.length; i++) {
      const one = await runUserReward(reward.batch, [items[i]]);
      if (one.kind === "ok") {
        values.push(one.values[0]);
        continue;
      }
      const problem = one.kind === "value" ? `returned ${one.values[0]}` : one.problem;
      if (onError === "fail") throw stop(problem, i);
      values.push(0);
      errors[i]++;
      failed++;
    }
    if (failed === 0) {
      if (onError === "fail") {
        throw new AhaError(
          `${what} ${result.problem} for a batch of ${items.length} completions, though not ` +
            "for any one alone",
        );
      }
      items.forEach((_, i) => errors[i]++);
      return items.map(() => 0);
    }
    return values;
  }));
  const scores = items.map((_, i) => {
    const row: Record<string, number> = {};
    let total = 0;
    rewards.forEach((reward, r) => {
      row[reward.name] = columns[r][i];
      total += reward.weight * columns[r][i];
    });
    return { ...row, total };
  });
  return { scores, errors };
}

type UserResult =
  | { kind: "ok"; values: number[] }
  | { kind: "value"; values: number[] } // some value is not a finite number
  | { kind: "count" | "threw"; problem: string };

async function runUserReward(fn: BatchRewardFunction, items: ToScore[]): Promise<UserResult> {
  let out: unknown;
  try {
    out = await fn(rewardBatch(items));
  } catch (e) {
    return { kind: "threw", problem: `threw "${(e as Error)?.message ?? e}"` };
  }
  const list = Array.isArray(out) || ArrayBuffer.isView(out);
  if (!list || (out as ArrayLike<unknown>).length !== items.length) {
    const got = list ? `${(out as ArrayLike<unknown>).length} values` : typeof out;
    return { kind: "count", problem: `returned ${got} for ${items.length} completions` };
  }
  const values = Array.from(out as ArrayLike<unknown>, (v) => typeof v === "number" ? v : NaN);
  return { kind: values.every(Number.isFinite) ? "ok" : "value", values };
}

/** trl's shape: prompts, completions, and each dataset column as one array over the batch. */
export function rewardBatch(items: ToScore[]): RewardBatch {
  const rows = items.map((x) => rowColumns(x.example));
  const names = [...new Set(rows.flatMap((r) => Object.keys(r)))];
  const batch: RewardBatch = {
    prompts: items.map((x) => x.prompt),
    completions: items.map((x) => x.completion),
  };
  for (const name of names) {
    if (name !== "prompts" && name !== "completions") batch[name] = rows.map((r) => r[name]);
  }
  return batch;
}

/** The dataset row behind an example: its `columns` when the loader kept them, else its own
 * fields (the arithmetic task's question, answer, a, b), without the tokenized prompt. */
function rowColumns(example: Example): Record<string, unknown> {
  if (typeof example.columns === "object" && example.columns !== null) {
    return example.columns as Record<string, unknown>;
  }
  const { prompt: _p, promptIds: _ids, ...fields } = example;
  return fields;
}

function describeRow(item: ToScore): string {
  const question = String(rowColumns(item.example).question ?? item.prompt);
  return JSON.stringify(question.length > 60 ? question.slice(0, 60) + "…" : question);
}

// ---------------------------------------------------------------------------------------------
// Reward functions of the user's own: `reward_funcs` entries "./rewards/mine.ts#lengthPenalty".

/** Whether a reward_funcs entry names a module (a file, optionally #export) and not a built-in. */
export function isRewardModule(entry: string): boolean {
  return /\.(ts|js|mjs|mts|cjs)(#[\w$]+)?$/.test(entry);
}

/** The name a module's function is logged under: its export, else the file's base name. */
export function rewardModuleName(entry: string): string {
  const [file, exported] = entry.split("#");
  return exported ?? file.split("/").at(-1)!.replace(/\.\w+$/, "");
}

/** The entries with relative module paths made absolute against `dir`; the same array when
 * there are none (so a caller can still tell its defaults apart). */
export function anchorRewardModules(entries: string[], dir: string): string[] {
  return entries.some(isRewardModule)
    ? entries.map((entry) => anchorRewardModule(entry, dir))
    : entries;
}

/** A relative module entry made absolute against `dir` (the config file's directory). */
export function anchorRewardModule(entry: string, dir: string): string {
  if (!isRewardModule(entry) || entry.startsWith("/") || /^\w+:/.test(entry)) return entry;
  const base = dir.startsWith("/") ? dir : `${Deno.cwd()}/${dir}`;
  const [file, exported] = entry.split("#");
  const path = decodeURIComponent(new URL(file, `file://${base.replace(/\/?$/, "/")}`).pathname);
  return exported === undefined ? path : `${path}#${exported}`;
}

/**
 * The function a module entry names, imported with a plain dynamic import (so it works from the
 * bundle too): `file#export`, or the default export. Paths are relative to the current
 * directory unless anchored (configs anchor them to their own directory when loaded).
 */
export async function loadRewardModule(entry: string): Promise<BatchRewardFunction> {
  const [file, exported = "default"] = entry.split("#");
  const url = /^\w+:/.test(file) ? file : new URL(file, `file://${Deno.cwd()}/`).href;
  let module: Record<string, unknown>;
  try {
    module = await import(url);
  } catch (e) {
    const message = (e as Error).message.split("\n")[0];
    throw new AhaError(`reward_funcs: cannot import ${file}: ${message}`);
  }
  const fn = module[exported];
  if (typeof fn !== "function") {
    const names = Object.keys(module).filter((k) => typeof module[k] === "function");
    throw new AhaError(
      `reward_funcs: ${file} has no function export "${exported}" (its functions: ${
        names.join(", ") || "none"
      })`,
    );
  }
  return fn as BatchRewardFunction;
}

/** Self-correction phrases whose appearance is the seed's "aha moment". */
export const DEFAULT_REFLECTION_PHRASES = [
  "wait",
  "let me re-check",
  "however, this",
  "let's reconsider",
];

/** A case-insensitive matcher for any of `phrases`, each as whole words ("wait" ≠ "await"). */
export function reflectionMatcher(phrases = DEFAULT_REFLECTION_PHRASES): (text: string) => boolean {
  const escaped = phrases.map((p) => p.replace(/[.*+?^${}()|[\]\\]/g, "\\$&"));
  const pattern = new RegExp(
    `(?<![\\p{L}\\p{N}_])(?:${escaped.join("|")})(?![\\p{L}\\p{N}_])`,
    "iu",
  );
  return (text) => pattern.test(text.replaceAll("\u2019", "'")); // typographic apostrophes too
}

/** The share of completions containing a self-correction phrase (0 for none). */
export function reflectionRate(
  completions: string[],
  phrases = DEFAULT_REFLECTION_PHRASES,
): number {
  if (completions.length === 0) return 0;
  const reflects = reflectionMatcher(phrases);
  return completions.filter(reflects).length / completions.length;
}
