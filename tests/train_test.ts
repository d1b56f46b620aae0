// `aha train` end to end on the built-in arithmetic task: GRPO raises the reward (an outcome,
// not a timing), a resumed run ends with exactly the weights of an uninterrupted one, Ctrl-C
// saves a checkpoint, and a bad config stops before any work with one line.

import assert from "node:assert/strict";
import { gpuTest } from "./helpers.ts";

const MAIN = new URL("../main.ts", import.meta.url).pathname;
const dir = await Deno.makeTempDir({ prefix: "aha-train-test-" });
globalThis.addEventListener("unload", () => Deno.removeSync(dir, { recursive: true }));

/** `--set key=value` for each setting. */
const set = (...settings: string[]) => settings.flatMap((s) => ["--set", s]);

// Small but real: 4 prompts × 4 samples per step on sums of operands 0–19, after a base model
// whose answers are right but half the time in a non-canonical format: the signal GRPO must find.
const COMMON = set(
  "arithmetic.max_operand=19",
  "arithmetic.held_out=50",
  "arithmetic.carry_error_rate=0",
  "arithmetic.format_error_rate=0.5",
  "eval_prompts=20",
  "prompts_per_step=4",
  "num_generations=4",
  "max_completion_length=6",
  "sft.steps=60",
  "eval_steps=0",
  "sample_steps=0",
);

/** Run `aha train`; after step `interruptAfterStep`, Ctrl-C the trainer (or kill its worker). */
async function train(args: string[], interruptAfterStep?: number, killWorker = false) {
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", MAIN, "train", ...COMMON, ...args],
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  let stdout = "";
  const decoder = new TextDecoder();
  for await (const chunk of child.stdout) {
    stdout += decoder.decode(chunk);
    if (
      interruptAfterStep !== undefined && new RegExp(`step +${interruptAfterStep}/`).test(stdout)
    ) {
      if (killWorker) Deno.kill(Number(stdout.match(/worker pid (\d+)/)![1]), "SIGKILL");
      else child.kill("SIGINT");
      interruptAfterStep = undefined;
    }
  }
  const stderr = decoder.decode(await new Response(child.stderr).arrayBuffer());
  const { code } = await child.status;
  return { code, stdout, stderr };
}

const readJsonl = (path: string) =>
  Deno.readTextFileSync(path).trim().split("\n").map((line) => JSON.parse(line));

Deno.test("GRPO raises the mean reward clearly above its start", gpuTest, async () => {
  const out = `${dir}/learn`;
  const run = await train(set(`output_dir=${out}`, "max_steps=30", "learning_rate=2e-3"));
  assert.equal(run.code, 0, run.stderr);
  const rewards = readJsonl(`${out}/metrics.jsonl`).map((m) => m.reward as number);
  assert.equal(rewards.length, 30);
  const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / xs.length;
  const start = mean(rewards.slice(0, 5)), end = mean(rewards.slice(-5));
  // Rewards are in [0, 2] (correct + canonical format): a rise of 0.15 is far outside the
  // step-to-step noise of 16 samples per step.
  assert.ok(end > start + 0.15, `mean reward of the first 5 steps ${start}, last 5 ${end}`);
  const evals = readJsonl(`${out}/eval.jsonl`);
  assert.deepEqual(evals.map((e) => e.step), [0, 30]);
  for (
    const key of [
      "reward",
      "reward_std",
      "accuracy",
      "format_rate",
      "kl",
      "clip_ratio",
      "loss",
      "grad_norm",
      "learning_rate",
      "tokens_per_s",
      "generate_s",
      "reference_s",
      "train_s",
      "frac_reward_zero_std",
      "completion_length",
      "rewards/arith_correct",
      "rewards/arith_format",
    ]
  ) {
    assert.ok(key in readJsonl(`${out}/metrics.jsonl`)[0], `metrics.jsonl lacks ${key}`);
  }
});

/** 6 steps straight, and 3 + resume + 3, with `extra` settings: the same weights at the end. */
async function assertExactResume(name: string, extra: string[]) {
  const base = `${dir}/learn/base`; // made by the first test, or made here
  const model = await Deno.stat(`${base}/model.safetensors`).then(
    () => ["--set", `model=${base}`],
    () => [],
  );
  const straight = await train([
    ...model,
    ...set(`output_dir=${dir}/${name}-straight`, "max_steps=6", ...extra),
  ]);
  assert.equal(straight.code, 0, straight.stderr);
  const first = await train([
    ...model,
    ...set(`output_dir=${dir}/${name}-split`, "max_steps=3", ...extra),
  ]);
  assert.equal(first.code, 0, first.stderr);
  const resumed = await train([
    "--resume",
    `${dir}/${name}-split/checkpoint-3`,
    ...set("max_steps=6"),
  ]);
  assert.equal(resumed.code, 0, resumed.stderr);
  for (const file of ["model.safetensors", "optimizer.safetensors"]) {
    const a = Deno.readFileSync(`${dir}/${name}-straight/checkpoint-6/${file}`);
    const b = Deno.readFileSync(`${dir}/${name}-split/checkpoint-6/${file}`);
    assert.ok(a.length === b.length && a.every((x, i) => x === b[i]), `${file} differs`);
  }
  const kl = (run: string) => readJsonl(`${dir}/${run}/metrics.jsonl`).map((m) => m.kl);
  assert.deepEqual(kl(`${name}-split`), kl(`${name}-straight`), "kl per step");
  const state = JSON.parse(
    Deno.readTextFileSync(`${dir}/${name}-split/checkpoint-6/trainer_state.json`),
  );
  assert.equal(state.step, 6);
}

Deno.test(
  "3 steps + resume + 3 steps ends with the same weights as 6 steps straight",
  gpuTest,
  async () => {
    await assertExactResume("plain", []);
    // Resumed with a LoRA section, it would train a fresh adapter instead: refused, nothing done.
    const metrics = Deno.readTextFileSync(`${dir}/plain-split/metrics.jsonl`);
    const asLora = await train(["--resume", `${dir}/plain-split/checkpoint-3`, ...set("lora={}")]);
    assert.notEqual(asLora.code, 0);
    assert.match(
      asLora.stderr.trim(),
      /^aha: --resume .*checkpoint-3: it trained every weight, but/,
    );
    assert.equal(Deno.readTextFileSync(`${dir}/plain-split/metrics.jsonl`), metrics);
  },
);

Deno.test(
  "resume is exact with sync_ref_model (the synced reference is in the checkpoint)",
  gpuTest,
  () => assertExactResume("sync", ["sync_ref_model=true", "ref_model_sync_steps=2", "beta=0.1"]),
);

Deno.test("Ctrl-C saves a checkpoint and exits 130; the moved run resumes", gpuTest, async () => {
  const out = `${dir}/interrupted`;
  const run = await train(set(`output_dir=${out}`, "max_steps=200"), 2);
  assert.equal(run.code, 130, run.stderr);
  assert.match(run.stderr, /^aha: interrupted by SIGINT; saved/);
  const saved = [...Deno.readDirSync(out)].map((e) => e.name).filter((n) =>
    n.startsWith("checkpoint-")
  );
  assert.equal(saved.length, 1);
  const step = Number(saved[0].slice("checkpoint-".length));
  assert.ok(step >= 2 && step < 200);
  assert.equal(readJsonl(`${out}/metrics.jsonl`).length, step);

  // Moved elsewhere, the run resumes from its own directory and its own base/ (the old path no
  // longer exists, so nothing can be read or written there).
  const moved = `${dir}/moved/interrupted`;
  await Deno.mkdir(`${dir}/moved`);
  await Deno.rename(out, moved);
  const resumed = await train([
    "--resume",
    `${moved}/checkpoint-${step}`,
    ...set(`max_steps=${step + 1}`),
  ]);
  assert.equal(resumed.code, 0, resumed.stderr);
  assert.match(resumed.stdout, new RegExp(`output ${moved} \\(resuming`));
  assert.equal(await Deno.stat(out).then(() => true, () => false), false);
  assert.equal(readJsonl(`${moved}/metrics.jsonl`).length, step + 1);
  const state = JSON.parse(
    Deno.readTextFileSync(`${moved}/checkpoint-${step + 1}/trainer_state.json`),
  );
  assert.equal(state.reference_model, `${moved}/base`);
});

Deno.test(
  "--overwrite with a model that cannot serve the config keeps the run it would replace",
  gpuTest,
  async () => {
    // learn/ is the first test's run; its base allows 512 positions, fewer than 16 + 600.
    const out = `${dir}/learn`;
    const metrics = Deno.readTextFileSync(`${out}/metrics.jsonl`);
    const run = await train([
      "--overwrite",
      ...set(`model=${out}/base`, `output_dir=${out}`, "max_completion_length=600"),
    ]);
    assert.notEqual(run.code, 0);
    assert.match(
      run.stderr.trim(),
      /^aha: max_prompt_length \+ max_completion_length = 616 exceeds/,
    );
    assert.equal(Deno.readTextFileSync(`${out}/metrics.jsonl`), metrics, "nothing removed");
    assert.ok(Deno.statSync(`${out}/checkpoint-30`).isDirectory);
  },
);

Deno.test(
  "the built-in base is pretrained again when its seed or sft settings change",
  gpuTest,
  async () => {
    const out = `${dir}/pretrained-again`, steps = ["max_steps=1", "save_steps=0"];
    const first = await train(set(`output_dir=${out}`, "sft.steps=20", ...steps));
    assert.equal(first.code, 0, first.stderr);
    const pretrained = (run: { stdout: string }) => /pretraining the base model/.test(run.stdout);
    assert.ok(pretrained(first));
    const again = (...settings: string[]) =>
      train(["--overwrite", ...set(`output_dir=${out}`, ...settings, ...steps)]);
    const same = await again("sft.steps=20");
    assert.equal(same.code, 0, same.stderr);
    assert.ok(!pretrained(same), "the same settings reuse it");
    for (const changed of [["sft.steps=21"], ["sft.steps=21", "seed=7"]]) {
      const run = await again(...changed);
      assert.equal(run.code, 0, run.stderr);
      assert.match(run.stdout, /was pretrained with other seed, sft or arithmetic settings/);
      assert.ok(pretrained(run), changed.join(" "));
    }
  },
);

Deno.test(
  "save_total_limit keeps the newest checkpoints, across a resume; a bad limit is one line",
  gpuTest,
  async () => {
    const out = `${dir}/limited`, base = `${dir}/learn/base`; // made by the first test, or here
    const model = await Deno.stat(`${base}/model.safetensors`).then(
      () => [`model=${base}`],
      () => [],
    );
    const checkpoints = () =>
      [...Deno.readDirSync(out)].map((e) => e.name).filter((n) => n.startsWith("checkpoint-"))
        .sort();
    const run = await train(
      set(
        ...model,
        `output_dir=${out}`,
        "max_steps=4",
        "save_steps=1",
        "save_total_limit=2",
      ),
    );
    assert.equal(run.code, 0, run.stderr);
    assert.deepEqual(checkpoints(), ["checkpoint-3", "checkpoint-4"]);
    assert.match(run.stdout, /removed checkpoint-1 \(save_total_limit 2\)/);
    assert.match(run.stdout, /removed checkpoint-2 \(save_total_limit 2\)/);
    const hidden = [...Deno.readDirSync(out)].filter((e) => e.name.startsWith(".checkpoint"));
    assert.deepEqual(hidden, [], "no temporaries left");
    // A resume keeps the limit from the checkpoint's config; the checkpoint it started from goes
    // once two newer ones exist.
    const resumed = await train(["--resume", `${out}/checkpoint-4`, ...set("max_steps=6")]);
    assert.equal(resumed.code, 0, resumed.stderr);
    assert.deepEqual(checkpoints(), ["checkpoint-5", "checkpoint-6"]);
    const bad = await train(set(`output_dir=${dir}/limited-bad`, "save_total_limit=0"));
    assert.equal(bad.code, 1);
    assert.match(bad.stderr.trim(), /^aha: .*save_total_limit.* got 0$/);
    assert.equal(bad.stderr.trim().split("\n").length, 1);
  },
);

Deno.test("a bad config stops before any work with one line naming the key", gpuTest, async () => {
  const run = await train(set("learning_rat=1e-3", `output_dir=${dir}/bad`));
  assert.equal(run.code, 1);
  const lines = run.stderr.trim().split("\n").filter((l) => !l.includes("XDG_RUNTIME_DIR"));
  assert.equal(lines.length, 1);
  assert.match(lines[0], /unknown key "learning_rat" \(did you mean "learning_rate"\?\)/);
  assert.equal(await Deno.stat(`${dir}/bad`).then(() => true, () => false), false);
});

Deno.test(
  "a run that fails midway saves its last completed step and says why in one line",
  gpuTest,
  async () => {
    const out = `${dir}/failed`;
    const run = await train(
      set(`output_dir=${out}`, "max_steps=200", "reference.max_restarts=0"),
      3,
      true,
    );
    assert.equal(run.code, 1);
    assert.match(run.stderr, /aha: the reference worker .*giving up after 0 restarts/);
    const saved = [...Deno.readDirSync(out)].map((e) => e.name).filter((n) =>
      n.startsWith("checkpoint-")
    );
    assert.equal(saved.length, 1);
    const state = JSON.parse(Deno.readTextFileSync(`${out}/${saved[0]}/trainer_state.json`));
    assert.equal(readJsonl(`${out}/metrics.jsonl`).length, state.step);
  },
);

Deno.test(
  "a signal during the built-in pretraining exits 143 at once and says so",
  gpuTest,
  async () => {
    const out = `${dir}/pretraining`;
    const child = new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        "-A",
        MAIN,
        "train",
        ...COMMON,
        ...set(`output_dir=${out}`, "sft.steps=100000"),
      ],
      stdout: "piped",
      stderr: "null",
    }).spawn();
    let stdout = "", sent = false;
    const decoder = new TextDecoder();
    for await (const chunk of child.stdout) {
      stdout += decoder.decode(chunk);
      if (!sent && stdout.includes("pretraining the base model")) {
        child.kill("SIGTERM");
        sent = true;
      }
    }
    const { code } = await child.status;
    assert.equal(code, 143, stdout);
    assert.match(
      stdout,
      /interrupted during the built-in pretraining: the base model is not saved/,
    );
    assert.equal(await Deno.stat(`${out}/base`).then(() => true, () => false), false);
    assert.equal(await Deno.stat(`${out}/.aha.lock`).then(() => true, () => false), false);
  },
);

// LoRA: the same exactness with an adapter on the frozen base, the reference being that base in
// the trainer's process (reference.adapter=same); checkpoints are PEFT adapter directories.
const LORA = set("lora.r=4", "lora.alpha=8", "learning_rate=1e-2", "reference.adapter=same");

Deno.test(
  "LoRA: 3 steps + resume + 3 steps ends with the same adapter as 6 steps straight",
  gpuTest,
  async () => {
    const base = `${dir}/learn/base`;
    const model = await Deno.stat(`${base}/model.safetensors`).then(
      () => ["--set", `model=${base}`],
      () => [],
    );
    const straight = await train([
      ...model,
      ...LORA,
      ...set(`output_dir=${dir}/lora-straight`, "max_steps=6"),
    ]);
    assert.equal(straight.code, 0, straight.stderr);
    assert.match(
      straight.stdout,
      /reference: the base model in this process .*sharing the policy's frozen weights/,
    );
    assert.match(straight.stdout, /LoRA: r 4, alpha 8 \(scale 2\.000\)/);
    const first = await train([
      ...model,
      ...LORA,
      ...set(`output_dir=${dir}/lora-split`, "max_steps=3"),
    ]);
    assert.equal(first.code, 0, first.stderr);
    // Resumed without its LoRA section, it would drop the adapter: refused, nothing done.
    const dropped = await train([
      "--resume",
      `${dir}/lora-split/checkpoint-3`,
      ...set("lora=null"),
    ]);
    assert.notEqual(dropped.code, 0);
    assert.match(
      dropped.stderr.trim(),
      /^aha: --resume .*checkpoint-3: it trained a LoRA adapter, but/,
    );
    const resumed = await train([
      "--resume",
      `${dir}/lora-split/checkpoint-3`,
      ...set("max_steps=6"),
    ]);
    assert.equal(resumed.code, 0, resumed.stderr);
    for (const file of ["adapter_model.safetensors", "optimizer.safetensors"]) {
      const a = Deno.readFileSync(`${dir}/lora-straight/checkpoint-6/${file}`);
      const b = Deno.readFileSync(`${dir}/lora-split/checkpoint-6/${file}`);
      assert.ok(a.length === b.length && a.every((x, i) => x === b[i]), `${file} differs`);
    }
    const files = [...Deno.readDirSync(`${dir}/lora-split/checkpoint-6`)].map((e) => e.name);
    assert.ok(!files.includes("model.safetensors"), "a LoRA checkpoint holds no base weights");
    assert.ok(files.includes("adapter_config.json"));
    const peft = JSON.parse(
      Deno.readTextFileSync(`${dir}/lora-split/checkpoint-6/adapter_config.json`),
    );
    assert.equal(peft.peft_type, "LORA");
    assert.equal(peft.r, 4);
    assert.equal(peft.lora_alpha, 8);
    // The adapter trained: step 6's differs from step 3's.
    const a3 = Deno.readFileSync(`${dir}/lora-split/checkpoint-3/adapter_model.safetensors`);
    const a6 = Deno.readFileSync(`${dir}/lora-split/checkpoint-6/adapter_model.safetensors`);
    assert.ok(a3.some((x, i) => x !== a6[i]));

    // Continuing that adapter (--adapter) starts where it ended: its greedy evaluation at step 0
    // is the split run's at step 6.
    const continued = await train([
      ...model,
      ...LORA,
      "--adapter",
      `${dir}/lora-split/checkpoint-6`,
      ...set(`output_dir=${dir}/lora-continued`, "max_steps=1"),
    ]);
    assert.equal(continued.code, 0, continued.stderr);
    assert.match(continued.stdout, /continuing .*lora-split\/checkpoint-6/);
    const evalAt = (path: string, step: number) => readJsonl(path).find((e) => e.step === step);
    // (Every log line also carries its wall-clock `time`, which naturally differs.)
    const { step: _a, time: _t, ...before } = evalAt(`${dir}/lora-split/eval.jsonl`, 6);
    const { step: _b, time: _u, ...after } = evalAt(`${dir}/lora-continued/eval.jsonl`, 0);
    assert.deepEqual(after, before);
  },
);

Deno.test(
  "LoRA on the built-in base: a moved run resumes, its base found where the run is now",
  gpuTest,
  async () => {
    const run = `${dir}/lora-builtin`, moved = `${dir}/lora-builtin-moved`;
    const first = await train([...LORA, ...set(`output_dir=${run}`, "max_steps=1")]);
    assert.equal(first.code, 0, first.stderr);
    await Deno.rename(run, moved);
    const resumed = await train(["--resume", `${moved}/checkpoint-1`, ...set("max_steps=2")]);
    assert.equal(resumed.code, 0, resumed.stderr);
    const state = JSON.parse(Deno.readTextFileSync(`${moved}/checkpoint-2/trainer_state.json`));
    assert.equal(state.step, 2);
    assert.equal(state.reference_model, `${moved}/base`);
  },
);

Deno.test(
  "LoRA: an adapter whose shapes do not match the base stops with one line",
  gpuTest,
  async () => {
    const adapterDir = `${dir}/lora-split/checkpoint-6`;
    const peft = JSON.parse(Deno.readTextFileSync(`${adapterDir}/adapter_config.json`));
    const wrong = `${dir}/wrong-adapter`;
    await Deno.mkdir(wrong, { recursive: true });
    Deno.copyFileSync(
      `${adapterDir}/adapter_model.safetensors`,
      `${wrong}/adapter_model.safetensors`,
    );
    Deno.writeTextFileSync(`${wrong}/adapter_config.json`, JSON.stringify({ ...peft, r: 5 }));
    const run = await train([
      ...set(`model=${dir}/learn/base`, `output_dir=${dir}/wrong-run`, "lora.r=5"),
      "--adapter",
      wrong,
    ]);
    assert.equal(run.code, 1);
    const lines = run.stderr.trim().split("\n").filter((l) => !l.includes("XDG_RUNTIME_DIR"));
    assert.equal(lines.length, 1, run.stderr);
    assert.match(
      lines[0],
      /adapter_model\.safetensors: tensor "base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight" has shape \[4, 64\], expected \[5, 64\]/,
    );
    assert.equal(await Deno.stat(`${dir}/wrong-run`).then(() => true, () => false), false);
  },
);

Deno.test(
  "LoRA: a reference on a named backend is a worker with its own copy of the base; auto keeps it in the trainer",
  gpuTest,
  async () => {
    const base = `${dir}/learn/base`; // made by the first test, or made here
    const model = await Deno.stat(`${base}/model.safetensors`).then(
      () => ["--set", `model=${base}`],
      () => [],
    );
    const oneStep = (adapter: string) =>
      train([
        ...model,
        ...set(`output_dir=${dir}/lora-${adapter}`, "max_steps=1"),
        ...set(
          "lora.r=2",
          "lora.target_modules=[q_proj, down_proj]",
          `reference.adapter=${adapter}`,
        ),
      ]);
    const run = await oneStep("gl");
    assert.equal(run.code, 0, run.stderr);
    assert.match(run.stdout, /reference: worker pid \d+, .*\(its own copy of the base model\)/);
    assert.match(run.stdout, /LoRA: r 2, alpha 32 \(scale 16\.00\), targets q_proj down_proj/);
    // This machine offers that second backend (llvmpipe under GL beside lavapipe), and auto must
    // not take it: a second copy of the base in the same memory, which the plan does not count.
    const auto = await oneStep("auto");
    assert.equal(auto.code, 0, auto.stderr);
    assert.match(
      auto.stdout,
      /reference: the base model in this process .*sharing the policy's frozen weights/,
    );
    assert.doesNotMatch(auto.stdout, /worker pid/);
    const files = [...Deno.readDirSync(`${dir}/lora-gl/checkpoint-1`)].map((e) => e.name);
    assert.ok(files.includes("adapter_model.safetensors") && !files.includes("model.safetensors"));
  },
);
