// `deno task bench`: how fast the pieces run on this machine's adapter. Speed is measured here,
// never in tests. The bench is a list of sections, each a function printing its own lines;
// add a section by writing a function and listing it in SECTIONS.
//
// GPU timings record several iterations and sync once at the end, so the ~11 ms cost of a GPU
// wait is paid once per measurement rather than per dispatch.

import { Gpu, summarizeAdapter } from "../gpu/device.ts";
import { matmul, type MatmulOptions, type MatmulShape } from "../gpu/kernels/matmul.ts";
import { attention } from "../gpu/kernels/attention.ts";
import { initWeights } from "../core/init.ts";
import { parameterCount, parseModelConfig, PRESETS } from "../core/model_config.ts";
import { generate } from "../gpu/generate.ts";
import { GpuModel } from "../gpu/model.ts";
import { benchReference } from "./bench_reference.ts";
import { ahaGrpoStep, ahaSftStep, sideBySide } from "./bench_torch.ts";

function random(n: number): Float32Array {
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) out[i] = Math.random() - 0.5;
  return out;
}

/** A timed stretch lasts at least this long, so that its one GPU wait is a small part of it. */
const MIN_TIMED_SECONDS = 0.2;

/**
 * Seconds per call of `record`, after one warm-up call (compiles pipelines): at least `iters`
 * calls, more when they take under MIN_TIMED_SECONDS (on a hardware GPU a product takes well
 * under the ~11 ms of Deno's GPU wait, which would otherwise be most of what is timed).
 */
async function timeGpu(gpu: Gpu, iters: number, record: () => void): Promise<number> {
  record();
  await gpu.sync();
  for (;;) {
    const start = performance.now();
    for (let i = 0; i < iters; i++) record();
    await gpu.sync();
    const seconds = (performance.now() - start) / 1000;
    if (seconds >= MIN_TIMED_SECONDS) return seconds / iters;
    iters *= Math.min(16, Math.ceil(1.2 * MIN_TIMED_SECONDS / seconds));
  }
}

function adapterSection(gpu: Gpu): Promise<void> {
  const s = summarizeAdapter(gpu.adapter);
  console.log(`adapter: ${s.description} (backend ${s.backend}, fallback ${s.isFallbackAdapter})`);
  return Promise.resolve();
}

/** GFLOPS of the matmul layouts the model uses, best of 3 timings (the machine may be shared). */
async function matmulSection(gpu: Gpu): Promise<void> {
  const cases: { name: string; shape: MatmulShape; opts: MatmulOptions; iters: number }[] = [
    { name: "x·Wᵀ", shape: { M: 256, N: 256, K: 256 }, opts: { transB: true }, iters: 20 },
    { name: "x·Wᵀ", shape: { M: 1024, N: 896, K: 896 }, opts: { transB: true }, iters: 3 },
    { name: "x·Wᵀ", shape: { M: 512, N: 4864, K: 896 }, opts: { transB: true }, iters: 2 },
    // Rows of 8 KB (Qwen2.5-3B's hidden 2,048): the weight's copy pads them (Gpu.matrixRows).
    { name: "x·Wᵀ", shape: { M: 512, N: 2048, K: 2048 }, opts: { transB: true }, iters: 2 },
    { name: "x·Wᵀ decode", shape: { M: 8, N: 4864, K: 896 }, opts: { transB: true }, iters: 20 },
    { name: "dy·W", shape: { M: 512, N: 896, K: 4864 }, opts: {}, iters: 2 },
    { name: "dyᵀ·x", shape: { M: 896, N: 896, K: 1024 }, opts: { transA: true }, iters: 3 },
    { name: "x·Wᵀ odd", shape: { M: 97, N: 1001, K: 899 }, opts: { transB: true }, iters: 5 },
    // The tiled kernel meant for hardware GPUs, run here only for scale (barriers are slow).
    {
      name: "x·Wᵀ tiled",
      shape: { M: 512, N: 4864, K: 896 },
      opts: { transB: true, kernel: "tiled" },
      iters: 1,
    },
  ];
  for (const { name, shape, opts, iters } of cases) {
    const { M, N, K } = shape;
    const a = gpu.upload(random(M * K)), b = gpu.upload(random(K * N)), out = gpu.zeros([M, N]);
    let seconds = Infinity;
    for (let run = 0; run < 3; run++) {
      const s = await timeGpu(gpu, iters, () => matmul(gpu, a, b, out, shape, opts));
      seconds = Math.min(seconds, s);
    }
    const gflops = 2 * M * N * K / seconds / 1e9;
    const label = `matmul ${name} ${M}×${N}×${K}`.padEnd(34);
    console.log(
      `${label} ${gflops.toFixed(2).padStart(6)} GFLOPS  ${(seconds * 1e3).toFixed(1)} ms`,
    );
    for (const t of [a, b, out]) t.destroy();
  }
}

/**
 * Attention forward at GSM8K lengths (1 row × 1,024 tokens, Qwen2.5-0.5B's 14 query and 2 kv
 * heads of 64): the streaming kernel (CPU adapters) and the flash one (hardware GPUs).
 */
async function attentionSection(gpu: Gpu): Promise<void> {
  const shape = { B: 1, Lq: 1024, capacity: 1024, nHeads: 14, nKvHeads: 2, headDim: 64 };
  const T = shape.B * shape.Lq;
  const q = gpu.upload(random(T * 14 * 64)), k = gpu.upload(random(T * 2 * 64));
  const v = gpu.upload(random(T * 2 * 64)), kvLens = gpu.upload(Int32Array.from([1024]));
  const out = gpu.zeros([T * 14 * 64]), lse = gpu.zeros([14 * T]);
  // Causal: half the score matrix, two products of D per score.
  const flops = 2 * 2 * 64 * 14 * (T * (T + 1)) / 2;
  for (const kernel of ["streaming", "flash"] as const) {
    let seconds = Infinity;
    for (let run = 0; run < 2; run++) {
      const s = await timeGpu(
        gpu,
        1,
        () => attention(gpu, q, k, v, kvLens, out, lse, shape, kernel),
      );
      seconds = Math.min(seconds, s);
    }
    const label = `attention ${kernel} 1×1024, 14/2 heads of 64`.padEnd(34);
    console.log(
      `${label} ${(flops / seconds / 1e9).toFixed(2).padStart(6)} GFLOPS  ${
        (seconds * 1e3).toFixed(1)
      } ms`,
    );
  }
  for (const t of [q, k, v, kvLens, out, lse]) t.destroy();
}

function cpuMatmulSection(): Promise<void> {
  // The same x·Wᵀ product in plain TypeScript, for scale.
  const M = 256, N = 256, K = 256;
  const a = random(M * K), b = random(N * K), out = new Float32Array(M * N);
  const start = performance.now();
  for (let m = 0; m < M; m++) {
    for (let n = 0; n < N; n++) {
      let s = 0;
      for (let k = 0; k < K; k++) s += a[m * K + k] * b[n * K + k];
      out[m * N + n] = s;
    }
  }
  const seconds = (performance.now() - start) / 1000;
  const label = `TypeScript x·Wᵀ ${M}×${N}×${K}`.padEnd(34);
  console.log(`${label} ${(2 * M * N * K / seconds / 1e9).toFixed(2).padStart(6)} GFLOPS`);
  return Promise.resolve();
}

/** Forward and forward+backward tokens per second of the model presets. */
async function modelSection(gpu: Gpu): Promise<void> {
  for (const [preset, B, L, iters] of [["tiny", 64, 16, 10], ["small", 8, 128, 2]] as const) {
    const config = parseModelConfig(PRESETS[preset]);
    const model = new GpuModel(gpu, config, initWeights(config, 0));
    const ids = Int32Array.from({ length: B * L }, (_, i) => (i * 7919) % config.vocabSize);
    const upstream = new Float32Array(B * L).fill(1e-3);
    const forward = await timeGpu(gpu, iters, () => model.forward(ids, B, L));
    const both = await timeGpu(gpu, iters, () => {
      model.forward(ids, B, L);
      model.backward(upstream);
    });
    const label = `model ${preset} (${(parameterCount(config) / 1e6).toFixed(2)}M) ${B}×${L}`
      .padEnd(34);
    console.log(
      `${label} forward ${(B * L / forward).toFixed(0).padStart(7)} tok/s, ` +
        `forward+backward ${(B * L / both).toFixed(0).padStart(7)} tok/s`,
    );
    model.destroy();
  }
}

/** Sampled tokens per second with the KV cache (16 prompts × 8 samples, as the default run). */
async function generationSection(gpu: Gpu): Promise<void> {
  for (const [preset, newTokens] of [["tiny", 16], ["small", 32]] as const) {
    const config = parseModelConfig(PRESETS[preset]);
    const model = new GpuModel(gpu, config, initWeights(config, 0));
    const prompts = Array.from(
      { length: 16 },
      (_, i) => Array.from({ length: 12 }, (_, t) => (i + t * 13) % 90),
    );
    const sampling = {
      temperature: 1,
      topP: 1,
      topK: 0,
      maxNewTokens: newTokens,
      eosIds: [],
      seed: 1,
    };
    await generate(model, prompts, 8, sampling); // compile pipelines
    const start = performance.now();
    const out = await generate(model, prompts, 8, sampling);
    const seconds = (performance.now() - start) / 1000;
    const tokens = out.tokens.reduce((n, t) => n + t.length, 0);
    const label = `generate ${preset} 16×8 rows`.padEnd(34);
    console.log(
      `${label} ${(tokens / seconds).toFixed(0).padStart(7)} tok/s (${
        (seconds * 1e3 / newTokens).toFixed(1)
      } ms per step)`,
    );
    model.destroy();
  }
}

/**
 * GPU time by kernel over one GRPO step and one SFT step of the default's shape (timestamp
 * queries, one pass per dispatch), the products also by shape: where the time goes, for
 * choosing what to speed up next.
 */
async function profileSection(gpu: Gpu): Promise<void> {
  const runs: [string, () => Promise<unknown>][] = [
    ["2 GRPO steps and 2 short generations", () => ahaGrpoStep(gpu, 0)],
    ["10 SFT steps", () => ahaSftStep(gpu, 0)],
  ];
  for (const [name, run] of runs) {
    await run(); // compile pipelines
    if (!gpu.startProfile()) {
      console.log("profile: the adapter has no timestamp-query");
      return;
    }
    const start = performance.now();
    await run();
    const wall = performance.now() - start;
    const kernels = await gpu.stopProfile();
    const total = kernels.reduce((s, k) => s + k.ms, 0);
    console.log(
      `profile of ${name}: ${total.toFixed(1)} ms of GPU time in ${wall.toFixed(0)} ms wall`,
    );
    const line = (what: string, ms: number, dispatches: number) =>
      `${what.padEnd(30)} ${ms.toFixed(1).padStart(7)} ms ${
        String(dispatches).padStart(5)
      } dispatches`;
    for (const k of kernels.slice(0, 12)) {
      console.log(`  ${line(k.kernel, k.ms, k.dispatches)}`);
      // The products by shape (M×N×K), the largest first: which ones to speed up.
      if (!k.kernel.startsWith("matmul")) continue;
      for (const s of k.shapes.slice(0, 6)) console.log(`    ${line(s.shape, s.ms, s.dispatches)}`);
    }
  }
}

const SECTIONS: ((gpu: Gpu) => Promise<void>)[] = [
  adapterSection,
  matmulSection,
  attentionSection,
  cpuMatmulSection,
  modelSection,
  generationSection,
  benchReference,
  sideBySide,
  profileSection,
];

// `deno task bench sideBySide matmul` runs only the sections whose names contain an argument.
const chosen = SECTIONS.filter((s) =>
  Deno.args.length === 0 || s === adapterSection || Deno.args.some((a) => s.name.includes(a))
);
const gpu = await Gpu.open();
for (const section of chosen) await section(gpu);
gpu.destroy();
