// gpu/elementwise.ts against plain TypeScript. Each result is one correctly rounded f32
// operation, so the GPU must match Math.fround of the exact result bit for bit (tolerance 0).
// Tensors are allocated 5 values longer than n: the tail must stay untouched.

import assert from "node:assert/strict";
import { Gpu } from "../gpu/device.ts";
import { add } from "../gpu/elementwise.ts";

const gpu = await Gpu.open();
const gpuTest = { sanitizeResources: false, sanitizeOps: false };
const SIZES = [1, 7, 33, 97, 70001];
const SLACK = 5;
const SENTINEL = 42;

function randoms(n: number, seed: number): Float32Array {
  let s = seed >>> 0;
  return Float32Array.from({ length: n }, () => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return (s / 2 ** 32) * 2 - 1;
  });
}

/** n random values followed by SLACK sentinels. */
function padded(n: number, seed: number): Float32Array {
  const v = new Float32Array(n + SLACK).fill(SENTINEL);
  v.set(randoms(n, seed));
  return v;
}

function assertMatches(got: Float32Array, want: (i: number) => number, n: number, what: string) {
  for (let i = 0; i < n + SLACK; i++) {
    const expected = i < n ? Math.fround(want(i)) : SENTINEL;
    assert.equal(got[i], expected, `${what}: value ${i} of ${n}`);
  }
}

Deno.test("add: out = a + b", gpuTest, async () => {
  for (const n of SIZES) {
    const a = padded(n, 1), b = padded(n, 2);
    const out = gpu.upload(new Float32Array(n + SLACK).fill(SENTINEL));
    add(gpu, gpu.upload(a), gpu.upload(b), out, n);
    assertMatches(await gpu.read(out), (i) => a[i] + b[i], n, "add");
  }
});
