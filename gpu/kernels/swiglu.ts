// SwiGLU, the activation of Qwen2's MLP: out = silu(gate)·up elementwise, and its backward.
// silu(g) = g·σ(g); d silu/dg = σ(g)·(1 + g·(1 − σ(g))).
//
// When n is a multiple of 4 (every real intermediate size) the buffers are bound as vec4s: on
// llvmpipe each load is a loop over the SIMD lanes, so four values per load cost about a
// quarter as much as four scalar loads.

import { type Gpu, grid, type Tensor } from "../device.ts";

const WG = 256;

/** The kernels over f32 values (`vec` false) or vec4s of them. */
function kernels(vec: boolean) {
  const type = vec ? "vec4f" : "f32";
  // σ(g) from exp(−|g|), which never overflows.
  const sigmoid = `
fn sigmoid(g: ${type}) -> ${type} {
  let e = exp(-abs(g));
  return select(e / (1.0 + e), 1.0 / (1.0 + e), g >= ${type}(0.0));
}`;
  const index = (n: string) => `
  let i = gid.x + gid.y * nwg.x * ${WG}u;
  if (i >= ${vec ? `${n} / 4u` : n}) { return; }`;
  const forward = `
struct Params { n: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> gate: array<${type}>;
@group(0) @binding(2) var<storage, read> up: array<${type}>;
@group(0) @binding(3) var<storage, read_write> result: array<${type}>;
${sigmoid}

@compute @workgroup_size(${WG})
fn main(@builtin(global_invocation_id) gid: vec3u, @builtin(num_workgroups) nwg: vec3u) {${
    index("p.n")
  }
  let g = gate[i];
  result[i] = g * sigmoid(g) * up[i];
}`;
  const backward = `
struct Params { n: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> gate: array<${type}>;
@group(0) @binding(2) var<storage, read> up: array<${type}>;
@group(0) @binding(3) var<storage, read> dOut: array<${type}>;
@group(0) @binding(4) var<storage, read_write> dGate: array<${type}>;
@group(0) @binding(5) var<storage, read_write> dUp: array<${type}>;
${sigmoid}

@compute @workgroup_size(${WG})
fn main(@builtin(global_invocation_id) gid: vec3u, @builtin(num_workgroups) nwg: vec3u) {${
    index("p.n")
  }
  let g = gate[i];
  let s = sigmoid(g);
  let d = dOut[i];
  dUp[i] = d * g * s;
  dGate[i] = d * up[i] * s * (1.0 + g * (1.0 - s));
}`;
  return { forward, backward };
}

const SCALAR = kernels(false), VEC4 = kernels(true);

/** out = silu(gate)·up over the first n values. */
export function swiglu(gpu: Gpu, gate: Tensor, up: Tensor, out: Tensor, n: number): void {
  const vec = n % 4 === 0;
  const pipeline = gpu.pipeline((vec ? VEC4 : SCALAR).forward, "swiglu");
  gpu.dispatch(pipeline, grid(vec ? n / 4 : n, WG), [gate, up, out], [n]);
}

/** dGate = dOut·up·silu'(gate), dUp = dOut·silu(gate) (both overwritten). */
export function swigluBackward(
  gpu: Gpu,
  gate: Tensor,
  up: Tensor,
  dOut: Tensor,
  dGate: Tensor,
  dUp: Tensor,
  n: number,
): void {
  const vec = n % 4 === 0;
  const pipeline = gpu.pipeline((vec ? VEC4 : SCALAR).backward, "swigluBackward");
  gpu.dispatch(pipeline, grid(vec ? n / 4 : n, WG), [gate, up, dOut, dGate, dUp], [n]);
}
