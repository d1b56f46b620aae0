// gpu/kernels/rmsnorm.ts against a float64 TypeScript twin on odd shapes, with and without the
// accumulate flags, and the backward also against central finite differences of the twin.
// Rows are scaled from 0.01 to 100 so that eps matters in some. Tolerance: |gpu − ref| ≤
// tol·(1 + |ref|) with tol = 1e-5 for y, rstd and dw (measured ≤ 1.7e-6), and 3e-5 for dx
// (measured ≤ 6e-6), whose two terms, each up to ~rstd·|w·dy| ≈ 200 in small rows, cancel.
// Outputs are allocated longer than the work: the tail must stay untouched.

import { rmsnorm, rmsnormBackward } from "../gpu/kernels/rmsnorm.ts";
import {
  assertClose,
  centralDifference,
  eachInputPath,
  gpuTest,
  openGpu,
  padded,
  randoms,
  sentinels,
  unpad,
} from "./helpers.ts";

const gpu = await openGpu();
const EPS = 1e-6;

/** x [T, H] whose row t has magnitude 10^(t % 5 − 2). */
function inputs(T: number, H: number): Float32Array {
  const x = randoms(T * H, T * 1000 + H);
  for (let i = 0; i < T * H; i++) x[i] = Math.fround(x[i] * 10 ** ((Math.floor(i / H) % 5) - 2));
  return x;
}

function rmsnormTwin(x: ArrayLike<number>, w: ArrayLike<number>, T: number, H: number) {
  const y = new Float64Array(T * H), rstd = new Float64Array(T);
  for (let t = 0; t < T; t++) {
    let sumSq = 0;
    for (let j = 0; j < H; j++) sumSq += x[t * H + j] ** 2;
    rstd[t] = 1 / Math.sqrt(sumSq / H + EPS);
    for (let j = 0; j < H; j++) y[t * H + j] = x[t * H + j] * rstd[t] * w[j];
  }
  return { y, rstd };
}

function rmsnormBackwardTwin(x: Float32Array, w: Float32Array, dy: Float32Array, T: number) {
  const H = w.length;
  const { rstd } = rmsnormTwin(x, w, T, H);
  const dx = new Float64Array(T * H), dw = new Float64Array(H);
  for (let t = 0; t < T; t++) {
    const r = rstd[t];
    let sumXg = 0;
    for (let j = 0; j < H; j++) sumXg += x[t * H + j] * w[j] * dy[t * H + j];
    for (let j = 0; j < H; j++) {
      const i = t * H + j;
      dx[i] = r * w[j] * dy[i] - (x[i] * r ** 3 * sumXg) / H;
      dw[j] += dy[i] * x[i] * r;
    }
  }
  return { dx, dw };
}

/** |got − want| ≤ tol·(1 + |want|) on want.length values, then the padding untouched. */
function assertPaddedClose(got: Float32Array, want: ArrayLike<number>, what: string, tol = 1e-5) {
  assertClose(unpad(got, want.length, what), want, tol, tol, what);
}

const SHAPES = [1, 7, 33, 97].flatMap((T) => [7, 33, 64, 97].map((H) => [T, H]));

Deno.test(
  "rmsnorm forward matches the float64 twin",
  gpuTest,
  () =>
    eachInputPath(gpu, async (how) => {
      for (const [T, H] of SHAPES) {
        const x = inputs(T, H), w = randoms(H, 7, 2);
        const y = gpu.upload(sentinels(T * H)), rstd = gpu.upload(sentinels(T));
        rmsnorm(gpu, gpu.upload(x), gpu.upload(w), y, rstd, T, EPS);
        const [yGot, rstdGot] = (await gpu.readMany([y, rstd])) as Float32Array[];
        const want = rmsnormTwin(x, w, T, H);
        assertPaddedClose(yGot, want.y, `y T=${T} H=${H} ${how}`);
        assertPaddedClose(rstdGot, want.rstd, `rstd T=${T} H=${H} ${how}`);
      }
    }),
);

Deno.test(
  "rmsnorm backward matches the float64 twin, with and without accumulate",
  gpuTest,
  () =>
    eachInputPath(gpu, async (how) => {
      // T = 300 spans several of the kernel's 64-row blocks for dw.
      for (const [T, H] of [...SHAPES, [300, 33]]) {
        for (const accumulate of [false, true]) {
          const x = inputs(T, H), w = randoms(H, 8, 2), dy = randoms(T * H, 9);
          const dx0 = randoms(T * H, 10), dw0 = randoms(H, 11);
          const xGpu = gpu.upload(x), wGpu = gpu.upload(w);
          const y = gpu.zeros([T, H]), rstd = gpu.zeros([T]);
          const dx = gpu.upload(padded(dx0)), dw = gpu.upload(padded(dw0));
          rmsnorm(gpu, xGpu, wGpu, y, rstd, T, EPS);
          const flags = { accumulateDx: accumulate, accumulateDw: accumulate };
          rmsnormBackward(gpu, xGpu, wGpu, rstd, gpu.upload(dy), dx, dw, T, flags);
          const [dxGot, dwGot] = (await gpu.readMany([dx, dw])) as Float32Array[];
          const want = rmsnormBackwardTwin(x, w, dy, T);
          const plus = (prior: Float32Array, g: Float64Array) =>
            accumulate ? g.map((v, i) => v + prior[i]) : g;
          const what = `T=${T} H=${H} accumulate=${accumulate} ${how}`;
          assertPaddedClose(dxGot, plus(dx0, want.dx), `dx ${what}`, 3e-5);
          assertPaddedClose(dwGot, plus(dw0, want.dw), `dw ${what}`);
        }
      }
    }),
);

Deno.test(
  "rmsnorm backward matches finite differences of the twin",
  gpuTest,
  () =>
    eachInputPath(gpu, async (how) => {
      for (const [T, H] of [[1, 97], [7, 33], [33, 7]]) {
        const x = inputs(T, H), w = randoms(H, 12, 2), dy = randoms(T * H, 13);
        const xGpu = gpu.upload(x), wGpu = gpu.upload(w);
        const y = gpu.zeros([T, H]), rstd = gpu.zeros([T]), dx = gpu.zeros([T, H]);
        const dw = gpu.zeros([H]);
        rmsnorm(gpu, xGpu, wGpu, y, rstd, T, EPS);
        const flags = { accumulateDx: false, accumulateDw: false };
        rmsnormBackward(gpu, xGpu, wGpu, rstd, gpu.upload(dy), dx, dw, T, flags);
        const [dxGot, dwGot] = (await gpu.readMany([dx, dw])) as Float32Array[];
        // L = Σ dy·y in float64; central differences with a step relative to the value.
        const loss = (xs: Float64Array, ws: Float64Array) =>
          rmsnormTwin(xs, ws, T, H).y.reduce((s, v, i) => s + v * dy[i], 0);
        const gradient = (values: Float64Array, f: () => number) =>
          values.map((v, i) => centralDifference(values, i, 1e-4 * Math.max(Math.abs(v), 1e-2), f));
        const x64 = Float64Array.from(x), w64 = Float64Array.from(w);
        assertClose(
          dxGot,
          gradient(x64, () => loss(x64, w64)),
          3e-5,
          3e-5,
          `dx vs FD T=${T} H=${H} ${how}`,
        );
        assertClose(
          dwGot,
          gradient(w64, () => loss(x64, w64)),
          1e-5,
          1e-5,
          `dw vs FD T=${T} H=${H} ${how}`,
        );
      }
    }),
);
