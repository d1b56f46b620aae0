// The reference process in `deno task bench`: log-probs per second of each engine in the
// worker (small preset), the channel's round-trip cost for a typical batch, and how much of the
// reference's time a short training run hides behind the policy's own work.

import { saveCheckpoint } from "../core/checkpoint.ts";
import type { TokenBatch } from "../core/engine.ts";
import { initWeights } from "../core/init.ts";
import { parseModelConfig, PRESETS, toHfConfig } from "../core/model_config.ts";
import { selfCommand } from "../core/self_command.ts";
import { type Gpu, summarizeAdapter } from "../gpu/device.ts";
import { Channel } from "../reference/channel.ts";
import { WorkerReference } from "../reference/client.ts";

/** A checkpoint of random weights for `preset`, in `dir`. */
async function randomCheckpoint(dir: string, preset: string) {
  const config = parseModelConfig(PRESETS[preset]);
  await saveCheckpoint(dir, toHfConfig(config), initWeights(config, 1));
  return config;
}

/** B rows of L tokens, all but the first `prompt` of each scored. */
function batchOf(B: number, L: number, prompt: number, vocab: number): TokenBatch {
  const rows = Array.from(
    { length: B },
    (_, b) => Array.from({ length: L }, (_, t) => (b * 7919 + t * 104729) % vocab),
  );
  return { rows, promptLens: rows.map(() => prompt) };
}

const ms = (s: number) => `${(s * 1e3).toFixed(1)} ms`;

export async function benchReference(gpu: Gpu): Promise<void> {
  const tmp = await Deno.makeTempDir({ prefix: "aha_bench_reference_" });
  try {
    const start = (modelDir: string, vocabSize: number, engine: "webgpu" | "onnx") =>
      WorkerReference.start({
        modelDir,
        adapter: "auto",
        engine,
        env: {},
        timeoutS: 600,
        maxRestarts: 0,
        onnxPath: null,
        policy: { vocabSize, dir: modelDir, adapter: summarizeAdapter(gpu.adapter) },
        log: () => {},
      });

    // Each engine on the small preset: the worker's own compute time per batch.
    const small = await randomCheckpoint(`${tmp}/small`, "small");
    const B = 8, L = 128, runs = 2;
    const batch = batchOf(B, L, 1, small.vocabSize);
    for (const engine of ["webgpu", "onnx"] as const) {
      const ref = await start(`${tmp}/small`, small.vocabSize, engine);
      await ref.completionLogprobs(batch, 1); // warm-up: pipelines, ORT session
      const before = { ...ref.stats };
      for (let i = 0; i < runs; i++) await ref.completionLogprobs(batch, 1);
      const compute = (ref.stats.computeSeconds - before.computeSeconds) / runs;
      const roundTrip = (ref.stats.roundTripSeconds - before.roundTripSeconds) / runs;
      const where = ref.adapter ? `"${ref.adapter.description}" (${ref.adapter.backend})` : "CPU";
      console.log(
        `reference ${engine.padEnd(6)} small ${B}×${L}: ` +
          `${(B * (L - 1) / compute).toFixed(0).padStart(6)} log-probs/s in the worker, ` +
          `${ms(roundTrip)} per batch with the channel, on ${where}`,
      );
      await ref.close();
    }

    // The channel for a typical batch (64 × 256 tokens) on the tiny preset: the round trip
    // minus the worker's compute, and the four file operations alone.
    const tiny = await randomCheckpoint(`${tmp}/tiny`, "tiny");
    const typical = batchOf(64, 256, 200, tiny.vocabSize);
    const ref = await start(`${tmp}/tiny`, tiny.vocabSize, "webgpu");
    await ref.completionLogprobs(typical, 1);
    const before = { ...ref.stats }, trips = 5;
    for (let i = 0; i < trips; i++) await ref.completionLogprobs(typical, 1);
    const overhead = (ref.stats.roundTripSeconds - before.roundTripSeconds -
      (ref.stats.computeSeconds - before.computeSeconds)) / trips;
    await ref.close();
    const channel = await Channel.create();
    const t0 = performance.now();
    for (let i = 0; i < trips; i++) {
      const file = await channel.writeBatch("request.safetensors", typical);
      await channel.readBatch(file);
      const logprobs = new Float32Array(64 * 56);
      const reply = await channel.write(
        "reply.safetensors",
        new Map([["logprobs", { shape: [64, 56], data: logprobs }]]),
      );
      await channel.readF32(reply, "logprobs", 2);
    }
    const files = (performance.now() - t0) / 1000 / trips;
    channel.removeAll();
    console.log(
      `reference channel 64×256 tokens: ${ms(overhead)} per round trip beyond the ` +
        `worker's compute (files alone ${ms(files)})`,
    );

    // Pipelining in a short training run: the trainer's waits against the worker's round trips.
    const sets = [
      "sft.steps=20",
      "max_steps=6",
      "micro_batch_size=128",
      "eval_steps=0",
      "eval_prompts=8",
      "sample_steps=0",
      `output_dir=${tmp}/run`,
    ];
    const self = selfCommand(["train", ...sets.flatMap((s) => ["--set", s])]);
    const out = await new Deno.Command(self.command, { args: self.args, stderr: "null" }).output();
    const log = new TextDecoder().decode(out.stdout);
    const totals = log.match(/reference worker: (\d+) requests, ([\d.]+) s computing, ([\d.]+) s/);
    if (!out.success || !totals) {
      console.log(`reference pipelining: the training run failed\n${log}`);
      return;
    }
    const waited = (await Deno.readTextFile(`${tmp}/run/metrics.jsonl`)).trim().split("\n")
      .reduce((sum, line) => sum + JSON.parse(line).reference_s, 0);
    const [compute, roundTrip] = [Number(totals[2]), Number(totals[3])];
    console.log(
      `reference pipelining over ${totals[1]} training steps: worker computed ${
        compute.toFixed(2)
      } s, ` +
        `round trips ${roundTrip.toFixed(2)} s, trainer waited ${waited.toFixed(2)} s ` +
        `(${(100 * Math.max(0, 1 - waited / roundTrip)).toFixed(0)}% hidden)`,
    );
  } finally {
    await Deno.remove(tmp, { recursive: true });
  }
}
