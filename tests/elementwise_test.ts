// gpu/kernels/elementwise.ts against plain TypeScript. Each result is one correctly rounded f32
// operation, so the GPU must match Math.fround of the exact result bit for bit (tolerance 0).
// Tensors are allocated SLACK values longer than n: the tail must stay untouched.

import assert from "node:assert/strict";

import { add } from "../gpu/kernels/elementwise.ts";
import { gpuTest, openGpu, padded, randoms, sentinels, unpad } from "./helpers.ts";

const gpu = await openGpu();
const SIZES = [1, 7, 33, 97, 70001];

Deno.test("add: out = a + b", gpuTest, async () => {
  for (const n of SIZES) {
    const a = padded(randoms(n, 1)), b = padded(randoms(n, 2));
    const out = gpu.upload(sentinels(n));
    add(gpu, gpu.upload(a), gpu.upload(b), out, n);
    const got = unpad(await gpu.read(out), n, `add n=${n}`);
    for (let i = 0; i < n; i++) {
      assert.equal(got[i], Math.fround(a[i] + b[i]), `add: value ${i} of ${n}`);
    }
  }
});
