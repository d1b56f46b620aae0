// gpu/rope.ts against a TypeScript twin of Hugging Face Qwen2's rotary embedding at positions
// up to 4095, plus two properties: the inverse undoes the rotation, and it is the transpose
// (⟨rope(a), b⟩ = ⟨a, rope⁻¹(b)⟩), which makes it the backward.
// The twin takes HF's f32 steps (inv_freq and angle = f32(pos·inv_freq)) and does the rest in
// float64. Tolerance 2e-6 absolute on values in [−1, 1] (measured ≤ 2e-7, the GPU's sin/cos).
// Against angles computed exactly in float64, f32 angles differ by up to pos·2^-24 radians
// (~1e-4 at position 4000; HF has the same error), so the twin must round them as HF does.

import assert from "node:assert/strict";
import { Gpu } from "../gpu/device.ts";
import { rope } from "../gpu/rope.ts";

const gpu = await Gpu.open();
const gpuTest = { sanitizeResources: false, sanitizeOps: false };
const THETA = 1e6;
const SLACK = 5;
const SENTINEL = 42;

function randoms(n: number, seed: number): Float32Array {
  let s = seed >>> 0;
  return Float32Array.from({ length: n }, () => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return (s / 2 ** 32) * 2 - 1;
  });
}

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

/** Run rope on a copy of x padded with sentinels; return the GPU result (with the padding). */
async function ropeGpu(
  x: Float32Array,
  pos: Int32Array,
  heads: number,
  D: number,
  inverse: boolean,
) {
  const padded = new Float32Array(x.length + SLACK).fill(SENTINEL);
  padded.set(x);
  const xGpu = gpu.upload(padded);
  rope(gpu, xGpu, gpu.upload(pos), pos.length, heads, D, THETA, inverse);
  return await gpu.read(xGpu);
}

function assertClose(got: Float32Array, want: ArrayLike<number>, what: string) {
  for (let i = 0; i < got.length; i++) {
    const expected = i < want.length ? want[i] : SENTINEL;
    assert.ok(Math.abs(got[i] - expected) <= 2e-6, `${what}[${i}] = ${got[i]}, want ${expected}`);
  }
}

const SHAPES = [1, 7, 33, 97].flatMap((T) =>
  [[1, 64], [3, 14], [2, 128], [5, 2]].map(([heads, D]) => [T, heads, D])
);

Deno.test("rope matches the HF twin, forward and inverse", gpuTest, async () => {
  for (const [T, heads, D] of SHAPES) {
    const x = randoms(T * heads * D, T * heads + D), pos = positionsFor(T);
    for (const inverse of [false, true]) {
      const got = await ropeGpu(x, pos, heads, D, inverse);
      assertClose(got, ropeTwin(x, pos, heads, D, inverse), `T=${T} heads=${heads} D=${D}`);
    }
  }
});

Deno.test("rope inverse undoes rope and is its transpose", gpuTest, async () => {
  for (const [T, heads, D] of SHAPES) {
    const n = T * heads * D, pos = positionsFor(T);
    const a = randoms(n, 1), b = randoms(n, 2);
    const rotated = (await ropeGpu(a, pos, heads, D, false)).subarray(0, n);
    assertClose(await ropeGpu(rotated, pos, heads, D, true), a, `round trip T=${T} D=${D}`);
    const dot = (u: Float32Array, v: Float32Array) => u.reduce((s, ui, i) => s + ui * v[i], 0);
    const back = (await ropeGpu(b, pos, heads, D, true)).subarray(0, n);
    const gap = Math.abs(dot(rotated, b) - dot(a, back));
    assert.ok(gap <= 1e-7 * n, `⟨rope(a), b⟩ − ⟨a, rope⁻¹(b)⟩ = ${gap} at T=${T} D=${D}`);
  }
});
