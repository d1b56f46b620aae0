// gpu/kernels/matmul.ts against a plain TypeScript twin that accumulates in float64.
//
// Tolerance: inputs are the same f32 values on both sides, so the only difference is the
// GPU's f32 accumulation over K terms. Its rounding error grows like sqrt(K)·2⁻²⁴ times the
// magnitude of the terms (K·2⁻²⁴ in the worst case); we allow
//   |gpu − twin| ≤ 1e-6·sqrt(K+2)·(Σ_k |a·b| + |bias| + |out before|) + 1e-30,
// i.e. ~17·sqrt(K) units of f32 rounding, far above typical error and far below any indexing
// mistake (which is off by a whole term). The +2 counts the bias and accumulate additions.

import assert from "node:assert/strict";
import { Rng } from "../core/rng.ts";

import {
  BLOCKS,
  linear,
  linearBackward,
  matmul,
  type MatmulKernel,
  type MatmulShape,
  PAIRED_K_MIN,
  sumRows,
} from "../gpu/kernels/matmul.ts";
import {
  BUDGET_VARIABLE,
  keptTextureBudget,
  keptTextureBytes,
  KeptTextures,
  memoryBudget,
} from "../gpu/kept_textures.ts";
import { eachInputPath, gpuTest, openGpu, padded, randoms, unpad } from "./helpers.ts";
import { packHalves, roundThrough } from "../core/half.ts";

const gpu = await openGpu();
const rng = new Rng(12345);
const random = (n: number) => randoms(n, rng);

interface Twin {
  value: Float64Array;
  magnitude: Float64Array; // Σ|terms|, for the tolerance
}

/** out = op(a)·op(b) (+ prev) (+ bias) in float64. */
function twinMatmul(
  a: Float32Array,
  b: Float32Array,
  { M, N, K }: MatmulShape,
  transA: boolean,
  transB: boolean,
  prev: Float32Array | null,
  bias: Float32Array | null,
): Twin {
  const value = new Float64Array(M * N);
  const magnitude = new Float64Array(M * N);
  for (let m = 0; m < M; m++) {
    for (let n = 0; n < N; n++) {
      let s = 0, mag = 0;
      for (let k = 0; k < K; k++) {
        const t = (transA ? a[k * M + m] : a[m * K + k]) * (transB ? b[n * K + k] : b[k * N + n]);
        s += t;
        mag += Math.abs(t);
      }
      for (const extra of [prev?.[m * N + n], bias?.[n]]) {
        if (extra !== undefined) {
          s += extra;
          mag += Math.abs(extra);
        }
      }
      value[m * N + n] = s;
      magnitude[m * N + n] = mag;
    }
  }
  return { value, magnitude };
}

function assertClose(got: Float32Array, want: Twin, K: number, what: string): void {
  for (let i = 0; i < want.value.length; i++) {
    const tol = 1e-6 * Math.sqrt(K + 2) * want.magnitude[i] + 1e-30;
    const err = Math.abs(got[i] - want.value[i]);
    if (!(err <= tol)) {
      assert.fail(`${what}: element ${i} is ${got[i]}, want ${want.value[i]} (tolerance ${tol})`);
    }
  }
}

// Odd sizes take the scalar-binding kernel; shapes with multiples of 4 take the vec4 bindings
// and the larger register blocks (1, 2 and 4 row groups), with partial blocks at the edges.
const SIZES = [1, 7, 33, 97];
const SHAPES: MatmulShape[] = [];
for (const M of SIZES) {
  for (const N of SIZES) for (const K of SIZES) SHAPES.push({ M, N, K });
}
SHAPES.push({ M: 4, N: 12, K: 8 }, { M: 12, N: 36, K: 20 });
SHAPES.push({ M: 36, N: 20, K: 33 }, { M: 97, N: 132, K: 68 }, { M: 132, N: 260, K: 76 });
SHAPES.push({ M: 130, N: 257, K: 75 });

const LAYOUTS = [
  { transA: false, transB: true, name: "NT" },
  { transA: false, transB: false, name: "NN" },
  { transA: true, transB: false, name: "TN" },
  { transA: true, transB: true, name: "TT" },
];

const FLAG_CASES = [
  { accumulate: false, bias: false },
  { accumulate: true, bias: false },
  { accumulate: false, bias: true },
  { accumulate: true, bias: true },
];

/** The twin's product for a layout and a flag case (prev and bias where the case asks for them). */
function twinCase(
  a: Float32Array,
  b: Float32Array,
  shape: MatmulShape,
  layout: (typeof LAYOUTS)[number],
  c: (typeof FLAG_CASES)[number],
  prev: Float32Array,
  bias: Float32Array,
) {
  return twinMatmul(
    a,
    b,
    shape,
    layout.transA,
    layout.transB,
    c.accumulate ? prev : null,
    c.bias ? bias : null,
  );
}

// Both kernels run here whatever the adapter: the tiled one (hardware GPUs) and the
// register-blocked one (CPU adapters), the latter reading vec4 operands from texture copies
// (its default on CPU adapters) and from storage (elsewhere, and for 16-bit weights).
const KERNELS: { kernel: MatmulKernel; textures: boolean; name: string }[] = [
  { kernel: "blocked", textures: true, name: "blocked, textures" },
  { kernel: "blocked", textures: false, name: "blocked, storage" },
  { kernel: "tiled", textures: false, name: "tiled" },
];
// The tiled kernel is slow on llvmpipe (barriers): fewer shapes, still odd, crossing 64-tiles
// in every dimension, with vec4 and scalar bindings.
const TILED_SHAPES: MatmulShape[] = [
  { M: 1, N: 1, K: 1 },
  { M: 7, N: 33, K: 97 },
  { M: 97, N: 7, K: 33 },
  { M: 33, N: 97, K: 7 },
  { M: 12, N: 36, K: 20 },
  { M: 97, N: 132, K: 68 },
  { M: 130, N: 257, K: 75 },
];

for (const { kernel, textures, name } of KERNELS) {
  for (const layout of LAYOUTS) {
    Deno.test(
      `matmul ${layout.name} (${name}) matches the float64 twin, ± accumulate and bias`,
      gpuTest,
      async () => {
        for (const shape of kernel === "tiled" ? TILED_SHAPES : SHAPES) {
          const { M, N, K } = shape;
          const a = random(M * K), b = random(K * N), prev = random(M * N), bias = random(N);
          const ta = gpu.upload(a), tb = gpu.upload(b), tbias = gpu.upload(bias);
          // The output is allocated larger than M·N: the extra elements must stay untouched.
          const outs = [0, 1, 2, 3].map(() => gpu.upload(padded(prev)));
          // Larger products take large register blocks whose kernels compile for a second each
          // on llvmpipe: they test plain and accumulate+bias, smaller ones all four combinations.
          const cases = M * N * K < 20000 ? FLAG_CASES : [FLAG_CASES[0], FLAG_CASES[3]];
          cases.forEach((c, i) =>
            matmul(gpu, ta, tb, outs[i], shape, {
              transA: layout.transA,
              transB: layout.transB,
              accumulate: c.accumulate,
              bias: c.bias ? tbias : undefined,
              kernel,
              textures,
            })
          );
          const results = await gpu.readMany(outs);
          cases.forEach((c, i) => {
            const want = twinCase(a, b, shape, layout, c, prev, bias);
            const what = `${layout.name} M=${M} N=${N} K=${K} ${JSON.stringify(c)}`;
            assertClose(unpad(results[i] as Float32Array, M * N, what), want, K, what);
          });
          for (const t of [ta, tb, tbias, ...outs]) t.destroy();
        }
      },
    );
  }
}

interface BlockedCase {
  shape: MatmulShape;
  layout: (typeof LAYOUTS)[number];
  textures: boolean;
  /** Forced, or undefined for the one matmulKernel picks. */
  block?: { rowGroups: number; colGroups: number };
}

/**
 * out = out before + op(a)·op(b) + bias on the blocked kernel for each case, against the twin;
 * cases of one shape share their inputs, and every product is read back in one wait.
 */
async function checkBlocked(cases: BlockedCase[]): Promise<void> {
  const inputs = new Map<MatmulShape, Record<"a" | "b" | "prev" | "bias", Float32Array>>();
  for (const { shape: { M, N, K }, shape } of cases) {
    if (inputs.has(shape)) continue;
    inputs.set(shape, { a: random(M * K), b: random(K * N), prev: random(M * N), bias: random(N) });
  }
  const tensors = new Map([...inputs].map(([shape, { a, b, bias }]) => [shape, {
    a: gpu.upload(a),
    b: gpu.upload(b),
    bias: gpu.upload(bias),
  }]));
  const outs = cases.map(({ shape }) => gpu.upload(padded(inputs.get(shape)!.prev)));
  cases.forEach(({ shape, layout, textures, block }, i) => {
    const t = tensors.get(shape)!;
    matmul(gpu, t.a, t.b, outs[i], shape, {
      transA: layout.transA,
      transB: layout.transB,
      accumulate: true,
      bias: t.bias,
      kernel: "blocked",
      textures,
      block,
    });
  });
  const results = await gpu.readMany(outs);
  cases.forEach(({ shape, layout, textures, block }, i) => {
    const { M, N, K } = shape, { a, b, prev, bias } = inputs.get(shape)!;
    const what = `${layout.name} ${M}×${N}×${K} ${
      block ? `${4 * block.rowGroups}×${4 * block.colGroups}` : "chosen block"
    } ${textures ? "textures" : "storage"}`;
    const want = twinMatmul(a, b, shape, layout.transA, layout.transB, prev, bias);
    assertClose(unpad(results[i] as Float32Array, M * N, what), want, K, what);
  });
  for (const t of [...tensors.values()].flatMap((t) => [t.a, t.b, t.bias])) t.destroy();
  for (const t of outs) t.destroy();
}

/** Every block of BLOCKS on each layout, from textures and from storage. */
function everyBlock(shape: MatmulShape, layouts: typeof LAYOUTS): BlockedCase[] {
  return BLOCKS.flatMap(([rowGroups, colGroups]) =>
    layouts.flatMap((layout) =>
      [true, false].map((textures) => ({
        shape,
        layout,
        textures,
        block: { rowGroups, colGroups },
      }))
    )
  );
}

Deno.test(
  "every register block the software kernel may pick matches the twin, from textures and storage",
  gpuTest,
  // matmulKernel picks among BLOCKS by modelled time: each must be right whatever the product,
  // here one with partial blocks at every edge, accumulating onto out with a bias.
  () => checkBlocked(everyBlock({ M: 36, N: 52, K: 20 }, LAYOUTS)),
);

Deno.test(
  "long products step k eight at a time on every block, from textures and storage",
  gpuTest,
  // Past PAIRED_K_MIN, with K a multiple of 8 and enough workgroups not to split k, the blocked
  // kernel's blocks of 16 rows add two steps' tiles at once (pairedSteps) unless a is transposed.
  // Both layouts that pair, every block (the others keep steps of 4); then N odd (scalar loads of
  // b and stores of out) on a block of 16 rows.
  () => {
    const K = PAIRED_K_MIN + 8, odd = { M: 37, N: 261, K }, block = { rowGroups: 4, colGroups: 2 };
    return checkBlocked([
      ...everyBlock({ M: 132, N: 260, K }, LAYOUTS.slice(0, 2)),
      ...LAYOUTS.slice(0, 2).map((layout) => ({ shape: odd, layout, textures: false, block })),
    ]);
  },
);

Deno.test(
  "every block reads copies laid out by rows in one band, on every layout, with a tail of k",
  gpuTest,
  // Rows of 64 and 192 floats (256 and 768 bytes: not padded) lie by rows in one band
  // (Gpu.matrixRows), where the kernel reads row r's vec4 t at texel (t, r): a along k (NT, NN)
  // and down k (TN), b along k (NT) and down it (NN, TN), and the one-k tail past K % 4.
  () => {
    const along = { M: 36, N: 64, K: 192 }, down = { M: 64, N: 64, K: 36 };
    const probe = gpu.zeros([36 * 192]);
    for (const [size, rowLength] of [[36 * 192, 192], [64 * 36, 64], [37 * 64, 64]]) {
      const rows = gpu.matrixRows(probe.view(0, [size]), rowLength);
      assert.deepEqual([rows?.padded, rows?.bands], [false, 1], `rows of ${rowLength}: one band`);
    }
    probe.destroy();
    return checkBlocked([
      ...everyBlock(along, LAYOUTS.slice(0, 2)),
      ...everyBlock(down, LAYOUTS.slice(2, 3)),
      ...everyBlock({ M: 36, N: 64, K: 37 }, LAYOUTS.slice(1, 2)),
      ...everyBlock({ M: 64, N: 64, K: 37 }, LAYOUTS.slice(2, 3)),
    ].filter((c) => c.textures));
  },
);

Deno.test(
  "texture copies lie by rows, padded when rows alias, in bands when tall, else in order: read right",
  gpuTest,
  // Gpu.matrixRows: a matrix's copy lies by its rows, each padded by a texel when rows are a
  // multiple of 512 bytes long; padded rows go in bands when the matrix is taller than a
  // texture, other rows in order (TEXTURE_ROW texels a row). Every block on NT and NN and the
  // chosen one on TN and TT with rows of 2 KiB (K = 512, so blocks of 16 rows also step k eight
  // at a time); then a b with more rows than a texture is tall, padded (in bands) and not (in
  // order), read along its rows (NT) and down them (NN, whose long k splits into ranges); and an
  // a that tall, in order, read both ways.
  () => {
    const shape = { M: 36, N: 256, K: 512 };
    const b = gpu.zeros([shape.K * shape.N]);
    const rows = gpu.matrixRows(b, shape.K);
    assert.deepEqual(
      [rows?.rowTexels, rows?.padded, rows?.bands],
      [shape.K / 4 + 1, true, 1],
      "2 KiB: padded",
    );
    const unpadded = gpu.matrixRows(b.view(0, [320 * 400]), 320);
    assert.deepEqual(
      [unpadded?.rowTexels, unpadded?.padded, unpadded?.bands],
      [80, false, 1],
      "rows of 1,280 bytes are not padded",
    );
    assert.equal(gpu.matrixRows(b.view(0, [260 * 500]), 260), null, "rows of 1,040: in order");
    assert.equal(
      gpu.textureCopyBytes(b, shape.K),
      (shape.K / 4 + 1) * shape.N * 16,
      "a padded copy holds its rows and their padding",
    );
    b.destroy();
    // On lavapipe (textures up to 16,384 texels a side): 16,392 rows of 1 KiB in 129 bands of
    // 128; rows of 1,280 bytes in order.
    const tallRows = gpu.device.limits.maxTextureDimension2D + 8;
    const tall = gpu.zeros([tallRows * 320]);
    assert.ok(gpu.matrixRows(tall.view(0, [tallRows * 256]), 256)!.bands > 1, "padded: bands");
    assert.equal(gpu.matrixRows(tall, 320), null, "tall rows that are not padded lie in order");
    tall.destroy();
    return checkBlocked([
      ...everyBlock(shape, LAYOUTS.slice(0, 2)).filter((c) => c.textures),
      ...LAYOUTS.slice(2).map((layout) => ({ shape, layout, textures: true })),
      { shape: { M: 5, N: tallRows, K: 256 }, layout: LAYOUTS[0], textures: true },
      { shape: { M: 5, N: 256, K: tallRows }, layout: LAYOUTS[1], textures: true },
      { shape: { M: 5, N: tallRows, K: 320 }, layout: LAYOUTS[0], textures: true },
      { shape: { M: 5, N: 320, K: tallRows }, layout: LAYOUTS[1], textures: true },
      { shape: { M: tallRows, N: 6, K: 64 }, layout: LAYOUTS[0], textures: true },
      { shape: { M: 64, N: 6, K: tallRows }, layout: LAYOUTS[2], textures: true },
    ]);
  },
);

Deno.test(
  "a kept bf16 weight with padded rows is read right both ways, as nn.Linear and its backward",
  gpuTest,
  async () => {
    // A frozen 16-bit weight W [R, C] with rows of 1 KiB (C = 512 halves), kept as one copy that
    // x·Wᵀ reads along its rows and dy·W down them.
    const R = 40, C = 512, M = 9;
    const w = roundThrough(random(R * C), "bf16"), x = random(M * C), dy = random(M * R);
    const tw = gpu.zeros([R, C], "bf16");
    gpu.write(tw, packHalves(w, "bf16"));
    assert.equal(gpu.matrixRows(tw, C)?.padded, true);
    const kept = new KeptTextures(gpu);
    const opts = { kernel: "blocked" as const, textures: true, keptB: kept };
    const tx = gpu.upload(x), tdy = gpu.upload(dy), y = gpu.zeros([M, R]), dx = gpu.zeros([M, C]);
    matmul(gpu, tx, tw, y, { M, N: R, K: C }, { ...opts, transB: true });
    matmul(gpu, tdy, tw, dx, { M, N: C, K: R }, opts);
    const [gy, gdx] = await gpu.readMany([y, dx]) as Float32Array[];
    assertClose(gy, twinMatmul(x, w, { M, N: R, K: C }, false, true, null, null), C, "x·Wᵀ");
    assertClose(gdx, twinMatmul(dy, w, { M, N: C, K: R }, false, false, null, null), R, "dy·W");
    kept.destroy();
    for (const t of [tw, tx, tdy, y, dx]) t.destroy();
  },
);

Deno.test(
  "products recorded back to back, each larger than the last, read the right texture copies",
  gpuTest,
  async () => {
    // Each product copies its operands into kept textures, grown for a larger one while the
    // work recorded before (which reads the old texture) has not been submitted yet.
    const shapes: MatmulShape[] = [
      { M: 8, N: 12, K: 16 },
      { M: 64, N: 72, K: 96 },
      { M: 132, N: 260, K: 76 },
    ];
    const inputs = shapes.map(({ M, N, K }) => ({ a: random(M * K), b: random(N * K) }));
    const tensors = inputs.map(({ a, b }) => ({ a: gpu.upload(a), b: gpu.upload(b) }));
    const outs = shapes.map(({ M, N }) => gpu.zeros([M * N]));
    shapes.forEach((shape, i) =>
      matmul(gpu, tensors[i].a, tensors[i].b, outs[i], shape, { transB: true, textures: true })
    );
    const results = await gpu.readMany(outs);
    shapes.forEach((shape, i) => {
      const want = twinMatmul(inputs[i].a, inputs[i].b, shape, false, true, null, null);
      assertClose(results[i] as Float32Array, want, shape.K, `product ${i}`);
    });
    for (const t of [...tensors.flatMap(({ a, b }) => [a, b]), ...outs]) t.destroy();
  },
);

/**
 * Generation's fused products (MatmulOptions.rmsnorm, .swiglu) against the twin: x·Wᵀ of the
 * RMSNorm of x (± bias), and SwiGLU of the two column halves of x·Wᵀ (of x or of its norm).
 * Tolerance: the product's, on the normalized rows' terms; SwiGLU's error is its inputs' times
 * its derivatives (|silu'| < 1.1) plus f32 rounding. With a bias, the norm's weight is read from a
 * kept copy (KeptTextures), else from one made for the call.
 */
async function checkFused(
  shape: MatmulShape,
  norm: boolean,
  swiglu: boolean,
  bias: boolean,
  textures: boolean,
  block?: { rowGroups: number; colGroups: number },
): Promise<void> {
  const { M, N, K } = shape, eps = 1e-5, I = N / 2;
  // Rows of very different sizes: the norm must scale each by its own.
  const x = random(M * K).map((v, i) => v * (1 + 30 * (Math.floor(i / K) % 3)));
  const w = random(N * K), g = random(K).map((v) => 1 + v / 2), b = random(N);
  const normed = new Float32Array(M * K);
  for (let m = 0; m < M; m++) {
    let ss = 0;
    for (let k = 0; k < K; k++) ss += x[m * K + k] ** 2;
    const r = 1 / Math.sqrt(ss / K + eps);
    for (let k = 0; k < K; k++) normed[m * K + k] = x[m * K + k] * r * g[k];
  }
  const product = twinMatmul(norm ? normed : x, w, shape, false, true, null, bias ? b : null);
  const tx = gpu.upload(x), tw = gpu.upload(w), tg = gpu.upload(g), tb = gpu.upload(b);
  const outSize = swiglu ? M * I : M * N, out = gpu.upload(padded(new Float32Array(outSize)));
  const kept = bias ? new KeptTextures(gpu) : undefined;
  matmul(gpu, tx, tw, out, shape, {
    transB: true,
    bias: bias ? tb : undefined,
    rmsnorm: norm ? { weight: tg, eps, kept } : undefined,
    swiglu,
    kernel: "blocked",
    textures,
    block,
  });
  const what = `${M}×${N}×${K} ${norm ? "rmsnorm " : ""}${swiglu ? "swiglu " : ""}${
    bias ? "bias " : ""
  }${textures ? "textures" : "storage"} ${block ? JSON.stringify(block) : "chosen block"}`;
  const got = unpad(await gpu.read(out) as Float32Array, outSize, what);
  if (!swiglu) assertClose(got, product, K, what);
  else {
    const tol = (i: number) => 1e-6 * Math.sqrt(K + 2) * product.magnitude[i];
    for (let m = 0; m < M; m++) {
      for (let j = 0; j < I; j++) {
        const gate = product.value[m * N + j], up = product.value[m * N + I + j];
        const silu = gate / (1 + Math.exp(-gate)), want = silu * up;
        const allowed = 1.1 * tol(m * N + j) * Math.abs(up) + Math.abs(silu) * tol(m * N + I + j) +
          1e-6 * Math.abs(want) + 1e-30;
        const err = Math.abs(got[m * I + j] - want);
        if (!(err <= allowed)) {
          assert.fail(`${what}: out[${m}, ${j}] is ${got[m * I + j]}, want ${want} (±${allowed})`);
        }
      }
    }
  }
  kept?.destroy();
  for (const t of [tx, tw, tg, tb, out]) t.destroy();
}

Deno.test(
  "generation's fused products (RMSNorm folded in, SwiGLU on the gate/up halves) match the twin",
  // Only the software adapters' kernel has them (generationFusions).
  { ...gpuTest, ignore: !gpu.software },
  async () => {
    // Odd row counts with partial blocks; gate/up halves (I = N/2) that are no multiple of a
    // block's columns; k from one step to past the paired-step threshold.
    const shapes: MatmulShape[] = [
      { M: 1, N: 8, K: 4 },
      { M: 7, N: 40, K: 20 },
      { M: 33, N: 344, K: 64 },
      { M: 130, N: 72, K: 68 },
      { M: 70, N: 24, K: PAIRED_K_MIN },
    ];
    for (const shape of shapes) {
      for (const textures of [true, false]) {
        await checkFused(shape, true, false, false, textures);
        await checkFused(shape, true, false, true, textures);
        await checkFused(shape, false, true, false, textures);
        await checkFused(shape, true, true, false, textures);
      }
    }
    // Every block that may run them (SwiGLU: an even number of column groups).
    for (const [rowGroups, colGroups] of BLOCKS) {
      const block = { rowGroups, colGroups };
      await checkFused({ M: 37, N: 56, K: 24 }, true, false, true, true, block);
      if (colGroups % 2 === 0) {
        await checkFused({ M: 37, N: 56, K: 24 }, true, true, false, true, block);
      }
    }
  },
);

Deno.test(
  "a scaled product is the unscaled one times the scale, bit for bit, on every path",
  gpuTest,
  async () => {
    // LoRA's u = s·(x·Aᵀ) (MatmulOptions.scale) multiplies each sum as it is stored: the same
    // f32 multiply a separate pass would make. Both kernels, both loads, vec4 and scalar stores,
    // a column block of a, the RMSNorm folded in, and a long product split along k (its sum of
    // partials scales). Each scaled product also matches the twin times s.
    const s = Math.fround(-2.5);
    const cases: { shape: MatmulShape; opts: Record<string, unknown>; what: string }[] = [];
    for (const { kernel, textures, name } of KERNELS) {
      for (const shape of [{ M: 7, N: 33, K: 97 }, { M: 37, N: 16, K: 72 }]) {
        cases.push({ shape, opts: { transB: true, kernel, textures }, what: name });
        cases.push({ shape, opts: { kernel, textures }, what: `${name} NN` });
      }
    }
    cases.push({
      shape: { M: 9, N: 16, K: 24 },
      opts: { aBlock: { stride: 36, first: 8 } },
      what: "a column block",
    });
    cases.push({ shape: { M: 20, N: 16, K: 1024 }, opts: { transB: true }, what: "split along k" });
    const norm = { weight: gpu.upload(random(64).map((v) => 1 + v / 2)), eps: 1e-5 };
    if (gpu.software) { // the folded norm is the software adapters' kernel's alone
      cases.push({
        shape: { M: 5, N: 16, K: 64 },
        opts: { transB: true, rmsnorm: norm },
        what: "norm",
      });
    }
    for (const { shape, opts, what } of cases) {
      const { M, N, K } = shape, aBlock = opts.aBlock as { stride: number } | undefined;
      const a = random(M * (aBlock?.stride ?? K)), b = random(K * N);
      const ta = gpu.upload(a), tb = gpu.upload(b);
      const plain = gpu.upload(padded(new Float32Array(M * N)));
      const scaled = gpu.upload(padded(new Float32Array(M * N)));
      matmul(gpu, ta, tb, plain, shape, opts);
      matmul(gpu, ta, tb, scaled, shape, { ...opts, scale: s });
      const [p, q] = (await gpu.readMany([plain, scaled])) as Float32Array[];
      const label = `${M}×${N}×${K} ${what}`;
      const got = unpad(q, M * N, label), want = unpad(p, M * N, label);
      for (let i = 0; i < M * N; i++) {
        assert.equal(got[i], Math.fround(s * want[i]), `${label}: element ${i}`);
      }
      if (!aBlock && !opts.rmsnorm) {
        const twin = twinMatmul(a, b, shape, false, opts.transB === true, null, null);
        twin.value.forEach((v, i) => twin.value[i] = v * s);
        twin.magnitude.forEach((v, i) => twin.magnitude[i] = v * Math.abs(s));
        assertClose(got, twin, K, label);
      }
      for (const t of [ta, tb, plain, scaled]) t.destroy();
    }
    norm.weight.destroy();
    const t = gpu.upload(random(16));
    assert.throws(
      () => matmul(gpu, t, t, t, { M: 4, N: 4, K: 1 }, { accumulate: true, scale: 2 }),
      /scale is for a plain product/,
    );
    t.destroy();
  },
);

Deno.test("matmul handles more than 65535 row workgroups", gpuTest, async () => {
  // Odd shapes use 8·8 = 64 rows per workgroup on llvmpipe (4·16 on other adapters), so
  // 65535·64 + 5 rows need more than 65535 workgroups: the dispatch folds rows into z.
  const M = 65535 * 64 + 5, K = 1, N = 1;
  const a = random(M * K), b = random(K * N);
  const ta = gpu.upload(a), tb = gpu.upload(b), out = gpu.zeros([M]);
  matmul(gpu, ta, tb, out, { M, N, K });
  const got = await gpu.read(out);
  for (const m of [0, 1, 65535 * 64 - 1, 65535 * 64, M - 1]) {
    assert.equal(got[m], Math.fround(a[m] * b[0]), `row ${m}`);
  }
  for (const t of [ta, tb, out]) t.destroy();
});

Deno.test("linear is x·Wᵀ + bias with W in [out, in] layout", gpuTest, async () => {
  const T = 33, inF = 7, outF = 97;
  const x = random(T * inF), w = random(outF * inF), bias = random(outF);
  const tx = gpu.upload(x, [T, inF]), tw = gpu.upload(w, [outF, inF]), tb = gpu.upload(bias);
  const y = gpu.zeros([T, outF]), yNoBias = gpu.zeros([T, outF]);
  linear(gpu, tx, tw, tb, y, T);
  linear(gpu, tx, tw, null, yNoBias, T);
  const [got, gotNoBias] = await gpu.readMany([y, yNoBias]) as Float32Array[];
  const shape = { M: T, N: outF, K: inF };
  assertClose(got, twinMatmul(x, w, shape, false, true, null, bias), inF, "linear");
  assertClose(gotNoBias, twinMatmul(x, w, shape, false, true, null, null), inF, "linear");
  for (const t of [tx, tw, tb, y, yNoBias]) t.destroy();
});

Deno.test("linearBackward gives dx, dW, db, overwriting or accumulating", gpuTest, async () => {
  for (const [T, inF, outF] of [[33, 7, 97], [97, 33, 1], [130, 75, 257]]) {
    const x = random(T * inF), w = random(outF * inF), dy = random(T * outF);
    const dx0 = random(T * inF), dw0 = random(outF * inF), db0 = random(outF);
    const tx = gpu.upload(x, [T, inF]), tw = gpu.upload(w, [outF, inF]);
    const tdy = gpu.upload(dy, [T, outF]);
    for (const accumulate of [false, true]) {
      const dx = gpu.upload(dx0), dw = gpu.upload(dw0), db = gpu.upload(db0);
      linearBackward(gpu, tx, tw, tdy, T, {
        dx,
        dxAccumulate: accumulate,
        dw,
        db,
        accumulateParams: accumulate,
      });
      const [gdx, gdw, gdb] = await gpu.readMany([dx, dw, db]) as Float32Array[];
      const what = `T=${T} in=${inF} out=${outF} accumulate=${accumulate}`;
      const prev = (p: Float32Array) => accumulate ? p : null;
      const wantDx = twinMatmul(dy, w, { M: T, N: inF, K: outF }, false, false, prev(dx0), null);
      const wantDw = twinMatmul(dy, x, { M: outF, N: inF, K: T }, true, false, prev(dw0), null);
      const ones = new Float32Array(T).fill(1);
      const wantDb = twinMatmul(ones, dy, { M: 1, N: outF, K: T }, false, false, prev(db0), null);
      assertClose(gdx, wantDx, outF, `dx ${what}`);
      assertClose(gdw, wantDw, T, `dW ${what}`);
      assertClose(gdb, wantDb, T, `db ${what}`);
      for (const t of [dx, dw, db]) t.destroy();
    }
    // Mixed flags, and omitted outputs are left alone.
    const dx = gpu.upload(dx0), dw = gpu.upload(dw0), db = gpu.upload(db0);
    linearBackward(gpu, tx, tw, tdy, T, { dx, dxAccumulate: true, dw, accumulateParams: false });
    const [gdx, gdw, gdb] = await gpu.readMany([dx, dw, db]) as Float32Array[];
    const what = `T=${T} mixed flags`;
    assertClose(
      gdx,
      twinMatmul(dy, w, { M: T, N: inF, K: outF }, false, false, dx0, null),
      outF,
      `dx ${what}`,
    );
    assertClose(
      gdw,
      twinMatmul(dy, x, { M: outF, N: inF, K: T }, true, false, null, null),
      T,
      `dW ${what}`,
    );
    assert.deepEqual(gdb, db0, `db ${what}: omitted but changed`);
    for (const t of [tx, tw, tdy, dx, dw, db]) t.destroy();
  }
});

Deno.test(
  "sumRows is deterministic and matches the twin",
  gpuTest,
  () =>
    eachInputPath(gpu, async (how) => {
      // N a multiple of 4 takes the vec4 kernel.
      for (const [M, N] of [[1, 1], [7, 33], [97, 7], [1000, 65], [33, 64], [5, 4]]) {
        const x = random(M * N), prev = random(N);
        const tx = gpu.upload(x), a = gpu.upload(prev), b = gpu.upload(prev), c = gpu.zeros([N]);
        sumRows(gpu, tx, a, M, N, false);
        sumRows(gpu, tx, b, M, N, true);
        sumRows(gpu, tx, c, M, N, false);
        const [ga, gb, gc] = await gpu.readMany([a, b, c]) as Float32Array[];
        const ones = new Float32Array(M).fill(1);
        const shape = { M: 1, N, K: M };
        assertClose(
          ga,
          twinMatmul(ones, x, shape, false, false, null, null),
          M,
          `sumRows ${M}×${N} ${how}`,
        );
        assertClose(
          gb,
          twinMatmul(ones, x, shape, false, false, prev, null),
          M,
          `sumRows += ${M}×${N} ${how}`,
        );
        assert.deepEqual(ga, gc, "two runs differ");
        for (const t of [tx, a, b, c]) t.destroy();
      }
    }),
);

Deno.test(
  "sumRows of a column block sums only its columns",
  gpuTest,
  () =>
    eachInputPath(gpu, async (how) => {
      // Columns [5, 5 + 7) of a 9 × 20 matrix (scalar kernel), and [4, 4 + 8) (vec4 kernel): the
      // bias gradient of one member of a fused product.
      for (const [first, N] of [[5, 7], [4, 8]]) {
        const M = 9, stride = 20;
        const x = random(M * stride), out = gpu.zeros([N]);
        sumRows(gpu, gpu.upload(x), out, M, N, false, { stride, first });
        const block = new Float32Array(M * N);
        for (let m = 0; m < M; m++) {
          block.set(x.subarray(m * stride + first, m * stride + first + N), m * N);
        }
        const ones = new Float32Array(M).fill(1);
        const want = twinMatmul(ones, block, { M: 1, N, K: M }, false, false, null, null);
        assertClose(await gpu.read(out), want, M, `sumRows block [${first}, +${N}) ${how}`);
      }
    }),
);

Deno.test(
  "split-k products (few outputs, long k) match the twin, ± accumulate and bias",
  gpuTest,
  () =>
    eachInputPath(gpu, async (how) => {
      // On software adapters a product with few workgroups, K ≥ 256 and 2¹⁸ multiply-adds or
      // more is split along k into parallel partial sums added up in order; on others these run
      // whole. Odd and vec4 shapes.
      const shapes: MatmulShape[] = [
        { M: 33, N: 20, K: 1001 },
        { M: 64, N: 64, K: 1664 },
        { M: 7, N: 5, K: 7501 },
      ];
      for (const shape of shapes) {
        const { M, N, K } = shape;
        for (const layout of LAYOUTS) {
          const a = random(M * K), b = random(K * N), prev = random(M * N), bias = random(N);
          const ta = gpu.upload(a), tb = gpu.upload(b), tbias = gpu.upload(bias);
          const outs = FLAG_CASES.map(() => gpu.upload(padded(prev)));
          FLAG_CASES.forEach((c, i) =>
            matmul(gpu, ta, tb, outs[i], shape, {
              transA: layout.transA,
              transB: layout.transB,
              accumulate: c.accumulate,
              bias: c.bias ? tbias : undefined,
            })
          );
          const results = await gpu.readMany(outs);
          FLAG_CASES.forEach((c, i) => {
            const want = twinCase(a, b, shape, layout, c, prev, bias);
            const what = `split-k ${layout.name} M=${M} N=${N} K=${K} ${JSON.stringify(c)} ${how}`;
            assertClose(unpad(results[i] as Float32Array, M * N, what), want, K, what);
          });
          for (const t of [ta, tb, tbias, ...outs]) t.destroy();
        }
      }
    }),
);

Deno.test(
  "a weight's kept texture copy is read until stale(), then copied again; past the budget, per call",
  gpuTest,
  async () => {
    // The blocked kernel reading textures, on any adapter: the path the copies serve. The
    // weight changes under a kept copy without stale(), so the product must still be the old
    // weight's: that it is shows the copy was not made again.
    const shape = { M: 7, N: 12, K: 20 }, { M, N, K } = shape;
    const opts = { transB: true, kernel: "blocked" as const, textures: true };
    const x = random(M * K), w0 = random(N * K), w1 = random(N * K);
    const tx = gpu.upload(x), tw = gpu.upload(w0), out = gpu.zeros([M, N]);
    const kept = new KeptTextures(gpu), none = new KeptTextures(gpu, 0);
    const product = async (keptB: KeptTextures, what: string, w: Float32Array) => {
      matmul(gpu, tx, tw, out, shape, { ...opts, keptB });
      const got = await gpu.read(out);
      assertClose(got, twinMatmul(x, w, shape, false, true, null, null), K, what);
    };
    await product(kept, "first use", w0);
    assert.notEqual(kept.view(tw), null);
    gpu.write(tw, w1);
    await product(kept, "changed, not stale: the kept copy", w0);
    kept.stale();
    await product(kept, "after stale()", w1);
    await product(kept, "kept again", w1);
    gpu.write(tw, w0);
    assert.equal(none.view(tw), null, "a zero budget keeps nothing");
    await product(none, "past the budget: copied per call", w0);
    kept.destroy();
    none.destroy();
    for (const t of [tx, tw, out]) t.destroy();
  },
);

Deno.test(
  "with the machine's memory deciding, copies stop where an eighth of it would no longer be available, and at a quarter",
  gpuTest,
  () => {
    // A small tensor's copy is one row of 1,024 texels: 16 KiB. The budget is read once, at an
    // instance's first copy, from the machine's memory as Deno reports it (stubbed here).
    const row = 16384, before = Deno.env.get(BUDGET_VARIABLE);
    const reported = Deno.systemMemoryInfo;
    const tensors = Array.from({ length: 24 }, () => gpu.upload(random(64)));
    const keptOf = (memory: { total: number; available: number }) => {
      (Deno as { systemMemoryInfo: () => unknown }).systemMemoryInfo = () => ({ ...memory });
      const kept = new KeptTextures(gpu);
      const views = tensors.map((t) => kept.view(t));
      kept.destroy();
      return views.findIndex((v) => v === null);
    };
    try {
      Deno.env.delete(BUDGET_VARIABLE);
      const total = 64 * row, others = keptTextureBytes();
      // An eighth of 64 rows is 8: with 11 available, 3 copies leave 8.
      assert.equal(keptOf({ total, available: 11 * row }), 3);
      assert.equal(keptOf({ total, available: 8 * row }), 0);
      // Plenty available: a quarter of the memory (16 rows) for all of the process's copies.
      assert.equal(keptOf({ total, available: 1e12 }), Math.floor((16 * row - others) / row));
      assert.equal(memoryBudget({ total: 8e9, available: 1e9 }), 0, "an eighth is not available");
    } finally {
      (Deno as { systemMemoryInfo: typeof reported }).systemMemoryInfo = reported;
      if (before !== undefined) Deno.env.set(BUDGET_VARIABLE, before);
      gpu.flush();
      for (const t of tensors) t.destroy();
    }
  },
);

Deno.test(
  "AHA_KEPT_TEXTURE_BYTES set after a first look bounds later copies; a refusal asks again after stale()",
  gpuTest,
  () => {
    // aha train checks the variable before any work and sets it from its plan afterwards.
    const before = Deno.env.get(BUDGET_VARIABLE);
    const w = gpu.upload(random(64));
    try {
      Deno.env.delete(BUDGET_VARIABLE);
      assert.equal(keptTextureBudget(), null);
      Deno.env.set(BUDGET_VARIABLE, "0");
      const kept = new KeptTextures(gpu);
      assert.equal(kept.view(w), null, "a budget of 0 bytes keeps nothing");
      Deno.env.set(BUDGET_VARIABLE, "1e9");
      assert.equal(kept.view(w), null, "a refusal holds until the values change");
      kept.stale();
      assert.notEqual(kept.view(w), null, "after stale(), a refused tensor asks again");
      kept.destroy();
      // A copy counts as its texture: 64 floats take a whole row of 1,024 texels (16 KiB), so a
      // budget of a byte short of two rows more than what is kept already holds one such copy.
      const w2 = gpu.upload(random(64));
      Deno.env.set(BUDGET_VARIABLE, String(keptTextureBytes() + 2 * 16384 - 1));
      const roomy = new KeptTextures(gpu);
      assert.notEqual(roomy.view(w), null);
      assert.equal(roomy.view(w2), null, "the row is spent");
      roomy.destroy();
      gpu.flush(); // the copies recorded read w: submitted before it is destroyed
      w2.destroy();
    } finally {
      if (before === undefined) Deno.env.delete(BUDGET_VARIABLE);
      else Deno.env.set(BUDGET_VARIABLE, before);
      gpu.flush();
      w.destroy();
    }
  },
);
