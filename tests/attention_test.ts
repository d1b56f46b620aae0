// gpu/kernels/attention.ts against a plain float64 TypeScript twin; the twin's gradients against finite
// differences. Tolerances: |gpu − twin| ≤ 2e-5 + 2e-4·|twin| for the forward (out, lse) and
// 1e-4 + 1e-3·|twin| for the gradients (f32 sums over up to 33 keys and 3 query heads);
// twin vs central differences (h = 1e-6, float64) ≤ 1e-6 + 1e-6·|analytic|.

import assert from "node:assert/strict";

import {
  attention,
  attentionBackward,
  type AttentionKernel,
  type AttentionShape,
  copyCacheToGroups,
  writeKvCache,
} from "../gpu/kernels/attention.ts";
import { assertClose, centralDifference, gpuTest, openGpu, randoms } from "./helpers.ts";

const gpu = await openGpu();
/** Seeded values in [−1, 1), f32-exact so that the GPU and the twin see the same inputs. */
const random = (n: number, seed: number) => Float64Array.from(randoms(n, seed));

// ---- the twin -------------------------------------------------------------------------------

interface Inputs {
  q: Float64Array;
  k: Float64Array;
  v: Float64Array;
  kvLens: number[];
  /** A packed batch: the lengths of the sequences laid end to end in each row. */
  sequences?: number[][];
}

/** Keys a query sees: [from, from + seen). */
interface Visible {
  from: number;
  seen: number;
}

// Calls f(b, i, h, kvh, qOffset, visible) for each query.
function eachQuery(
  s: AttentionShape,
  x: Inputs,
  f: (b: number, i: number, h: number, kvh: number, qo: number, keys: Visible) => void,
) {
  const group = s.nHeads / s.nKvHeads;
  for (let b = 0; b < s.B; b++) {
    // Each position's sequence start (0 for a row that is one sequence).
    const starts: number[] = [];
    for (const n of x.sequences?.[b] ?? [s.capacity]) {
      const start = starts.length;
      for (let t = 0; t < n; t++) starts.push(start);
    }
    for (let i = 0; i < s.Lq; i++) {
      for (let h = 0; h < s.nHeads; h++) {
        const position = x.kvLens[b] - s.Lq + i, from = position < 0 ? 0 : starts[position];
        const keys = { from, seen: Math.max(0, position + 1 - from) };
        f(b, i, h, Math.floor(h / group), ((b * s.Lq + i) * s.nHeads + h) * s.headDim, keys);
      }
    }
  }
}

const kvOffset = (s: AttentionShape, b: number, j: number, kvh: number) =>
  ((b * s.capacity + j) * s.nKvHeads + kvh) * s.headDim;

// Softmax probabilities of one query over its visible keys, and their log-sum-exp.
function probs(s: AttentionShape, x: Inputs, b: number, kvh: number, qo: number, keys: Visible) {
  const D = s.headDim, scale = 1 / Math.sqrt(D), seen = keys.seen;
  const scores = [];
  for (let j = 0; j < seen; j++) {
    let dot = 0;
    for (let d = 0; d < D; d++) dot += x.q[qo + d] * x.k[kvOffset(s, b, keys.from + j, kvh) + d];
    scores.push(dot * scale);
  }
  const m = Math.max(...scores);
  const lse = seen ? m + Math.log(scores.reduce((a, t) => a + Math.exp(t - m), 0)) : 0;
  return { p: scores.map((t) => Math.exp(t - lse)), lse };
}

function twinForward(s: AttentionShape, x: Inputs) {
  const D = s.headDim;
  const out = new Float64Array(s.B * s.Lq * s.nHeads * D);
  const lse = new Float64Array(s.B * s.nHeads * s.Lq);
  eachQuery(s, x, (b, i, h, kvh, qo, keys) => {
    const r = probs(s, x, b, kvh, qo, keys);
    lse[(b * s.nHeads + h) * s.Lq + i] = r.lse;
    for (let j = 0; j < keys.seen; j++) {
      const vo = kvOffset(s, b, keys.from + j, kvh);
      for (let d = 0; d < D; d++) out[qo + d] += r.p[j] * x.v[vo + d];
    }
  });
  return { out, lse };
}

function twinBackward(s: AttentionShape, x: Inputs, dOut: Float64Array) {
  const D = s.headDim, scale = 1 / Math.sqrt(D);
  const dq = new Float64Array(x.q.length);
  const dk = new Float64Array(x.k.length);
  const dv = new Float64Array(x.v.length);
  eachQuery(s, x, (b, _i, _h, kvh, qo, keys) => {
    const { p } = probs(s, x, b, kvh, qo, keys);
    const dp = p.map((_, j) => {
      let dot = 0;
      const vo = kvOffset(s, b, keys.from + j, kvh);
      for (let d = 0; d < D; d++) dot += dOut[qo + d] * x.v[vo + d];
      return dot;
    });
    const mean = p.reduce((a, pj, j) => a + pj * dp[j], 0);
    for (let j = 0; j < keys.seen; j++) {
      const ko = kvOffset(s, b, keys.from + j, kvh), ds = p[j] * (dp[j] - mean) * scale;
      for (let d = 0; d < D; d++) {
        dq[qo + d] += ds * x.k[ko + d];
        dk[ko + d] += ds * x.q[qo + d];
        dv[ko + d] += p[j] * dOut[qo + d];
      }
    }
  });
  return { dq, dk, dv };
}

// ---- helpers --------------------------------------------------------------------------------

// Random inputs; cache slots at or past kvLens[b] hold NaN, so reading one would show.
function makeInputs(s: AttentionShape, kvLens: number[], seed: number): Inputs {
  const kvSize = s.B * s.capacity * s.nKvHeads * s.headDim;
  const k = random(kvSize, seed + 1), v = random(kvSize, seed + 2);
  for (let b = 0; b < s.B; b++) {
    for (let j = kvLens[b]; j < s.capacity; j++) {
      for (let c = 0; c < s.nKvHeads * s.headDim; c++) {
        k[kvOffset(s, b, j, 0) + c] = NaN;
        v[kvOffset(s, b, j, 0) + c] = NaN;
      }
    }
  }
  return { q: random(s.B * s.Lq * s.nHeads * s.headDim, seed).map((t) => 2 * t), k, v, kvLens };
}

async function check(
  s: AttentionShape,
  kvLens: number[],
  seed: number,
  kernel: AttentionKernel = "streaming",
  textures?: boolean,
  sequences?: number[][],
) {
  const x = { ...makeInputs(s, kvLens, seed), sequences };
  // Each position's sequence as [start, end), for the kernels.
  const bounds = sequences && new Int32Array(s.B * s.capacity * 2);
  sequences?.forEach((lengths, b) => {
    let start = 0;
    for (const n of lengths) {
      for (let t = start; t < start + n; t++) {
        bounds!.set([start, start + n], (b * s.capacity + t) * 2);
      }
      start += n;
    }
    assert.equal(start, s.capacity, "sequences fill their rows");
  });
  const segments = bounds ? gpu.upload(bounds) : undefined;
  const dOut = random(x.q.length, seed + 3);
  const f32 = (a: Float64Array) => new Float32Array(a);
  const q = gpu.upload(f32(x.q)), k = gpu.upload(f32(x.k)), v = gpu.upload(f32(x.v));
  const lens = gpu.upload(new Int32Array(kvLens));
  const out = gpu.zeros([x.q.length]), lse = gpu.zeros([s.B * s.nHeads * s.Lq]);
  // Gradient outputs start as garbage: the backward must overwrite every element.
  const dq = gpu.upload(f32(random(x.q.length, 7)));
  const dk = gpu.upload(f32(random(x.k.length, 8)));
  const dv = gpu.upload(f32(random(x.v.length, 9)));
  const dO = gpu.upload(f32(dOut));
  attention(gpu, q, k, v, lens, out, lse, s, kernel, textures, segments);
  attentionBackward(gpu, q, k, v, lens, out, lse, dO, dq, dk, dv, s, textures, segments);
  const [gOut, gLse, gDq, gDk, gDv] = await gpu.readMany([out, lse, dq, dk, dv]) as Float32Array[];
  const want = twinForward(s, x), grads = twinBackward(s, x, dOut);
  assertClose(gOut, want.out, 2e-5, 2e-4, "out");
  assertClose(gLse, want.lse, 2e-5, 2e-4, "lse");
  assertClose(gDq, grads.dq, 1e-4, 1e-3, "dq");
  assertClose(gDk, grads.dk, 1e-4, 1e-3, "dk");
  assertClose(gDv, grads.dv, 1e-4, 1e-3, "dv");
  for (let b = 0; b < s.B; b++) {
    const from = kvOffset(s, b, kvLens[b], 0), to = kvOffset(s, b + 1, 0, 0);
    assert.ok(gDk.subarray(from, to).every((t) => t === 0), `dk of row ${b} past kvLens`);
    assert.ok(gDv.subarray(from, to).every((t) => t === 0), `dv of row ${b} past kvLens`);
  }
  for (const t of [q, k, v, lens, out, lse, dq, dk, dv, dO, segments]) t?.destroy();
}

const training = (B: number, L: number, nHeads: number, nKvHeads: number, headDim: number) => ({
  s: { B, Lq: L, capacity: L, nHeads, nKvHeads, headDim },
  kvLens: new Array(B).fill(L),
});

// ---- tests ----------------------------------------------------------------------------------

Deno.test("twin backward matches finite differences", () => {
  const s = { B: 2, Lq: 3, capacity: 6, nHeads: 4, nKvHeads: 2, headDim: 3 };
  const x = makeInputs(s, [2, 5], 11); // row 0: query 0 sees nothing
  const w = random(x.q.length, 12); // loss = Σ out·w
  const loss = () => twinForward(s, x).out.reduce((a, o, i) => a + o * w[i], 0);
  const grads = twinBackward(s, x, w);
  const cases: [string, Float64Array, Float64Array][] = [
    ["q", x.q, grads.dq],
    ["k", x.k, grads.dk],
    ["v", x.v, grads.dv],
  ];
  for (const [name, t, g] of cases) {
    for (let i = 0; i < t.length; i++) {
      if (Number.isNaN(t[i])) continue;
      const numeric = centralDifference(t, i, 1e-6, loss);
      assert.ok(
        Math.abs(numeric - g[i]) <= 1e-6 + 1e-6 * Math.abs(g[i]),
        `d${name}[${i}]: analytic ${g[i]} vs numeric ${numeric}`,
      );
    }
  }
});

// On software adapters the streaming kernels read keys, values (forward, dq), queries and the
// output gradient (dk, dv) from texture copies when they are read often enough: each shape runs
// both ways. [2, 40, 4, 2, 64] spans more than one row of its texture copies.
for (const textures of [true, false]) {
  Deno.test(
    `attention training shapes match the twin (${textures ? "textures" : "storage"})`,
    gpuTest,
    async () => {
      for (
        const [c, seed] of [
          [training(1, 1, 1, 1, 8), 1],
          [training(1, 1, 2, 1, 4), 2],
          [training(2, 7, 4, 2, 16), 3],
          [training(3, 33, 6, 2, 8), 4],
          [training(2, 5, 3, 3, 12), 5], // multi-head attention
          [training(1, 9, 2, 2, 64), 6], // Qwen2.5-0.5B head size
          [training(2, 40, 4, 2, 64), 7],
        ] as const
      ) await check(c.s, c.kvLens, seed, "streaming", textures);
    },
  );
}

// A packed batch: rows holding several sequences end to end (odd lengths, one of a single
// token, and a row that is one sequence); a query sees only its own sequence's keys.
Deno.test("attention over packed rows matches the twin, each kernel", gpuTest, async () => {
  const cases: [AttentionKernel, boolean][] = [
    ["streaming", true],
    ["streaming", false],
    ["flash", false],
  ];
  for (const [kernel, textures] of cases) {
    const { s, kvLens } = training(3, 13, 4, 2, 16);
    await check(s, kvLens, 51, kernel, textures, [[5, 1, 7], [13], [2, 3, 4, 4]]);
    const wide = training(2, 70, 2, 1, 8); // more queries than one flash workgroup
    await check(wide.s, wide.kvLens, 52, kernel, textures, [[9, 40, 21], [1, 66, 3]]);
  }
});

Deno.test("attention decode (Lq = 1) with per-row cache lengths", gpuTest, async () => {
  const s = { B: 3, Lq: 1, capacity: 20, nHeads: 4, nKvHeads: 2, headDim: 16 };
  await check(s, [1, 13, 20], 21);
  await check(s, [1, 13, 20], 22, "streaming", true); // the cache from texture copies
});

Deno.test("attention prefill after some cache (Lq = 5)", gpuTest, async () => {
  const s = { B: 4, Lq: 5, capacity: 16, nHeads: 6, nKvHeads: 3, headDim: 10 };
  // Row 0: a prompt filling part of the cache; rows 1, 2: earlier tokens cached; row 3: only 3
  // valid keys for 5 queries, so queries 0 and 1 see nothing (out 0, lse 0, no gradient).
  await check(s, [5, 9, 16, 3], 31);
  await check({ ...s, headDim: 12 }, [5, 9, 16, 3], 32, "streaming", true); // from textures
});

Deno.test("writeKvCache puts new rows at kvLens − Lq + i", gpuTest, async () => {
  const s = { B: 3, Lq: 2, capacity: 7, nHeads: 4, nKvHeads: 2, headDim: 6 };
  const row = s.nKvHeads * s.headDim;
  const kvLens = [2, 7, 4];
  const kNew = new Float32Array(random(s.B * s.Lq * row, 41));
  const before = new Float32Array(random(s.B * s.capacity * row, 42));
  const cache = gpu.upload(before.slice()), k = gpu.upload(kNew);
  const lens = gpu.upload(new Int32Array(kvLens));
  writeKvCache(gpu, k, cache, lens, s);
  const got = await gpu.read(cache);
  const want = before.slice();
  for (let b = 0; b < s.B; b++) {
    for (let i = 0; i < s.Lq; i++) {
      const pos = kvLens[b] - s.Lq + i;
      want.set(
        kNew.subarray((b * s.Lq + i) * row, (b * s.Lq + i + 1) * row),
        (b * s.capacity + pos) * row,
      );
    }
  }
  assert.deepEqual(got, want);
  for (const t of [cache, k, lens]) t.destroy();
});

Deno.test(
  "flash attention forward matches the twin (training, decode, prefill)",
  gpuTest,
  async () => {
    // Query blocks of 64 and key blocks of 64 (D 8, 16) or 32 (D 64): odd lengths cross both.
    for (
      const [c, seed] of [
        [training(1, 1, 1, 1, 8), 51],
        [training(2, 7, 4, 2, 16), 52],
        [training(1, 97, 2, 1, 8), 53],
        [training(1, 70, 2, 2, 64), 54],
      ] as const
    ) await check(c.s, c.kvLens, seed, "flash");
    await check(
      { B: 3, Lq: 1, capacity: 20, nHeads: 4, nKvHeads: 2, headDim: 16 },
      [1, 13, 20],
      55,
      "flash",
    );
    await check(
      { B: 4, Lq: 5, capacity: 16, nHeads: 6, nKvHeads: 3, headDim: 10 },
      [5, 9, 16, 3],
      56,
      "flash",
    );
  },
);

Deno.test(
  "copyCacheToGroups copies each prompt's first positions to its group's rows, by words and by vec4s",
  gpuTest,
  async () => {
    // Positions of 5 words take the one-word kernel; of 8 words and of 2 (a bf16 cache of four
    // values a position) the vec4 one. Prompts 0..2 go to the groups of rows 1..3 (G = 2): their
    // first 3 of 6 positions, and at most the rest of a vec4 past them; row 0, the tail and the
    // later positions stay untouched.
    const P = 3, G = 2, first = 1, capacity = 6, positions = 3;
    for (const positionWords of [5, 8, 2]) {
      const rowWords = capacity * positionWords;
      const src = randoms(P * rowWords, positionWords);
      const rows = (first + P + 1) * G;
      const dst = gpu.upload(new Float32Array(rows * rowWords).fill(-1), [
        rows,
        capacity,
        positionWords,
      ]);
      const srcTensor = gpu.upload(src, [P, capacity, positionWords]);
      copyCacheToGroups(gpu, srcTensor, dst, G, first, P, positions);
      const got = await gpu.read(dst);
      const copied = positions * positionWords;
      const untouchedFrom = Math.ceil(copied / 4) * 4;
      for (let row = 0; row < rows; row++) {
        const p = Math.floor(row / G) - first;
        const at = row * rowWords;
        if (p >= 0 && p < P) {
          const want = src.subarray(p * rowWords, p * rowWords + copied);
          assert.deepEqual(got.subarray(at, at + copied), want, `row ${row}, ${positionWords}`);
        }
        const from = p >= 0 && p < P ? untouchedFrom : 0;
        assert.ok(got.subarray(at + from, at + rowWords).every((x) => x === -1), `row ${row}`);
      }
    }
  },
);
