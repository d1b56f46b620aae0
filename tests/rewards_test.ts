// The seed's rewards on tricky completions, read against the rules in the issue: a table of
// (completion, ground truth) → expected format and correctness rewards, plus the registry,
// weights and the reflection-rate metric.

import assert from "node:assert/strict";
import {
  answersMatch,
  correctnessReward,
  DEFAULT_SYSTEM_PROMPT,
  formatReward,
  lastNumber,
  reflectionRate,
  scoreCompletion,
  selectRewards,
} from "../core/rewards.ts";

const T = "<think>", T_ = "</think>", A = "<answer>", A_ = "</answer>";

// [why, completion, +1.25 for format?]
const FORMAT_CASES: [string, string, boolean][] = [
  ["canonical", `${T}2+2=4${T_}${A}4${A_}`, true],
  ["whitespace between tags", `${T}x${T_}\n \n${A}4${A_}`, true],
  ["multi-line content", `${T}first\nthen\n${T_}\n${A}\n4\n${A_}`, true],
  ["trailing newline", `${T}x${T_}${A}4${A_}\n`, true],
  ["empty tags", `${T}${T_}${A}${A_}`, true],
  ["text after </answer>", `${T}x${T_}${A}4${A_} done`, false],
  ["text before <think>", `Sure! ${T}x${T_}${A}4${A_}`, false],
  ["text between tags", `${T}x${T_} so ${A}4${A_}`, false],
  ["nested think", `${T}a${T}b${T_}c${T_}${A}4${A_}`, false],
  ["duplicate answer", `${T}x${T_}${A}4${A_}${A}5${A_}`, false],
  ["answer inside think", `${T}x ${A}3${A_}${T_}${A}4${A_}`, false],
  ["swapped order", `${A}4${A_}${T}x${T_}`, false],
  ["missing think", `${A}4${A_}`, false],
  ["unclosed answer", `${T}x${T_}${A}4`, false],
  ["plain text", "The answer is 4.", false],
  ["leading space", ` ${T}x${T_}${A}4${A_}`, false],
];

Deno.test("format reward: +1.25 for think then answer, each tag once, nothing else", () => {
  for (const [why, completion, ok] of FORMAT_CASES) {
    assert.equal(formatReward("", completion), ok ? 1.25 : -1, why);
  }
});

// [why, completion, ground truth, correct?]
const CORRECTNESS_CASES: [string, string, string, boolean][] = [
  ["last number wins", "First 3 apples, then 5, so 8.", "8", true],
  ["earlier number is not the answer", "It is 8, not 9.", "8", false],
  ["answer tag beats later numbers", `${A}42${A_} (checked 3 times)`, "42", true],
  ["last number inside the answer tag", `${T}7*6=42${T_}${A}6 times 7 is 42${A_}`, "42", true],
  ["wrong number in the answer tag", `${T}it is 42${T_}${A}41${A_}`, "42", false],
  ["last of two answer tags", `${A}1${A_}${A}2${A_}`, "2", true],
  ["thousands separators", "Total: 1,234 dollars", "1234", true],
  ["separators in the ground truth", "so 1080", "1,080", true],
  ["millions", `${A}109,200,000${A_}`, "109200000", true],
  ["a list is not one number", "values 1,2,3", "123", false],
  ["dollar sign", "She earned $5.", "5", true],
  ["dollar sign in the truth", "5", "$5", true],
  ["percent", "The discount is 50%", "50", true],
  ["fraction equals decimal", `${A}3/4${A_}`, "0.75", true],
  ["decimal equals fraction", `${A}0.75${A_}`, "3/4", true],
  ["spaced fraction", "half is 1 / 2", "0.5", true],
  ["negative", `${A}-7${A_}`, "-7", true],
  ["sign matters", `${A}7${A_}`, "-7", false],
  ["unicode minus", "it drops to −7", "-7", true],
  ["a minus between terms is not a sign", "10-3", "3", true],
  ["trailing .0", `${A}7.0${A_}`, "7", true],
  ["trailing .00 in the truth", "7", "7.00", true],
  ["decimals", "0.2 per minute", "0.2", true],
  ["leading-dot decimal", "about .5", "0.5", true],
  ["sentence-final period", "The answer is 72.", "72", true],
  ["GSM8K-style markup", "48/2 = <<48/2=24>>24 clips", "24", true],
  ["no number at all", "I don't know.", "72", false],
  ["empty completion", "", "72", false],
  ["number glued to a word is not read", "answer72", "72", false],
  ["non-numeric truth: exact text", `${A} Paris ${A_}`, "paris", true],
  ["non-numeric truth: other text", `${A}Lyon${A_}`, "Paris", false],
];

Deno.test("correctness reward: final number equals the ground truth after normalisation", () => {
  for (const [why, completion, truth, ok] of CORRECTNESS_CASES) {
    assert.equal(correctnessReward("", completion, { answer: truth }), ok ? 1 : -1, why);
  }
});

Deno.test("lastNumber reads numbers as people write them", () => {
  const cases: [string, number | null][] = [
    ["1,234.5", 1234.5],
    ["$1,000,000", 1e6],
    ["-$5", -5],
    ["12.5%", 12.5],
    ["3/4", 0.75],
    ["1/0", null],
    ["none", null],
  ];
  for (const [text, value] of cases) assert.equal(lastNumber(text), value, text);
  assert.ok(answersMatch("0.1 + 0.2 = 0.30000000000000004", "0.3"), "float noise is tolerated");
});

Deno.test("registry, weights and total", () => {
  const rewards = selectRewards(["format", "correctness"], [0.5, 2]);
  const good = `${T}6*7${T_}${A}42${A_}`;
  assert.deepEqual(scoreCompletion(rewards, "q", good, { answer: "42" }), {
    format: 1.25,
    correctness: 1,
    total: 0.5 * 1.25 + 2 * 1,
  });
  assert.deepEqual(scoreCompletion(selectRewards(["correctness"]), "q", "41", { answer: "42" }), {
    correctness: -1,
    total: -1,
  });
  assert.throws(() => selectRewards(["format", "nope"]), /unknown reward function "nope"/);
  assert.throws(() => selectRewards(["format"], [1, 2]), /1 reward functions but 2 weights/);
});

Deno.test("reflection rate counts self-correction phrases as whole words, any case", () => {
  const completions = [
    "Wait, that is wrong.", // yes
    "We await the result and waited.", // no: "wait" only inside words
    "LET ME RE-CHECK the sum.", // yes
    "However, this fails for n=0.", // yes
    "Let’s reconsider the problem.", // yes (typographic apostrophe)
    "The answer is 4.", // no
  ];
  assert.equal(reflectionRate(completions), 4 / 6);
  assert.equal(reflectionRate([]), 0);
  assert.equal(reflectionRate(["hmm, (a.b)?", "a.b"], ["(a.b)?"]), 0.5, "phrases are literal");
});

Deno.test("default system prompt is simple_GRPO's, word for word", () => {
  const seed =
    "You are a helpful assistant. A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The Assistant first thinks about the reasoning process in the mind and then provides the user with the answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning process here </think><answer> answer here </answer>";
  assert.equal(DEFAULT_SYSTEM_PROMPT, seed);
});
