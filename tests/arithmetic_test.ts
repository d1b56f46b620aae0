// The built-in arithmetic task: tokenizer round trip, a held-out split that never leaks into the
// training problems or the corpus, corpus error rates as configured, and rewards on tricky cases.

import assert from "node:assert/strict";
import { AhaError } from "../core/errors.ts";
import { Rng } from "../core/rng.ts";
import { defaultTrainConfig } from "../core/train_config.ts";
import {
  arithCorrect,
  arithFormat,
  ArithmeticTokenizer,
  pretrainingCorpus,
  splitProblems,
  sumProblem,
} from "../data/arithmetic.ts";

const options = defaultTrainConfig().arithmetic;

Deno.test("tokenizer: round trip, special tokens, unknown characters", () => {
  const tok = new ArithmeticTokenizer();
  assert.equal(tok.vocabSize, 18);
  assert.equal(tok.decode([tok.padId]), "<pad>");
  assert.equal(tok.decode(tok.eosIds), "<end>");
  for (const text of ["17+25=42<end><pad><pad>", "0+0= (0).<end>", "", "<pad>9+9=18<end>"]) {
    assert.equal(tok.decode(tok.encode(text)), text);
  }
  const ids = tok.encode("3+4=7<end>");
  assert.equal(ids.length, 6);
  assert.equal(ids.at(-1), tok.eosIds[0]);
  assert.equal(tok.decode(ids, true), "3+4=7");
  assert.equal(tok.decode([...ids, 99]), "3+4=7<end>");
  assert.equal(tok.tokenToId("+"), ids[1]);
  assert.equal(tok.tokenToId("x"), undefined);
  const stream = tok.streamDecoder();
  assert.equal(ids.map((id) => stream.push(id)).join("") + stream.flush(), "3+4=7<end>");
  assert.throws(() => tok.encode("3-4="), AhaError);
  assert.throws(() => tok.encode("<end"), AhaError);
});

Deno.test("split: held-out problems are disjoint from training, fixed, and exactly as many", () => {
  for (const [max_operand, held_out] of [[99, 200], [29, 100], [3, 5]]) {
    const opts = { ...options, max_operand, held_out };
    const { train, heldOut } = splitProblems(opts);
    assert.equal(heldOut.length, held_out);
    assert.equal(train.length + heldOut.length, (max_operand + 1) ** 2);
    const key = (p: { a: number; b: number }) => `${p.a}+${p.b}`;
    const trainKeys = new Set(train.map(key));
    assert.ok(heldOut.every((p) => !trainKeys.has(key(p))));
    assert.equal(new Set([...trainKeys, ...heldOut.map(key)]).size, (max_operand + 1) ** 2);
    assert.deepEqual(splitProblems(opts), { train, heldOut });
  }
  // Growing the held-out set only adds problems: the split is by a fixed hash of (a, b).
  const small = splitProblems({ ...options, held_out: 50 }).heldOut.map((p) => p.question);
  const large = new Set(splitProblems(options).heldOut.map((p) => p.question));
  assert.ok(small.every((q) => large.has(q)));
  // The default: at least 50 held-out problems out of at least a few hundred.
  assert.ok(options.held_out >= 50 && (options.max_operand + 1) ** 2 >= 500);
  assert.throws(() => splitProblems({ ...options, max_operand: 3, held_out: 16 }), AhaError);
  assert.deepEqual(sumProblem(17, 25), { question: "17+25=", answer: "42", a: 17, b: 25 });
});

/** Whether adding a and b carries anywhere, digit by digit, on strings. */
function carries(a: number, b: number): boolean {
  const [x, y] = [String(a).padStart(5, "0"), String(b).padStart(5, "0")];
  return [...x].some((d, i) => Number(d) + Number(y[i]) >= 10);
}

/** The carry-dropped sum on strings: each digit pair's sum modulo 10. */
function droppedCarries(a: number, b: number): number {
  const [x, y] = [String(a).padStart(5, "0"), String(b).padStart(5, "0")];
  return Number([...x].map((d, i) => (Number(d) + Number(y[i])) % 10).join(""));
}

Deno.test("pretraining corpus: error rates as configured, only training problems", () => {
  const tok = new ArithmeticTokenizer();
  const { train, heldOut } = splitProblems(options);
  const heldOutPrompts = new Set(heldOut.map((p) => p.question));
  for (const [carry_error_rate, format_error_rate] of [[0.6, 0.2], [0, 0.5], [1, 0]]) {
    const opts = { ...options, carry_error_rate, format_error_rate };
    const corpus = pretrainingCorpus(train, opts, new Rng(5));
    assert.equal(corpus.length, opts.corpus_size);
    let carryRows = 0, wrong = 0, otherFormat = 0;
    for (const { prompt, completion } of corpus) {
      assert.ok(!heldOutPrompts.has(prompt), `held-out problem ${prompt} in the corpus`);
      tok.encode(prompt + completion); // every row is made of the task's tokens
      const [a, b] = prompt.slice(0, -1).split("+").map(Number);
      const canonical = /^(0|[1-9]\d*)<end>$/.test(completion);
      const variant = /^( \d+|=\d+|\d+\.|\(\d+\))<end>$/.test(completion);
      assert.ok(canonical || variant, `unexpected format ${completion}`);
      if (!canonical) otherFormat++;
      const answer = Number(completion.match(/\d+/)![0]);
      if (carries(a, b)) {
        carryRows++;
        if (answer !== a + b) {
          assert.equal(answer, droppedCarries(a, b));
          wrong++;
        }
      } else assert.equal(answer, a + b);
    }
    // Within 4 standard deviations of the configured binomial rates.
    const within = (k: number, n: number, p: number) =>
      Math.abs(k / n - p) <= 4 * Math.sqrt((p * (1 - p)) / n) + 1e-12;
    assert.ok(carryRows > 0.3 * corpus.length); // enough rows exercise a carry
    assert.ok(within(wrong, carryRows, carry_error_rate), `carry errors ${wrong}/${carryRows}`);
    assert.ok(within(otherFormat, corpus.length, format_error_rate), `formats ${otherFormat}`);
  }
  const again = pretrainingCorpus(train, options, new Rng(5));
  assert.deepEqual(again, pretrainingCorpus(train, options, new Rng(5)));
});

Deno.test("rewards: correct number and canonical format on tricky completions", () => {
  const example = sumProblem(17, 25);
  const cases: [string, number, number][] = [
    // completion, arith_correct, arith_format
    ["42<end>", 1, 1],
    ["42<end><pad><pad>", 1, 1],
    ["42<end>7 (junk after the end is padding)", 1, 1],
    ["42", 1, 0], // cut off before the end token
    [" 42<end>", 1, 0],
    ["=42<end>", 1, 0],
    ["42.<end>", 1, 0],
    ["(42)<end>", 1, 0],
    ["042<end>", 1, 0], // leading zero
    ["32<end>", 0, 1], // dropped carry, canonical form
    ["420<end>", 0, 1],
    ["4 2<end>", 0, 0], // two numbers
    ["42 42<end>", 0, 0],
    ["41 42<end>", 0, 0],
    ["<end>", 0, 0],
    ["", 0, 0],
    ["<pad>42<end>", 1, 0],
  ];
  for (const [completion, correct, format] of cases) {
    assert.equal(arithCorrect("17+25=", completion, example), correct, `correct: ${completion}`);
    assert.equal(arithFormat("17+25=", completion), format, `format: ${completion}`);
  }
  const zero = sumProblem(0, 0);
  assert.equal(arithCorrect("0+0=", "0<end>", zero) + arithFormat("0+0=", "0<end>"), 2);
  assert.equal(arithCorrect("0+0=", "00<end>", zero) + arithFormat("0+0=", "00<end>"), 1);
});
