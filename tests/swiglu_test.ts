// gpu/kernels/swiglu.ts against a float64 TypeScript twin, and its backward also against central
// finite differences of that twin. Gates span ±12 plus extremes (±30, ±100, 0) to check the
// sigmoid never overflows. Tolerance: |gpu − ref| ≤ 1e-6 + 1e-5·|ref| (f32 exp/division).
// Outputs are allocated longer than n: the tail must stay untouched.

import { swiglu, swigluBackward } from "../gpu/kernels/swiglu.ts";
import { assertClose, gpuTest, openGpu, randoms, sentinels, unpad } from "./helpers.ts";

const gpu = await openGpu();
// Multiples of 4 take the vec4 kernels, the others the scalar ones.
const SIZES = [1, 7, 33, 97, 1001, 4, 516, 1024];

function gates(n: number): Float32Array {
  const g = randoms(n, 11, 12);
  g.set([0, -100, 100, -30, 30].slice(0, n));
  return g;
}

const silu = (g: number) => g / (1 + Math.exp(-g));

/** A padded output against want(0..n−1), to the tolerance above; the padding untouched. */
function assertMatches(got: Float32Array, want: (i: number) => number, n: number, what: string) {
  const expected = Float64Array.from({ length: n }, (_, i) => want(i));
  assertClose(unpad(got, n, what), expected, 1e-6, 1e-5, what);
}

Deno.test("swiglu forward matches the float64 twin", gpuTest, async () => {
  for (const n of SIZES) {
    const g = gates(n), u = randoms(n, 12, 2);
    const out = gpu.upload(sentinels(n));
    swiglu(gpu, gpu.upload(g), gpu.upload(u), out, n);
    assertMatches(await gpu.read(out), (i) => silu(g[i]) * u[i], n, `swiglu n=${n}`);
  }
});

Deno.test("swiglu backward matches the analytic twin and finite differences", gpuTest, async () => {
  for (const n of SIZES) {
    const g = gates(n), u = randoms(n, 13, 2), d = randoms(n, 14);
    const dGate = gpu.upload(sentinels(n)), dUp = gpu.upload(sentinels(n));
    swigluBackward(gpu, gpu.upload(g), gpu.upload(u), gpu.upload(d), dGate, dUp, n);
    const [dg, du] = (await gpu.readMany([dGate, dUp])) as Float32Array[];
    // Analytic: d silu/dg = σ(g)·(1 + g·(1 − σ(g))).
    const sigmoid = (x: number) => 1 / (1 + Math.exp(-x));
    const dSilu = (x: number) => sigmoid(x) * (1 + x * (1 - sigmoid(x)));
    assertMatches(dg, (i) => d[i] * u[i] * dSilu(g[i]), n, `dGate n=${n}`);
    assertMatches(du, (i) => d[i] * silu(g[i]), n, `dUp n=${n}`);
    // Central differences of L = Σ d·silu(g)·u, one value at a time (the op is elementwise).
    const loss = (i: number, gi: number, ui: number) => d[i] * silu(gi) * ui;
    const h = 1e-5;
    const fd = (f: (x: number) => number, x: number) => (f(x + h) - f(x - h)) / (2 * h);
    assertMatches(dg, (i) => fd((x) => loss(i, x, u[i]), g[i]), n, `dGate vs FD n=${n}`);
    assertMatches(du, (i) => fd((x) => loss(i, g[i], x), u[i]), n, `dUp vs FD n=${n}`);
  }
});
