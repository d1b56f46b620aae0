// The built-in task of `deno task train`, R1-zero in miniature: sums "17+25=" answered "42<end>".
// It owns a character-level tokenizer, the problems with a fixed held-out split, an imperfect
// pretraining corpus (like web text: some answers drop their carries, some use other formats),
// and the two reward functions that GRPO then optimises: a correct number, in canonical form.

import { AhaError } from "../core/errors.ts";
import type { Example, RewardFunction } from "../core/rewards.ts";
import type { Rng } from "../core/rng.ts";
import type { StreamDecoder, TextTokenizer } from "../core/tokenizer.ts";
import type { TrainConfig } from "../core/train_config.ts";

export const PAD = "<pad>"; // padding, and the start of a sequence when one is wanted
export const END = "<end>"; // ends a completion

// One token per character, plus the two special tokens. The ids are part of the checkpoints
// trained on this task, so the order never changes.
const VOCAB = [PAD, END, ..."0123456789", "+", "=", " ", "(", ")", "."];

/** The task's tokenizer, in the shape of the Hugging Face ones (core/tokenizer.ts). */
export class ArithmeticTokenizer implements TextTokenizer {
  readonly vocabSize = VOCAB.length;
  readonly padId = VOCAB.indexOf(PAD);
  readonly eosIds = [VOCAB.indexOf(END)];
  readonly chatTemplate = null;

  /** Ids of `text`; "<end>" and "<pad>" written in the text become their tokens. */
  encode(text: string): number[] {
    const ids: number[] = [];
    for (let i = 0; i < text.length;) {
      const special = [PAD, END].find((s) => text.startsWith(s, i));
      const token = special ?? text[i];
      const id = VOCAB.indexOf(token);
      if (id === -1) {
        throw new AhaError(`arithmetic tokenizer: no token for ${JSON.stringify(token)}`);
      }
      ids.push(id);
      i += token.length;
    }
    return ids;
  }

  /** The text of `ids`, special tokens written out unless skipped; unknown ids give "". */
  decode(ids: number[], skipSpecialTokens = false): string {
    return ids.map((id) => {
      const token = VOCAB[id] ?? "";
      return skipSpecialTokens && (token === PAD || token === END) ? "" : token;
    }).join("");
  }

  streamDecoder(): StreamDecoder {
    return { push: (id) => this.decode([id]), flush: () => "" };
  }

  tokenToId(token: string): number | undefined {
    const id = VOCAB.indexOf(token);
    return id === -1 ? undefined : id;
  }
}

// ---------------------------------------------------------------------------------------------
// Problems and the held-out split.

export type ArithmeticOptions = TrainConfig["arithmetic"];

/** One sum as a dataset row: the prompt in `question`, the true sum in `answer`. */
export interface SumProblem extends Example {
  question: string;
  answer: string;
  a: number;
  b: number;
}

export function sumProblem(a: number, b: number): SumProblem {
  return { question: `${a}+${b}=`, answer: String(a + b), a, b };
}

// A fixed 32-bit hash of (a, b) (MurmurHash3's finaliser, a bijection): the held-out problems are
// those with the smallest hashes, so the split never depends on a seed or on iteration order.
function problemHash(a: number, b: number): number {
  let h = (a * 10007 + b) >>> 0;
  h = Math.imul(h ^ (h >>> 16), 0x85ebca6b);
  h = Math.imul(h ^ (h >>> 13), 0xc2b2ae35);
  return (h ^ (h >>> 16)) >>> 0;
}

/**
 * Every sum a+b with 0 ≤ a, b ≤ max_operand, split into `held_out` evaluation problems (never
 * used in pretraining or RL) and the training problems; both lists in a fixed order.
 */
export function splitProblems(opts: ArithmeticOptions): {
  train: SumProblem[];
  heldOut: SumProblem[];
} {
  const all: SumProblem[] = [];
  for (let a = 0; a <= opts.max_operand; a++) {
    for (let b = 0; b <= opts.max_operand; b++) all.push(sumProblem(a, b));
  }
  if (opts.held_out >= all.length) {
    throw new AhaError(
      `arithmetic.held_out (${opts.held_out}) must be smaller than the ${all.length} problems ` +
        `of operands 0-${opts.max_operand}`,
    );
  }
  const byHash = all.map((p) => ({ p, h: problemHash(p.a, p.b) })).sort((x, y) => x.h - y.h);
  const heldOut = new Set(byHash.slice(0, opts.held_out).map(({ p }) => p));
  return { train: all.filter((p) => !heldOut.has(p)), heldOut: all.filter((p) => heldOut.has(p)) };
}

// ---------------------------------------------------------------------------------------------
// The imperfect pretraining corpus.

/** a + b computed digit by digit without carrying: 17+25 → 32, 95+17 → 2. */
function sumWithoutCarries(a: number, b: number): number {
  let sum = 0;
  for (let place = 1; a > 0 || b > 0; place *= 10, a = Math.floor(a / 10), b = Math.floor(b / 10)) {
    sum += ((a % 10 + b % 10) % 10) * place;
  }
  return sum;
}

// Non-canonical ways of writing an answer, as found in the wild.
const VARIANTS: ((n: number) => string)[] = [
  (n) => ` ${n}`,
  (n) => `=${n}`,
  (n) => `${n}.`,
  (n) => `(${n})`,
];

/**
 * `corpus_size` {prompt, completion} rows over the training problems, drawn with `rng`: the right
 * sum, except that a problem with a carry drops its carries with probability carry_error_rate;
 * written canonically ("42<end>"), except with probability format_error_rate in one of the
 * other formats (" 42", "=42", "42.", "(42)", each then <end>).
 */
export function pretrainingCorpus(
  train: SumProblem[],
  opts: ArithmeticOptions,
  rng: Rng,
): { prompt: string; completion: string }[] {
  return Array.from({ length: opts.corpus_size }, () => {
    const { a, b, question } = train[rng.int(train.length)];
    const wrong = sumWithoutCarries(a, b);
    const sum = wrong !== a + b && rng.next() < opts.carry_error_rate ? wrong : a + b;
    const text = rng.next() < opts.format_error_rate
      ? VARIANTS[rng.int(VARIANTS.length)](sum)
      : String(sum);
    return { prompt: question, completion: text + END };
  });
}

// ---------------------------------------------------------------------------------------------
// Rewards. They read the completion as the tokenizer decodes it with special tokens kept:
// anything after the first <end> is padding and ignored; no <end> means the completion was cut
// off at max_completion_length.

function beforeEnd(completion: string): string {
  const end = completion.indexOf(END);
  return end === -1 ? completion : completion.slice(0, end);
}

/** 1 when the completion holds exactly one number and it is the sum, else 0. */
export function arithCorrect(_prompt: string, completion: string, example: Example): number {
  const numbers = beforeEnd(completion).match(/\d+/g);
  return numbers?.length === 1 && Number(numbers[0]) === Number(example.answer) ? 1 : 0;
}

/** 1 for the canonical form: a number without leading zeros, then <end>, nothing else. */
export function arithFormat(_prompt: string, completion: string): number {
  return /^(0|[1-9]\d*)<end>/.test(completion) ? 1 : 0;
}

/** The task's reward functions by their config names (`reward_funcs`). */
export const ARITHMETIC_REWARDS: Record<string, RewardFunction> = {
  arith_correct: arithCorrect,
  arith_format: arithFormat,
};
