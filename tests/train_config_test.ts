// The training config: defaults are valid, a YAML file and --set overrides apply in order, each
// kind of mistake is one line naming the key, the learning-rate schedules, and how
// reference.engine auto chooses.

import assert from "node:assert/strict";
import { AhaError } from "../core/errors.ts";
import {
  defaultTrainConfig,
  learningRateAt,
  loadTrainConfig,
  ONNX_AUTO_MAX_BYTES,
  referenceEngine,
  type TrainConfig,
} from "../core/train_config.ts";

const dir = Deno.makeTempDirSync();
globalThis.addEventListener("unload", () => Deno.removeSync(dir, { recursive: true }));
let files = 0;
function yaml(text: string): string {
  const path = `${dir}/config${files++}.yaml`;
  Deno.writeTextFileSync(path, text);
  return path;
}

/** The one-line AhaError message that loading gives. */
function loadError(path: string | null, sets: string[] = []): string {
  try {
    loadTrainConfig(path, sets);
  } catch (e) {
    assert.ok(e instanceof AhaError, `expected an AhaError, got ${e}`);
    assert.ok(!e.message.includes("\n"), `one line: ${e.message}`);
    return e.message;
  }
  assert.fail("expected an error");
}

Deno.test("defaults are valid and returned fresh each time", () => {
  assert.deepEqual(loadTrainConfig(null, []), defaultTrainConfig());
  const a = defaultTrainConfig();
  a.reward_funcs.push("x");
  assert.notDeepEqual(a, defaultTrainConfig());
  assert.deepEqual(loadTrainConfig(yaml(""), []), defaultTrainConfig());
});

Deno.test("YAML file, then --set overrides in order, nested sections with dotted keys", () => {
  const path = yaml(`
learning_rate: 1e-5
num_generations: 4
loss_type: dr_grpo
reward_weights: [1.0, 0.5]
model: /models/qwen
dataset:
  path: gsm8k.jsonl
  format: jsonl
reference:
  env: { DENO_WEBGPU_BACKEND: gl, RETRIES: 2 }
`);
  const cfg = loadTrainConfig(path, [
    "num_generations=6",
    "dataset.eval_fraction=0.1",
    "reference.adapter=vulkan",
    "system_prompt=Answer with a number: then stop",
    "epsilon_high=null",
    "top_k=50",
    "top_k=40",
  ]);
  const expected: TrainConfig = defaultTrainConfig();
  Object.assign(expected, {
    learning_rate: 1e-5,
    num_generations: 6,
    loss_type: "dr_grpo",
    reward_weights: [1, 0.5],
    // A dataset task without reward_funcs gets the seed's rewards.
    reward_funcs: ["format", "correctness"],
    model: "/models/qwen",
    system_prompt: "Answer with a number: then stop",
    top_k: 40,
  });
  Object.assign(expected.dataset, { path: "gsm8k.jsonl", format: "jsonl", eval_fraction: 0.1 });
  Object.assign(expected.reference, {
    adapter: "vulkan",
    env: { DENO_WEBGPU_BACKEND: "gl", RETRIES: "2" },
  });
  assert.deepEqual(cfg, expected);
});

Deno.test("unknown keys: one line with a did-you-mean", () => {
  const path = yaml("learning_rat: 0.001\n");
  assert.equal(
    loadError(path),
    `${path}: unknown key "learning_rat" (did you mean "learning_rate"?)`,
  );
  assert.match(
    loadError(null, ["dataset.pth=x.jsonl"]),
    /"dataset.pth" \(did you mean "dataset.path"\?\)/,
  );
  assert.match(loadError(null, ["path=x.jsonl"]), /did you mean "dataset.path"/);
  assert.match(loadError(yaml("sft:\n  lerning_rate: 1\n")), /did you mean "sft.learning_rate"/);
  assert.equal(loadError(null, ["zzzzzz=1"]), `--set zzzzzz=1: unknown key "zzzzzz"`);
});

Deno.test("wrong types and out-of-range values: one line naming key and expectation", () => {
  const path = yaml("num_generations: four\n");
  assert.equal(loadError(path), `${path}: "num_generations" must be an integer ≥ 2, got "four"`);
  const cases: [string, RegExp][] = [
    ["num_generations=1", /"num_generations" must be an integer ≥ 2, got 1$/],
    ["max_steps=2.5", /"max_steps" must be an integer ≥ 1, got 2.5$/],
    ["top_p=1.5", /"top_p" must be a number in \(0, 1\], got 1.5$/],
    ["temperature=0", /"temperature" must be a number > 0, got 0$/],
    ["beta=-0.1", /"beta" must be a number ≥ 0/],
    ["loss_type=ppo", /"loss_type" must be one of grpo \| bnpo \| dr_grpo \| dapo, got "ppo"$/],
    ["scale_rewards=yes", /"scale_rewards" must be true or false, got "yes"$/],
    ["reward_weights=[1, x]", /"reward_weights" must be a list of numbers or null/],
    ["reference.engine=tensorrt", /"reference.engine" must be one of auto \| webgpu \| onnx/],
    ["dataset=3", /"dataset" must be a mapping/],
    ["output_dir=", /"output_dir" must be a non-empty string, got an empty value$/],
    ["beta=.nan", /"beta" must be a number ≥ 0, got NaN$/],
  ];
  for (const [set, pattern] of cases) {
    const message = loadError(null, [set]);
    assert.ok(message.startsWith(`--set ${set}: `), message);
    assert.match(message, pattern);
  }
  assert.match(loadError(null, ["learning_rate"]), /--set learning_rate: expected key=value/);
  assert.match(loadError(yaml("- 1\n- 2\n")), /the file must be a mapping/);
  assert.match(loadError(yaml("a: [1, 2\n")), /invalid YAML: .* at line \d+, column \d+$/);
  assert.match(loadError(`${dir}/missing.yaml`), /missing.yaml: cannot read/);
});

Deno.test("relations between keys", () => {
  assert.match(
    loadError(null, ["reward_weights=[1, 2, 3]"]),
    /"reward_weights" has 3 values but "reward_funcs" names 2 functions/,
  );
  assert.match(loadError(null, ["reward_funcs=[]"]), /"reward_funcs" must name at least one/);
  assert.match(loadError(null, ["dataset.format=jsonl"]), /"dataset.path" is required/);
  assert.match(
    loadError(null, ["eval_prompts=300"]),
    /"eval_prompts" \(300\) must be at most "arithmetic.held_out" \(100\)/,
  );
  assert.match(
    loadError(null, ["dataset.format=jsonl", "dataset.path=a.jsonl"]),
    /"model" must name a model directory/,
  );
  // Either reference engine serves the sampling temperature.
  const onnx = loadTrainConfig(null, ["reference.engine=onnx", "temperature=0.9", "beta=0.04"]);
  assert.equal(onnx.temperature, 0.9);
});

Deno.test("learning-rate schedules", () => {
  const cfg = (type: TrainConfig["lr_scheduler_type"]) => ({
    ...defaultTrainConfig(),
    learning_rate: 1,
    warmup_steps: 4,
    max_steps: 14,
    lr_scheduler_type: type,
  });
  const at = (type: TrainConfig["lr_scheduler_type"], steps: number[]) =>
    steps.map((s) => learningRateAt(cfg(type), s));
  assert.deepEqual(at("constant", [0, 3, 13]), [1, 1, 1]);
  assert.deepEqual(at("constant_with_warmup", [0, 1, 3, 4, 13]), [0.25, 0.5, 1, 1, 1]);
  const rounded = (xs: number[]) => xs.map((x) => Math.round(x * 1e12) / 1e12);
  assert.deepEqual(rounded(at("linear", [0, 3, 4, 9, 13, 14])), [0.25, 1, 1, 0.5, 0.1, 0]);
  assert.deepEqual(rounded(at("cosine", [0, 4, 9, 14])), [0.25, 1, 0.5, 0]);
  // Without warmup the first update runs at the full rate.
  assert.equal(learningRateAt({ ...cfg("linear"), warmup_steps: 0 }, 0), 1);
});

Deno.test("a dataset path alone selects its format and the seed's rewards", () => {
  const cfg = loadTrainConfig(null, ["model=/m", "dataset.path=/data/train.parquet"]);
  assert.equal(cfg.dataset.format, "parquet");
  assert.deepEqual(cfg.reward_funcs, ["format", "correctness"]);
  assert.throws(
    () => loadTrainConfig(null, ["model=/m", "dataset.path=/data/train.csv"]),
    /"dataset.path" \/data\/train.csv is not .jsonl or .parquet: set "dataset.format"/,
  );
});

Deno.test("reference.engine auto: ONNX for small models without a GPU, else WebGPU", () => {
  const cfg = (engine: TrainConfig["reference"]["engine"], onnx: string | null = null) => {
    const c = defaultTrainConfig();
    c.reference = { ...c.reference, engine, onnx };
    return c;
  };
  const small = 100_000, limit = ONNX_AUTO_MAX_BYTES / 4;
  assert.equal(defaultTrainConfig().reference.engine, "auto");
  assert.equal(referenceEngine(cfg("auto"), true, small), "onnx");
  assert.equal(referenceEngine(cfg("auto"), true, limit), "onnx");
  assert.equal(referenceEngine(cfg("auto"), true, limit + 1), "webgpu", "too large for WASM");
  assert.equal(referenceEngine(cfg("auto"), false, small), "webgpu", "a hardware GPU");
  assert.equal(referenceEngine(cfg("auto", "/m.onnx"), false, small), "onnx", "an export given");
  for (const adapter of ["same", "gl"] as const) {
    const named = cfg("auto");
    named.reference.adapter = adapter;
    assert.equal(referenceEngine(named, true, small), "webgpu", `reference.adapter ${adapter}`);
  }
  // Named engines are kept whatever the machine.
  assert.equal(referenceEngine(cfg("webgpu"), true, small), "webgpu");
  assert.equal(referenceEngine(cfg("onnx"), false, limit * 10), "onnx");
  assert.throws(
    () => loadTrainConfig(null, ["reference.engine=cuda"]),
    (e: Error) => e instanceof AhaError && /reference\.engine/.test(e.message),
  );
});
