// gpu/kernels/rope.ts against a TypeScript twin of Hugging Face Qwen2's rotary embedding at positions
// up to 4095, plus two properties: the inverse undoes the rotation, and it is the transpose
// (⟨rope(a), b⟩ = ⟨a, rope⁻¹(b)⟩), which makes it the backward.
// The twin takes HF's f32 steps (inv_freq and angle = f32(pos·inv_freq)) and does the rest in
// float64. Tolerance 2e-6 absolute on values in [−1, 1] (measured ≤ 2e-7, the GPU's sin/cos).
// Against angles computed exactly in float64, f32 angles differ by up to pos·2^-24 radians
// (~1e-4 at position 4000; HF has the same error), so the twin must round them as HF does.

import assert from "node:assert/strict";

import { rope, ropeQk } from "../gpu/kernels/rope.ts";
import { writeKvCache } from "../gpu/kernels/attention.ts";
import { assertClose, gpuTest, openGpu, padded, randoms, unpad } from "./helpers.ts";

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
  "ropeQk equals rope of q and k, then writeKvCache of k and v, bit for bit",
  gpuTest,
  async () => {
    // The fused kernel does the same f32 operations: results must be identical, in training
    // (no cache, forward and inverse) and in generation (caches with per-row lengths). Heads of
    // 10 take its one-pair kernel, heads of 16 its four-pair (vec4) kernel.
    const B = 3, Lq = 5, T = B * Lq, nH = 6, nKv = 2, capacity = 9;
    const pos = gpu.upload(positionsFor(T)), kvLens = gpu.upload(Int32Array.from([5, 9, 7]));
    for (
      const [D, inverse, withCache] of [10, 16].flatMap((D) =>
        [[false, false], [true, false], [false, true]].map(([i, c]) => [D, i, c] as const)
      )
    ) {
      const shape = { B, Lq, capacity, nHeads: nH, nKvHeads: nKv, headDim: D };
      const q = randoms(T * nH * D, 1), k = randoms(T * nKv * D, 2), v = randoms(T * nKv * D, 3);
      const cacheSize = B * capacity * nKv * D;
      const sep = {
        q: gpu.upload(q),
        k: gpu.upload(k),
        kc: gpu.upload(padded(new Float32Array(cacheSize))),
        vc: gpu.upload(padded(new Float32Array(cacheSize))),
      };
      const fused = {
        q: gpu.upload(q),
        k: gpu.upload(k),
        kc: gpu.upload(padded(new Float32Array(cacheSize))),
        vc: gpu.upload(padded(new Float32Array(cacheSize))),
      };
      const tv = gpu.upload(v);
      rope(gpu, sep.q, pos, T, nH, D, THETA, inverse);
      rope(gpu, sep.k, pos, T, nKv, D, THETA, inverse);
      if (withCache) {
        writeKvCache(gpu, sep.k, sep.kc, kvLens, shape);
        writeKvCache(gpu, tv, sep.vc, kvLens, shape);
      }
      const cache = withCache ? { v: tv, kvLens, k: fused.kc, vCache: fused.vc, shape } : undefined;
      ropeQk(gpu, fused.q, fused.k, pos, T, nH, nKv, D, THETA, inverse, cache);
      const got = await gpu.readMany([
        sep.q,
        sep.k,
        sep.kc,
        sep.vc,
        fused.q,
        fused.k,
        fused.kc,
        fused.vc,
      ]);
      for (let i = 0; i < 4; i++) {
        assert.deepEqual(
          got[i + 4],
          got[i],
          `tensor ${i}, D ${D}, inverse ${inverse}, cache ${withCache}`,
        );
      }
      if (withCache) assert.ok(got[6].some((x) => x !== 0), "the cache was written");
    }
  },
);
