// Rotary position embedding, in place on x [T, heads, D], in Hugging Face Qwen2's rotate-half
// form: pair i < D/2 of a head is (x[i], x[i + D/2]), rotated by angle = positions[t]·inv_freq[i].
// inv_freq[i] = 1/theta^(2i/D) is computed on the CPU exactly as HF does in f32 (the GPU's pow
// is ~10 ulp off, which at position 4000 moves an angle by ~3e-3) and passed in the uniform;
// the angle is the f32 product, as in HF. The inverse rotation (−angle) is the backward.
// `ropeQkv` is the layer's form: q, k and v in one dispatch (below).

import { type Gpu, grid, Tensor, vec4Input } from "../device.ts";
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

// ropeQkv moves one layer's q, k and v from where the fused q/k/v product wrote them to where
// attention reads them, rotating q and k on the way (and back, in the backward): one dispatch
// where a rope per tensor, a copy of v and the KV-cache writes were. A side is either three
// tensors, q [T, nH·D], k and v [T, nKv·D], or one [T, nH·D + 2·nKv·D] whose row t holds token
// t's q, k and v (the fused product's output, and the gradient the fused backward product reads);
// in generation the keys and values go straight into the caches [B, capacity, nKv, D], at
// position kvLens[b] − Lq + i for token t = b·Lq + i (as writeKvCache does).
//
// One invocation per rotated pair, or per four consecutive pairs as vec4s when D/2 is a
// multiple of 4 (on llvmpipe a vec4 load costs about a scalar's): first the q pairs
// [T, nH, D/2], then the k pairs [T, nKv, D/2], each also moving the v pair at the same place.
// cos and sin of a vec4 are the scalar functions lane by lane, so both forms give the same bits.
// The vec4 form reads its source through `Gpu.input` (texture copies on software adapters).

/** One layer's q, k and v: three tensors, or one whose rows hold a token's q, k and v. */
export type Qkv = { q: Tensor; k: Tensor; v: Tensor } | { qkv: Tensor };

/** Generation's destination: q, and the rotated keys and the values into the KV caches. */
export interface QkvToCache {
  q: Tensor;
  kCache: Tensor; // [B, capacity, nKv, D]
  vCache: Tensor;
  kvLens: Tensor; // i32 [B]
  shape: AttentionShape;
}

type Side = "separate" | "fused" | "cache";
const sideOf = (x: Qkv | QkvToCache): Side =>
  "qkv" in x ? "fused" : "kCache" in x ? "cache" : "separate";

/** The side's tensors in binding order. */
function sideTensors(x: Qkv | QkvToCache): Tensor[] {
  if ("qkv" in x) return [x.qkv];
  if ("kCache" in x) return [x.q, x.kCache, x.vCache, x.kvLens];
  return [x.q, x.k, x.v];
}

const qkvShader = (vec4s: number, from: Side, to: Side, vec: boolean, textures: boolean) => {
  const type = vec ? "vec4f" : "f32";
  const per = vec ? 4 : 1; // pairs per invocation
  const freq = vec ? "p.invFreq[i / 4u]" : "p.invFreq[i / 4u][i % 4u]";
  // Declarations of a side's buffers, from binding `first` on.
  const declare = (side: Side, prefix: string, access: string, first: number) => {
    const names = { fused: ["qkv"], cache: ["q", "kCache", "vCache"], separate: ["q", "k", "v"] };
    const lines = names[side].map((n, j) =>
      textures && prefix === "in_"
        ? vec4Input(first + j, `${prefix}${n}`, true)
        : `@group(0) @binding(${first + j}) var<storage, ${access}> ${prefix}${n}: array<${type}>;`
    );
    if (side === "cache") {
      lines.push(`@group(0) @binding(${first + 3}) var<storage, read> kvLens: array<i32>;`);
    }
    return lines.join("\n");
  };
  // Element `index` of a buffer bound as `type` (index is a multiple of 4 in the vec4 form).
  const element = (array: string, index: string) =>
    textures && array.startsWith("in_")
      ? `${array}_at((${index}) / 4u)`
      : `${array}[${vec ? `(${index}) / 4u` : index}]`;
  // The element of part q, k or v of token t, column col (`slot`: the cache position's row).
  const at = (side: Side, prefix: string, part: "q" | "k" | "v", col: string) => {
    if (side === "fused") {
      const offset = part === "q" ? "0u" : part === "k" ? "qDim" : "qDim + kvDim";
      return element(`${prefix}qkv`, `t * (qDim + 2u * kvDim) + ${offset} + ${col}`);
    }
    if (side === "cache" && part !== "q") {
      return element(`${prefix}${part}Cache`, `slot * kvDim + ${col}`);
    }
    return element(`${prefix}${part}`, `t * ${part === "q" ? "qDim" : "kvDim"} + ${col}`);
  };
  const fromCount = from === "fused" ? 1 : 3;
  const load = (part: "q" | "k" | "v", col: string) => at(from, "in_", part, col);
  const store = (part: "q" | "k" | "v", col: string) => at(to, "out_", part, col);
  return /* wgsl */ `
struct Params {
  T: u32, nH: u32, nKv: u32, D: u32, inverse: u32, Lq: u32, capacity: u32, pad: u32,
  invFreq: array<vec4<f32>, ${vec4s}>,
}
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> positions: array<i32>;
${declare(from, "in_", "read", 2)}
${declare(to, "out_", "read_write", 2 + fromCount)}

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
  let qDim = p.nH * p.D;
  let kvDim = p.nKv * p.D;
  let qGroups = p.T * p.nH * groups;
  if (n < qGroups) {
    let head = n / groups;       // t * nH + h
    let i = (n - head * groups) * ${per}u;
    let t = head / p.nH;
    let col = (head % p.nH) * p.D + i;
    let r = rotate(${load("q", "col")}, ${load("q", "col + half")}, f32(positions[t]) * ${freq});
    ${store("q", "col")} = r.x1;
    ${store("q", "col + half")} = r.x2;
    return;
  }
  let m = n - qGroups;
  if (m >= p.T * p.nKv * groups) { return; }
  let head = m / groups;         // t * nKv + h
  let i = (m - head * groups) * ${per}u;
  let t = head / p.nKv;
  let col = (head % p.nKv) * p.D + i;
  let r = rotate(${load("k", "col")}, ${load("k", "col + half")}, f32(positions[t]) * ${freq});
  let v1 = ${load("v", "col")};
  let v2 = ${load("v", "col + half")};
  ${
    to === "cache"
      ? `let b = t / p.Lq;
  let pos = kvLens[b] - i32(p.Lq) + i32(t % p.Lq);
  if (pos < 0 || pos >= i32(p.capacity)) { return; }
  let slot = b * p.capacity + u32(pos);`
      : ""
  }
  ${store("k", "col")} = r.x1;
  ${store("k", "col + half")} = r.x2;
  ${store("v", "col")} = v1;
  ${store("v", "col + half")} = v2;
}`;
};

/**
 * Rotate q [T, nH, D] and k [T, nKv, D] of `from` into `to` (inverse = the backward), moving v
 * along: three tensors ↔ the fused rows, or the fused rows → q and the KV caches (generation).
 */
export function ropeQkv(
  gpu: Gpu,
  from: Qkv,
  to: Qkv | QkvToCache,
  positions: Tensor,
  T: number,
  nH: number,
  nKv: number,
  headDim: number,
  theta: number,
  inverse = false,
): void {
  const vec4s = Math.ceil(headDim / 8);
  const invFreq = new Float32Array(vec4s * 4);
  invFreq.set(ropeInvFreq(headDim, theta));
  const vec = (headDim / 2) % 4 === 0;
  const cache = "kCache" in to ? to.shape : null;
  // The source's first T rows through Gpu.input, in the vec4 form when every one could be.
  const source = sideTensors(from);
  const widths = "qkv" in from ? [nH + 2 * nKv] : [nH, nKv, nKv];
  const inputs = vec
    ? source.map((t, i) => gpu.input(`input ${i}`, t.view(0, [T, widths[i] * headDim])))
    : source;
  const textures = inputs.every((t) => !(t instanceof Tensor));
  gpu.dispatch(
    gpu.pipeline(qkvShader(vec4s, sideOf(from), sideOf(to), vec, textures), "rope q k v"),
    grid((T * (nH + nKv) * headDim) / (vec ? 8 : 2), WG),
    [positions, ...(textures ? inputs : source), ...sideTensors(to)],
    [T, nH, nKv, headDim, inverse ? 1 : 0, cache?.Lq ?? 1, cache?.capacity ?? 0, 0],
    Array.from(invFreq),
  );
}
