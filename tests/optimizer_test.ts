// gradNorm and adamw against float64 TypeScript twins: the norm over tensors of odd sizes (and
// bitwise-equal on a rerun, and whether the tensors share buffers or not), and several AdamW
// steps with and without gradient clipping.

import assert from "node:assert/strict";
import { Rng } from "../core/rng.ts";
import { adamw, type AdamwHyper } from "../gpu/kernels/adamw.ts";

import { gradNorm } from "../gpu/kernels/gradnorm.ts";
import { Arenas, packArenas } from "../gpu/arena.ts";
import { gpuTest, openGpu, randoms } from "./helpers.ts";

const gpu = await openGpu();

function twinNorm(arrays: Float32Array[]): number {
  let sum = 0;
  for (const a of arrays) for (const x of a) sum += x * x;
  return Math.sqrt(sum);
}

Deno.test("gradNorm matches the twin to 1e-5 and is bitwise repeatable", gpuTest, async () => {
  const rng = new Rng(7);
  // Sizes that are multiples of 4 are read as vec4s, the others one value at a time.
  const sizes = [1, 7, 33, 97, 4095, 4097, 100_003, (1 << 20) + 3, 64, 3072, 100_004];
  const arrays = sizes.map((n, i) => randoms(n, rng, 10 ** (i % 4 - 2)));
  const grads = arrays.map((a) => gpu.upload(a));
  const norm = gpu.zeros([1]);
  gradNorm(gpu, grads, norm);
  const first = await gpu.read(norm);
  gradNorm(gpu, grads, norm);
  const second = await gpu.read(norm);
  const want = twinNorm(arrays);
  assert.ok(Math.abs(first[0] - want) <= 1e-5 * want, `${first[0]} vs ${want}`);
  assert.deepEqual(new Uint32Array(second.buffer), new Uint32Array(first.buffer));
  gradNorm(gpu, grads.slice(0, 3), norm); // the small ones alone: one block each
  assert.ok(Math.abs((await gpu.read(norm))[0] - twinNorm(arrays.slice(0, 3))) <= 1e-5 * want);
  [...grads, norm].forEach((t) => t.destroy());
});

Deno.test(
  "gradNorm over tensors packed in arenas equals it over separate buffers, bit for bit",
  gpuTest,
  async () => {
    // The same values as separate buffers and as views of arenas of 64 KiB (several tensors to a
    // buffer, one dispatch each): the blocks are the tensors', so the block sums (the partials)
    // and the norm agree to the bit; with the tensors listed in another order, the norm to 1e-6.
    const rng = new Rng(9);
    const sizes = [7, 10_000, 33, 40_960, 1, 2052, 97, 100, 30_001, 5000];
    const arrays = sizes.map((n, i) => randoms(n, rng, 10 ** (i % 3 - 1)));
    const separate = arrays.map((a) => gpu.upload(a));
    const arenas = new Arenas(gpu, packArenas(sizes.map((n) => [n]), 65536), "test");
    assert.ok(arenas.buffers.length > 1 && arenas.buffers.length < sizes.length);
    const packed = sizes.map((n, i) => arenas.view(i, [n]));
    packed.forEach((t, i) => gpu.write(t, arrays[i]));
    const blocks = sizes.reduce((a, n) => a + Math.ceil(n / 1024), 0);
    const runs: { norm: Float32Array; partials: Float32Array }[] = [];
    for (const grads of [separate, packed, [...packed].reverse()]) {
      const norm = gpu.zeros([1]);
      gradNorm(gpu, grads, norm);
      const [n, partials] = await gpu.readMany([norm, gpu.scratch("gradnorm partials", blocks)]);
      runs.push({ norm: n as Float32Array, partials: (partials as Float32Array).slice(0, blocks) });
      norm.destroy();
    }
    const bits = (a: Float32Array) => [...new Uint32Array(a.buffer, a.byteOffset, a.length)];
    assert.deepEqual(bits(runs[1].partials), bits(runs[0].partials));
    assert.deepEqual(bits(runs[1].norm), bits(runs[0].norm));
    const [want] = runs[0].norm;
    assert.ok(Math.abs(runs[2].norm[0] - want) <= 1e-6 * want);
    assert.ok(Math.abs(want - twinNorm(arrays)) <= 1e-5 * want);
    separate.forEach((t) => t.destroy());
    arenas.destroy();
  },
);

/** Float64 AdamW, as torch.optim.AdamW, with clip_grad_norm_'s scaling applied to g. */
function twinAdamw(
  p: Float64Array,
  g: Float32Array,
  m: Float64Array,
  v: Float64Array,
  hp: AdamwHyper,
): void {
  const norm = twinNorm([g]);
  const clip = hp.maxGradNorm > 0 ? Math.min(1, hp.maxGradNorm / (norm + 1e-6)) : 1;
  const bc1 = 1 - hp.beta1 ** hp.step, bc2 = 1 - hp.beta2 ** hp.step;
  for (let i = 0; i < p.length; i++) {
    const gi = g[i] * clip;
    p[i] *= 1 - hp.lr * hp.weightDecay;
    m[i] = hp.beta1 * m[i] + (1 - hp.beta1) * gi;
    v[i] = hp.beta2 * v[i] + (1 - hp.beta2) * gi * gi;
    p[i] -= (hp.lr / bc1) * m[i] / (Math.sqrt(v[i]) / Math.sqrt(bc2) + hp.eps);
  }
}

Deno.test("adamw matches the float64 twin over five steps, clipped or not", gpuTest, async () => {
  // f32 tolerances: param to 2e-6 absolute (|p| ≤ 1, lr = 1e-2, five steps), m and v to 1e-6
  // relative to their largest magnitude. Gradients have norm ~18: maxGradNorm 1 clips them,
  // 1000 does not, 0 turns clipping off even though `norm` holds a huge value. 1001 values take
  // the scalar kernel, 1000 the vec4 one.
  for (const [n, maxGradNorm] of [1001, 1000].flatMap((n) => [0, 1, 1000].map((c) => [n, c]))) {
    const rng = new Rng(11 + maxGradNorm);
    const p0 = randoms(n, rng);
    const param = gpu.upload(p0), grad = gpu.zeros([n]), m = gpu.zeros([n]), v = gpu.zeros([n]);
    const norm = gpu.zeros([1]);
    const want = { p: Float64Array.from(p0), m: new Float64Array(n), v: new Float64Array(n) };
    for (let step = 1; step <= 5; step++) {
      const hp = {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weightDecay: 0.1,
        step,
        maxGradNorm,
      };
      const g = randoms(n, rng);
      gpu.write(grad, g);
      if (maxGradNorm > 0) gradNorm(gpu, [grad], norm);
      else gpu.write(norm, new Float32Array([1e30]));
      adamw(gpu, param, grad, m, v, norm, n, hp);
      twinAdamw(want.p, g, want.m, want.v, hp);
    }
    const [gotP, gotM, gotV] = await gpu.readMany([param, m, v]) as Float32Array[];
    const mScale = Math.max(...want.m.map(Math.abs)), vScale = Math.max(...want.v);
    for (let i = 0; i < n; i++) {
      const where = `n=${n} maxGradNorm=${maxGradNorm} i=${i}`;
      assert.ok(Math.abs(gotP[i] - want.p[i]) <= 2e-6, `p ${where}: ${gotP[i]} vs ${want.p[i]}`);
      assert.ok(Math.abs(gotM[i] - want.m[i]) <= 1e-6 * mScale, `m ${where}`);
      assert.ok(Math.abs(gotV[i] - want.v[i]) <= 1e-6 * vScale, `v ${where}`);
    }
    [param, grad, m, v, norm].forEach((t) => t.destroy());
  }
});
