// The 256-wide kernels past 65,535 workgroups: grid() then spreads the work over y, and each
// kernel's flat index `gid.x + gid.y · nwg.x · 256` must still reach every element exactly once.
// Qwen2.5-0.5B's embedding slices take this path; the other tests' shapes never do. Shapes are
// just big enough (n a little over 65,535 · 256, odd), every element checked against a CPU twin.

import assert from "node:assert/strict";
import { grid } from "../gpu/device.ts";
import { adamw } from "../gpu/kernels/adamw.ts";
import { add } from "../gpu/kernels/elementwise.ts";
import { embedding, embeddingBackward } from "../gpu/kernels/embedding.ts";
import { tokenLogprobsBackward } from "../gpu/kernels/logprobs.ts";
import { rope } from "../gpu/kernels/rope.ts";
import { swiglu, swigluBackward } from "../gpu/kernels/swiglu.ts";
import { gpuTest, openGpu } from "./helpers.ts";

const gpu = await openGpu();
const LIMIT = 65535 * 256;
const N = LIMIT + 4099; // odd, and 2 rows of workgroups

/** Every value within atol + rtol·|want|; the first mismatch fails with its index. */
function assertAll(
  got: Float32Array,
  want: (i: number) => number,
  n: number,
  atol: number,
  rtol: number,
  what: string,
) {
  assert.ok(got.length >= n, `${what}: ${got.length} values`);
  for (let i = 0; i < n; i++) {
    const w = want(i);
    if (!(Math.abs(got[i] - w) <= atol + rtol * Math.abs(w))) {
      assert.fail(`${what}[${i}] = ${got[i]}, want ${w}`);
    }
  }
}

const filled = (n: number, f: (i: number) => number) => {
  const a = new Float32Array(n);
  for (let i = 0; i < n; i++) a[i] = f(i);
  return a;
};

Deno.test("the shapes here do spread over two rows of workgroups", () => {
  assert.deepEqual(grid(N, 256)[1], 2);
  assert.deepEqual(grid(LIMIT, 256), [65535, 1]);
});

Deno.test("add beyond 65,535 workgroups", gpuTest, async () => {
  const a = filled(N, (i) => i % 1009), b = filled(N, (i) => (i % 13) * 0.5);
  const [ta, tb, out] = [gpu.upload(a), gpu.upload(b), gpu.zeros([N])];
  add(gpu, ta, tb, out, N);
  assertAll(await gpu.read(out), (i) => a[i] + b[i], N, 0, 0, "add");
  for (const t of [ta, tb, out]) gpu.release(t);
});

Deno.test("SwiGLU forward and backward beyond 65,535 workgroups", gpuTest, async () => {
  // One row of N gate values, then N up values: gateUp [1, 2·N] must fit one 128 MiB binding,
  // so N is just past the limit (odd: the scalar kernel, one invocation per value).
  const N = LIMIT + 255;
  assert.ok(2 * N * 4 <= 128 * 2 ** 20 && grid(N, 256)[1] === 2);
  const gate = filled(N, (i) => ((i % 101) - 50) / 25), up = filled(N, (i) => (i % 7) - 3);
  const dOut = filled(N, (i) => ((i % 5) + 1) * 0.25);
  const gateUp = new Float32Array(2 * N);
  gateUp.set(gate);
  gateUp.set(up, N);
  const t = [gateUp, dOut].map((x) => gpu.upload(x));
  const [out, dGateUp] = [gpu.zeros([N]), gpu.zeros([2 * N])];
  swiglu(gpu, t[0], out, 1, N);
  swigluBackward(gpu, t[0], t[1], dGateUp, 1, N);
  const sig = (g: number) => 1 / (1 + Math.exp(-g));
  assertAll(await gpu.read(out), (i) => gate[i] * sig(gate[i]) * up[i], N, 1e-6, 1e-5, "swiglu");
  const grads = await gpu.read(dGateUp);
  const dUp = grads.subarray(N), dGate = grads.subarray(0, N);
  assertAll(dUp, (i) => dOut[i] * gate[i] * sig(gate[i]), N, 1e-6, 1e-5, "dUp");
  assertAll(
    dGate,
    (i) => {
      const s = sig(gate[i]);
      return dOut[i] * up[i] * s * (1 + gate[i] * (1 - s));
    },
    N,
    1e-6,
    1e-5,
    "dGate",
  );
  for (const x of [...t, out, dGateUp]) gpu.release(x);
});

Deno.test("AdamW beyond 65,535 workgroups", gpuTest, async () => {
  const param = filled(N, (i) => (i % 17) * 0.1), grad = filled(N, (i) => ((i % 23) - 11) * 0.01);
  const tensors = [gpu.upload(param), gpu.upload(grad), gpu.zeros([N]), gpu.zeros([N])];
  const norm = gpu.upload(new Float32Array([1]));
  const hp = {
    lr: 0.1,
    beta1: 0.9,
    beta2: 0.99,
    eps: 1e-8,
    weightDecay: 0,
    step: 1,
    maxGradNorm: 0,
  };
  adamw(gpu, tensors[0], tensors[1], tensors[2], tensors[3], norm, N, hp);
  const update = (i: number) => {
    const m = 0.1 * grad[i], v = 0.01 * grad[i] ** 2;
    return param[i] - (0.1 / 0.1) * m / (Math.sqrt(v) / Math.sqrt(0.01) + 1e-8);
  };
  assertAll(await gpu.read(tensors[0]), update, N, 1e-6, 1e-5, "param");
  assertAll(await gpu.read(tensors[2]), (i) => 0.1 * grad[i], N, 1e-9, 1e-5, "m");
  for (const x of [...tensors, norm]) gpu.release(x);
});

Deno.test("RoPE beyond 65,535 workgroups", gpuTest, async () => {
  // T·heads·D/2 rotation pairs just past the limit; x stays under one 128 MiB binding.
  const heads = 2, D = 64, T = Math.ceil((LIMIT + 129) / (heads * D / 2)), n = T * heads * D;
  assert.ok(n * 4 <= 128 * 2 ** 20);
  const x = filled(n, (i) => ((i % 31) - 15) / 8);
  const positions = Int32Array.from({ length: T }, (_, t) => t % 50);
  const tx = gpu.upload(x), tp = gpu.upload(positions);
  rope(gpu, tx, tp, T, heads, D, 10000);
  const got = await gpu.read(tx);
  const half = D / 2;
  for (let pair = 0; pair < T * heads * half; pair++) {
    const head = Math.floor(pair / half), i = pair - head * half;
    const angle = positions[Math.floor(head / heads)] * Math.fround(1 / 10000 ** ((2 * i) / D));
    const at = head * D + i, c = Math.cos(angle), s = Math.sin(angle);
    const want1 = x[at] * c - x[at + half] * s, want2 = x[at + half] * c + x[at] * s;
    if (!(Math.abs(got[at] - want1) <= 1e-4 && Math.abs(got[at + half] - want2) <= 1e-4)) {
      assert.fail(`rope pair ${pair}: [${got[at]}, ${got[at + half]}], want [${want1}, ${want2}]`);
    }
  }
  gpu.release(tx);
  gpu.release(tp);
});

Deno.test("embedding forward and backward beyond 65,535 workgroups", gpuTest, async () => {
  const H = 257, T = Math.ceil((LIMIT + 1000) / H), V = T; // T·H and V·H past the limit
  const table = filled(V * H, (i) => (i % 251) - 125);
  const ids = Int32Array.from({ length: T }, (_, t) => (t * 7919) % V); // each row once
  const tTable = gpu.upload(table, [V, H]), tIds = gpu.upload(ids), out = gpu.zeros([T, H]);
  embedding(gpu, tIds, tTable, out, T);
  assertAll(
    await gpu.read(out),
    (i) => table[ids[Math.floor(i / H)] * H + (i % H)],
    T * H,
    0,
    0,
    "embedding",
  );
  // Backward: dTable[ids[t]] = dOut[t], over V·H values.
  const dOut = filled(T * H, (i) => (i % 97) * 0.5), dTable = gpu.zeros([V, H]);
  const tdOut = gpu.upload(dOut, [T, H]);
  embeddingBackward(gpu, ids, tdOut, dTable, false);
  const got = await gpu.read(dTable);
  const row = new Int32Array(V).fill(-1);
  ids.forEach((v, t) => row[v] = t);
  assertAll(got, (i) => dOut[row[Math.floor(i / H)] * H + (i % H)], V * H, 0, 0, "dTable");
  for (const x of [tTable, tIds, out, dTable, tdOut]) gpu.release(x);
});

Deno.test("log-prob backward beyond 65,535 workgroups", gpuTest, async () => {
  const T = 3, V = Math.ceil((LIMIT + 777) / T), s = 0.8;
  const logits = filled(T * V, (i) => ((i % 97) - 48) / 20);
  const targets = Int32Array.from([5, V - 1, 123_457]);
  const lse = Float32Array.from({ length: T }, (_, t) => {
    let max = -Infinity, sum = 0;
    for (let v = 0; v < V; v++) max = Math.max(max, s * logits[t * V + v]);
    for (let v = 0; v < V; v++) sum += Math.exp(s * logits[t * V + v] - max);
    return max + Math.log(sum);
  });
  const dLogp = Float32Array.from([1, -0.5, 2]);
  const inputs = [gpu.upload(logits), gpu.upload(targets), gpu.upload(lse), gpu.upload(dLogp)];
  const dLogits = gpu.zeros([T * V]);
  tokenLogprobsBackward(gpu, inputs[0], inputs[1], inputs[2], inputs[3], dLogits, T, V, s);
  assertAll(
    await gpu.read(dLogits),
    (i) => {
      const t = Math.floor(i / V), v = i - t * V;
      const softmax = Math.exp(s * logits[i] - lse[t]);
      return dLogp[t] * s * ((v === targets[t] ? 1 : 0) - softmax);
    },
    T * V,
    1e-12,
    1e-4,
    "dLogits",
  );
  for (const x of [...inputs, dLogits]) gpu.release(x);
});
