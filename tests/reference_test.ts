// reference/: the reference model's process and its channel. The worker's log-probs against the
// PyTorch golden values (both engines, ≤ 1e-4; the onnx engine also at temperature 0.8 against
// the float64 CPU twin), two distinct adapters (policy on Vulkan,
// reference on GL), error replies to malformed requests, refusing a mismatched vocabulary or
// tokenizer, reference syncing, restarts after a crash or a hang, and whole `aha train` runs:
// killing the worker mid-run changes no weight, and no process or channel outlives the run.

import assert from "node:assert/strict";
import { loadCheckpoint, saveCheckpoint } from "../core/checkpoint.ts";
import { cpuLogprobs } from "../core/cpu_model.ts";
import { AhaError } from "../core/errors.ts";
import { initWeights } from "../core/init.ts";
import { writeSafetensors } from "../core/safetensors.ts";
import { selfCommand } from "../core/self_command.ts";
import type { AdapterSummary } from "../gpu/device.ts";
import { Channel, LineReader } from "../reference/channel.ts";
import { WorkerReference, type WorkerReferenceOptions } from "../reference/client.ts";
import { assertRowsClose, fixtureCases, GOLDEN_CASES, gpuTest } from "./helpers.ts";

const TOLERANCE = 1e-4;
const GOLDEN = new URL("./fixtures/golden/", import.meta.url).pathname;
const tmp = await Deno.makeTempDir({ prefix: "aha_reference_test_" });
globalThis.addEventListener("unload", () => Deno.removeSync(tmp, { recursive: true }));
const XDG = { XDG_RUNTIME_DIR: Deno.env.get("XDG_RUNTIME_DIR") ?? tmp };

/** The adapter a process gets with DENO_WEBGPU_BACKEND = backend (null: none there). */
async function probe(backend?: string): Promise<AdapterSummary | null> {
  const self = selfCommand(["gpu", "--probe"]);
  const env: Record<string, string> = { ...XDG };
  if (backend) env.DENO_WEBGPU_BACKEND = backend;
  const out = await new Deno.Command(self.command, { args: self.args, env, stderr: "null" })
    .output();
  return out.success ? JSON.parse(new TextDecoder().decode(out.stdout)) : null;
}
const [vulkan, gl, defaultAdapter] = await Promise.all([probe("vulkan"), probe("gl"), probe()]);

function start(modelDir: string, vocabSize: number, more: Partial<WorkerReferenceOptions> = {}) {
  return WorkerReference.start({
    modelDir,
    adapter: "same",
    engine: "webgpu",
    env: {},
    timeoutS: 60,
    maxRestarts: 2,
    onnxPath: null,
    policy: { vocabSize, dir: modelDir, adapter: defaultAdapter! },
    log: () => {},
    ...more,
  });
}

const golden = (name: string) => ({
  dir: GOLDEN + name,
  expected: JSON.parse(Deno.readTextFileSync(`${GOLDEN}${name}/expected.json`)) as {
    sequences: number[][];
    logprobs: number[][];
  },
  vocab: JSON.parse(Deno.readTextFileSync(`${GOLDEN}${name}/config.json`)).vocab_size as number,
});
/** The golden sequences as completions after a one-token prompt: the same log-probs. */
const asBatch = (sequences: number[][]) => ({
  rows: sequences,
  promptLens: sequences.map(() => 1),
});

Deno.test("the worker's log-probs match the PyTorch golden values", gpuTest, async () => {
  for (const entry of fixtureCases(GOLDEN, GOLDEN_CASES)) {
    const { dir, expected, vocab } = golden(entry);
    const lines: string[] = [];
    const ref = await start(dir, vocab, { log: (line) => lines.push(line) });
    try {
      const got = await ref.completionLogprobs(asBatch(expected.sequences), 1);
      assertRowsClose(got, expected.logprobs, TOLERANCE, entry);
      // Completion-only rows: a two-token prompt drops each row's first value.
      const later = await ref.completionLogprobs({
        rows: expected.sequences,
        promptLens: expected.sequences.map(() => 2),
      }, 1);
      assertRowsClose(
        later,
        expected.logprobs.map((row) => row.slice(1)),
        TOLERANCE,
        `${entry} (prompt 2)`,
      );
      // adapter "same": the policy's adapter, said so in the log.
      assert.match(lines.join("\n"), /warning: the reference shares the policy's adapter/);
    } finally {
      await ref.close();
    }
  }
});

Deno.test(
  "the onnx engine in the worker matches the golden values, also at temperature 0.8",
  gpuTest,
  async () => {
    const dir = `${tmp}/onnx_gqa3_untied`; // a copy: the export is cached next to the checkpoint
    const { expected, vocab } = golden("gqa3_untied");
    const checkpoint = await loadCheckpoint(GOLDEN + "gqa3_untied");
    await saveCheckpoint(dir, checkpoint.hfConfig, checkpoint.weights);
    const ref = await start(dir, vocab, { engine: "onnx" });
    try {
      assert.equal(ref.adapter, null);
      assertRowsClose(
        await ref.completionLogprobs(asBatch(expected.sequences), 1),
        expected.logprobs,
        TOLERANCE,
        "onnx",
      );
      // logits · 1.25 are the logits of an lm_head scaled by 1.25 (untied): the CPU twin's truth.
      const hotter = new Map(checkpoint.weights);
      hotter.set("lm_head.weight", checkpoint.weights.get("lm_head.weight")!.map((x) => 1.25 * x));
      assertRowsClose(
        await ref.completionLogprobs(asBatch(expected.sequences), 1.25),
        cpuLogprobs(checkpoint.config, hotter, expected.sequences),
        TOLERANCE,
        "onnx at inv_temperature 1.25",
      );
    } finally {
      await ref.close();
    }
  },
);

Deno.test({
  name: "policy on Vulkan, reference on GL: two distinct adapters",
  ignore: !vulkan || !gl,
  ...gpuTest,
  fn: async () => {
    const { dir, vocab } = golden("gqa_tied");
    const lines: string[] = [];
    const ref = await start(dir, vocab, {
      adapter: "auto",
      policy: { vocabSize: vocab, dir, adapter: vulkan! },
      log: (line) => lines.push(line),
    });
    try {
      const adapter = ref.adapter!;
      assert.equal(adapter.backend, "gl");
      assert.notDeepEqual(adapter.features, vulkan!.features);
      assert.deepEqual(adapter.features, gl!.features);
      assert.match(lines[0], /reference: worker pid \d+, webgpu engine on .*backend gl/);
      assert.match(lines[0], /policy on .*backend vulkan/);
      assert.ok(!lines.some((l) => l.startsWith("warning")), lines.join("\n"));
    } finally {
      await ref.close();
    }
  },
});

/** A ref-worker on the gqa_tied golden checkpoint, spoken to over pipes as the trainer does. */
async function spawnWorker(stderr: "piped" | "null") {
  const { dir, vocab } = golden("gqa_tied");
  const channel = await Channel.create();
  const self = selfCommand(["ref-worker", "--model", dir, "--channel", channel.dir]);
  const child = new Deno.Command(self.command, {
    args: self.args,
    env: XDG,
    stdin: "piped",
    stdout: "piped",
    stderr,
  }).spawn();
  return { channel, child, vocab };
}

Deno.test(
  "a worker whose reply cannot be written (the trainer is gone) removes the channel and exits",
  gpuTest,
  async () => {
    const { channel, child } = await spawnWorker("piped");
    const stdout = new LineReader(child.stdout);
    assert.equal(JSON.parse((await stdout.next())!).ready, true);
    // As a killed trainer leaves it: nobody reads the worker's stdout, its stdin still open.
    await stdout.cancel();
    const stdin = child.stdin.getWriter();
    await stdin.write(new TextEncoder().encode(`{"op": "frobnicate", "id": 1}\n`));
    const { code } = await child.status;
    const stderr = new TextDecoder().decode(await new Response(child.stderr).arrayBuffer());
    assert.equal(code, 0, stderr);
    assert.doesNotMatch(stderr, /Uncaught|BrokenPipe/);
    assert.equal(await Deno.stat(channel.dir).then(() => true, () => false), false, "channel");
    await stdin.close().catch(() => {});
  },
);

Deno.test("malformed requests get error replies; the worker keeps serving", gpuTest, async () => {
  const { channel, child, vocab } = await spawnWorker("null");
  const stdin = child.stdin.getWriter(), stdout = new LineReader(child.stdout);
  const send = async (line: string) => {
    await stdin.write(new TextEncoder().encode(line + "\n"));
    return JSON.parse((await stdout.next())!);
  };
  try {
    const ready = JSON.parse((await stdout.next())!);
    assert.equal(ready.ready, true);
    assert.equal(ready.vocab_size, vocab);
    assert.equal(ready.engine, "webgpu");

    const batch = (name: string, ids: number[][], P: number[], C: number[], idsDtype = "I32") => {
      const L = ids[0].length, flat = ids.flat();
      const data = idsDtype === "I32" ? Int32Array.from(flat) : Float32Array.from(flat);
      return writeSafetensors(
        name,
        new Map([
          ["input_ids", { shape: [ids.length, L], data }],
          ["prompt_lens", { shape: [P.length], data: Int32Array.from(P) }],
          ["completion_lens", { shape: [C.length], data: Int32Array.from(C) }],
        ]),
      );
    };
    const good = channel.path("good.safetensors");
    await batch(good, [[1, 2, 3, 4], [5, 6, 7, 0]], [1, 2], [3, 1]);
    await batch(`${tmp}/outside.safetensors`, [[1, 2, 3, 4]], [1], [3]);
    await Deno.symlink(`${tmp}/outside.safetensors`, channel.path("link.safetensors"));
    await batch(channel.path("rows.safetensors"), [[1, 2, 3]], [1, 1], [2, 2]);
    await batch(channel.path("vocab.safetensors"), [[1, vocab, 3]], [1], [2]);
    await batch(channel.path("lengths.safetensors"), [[1, 2, 3]], [2], [2]);
    await batch(channel.path("float.safetensors"), [[1, 2, 3]], [1], [2], "F32");
    await Deno.writeTextFile(channel.path("junk.safetensors"), "not a safetensors file");
    await writeSafetensors(
      channel.path("weights.safetensors"),
      new Map([["model.embed_tokens.weight", { shape: [3], data: new Float32Array(3) }]]),
    );
    const logprobs = (id: number, file: string, invT: unknown = 1) =>
      JSON.stringify({ op: "logprobs", id, file, inv_temperature: invT });
    const cases: [string, RegExp][] = [
      ["this is not json", /not a JSON line/],
      ["[1, 2]", /must be a JSON object/],
      [`{"op": "frobnicate", "id": 3}`, /unknown op "frobnicate"/],
      [logprobs(4, "/etc/passwd"), /outside the channel directory/],
      [logprobs(5, `${tmp}/outside.safetensors`), /outside the channel directory/],
      [logprobs(6, "link.safetensors"), /outside the channel directory/],
      [logprobs(7, "../outside.safetensors"), /outside the channel directory|no such file/],
      [logprobs(8, "missing.safetensors"), /no such file in the channel directory/],
      [logprobs(9, "rows.safetensors"), /1 rows but prompt_lens has 2/],
      [logprobs(10, "vocab.safetensors"), /input_ids\[0\]\[1\] = 41 is outside the vocabulary/],
      [logprobs(11, "lengths.safetensors"), /prompt length 2 and completion length 2/],
      [logprobs(12, "float.safetensors"), /expected I32/],
      [logprobs(13, "junk.safetensors"), /junk.safetensors/],
      [logprobs(14, "good.safetensors", -1), /inv_temperature/],
      [logprobs(15, 42 as unknown as string), /"file" must name a file/],
      [`{"op": "load_weights", "id": 16, "file": "good.safetensors", "alpha": 2}`, /alpha/],
      [
        `{"op": "load_weights", "id": 17, "file": "weights.safetensors", "alpha": 0.5}`,
        /weight "model.embed_tokens.weight" needs \d+ values, found 3/,
      ],
    ];
    for (const [line, error] of cases) {
      const reply = await send(line);
      assert.equal(reply.ok, false, line);
      assert.match(reply.error, error, line);
      const id = (() => {
        try {
          return JSON.parse(line).id ?? null;
        } catch {
          return null;
        }
      })();
      assert.equal(reply.id, id, line);
    }
    // Still serving: a good request, then shutdown.
    const reply = await send(logprobs(18, "good.safetensors"));
    assert.equal(reply.ok, true, reply.error);
    const { shape } = await channel.readF32(reply.file, "logprobs", 2);
    assert.deepEqual(shape, [2, 3]);
    assert.deepEqual(await send(`{"op": "shutdown", "id": 19}`), { id: 19, ok: true });
    assert.equal((await child.status).code, 0);
  } finally {
    await stdout.cancel();
    await stdin.close().catch(() => {});
    try {
      child.kill("SIGKILL");
    } catch {
      // exited
    }
    await child.status;
    channel.removeAll();
  }
});

Deno.test(
  "a reference with another vocabulary or tokenizer is refused at start",
  gpuTest,
  async () => {
    const { dir, vocab } = golden("gqa_tied");
    const before = shmChannels();
    await assert.rejects(start(dir, 97), (e: Error) => {
      assert.ok(e instanceof AhaError);
      assert.match(e.message, new RegExp(`vocab_size ${vocab} but the policy has 97`));
      return true;
    });
    assert.deepEqual(shmChannels(), before, "the channel directory is removed");

    const checkpoint = await loadCheckpoint(dir);
    for (const [name, tokenizer] of [["a", '{"model": "a"}'], ["b", '{"model": "b"}']]) {
      await saveCheckpoint(`${tmp}/tok_${name}`, checkpoint.hfConfig, checkpoint.weights, {
        "tokenizer.json": tokenizer,
      });
    }
    await assert.rejects(
      start(`${tmp}/tok_a`, vocab, {
        policy: { vocabSize: vocab, dir: `${tmp}/tok_b`, adapter: defaultAdapter! },
      }),
      /tok_a\/tokenizer.json \(sha256 \w+\) differs from the policy's .*tok_b\/tokenizer.json/,
    );
  },
);

Deno.test(
  "sync: the reference becomes α·policy + (1−α)·reference, also after a restart",
  gpuTest,
  async () => {
    const { dir, vocab, expected } = golden("gqa_tied");
    const checkpoint = await loadCheckpoint(dir);
    const policy = initWeights(checkpoint.config, 5), alpha = 0.3;
    const mixed = new Map([...checkpoint.weights].map(([name, ref]) => {
      const pol = policy.get(name)!;
      return [name, ref.map((r, i) => alpha * pol[i] + (1 - alpha) * r)];
    }));
    await saveCheckpoint(`${tmp}/mixed`, checkpoint.hfConfig, mixed);
    const batch = asBatch(expected.sequences);
    const truth = await start(`${tmp}/mixed`, vocab);
    const want = await truth.completionLogprobs(batch, 1);
    await truth.close();

    const ref = await start(dir, vocab);
    try {
      await ref.mixIn(policy, alpha);
      assert.deepEqual(await ref.completionLogprobs(batch, 1), want);
      Deno.kill(ref.pid!, "SIGKILL"); // the restarted worker must load the synced weights
      assert.deepEqual(await ref.completionLogprobs(batch, 1), want);
      assert.equal(ref.stats.restarts, 1);
    } finally {
      await ref.close();
    }
  },
);

Deno.test(
  "a crashed or hung worker is restarted and the request resent; then it gives up",
  gpuTest,
  async () => {
    const { dir, vocab, expected } = golden("mha_untied");
    const batch = asBatch(expected.sequences);
    const lines: string[] = [];
    const ref = await start(dir, vocab, { timeoutS: 3, log: (line) => lines.push(line) });
    try {
      const first = await ref.completionLogprobs(batch, 0.7);
      Deno.kill(ref.pid!, "SIGKILL");
      assert.deepEqual(await ref.completionLogprobs(batch, 0.7), first);
      Deno.kill(ref.pid!, "SIGSTOP"); // hangs: no answer within timeout_s
      assert.deepEqual(await ref.completionLogprobs(batch, 0.7), first);
      assert.equal(ref.stats.restarts, 2);
      assert.match(lines.join("\n"), /exited \(signal SIGKILL\)|cannot be reached/);
      assert.match(lines.join("\n"), /did not answer within 3 s \(reference.timeout_s\)/);
    } finally {
      await ref.close();
    }
    const fragile = await start(dir, vocab, { maxRestarts: 0 });
    const pid = fragile.pid!;
    try {
      Deno.kill(pid, "SIGKILL");
      await assert.rejects(fragile.completionLogprobs(batch, 1), /giving up after 0 restarts/);
    } finally {
      await fragile.close();
      await fragile.close(); // idempotent
    }
    assert.ok(await gone(pid));
  },
);

// ---- whole training runs ------------------------------------------------------------------

/** The channel directories this process made (/dev/shm/aha-ref-PID-*). */
function shmChannels(): string[] {
  try {
    return [...Deno.readDirSync("/dev/shm")].map((e) => e.name).filter((n) =>
      n.startsWith(`aha-ref-${Deno.pid}-`)
    ).sort();
  } catch {
    return [];
  }
}

/** True once process `pid` no longer runs (gone, or a zombie nobody reaps), within 10 s. */
async function gone(pid: number): Promise<boolean> {
  for (let i = 0; i < 100; i++) {
    try {
      const stat = Deno.readTextFileSync(`/proc/${pid}/stat`);
      if (stat.slice(stat.lastIndexOf(")") + 2).startsWith("Z")) return true;
    } catch {
      return true;
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  return false;
}

interface Run {
  code: number;
  log: string;
  workerPid: number;
  channel: string;
}

/** `aha train` with a tiny arithmetic config; `onLine` sees each stdout line as it comes. */
async function train(
  sets: string[],
  onLine: (line: string, run: { trainer: number; worker: number }) => void = () => {},
): Promise<Run> {
  const all = [
    "max_steps=4",
    "prompts_per_step=4",
    "num_generations=4",
    "eval_prompts=8",
    "eval_steps=0",
    "sample_steps=0",
    // The WebGPU worker on the second adapter (auto would take the ONNX engine here: no GPU).
    "reference.engine=webgpu",
    ...sets,
  ];
  const self = selfCommand(["train", ...all.flatMap((s) => ["--set", s])]);
  const env: Record<string, string> = { ...XDG };
  if (vulkan) env.DENO_WEBGPU_BACKEND = "vulkan";
  const child = new Deno.Command(self.command, {
    args: self.args,
    env,
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const stderr = new Response(child.stderr).text();
  const lines: string[] = [];
  let workerPid = 0, channel = "";
  const stdout = new LineReader(child.stdout);
  for (let line; (line = await stdout.next()) !== null;) {
    lines.push(line);
    const started = line.match(/^reference: worker pid (\d+),.* channel (\S+)$/);
    if (started) [workerPid, channel] = [Number(started[1]), started[2]];
    onLine(line, { trainer: child.pid, worker: workerPid });
  }
  const { code } = await child.status;
  const log = lines.join("\n") + "\n" + await stderr;
  assert.ok(workerPid > 0 && channel !== "", log);
  return { code, log, workerPid, channel };
}

async function assertCleanedUp(run: Run) {
  assert.ok(await gone(run.workerPid), `worker ${run.workerPid} still runs\n${run.log}`);
  assert.equal(await Deno.stat(run.channel).then(() => true, () => false), false, run.log);
}

const weightsOf = (dir: string) => Deno.readFile(`${dir}/model.safetensors`);

Deno.test(
  "killing the worker mid-run changes no weight; nothing outlives a run",
  gpuTest,
  async () => {
    const undisturbed = await train(["sft.steps=20", `output_dir=${tmp}/run_a`]);
    assert.equal(undisturbed.code, 0, undisturbed.log);
    if (vulkan && gl) assert.match(undisturbed.log, /backend gl.*; policy on .*backend vulkan/);
    assert.match(undisturbed.log, /\/dev\/shm\/aha-ref-|channel \//);
    await assertCleanedUp(undisturbed);
    const base = `model=${tmp}/run_a/base`;

    let killed = 0;
    const disturbed = await train([base, `output_dir=${tmp}/run_b`], (line, { worker }) => {
      if (/^step +2\//.test(line) && !killed) Deno.kill(killed = worker, "SIGKILL");
    });
    assert.equal(disturbed.code, 0, disturbed.log);
    assert.ok(killed > 0);
    assert.match(
      disturbed.log,
      /reference worker .*; restarting it and resending request \d+ \(1\/3\)/,
    );
    assert.match(disturbed.log, /1 restarts/);
    assert.deepEqual(
      await weightsOf(`${tmp}/run_b/checkpoint-4`),
      await weightsOf(`${tmp}/run_a/checkpoint-4`),
    );
    await assertCleanedUp(disturbed);

    // SIGTERM: the trainer finishes the step, saves and stops the worker.
    const stopped = await train([base, "max_steps=100", `output_dir=${tmp}/run_c`], (line, p) => {
      if (/^step +2\//.test(line)) Deno.kill(p.trainer, "SIGTERM");
    });
    assert.equal(stopped.code, 143, stopped.log); // interrupted (128 + SIGTERM), after saving
    assert.match(stopped.log, /stopping after this step/);
    assert.match(stopped.log, /saved .*run_c\/checkpoint-[2-9]\n/);
    await assertCleanedUp(stopped);

    // A second SIGTERM quits at once (Deno.exit): the unload handler still cleans up.
    const quit = await train([base, "max_steps=100", `output_dir=${tmp}/run_d`], (line, p) => {
      if (/^step +2\//.test(line)) Deno.kill(p.trainer, "SIGTERM");
      if (line.startsWith("stopping after this step")) Deno.kill(p.trainer, "SIGTERM");
    });
    assert.equal(quit.code, 143, quit.log);
    await assertCleanedUp(quit);

    // SIGKILL: the worker sees its stdin end, removes the channel and exits.
    const killedTrainer = await train(
      [base, "max_steps=100", `output_dir=${tmp}/run_e`],
      (line, p) => {
        if (/^step +2\//.test(line)) Deno.kill(p.trainer, "SIGKILL");
      },
    );
    assert.equal(killedTrainer.code, 137, killedTrainer.log);
    await assertCleanedUp(killedTrainer);
  },
);
