// gpu/kernels/rope.ts against a TypeScript twin of Hugging Face Qwen2's rotary embedding at positions
// up to 4095, plus two properties: the inverse undoes the rotation, and it is the transpose
// (⟨rope(a), b⟩ = ⟨a, rope⁻¹(b)⟩), which makes it the backward.
// The twin takes HF's f32 steps (inv_freq and angle = f32(pos·inv_freq)) and does the rest in
// float64. Tolerance 2e-6 absolute on values in [−1, 1] (measured ≤ 2e-7, the GPU's sin/cos).
// Against angles computed exactly in float64, f32 angles differ by up to pos·2^-24 radians
// (~1e-4 at position 4000; HF has the same error), so the twin must round them as HF does.

import assert from "node:assert/strict";

import { rope, ropeQkv } from "../gpu/kernels/rope.ts";
import { writeKvCache } from "../gpu/kernels/attention.ts";
import { assertClose, eachInputPath, gpuTest, openGpu, padded, randoms, unpad } from "./helpers.ts";

const gpu = await openGpu();
const THETA = 1e6;
const TOLERANCE = 2e-6; // absolute, on values in [−1, 1]

/** T positions in [0, 4096): 0 first, 4095 last, random between. */
function positionsFor(T: number): Int32Array {
  const p = Int32Array.from(randoms(T, T), (v) => Math.floor((v + 1) * 2048));
  p[0] = 0;
  if (T > 1) p[T - 1] = 4095;
  return p;
}

function ropeTwin(x: Float32Array, pos: Int32Array, heads: number, D: number, inverse: boolean) {
  const f = Math.fround, half = D / 2;
  const y = Float64Array.from(x);
  for (let t = 0; t < pos.length; t++) {
    for (let i = 0; i < half; i++) {
      const invFreq = f(1 / f(Math.pow(THETA, f((2 * i) / D))));
      const angle = f(pos[t] * invFreq);
      const c = Math.cos(angle), s = inverse ? -Math.sin(angle) : Math.sin(angle);
      for (let h = 0; h < heads; h++) {
        const at = (t * heads + h) * D + i;
        y[at] = x[at] * c - x[at + half] * s;
        y[at + half] = x[at + half] * c + x[at] * s;
      }
    }
  }
  return y;
}

/** Run rope on a copy of x padded with sentinels; the GPU result, its padding found intact. */
async function ropeGpu(
  x: Float32Array,
  pos: Int32Array,
  heads: number,
  D: number,
  inverse: boolean,
) {
  const xGpu = gpu.upload(padded(x));
  rope(gpu, xGpu, gpu.upload(pos), pos.length, heads, D, THETA, inverse);
  return unpad(await gpu.read(xGpu), x.length, `rope T=${pos.length} D=${D}`);
}

const SHAPES = [1, 7, 33, 97].flatMap((T) =>
  [[1, 64], [3, 14], [2, 128], [5, 2]].map(([heads, D]) => [T, heads, D])
);

Deno.test("rope matches the HF twin, forward and inverse", gpuTest, async () => {
  for (const [T, heads, D] of SHAPES) {
    const x = randoms(T * heads * D, T * heads + D), pos = positionsFor(T);
    for (const inverse of [false, true]) {
      const got = await ropeGpu(x, pos, heads, D, inverse);
      const want = ropeTwin(x, pos, heads, D, inverse);
      assertClose(got, want, TOLERANCE, 0, `T=${T} heads=${heads} D=${D} inverse=${inverse}`);
    }
  }
});

Deno.test("rope inverse undoes rope and is its transpose", gpuTest, async () => {
  for (const [T, heads, D] of SHAPES) {
    const n = T * heads * D, pos = positionsFor(T);
    const a = randoms(n, 1), b = randoms(n, 2);
    const rotated = await ropeGpu(a, pos, heads, D, false);
    const aBack = await ropeGpu(rotated, pos, heads, D, true);
    assertClose(aBack, a, TOLERANCE, 0, `round trip T=${T} D=${D}`);
    const dot = (u: Float32Array, v: Float32Array) => u.reduce((s, ui, i) => s + ui * v[i], 0);
    const bBack = await ropeGpu(b, pos, heads, D, true);
    const gap = Math.abs(dot(rotated, b) - dot(a, bBack));
    assert.ok(gap <= 1e-7 * n, `⟨rope(a), b⟩ − ⟨a, rope⁻¹(b)⟩ = ${gap} at T=${T} D=${D}`);
  }
});

Deno.test(
  "ropeQkv equals rope of q and k, a copy of v and writeKvCache, bit for bit, in each layout",
  gpuTest,
  () =>
    eachInputPath(gpu, async (how) => {
      // The fused kernel does the same f32 operations: results must be identical. From the fused
      // product's rows to q, k, v (training forward) or to q and the caches (generation, per-row
      // lengths); from dq, dk, dv back to the rows (inverse, the backward). Heads of 10 take its
      // one-pair kernel, heads of 16 its four-pair (vec4) kernel.
      const B = 3, Lq = 5, T = B * Lq, nH = 6, nKv = 2, capacity = 9;
      const positions = positionsFor(T), pos = gpu.upload(positions);
      const kvLens = gpu.upload(Int32Array.from([5, 9, 7]));
      for (const D of [10, 16]) {
        const shape = { B, Lq, capacity, nHeads: nH, nKvHeads: nKv, headDim: D };
        const qDim = nH * D, kvDim = nKv * D, width = qDim + 2 * kvDim;
        const q = randoms(T * qDim, 1), k = randoms(T * kvDim, 2), v = randoms(T * kvDim, 3);
        // The same values as the fused rows: token t's q, then its k, then its v.
        const rows = new Float32Array(T * width);
        for (let t = 0; t < T; t++) {
          rows.set(q.subarray(t * qDim, (t + 1) * qDim), t * width);
          rows.set(k.subarray(t * kvDim, (t + 1) * kvDim), t * width + qDim);
          rows.set(v.subarray(t * kvDim, (t + 1) * kvDim), t * width + qDim + kvDim);
        }
        for (const inverse of [false, true]) {
          // The unfused way: rope in place on q and k (v as it is).
          const sep = { q: gpu.upload(q), k: gpu.upload(k) };
          rope(gpu, sep.q, pos, T, nH, D, THETA, inverse);
          rope(gpu, sep.k, pos, T, nKv, D, THETA, inverse);
          const [wantQ, wantK] = await gpu.readMany([sep.q, sep.k]) as Float32Array[];
          const wantRows = new Float32Array(T * width);
          for (let t = 0; t < T; t++) {
            wantRows.set(wantQ.subarray(t * qDim, (t + 1) * qDim), t * width);
            wantRows.set(wantK.subarray(t * kvDim, (t + 1) * kvDim), t * width + qDim);
            wantRows.set(v.subarray(t * kvDim, (t + 1) * kvDim), t * width + qDim + kvDim);
          }
          const what = `D ${D}, inverse ${inverse}, ${how}`;
          // Rows → three tensors.
          const out = {
            q: gpu.upload(padded(new Float32Array(T * qDim))),
            k: gpu.upload(padded(new Float32Array(T * kvDim))),
            v: gpu.upload(padded(new Float32Array(T * kvDim))),
          };
          ropeQkv(gpu, { qkv: gpu.upload(rows) }, out, pos, T, nH, nKv, D, THETA, inverse);
          const [gq, gk, gv] = await gpu.readMany([out.q, out.k, out.v]) as Float32Array[];
          assert.deepEqual(unpad(gq, T * qDim, what), wantQ, `q, rows → tensors, ${what}`);
          assert.deepEqual(unpad(gk, T * kvDim, what), wantK, `k, rows → tensors, ${what}`);
          assert.deepEqual(unpad(gv, T * kvDim, what), v, `v, rows → tensors, ${what}`);
          // Three tensors → rows.
          const back = gpu.upload(padded(new Float32Array(T * width)));
          const from = { q: gpu.upload(q), k: gpu.upload(k), v: gpu.upload(v) };
          ropeQkv(gpu, from, { qkv: back }, pos, T, nH, nKv, D, THETA, inverse);
          const gotRows = unpad(await gpu.read(back), T * width, what);
          assert.deepEqual(gotRows, wantRows, `tensors → rows, ${what}`);
        }
        // Rows → q and the caches, against rope, then writeKvCache of the rotated k and of v.
        const sep = { k: gpu.upload(k), v: gpu.upload(v) };
        const cacheSize = B * capacity * kvDim;
        const want = {
          k: gpu.upload(padded(new Float32Array(cacheSize))),
          v: gpu.upload(padded(new Float32Array(cacheSize))),
        };
        rope(gpu, sep.k, pos, T, nKv, D, THETA);
        writeKvCache(gpu, sep.k, want.k, kvLens, shape);
        writeKvCache(gpu, sep.v, want.v, kvLens, shape);
        const sepQ = gpu.upload(q);
        rope(gpu, sepQ, pos, T, nH, D, THETA);
        const to = {
          q: gpu.upload(new Float32Array(T * qDim)),
          kCache: gpu.upload(padded(new Float32Array(cacheSize))),
          vCache: gpu.upload(padded(new Float32Array(cacheSize))),
          kvLens,
          shape,
        };
        ropeQkv(gpu, { qkv: gpu.upload(rows) }, to, pos, T, nH, nKv, D, THETA);
        const got = await gpu.readMany([want.k, want.v, to.kCache, to.vCache, sepQ, to.q]);
        assert.deepEqual(got[5], got[4], `q, rows → caches, D ${D}, ${how}`);
        assert.deepEqual(got[2], got[0], `k cache, D ${D}, ${how}`);
        assert.deepEqual(got[3], got[1], `v cache, D ${D}, ${how}`);
        assert.ok(got[2].some((x) => x !== 0), "the cache was written");
      }
    }),
);
