// GSM8K with the real Qwen2.5 tokenizer. First the task alone (data/tasks.ts datasetTask):
// templated prompts, over-long ones skipped, the held-out split, resuming, decoding and the
// judgements. Then end to end: a tiny random Qwen2 checkpoint whose vocabulary is the real one
// (151,936 rows, tied embeddings, the genuine tokenizer files beside it) trained for two GRPO
// steps by `aha train` in a subprocess: prompts went through the chat template with the seed's
// system prompt, completions came back as text, the seed's rewards were computed (recomputed here
// from the logged completions), and metrics, evaluations and a checkpoint with the tokenizer
// files were written. (A random model's completions all score -2, so no group has a learning
// signal and the steps skip the update: the trainer's own tests cover it.)

import assert from "node:assert/strict";
import { saveCheckpoint } from "../core/checkpoint.ts";
import { initWeights } from "../core/init.ts";
import { parseModelConfig, toHfConfig } from "../core/model_config.ts";
import { correctnessReward, DEFAULT_SYSTEM_PROMPT, formatReward } from "../core/rewards.ts";
import { loadTokenizer } from "../core/tokenizer.ts";
import { loadTrainConfig } from "../core/train_config.ts";
import { datasetTask } from "../data/tasks.ts";

const QWEN = new URL("./fixtures/qwen2-tokenizer", import.meta.url).pathname;
const GSM8K = new URL("../data/gsm8k", import.meta.url).pathname;
const MAIN = new URL("../main.ts", import.meta.url).pathname;
const TOKENIZER_FILES = [
  "vocab.json",
  "merges.txt",
  "tokenizer_config.json",
  "generation_config.json",
];

Deno.test("the GSM8K task: templated prompts, long ones skipped, held out, resumable", async () => {
  const tokenizer = await loadTokenizer(`${QWEN}`);
  const settings = [
    "model=unused",
    `dataset.path=${GSM8K}/train.jsonl`,
    "dataset.format=jsonl",
    "max_prompt_length=150", // the median templated question is ~160 tokens
    "eval_prompts=5",
  ];
  const warnings: string[] = [];
  const task = await datasetTask(
    loadTrainConfig(null, settings),
    tokenizer,
    (m) => warnings.push(m),
  );
  assert.deepEqual(task.rewards.map((r) => r.name), ["format", "correctness"]);
  assert.ok(
    task.eosIds.includes(151645) && task.eosIds.includes(151643),
    "<|im_end|>, <|endoftext|>",
  );

  const drawn = task.nextExamples(20);
  assert.equal(task.heldOut.length, 5);
  for (const e of [...task.heldOut, ...drawn]) {
    const question = e.question as string;
    assert.equal(e.prompt, tokenizer.chatTemplate!.prompt(question, DEFAULT_SYSTEM_PROMPT));
    assert.deepEqual(e.promptIds, tokenizer.encode(e.prompt));
    assert.ok(e.promptIds.length <= 150);
  }
  assert.equal(warnings.length, 1, "the first skip is reported, once");
  assert.match(warnings[0], /skipping prompts longer than max_prompt_length \(150 tokens\)/);
  const heldOut = new Set(task.heldOut.map((e) => e.question));
  assert.ok(drawn.every((e) => !heldOut.has(e.question)), "held-out rows are never drawn");

  const state = task.samplerState();
  const next = task.nextExamples(3).map((e) => e.question);
  task.restoreSampler(state);
  assert.deepEqual(task.nextExamples(3).map((e) => e.question), next);

  const completion = task.decode(
    tokenizer.encode("<think>24+48</think> <answer>72</answer><|im_end|>"),
  );
  assert.equal(completion, "<think>24+48</think> <answer>72</answer>");
  const example = { ...drawn[0], answer: "72" };
  assert.ok(task.isFormatted(completion, example) && task.isCorrect(completion, example));
  assert.ok(!task.isFormatted("72", example) && !task.isCorrect("<answer>71</answer>", example));

  // With eval_path, held-out prompts are that file's first rows that fit.
  const withTest = await datasetTask(
    loadTrainConfig(null, [...settings, `dataset.eval_path=${GSM8K}/test.jsonl`]),
    tokenizer,
    () => {},
  );
  const firstTest = JSON.parse(
    (await Deno.readTextFile(`${GSM8K}/test.jsonl`)).split("\n")[0],
  );
  const fits =
    tokenizer.encode(tokenizer.chatTemplate!.prompt(firstTest.question, DEFAULT_SYSTEM_PROMPT))
      .length <= 150;
  assert.equal(withTest.heldOut.length, 5);
  assert.equal(withTest.heldOut[0].question === firstTest.question, fits);
});

Deno.test("a huge question is measured and skipped, never tokenized whole", async () => {
  const tmp = await Deno.makeTempDir({ prefix: "aha_huge_row_" });
  const rows = [
    { question: "What is 1+1? ".repeat(400_000), answer: "#### 2" }, // 5 MB
    { question: "What is 2+2?", answer: "#### 4" },
  ];
  await Deno.writeTextFile(`${tmp}/eval.jsonl`, rows.map((r) => JSON.stringify(r)).join("\n"));
  const warnings: string[] = [];
  const started = performance.now();
  const task = await datasetTask(
    loadTrainConfig(null, [
      "model=unused",
      `dataset.path=${GSM8K}/test.jsonl`,
      `dataset.eval_path=${tmp}/eval.jsonl`,
      "max_prompt_length=150",
      "eval_prompts=1",
    ]),
    await loadTokenizer(QWEN),
    (m) => warnings.push(m),
  );
  assert.equal(task.heldOut.length, 1);
  assert.equal(task.heldOut[0].question, "What is 2+2?");
  assert.match(warnings[0], /the first has 5\d{6} characters/);
  assert.ok(performance.now() - started < 20_000, "the huge row was not tokenized");
  await Deno.remove(tmp, { recursive: true });
});

Deno.test("aha train runs GRPO on GSM8K with a real-vocabulary tiny Qwen2", async () => {
  const tmp = await Deno.makeTempDir({ prefix: "aha_gsm8k_" });
  try {
    const model = `${tmp}/model`, out = `${tmp}/run`;
    const config = parseModelConfig({
      vocab_size: 151936,
      hidden_size: 32,
      intermediate_size: 64,
      num_hidden_layers: 1,
      num_attention_heads: 2,
      num_key_value_heads: 1,
      tie_word_embeddings: true,
      rope_theta: 1000000,
      max_position_embeddings: 512,
      bos_token_id: 151643,
      eos_token_id: 151645,
    });
    const files: Record<string, Uint8Array> = {};
    for (const name of TOKENIZER_FILES) {
      files[name] = await Deno.readFile(`${QWEN}/${name}`);
    }
    await saveCheckpoint(model, toHfConfig(config), initWeights(config, 7), files);

    const sets = {
      model,
      "dataset.path": `${GSM8K}/train.jsonl`,
      "dataset.format": "jsonl",
      max_steps: 2,
      prompts_per_step: 2,
      num_generations: 2,
      max_prompt_length: 256, // the median templated question is ~160 tokens
      max_completion_length: 8,
      eval_prompts: 2,
      sample_steps: 1,
      "sft.steps": 0,
      output_dir: out,
    };
    const args = ["run", "-A", MAIN, "train"];
    for (const [key, value] of Object.entries(sets)) args.push("--set", `${key}=${value}`);
    await Deno.mkdir("/tmp/xdg", { recursive: true, mode: 0o700 });
    const run = await new Deno.Command(Deno.execPath(), {
      args,
      env: { XDG_RUNTIME_DIR: "/tmp/xdg" },
      stdout: "piped",
      stderr: "piped",
    }).output();
    const log = new TextDecoder().decode(run.stdout) + new TextDecoder().decode(run.stderr);
    assert.equal(run.code, 0, log);

    const jsonl = async (name: string) =>
      (await Deno.readTextFile(`${out}/${name}`)).trim().split("\n").map((l) => JSON.parse(l));
    const metrics = await jsonl("metrics.jsonl");
    assert.deepEqual(metrics.map((m) => m.step), [1, 2]);
    for (const m of metrics) {
      for (const key of ["reward", "rewards/format", "rewards/correctness", "reflection_rate"]) {
        assert.equal(typeof m[key], "number", `metrics.jsonl: ${key}`);
      }
    }
    assert.deepEqual((await jsonl("eval.jsonl")).map((e) => [e.step, e.examples]), [[0, 2], [
      2,
      2,
    ]]);

    // With no held-out problems, an evaluation says so instead of reporting "accuracy 0.0%".
    const noEval = [...args, "--set", "dataset.eval_fraction=0", "--set", "max_steps=1"];
    const noEvalOut = ["--set", `output_dir=${tmp}/no-eval`, "--set", "beta=0"];
    const empty = await new Deno.Command(Deno.execPath(), {
      args: [...noEval, ...noEvalOut],
      env: { XDG_RUNTIME_DIR: "/tmp/xdg" },
      stdout: "piped",
      stderr: "piped",
    }).output();
    const emptyLog = new TextDecoder().decode(empty.stdout) +
      new TextDecoder().decode(empty.stderr);
    assert.equal(empty.code, 0, emptyLog);
    assert.match(emptyLog, /eval @0 .*no held-out problems, nothing measured/);
    assert.doesNotMatch(emptyLog, /accuracy 0\.0%/);

    // Each sample: a templated GSM8K question, its decoded completion and the seed's rewards.
    const questions = new Map(
      (await Deno.readTextFile(`${GSM8K}/train.jsonl`)).trim().split("\n").map((l) => {
        const row = JSON.parse(l);
        return [row.question, row.answer.split("####").at(-1).trim()];
      }),
    );
    const samples = await jsonl("samples.jsonl");
    assert.ok(samples.length >= 4, "best and worst of the first group at steps 1 and 2");
    for (const s of samples) {
      const user = s.prompt.match(
        /<\|im_start\|>user\n([\s\S]*)<\|im_end\|>\n<\|im_start\|>assistant\n$/,
      );
      assert.ok(s.prompt.startsWith(`<|im_start|>system\n${DEFAULT_SYSTEM_PROMPT}<|im_end|>\n`));
      assert.ok(user && questions.get(user[1]) === s.answer, "the user turn is a GSM8K question");
      assert.equal(typeof s.completion, "string");
      assert.ok(!s.completion.includes("<|im_end|>"), "special tokens are skipped");
      assert.equal(s.rewards.format, formatReward(s.prompt, s.completion));
      assert.equal(s.rewards.correctness, correctnessReward(s.prompt, s.completion, s));
      assert.equal(s.rewards.total, s.rewards.format + s.rewards.correctness);
    }

    const checkpoint = `${out}/checkpoint-2`;
    for (const name of ["config.json", "model.safetensors", ...TOKENIZER_FILES]) {
      assert.ok((await Deno.stat(`${checkpoint}/${name}`)).isFile, `${checkpoint}/${name}`);
    }
  } finally {
    await Deno.remove(tmp, { recursive: true });
  }
});
