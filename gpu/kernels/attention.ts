// Causal grouped-query attention: forward (saving log-sum-exp), backward, and the KV-cache write
// used during generation.
//
// Layouts: q, out, dOut [B, Lq, nHeads, D]; k, v (the cache) [B, capacity, nKvHeads, D] with
// kvLens[b] valid keys. Query i of row b sits at position kvLens[b] − Lq + i and sees the keys
// j ≤ that position; query head h reads kv head h / (nHeads / nKvHeads). Training uses
// Lq = capacity = kvLens = L; generation uses a larger capacity and Lq = prompt length (prefill)
// or 1 (decode). A query with no visible key (kvLens[b] < Lq) gets out 0, lse 0 and no gradient.
//
// Every kernel gives one invocation a whole head-sized vector and loops over the other axis in
// registers, without workgroup memory or barriers (expensive on llvmpipe):
//   forward  one invocation per (b, i, h): online softmax over the keys, out and lse;
//   dq       one invocation per (b, i, h): delta = dOut·out, then dq = scale Σ_j ds_ij k_j;
//   dk, dv   one invocation per (b, j, kv head): sums over the group's query heads and the
//            queries that see key j, in fixed order, recomputing p = exp(s − lse). Deterministic.
// Head vectors held in private arrays make the first compile slow (llvmpipe, cold cache: ~2 s
// CPU for D = 64, ~13 s for D = 128) but run about twice as fast as reloading them. On CPU
// adapters the operands each invocation streams (keys and values in the forward and dq, queries
// and dOut in dk/dv) are read from texture copies (`textured`) when they are read often enough,
// as the matmul does: a texel fetch is a gather, a storage load a loop over the SIMD lanes
// (forward+backward of 2 rows × 420 tokens, 14/2 heads of 64: 1,037 → 505 ms on llvmpipe).
//
// Rows may hold several sequences end to end (a packed batch: `segments`): each position then
// also carries its sequence's [start, end) positions, a query sees the keys from its sequence's
// start to itself, and a key the queries from itself to its sequence's end (the flash kernel
// stages keys from its first query's sequence start). Each kernel takes the bounds as one more
// binding, in a variant of its own, so unpacked rows load nothing more.
//
// Generation's cache may be kept in 16 bits (kv_cache_dtype): bf16 or f16, two values packed in
// a u32 (D is even, so a head vector is whole words). writeKvCache rounds to nearest on the way
// in; the forward kernel widens on load (bf16 by shift + bitcast, f16 by unpack2x16float — core
// WGSL, so neither needs shader-f16) and computes in f32 as before.
//
// Hardware GPUs get a FlashAttention-style forward instead ("flash"): a workgroup owns 64
// consecutive queries of one (row, head), stages blocks of keys and values in workgroup memory
// once for all of them, and each invocation runs the same online softmax over the staged block.
// `attentionKernel` chooses; AHA_ATTENTION=flash|streaming or the `kernel` argument forces it.
// Its speed on a GPU is not measured yet; the backward is the streaming one on every adapter.

import { AhaError } from "../../core/errors.ts";
import { type Gpu, grid, type Tensor, texelLoad, textureDecl } from "../device.ts";
import type { KeptTextures } from "../kept_textures.ts";

/** How the KV cache is stored. */
export type KvDtype = "f32" | "bf16" | "f16";

export interface AttentionShape {
  B: number;
  Lq: number;
  capacity: number;
  nHeads: number;
  nKvHeads: number;
  headDim: number;
}

const WG = 64;
const chunkWidth = (D: number) => D % 4 === 0 ? 4 : 2;

// Shared by the three attention kernels: parameters, the head vector as C chunks of vec4 (vec2
// when the head size is not a multiple of 4; it is always even), the flat invocation index and
// the first position of row b's queries. Chunks let llvmpipe load and multiply 4 floats at once.
const header = (D: number) => `
struct Params { B: u32, Lq: u32, capacity: u32, nHeads: u32, nKvHeads: u32, scale: f32 }
@group(0) @binding(0) var<uniform> p: Params;
alias Chunk = vec${chunkWidth(D)}f;
const C = ${D / chunkWidth(D)}u;
fn flatIndex(gid: vec3u, nwg: vec3u) -> u32 { return gid.x + gid.y * nwg.x * ${WG}u; }
fn firstQueryPos(b: u32) -> i32 { return kvLens[b] - i32(p.Lq); }
`;

// The segments binding of a packed batch's kernels: (start, end) of each key position's sequence.
const segmentsBinding = (binding: number, segmented: boolean) =>
  segmented ? `@group(0) @binding(${binding}) var<storage, read> segments: array<vec2i>;` : "";

// The first key a query at position `position` of row b sees: its sequence's start, or 0.
const firstKey = (segmented: boolean, position = "last") =>
  segmented ? `segments[b * p.capacity + u32(max(${position}, 0))].x` : "0";

/**
 * The kernel with the named Chunk bindings read from texture copies (`Gpu.textureCopy`, a vec4
 * chunk per texel) instead of storage: on CPU adapters a texel fetch is a gather where a storage
 * load is a loop over the SIMD lanes, and in training and prefill every key (dq, the forward) or
 * query (dk, dv) is read by many invocations.
 */
function textured(wgsl: string, names: string[]): string {
  for (const name of names) {
    wgsl = wgsl
      .replace(
        new RegExp(`var<storage, read> ${name}: array<Chunk>;`),
        textureDecl(name),
      )
      .replace(
        new RegExp(`\\b${name}\\[([^\\]]+)\\]`, "g"),
        (_, i) => texelLoad(name, i),
      );
  }
  return wgsl;
}

/**
 * Whether attention reads its streamed operands from texture copies: with f32 vec4 chunks, on
 * software adapters (`Gpu.textureInputs`), whatever the shape. gallivm loads storage one lane
 * at a time; on an AMD Zen 3 even the default model's decode step gains (128 rows over 13
 * cached tokens: 1.2 → 0.65 ms), a 0.5B-shaped one over 600 cached tokens 66 → 10 ms.
 * `forced` (tests) decides otherwise.
 */
function useTextures(gpu: Gpu, k: Tensor, s: AttentionShape, forced?: boolean): boolean {
  if (cacheDtype(k) !== "f32" || chunkWidth(s.headDim) !== 4) return false;
  return forced ?? gpu.textureInputs !== "never";
}

/**
 * A 16-bit cache's declarations and loads: each Chunk (vec4f or vec2f) is 2 or 1 packed words,
 * so chunk indices stay as they are.
 */
function cacheLoads(kv: "bf16" | "f16", D: number): string {
  const four = chunkWidth(D) === 4, word = four ? "vec2u" : "u32";
  const widen = kv === "bf16"
    ? (w: string) => `bitcast<vec2f>(vec2u(${w} << 16u, ${w} & 0xffff0000u))`
    : (w: string) => `unpack2x16float(${w})`;
  const body = four ? `vec4f(${widen("w.x")}, ${widen("w.y")})` : widen("w");
  return `
@group(0) @binding(2) var<storage, read> k: array<${word}>;
@group(0) @binding(3) var<storage, read> v: array<${word}>;
fn loadK(i: u32) -> Chunk { let w = k[i]; return ${body}; }
fn loadV(i: u32) -> Chunk { let w = v[i]; return ${body}; }`;
}

const forwardWgsl = (D: number, kv: KvDtype = "f32", segmented = false) => {
  const wgsl = forwardF32Wgsl(D, segmented);
  if (kv === "f32") return wgsl;
  return wgsl
    .replace(
      /@group\(0\) @binding\(2\)[^\n]*\n@group\(0\) @binding\(3\)[^\n]*/,
      cacheLoads(kv, D).trim(),
    )
    .replace("dot(qs[d], k[kv + d])", "dot(qs[d], loadK(kv + d))")
    .replace("w * v[kv + d]", "w * loadV(kv + d)");
};

const forwardF32Wgsl = (D: number, segmented: boolean) =>
  header(D) + `
@group(0) @binding(1) var<storage, read> q: array<Chunk>;
@group(0) @binding(2) var<storage, read> k: array<Chunk>;
@group(0) @binding(3) var<storage, read> v: array<Chunk>;
@group(0) @binding(4) var<storage, read> kvLens: array<i32>;
@group(0) @binding(5) var<storage, read_write> out: array<Chunk>;
@group(0) @binding(6) var<storage, read_write> lse: array<f32>;
${segmentsBinding(7, segmented)}

@compute @workgroup_size(${WG})
fn main(@builtin(global_invocation_id) gid: vec3u, @builtin(num_workgroups) nwg: vec3u) {
  let n = flatIndex(gid, nwg);                     // n = (b·Lq + i)·nHeads + h
  if (n >= p.B * p.Lq * p.nHeads) { return; }
  let h = n % p.nHeads;
  let i = (n / p.nHeads) % p.Lq;
  let b = n / (p.nHeads * p.Lq);
  let kvh = h / (p.nHeads / p.nKvHeads);
  let last = min(firstQueryPos(b) + i32(i), i32(p.capacity) - 1);  // last visible key

  var qs: array<Chunk, C>;                         // the query, pre-scaled
  var acc: array<Chunk, C>;                        // Σ_j exp(s_j − m)·v_j
  for (var d = 0u; d < C; d++) { qs[d] = q[n * C + d] * p.scale; acc[d] = Chunk(); }
  var m = -3.0e38;                                 // running max of the scores
  var l = 0.0;                                     // Σ_j exp(s_j − m)
  for (var j = ${firstKey(segmented)}; j <= last; j++) {
    let kv = ((b * p.capacity + u32(j)) * p.nKvHeads + kvh) * C;
    var s = 0.0;
    for (var d = 0u; d < C; d++) { s += dot(qs[d], k[kv + d]); }
    let mNew = max(m, s);
    let correction = exp(m - mNew);
    let w = exp(s - mNew);
    l = l * correction + w;
    for (var d = 0u; d < C; d++) { acc[d] = acc[d] * correction + w * v[kv + d]; }
    m = mNew;
  }
  let invL = select(0.0, 1.0 / l, l > 0.0);
  for (var d = 0u; d < C; d++) { out[n * C + d] = acc[d] * invL; }
  lse[(b * p.nHeads + h) * p.Lq + i] = select(0.0, m + log(l), l > 0.0);
}`;

const dqWgsl = (D: number, segmented: boolean) =>
  header(D) + `
@group(0) @binding(1) var<storage, read> q: array<Chunk>;
@group(0) @binding(2) var<storage, read> k: array<Chunk>;
@group(0) @binding(3) var<storage, read> v: array<Chunk>;
@group(0) @binding(4) var<storage, read> kvLens: array<i32>;
@group(0) @binding(5) var<storage, read> out: array<Chunk>;
@group(0) @binding(6) var<storage, read> lse: array<f32>;
@group(0) @binding(7) var<storage, read> dOut: array<Chunk>;
@group(0) @binding(8) var<storage, read_write> dq: array<Chunk>;
@group(0) @binding(9) var<storage, read_write> delta: array<f32>;
${segmentsBinding(10, segmented)}

@compute @workgroup_size(${WG})
fn main(@builtin(global_invocation_id) gid: vec3u, @builtin(num_workgroups) nwg: vec3u) {
  let n = flatIndex(gid, nwg);                     // n = (b·Lq + i)·nHeads + h
  if (n >= p.B * p.Lq * p.nHeads) { return; }
  let h = n % p.nHeads;
  let i = (n / p.nHeads) % p.Lq;
  let b = n / (p.nHeads * p.Lq);
  let kvh = h / (p.nHeads / p.nKvHeads);
  let last = min(firstQueryPos(b) + i32(i), i32(p.capacity) - 1);
  let rowLse = lse[(b * p.nHeads + h) * p.Lq + i];

  var qs: array<Chunk, C>;
  var dO: array<Chunk, C>;
  var acc: array<Chunk, C>;                        // Σ_j ds_j·k_j
  var dlt = 0.0;                                   // delta = dOut·out = Σ_j p_j·(dOut·v_j)
  for (var d = 0u; d < C; d++) {
    qs[d] = q[n * C + d] * p.scale;
    dO[d] = dOut[n * C + d];
    acc[d] = Chunk();
    dlt += dot(dO[d], out[n * C + d]);
  }
  for (var j = ${firstKey(segmented)}; j <= last; j++) {
    let kv = ((b * p.capacity + u32(j)) * p.nKvHeads + kvh) * C;
    var kj: array<Chunk, C>;                       // the key, loaded once for both loops
    var s = 0.0;
    var dp = 0.0;
    for (var d = 0u; d < C; d++) {
      kj[d] = k[kv + d];
      s += dot(qs[d], kj[d]);
      dp += dot(dO[d], v[kv + d]);
    }
    let ds = exp(s - rowLse) * (dp - dlt);
    for (var d = 0u; d < C; d++) { acc[d] += ds * kj[d]; }
  }
  for (var d = 0u; d < C; d++) { dq[n * C + d] = acc[d] * p.scale; }
  delta[(b * p.nHeads + h) * p.Lq + i] = dlt;
}`;

const dkdvWgsl = (D: number, segmented: boolean) =>
  header(D) + `
@group(0) @binding(1) var<storage, read> q: array<Chunk>;
@group(0) @binding(2) var<storage, read> k: array<Chunk>;
@group(0) @binding(3) var<storage, read> v: array<Chunk>;
@group(0) @binding(4) var<storage, read> kvLens: array<i32>;
@group(0) @binding(5) var<storage, read> lse: array<f32>;
@group(0) @binding(6) var<storage, read> delta: array<f32>;
@group(0) @binding(7) var<storage, read> dOut: array<Chunk>;
@group(0) @binding(8) var<storage, read_write> dk: array<Chunk>;
@group(0) @binding(9) var<storage, read_write> dv: array<Chunk>;
${segmentsBinding(10, segmented)}

@compute @workgroup_size(${WG})
fn main(@builtin(global_invocation_id) gid: vec3u, @builtin(num_workgroups) nwg: vec3u) {
  let n = flatIndex(gid, nwg);                     // n = (b·capacity + j)·nKvHeads + kvh
  if (n >= p.B * p.capacity * p.nKvHeads) { return; }
  let kvh = n % p.nKvHeads;
  let j = (n / p.nKvHeads) % p.capacity;
  let b = n / (p.nKvHeads * p.capacity);
  let group = p.nHeads / p.nKvHeads;

  var ks: array<Chunk, C>;                         // the key, pre-scaled
  var vj: array<Chunk, C>;
  var dkAcc: array<Chunk, C>;                      // Σ ds·q
  var dvAcc: array<Chunk, C>;                      // Σ p·dOut
  for (var d = 0u; d < C; d++) {
    ks[d] = k[n * C + d] * p.scale;
    vj[d] = v[n * C + d];
    dkAcc[d] = Chunk();
    dvAcc[d] = Chunk();
  }
  // Queries i with position firstQueryPos(b) + i ≥ j see this key (none when j ≥ kvLens[b]),
  // up to the end of the key's sequence in a packed row.
  let firstPos = firstQueryPos(b);
  let iStart = u32(max(i32(j) - firstPos, 0));
  let iEnd = ${
    segmented ? "u32(clamp(segments[b * p.capacity + j].y - firstPos, 0, i32(p.Lq)))" : "p.Lq"
  };
  for (var h = kvh * group; h < (kvh + 1u) * group; h++) {
    for (var i = iStart; i < iEnd; i++) {
      let qo = ((b * p.Lq + i) * p.nHeads + h) * C;
      let row = (b * p.nHeads + h) * p.Lq + i;
      var qi: array<Chunk, C>;                     // the query and its dOut, loaded once
      var dOi: array<Chunk, C>;
      var s = 0.0;
      var dp = 0.0;
      for (var d = 0u; d < C; d++) {
        qi[d] = q[qo + d];
        dOi[d] = dOut[qo + d];
        s += dot(ks[d], qi[d]);
        dp += dot(dOi[d], vj[d]);
      }
      let prob = exp(s - lse[row]);
      let ds = prob * (dp - delta[row]);
      for (var d = 0u; d < C; d++) {
        dkAcc[d] += ds * qi[d];
        dvAcc[d] += prob * dOi[d];
      }
    }
  }
  for (var d = 0u; d < C; d++) {
    dk[n * C + d] = dkAcc[d] * p.scale;
    dv[n * C + d] = dvAcc[d];
  }
}`;

/** Queries per workgroup of the flash forward, and keys per staged block for head size D. */
const FLASH_QUERIES = 64;
const flashKeys = (D: number) => Math.max(1, Math.min(64, Math.floor(16384 / (2 * 4 * D))));

const flashForwardWgsl = (D: number, segmented: boolean) =>
  header(D) + `
@group(0) @binding(1) var<storage, read> q: array<Chunk>;
@group(0) @binding(2) var<storage, read> k: array<Chunk>;
@group(0) @binding(3) var<storage, read> v: array<Chunk>;
@group(0) @binding(4) var<storage, read> kvLens: array<i32>;
@group(0) @binding(5) var<storage, read_write> out: array<Chunk>;
@group(0) @binding(6) var<storage, read_write> lse: array<f32>;
${segmentsBinding(7, segmented)}

const BK = ${flashKeys(D)}u;
var<workgroup> Ks: array<Chunk, ${flashKeys(D) * (D / chunkWidth(D))}>;
var<workgroup> Vs: array<Chunk, ${flashKeys(D) * (D / chunkWidth(D))}>;
var<workgroup> blockLast: i32;
var<workgroup> blockFirst: i32;

@compute @workgroup_size(${FLASH_QUERIES})
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
        @builtin(local_invocation_index) lid: u32) {
  // Workgroup w = ((b·nHeads + h)·blocks + qb); invocation lid is query qb·64 + lid.
  let blocks = (p.Lq + ${FLASH_QUERIES - 1}u) / ${FLASH_QUERIES}u;
  let w = wid.x + wid.y * nwg.x;
  if (w >= p.B * p.nHeads * blocks) { return; }    // uniform: the whole workgroup leaves
  let qb = w % blocks;
  let h = (w / blocks) % p.nHeads;
  let b = w / (blocks * p.nHeads);
  let kvh = h / (p.nHeads / p.nKvHeads);
  let i = qb * ${FLASH_QUERIES}u + lid;
  let isQuery = i < p.Lq;
  let last = min(firstQueryPos(b) + i32(min(i, p.Lq - 1u)), i32(p.capacity) - 1);
  // The block's last visible key: that of its last query; in a packed row its first visible
  // key is where its first query's sequence starts.
  if (lid == 0u) {
    let lastQuery = min(qb * ${FLASH_QUERIES}u + ${FLASH_QUERIES - 1}u, p.Lq - 1u);
    blockLast = min(firstQueryPos(b) + i32(lastQuery), i32(p.capacity) - 1);
    let firstPosition = min(firstQueryPos(b) + i32(qb * ${FLASH_QUERIES}u), i32(p.capacity) - 1);
    blockFirst = ${firstKey(segmented, "firstPosition")};
  }
  let keysEnd = workgroupUniformLoad(&blockLast) + 1;
  let keysStart = workgroupUniformLoad(&blockFirst);
  let firstSeen = ${firstKey(segmented)};             // this query's first visible key
  let n = (b * p.Lq + min(i, p.Lq - 1u)) * p.nHeads + h;

  var qs: array<Chunk, C>;
  var acc: array<Chunk, C>;
  for (var d = 0u; d < C; d++) { qs[d] = q[n * C + d] * p.scale; acc[d] = Chunk(); }
  var m = -3.0e38;
  var l = 0.0;
  for (var j0 = keysStart; j0 < keysEnd; j0 += i32(BK)) {
    // Stage keys j0 .. j0+BK-1 (those past keysEnd as zeros).
    for (var e = lid; e < BK * C; e += ${FLASH_QUERIES}u) {
      let j = j0 + i32(e / C);
      var kx = Chunk();
      var vx = Chunk();
      if (j < keysEnd) {
        let at = ((b * p.capacity + u32(j)) * p.nKvHeads + kvh) * C + e % C;
        kx = k[at];
        vx = v[at];
      }
      Ks[e] = kx;
      Vs[e] = vx;
    }
    workgroupBarrier();
    let visible = min(last - j0 + 1, i32(BK));      // keys of this block this query sees
    if (isQuery) {
      for (var jj = max(firstSeen - j0, 0); jj < visible; jj++) {
        var s = 0.0;
        for (var d = 0u; d < C; d++) { s += dot(qs[d], Ks[u32(jj) * C + d]); }
        let mNew = max(m, s);
        let correction = exp(m - mNew);
        let wj = exp(s - mNew);
        l = l * correction + wj;
        for (var d = 0u; d < C; d++) { acc[d] = acc[d] * correction + wj * Vs[u32(jj) * C + d]; }
        m = mNew;
      }
    }
    workgroupBarrier();
  }
  if (!isQuery) { return; }
  let invL = select(0.0, 1.0 / l, l > 0.0);
  for (var d = 0u; d < C; d++) { out[n * C + d] = acc[d] * invL; }
  lse[(b * p.nHeads + h) * p.Lq + i] = select(0.0, m + log(l), l > 0.0);
}`;

const writeKvCacheWgsl = `
struct Params { B: u32, Lq: u32, capacity: u32, rowSize: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> kNew: array<f32>;
@group(0) @binding(2) var<storage, read_write> cache: array<f32>;
@group(0) @binding(3) var<storage, read> kvLens: array<i32>;

@compute @workgroup_size(${WG})
fn main(@builtin(global_invocation_id) gid: vec3u, @builtin(num_workgroups) nwg: vec3u) {
  let n = gid.x + gid.y * nwg.x * ${WG}u;          // n = (b·Lq + i)·rowSize + c
  if (n >= p.B * p.Lq * p.rowSize) { return; }
  let c = n % p.rowSize;
  let i = (n / p.rowSize) % p.Lq;
  let b = n / (p.rowSize * p.Lq);
  let pos = kvLens[b] - i32(p.Lq) + i32(i);
  if (pos < 0 || pos >= i32(p.capacity)) { return; }
  cache[(b * p.capacity + u32(pos)) * p.rowSize + c] = kNew[n];
}`;

// The 16-bit cache: one invocation per pair of values (a row of nKvHeads·D values is whole words).
const writeKvCache16Wgsl = (kv: "bf16" | "f16") => `
struct Params { B: u32, Lq: u32, capacity: u32, rowWords: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> kNew: array<vec2f>;
@group(0) @binding(2) var<storage, read_write> cache: array<u32>;
@group(0) @binding(3) var<storage, read> kvLens: array<i32>;

// bf16 bits of x, rounded to nearest even.
fn bf16(x: f32) -> u32 {
  let u = bitcast<u32>(x);
  return (u + 0x7fffu + ((u >> 16u) & 1u)) >> 16u;
}

@compute @workgroup_size(${WG})
fn main(@builtin(global_invocation_id) gid: vec3u, @builtin(num_workgroups) nwg: vec3u) {
  let n = gid.x + gid.y * nwg.x * ${WG}u;          // n = (b·Lq + i)·rowWords + c
  if (n >= p.B * p.Lq * p.rowWords) { return; }
  let c = n % p.rowWords;
  let i = (n / p.rowWords) % p.Lq;
  let b = n / (p.rowWords * p.Lq);
  let pos = kvLens[b] - i32(p.Lq) + i32(i);
  if (pos < 0 || pos >= i32(p.capacity)) { return; }
  let x = kNew[n];
  cache[(b * p.capacity + u32(pos)) * p.rowWords + c] = ${
  kv === "bf16" ? "bf16(x.x) | (bf16(x.y) << 16u)" : "pack2x16float(x)"
};
}`;

function params(s: AttentionShape): [number[], number[]] {
  if (s.nHeads % s.nKvHeads !== 0 || s.headDim % 2 !== 0) {
    throw new Error(
      `attention: nHeads ${s.nHeads} must be a multiple of nKvHeads ${s.nKvHeads}, headDim ${s.headDim} even`,
    );
  }
  return [[s.B, s.Lq, s.capacity, s.nHeads, s.nKvHeads], [1 / Math.sqrt(s.headDim)]];
}

/** "streaming": one invocation per query, keys from global memory (CPU adapters); "flash". */
export type AttentionKernel = "streaming" | "flash";

let forcedKernel: AttentionKernel | null | undefined;

/** The forward kernel for an adapter: AHA_ATTENTION if set, else flash on hardware GPUs. */
export function attentionKernel(gpu: Gpu): AttentionKernel {
  if (forcedKernel === undefined) {
    let value: string | undefined;
    try {
      value = Deno.env.get("AHA_ATTENTION");
    } catch {
      value = undefined;
    }
    if (value !== undefined && value !== "" && value !== "flash" && value !== "streaming") {
      throw new AhaError(`AHA_ATTENTION must be "flash" or "streaming", got "${value}"`);
    }
    forcedKernel = (value || null) as AttentionKernel | null;
  }
  if (forcedKernel) return forcedKernel;
  return gpu.software ? "streaming" : "flash";
}

/**
 * The forward: out and lse from q over k and v. `segments` (a packed batch's rows, i32 pairs
 * [B, capacity, 2]): each key position's sequence as [start, end) positions. `kept`: k and v's
 * texture copies are kept there across calls (generation's caches, whose steps change a few
 * positions) rather than made at each call.
 */
export function attention(
  gpu: Gpu,
  q: Tensor,
  k: Tensor,
  v: Tensor,
  kvLens: Tensor,
  out: Tensor,
  lse: Tensor,
  s: AttentionShape,
  kernel: AttentionKernel = attentionKernel(gpu),
  textures?: boolean,
  segments?: Tensor,
  kept?: KeptTextures,
): void {
  const [u32s, f32s] = params(s);
  if (k.dtype !== v.dtype) throw new Error(`attention: k is ${k.dtype}, v ${v.dtype}`);
  const segmented = segments !== undefined;
  if (segmented && cacheDtype(k) !== "f32") throw new Error("attention: segments over a cache");
  const tensors = [q, k, v, kvLens, out, lse, ...(segments ? [segments] : [])];
  // The flash kernel reads an f32 cache; a 16-bit cache takes the streaming kernel.
  if (kernel === "flash" && cacheDtype(k) === "f32") {
    const pipeline = gpu.pipelineFor(
      `attention flash ${s.headDim} ${segmented}`,
      () => flashForwardWgsl(s.headDim, segmented),
      "attention flash",
    );
    const blocks = Math.ceil(s.Lq / FLASH_QUERIES);
    gpu.dispatch(pipeline, grid(s.B * s.nHeads * blocks, 1), tensors, u32s, f32s);
    return;
  }
  if (useTextures(gpu, k, s, textures)) {
    const kTexture = kept?.view(k) ?? gpu.textureCopy("attention k", k),
      vTexture = kept?.view(v) ?? gpu.textureCopy("attention v", v);
    if (kTexture && vTexture) {
      const pipeline = gpu.pipelineFor(
        `attention textured ${s.headDim} ${segmented}`,
        () => textured(forwardWgsl(s.headDim, "f32", segmented), ["k", "v"]),
        "attention",
      );
      const bound = [q, kTexture, vTexture, ...tensors.slice(3)];
      gpu.dispatch(pipeline, grid(s.B * s.Lq * s.nHeads, WG), bound, u32s, f32s);
      return;
    }
  }
  const pipeline = gpu.pipeline(forwardWgsl(s.headDim, cacheDtype(k), segmented), "attention");
  gpu.dispatch(pipeline, grid(s.B * s.Lq * s.nHeads, WG), tensors, u32s, f32s);
}

export function attentionBackward(
  gpu: Gpu,
  q: Tensor,
  k: Tensor,
  v: Tensor,
  kvLens: Tensor,
  out: Tensor,
  lse: Tensor,
  dOut: Tensor,
  dq: Tensor,
  dk: Tensor,
  dv: Tensor,
  s: AttentionShape,
  textures?: boolean,
  segments?: Tensor,
): void {
  const [u32s, f32s] = params(s);
  const segmented = segments !== undefined, bounds = segments ? [segments] : [];
  // dq's scratch delta [B, nHeads, Lq].
  const delta = gpu.scratch("attention delta", s.B * s.nHeads * s.Lq);
  // dq reads every key many times, dk and dv every query: from texture copies where that pays.
  const copy = (name: string, t: Tensor) =>
    useTextures(gpu, k, s, textures) ? gpu.textureCopy(`attention ${name}`, t) : null;
  const kTexture = copy("k", k), vTexture = copy("v", v);
  const dqTextured = kTexture !== null && vTexture !== null;
  gpu.dispatch(
    gpu.pipelineFor(
      `attention dq ${s.headDim} ${dqTextured} ${segmented}`,
      () => {
        const wgsl = dqWgsl(s.headDim, segmented);
        return dqTextured ? textured(wgsl, ["k", "v"]) : wgsl;
      },
      "attention dq",
    ),
    grid(s.B * s.Lq * s.nHeads, WG),
    [q, kTexture ?? k, vTexture ?? v, kvLens, out, lse, dOut, dq, delta, ...bounds],
    u32s,
    f32s,
  );
  const qTexture = copy("q", q), dOutTexture = copy("dOut", dOut);
  const dkdvTextured = qTexture !== null && dOutTexture !== null;
  gpu.dispatch(
    gpu.pipelineFor(
      `attention dk dv ${s.headDim} ${dkdvTextured} ${segmented}`,
      () => {
        const wgsl = dkdvWgsl(s.headDim, segmented);
        return dkdvTextured ? textured(wgsl, ["q", "dOut"]) : wgsl;
      },
      "attention dk dv",
    ),
    grid(s.B * s.capacity * s.nKvHeads, WG),
    [qTexture ?? q, k, v, kvLens, lse, delta, dOutTexture ?? dOut, dk, dv, ...bounds],
    u32s,
    f32s,
  );
}

/** How a key or value tensor is stored (training's own k and v are f32). */
function cacheDtype(t: Tensor): KvDtype {
  if (t.dtype === "f32" || t.dtype === "bf16" || t.dtype === "f16") return t.dtype;
  throw new Error(`attention: keys and values must be f32, bf16 or f16, got ${t.dtype}`);
}

/** Write this call's keys (or values) into the cache, rounded to the cache's dtype. */
export function writeKvCache(
  gpu: Gpu,
  kNew: Tensor,
  cache: Tensor,
  kvLens: Tensor,
  s: AttentionShape,
): void {
  const rowSize = s.nKvHeads * s.headDim, kv = cacheDtype(cache);
  if (kv !== "f32") {
    const rowWords = rowSize / 2;
    gpu.dispatch(
      gpu.pipeline(writeKvCache16Wgsl(kv), "write kv cache"),
      grid(s.B * s.Lq * rowWords, WG),
      [kNew, cache, kvLens],
      [s.B, s.Lq, s.capacity, rowWords],
    );
    return;
  }
  gpu.dispatch(
    gpu.pipeline(writeKvCacheWgsl, "write kv cache"),
    grid(s.B * s.Lq * rowSize, WG),
    [kNew, cache, kvLens],
    [s.B, s.Lq, s.capacity, rowSize],
  );
}

// Generation prefills each prompt once and then copies its cache row to the G rows of its group:
// row p of a prefill batch's cache goes to rows (first + p)·G … + G − 1 of the decode cache.
// Copied as 32-bit words, so an f32 and a packed 16-bit cache copy alike, bit for bit; by four
// words when a row is whole vec4s (each load on llvmpipe is a loop over the lanes).
const copyToGroupsWgsl = (word: "u32" | "vec4u") => `
struct Params { n: u32, rowWords: u32, usedWords: u32, G: u32, dstFirst: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<${word}>;
@group(0) @binding(2) var<storage, read_write> dst: array<${word}>;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3u, @builtin(num_workgroups) nwg: vec3u) {
  let i = gid.x + gid.y * nwg.x * 64u;             // i = row·usedWords + w
  if (i >= p.n) { return; }
  let row = i / p.usedWords;
  let w = i % p.usedWords;
  dst[p.dstFirst + row * p.rowWords + w] = src[(row / p.G) * p.rowWords + w];
}`;

/**
 * The first `positions` of rows 0…count−1 of `src` [P, capacity, …] to rows (first + p)·G + j
 * of `dst` [B, capacity, …]: a prompt's cache, which is all its rows hold before they decode.
 * The positions after it are left as they are: a decode step writes each before any query
 * reads it, so copying the whole capacity (a GSM8K row's is ~5× its prompt) would be stores
 * for nothing, and on llvmpipe every store is paid lane by lane.
 */
export function copyCacheToGroups(
  gpu: Gpu,
  src: Tensor,
  dst: Tensor,
  G: number,
  first: number,
  count: number,
  positions: number,
): void {
  if (src.dtype !== dst.dtype) throw new Error(`copyCacheToGroups: ${src.dtype} → ${dst.dtype}`);
  const [rows, capacity] = src.shape;
  const positionWords = src.bytes / (rows * capacity) / 4;
  if (!Number.isInteger(positionWords)) {
    throw new Error("copyCacheToGroups: positions of whole words");
  }
  const words = capacity * positionWords, width = words % 4 === 0 ? 4 : 1;
  const rowWords = words / width;
  // Whole vec4s: a few words past the last position are copied too, still inside the row.
  const usedWords = Math.min(
    rowWords,
    Math.ceil(Math.min(positions, capacity) * positionWords / width),
  );
  const n = count * G * usedWords;
  if (n === 0) return;
  gpu.dispatch(
    gpu.pipeline(copyToGroupsWgsl(width === 4 ? "vec4u" : "u32"), "copy to groups"),
    grid(n, 64),
    [src, dst],
    [n, rowWords, usedWords, G, first * G * rowWords],
  );
}

// ---- shared prompts (GpuModel.forwardShared) --------------------------------------------------
//
// A GRPO batch's rows come in groups that share one prompt. The training forward then computes
// each group's prompt once: its token list is every row's tail (the prompt's last token, then the
// completion but the row's last token; B rows of C) followed, from `prefixStart`, by every group's prefix (the prompt but
// its last token; G rows of P). The prefixes attend among themselves as ordinary rows; a tail
// row attends over a cache row [its group's Pg prefix keys, its own C keys], which assembleKv
// builds from the token list (rowPrefix[b] = (group, Pg)). In backward, attention's gradient for
// that cache row goes back by scatterKvGrads: a tail's own keys take theirs, and a prefix key
// adds the gradients of every row of its group (groupRows[g] = (first row, count)) to its own,
// in row order. Rows are copied as words (vec4 when a token's keys are whole vec4s).

const sharedWord = (vec: boolean) => vec ? "vec4f" : "f32";

const assembleKvWgsl = (vec: boolean) => `
struct Params { B: u32, C: u32, P: u32, capacity: u32, rowWords: u32, prefixStart: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> k: array<${sharedWord(vec)}>;
@group(0) @binding(2) var<storage, read> v: array<${sharedWord(vec)}>;
@group(0) @binding(3) var<storage, read> rowPrefix: array<vec2i>;
@group(0) @binding(4) var<storage, read_write> kCache: array<${sharedWord(vec)}>;
@group(0) @binding(5) var<storage, read_write> vCache: array<${sharedWord(vec)}>;

@compute @workgroup_size(${WG})
fn main(@builtin(global_invocation_id) gid: vec3u, @builtin(num_workgroups) nwg: vec3u) {
  let n = gid.x + gid.y * nwg.x * ${WG}u;          // n = (b·capacity + j)·rowWords + c
  if (n >= p.B * p.capacity * p.rowWords) { return; }
  let c = n % p.rowWords;
  let j = (n / p.rowWords) % p.capacity;
  let b = n / (p.rowWords * p.capacity);
  let group = u32(rowPrefix[b].x);
  let prefixLen = u32(rowPrefix[b].y);
  // Key j of the row: the group's prefix key j, its own tail key j − Pg, or nothing (zero).
  var token = 0u;
  var seen = true;
  if (j < prefixLen) {
    token = p.prefixStart + group * p.P + j;
  } else if (j - prefixLen < p.C) {
    token = b * p.C + j - prefixLen;
  } else {
    seen = false;
  }
  let at = token * p.rowWords + c;
  kCache[n] = select(${sharedWord(vec)}(), k[at], seen);
  vCache[n] = select(${sharedWord(vec)}(), v[at], seen);
}`;

/**
 * The cache rows [B, capacity, nKv·D] a shared-prompt batch's tails attend over, from the token
 * list's keys and values k, v [T, nKv·D] (see above): Pg prefix keys, then the row's C own.
 */
export function assembleKv(
  gpu: Gpu,
  k: Tensor,
  v: Tensor,
  rowPrefix: Tensor,
  kCache: Tensor,
  vCache: Tensor,
  s: { B: number; C: number; P: number; prefixStart: number; rowSize: number },
): void {
  const capacity = s.P + s.C, vec = s.rowSize % 4 === 0, rowWords = vec ? s.rowSize / 4 : s.rowSize;
  gpu.dispatch(
    gpu.pipeline(assembleKvWgsl(vec), "assemble kv"),
    grid(s.B * capacity * rowWords, WG),
    [k, v, rowPrefix, kCache, vCache],
    [s.B, s.C, s.P, capacity, rowWords, s.prefixStart],
  );
}

const scatterKvGradsWgsl = (vec: boolean) => `
struct Params { B: u32, C: u32, P: u32, capacity: u32, rowWords: u32, prefixStart: u32, T: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> dkCache: array<${sharedWord(vec)}>;
@group(0) @binding(2) var<storage, read> dvCache: array<${sharedWord(vec)}>;
@group(0) @binding(3) var<storage, read> rowPrefix: array<vec2i>;
@group(0) @binding(4) var<storage, read> groupRows: array<vec2i>;
@group(0) @binding(5) var<storage, read_write> dk: array<${sharedWord(vec)}>;
@group(0) @binding(6) var<storage, read_write> dv: array<${sharedWord(vec)}>;

@compute @workgroup_size(${WG})
fn main(@builtin(global_invocation_id) gid: vec3u, @builtin(num_workgroups) nwg: vec3u) {
  let n = gid.x + gid.y * nwg.x * ${WG}u;          // n = token·rowWords + c
  if (n >= p.T * p.rowWords) { return; }
  let c = n % p.rowWords;
  let token = n / p.rowWords;
  if (token < p.B * p.C) {
    // Tail key t of row b: cache position Pg + t of its row.
    let b = token / p.C;
    let at = (b * p.capacity + u32(rowPrefix[b].y) + token % p.C) * p.rowWords + c;
    dk[n] = dkCache[at];
    dv[n] = dvCache[at];
    return;
  }
  if (token < p.prefixStart) {                     // padding between tails and prefixes
    dk[n] = ${sharedWord(vec)}();
    dv[n] = ${sharedWord(vec)}();
    return;
  }
  // Prefix key j of group g: its own attention's gradient, plus each row's of the group.
  let g = (token - p.prefixStart) / p.P;
  let j = (token - p.prefixStart) % p.P;
  let rows = groupRows[g];
  var sk = dk[n];
  var sv = dv[n];
  if (j < u32(rowPrefix[rows.x].y)) {
    for (var r = u32(rows.x); r < u32(rows.x + rows.y); r++) {
      let at = (r * p.capacity + j) * p.rowWords + c;
      sk += dkCache[at];
      sv += dvCache[at];
    }
  }
  dk[n] = sk;
  dv[n] = sv;
}`;

/**
 * The backward of assembleKv: dk, dv [T, nKv·D] from the cache rows' gradients. A tail's keys
 * take their own; a prefix's keys add their group's rows' to what dk, dv hold (the prefixes'
 * own attention backward); padding gets zero.
 */
export function scatterKvGrads(
  gpu: Gpu,
  dkCache: Tensor,
  dvCache: Tensor,
  rowPrefix: Tensor,
  groupRows: Tensor,
  dk: Tensor,
  dv: Tensor,
  s: { B: number; C: number; P: number; prefixStart: number; rowSize: number; T: number },
): void {
  const capacity = s.P + s.C, vec = s.rowSize % 4 === 0, rowWords = vec ? s.rowSize / 4 : s.rowSize;
  gpu.dispatch(
    gpu.pipeline(scatterKvGradsWgsl(vec), "scatter kv grads"),
    grid(s.T * rowWords, WG),
    [dkCache, dvCache, rowPrefix, groupRows, dk, dv],
    [s.B, s.C, s.P, capacity, rowWords, s.prefixStart, s.T],
  );
}
