// A run's files cannot be lost or mixed (issue 9, items 1–5 and 7): the output directory's lock,
// what a fresh run or a resume (in its own directory or sent to another) does with an existing
// directory, whole-line appends and torn lines, the trainer state checked whole before anything
// on disk changes, stale temporaries.
// Everything here stops before any training, so it runs in seconds.

import assert from "node:assert/strict";
import { runAha as aha } from "./helpers.ts";
import { saveCheckpoint } from "../core/checkpoint.ts";
import { AhaError } from "../core/errors.ts";
import { initWeights } from "../core/init.ts";
import { parseModelConfig, PRESETS, toHfConfig, weightShapes } from "../core/model_config.ts";
import {
  appendLine,
  LOCK_FILE,
  lockRunDir,
  parseLog,
  prepareRunDir,
  resolveResume,
} from "../core/run_dir.ts";
import { readSafetensorsHeader } from "../core/safetensors.ts";
import { processAlive } from "../core/save_dir.ts";
import { defaultTrainConfig } from "../core/train_config.ts";
import {
  checkMoments,
  loadTrainingCheckpoint,
  parseTrainerState,
  saveTrainingCheckpoint,
  type TrainerState,
} from "../core/train_state.ts";
import { ArithmeticTokenizer } from "../data/arithmetic.ts";
import { ARITHMETIC_TOKENIZER_FILE } from "../data/tasks.ts";

const dir = await Deno.makeTempDir({ prefix: "aha_run_dir_test_" });
globalThis.addEventListener("unload", () => Deno.removeSync(dir, { recursive: true }));

/** A PID that belonged to a process which has exited. */
async function deadPid(): Promise<number> {
  const child = new Deno.Command("true").spawn();
  await child.status;
  assert.equal(processAlive(child.pid), false);
  return child.pid;
}

const tree = (path: string) => [...Deno.readDirSync(path)].map((e) => e.name).sort();

const config = parseModelConfig({
  ...PRESETS.tiny,
  vocab_size: new ArithmeticTokenizer().vocabSize,
});
const weights = initWeights(config, 1);
const moments = new Map(
  [...weightShapes(config)].flatMap(([name, shape]) => {
    const n = shape.reduce((a, b) => a * b, 1);
    return [[`${name}.exp_avg`, new Float32Array(n)], [`${name}.exp_avg_sq`, new Float32Array(n)]];
  }),
);
const goodState: TrainerState = {
  step: 3,
  adam_step: 3,
  sampler: { epoch: 0, position: 12, rng: "0123456789abcdef0123456789abcdef" },
  reference_model: "runs/x/base",
};

/** A run directory with a real training checkpoint at step 3 and logs through step 5. */
async function makeRun(run: string, state: TrainerState = goodState): Promise<string> {
  const cfg = { ...defaultTrainConfig(), output_dir: run };
  await saveTrainingCheckpoint(
    `${run}/checkpoint-3`,
    toHfConfig(config),
    weights,
    moments,
    state,
    cfg,
    { [ARITHMETIC_TOKENIZER_FILE]: "{}" },
  );
  for (const name of ["metrics.jsonl", "eval.jsonl", "samples.jsonl"]) {
    const lines = [1, 2, 3, 4, 5].map((step) => JSON.stringify({ step, x: step }) + "\n");
    await Deno.writeTextFile(`${run}/${name}`, lines.join(""));
  }
  return run;
}

Deno.test("1. aha sft --out refuses a non-empty directory that is not a checkpoint", async () => {
  const model = `${dir}/sft-model`;
  await saveCheckpoint(model, toHfConfig(config), weights, { [ARITHMETIC_TOKENIZER_FILE]: "{}" });
  await Deno.writeTextFile(`${dir}/rows.jsonl`, `{"prompt": "1+1=", "completion": "2<end>"}\n`);
  const out = `${dir}/precious`;
  await Deno.mkdir(out);
  await Deno.writeTextFile(`${out}/thesis.tex`, "years of work");
  const run = await aha("sft", "--model", model, "--data", `${dir}/rows.jsonl`, "--out", out);
  assert.equal(run.code, 1, run.stderr);
  assert.match(
    run.stderr,
    /^aha: sft: --out .*precious exists and is not an aha checkpoint .*--force/,
  );
  assert.equal(Deno.readTextFileSync(`${out}/thesis.tex`), "years of work");
  assert.deepEqual(tree(out), ["thesis.tex"]);
});

/**
 * A child process that takes `run`'s lock and holds it until its stdin closes; resolves once it
 * holds it.
 */
async function lockHolder(run: string) {
  const code = `import { lockRunDir } from ${JSON.stringify(runDirModule)};
await lockRunDir(${JSON.stringify(run)}, "train");
console.log("locked");
for await (const _ of Deno.stdin.readable) { /* hold until stdin closes */ }`;
  const child = new Deno.Command(Deno.execPath(), {
    args: ["eval", code],
    stdin: "piped",
    stdout: "piped",
  }).spawn();
  const reader = child.stdout.getReader();
  const { value } = await reader.read();
  assert.match(new TextDecoder().decode(value), /locked/);
  reader.releaseLock();
  return child;
}
const runDirModule = new URL("../core/run_dir.ts", import.meta.url).pathname;

Deno.test("2. a run directory holds one process: a live lock is refused, a dead one's taken", async () => {
  const run = `${dir}/locked`;
  const holder = await lockHolder(run);
  await assert.rejects(
    () => lockRunDir(run, "train"),
    (e: Error) => e instanceof AhaError && e.message.includes(`in use by process ${holder.pid}`),
  );
  // Through the command: `aha train` and `aha sft` refuse before any work, logs untouched.
  await Deno.writeTextFile(`${run}/metrics.jsonl`, `{"step":1}\n`);
  const train = await aha("train", "--set", `output_dir=${run}`, "--overwrite");
  assert.equal(train.code, 1, train.stderr);
  assert.match(
    train.stderr,
    new RegExp(`^aha: output directory .* is in use by process ${holder.pid} \\(aha train`),
  );
  assert.equal(Deno.readTextFileSync(`${run}/metrics.jsonl`), `{"step":1}\n`);
  // A --resume of the live run is refused before it trims the live run's logs.
  const live = await makeRun(`${dir}/live`);
  const liveHolder = await lockHolder(live);
  const before = Deno.readTextFileSync(`${live}/metrics.jsonl`);
  const resume = await aha("train", "--resume", `${live}/checkpoint-3`);
  assert.match(resume.stderr, /^aha: output directory .* is in use by process/);
  assert.equal(Deno.readTextFileSync(`${live}/metrics.jsonl`), before);
  liveHolder.stdin.close();
  await liveHolder.status;

  // A holder killed outright leaves its lock file, naming a PID, and no lock: it is taken.
  holder.kill("SIGKILL");
  await holder.status;
  assert.equal(JSON.parse(Deno.readTextFileSync(`${run}/${LOCK_FILE}`)).pid, holder.pid);
  const lock = await lockRunDir(run, "train");
  assert.equal(JSON.parse(Deno.readTextFileSync(`${run}/${LOCK_FILE}`)).pid, Deno.pid);
  // While held, a second taker (even this process's own second run) is refused.
  await assert.rejects(() => lockRunDir(run, "train"), /in use by process/);
  lock.release();
  assert.equal(tree(run).includes(LOCK_FILE), false);
});

Deno.test("2b. a filesystem that cannot lock files stops the run in one line", async () => {
  const tryLockSync = Deno.FsFile.prototype.tryLockSync;
  Deno.FsFile.prototype.tryLockSync = () => {
    throw new Error("Operation not supported (os error 95)");
  };
  try {
    await assert.rejects(
      () => lockRunDir(`${dir}/no-locks`, "train"),
      (e: Error) =>
        e instanceof AhaError &&
        /no-locks: cannot lock .*\.aha\.lock \(Operation not supported.*local filesystem$/
          .test(e.message),
    );
  } finally {
    Deno.FsFile.prototype.tryLockSync = tryLockSync;
  }
});

Deno.test("2c. processes taking over one dead holder's lock at the same moment: one gets it", async () => {
  const run = `${dir}/race`;
  await Deno.mkdir(run);
  for (let round = 0; round < 3; round++) {
    await Deno.writeTextFile(`${run}/${LOCK_FILE}`, JSON.stringify({ pid: await deadPid() }));
    // Each child starts trying at the same moment and holds what it got for a second.
    const startAt = Date.now() + 2000;
    const code = `import { lockRunDir } from ${JSON.stringify(runDirModule)};
await new Promise((wake) => setTimeout(wake, ${startAt} - Date.now()));
try {
  await lockRunDir(${JSON.stringify(run)}, "train");
  console.log("holds");
  await new Promise((wake) => setTimeout(wake, 1000));
} catch (e) {
  console.log(e.message);
}`;
    const children = await Promise.all(
      Array.from(
        { length: 6 },
        () =>
          new Deno.Command(Deno.execPath(), { args: ["eval", code], stderr: "inherit" }).output(),
      ),
    );
    const said = children.map((c) => new TextDecoder().decode(c.stdout).trim());
    assert.equal(said.filter((s) => s === "holds").length, 1, said.join("\n"));
    assert.ok(said.every((s) => s === "holds" || /in use by process/.test(s)), said.join("\n"));
  }
});

Deno.test("3. --resume resolves paths against the checkpoint's own (moved) run directory", async () => {
  const original = await makeRun(`${dir}/original`);
  const moved = `${dir}/elsewhere/moved`;
  await Deno.mkdir(`${dir}/elsewhere`);
  await Deno.rename(original, moved);
  const target = await resolveResume(`${moved}/checkpoint-3/`);
  assert.equal(target.runDir, moved);
  assert.equal(target.rebase(`${original}/base`, original), `${moved}/base`);
  assert.equal(target.rebase(original, original), moved);
  assert.equal(target.rebase("/models/qwen", original), "/models/qwen", "outside: unchanged");
  assert.equal(target.rebase(`${original}-other/base`, original), `${original}-other/base`);
  // base/ and other non-checkpoints are refused by name.
  await saveCheckpoint(`${moved}/base`, toHfConfig(config), weights);
  await assert.rejects(() => resolveResume(`${moved}/base`), /not a training checkpoint/);
  const run = await aha("train", "--resume", `${moved}/base`);
  assert.equal(run.code, 1);
  assert.match(run.stderr, /^aha: --resume .*base: not a training checkpoint/);
});

Deno.test("3b. a resume sent to another run's directory leaves that run whole", async () => {
  const mine = await makeRun(`${dir}/mine`), other = await makeRun(`${dir}/other`);
  const before = Deno.readTextFileSync(`${other}/metrics.jsonl`);
  await assert.rejects(
    () => prepareRunDir(other, { resumeStep: 3, resumeRunDir: mine, overwrite: false }),
    /output_dir .*other already holds a run/,
  );
  assert.equal(Deno.readTextFileSync(`${other}/metrics.jsonl`), before, "its steps 4 and 5 kept");
  // In its own directory a resume trims to its step; an empty one elsewhere is simply used.
  await prepareRunDir(mine, { resumeStep: 3, resumeRunDir: mine, overwrite: false });
  assert.equal(Deno.readTextFileSync(`${mine}/metrics.jsonl`).trim().split("\n").length, 3);
  await prepareRunDir(`${dir}/branch`, { resumeStep: 3, resumeRunDir: mine, overwrite: false });
  // And through the command: nothing of the other run changes.
  const run = await aha(
    "train",
    "--resume",
    `${mine}/checkpoint-3`,
    "--set",
    `output_dir=${other}`,
  );
  assert.equal(run.code, 1);
  assert.match(run.stderr, /^aha: output_dir .*other already holds a run/);
  assert.equal(Deno.readTextFileSync(`${other}/metrics.jsonl`), before);
});

Deno.test("3c. a resume of an earlier checkpoint leaves no later one beside it", async () => {
  const run = await makeRun(`${dir}/branching`);
  const cfg = { ...defaultTrainConfig(), output_dir: run };
  const laterState = { ...goodState, step: 5, adam_step: 5 };
  await saveTrainingCheckpoint(`${run}/checkpoint-5`, toHfConfig(config), weights, moments, {
    ...laterState,
  }, cfg);
  const before = Deno.readTextFileSync(`${run}/metrics.jsonl`);
  // Refused, naming them, before anything changes; through the command in one line.
  await assert.rejects(
    () => prepareRunDir(run, { resumeStep: 3, resumeRunDir: run, overwrite: false }),
    /checkpoint-3: .* also holds later checkpoints \(checkpoint-5\) .*--overwrite/,
  );
  const out = await aha("train", "--resume", `${run}/checkpoint-3`);
  assert.equal(out.code, 1, out.stderr);
  assert.equal(out.stderr.trim().split("\n").length, 1, out.stderr);
  assert.match(out.stderr, /^aha: --resume .*checkpoint-3: .* later checkpoints \(checkpoint-5\)/);
  assert.equal(Deno.readTextFileSync(`${run}/metrics.jsonl`), before);
  assert.deepEqual(tree(run).filter((n) => n.startsWith("checkpoint")), [
    "checkpoint-3",
    "checkpoint-5",
  ]);
  // The latest resumes as before; with --overwrite the earlier one removes what came after it.
  await prepareRunDir(run, { resumeStep: 5, resumeRunDir: run, overwrite: false });
  assert.equal(Deno.readTextFileSync(`${run}/metrics.jsonl`), before);
  const said: string[] = [];
  await prepareRunDir(run, {
    resumeStep: 3,
    resumeRunDir: run,
    overwrite: true,
    log: (line) => said.push(line),
  });
  assert.deepEqual(tree(run).filter((n) => n.startsWith("checkpoint")), ["checkpoint-3"]);
  assert.equal(Deno.readTextFileSync(`${run}/metrics.jsonl`).trim().split("\n").length, 3);
  assert.match(said.join("\n"), /removed 1 checkpoint\(s\) after step 3/);
});

Deno.test("4. appends are whole lines, a failed append is one line, a torn last line is trimmed", async () => {
  const run = await makeRun(`${dir}/torn`);
  // A disk that fills mid-append: one AhaError, no stack trace.
  await assert.rejects(
    () => appendLine("/dev/full", { step: 6 }),
    (e: Error) => e instanceof AhaError && /\/dev\/full: cannot append a log line/.test(e.message),
  );
  await Deno.writeTextFile(`${run}/metrics.jsonl`, `{"step":6,"rew`, { append: true });
  assert.equal(parseLog("m", Deno.readTextFileSync(`${run}/metrics.jsonl`)).torn, true);
  const said: string[] = [];
  await prepareRunDir(run, { resumeStep: 3, overwrite: false, log: (l) => said.push(l) });
  for (const name of ["metrics.jsonl", "eval.jsonl", "samples.jsonl"]) {
    const text = Deno.readTextFileSync(`${run}/${name}`);
    assert.deepEqual(text.trim().split("\n").map((l) => JSON.parse(l).step), [1, 2, 3], name);
  }
  assert.ok(said.some((l) => l.includes("torn last line")), said.join("\n"));
  // A bad line before the last is not a torn append: refused, naming it, nothing rewritten.
  await Deno.writeTextFile(`${run}/eval.jsonl`, `{"step":1}\nnot json\n{"step":2}\n`);
  await assert.rejects(
    () => prepareRunDir(run, { resumeStep: 3, overwrite: false }),
    /eval\.jsonl:2: not a JSON object/,
  );
  assert.deepEqual(
    Deno.readTextFileSync(`${run}/metrics.jsonl`).trim().split("\n").length,
    3,
  );
});

Deno.test("5. the trainer state is checked whole before anything on disk changes", async () => {
  const path = "trainer_state.json";
  const bad: [Record<string, unknown>, RegExp][] = [
    [{ step: "eleven" }, /field "step" must be an integer ≥ 0, got "eleven"/],
    [{ step: -4 }, /field "step" must be an integer ≥ 0, got -4/],
    [{ step: 1.5 }, /"step"/],
    [{ adam_step: -1 }, /field "adam_step"/],
    [{ adam_step: null }, /field "adam_step" must be an integer ≥ 0, got null/],
    [{ sampler: [] }, /field "sampler" must be an object/],
    [{ sampler: { ...goodState.sampler, position: -1 } }, /"sampler.position"/],
    [{ sampler: { ...goodState.sampler, epoch: "0" } }, /"sampler.epoch"/],
    [{ sampler: { ...goodState.sampler, rng: "xyz" } }, /"sampler.rng" must be 32 hex digits/],
    [{ sampler: { ...goodState.sampler, rng: "0".repeat(32) } }, /"sampler.rng"/],
    [{ reference_model: 7 }, /"reference_model" must be a model directory/],
  ];
  assert.deepEqual(parseTrainerState(goodState, path), goodState);
  for (const [change, message] of bad) {
    assert.throws(() => parseTrainerState({ ...goodState, ...change }, path), message);
  }
  assert.throws(() => parseTrainerState([], path), /expected a JSON object/);

  // Optimizer moments: empty after optimizer steps, another model's, unknown names, NaN.
  const shapes = weightShapes(config);
  checkMoments(moments, shapes, 3, "opt");
  checkMoments(new Map(), shapes, 0, "opt");
  assert.throws(() => checkMoments(new Map(), shapes, 3, "opt"), /missing tensor ".*\.exp_avg"/);
  const other = weightShapes(parseModelConfig({ ...PRESETS.tiny, vocab_size: 97 }));
  assert.throws(() => checkMoments(moments, other, 3, "opt"), /not this model's optimizer state/);
  const stray = new Map(moments).set("lm_head.bias.exp_avg", new Float32Array(1));
  assert.throws(() => checkMoments(stray, shapes, 3, "opt"), /not a moment of any weight/);
  const nan = new Map(moments).set("model.norm.weight.exp_avg", new Float32Array(64).fill(NaN));
  assert.throws(
    () => checkMoments(nan, shapes, 3, "opt"),
    /model\.norm\.weight\.exp_avg" holds NaN/,
  );

  // Through the command: a corrupt state stops with one line and the logs keep every line.
  for (const [i, [change, message]] of bad.slice(0, 2).entries()) {
    const run = await makeRun(`${dir}/state-${i}`, { ...goodState, ...change } as TrainerState);
    const before = Deno.readTextFileSync(`${run}/metrics.jsonl`);
    const out = await aha("train", "--resume", `${run}/checkpoint-3`);
    assert.equal(out.code, 1, out.stderr);
    assert.equal(out.stderr.split("\n").length, 1, out.stderr);
    assert.match(out.stderr, message);
    assert.equal(Deno.readTextFileSync(`${run}/metrics.jsonl`), before);
  }
  const run = await makeRun(`${dir}/state-empty-optimizer`);
  await saveTrainingCheckpoint(
    `${run}/checkpoint-3`,
    toHfConfig(config),
    weights,
    new Map(),
    goodState,
    { ...defaultTrainConfig(), output_dir: run },
  );
  await assert.rejects(() => loadTrainingCheckpoint(`${run}/checkpoint-3`), /missing tensor/);
});

Deno.test("5b. the moments are read from optimizer.safetensors when asked for, and a NaN there stops a resume before the logs change", async () => {
  const run = await makeRun(`${dir}/moments`);
  const optimizer = `${run}/checkpoint-3/optimizer.safetensors`;
  const loaded = await loadTrainingCheckpoint(`${run}/checkpoint-3`);
  const name = "model.layers.1.mlp.up_proj.weight.exp_avg_sq";
  assert.deepEqual(new Map(loaded.moments), moments);
  const first = loaded.moments.get(name)!;
  first.fill(3);
  assert.deepEqual(
    loaded.moments.get(name),
    moments.get(name),
    "not kept: each get reads the file",
  );

  // One moment NaN: the header is fine, reading that tensor is not.
  const { entries, dataOffset } = await readSafetensorsHeader(optimizer);
  const bytes = Deno.readFileSync(optimizer);
  new DataView(bytes.buffer).setFloat32(dataOffset + entries.get(name)!.begin + 4 * 7, NaN, true);
  Deno.writeFileSync(optimizer, bytes);
  assert.throws(() => loaded.moments.get(name), /optimizer\.safetensors: changed since its header/);
  await assert.rejects(
    () => loadTrainingCheckpoint(`${run}/checkpoint-3`),
    /up_proj\.weight\.exp_avg_sq" holds NaN at index 7/,
  );
  const before = Deno.readTextFileSync(`${run}/metrics.jsonl`);
  const out = await aha("train", "--resume", `${run}/checkpoint-3`);
  assert.equal(out.code, 1, out.stderr);
  assert.equal(out.stderr.split("\n").length, 1, out.stderr);
  assert.match(
    out.stderr,
    /optimizer\.safetensors: tensor "model\.layers\.1\.mlp\.up_proj\.weight\.exp_avg_sq" holds NaN at index 7/,
  );
  assert.equal(Deno.readTextFileSync(`${run}/metrics.jsonl`), before);
});

Deno.test("7. stale temporaries go (a replaced checkpoint's old copy comes back); a run without a checkpoint says how to start over", async () => {
  const run = `${dir}/no-checkpoint`;
  await Deno.mkdir(run);
  const stale = `.checkpoint-4.${await deadPid()}.tmp`;
  await Deno.mkdir(`${run}/${stale}`);
  await Deno.writeTextFile(`${run}/${stale}/model.safetensors`, "half");
  const live = `.checkpoint-5.${Deno.ppid}.tmp`; // a save in progress in a live process
  await Deno.mkdir(`${run}/${live}`);
  await Deno.writeTextFile(`${run}/metrics.jsonl`, `{"step":1}\n`);
  const refusal = await aha("train", "--set", `output_dir=${run}`);
  assert.equal(refusal.code, 1);
  assert.match(
    refusal.stderr,
    /^aha: output_dir .* holds a run that stopped before its first checkpoint .*--overwrite/,
  );
  assert.doesNotMatch(refusal.stderr, /resume it/);
  assert.deepEqual(tree(run), [live, "metrics.jsonl"].sort(), "the stale temporary is gone");
  // --overwrite starts over: logs, TensorBoard's event files and checkpoints removed.
  await Deno.mkdir(`${run}/checkpoint-2`);
  await Deno.writeTextFile(`${run}/events.out.tfevents.1700000000.host.123.0`, "old run");
  await prepareRunDir(run, { resumeStep: null, overwrite: true });
  assert.deepEqual(tree(run), [live]);
  // A save that was replacing checkpoint-3 and died between its two renames left the old copy
  // aside and the new one unfinished: the old one is checkpoint-3 again, the other goes.
  const crashed = await makeRun(`${dir}/crashed-save`), pid = await deadPid();
  await Deno.rename(`${crashed}/checkpoint-3`, `${crashed}/.checkpoint-3.${pid}.old`);
  await Deno.mkdir(`${crashed}/.checkpoint-3.${pid}.tmp`);
  const said: string[] = [];
  await prepareRunDir(crashed, { resumeStep: 3, overwrite: false, log: (l) => said.push(l) });
  assert.deepEqual(tree(crashed).filter((n) => n.startsWith(".") || n.startsWith("check")), [
    "checkpoint-3",
  ]);
  await loadTrainingCheckpoint(`${crashed}/checkpoint-3`); // whole
  assert.match(said.join("\n"), /put back as checkpoint-3/);
  // With a checkpoint, the refusal names it for --resume.
  const withCheckpoint = await makeRun(`${dir}/has-checkpoint`);
  await assert.rejects(
    () => prepareRunDir(withCheckpoint, { resumeStep: null, overwrite: false }),
    /resume it with --resume .*checkpoint-3, start over with --overwrite/,
  );
});

Deno.test("the output directory must be creatable and writable, in one line", async () => {
  const file = `${dir}/a-file`;
  await Deno.writeTextFile(file, "");
  await assert.rejects(() => lockRunDir(file, "train"), /exists and is a file/);
  await assert.rejects(() => lockRunDir(`${file}/below`, "train"), /cannot create or write it/);
});
