// sample() against properties and a float64 twin: greedy is the argmax (ties to the lowest index),
// draws are reproducible for a (seed, step) and change with either, sampled frequencies follow
// the softmax restricted by top-k / top-p, no token falls outside those sets, done rows are left
// alone, logp is the untruncated log-softmax of the chosen token, and rows that share a row of
// logits draw as if each had its own copy.

import assert from "node:assert/strict";

import { sample, type SampleOptions } from "../gpu/kernels/sample.ts";
import { gpuTest, openGpu, randoms } from "./helpers.ts";

const gpu = await openGpu();

/**
 * Run sample() for B rows (logits [B, V], or fewer rows that groups share); done rows start with
 * token −7 and logp 123.
 */
async function run(
  logits: Float32Array,
  B: number,
  V: number,
  o: SampleOptions,
  done = new Int32Array(B),
) {
  const t = {
    logits: gpu.upload(logits, [logits.length / V, V]),
    done: gpu.upload(done),
    tokens: gpu.upload(new Int32Array(B).fill(-7)),
    logp: gpu.upload(new Float32Array(B).fill(123)),
  };
  sample(gpu, t.logits, B, V, o, t.done, t.tokens, t.logp);
  const [tokens, logp] = await gpu.readMany([t.tokens, t.logp]);
  Object.values(t).forEach((x) => x.destroy());
  return { tokens: tokens as Int32Array, logp: logp as Float32Array };
}

/** Float64 twin: log softmax(row / T), T = 1 when greedy. */
function logSoftmax(row: ArrayLike<number>, temperature: number): Float64Array {
  const s = temperature === 0 ? 1 : 1 / temperature;
  const z = Float64Array.from(row, (x) => s * x);
  const max = z.reduce((a, b) => Math.max(a, b), -Infinity);
  const lse = max + Math.log(z.reduce((acc, x) => acc + Math.exp(x - max), 0));
  return z.map((x) => x - lse);
}

/**
 * Float64 twin of the allowed set: the topK largest logits (ties at the k-th included), then the
 * smallest top set holding topP of their mass (ties at the threshold included). Returns the
 * renormalised probabilities, 0 outside the set.
 */
function allowedProbs(row: ArrayLike<number>, o: SampleOptions): Float64Array {
  const V = row.length;
  const p = logSoftmax(row, o.temperature).map(Math.exp);
  const order = [...Array(V).keys()].sort((a, b) => row[b] - row[a]);
  let cutoff = o.topK > 0 && o.topK < V ? row[order[o.topK - 1]] : -Infinity;
  const kept = order.filter((v) => row[v] >= cutoff);
  const keptMass = kept.reduce((acc, v) => acc + p[v], 0);
  let mass = 0;
  for (const v of kept) {
    mass += p[v];
    if (mass >= o.topP * keptMass) {
      cutoff = row[v];
      break;
    }
  }
  const q = p.map((x, v) => (row[v] >= cutoff ? x : 0));
  const total = q.reduce((a, b) => a + b, 0);
  return q.map((x) => x / total);
}

/** logp[b] against the twin for every row not in `skip`; f32 tolerance 1e-5·(1 + |logp|). */
function assertLogp(
  logits: Float32Array,
  V: number,
  got: { tokens: Int32Array; logp: Float32Array },
  temperature: number,
  skip = (_b: number) => false,
) {
  got.tokens.forEach((token, b) => {
    if (skip(b)) return;
    const want = logSoftmax(logits.subarray(b * V, (b + 1) * V), temperature)[token];
    const where = `row ${b}: ${got.logp[b]} vs ${want}`;
    assert.ok(Math.abs(got.logp[b] - want) <= 1e-5 * (1 + Math.abs(want)), where);
  });
}

Deno.test(
  "greedy is the argmax, ties to the lowest index; done rows are untouched",
  gpuTest,
  async () => {
    for (const [B, V] of [[33, 97], [3, 50_000]]) { // 1 and 256 threads per row
      const logits = randoms(B * V, V, 8);
      logits[V + 5] = logits[V + 40] = logits[V + 90] = 9; // a three-way tie for the max in row 1
      const done = Int32Array.from({ length: B }, (_, b) => (b % 5 === 2 ? 1 : 0));
      const o = { temperature: 0, topK: 3, topP: 0.5, seed: 1, step: 0 }; // top-k/p: no effect
      const got = await run(logits, B, V, o, done);
      for (let b = 0; b < B; b++) {
        if (done[b]) {
          assert.equal(got.tokens[b], -7);
          assert.equal(got.logp[b], 123);
          continue;
        }
        const row = logits.subarray(b * V, (b + 1) * V);
        const max = row.reduce((a, x) => Math.max(a, x), -Infinity);
        assert.equal(got.tokens[b], row.indexOf(max), `B=${B} V=${V} row ${b}`);
      }
      assert.equal(got.tokens[1], 5);
      assertLogp(logits, V, got, 0, (b) => done[b] !== 0);
    }
  },
);

Deno.test(
  "a fixed seed and step reproduce the draw; changing either changes it",
  gpuTest,
  async () => {
    const B = 257, V = 33;
    const logits = randoms(B * V, 2);
    const o = { temperature: 1, topK: 0, topP: 1, seed: 5, step: 3 };
    const a = await run(logits, B, V, o);
    const again = await run(logits, B, V, o);
    assert.deepEqual(again.tokens, a.tokens);
    assert.deepEqual(new Uint32Array(again.logp.buffer), new Uint32Array(a.logp.buffer));
    // Two independent draws agree with probability Σp² ≈ 0.04 per row here.
    const differing = (x: Int32Array) => x.filter((t, b) => t !== a.tokens[b]).length;
    for (const other of [{ step: 4 }, { seed: 6 }, { seed: 5 + 2 ** 32 }]) {
      const changed = await run(logits, B, V, { ...o, ...other });
      assert.ok(differing(changed.tokens) > B / 2, `${JSON.stringify(other)} changes the draw`);
    }
    assertLogp(logits, V, a, 1);
  },
);

Deno.test(
  "sampled frequencies follow the softmax restricted by top-k and top-p",
  gpuTest,
  async () => {
    // 4000 rows of the same logits, so 4000 draws keyed by (seed, step, row). Each token's count
    // must lie within 5 binomial standard deviations of 4000·q (q = the twin's restricted
    // probability); tokens outside the allowed set must never appear.
    const B = 4000, plain = [1.0, 0.5, -0.3, 2.0, 0.0], tied = [2, 1, 1, 1, 0];
    const configs: [number[], SampleOptions][] = [
      [plain, { temperature: 0.8, topK: 0, topP: 1, seed: 11, step: 0 }],
      [plain, { temperature: 1, topK: 3, topP: 1, seed: 12, step: 1 }],
      [plain, { temperature: 1, topK: 0, topP: 0.6, seed: 13, step: 2 }], // nucleus {3, 0}
      [plain, { temperature: 0.7, topK: 4, topP: 0.9, seed: 14, step: 3 }],
      // Ties at the threshold are all kept: both give {0, 1, 2, 3} (p = .447, .164 ×3, .060).
      [tied, { temperature: 1, topK: 2, topP: 1, seed: 15, step: 4 }],
      [tied, { temperature: 1, topK: 0, topP: 0.5, seed: 16, step: 5 }],
    ];
    for (const [row, o] of configs) {
      const V = row.length;
      const logits = new Float32Array(B * V).map((_, i) => row[i % V]);
      const got = await run(logits, B, V, o);
      const q = allowedProbs(Float32Array.from(row), o);
      const counts = new Array(V).fill(0);
      got.tokens.forEach((t) => counts[t]++);
      for (let v = 0; v < V; v++) {
        const where = `${row} ${JSON.stringify(o)} token ${v}: ${counts[v]} of ${B}, q = ${q[v]}`;
        if (q[v] === 0) assert.equal(counts[v], 0, where);
        else {assert.ok(
            Math.abs(counts[v] - B * q[v]) <= 5 * Math.sqrt(B * q[v] * (1 - q[v])),
            where,
          );}
      }
      assertLogp(logits, V, got, o.temperature);
    }
  },
);

Deno.test("top-k and top-p never return a token outside their sets", gpuTest, async () => {
  // Membership is checked against the twin's set for topP + 1e-4: the kernel sums f32 masses, so a
  // token whose cumulative mass lies within 1e-4 of topP may fall on either side.
  const cases: [number, number, SampleOptions][] = [
    [129, 1000, { temperature: 1, topK: 7, topP: 1, seed: 21, step: 0 }],
    [65, 97, { temperature: 0.9, topK: 0, topP: 0.5, seed: 22, step: 0 }],
    [33, 333, { temperature: 1.3, topK: 20, topP: 0.7, seed: 23, step: 9 }],
    [2, 151_936, { temperature: 1, topK: 50, topP: 0.9, seed: 24, step: 0 }],
  ];
  for (const [B, V, o] of cases) {
    const logits = randoms(B * V, V, 6);
    // Ties at the k-th largest logit in row 0: all tied tokens are allowed.
    if (o.topK > 0) {
      const row = logits.subarray(0, V);
      const kth = [...row].sort((a, b) => b - a)[o.topK - 1];
      for (let v = 0; v < V; v += 3) if (row[v] < kth && row[v] > kth - 0.5) row[v] = kth;
    }
    const got = await run(logits, B, V, o);
    const loose = { ...o, topP: Math.min(1, o.topP + 1e-4) };
    got.tokens.forEach((token, b) => {
      const q = allowedProbs(logits.subarray(b * V, (b + 1) * V), loose);
      assert.ok(token >= 0 && token < V && q[token] > 0, `B=${B} V=${V} row ${b}: token ${token}`);
    });
    assertLogp(logits, V, got, o.temperature);
  }
});

Deno.test(
  "rows sharing a row of logits (groupSize) draw as if each had its own copy",
  gpuTest,
  async () => {
    // One thread per row (V ≤ 256) and a workgroup per row (V > 256); G does not divide B.
    for (const [P, G, V] of [[5, 3, 33], [3, 4, 301]]) {
      const B = P * G - 1, shared = randoms(P * V, V);
      const copies = new Float32Array(B * V);
      for (let b = 0; b < B; b++) {
        const row = Math.floor(b / G) * V;
        copies.set(shared.subarray(row, row + V), b * V);
      }
      const done = Int32Array.from({ length: B }, (_, b) => b === 2 ? 1 : 0);
      const o = { temperature: 0.8, topK: 0, topP: 0.9, seed: 7, step: 0 };
      const got = await run(shared, B, V, { ...o, groupSize: G }, done);
      const want = await run(copies, B, V, o, done);
      assert.deepEqual(got.tokens, want.tokens, `P ${P}, G ${G}, V ${V}`);
      assert.deepEqual(got.logp, want.logp);
      assertLogp(copies, V, got, o.temperature, (b) => b === 2);
      // The rows of a group draw apart: not every row repeats its group's first.
      assert.ok(got.tokens.some((t, b) => b % G !== 0 && b !== 2 && t !== got.tokens[b - b % G]));
    }
  },
);
