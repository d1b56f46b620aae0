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

// One invocation per rotated pair: first the q pairs [T, nH, D/2], then the k pairs
// [T, nKv, D/2]. With a cache, a k pair also stores its two rotated keys and the two values at
// the same places into the caches [B, capacity, nKv, D], at position kvLens[b] − Lq + i for
// token t = b·Lq + i (as writeKvCache does).
const qkShader = (vec4s: number, cache: boolean) => /* wgsl */ `
struct Params {
  T: u32, nH: u32, nKv: u32, D: u32, inverse: u32, Lq: u32, capacity: u32, pad: u32,
  invFreq: array<vec4<f32>, ${vec4s}>,
}
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> q: array<f32>;
@group(0) @binding(2) var<storage, read_write> k: array<f32>;
@group(0) @binding(3) var<storage, read> positions: array<i32>;
${
  cache
    ? `@group(0) @binding(4) var<storage, read> v: array<f32>;
@group(0) @binding(5) var<storage, read> kvLens: array<i32>;
@group(0) @binding(6) var<storage, read_write> kCache: array<f32>;
@group(0) @binding(7) var<storage, read_write> vCache: array<f32>;`
    : ""
}

fn rotate(x1: f32, x2: f32, angle: f32) -> vec2f {
  let c = cos(angle);
  let s = select(sin(angle), -sin(angle), p.inverse != 0u);
  return vec2f(x1 * c - x2 * s, x2 * c + x1 * s);
}

@compute @workgroup_size(${WG})
fn main(@builtin(global_invocation_id) gid: vec3u, @builtin(num_workgroups) nwg: vec3u) {
  let n = gid.x + gid.y * nwg.x * ${WG}u;
  let half = p.D / 2u;
  let qPairs = p.T * p.nH * half;
  if (n < qPairs) {
    let head = n / half;       // t * nH + h
    let i = n - head * half;
    let at = head * p.D + i;
    let r = rotate(q[at], q[at + half], f32(positions[head / p.nH]) * p.invFreq[i / 4u][i % 4u]);
    q[at] = r.x;
    q[at + half] = r.y;
    return;
  }
  let m = n - qPairs;
  if (m >= p.T * p.nKv * half) { return; }
  let head = m / half;         // t * nKv + h
  let i = m - head * half;
  let at = head * p.D + i;
  let t = head / p.nKv;
  let r = rotate(k[at], k[at + half], f32(positions[t]) * p.invFreq[i / 4u][i % 4u]);
  k[at] = r.x;
  k[at + half] = r.y;
  ${
  cache
    ? `let b = t / p.Lq;
  let pos = kvLens[b] - i32(p.Lq) + i32(t % p.Lq);
  if (pos < 0 || pos >= i32(p.capacity)) { return; }
  let rowSize = p.nKv * p.D;
  let to = (b * p.capacity + u32(pos)) * rowSize + (head % p.nKv) * p.D + i;
  kCache[to] = r.x;
  kCache[to + half] = r.y;
  vCache[to] = v[at];
  vCache[to + half] = v[at + half];`
    : ""
}
}`;

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
  gpu.dispatch(
    gpu.pipeline(qkShader(vec4s, cache !== undefined), "rope q k"),
    grid((T * (nH + nKv) * headDim) / 2, WG),
    tensors,
    [T, nH, nKv, headDim, inverse ? 1 : 0, cache?.shape.Lq ?? 1, cache?.shape.capacity ?? 0, 0],
    Array.from(invFreq),
  );
}
