// Rotary position embedding, in place on x [T, heads, D], in Hugging Face Qwen2's rotate-half
// form: pair i < D/2 of a head is (x[i], x[i + D/2]), rotated by angle = positions[t]·inv_freq[i].
// inv_freq[i] = 1/theta^(2i/D) is computed on the CPU exactly as HF does in f32 (the GPU's pow
// is ~10 ulp off, which at position 4000 moves an angle by ~3e-3) and passed in the uniform;
// the angle is the f32 product, as in HF. The inverse rotation (−angle) is the backward.
// `ropeQk` rotates q and k in one dispatch and, in generation, writes the rotated keys and the
// values into the KV cache in the same pass (one dispatch where four were).

import { type Gpu, grid, type Tensor } from "../device.ts";
import type { AttentionShape } from "./attention.ts";

const WG = 256;

// invFreq packs D/2 values into vec4s, so the shader is specialised per head size. The four
// u32 fields put it at byte 16, where dispatch() writes the f32 values.
const shader = (vec4s: number) => /* wgsl */ `
struct Params { T: u32, heads: u32, D: u32, inverse: u32, invFreq: array<vec4<f32>, ${vec4s}> }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;
@group(0) @binding(2) var<storage, read> positions: array<i32>;

@compute @workgroup_size(${WG})
fn main(@builtin(global_invocation_id) gid: vec3u, @builtin(num_workgroups) nwg: vec3u) {
  let k = gid.x + gid.y * nwg.x * ${WG}u;
  let half = p.D / 2u;
  if (k >= p.T * p.heads * half) { return; }
  let head = k / half;       // t * heads + h
  let i = k - head * half;
  let angle = f32(positions[head / p.heads]) * p.invFreq[i / 4u][i % 4u];
  let c = cos(angle);
  let s = select(sin(angle), -sin(angle), p.inverse != 0u);
  let at = head * p.D + i;
  let x1 = x[at];
  let x2 = x[at + half];
  x[at] = x1 * c - x2 * s;
  x[at + half] = x2 * c + x1 * s;
}`;

/** HF's inv_freq in f32: 1 / theta^(float(2i) / D) for i < D/2. */
function ropeInvFreq(headDim: number, theta: number): Float32Array {
  const f = Math.fround;
  return Float32Array.from(
    { length: headDim / 2 },
    (_, i) => f(1 / f(Math.pow(theta, f((2 * i) / headDim)))),
  );
}

/** Rotate the first T tokens of x [T, heads, headDim] in place; inverse = the backward. */
export function rope(
  gpu: Gpu,
  x: Tensor,
  positions: Tensor,
  T: number,
  heads: number,
  headDim: number,
  theta: number,
  inverse = false,
): void {
  const vec4s = Math.ceil(headDim / 8);
  const invFreq = new Float32Array(vec4s * 4);
  invFreq.set(ropeInvFreq(headDim, theta));
  gpu.dispatch(
    gpu.pipeline(shader(vec4s), "rope"),
    grid((T * heads * headDim) / 2, WG),
    [x, positions],
    [T, heads, headDim, inverse ? 1 : 0],
    Array.from(invFreq),
  );
}

// One invocation per rotated pair, or per four consecutive pairs as vec4s when D/2 is a
// multiple of 4 (on llvmpipe a vec4 load costs about a scalar's): first the q pairs
// [T, nH, D/2], then the k pairs [T, nKv, D/2]. With a cache, a k pair also stores its two
// rotated keys and the two values at the same places into the caches [B, capacity, nKv, D], at
// position kvLens[b] − Lq + i for token t = b·Lq + i (as writeKvCache does). cos and sin of a
// vec4 are the scalar functions lane by lane, so both forms give the same bits.
const qkShader = (vec4s: number, cache: boolean, vec: boolean) => {
  const type = vec ? "vec4f" : "f32";
  const per = vec ? 4 : 1; // pairs per invocation
  const freq = vec ? "p.invFreq[i / 4u]" : "p.invFreq[i / 4u][i % 4u]";
  // Element `at` of a buffer bound as `type` (at is a multiple of 4 in the vec4 form).
  const el = (at: string) => (vec ? `(${at}) / 4u` : at);
  return /* wgsl */ `
struct Params {
  T: u32, nH: u32, nKv: u32, D: u32, inverse: u32, Lq: u32, capacity: u32, pad: u32,
  invFreq: array<vec4<f32>, ${vec4s}>,
}
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> q: array<${type}>;
@group(0) @binding(2) var<storage, read_write> k: array<${type}>;
@group(0) @binding(3) var<storage, read> positions: array<i32>;
${
    cache
      ? `@group(0) @binding(4) var<storage, read> v: array<${type}>;
@group(0) @binding(5) var<storage, read> kvLens: array<i32>;
@group(0) @binding(6) var<storage, read_write> kCache: array<${type}>;
@group(0) @binding(7) var<storage, read_write> vCache: array<${type}>;`
      : ""
  }

struct Pair { x1: ${type}, x2: ${type} }

fn rotate(x1: ${type}, x2: ${type}, angle: ${type}) -> Pair {
  let c = cos(angle);
  let s = select(sin(angle), -sin(angle), p.inverse != 0u);
  return Pair(x1 * c - x2 * s, x2 * c + x1 * s);
}

@compute @workgroup_size(${WG})
fn main(@builtin(global_invocation_id) gid: vec3u, @builtin(num_workgroups) nwg: vec3u) {
  let n = gid.x + gid.y * nwg.x * ${WG}u;
  let half = p.D / 2u;
  let groups = half / ${per}u; // invocations per head
  let qGroups = p.T * p.nH * groups;
  if (n < qGroups) {
    let head = n / groups;       // t * nH + h
    let i = (n - head * groups) * ${per}u;
    let at = head * p.D + i;
    let r = rotate(q[${el("at")}], q[${el("at + half")}], f32(positions[head / p.nH]) * ${freq});
    q[${el("at")}] = r.x1;
    q[${el("at + half")}] = r.x2;
    return;
  }
  let m = n - qGroups;
  if (m >= p.T * p.nKv * groups) { return; }
  let head = m / groups;         // t * nKv + h
  let i = (m - head * groups) * ${per}u;
  let at = head * p.D + i;
  let t = head / p.nKv;
  let r = rotate(k[${el("at")}], k[${el("at + half")}], f32(positions[t]) * ${freq});
  k[${el("at")}] = r.x1;
  k[${el("at + half")}] = r.x2;
  ${
    cache
      ? `let b = t / p.Lq;
  let pos = kvLens[b] - i32(p.Lq) + i32(t % p.Lq);
  if (pos < 0 || pos >= i32(p.capacity)) { return; }
  let rowSize = p.nKv * p.D;
  let to = (b * p.capacity + u32(pos)) * rowSize + (head % p.nKv) * p.D + i;
  kCache[${el("to")}] = r.x1;
  kCache[${el("to + half")}] = r.x2;
  vCache[${el("to")}] = v[${el("at")}];
  vCache[${el("to + half")}] = v[${el("at + half")}];`
      : ""
  }
}`;
};

/** Where ropeQk also writes the rotated keys and the values (generation). */
export interface RopeCache {
  v: Tensor; // [T, nKv·D]
  kvLens: Tensor; // i32 [B]
  k: Tensor; // [B, capacity, nKv, D]
  vCache: Tensor;
  shape: AttentionShape;
}

/**
 * rope() of q [T, nH, D] and k [T, nKv, D] in one dispatch (inverse = the backward); with
 * `cache`, also writeKvCache() of the rotated k and of v.
 */
export function ropeQk(
  gpu: Gpu,
  q: Tensor,
  k: Tensor,
  positions: Tensor,
  T: number,
  nH: number,
  nKv: number,
  headDim: number,
  theta: number,
  inverse = false,
  cache?: RopeCache,
): void {
  const vec4s = Math.ceil(headDim / 8);
  const invFreq = new Float32Array(vec4s * 4);
  invFreq.set(ropeInvFreq(headDim, theta));
  const tensors = cache
    ? [q, k, positions, cache.v, cache.kvLens, cache.k, cache.vCache]
    : [q, k, positions];
  const vec = (headDim / 2) % 4 === 0;
  gpu.dispatch(
    gpu.pipeline(qkShader(vec4s, cache !== undefined, vec), "rope q k"),
    grid((T * (nH + nKv) * headDim) / (vec ? 8 : 2), WG),
    tensors,
    [T, nH, nKv, headDim, inverse ? 1 : 0, cache?.shape.Lq ?? 1, cache?.shape.capacity ?? 0, 0],
    Array.from(invFreq),
  );
}
