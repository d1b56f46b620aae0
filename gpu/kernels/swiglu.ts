// SwiGLU, the activation of Qwen2's MLP: out = silu(gate)·up elementwise, and its backward.
// silu(g) = g·σ(g); d silu/dg = σ(g)·(1 + g·(1 − σ(g))).

import { type Gpu, grid, type Tensor } from "../device.ts";

const WG = 256;

// σ(g) from exp(−|g|), which never overflows.
const SIGMOID = /* wgsl */ `
fn sigmoid(g: f32) -> f32 {
  let e = exp(-abs(g));
  return select(e / (1.0 + e), 1.0 / (1.0 + e), g >= 0.0);
}`;

const FORWARD = /* wgsl */ `
struct Params { n: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> gate: array<f32>;
@group(0) @binding(2) var<storage, read> up: array<f32>;
@group(0) @binding(3) var<storage, read_write> result: array<f32>;
${SIGMOID}

@compute @workgroup_size(${WG})
fn main(@builtin(global_invocation_id) gid: vec3u, @builtin(num_workgroups) nwg: vec3u) {
  let i = gid.x + gid.y * nwg.x * ${WG}u;
  if (i >= p.n) { return; }
  let g = gate[i];
  result[i] = g * sigmoid(g) * up[i];
}`;

const BACKWARD = /* wgsl */ `
struct Params { n: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> gate: array<f32>;
@group(0) @binding(2) var<storage, read> up: array<f32>;
@group(0) @binding(3) var<storage, read> dOut: array<f32>;
@group(0) @binding(4) var<storage, read_write> dGate: array<f32>;
@group(0) @binding(5) var<storage, read_write> dUp: array<f32>;
${SIGMOID}

@compute @workgroup_size(${WG})
fn main(@builtin(global_invocation_id) gid: vec3u, @builtin(num_workgroups) nwg: vec3u) {
  let i = gid.x + gid.y * nwg.x * ${WG}u;
  if (i >= p.n) { return; }
  let g = gate[i];
  let s = sigmoid(g);
  let d = dOut[i];
  dUp[i] = d * g * s;
  dGate[i] = d * up[i] * s * (1.0 + g * (1.0 - s));
}`;

/** out = silu(gate)·up over the first n values. */
export function swiglu(gpu: Gpu, gate: Tensor, up: Tensor, out: Tensor, n: number): void {
  gpu.dispatch(gpu.pipeline(FORWARD, "swiglu"), grid(n, WG), [gate, up, out], [n]);
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
  const pipeline = gpu.pipeline(BACKWARD, "swigluBackward");
  gpu.dispatch(pipeline, grid(n, WG), [gate, up, dOut, dGate, dUp], [n]);
}
