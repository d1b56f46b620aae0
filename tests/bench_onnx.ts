// How fast the ONNX reference engine scores: log-probs per second on the `small` preset shape
// (16 sequences × 128 tokens, random weights) for 1 and 2 WebAssembly threads. onnxruntime-web
// fixes its thread count when the first session starts, so each count is measured in a child
// process of its own: `deno run -A tests/bench_onnx.ts THREADS` prints one JSON result.

import { initWeights } from "../core/init.ts";
import { parameterCount, parseModelConfig, PRESETS } from "../core/model_config.ts";
import { OnnxEngine } from "../reference/onnx_engine.ts";

export interface OnnxBenchResult {
  threads: number;
  logprobsPerSecond: number;
  secondsPerBatch: number;
  /** Matrix-multiply FLOPs (weights, lm_head, attention) per second, in billions. */
  gflops: number;
  /** Export plus session creation. */
  startSeconds: number;
}

const BATCH = 16, LENGTH = 128, RUNS = 3;

async function measure(threads: number): Promise<OnnxBenchResult> {
  const config = parseModelConfig(PRESETS.small);
  const weights = initWeights(config, 1);
  let start = performance.now();
  const engine = await OnnxEngine.create({ config, weights }, { threads });
  const startSeconds = (performance.now() - start) / 1000;
  const sequences = Array.from(
    { length: BATCH },
    (_, b) => Array.from({ length: LENGTH }, (_, t) => (b * 7919 + t * 104729) % config.vocabSize),
  );
  await engine.logprobs(sequences); // warm-up
  start = performance.now();
  for (let i = 0; i < RUNS; i++) await engine.logprobs(sequences);
  const secondsPerBatch = (performance.now() - start) / 1000 / RUNS;
  await engine.release();

  const { hiddenSize: H, vocabSize: V, numLayers, headDim, numHeads } = config;
  const layerWeights = parameterCount(config) - V * H * (config.tieWordEmbeddings ? 1 : 2);
  const flops = 2 * BATCH * LENGTH * layerWeights + 2 * BATCH * (LENGTH - 1) * V * H +
    4 * BATCH * numLayers * numHeads * LENGTH * LENGTH * headDim;
  return {
    threads: engine.threads,
    logprobsPerSecond: BATCH * (LENGTH - 1) / secondsPerBatch,
    secondsPerBatch,
    gflops: flops / secondsPerBatch / 1e9,
    startSeconds,
  };
}

/** One result per thread count, each measured in its own child process. */
export async function benchOnnx(threadCounts = [1, 2]): Promise<OnnxBenchResult[]> {
  const results = [];
  for (const threads of threadCounts) {
    const child = await new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", new URL(import.meta.url).pathname, String(threads)],
      cwd: new URL("..", import.meta.url).pathname,
      stderr: "inherit",
    }).output();
    if (!child.success) throw new Error(`onnx bench with ${threads} threads failed`);
    results.push(JSON.parse(new TextDecoder().decode(child.stdout)) as OnnxBenchResult);
  }
  return results;
}

if (import.meta.main) console.log(JSON.stringify(await measure(Number(Deno.args[0] ?? 2))));
