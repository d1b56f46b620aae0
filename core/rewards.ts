// The reward functions of the seed (simple_GRPO on GSM8K), the registry that names them in
// configs, and the reflection-rate metric that measures the "aha moment".
//
//   format       +1.25 when the completion is exactly <think>…</think> <answer>…</answer>, else −1
//   correctness  +1 when the final number equals the ground truth, else −1

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

export interface WeightedReward {
  name: string;
  fn: RewardFunction;
  weight: number;
}

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

/** Each function's reward and their weighted sum, `total`. */
export function scoreCompletion(
  rewards: WeightedReward[],
  prompt: string,
  completion: string,
  example: Example,
): Record<string, number> {
  const scores: Record<string, number> = {};
  let total = 0;
  for (const { name, fn, weight } of rewards) {
    scores[name] = fn(prompt, completion, example);
    total += weight * scores[name];
  }
  return { ...scores, total };
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
