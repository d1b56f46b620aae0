// gpu/kernels/swiglu.ts against a float64 TypeScript twin, and its backward also against central
// finite differences of that twin. Gates span ±12 plus extremes (±30, ±100, 0) to check the
// sigmoid never overflows. Tolerance: |gpu − ref| ≤ 1e-6 + 1e-5·|ref| (f32 exp/division).
// gate and up arrive as the halves of each row of one [T, 2·I] matrix (the fused product's).
// Outputs are allocated longer than needed: the tail must stay untouched.

import { swiglu, swigluBackward } from "../gpu/kernels/swiglu.ts";
import {
  assertClose,
  eachInputPath,
  gpuTest,
  openGpu,
  randoms,
  sentinels,
  unpad,
} from "./helpers.ts";

const gpu = await openGpu();
// [T, I]: intermediate sizes that are multiples of 4 take the vec4 kernels, the others the
// scalar ones. gate and up are the two halves of each row of gateUp [T, 2·I].
const SHAPES = [[1, 1], [1, 7], [3, 11], [5, 97], [1, 1001], [2, 4], [3, 516], [1, 1024], [7, 12]];

function gates(n: number): Float32Array {
  const g = randoms(n, 11, 12);
  g.set([0, -100, 100, -30, 30].slice(0, n));
  return g;
}

/** gateUp [T, 2·I] from gate and up [T, I]. */
function rows(gate: Float32Array, up: Float32Array, T: number, I: number): Float32Array {
  const out = new Float32Array(2 * T * I);
  for (let t = 0; t < T; t++) {
    out.set(gate.subarray(t * I, (t + 1) * I), 2 * t * I);
    out.set(up.subarray(t * I, (t + 1) * I), (2 * t + 1) * I);
  }
  return out;
}

const silu = (g: number) => g / (1 + Math.exp(-g));

/** A padded output against want(0..n−1), to the tolerance above; the padding untouched. */
function assertMatches(got: Float32Array, want: (i: number) => number, n: number, what: string) {
  const expected = Float64Array.from({ length: n }, (_, i) => want(i));
  assertClose(unpad(got, n, what), expected, 1e-6, 1e-5, what);
}

Deno.test(
  "swiglu forward matches the float64 twin",
  gpuTest,
  () =>
    eachInputPath(gpu, async (how) => {
      for (const [T, I] of SHAPES) {
        const n = T * I, g = gates(n), u = randoms(n, 12, 2);
        const out = gpu.upload(sentinels(n));
        swiglu(gpu, gpu.upload(rows(g, u, T, I)), out, T, I);
        assertMatches(await gpu.read(out), (i) => silu(g[i]) * u[i], n, `swiglu ${T}×${I} ${how}`);
      }
    }),
);

Deno.test(
  "swiglu backward matches the analytic twin and finite differences",
  gpuTest,
  () =>
    eachInputPath(gpu, async (how) => {
      for (const [T, I] of SHAPES) {
        const n = T * I, g = gates(n), u = randoms(n, 13, 2), d = randoms(n, 14);
        const dGateUp = gpu.upload(sentinels(2 * n));
        swigluBackward(gpu, gpu.upload(rows(g, u, T, I)), gpu.upload(d), dGateUp, T, I);
        // Split the rows back into dGate and dUp (the padding checked first).
        const got = unpad(await gpu.read(dGateUp), 2 * n, `dGateUp ${T}×${I} ${how}`);
        const dg = new Float32Array(n), du = new Float32Array(n);
        for (let t = 0; t < T; t++) {
          dg.set(got.subarray(2 * t * I, (2 * t + 1) * I), t * I);
          du.set(got.subarray((2 * t + 1) * I, (2 * t + 2) * I), t * I);
        }
        const what = `${T}×${I} ${how}`;
        // Analytic: d silu/dg = σ(g)·(1 + g·(1 − σ(g))).
        const sigmoid = (x: number) => 1 / (1 + Math.exp(-x));
        const dSilu = (x: number) => sigmoid(x) * (1 + x * (1 - sigmoid(x)));
        const near = (values: Float32Array, want: (i: number) => number, name: string) =>
          assertClose(
            values,
            Float64Array.from({ length: n }, (_, i) => want(i)),
            1e-6,
            1e-5,
            name,
          );
        near(dg, (i) => d[i] * u[i] * dSilu(g[i]), `dGate ${what}`);
        near(du, (i) => d[i] * silu(g[i]), `dUp ${what}`);
        // Central differences of L = Σ d·silu(g)·u, one value at a time (the op is elementwise).
        const loss = (i: number, gi: number, ui: number) => d[i] * silu(gi) * ui;
        const h = 1e-5;
        const fd = (f: (x: number) => number, x: number) => (f(x + h) - f(x - h)) / (2 * h);
        near(dg, (i) => fd((x) => loss(i, x, u[i]), g[i]), `dGate vs FD ${what}`);
        near(du, (i) => fd((x) => loss(i, g[i], x), u[i]), `dUp vs FD ${what}`);
      }
    }),
);
