// Rotary position embedding, in place on x [T, heads, D], in Hugging Face Qwen2's rotate-half
// form: pair i < D/2 of a head is (x[i], x[i + D/2]), rotated by angle = positions[t]·inv_freq[i].
// inv_freq[i] = 1/theta^(2i/D) is computed on the CPU exactly as HF does in f32 (the GPU's pow
// is ~10 ulp off, which at position 4000 moves an angle by ~3e-3) and passed in the uniform;
// the angle is the f32 product, as in HF. The inverse rotation (−angle) is the backward.

import { type Gpu, grid, type Tensor } from "../device.ts";

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
