// Datasets: GSM8K from data/gsm8k, JSONL with bad rows, Parquet written here with
// hyparquet-writer, the held-out split, the epoch sampler, and the seeded generator they use.

import assert from "node:assert/strict";
import { parquetWriteBuffer } from "hyparquet-writer";
import { AhaError } from "../core/errors.ts";
import { Rng } from "../core/rng.ts";
import {
  ANSWER_EXTRACTORS,
  type DatasetSpec,
  EpochSampler,
  loadDataset,
  splitHeldOut,
} from "../data/dataset.ts";

const GSM8K = new URL("../data/gsm8k", import.meta.url).pathname;
const spec = (path: string, more: Partial<DatasetSpec> = {}): DatasetSpec => ({
  path,
  question_field: "question",
  answer_field: "answer",
  answer_extractor: "none",
  ...more,
});

Deno.test("GSM8K train and test load whole, with the #### answer", async () => {
  const warnings: string[] = [];
  const train = await loadDataset(
    spec(`${GSM8K}/train.jsonl`, { answer_extractor: "gsm8k" }),
    (m) => warnings.push(m),
  );
  const test = await loadDataset(
    spec(`${GSM8K}/test.jsonl`, { answer_extractor: "gsm8k" }),
    (m) => warnings.push(m),
  );
  assert.equal(train.length, 7473);
  assert.equal(test.length, 1319);
  assert.deepEqual(warnings, []);
  assert.ok(train[0].question.startsWith("Natalia sold clips to 48 of her friends"));
  assert.equal(train[0].answer, "72");
  assert.ok(train.every((e) => /^-?[\d,.]+$/.test(e.answer)), "every answer is a number");
});

Deno.test("bad JSONL rows are counted and reported once, naming file and line", async () => {
  const dir = await Deno.makeTempDir();
  const path = `${dir}/rows.jsonl`;
  await Deno.writeTextFile(
    path,
    [
      '{"q": "one?", "a": "so #### 1"}',
      "{not json",
      "",
      '{"q": "two?"}',
      '{"q": "three?", "a": "no marker"}',
      "[1, 2]",
      '{"q": "four?", "a": "#### 4"}',
      '{"q": "   ", "a": "#### 5"}',
    ].join("\n"),
  );
  const warnings: string[] = [];
  const rows = await loadDataset(
    spec(path, { question_field: "q", answer_field: "a", answer_extractor: "gsm8k" }),
    (m) => warnings.push(m),
  );
  assert.deepEqual(rows, [
    { question: "one?", answer: "1", columns: { q: "one?", a: "so #### 1" } },
    { question: "four?", answer: "4", columns: { q: "four?", a: "#### 4" } },
  ]);
  assert.equal(warnings.length, 1);
  assert.match(warnings[0], /skipped 5 of 7 rows/);
  assert.ok(warnings[0].includes(`${path}:2: invalid JSON`), warnings[0]);
  assert.ok(warnings[0].includes(`${path}:4: field "a" missing or empty`), warnings[0]);
  assert.ok(warnings[0].includes(`${path}:5: no answer found by the "gsm8k" extractor`));

  // With no usable row it is an error that says why.
  await assert.rejects(
    () => loadDataset(spec(path, { question_field: "nope" }), () => {}),
    (e) => e instanceof AhaError && /none usable/.test(e.message) && e.message.includes(path),
  );
  await assert.rejects(() => loadDataset(spec(`${dir}/missing.jsonl`)), AhaError);
  await Deno.remove(dir, { recursive: true });
});

Deno.test("Parquet rows with a field mapping, INT64 answers and nulls", async () => {
  const dir = await Deno.makeTempDir();
  const path = `${dir}/rows.parquet`;
  const questions = ["What is 6*7?", null, "What is 2**10?", "Half of 9?"];
  const answers = [42n, 1n, 1024n, null];
  await Deno.writeFile(
    path,
    new Uint8Array(parquetWriteBuffer({
      columnData: [
        { name: "prompt", data: questions, type: "STRING" },
        { name: "target", data: answers, type: "INT64" },
      ],
    })),
  );
  const warnings: string[] = [];
  const rows = await loadDataset(
    spec(path, { question_field: "prompt", answer_field: "target" }),
    (m) => warnings.push(m),
  );
  assert.deepEqual(rows.map(({ question, answer }) => ({ question, answer })), [
    { question: "What is 6*7?", answer: "42" },
    { question: "What is 2**10?", answer: "1024" },
  ]);
  assert.equal(rows[0].columns.target, 42, "INT64 columns arrive as numbers");
  assert.match(warnings[0], /skipped 2 of 4 rows .*row 2: field "prompt" missing or empty.*row 4/);
  await Deno.writeTextFile(path, "not parquet");
  await assert.rejects(() => loadDataset(spec(path)), /not a readable Parquet file/);
  await Deno.remove(dir, { recursive: true });
});

Deno.test("answer extractors", () => {
  const cases: [string, string, string | null][] = [
    ["gsm8k", "work\n#### 1,080", "1,080"],
    ["gsm8k", "no marker 42", null],
    ["gsm8k", "####   ", null],
    ["last_number", "so it costs $1,080.", "1080"],
    ["last_number", "none", null],
    ["boxed", "thus \\boxed{1} or \\boxed{\\frac{1}{2}} end", "\\frac{1}{2}"],
    ["boxed", "\\boxed{unclosed", null],
    ["none", "  7 \n", "7"],
  ];
  for (const [name, raw, expected] of cases) {
    assert.equal(ANSWER_EXTRACTORS[name](raw), expected, `${name}: ${raw}`);
  }
});

Deno.test("format from dataset.format or the file name; unknown extractors named", async () => {
  const dir = await Deno.makeTempDir();
  await Deno.writeTextFile(`${dir}/rows.txt`, '{"question": "q?", "answer": "1"}\n');
  const rows = await loadDataset(spec(`${dir}/rows.txt`, { format: "jsonl" }));
  assert.deepEqual(rows, [{
    question: "q?",
    answer: "1",
    columns: { question: "q?", answer: "1" },
  }]);
  await assert.rejects(() => loadDataset(spec(`${dir}/rows.txt`)), /expected a .jsonl or .parquet/);
  await assert.rejects(
    () => loadDataset(spec(`${dir}/rows.txt`, { format: "jsonl", answer_extractor: "x" })),
    { message: 'unknown answer_extractor "x" (known: none, gsm8k, last_number, boxed)' },
  );
  await Deno.remove(dir, { recursive: true });
});

const items = Array.from({ length: 97 }, (_, i) => i);

Deno.test("held-out split is a seeded partition", () => {
  const a = splitHeldOut(items, 10, 1);
  assert.equal(a.heldOut.length, 10);
  assert.deepEqual([...a.train, ...a.heldOut].sort((x, y) => x - y), items);
  assert.deepEqual(splitHeldOut(items, 10, 1), a, "same seed, same split");
  assert.notDeepEqual(splitHeldOut(items, 10, 2).heldOut, a.heldOut, "other seed, other split");
  assert.equal(splitHeldOut(items, 0.25, 1).heldOut.length, 24);
  assert.throws(() => splitHeldOut(items, 97, 1), AhaError);
});

Deno.test("epoch sampler: each epoch a fresh permutation, resumable mid-epoch", () => {
  const sampler = new EpochSampler(items, 7);
  const epoch0 = sampler.take(97);
  const epoch1 = sampler.take(97);
  assert.deepEqual([...epoch0].sort((x, y) => x - y), items);
  assert.deepEqual([...epoch1].sort((x, y) => x - y), items);
  assert.notDeepEqual(epoch0, epoch1);
  assert.equal(sampler.epoch, 1);

  const run = new EpochSampler<number>(items, 7);
  const first = run.take(150); // into epoch 1
  const saved = JSON.parse(JSON.stringify(run.save()));
  const rest = run.take(100); // into epoch 2
  assert.deepEqual([...first, ...rest].slice(0, 194), [...epoch0, ...epoch1]);
  assert.deepEqual(new EpochSampler(items, saved).take(100), rest, "resumed run continues");
  assert.throws(() => new EpochSampler(items.slice(0, 10), saved), /dataset changed/);
});

Deno.test("Rng is xoshiro128** with a restorable state", () => {
  // The first outputs of the reference C implementation from state {1, 2, 3, 4}.
  const reference = Rng.restore("00000001000000020000000300000004");
  assert.deepEqual(
    Array.from({ length: 6 }, () => reference.u32()),
    [11520, 0, 5927040, 70819200, 2031721883, 1637235492],
  );
  const rng = new Rng(2024);
  rng.next();
  const copy = Rng.restore(rng.state());
  assert.deepEqual([rng.next(), rng.int(10), rng.normal()], [
    copy.next(),
    copy.int(10),
    copy.normal(),
  ]);
  assert.notEqual(new Rng(1).state(), new Rng(2).state());
  assert.notEqual(new Rng(1).state(), new Rng(1 + 2 ** 32).state(), "high seed bits count");
  // Moments of 20,000 samples (standard errors ~0.002 for the uniform, ~0.007 for the normal).
  const u = Array.from({ length: 20000 }, () => rng.next());
  const z = Array.from({ length: 20000 }, () => rng.normal());
  const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / xs.length;
  assert.ok(u.every((x) => x >= 0 && x < 1));
  assert.ok(Math.abs(mean(u) - 0.5) < 0.01);
  assert.ok(Math.abs(mean(z)) < 0.035 && Math.abs(mean(z.map((x) => x * x)) - 1) < 0.05);
  assert.throws(() => Rng.restore("0".repeat(32)), RangeError);
});
