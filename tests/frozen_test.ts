// Frozen weights stored in 16 bits (core/half.ts, the bf16/f16 loads of gpu/kernels/matmul.ts
// and embedding.ts, GpuModel's weightDtypes): the CPU narrowing against independent rounding
// (Math.f16round; bf16 by choosing the nearer of the two neighbouring bf16 values in float64),
// the kernels against float64 twins on the rounded values, and whole models: a BF16 checkpoint
// scored with 16-bit storage gives exactly the log-probs of f32 storage (widening is exact), and
// still matches PyTorch's golden values. The memory plan counts them as the model allocates them.
//
// f16 storage needs the adapter's shader-f16 feature (lavapipe has it, llvmpipe's GL does not):
// those tests are skipped, with the reason in their name, where it is missing
// (run with DENO_WEBGPU_BACKEND=vulkan to include them).

import assert from "node:assert/strict";
import { loadCheckpoint } from "../core/checkpoint.ts";
import {
  bf16Bits,
  bf16Value,
  f16Bits,
  f16Value,
  firstNonFiniteHalf,
  frozenWeightDtypes,
  type HalfDType,
  halfValue,
  packHalves,
  pairHalves,
  roundThrough,
  unpackHalves,
} from "../core/half.ts";
import { weightShapes } from "../core/model_config.ts";
import { Rng } from "../core/rng.ts";
import type { Tensor } from "../gpu/device.ts";
import { embedding } from "../gpu/kernels/embedding.ts";
import { matmul } from "../gpu/kernels/matmul.ts";
import { GpuModel } from "../gpu/model.ts";
import { scoreSequences } from "../gpu/score.ts";
import {
  allocatedBytes,
  assertRowsClose,
  gpuTest,
  openGpu,
  padded,
  randoms,
  unpad,
} from "./helpers.ts";
import { planMemory } from "../core/plan.ts";
import { defaultTrainConfig } from "../core/train_config.ts";

const gpu = await openGpu();
const GOLDEN = new URL("./fixtures/golden/", import.meta.url).pathname;
const F16_SKIP = gpu.hasF16 ? "" : ` (skipped: "${gpu.description}" has no shader-f16)`;
const DTYPES: HalfDType[] = gpu.hasF16 ? ["bf16", "f16"] : ["bf16"];

// ---- narrowing on the CPU -----------------------------------------------------------------

/** bf16 rounding by another route: the nearer of the bf16 values just below and above x. */
function bf16Twin(x: number): number {
  const f = new Float32Array([x]), u = new Uint32Array(f.buffer);
  const down = new Uint32Array([u[0] & 0xffff0000]), up = new Uint32Array([down[0] + 0x10000]);
  const lo = new Float32Array(down.buffer)[0], hi = new Float32Array(up.buffer)[0];
  // Past the largest bf16, the next value up is Inf, at the distance 2¹²⁸ would be.
  const hiAt = Number.isFinite(hi) ? hi : Math.sign(hi) * 2 ** 128;
  const dLo = Math.abs(x - lo), dHi = Math.abs(hiAt - x);
  if (dLo !== dHi) return dLo < dHi ? lo : hi;
  return (down[0] >>> 16) % 2 === 0 ? lo : hi; // a tie goes to the even mantissa
}

Deno.test("f32 → bf16 and f16 round to nearest even, and widen back exactly", () => {
  const rng = new Rng(5);
  const values = [0, -0, 1, -1, 65504, 65520, 1e-8, 6e-8, 3e-5, -2.5e-7, 1 / 3, 3.4e38];
  for (let i = 0; i < 20000; i++) {
    values.push(Math.fround((2 * rng.next() - 1) * 2 ** Math.floor(rng.next() * 40 - 28)));
  }
  for (const x of values) {
    assert.ok(Object.is(bf16Value(bf16Bits(x)), bf16Twin(Math.fround(x))), `bf16 of ${x}`);
    assert.ok(Object.is(f16Value(f16Bits(x)), Math.f16round(x)), `f16 of ${x}`);
  }
  // Every 16-bit pattern that is a number survives widening and narrowing again.
  for (let bits = 0; bits < 65536; bits++) {
    if (!Number.isNaN(f16Value(bits))) assert.equal(f16Bits(f16Value(bits)), bits, `f16 ${bits}`);
    if (!Number.isNaN(bf16Value(bits))) assert.equal(bf16Bits(bf16Value(bits)), bits);
  }
  const odd = Float32Array.from(values.slice(0, 7));
  assert.deepEqual(
    unpackHalves(packHalves(odd, "f16"), 7, "f16"),
    odd.map((x) => Math.f16round(x)),
  );
});

Deno.test("a checkpoint's own 16-bit values pair up as narrowing their f32 values does", () => {
  const rng = new Rng(6);
  const values = Float32Array.from({ length: 9 }, () => Math.fround(rng.next() * 8 - 4));
  for (const dtype of ["bf16", "f16"] as const) {
    const narrow = dtype === "bf16" ? bf16Bits : f16Bits;
    const bits = Uint16Array.from(values, narrow); // 9 values, in a buffer of their own
    // Whole (an odd count), from an odd offset, from an even one: copies and a view alike.
    for (const [from, to] of [[0, 9], [1, 9], [1, 8], [2, 8], [0, 1]]) {
      const part = bits.subarray(from, to);
      const paired = pairHalves(part);
      assert.deepEqual(
        paired,
        packHalves(values.slice(from, to), dtype),
        `${dtype} ${from}..${to}`,
      );
      assert.equal(paired.buffer === bits.buffer, (to - from) % 2 === 0 && from % 2 === 0);
    }
    assert.equal(firstNonFiniteHalf(bits, dtype), -1);
    for (const bad of [NaN, Infinity, -Infinity]) {
      const withBad = bits.slice();
      withBad[6] = narrow(bad);
      assert.equal(firstNonFiniteHalf(withBad, dtype), 6, `${dtype} ${bad}`);
      assert.ok(Object.is(halfValue(withBad[6], dtype), bad));
    }
    // The largest finite values are not taken for infinities.
    assert.equal(
      firstNonFiniteHalf(Uint16Array.of(narrow(dtype === "bf16" ? 3.38e38 : 65504)), dtype),
      -1,
    );
  }
});

Deno.test("frozen_dtype picks each weight's storage", () => {
  const shapes = new Map([["w", [4, 4]], ["x", [4, 4]], ["y", [4, 4]], ["norm", [4]]]);
  const dtypes = new Map([["w", "BF16"], ["x", "F16"], ["y", "F32"], ["norm", "BF16"]]);
  const show = (m: Map<string, string>) => JSON.stringify([...m]);
  assert.equal(
    show(frozenWeightDtypes("auto", shapes, dtypes, true)),
    '[["w","bf16"],["x","f16"]]',
  );
  assert.equal(show(frozenWeightDtypes("auto", shapes, dtypes, false)), '[["w","bf16"]]');
  assert.equal(
    show(frozenWeightDtypes("bf16", shapes, dtypes, false)),
    '[["w","bf16"],["x","bf16"],["y","bf16"]]',
  );
  assert.equal(show(frozenWeightDtypes("f32", shapes, dtypes, true)), "[]");
});

// ---- kernels --------------------------------------------------------------------------------

/** A weight uploaded in 16-bit storage. */
function upload16(values: Float32Array, shape: number[], dtype: HalfDType): Tensor {
  const t = gpu.zeros(shape, dtype);
  gpu.write(t, packHalves(values, dtype));
  return t;
}

// The blocked kernel (software adapters) reads its operands from texture copies in large
// products and from storage in small ones; the tiled one (hardware GPUs) from storage.
const KERNELS = [
  { kernel: "blocked", textures: true, label: "blocked, textures" },
  { kernel: "blocked", textures: false, label: "blocked, storage" },
  { kernel: "tiled", textures: false, label: "tiled" },
] as const;
const KERNEL_CASES = (["bf16", "f16"] as const).flatMap((dtype) =>
  KERNELS.map((k) => [dtype, k] as const)
);

// Odd sizes take scalar loads (one element of a packed word); multiples of 4 the vec4 loads;
// in [40, 132, 68] the weight spans more than one row of its texture copy (4,096 halves).
const WIDENED_SHAPES = [
  [5, 7, 9],
  [33, 13, 3],
  [8, 12, 16],
  [17, 36, 20],
  [1, 5, 1],
  [40, 132, 68],
];
for (const [dtype, { kernel, textures, label }] of KERNEL_CASES) {
  const ignore = dtype === "f16" && !gpu.hasF16;
  const name = `matmul (${label}) reads a ${dtype} weight widened, as nn.Linear and its backward${
    dtype === "f16" ? F16_SKIP : ""
  }`;
  Deno.test({ name, ignore, ...gpuTest }, async () => {
    const rng = new Rng(9);
    for (const [M, N, K] of WIDENED_SHAPES) {
      // linear: y[M,N] = x[M,K]·Wᵀ with W [N,K]; backward: dx[M,K] = dy[M,N]·W.
      const w = roundThrough(randoms(N * K, rng), dtype), x = randoms(M * K, rng);
      const dy = randoms(M * N, rng);
      const wt = upload16(w, [N, K], dtype);
      const xt = gpu.upload(x), dyt = gpu.upload(dy);
      const y = gpu.upload(padded(new Float32Array(M * N))),
        dx = gpu.upload(padded(new Float32Array(M * K)));
      matmul(gpu, xt, wt, y, { M, N, K }, { transB: true, kernel, textures });
      matmul(gpu, dyt, wt, dx, { M, N: K, K: N }, { kernel, textures });
      const [yGot, dxGot] = (await gpu.readMany([y, dx])) as Float32Array[];
      const yWant = new Float64Array(M * N), dxWant = new Float64Array(M * K);
      const yMag = new Float64Array(M * N), dxMag = new Float64Array(M * K);
      for (let m = 0; m < M; m++) {
        for (let n = 0; n < N; n++) {
          for (let k = 0; k < K; k++) {
            yWant[m * N + n] += x[m * K + k] * w[n * K + k];
            yMag[m * N + n] += Math.abs(x[m * K + k] * w[n * K + k]);
            dxWant[m * K + k] += dy[m * N + n] * w[n * K + k];
            dxMag[m * K + k] += Math.abs(dy[m * N + n] * w[n * K + k]);
          }
        }
      }
      // f32 accumulation over the same (widened) values: ~sqrt(K) ulps of the terms' sum.
      const check = (got: Float32Array, want: Float64Array, mag: Float64Array, k: number) =>
        want.forEach((v, i) => {
          const tol = 1e-6 * Math.sqrt(k + 2) * mag[i] + 1e-30;
          assert.ok(
            Math.abs(got[i] - v) <= tol,
            `${dtype} [${M},${N},${K}] ${i}: ${got[i]} vs ${v}`,
          );
        });
      check(unpad(yGot, M * N, "y"), yWant, yMag, K);
      check(unpad(dxGot, M * K, "dx"), dxWant, dxMag, N);
      for (const t of [wt, xt, dyt, y, dx]) t.destroy();
    }
  });
}

for (const dtype of ["bf16", "f16"] as const) {
  const ignore = dtype === "f16" && !gpu.hasF16;
  const name = `embedding gathers ${dtype} rows exactly, from row slices${
    dtype === "f16" ? F16_SKIP : ""
  }`;
  Deno.test({ name, ignore, ...gpuTest }, async () => {
    const V = 11, H = 7, T = 9, rng = new Rng(2);
    const table = roundThrough(randoms(V * H, rng), dtype);
    // Slices of 5, 5 and 1 rows: odd row lengths put rows across packed words.
    const slices = [[0, 5], [5, 5], [10, 1]].map(([first, rows]) =>
      upload16(table.slice(first * H, (first + rows) * H), [rows, H], dtype)
    );
    const ids = Int32Array.from({ length: T }, (_, t) => (t * 7 + 3) % V);
    const idsT = gpu.upload(ids), out = gpu.upload(padded(new Float32Array(T * H)));
    embedding(gpu, idsT, slices, out, T);
    const got = unpad(await gpu.read(out), T * H, "embedding");
    const want = new Float32Array(T * H);
    ids.forEach((id, t) => want.set(table.subarray(id * H, (id + 1) * H), t * H));
    assert.deepEqual(got, want);
    for (const t of [...slices, idsT, out]) t.destroy();
  });
}

// ---- whole models ---------------------------------------------------------------------------

const CHECKPOINTS: [string, HalfDType][] = [["bf16_tied", "bf16"], ["f16_sharded", "f16"]];
for (const [dir, dtype] of CHECKPOINTS) {
  const ignore = dtype === "f16" && !gpu.hasF16;
  const name = `a ${dtype.toUpperCase()} checkpoint scored with ${dtype} storage: the same ` +
    `log-probs as f32 storage, and PyTorch's${dtype === "f16" ? F16_SKIP : ""}`;
  Deno.test({ name, ignore, ...gpuTest }, async () => {
    const expected = JSON.parse(Deno.readTextFileSync(`${GOLDEN}${dir}/expected.json`));
    const checkpoint = await loadCheckpoint(GOLDEN + dir);
    const weightDtypes = frozenWeightDtypes(
      "auto",
      weightShapes(checkpoint.config),
      checkpoint.dtypes,
      gpu.hasF16,
    );
    assert.ok(weightDtypes.size > 0 && [...weightDtypes.values()].every((d) => d === dtype));
    const score = async (options: ConstructorParameters<typeof GpuModel>[3]) => {
      const model = new GpuModel(gpu, checkpoint.config, checkpoint.weights, options);
      const logprobs = await scoreSequences(model, expected.sequences);
      const stored = model.params.get("model.embed_tokens.weight")![0].dtype;
      const read = await model.readWeights();
      model.destroy();
      return { logprobs, stored, read };
    };
    const f32 = await score({ maxBindingBytes: 4 * 64 * 4 });
    // Small binding slices split the embedding (and the tied lm_head) into 16-bit row slices.
    const half = await score({ weightDtypes, maxBindingBytes: 4 * 64 * 4 });
    assert.equal(f32.stored, "f32");
    assert.equal(half.stored, dtype);
    assert.deepEqual(half.logprobs, f32.logprobs); // bit for bit
    for (const [n, w] of checkpoint.weights) assert.deepEqual(half.read.get(n), w, n);
    assertRowsClose(half.logprobs, expected.logprobs, 1e-4, dir);
  });
}

Deno.test(
  "storing an f32 checkpoint's matrices as 16-bit equals scoring its rounded weights",
  gpuTest,
  async () => {
    const checkpoint = await loadCheckpoint(GOLDEN + "gqa3_untied");
    const { config, weights } = checkpoint;
    const sequences = JSON.parse(Deno.readTextFileSync(`${GOLDEN}gqa3_untied/expected.json`))
      .sequences;
    for (const dtype of DTYPES) {
      const weightDtypes = frozenWeightDtypes(dtype, weightShapes(config), checkpoint.dtypes, true);
      const rounded = new Map(
        [...weights].map(([n, w]) => [n, weightDtypes.has(n) ? roundThrough(w, dtype) : w]),
      );
      const a = new GpuModel(gpu, config, weights, { weightDtypes });
      const b = new GpuModel(gpu, config, rounded);
      assert.deepEqual(await scoreSequences(a, sequences), await scoreSequences(b, sequences));
      a.destroy();
      b.destroy();
    }
  },
);

const MAIN = new URL("../main.ts", import.meta.url).pathname;

/**
 * `aha score` over the bf16_tied golden's sequences, with `extra` arguments and `env` added to
 * the process's environment: its exit code and trimmed output.
 */
async function scoreBf16Golden(extra: string[], env: Record<string, string> = {}) {
  const dir = GOLDEN + "bf16_tied";
  const input = await Deno.makeTempFile({ suffix: ".json" });
  const { sequences } = JSON.parse(Deno.readTextFileSync(`${dir}/expected.json`));
  await Deno.writeTextFile(input, JSON.stringify({ sequences }));
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", MAIN, "score", "--model", dir, "--input", input, ...extra],
    env,
  }).output();
  await Deno.remove(input);
  const text = (b: Uint8Array) => new TextDecoder().decode(b).trim();
  return { code: out.code, stdout: text(out.stdout), stderr: text(out.stderr) };
}

Deno.test(
  "aha score --frozen-dtype: a BF16 checkpoint scores the same under auto (bf16) and f32; a bad value is one line",
  gpuTest,
  async () => {
    const [auto, f32, bad] = await Promise.all([
      scoreBf16Golden([]),
      scoreBf16Golden(["--frozen-dtype", "f32"]),
      scoreBf16Golden(["--frozen-dtype", "bf8"]),
    ]);
    assert.equal(auto.code, 0, auto.stderr);
    assert.equal(auto.stdout, f32.stdout);
    assert.equal(bad.code, 2);
    assert.match(
      bad.stderr,
      /^aha: score: --frozen-dtype must be auto, bf16, f16 or f32, got "bf8"/,
    );
  },
);

/** Whether a process finds a WebGPU adapter on wgpu's GL backend (llvmpipe's GL here). */
const glAdapter = (await new Deno.Command(Deno.execPath(), {
  args: ["run", "-A", MAIN, "gpu", "--probe"],
  env: { DENO_WEBGPU_BACKEND: "gl" },
  stdout: "null",
  stderr: "null",
}).output()).success;

Deno.test({
  name: "on GL, which has no rg32uint storage textures, a BF16 checkpoint scores as under f32",
  ignore: !glAdapter,
  ...gpuTest,
}, async () => {
  const gl = { DENO_WEBGPU_BACKEND: "gl" };
  const [bf16, f32] = await Promise.all([
    scoreBf16Golden(["--frozen-dtype", "bf16"], gl),
    scoreBf16Golden(["--frozen-dtype", "f32"], gl),
  ]);
  assert.equal(bf16.code, 0, bf16.stderr);
  assert.equal(bf16.stderr, ""); // no WebGPU error either
  assert.equal(bf16.stdout, f32.stdout);
});

Deno.test(
  "the plan counts 16-bit frozen weights as the GPU model allocates them",
  gpuTest,
  async () => {
    const { config, weights, dtypes } = await loadCheckpoint(GOLDEN + "gqa3_untied");
    const engine = (frozen: "f32" | "bf16") =>
      allocatedBytes(gpu, () => {
        const storage = frozenWeightDtypes(frozen, weightShapes(config), dtypes, gpu.hasF16);
        new GpuModel(gpu, config, weights, { weightDtypes: storage }).destroy();
        return Promise.resolve();
      });
    const planned = (frozen_dtype: "f32" | "bf16") =>
      planMemory({ ...defaultTrainConfig(), frozen_dtype }, config, false).items
        .find((i) => i.adapter === "reference" && i.what === "weights")!.bytes;
    const saved = (await engine("f32")) - (await engine("bf16"));
    assert.ok(saved > 0);
    assert.equal(saved, planned("f32") - planned("bf16"));
  },
);

Deno.test(
  "a 16-bit weight is frozen: going back through it for its gradient is refused",
  gpuTest,
  async () => {
    const { config, weights, dtypes } = await loadCheckpoint(GOLDEN + "bf16_tied");
    const weightDtypes = frozenWeightDtypes("auto", weightShapes(config), dtypes, gpu.hasF16);
    const model = new GpuModel(gpu, config, weights, { weightDtypes });
    model.forward(new Int32Array(6).fill(1), 2, 3);
    assert.throws(() => model.backward(new Float32Array(6)), /stored in 16 bits, frozen/);
    gpu.flush();
    model.destroy();
  },
);
