// Every command with a table of bad inputs: each must end with exactly one line `aha: ...` that
// names the problem, a non-zero status, and never a stack trace (a line starting with "    at ").
// The inputs are the ones a hostile but fair user tried (issue 9); all fail before any GPU work,
// so the table runs in seconds.

import assert from "node:assert/strict";
import { saveCheckpoint } from "../core/checkpoint.ts";
import { initWeights } from "../core/init.ts";
import { parseModelConfig, PRESETS, toHfConfig } from "../core/model_config.ts";
import { defaultTrainConfig } from "../core/train_config.ts";
import { saveTrainingCheckpoint } from "../core/train_state.ts";
import { ArithmeticTokenizer } from "../data/arithmetic.ts";
import { ARITHMETIC_TOKENIZER_FILE } from "../data/tasks.ts";

const MAIN = new URL("../main.ts", import.meta.url).pathname;
const dir = await Deno.makeTempDir({ prefix: "aha_errors_test_" });
globalThis.addEventListener("unload", () => Deno.removeSync(dir, { recursive: true }));

// Fixtures: a tiny arithmetic model, the same with a NaN and an Infinity weight, a file where a
// directory belongs, a checkpoint whose trainer state has a negative step, bad data files.
const arith = parseModelConfig({
  ...PRESETS.tiny,
  vocab_size: new ArithmeticTokenizer().vocabSize,
});
const model = `${dir}/model`;
const marker = { [ARITHMETIC_TOKENIZER_FILE]: "{}" };
await saveCheckpoint(model, toHfConfig(arith), initWeights(arith, 0), marker);
for (const [name, value] of [["nan", NaN], ["inf", Infinity]] as const) {
  const weights = initWeights(arith, 0);
  weights.get("model.layers.1.mlp.up_proj.weight")![5] = value;
  // Written by hand (saveCheckpoint refuses non-finite weights): copy, then patch the bytes.
  await saveCheckpoint(`${dir}/${name}`, toHfConfig(arith), initWeights(arith, 0), marker);
  const { writeSafetensors } = await import("../core/safetensors.ts");
  const { weightShapes } = await import("../core/model_config.ts");
  const tensors = new Map(
    [...weightShapes(arith)].map(([n, shape]) => [n, { shape, data: weights.get(n)! }]),
  );
  await writeSafetensors(`${dir}/${name}/model.safetensors`, tensors, { format: "pt" });
}
// Finite weights so large that the forward overflows: aha loss must not print NaN gradients.
const huge = initWeights(arith, 0);
for (const [name, w] of huge) {
  if (name.endsWith("proj.weight")) w.forEach((x, i) => w[i] = x * 1e30);
}
await saveCheckpoint(`${dir}/overflow`, toHfConfig(arith), huge, marker);
const small = parseModelConfig({ ...PRESETS.tiny, vocab_size: 10 });
await saveCheckpoint(`${dir}/vocab10`, toHfConfig(small), initWeights(small, 0), marker);
await saveCheckpoint(
  `${dir}/vocab97`,
  toHfConfig(parseModelConfig(PRESETS.tiny)),
  initWeights(parseModelConfig(PRESETS.tiny), 0),
);
const shortCtx = parseModelConfig({
  ...PRESETS.tiny,
  vocab_size: arith.vocabSize,
  max_position_embeddings: 8,
});
await saveCheckpoint(`${dir}/short`, toHfConfig(shortCtx), initWeights(shortCtx, 0), marker);
await Deno.writeTextFile(`${dir}/file`, "a file");
await Deno.mkdir(`${dir}/a-dir`);
const negative = `${dir}/negative/checkpoint-3`;
await saveTrainingCheckpoint(
  negative,
  toHfConfig(arith),
  initWeights(arith, 0),
  new Map(),
  {
    step: -4,
    adam_step: 0,
    sampler: { epoch: 0, position: 0, rng: "1".repeat(32) },
    reference_model: model,
  },
  { ...defaultTrainConfig(), output_dir: `${dir}/negative` },
  marker,
);
const write = (name: string, text: string) => {
  Deno.writeTextFileSync(`${dir}/${name}`, text);
  return `${dir}/${name}`;
};
const nullJson = write("null.json", "null\n");
const sequences = write("seqs.json", JSON.stringify({ sequences: [[1, 2, 3, 4]] }));
const longSequences = write("long.json", JSON.stringify({ sequences: [Array(9).fill(1)] }));
const rowsWithNull = write("rows-null.jsonl", `{"prompt": "1+1=", "completion": "2<end>"}\nnull\n`);
const rows = write("rows.jsonl", `{"prompt": "1+1=", "completion": "2<end>"}\n`);
const hugeRow = write(
  "huge.jsonl",
  JSON.stringify({ prompt: "1+".repeat(600_000) + "1=", completion: "2<end>" }) + "\n",
);
const lossBatch = (change: Record<string, unknown>) =>
  write(
    `batch-${crypto.randomUUID()}.json`,
    JSON.stringify({
      prompt_len: 1,
      sequences: [[1, 2], [1, 3]],
      pad_id: 0,
      rewards: [0, 1],
      group_size: 2,
      beta: 0,
      epsilon: 0.2,
      ...change,
    }),
  );
const config = (text: string) => write(`config-${crypto.randomUUID()}.json`, text);

const set = (...settings: string[]) => settings.flatMap((s) => ["--set", s]);
const out = (name: string) => `output_dir=${dir}/runs/${name}`;

/** [command line, what the one line must say]. */
const CASES: [string[], RegExp][] = [
  // train
  [["train", ...set(`output_dir=${dir}/file`)], /output directory .*file: exists and is a file/],
  [
    ["train", ...set(`output_dir=${dir}/file/below`)],
    /output directory .*: cannot create or write/,
  ],
  [
    ["train", "--resume", negative],
    /trainer_state\.json: field "step" must be an integer ≥ 0, got -4/,
  ],
  [["train", "--resume", model], /not a training checkpoint/],
  [["train", "--resume", `${dir}/nowhere/checkpoint-1`], /no such directory/],
  [["train", ...set("beta=.nan", out("nan"))], /"beta" must be .*, got NaN/],
  [
    ["train", ...set("learning_rate=", out("empty"))],
    /"learning_rate" must be .*, got an empty value/,
  ],
  [["train", ...set("learning_rate=.inf", out("inf"))], /"learning_rate" must be .*, got Infinity/],
  [
    ["train", ...set(`model=${dir}/nan`, out("nanmodel"))],
    /"model\.layers\.1\.mlp\.up_proj\.weight" holds NaN at index 5/,
  ],
  [["train", ...set(`model=${dir}/inf`, out("infmodel"))], /up_proj\.weight" holds Infinity/],
  [
    ["train", ...set(`model=${dir}/vocab97`, out("vocab97"))],
    /arithmetic task needs a model made for its character tokenizer/,
  ],
  [
    ["train", ...set(`model=${dir}/vocab10`, out("vocab10"))],
    /vocab_size 10 is too small for the task's tokenizer/,
  ],
  [
    ["train", ...set(`model=${dir}/short`, out("short"))],
    /exceeds the model's max_position_embeddings \(8\)/,
  ],
  [[
    "train",
    ...set(
      "reference.adapter=vulkan",
      "reference.env.VK_ICD_FILENAMES=/nonexistent.json",
      out("noadapter"),
    ),
  ], /reference\.adapter: "vulkan" gives no WebGPU adapter/],
  [
    ["train", ...set("reference.env.DENO_WEBGPU_BACKEND=nonsense", out("nobackend"))],
    /reference\.env\.DENO_WEBGPU_BACKEND: "nonsense" gives no WebGPU adapter/,
  ],
  [["train", ...set("sft.data=rows.jsonl", out("sftdata"))], /unknown key "sft\.data"/],
  // sft
  [
    ["sft", "--model", model, "--data", rowsWithNull, "--out", `${dir}/sft1`],
    /rows-null\.jsonl:2: expected \{"prompt"/,
  ],
  [
    ["sft", "--model", model, "--data", rows, "--learning-rate", "Infinity"],
    /--learning-rate must be a positive finite number/,
  ],
  [["sft", "--model", model, "--data", rows, "--out", `${dir}/file`], /--out .*file is a file/],
  [["sft", "--model", `${dir}/nan`, "--data", rows], /holds NaN/],
  [["sft", "--model", model, "--data", hugeRow], /huge\.jsonl:1: a row of \d+ characters/],
  [[
    "sft",
    "--model",
    `${dir}/short`,
    "--data",
    write("long.jsonl", JSON.stringify({ prompt: "1+1=", completion: "2222222<end>" }) + "\n"),
  ], /more than the model's max_position_embeddings \(8\)/],
  // init
  [[
    "init",
    "--config",
    config(
      `{"vocab_size": 1e12, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2}`,
    ),
    "--out",
    `${dir}/huge`,
  ], /more than this machine's .* of memory/],
  [["init", "--config", `{"vocab_size":1e12}`, "--out", `${dir}/i3`], /file not found/],
  [["init", "--config", config("null"), "--out", `${dir}/i2`], /expected a JSON object/],
  // score
  [
    ["score", "--model", model, "--input", sequences, "--output", `${dir}/a-dir`],
    /--output .*a-dir: cannot write \(is a directory\)/,
  ],
  [
    ["score", "--model", model, "--input", sequences, "--output", `${dir}/no/such/out.json`],
    /--output .*: cannot write/,
  ],
  [["score", "--model", model, "--input", nullJson], /field "sequences" must be an array/],
  [["score", "--model", `${dir}/nan`, "--input", sequences], /holds NaN/],
  [
    ["score", "--model", `${dir}/short`, "--input", longSequences],
    /sequences\[0\] has 9 tokens, more than the model's max_position_embeddings \(8\)/,
  ],
  // loss
  [["loss", "--model", model, "--batch", nullJson], /null\.json: expected a JSON object/],
  [
    ["loss", "--model", model, "--batch", lossBatch({ sequences: [[1], [2]] })],
    /"sequences" must be arrays of at least 2 tokens/,
  ],
  [
    ["loss", "--model", model, "--batch", lossBatch({}), "--output", `${dir}/a-dir`],
    /is a directory/,
  ],
  [["loss", "--model", `${dir}/inf`, "--batch", lossBatch({})], /holds Infinity/],
  [
    ["loss", "--model", `${dir}/overflow`, "--batch", lossBatch({ beta: 0.1 })],
    /non-finite\): nothing written/,
  ],
  // the rest
  [
    ["plan", write("plan.yaml", "model: /nowhere/qwen\n")],
    /give "model" a directory with its config\.json/,
  ],
  [
    ["train", ...set("model=/nowhere/qwen", out("nowhere"))],
    /give "model" a directory with its config\.json/,
  ],
  [["tokenize", "--tokenizer", `${dir}/nowhere`, "hi"], /nowhere/],
  [["rewards", "--input", nullJson], /null\.json/],
  [["nonsense"], /unknown command "nonsense"/],
];

async function aha(args: string[]) {
  const { code, stdout, stderr } = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", MAIN, ...args],
    stdout: "piped",
    stderr: "piped",
    env: { XDG_RUNTIME_DIR: dir },
  }).output();
  const text = (bytes: Uint8Array) => new TextDecoder().decode(bytes);
  return { code, stdout: text(stdout), stderr: text(stderr) };
}

Deno.test("every command answers bad input with one aha: line and no stack trace", async () => {
  let ran = 0;
  const failures: string[] = [];
  for (const [args, expected] of CASES) {
    const { code, stdout, stderr } = await aha(args);
    ran++;
    const lines = stderr.split("\n").filter((l) => l.trim() !== "" && !l.includes("XDG_RUNTIME"));
    const what = `aha ${args.join(" ").slice(0, 160)}`;
    if ((stdout + stderr).split("\n").some((l) => l.startsWith("    at "))) {
      failures.push(`${what}: a stack trace\n${stderr.slice(0, 600)}`);
    } else if (code === 0) {
      failures.push(`${what}: exit 0`);
    } else if (lines.length !== 1 || !lines[0].startsWith("aha: ")) {
      failures.push(`${what}: not one aha: line\n${stderr.slice(0, 600)}`);
    } else if (!expected.test(lines[0])) {
      failures.push(`${what}: ${lines[0]}\n  does not match ${expected}`);
    }
  }
  assert.equal(ran, CASES.length);
  assert.deepEqual(failures, [], failures.join("\n\n"));
});

Deno.test("a bad AHA_KEPT_TEXTURE_BYTES stops every command with one line, before any work", async () => {
  // The budget is read deep inside the kernels; every command must refuse it first: aha train
  // before its run directory, the others before their own arguments are even looked at.
  const output = `${dir}/kept-bytes-run`;
  const commands = [
    ["train", "--set", `output_dir=${output}`],
    ["sft", `${dir}/no-such.yaml`],
    ["eval", `${dir}/no-such-model`],
    ["plan", `${dir}/no-such.yaml`],
    ["score", `${dir}/no-such-model`],
  ];
  for (const args of commands) {
    const { code, stderr } = await new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", MAIN, ...args],
      stderr: "piped",
      env: { XDG_RUNTIME_DIR: dir, AHA_KEPT_TEXTURE_BYTES: "lots" },
    }).output();
    const lines = new TextDecoder().decode(stderr).split("\n").filter((l) => l.trim() !== "");
    assert.notEqual(code, 0, args[0]);
    assert.deepEqual(lines, [
      'aha: AHA_KEPT_TEXTURE_BYTES must be a number of bytes ≥ 0, got "lots"',
    ], args[0]);
  }
  assert.equal(await Deno.stat(output).then(() => true, () => false), false, "no run directory");
});
