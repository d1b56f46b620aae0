// `aha tokenize` and `aha rewards` as a user runs them: subprocesses of main.ts, checking what
// they print, their exit codes, and one-line errors for bad input.

import assert from "node:assert/strict";

const MAIN = new URL("../main.ts", import.meta.url).pathname;
const QWEN = new URL("./fixtures/qwen2-tokenizer", import.meta.url).pathname;

async function aha(...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  const out = await new Deno.Command(Deno.execPath(), { args: ["run", "-A", MAIN, ...args] })
    .output();
  const text = new TextDecoder();
  return { code: out.code, stdout: text.decode(out.stdout), stderr: text.decode(out.stderr) };
}

Deno.test("aha tokenize prints the text and its ids", async () => {
  const plain = await aha("tokenize", "--tokenizer", QWEN, "Hello, world!");
  assert.equal(plain.code, 0, plain.stderr);
  assert.deepEqual(JSON.parse(plain.stdout), { text: "Hello, world!", ids: [9707, 11, 1879, 0] });

  const chat = await aha("tokenize", "--tokenizer", QWEN, "--chat", "--system", "Be brief.", "Hi");
  assert.equal(chat.code, 0, chat.stderr);
  const { text, ids } = JSON.parse(chat.stdout);
  assert.equal(
    text,
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
  );
  assert.deepEqual(ids.slice(0, 3), [151644, 8948, 198]); // <|im_start|> system \n
  assert.deepEqual(ids.slice(-3), [151644, 77091, 198]); // <|im_start|> assistant \n
});

Deno.test("aha tokenize: usage errors and a missing tokenizer, in one line", async () => {
  const noText = await aha("tokenize", "--tokenizer", QWEN);
  assert.equal(noText.code, 2);
  assert.equal(noText.stderr.trim(), "aha: tokenize: expected one TEXT argument, got 0");
  const nowhere = await aha("tokenize", "--tokenizer", "/nonexistent/model", "x");
  assert.equal(nowhere.code, 1);
  assert.match(nowhere.stderr, /^aha: \/nonexistent\/model: no tokenizer.json/);
  assert.equal(nowhere.stderr.trim().split("\n").length, 1);
});

Deno.test("aha rewards scores each row with the defaults or a config's selection", async () => {
  const dir = await Deno.makeTempDir();
  const input = `${dir}/rows.jsonl`;
  await Deno.writeTextFile(
    input,
    [
      { completion: "<think>6*7</think>\n<answer>42</answer>", answer: "42" },
      { completion: "<think>x</think><answer>41</answer> ok?", answer: "42" },
      { completion: "The total is $1,080.", answer: "1,080" },
    ].map((r) => JSON.stringify(r)).join("\n") + "\n",
  );
  const defaults = await aha("rewards", "--input", input);
  assert.equal(defaults.code, 0, defaults.stderr);
  assert.deepEqual(defaults.stdout.trim().split("\n").map((l) => JSON.parse(l)), [
    { format: 1.25, correctness: 1, total: 2.25 },
    { format: -1, correctness: -1, total: -2 },
    { format: -1, correctness: 1, total: 0 },
  ]);

  const config = `${dir}/config.yaml`;
  await Deno.writeTextFile(
    config,
    "learning_rate: 1.0e-6\nreward_funcs: [correctness, format]\nreward_weights: [2, 0.5]\n",
  );
  const weighted = await aha("rewards", "--config", config, "--input", input);
  assert.equal(weighted.code, 0, weighted.stderr);
  assert.deepEqual(JSON.parse(weighted.stdout.split("\n")[0]), {
    correctness: 1,
    format: 1.25,
    total: 2.625,
  });

  await Deno.writeTextFile(config, "reward_funcs: [format, length]\n");
  const unknown = await aha("rewards", "--config", config, "--input", input);
  assert.equal(unknown.code, 1);
  assert.equal(
    unknown.stderr.trim(),
    `aha: ${config}: unknown reward function "length" (known: format, correctness)`,
  );

  await Deno.writeTextFile(input, '{"completion": "4", "answer": "4"}\n{"completion": "4"}\n');
  const missing = await aha("rewards", "--input", input);
  assert.equal(missing.code, 1);
  assert.equal(missing.stdout.trim(), "", "every row is read before any is scored");
  assert.equal(missing.stderr.trim(), `aha: ${input}:2: field "answer" must be a string`);
  await Deno.remove(dir, { recursive: true });
});
