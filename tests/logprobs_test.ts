// tokenLogprobs / tokenLogprobsBackward against a float64 TypeScript twin on odd shapes, with
// logits up to ±80 (a naive exp overflows f32 there), and the backward against finite differences.

import assert from "node:assert/strict";
import { Rng } from "../core/rng.ts";

import { tokenLogprobs, tokenLogprobsBackward } from "../gpu/kernels/logprobs.ts";
import { centralDifference, gpuTest, openGpu, randoms } from "./helpers.ts";

const gpu = await openGpu();

/** Float64 twin: logp[t] and lse[t] of s·logits. */
function twinForward(logits: ArrayLike<number>, targets: Int32Array, V: number, s: number) {
  const T = targets.length;
  const logp = new Float64Array(T);
  const lse = new Float64Array(T);
  for (let t = 0; t < T; t++) {
    let max = -Infinity;
    for (let v = 0; v < V; v++) max = Math.max(max, s * logits[t * V + v]);
    let sum = 0;
    for (let v = 0; v < V; v++) sum += Math.exp(s * logits[t * V + v] - max);
    lse[t] = max + Math.log(sum);
    logp[t] = s * logits[t * V + targets[t]] - lse[t];
  }
  return { logp, lse };
}

function twinBackward(
  logits: ArrayLike<number>,
  targets: Int32Array,
  lse: Float64Array,
  dLogp: Float32Array,
  V: number,
  s: number,
): Float64Array {
  const d = new Float64Array(targets.length * V);
  for (let t = 0; t < targets.length; t++) {
    for (let v = 0; v < V; v++) {
      const softmax = Math.exp(s * logits[t * V + v] - lse[t]);
      d[t * V + v] = dLogp[t] * s * ((v === targets[t] ? 1 : 0) - softmax);
    }
  }
  return d;
}

/** Random logits: even rows spread over ±80, odd rows over ±4. */
function makeCase(T: number, V: number, seed: number) {
  const rng = new Rng(seed);
  const logits = new Float32Array(T * V);
  for (let t = 0; t < T; t++) logits.set(randoms(V, rng, t % 2 === 0 ? 80 : 4), t * V);
  const targets = Int32Array.from({ length: T }, () => rng.int(V));
  const dLogp = randoms(T, rng);
  return { logits, targets, dLogp };
}

async function runGpu(
  logits: Float32Array,
  targets: Int32Array,
  dLogp: Float32Array,
  T: number,
  V: number,
  s: number,
) {
  const tensors = {
    logits: gpu.upload(logits, [T, V]),
    targets: gpu.upload(targets),
    dLogp: gpu.upload(dLogp),
    logp: gpu.zeros([T]),
    lse: gpu.zeros([T]),
    dLogits: gpu.upload(new Float32Array(T * V).fill(NaN), [T, V]), // must be overwritten
  };
  const { logp, lse, dLogits } = tensors;
  tokenLogprobs(gpu, tensors.logits, tensors.targets, logp, lse, T, V, s);
  tokenLogprobsBackward(gpu, tensors.logits, tensors.targets, lse, tensors.dLogp, dLogits, T, V, s);
  const [gLogp, gLse, gDLogits] = await gpu.readMany([logp, lse, dLogits]) as Float32Array[];
  Object.values(tensors).forEach((t) => t.destroy());
  return { logp: gLogp, lse: gLse, dLogits: gDLogits };
}

Deno.test("tokenLogprobs forward and backward match the float64 twin", gpuTest, async () => {
  // Odd shapes plus Qwen2's vocabulary. f32 tolerances (measured worst errors 7x and 12x inside):
  // lse and logp to 1e-6·(1 + |lse|); dLogits to 1e-6·|dLogp·s|·(1 + softmax·(1 + |s·x| + |lse|)),
  // as exp(s·x − lse) inherits the rounding of s·x and lse.
  const shapes = [1, 7, 33].flatMap((T) => [7, 97, 1000, 50000].map((V) => [T, V]));
  let seed = 1;
  for (const [T, V] of [...shapes, [2, 151_936]]) {
    const s = seed % 2 === 0 ? 1 / 0.7 : 1;
    const { logits, targets, dLogp } = makeCase(T, V, seed++);
    const got = await runGpu(logits, targets, dLogp, T, V, s);
    const want = twinForward(logits, targets, V, s);
    const dWant = twinBackward(logits, targets, want.lse, dLogp, V, s);
    for (let t = 0; t < T; t++) {
      const tol = 1e-6 * (1 + Math.abs(want.lse[t]));
      const where = `T=${T} V=${V} s=${s.toFixed(3)} t=${t}`;
      assert.ok(Math.abs(got.lse[t] - want.lse[t]) <= tol, `lse ${where}`);
      assert.ok(Math.abs(got.logp[t] - want.logp[t]) <= tol, `logp ${where}`);
      for (let v = 0; v < V; v++) {
        const i = t * V + v;
        const sx = s * logits[i];
        const softmax = Math.exp(sx - want.lse[t]);
        const dTol = 1e-6 * Math.abs(dLogp[t] * s) *
          (1 + softmax * (1 + Math.abs(sx) + Math.abs(want.lse[t])));
        assert.ok(
          Math.abs(got.dLogits[i] - dWant[i]) <= dTol,
          `dLogits ${where} v=${v}: ${got.dLogits[i]} vs ${dWant[i]}`,
        );
      }
    }
  }
});

Deno.test("tokenLogprobsBackward matches finite differences of the twin", gpuTest, async () => {
  // Objective Σ_t dLogp[t]·logp[t]; central differences in float64 with h = 1e-4 (truncation error
  // ~h²); the f32 kernel is compared to 2e-6 absolute.
  for (const [T, V, s] of [[3, 7, 1], [2, 97, 1 / 0.6]]) {
    const { logits, targets, dLogp } = makeCase(T, V, 100 + V);
    for (let i = 0; i < logits.length; i++) logits[i] /= 20; // moderate logits: no vanishing softmax
    const got = await runGpu(logits, targets, dLogp, T, V, s);
    const objective = (x: Float64Array) => {
      const { logp } = twinForward(x, targets, V, s);
      return logp.reduce((acc, l, t) => acc + dLogp[t] * l, 0);
    };
    const h = 1e-4;
    const x = Float64Array.from(logits);
    for (let i = 0; i < x.length; i++) {
      const fd = centralDifference(x, i, h, () => objective(x));
      assert.ok(
        Math.abs(got.dLogits[i] - fd) <= 2e-6,
        `T=${T} V=${V} i=${i}: ${got.dLogits[i]} vs ${fd}`,
      );
    }
  }
});
