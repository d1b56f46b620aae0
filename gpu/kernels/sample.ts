// Drawing the next token of every sequence on the GPU, so generation never waits on a readback.
// One workgroup (one invocation, for vocabularies of at most 256) owns one row of logits [B, V]
// and, without sorting:
//   1. reduces the row's max and sum of exp of z = logits/temperature (the untruncated log-softmax);
//   2. finds the top-k threshold, the key of the k-th largest logit (keys: an order-preserving u32
//      image of the logits), by a search over the key's 16 base-4 digits from the top: one pass
//      over the row per digit, counting the tokens at or above three candidate thresholds at once;
//   3. finds the top-p threshold the same way, weighing tokens by probability instead of counting;
//   4. draws u in [0, 1) from a counter-based hash of (seed, step, row) and walks the allowed tokens
//      in index order, accumulating probability until the running sum exceeds u·(allowed mass);
//      rows count from `firstRow`, so a batch sampled in several calls draws as in one.
// Rows may share a row of logits (`groupSize`): a group's first tokens, drawn from its prompt's.
// Tokens tied at a threshold are all allowed, so the top-k set may hold more than k tokens and the
// nucleus more than the smallest set. temperature = 0 is greedy: argmax, ties to the lowest index.
// Few passes matter beyond speed: llvmpipe ends every loop of an invocation once its loops have run
// 65,535 iterations in total, and a thread here makes ~37 passes of V/256 (fine up to V ≈ 450k).

import { AhaError } from "../../core/errors.ts";
import { Gpu, grid, Tensor } from "../device.ts";

const MIN_TEMPERATURE = 1e-6;

// Threads per row: one thread walks a tiny vocabulary alone, 64 for small ones, where barriers
// dominate on llvmpipe, else 256.
function threadsPerRow(V: number): number {
  return V <= 256 ? 1 : V <= 4096 ? 64 : 256;
}

// With one thread per row a workgroup holds ROWS_PER_GROUP rows, one per invocation: the
// reductions have nothing to share and the draw scans its row whole, so that kernel declares no
// workgroup memory and no barriers (which make every invocation a coroutine on llvmpipe) and
// SIMD lanes take neighbouring rows: 5× faster on the default model's 128 rows of 97 logits.
// Its f32 operations are those of a one-thread workgroup, in the same order.
const ROWS_PER_GROUP = 64;

const sampleWgsl = (threads: number) => {
  const alone = threads === 1;
  // A reduction over the workgroup's threads; with one thread per row, the value itself.
  const reduce = (
    name: string,
    type: string,
    shared: string,
    op: (a: string, b: string) => string,
  ) =>
    alone ? `fn ${name}(lid: u32, x: ${type}) -> ${type} { return x; }` : `
fn ${name}(lid: u32, x: ${type}) -> ${type} {
  ${shared}[lid] = x;
  for (var k = WG / 2u; k > 0u; k >>= 1u) {
    workgroupBarrier();
    if (lid < k) { ${shared}[lid] = ${op(`${shared}[lid]`, `${shared}[lid + k]`)}; }
  }
  let r = workgroupUniformLoad(&${shared}[0]);
  workgroupBarrier();
  return r;
}`;
  return /* wgsl */ `
const WG = ${threads}u;
struct Params { B: u32, V: u32, greedy: u32, topK: u32, seedLo: u32, seedHi: u32, step: u32,
                firstRow: u32, groupSize: u32, s: f32, topP: f32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read> done: array<i32>;
@group(0) @binding(3) var<storage, read_write> tokens: array<i32>;
@group(0) @binding(4) var<storage, read_write> logp: array<f32>;

${
    alone ? "" : `var<workgroup> redF: array<f32, WG>;
var<workgroup> red4: array<vec4f, WG>;
var<workgroup> redU: array<u32, WG>;
var<workgroup> rowDone: i32;
var<workgroup> allowedTotal: f32;`
  }
${reduce("reduceMax", "f32", "redF", (a, b) => `max(${a}, ${b})`)}
${reduce("reduceSum", "f32", "redF", (a, b) => `${a} + ${b}`)}
${reduce("reduceSum4", "vec4f", "red4", (a, b) => `${a} + ${b}`)}
${reduce("reduceMin", "u32", "redU", (a, b) => `min(${a}, ${b})`)}

// Order-preserving map from f32 to u32: a < b exactly when key(a) < key(b).
fn key(x: f32) -> u32 {
  let b = bitcast<u32>(x);
  return select(b | 0x80000000u, ~b, (b & 0x80000000u) != 0u);
}

// PCG hash (Jarzynski & Olano, "Hash Functions for GPU Rendering", 2020): a bijection on u32.
fn pcg(x: u32) -> u32 {
  let state = x * 747796405u + 2891336453u;
  let word = ((state >> ((state >> 28u) + 4u)) ^ state) * 277803737u;
  return (word >> 22u) ^ word;
}

// u in [0, 1) with 24 random bits, a function of (seed, step, firstRow + row) only.
fn uniform01(row: u32) -> f32 {
  let h = pcg(pcg(pcg(pcg(p.seedLo) ^ p.seedHi) ^ p.step) ^ (p.firstRow + row));
  return f32(h >> 8u) * (1.0 / 16777216.0);
}

// Component j: the total weight of the row's tokens whose key is ≥ lo + j·2^shift. A token weighs
// 1 (counting, for top-k) or exp(z − zMax) (its unnormalised probability, for top-p).
fn weightsAtLeast(lid: u32, base: u32, zMax: f32, lo: u32, shift: u32, byMass: bool) -> vec4f {
  var ge = vec4f(0.0);
  for (var v = lid; v < p.V; v += WG) {
    let x = logits[base + v];
    let k = key(x);
    if (k >= lo) {
      let w = select(1.0, exp(p.s * x - zMax), byMass);
      let digit = min((k - lo) >> shift, 3u);
      ge += select(vec4f(0.0), vec4f(w), vec4u(0u, 1u, 2u, 3u) <= vec4u(digit));
    }
  }
  return reduceSum4(lid, ge);
}

// The largest key t ≥ start such that the tokens with keys ≥ t weigh at least goal (the weight at
// start must reach goal). Each pass fixes the next two bits of t.
fn threshold(lid: u32, base: u32, zMax: f32, start: u32, byMass: bool, goal: f32) -> u32 {
  var t = start;
  for (var shift = 30i; shift >= 0i; shift -= 2i) {
    let ge = weightsAtLeast(lid, base, zMax, t, u32(shift), byMass);
    var digit = 0u;
    for (var j = 1u; j < 4u; j++) { if (ge[j] >= goal) { digit = j; } }
    t += digit << u32(shift);
  }
  return t;
}

// The allowed tokens are those whose key is ≥ the returned key; rowMass = Σ exp(z − zMax).
fn allowedFrom(lid: u32, base: u32, zMax: f32, rowMass: f32) -> u32 {
  var t = 0u;
  var mass = rowMass;
  if (p.topK > 0u && p.topK < p.V) {
    t = threshold(lid, base, zMax, 0u, false, f32(p.topK));
    mass = weightsAtLeast(lid, base, zMax, t, 30u, true).x;
  }
  if (p.topP < 1.0) { t = threshold(lid, base, zMax, t, true, p.topP * mass); }
  return t;
}

// exp(z − zMax) of token v when its key is ≥ t, else 0.
fn massOf(base: u32, v: u32, zMax: f32, t: u32) -> f32 {
  let x = logits[base + v];
  return select(0.0, exp(p.s * x - zMax), key(x) >= t);
}

// The first allowed token, in index order, at which the running mass exceeds u·(allowed mass).
${
    alone
      ? `fn draw(lid: u32, base: u32, zMax: f32, t: u32, u: f32) -> u32 {
  var total = 0.0;
  for (var v = 0u; v < p.V; v++) { total += massOf(base, v, zMax, t); }
  // Keep the goal strictly below the total even when u·total rounds up to it.
  let goal = min(u * total, bitcast<f32>(bitcast<u32>(total) - 1u));
  var pick = p.V;
  var run = 0.0;
  for (var v = 0u; v < p.V; v++) {
    let m = massOf(base, v, zMax, t);
    if (m > 0.0) { pick = v; }
    run += m;
    if (run > goal) { break; }
  }
  return pick;
}`
      : `// Thread lid walks the contiguous chunk [begin, end); one thread scans the chunk sums in order,
// so the running sum is one well-defined sequence of f32 additions.
fn draw(lid: u32, base: u32, zMax: f32, t: u32, u: f32) -> u32 {
  let chunk = (p.V + WG - 1u) / WG;
  let begin = min(lid * chunk, p.V);
  let end = min(begin + chunk, p.V);
  var local = 0.0;
  for (var v = begin; v < end; v++) { local += massOf(base, v, zMax, t); }
  redF[lid] = local;
  workgroupBarrier();
  if (lid == 0u) {
    var run = 0.0;
    for (var i = 0u; i < WG; i++) { run += redF[i]; redF[i] = run; }
    allowedTotal = run;
  }
  let total = workgroupUniformLoad(&allowedTotal); // ≥ 1: the max logit is always allowed
  let start = select(0.0, redF[max(lid, 1u) - 1u], lid > 0u);
  // Keep the goal strictly below the total even when u·total rounds up to it.
  let goal = min(u * total, bitcast<f32>(bitcast<u32>(total) - 1u));
  var pick = p.V;
  if (start <= goal && goal < redF[lid]) {
    local = 0.0;
    for (var v = begin; v < end; v++) {
      let m = massOf(base, v, zMax, t);
      if (m > 0.0) { pick = v; }
      local += m;
      if (start + local > goal) { break; }
    }
  }
  return reduceMin(lid, pick);
}`
  }

@compute @workgroup_size(${alone ? ROWS_PER_GROUP : threads})
fn main(${
    alone
      ? `@builtin(global_invocation_id) gid: vec3u, @builtin(num_workgroups) nwg: vec3u) {
  let lid = 0u;
  let b = gid.x + gid.y * nwg.x * ${ROWS_PER_GROUP}u;
  if (b >= p.B || done[b] != 0) { return; }`
      : `@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
        @builtin(local_invocation_index) lid: u32) {
  let b = wid.x + wid.y * nwg.x;
  if (b >= p.B) { return; }
  if (lid == 0u) { rowDone = done[b]; }
  if (workgroupUniformLoad(&rowDone) != 0) { return; }`
  }
  let base = (b / p.groupSize) * p.V;
  var m = -3.4e38;
  for (var v = lid; v < p.V; v += WG) { m = max(m, p.s * logits[base + v]); }
  let zMax = reduceMax(lid, m);
  var sum = 0.0;
  for (var v = lid; v < p.V; v += WG) { sum += exp(p.s * logits[base + v] - zMax); }
  let rowMass = reduceSum(lid, sum);
  var token: u32;
  if (p.greedy != 0u) {
    var first = p.V;
    for (var v = lid; v < p.V; v += WG) {
      if (p.s * logits[base + v] == zMax) { first = min(first, v); }
    }
    token = reduceMin(lid, first);
  } else {
    token = draw(lid, base, zMax, allowedFrom(lid, base, zMax, rowMass), uniform01(b));
  }
  if (lid == 0u) {
    tokens[b] = i32(token);
    logp[b] = p.s * logits[base + token] - (zMax + log(rowMass));
  }
}`;
};

export interface SampleOptions {
  /** 0 = greedy (argmax). */
  temperature: number;
  /** Keep the topK largest logits; 0 = all. */
  topK: number;
  /** Keep the smallest top set holding this probability mass; 1 = all. */
  topP: number;
  seed: number;
  /** The generation step; with seed and row it keys the random draw. */
  step: number;
  /** Row b draws as row firstRow + b (default 0): a batch split in calls draws as one. */
  firstRow?: number;
  /** Row b draws from row ⌊b / groupSize⌋ of logits (default 1: its own). */
  groupSize?: number;
}

/**
 * tokens[b] = a token drawn from row r = ⌊b / groupSize⌋ of logits; logp[b] = log softmax(
 * logits[r] / T)[token], untruncated (T = 1 when greedy). Rows with done[b] != 0 are left untouched.
 */
export function sample(
  gpu: Gpu,
  logits: Tensor,
  B: number,
  V: number,
  opts: SampleOptions,
  done: Tensor,
  tokens: Tensor,
  logp: Tensor,
): void {
  const { temperature, topK, topP, seed, step, firstRow = 0, groupSize = 1 } = opts;
  if (!(temperature >= 0)) {
    throw new AhaError(`sampling: temperature must be ≥ 0, got ${temperature}`);
  }
  if (!(Number.isInteger(topK) && topK >= 0)) {
    throw new AhaError(`sampling: top_k must be an integer ≥ 0, got ${topK}`);
  }
  if (!(topP > 0 && topP <= 1)) {
    throw new AhaError(`sampling: top_p must be in (0, 1], got ${topP}`);
  }
  const greedy = temperature === 0;
  const threads = threadsPerRow(V);
  const invTemperature = greedy ? 1 : 1 / Math.max(temperature, MIN_TEMPERATURE);
  gpu.dispatch(
    gpu.pipeline(sampleWgsl(threads), "sample"),
    grid(B, threads === 1 ? ROWS_PER_GROUP : 1),
    [logits, done, tokens, logp],
    [
      B,
      V,
      greedy ? 1 : 0,
      topK,
      seed >>> 0,
      Math.floor(seed / 2 ** 32) >>> 0,
      step >>> 0,
      firstRow >>> 0,
      groupSize,
    ],
    [invTemperature, topP],
  );
}

// After each sampled token, in one dispatch: record it and its log-prob at step s, mark rows
// that sampled an EOS as done, and make it the next step's input one position further on.
const AFTER_SAMPLE_WGSL = `
struct Params { B: u32, numEos: u32, s: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> sampled: array<i32>;
@group(0) @binding(2) var<storage, read> logp: array<f32>;
@group(0) @binding(3) var<storage, read> eos: array<i32>;
@group(0) @binding(4) var<storage, read_write> done: array<i32>;
@group(0) @binding(5) var<storage, read_write> outTokens: array<i32>;
@group(0) @binding(6) var<storage, read_write> outLogp: array<f32>;
@group(0) @binding(7) var<storage, read_write> ids: array<i32>;
@group(0) @binding(8) var<storage, read_write> positions: array<i32>;
@group(0) @binding(9) var<storage, read_write> kvLens: array<i32>;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3u) {
  let b = gid.x;
  if (b >= p.B) { return; }
  let token = sampled[b];
  for (var i = 0u; i < p.numEos; i++) {
    if (token == eos[i]) { done[b] = 1; }
  }
  outTokens[p.s * p.B + b] = token;
  outLogp[p.s * p.B + b] = logp[b];
  ids[b] = token;
  positions[b] += 1;
  kvLens[b] += 1;
}`;

/** The decode state afterSample reads and advances (gpu/generate.ts keeps it). */
export interface DecodeState {
  sampled: Tensor;
  logp: Tensor;
  eos: Tensor;
  done: Tensor;
  outTokens: Tensor;
  outLogp: Tensor;
  ids: Tensor;
  positions: Tensor;
  kvLens: Tensor;
}

/** Record decode step `s`'s tokens, mark finished rows, and step every row one position on. */
export function afterSample(
  gpu: Gpu,
  d: DecodeState,
  rows: number,
  numEos: number,
  s: number,
): void {
  gpu.dispatch(
    gpu.pipeline(AFTER_SAMPLE_WGSL, "after sample"),
    grid(rows, 64),
    [d.sampled, d.logp, d.eos, d.done, d.outTokens, d.outLogp, d.ids, d.positions, d.kvLens],
    [rows, numEos, s],
  );
}
