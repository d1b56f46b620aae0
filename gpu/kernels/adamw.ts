// The AdamW optimizer step (PyTorch semantics: decoupled weight decay, bias-corrected moments),
// with gradient clipping by the global norm read on the GPU, so a step needs no readback.
// The bias corrections are computed on the CPU in float64 and passed as f32 uniforms: β^step in
// f32 on the GPU would lose most of the digits of 1 − β2^step early in training.

import { Gpu, grid, Tensor } from "../device.ts";

const WG = 256;

// The update over f32 values, or over vec4s of them when n is a multiple of 4 (on llvmpipe a
// vec4 load costs about a scalar's); the arithmetic is the same lane by lane.
const step = (vec: boolean) => {
  const type = vec ? "vec4f" : "f32";
  return /* wgsl */ `
struct Params {
  n: u32,
  decay: f32,          // 1 − lr·weightDecay
  beta1: f32,
  oneMinusBeta1: f32,
  beta2: f32,
  oneMinusBeta2: f32,
  stepSize: f32,       // lr / (1 − β1^step)
  sqrtBc2: f32,        // sqrt(1 − β2^step)
  eps: f32,
  maxGradNorm: f32,
}
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> param: array<${type}>;
@group(0) @binding(2) var<storage, read> grad: array<${type}>;
@group(0) @binding(3) var<storage, read_write> m: array<${type}>;
@group(0) @binding(4) var<storage, read_write> v: array<${type}>;
@group(0) @binding(5) var<storage, read> norm: array<f32>;

@compute @workgroup_size(${WG})
fn main(@builtin(global_invocation_id) gid: vec3u, @builtin(num_workgroups) nwg: vec3u) {
  let i = gid.x + gid.y * nwg.x * ${WG}u;
  if (i >= ${vec ? "p.n / 4u" : "p.n"}) { return; }
  var clip = 1.0;
  if (p.maxGradNorm > 0.0) { clip = min(1.0, p.maxGradNorm / (norm[0] + 1e-6)); }
  let g = grad[i] * clip;
  let mi = p.beta1 * m[i] + p.oneMinusBeta1 * g;
  let vi = p.beta2 * v[i] + p.oneMinusBeta2 * g * g;
  m[i] = mi;
  v[i] = vi;
  param[i] = param[i] * p.decay - p.stepSize * mi / (sqrt(vi) / p.sqrtBc2 + p.eps);
}`;
};
const SCALAR = step(false), VEC4 = step(true);

export interface AdamwHyper {
  lr: number;
  beta1: number;
  beta2: number;
  eps: number;
  weightDecay: number;
  /** 1 for the first update. */
  step: number;
  /** Gradients are scaled by min(1, maxGradNorm / (norm[0] + 1e-6)); ≤ 0 turns clipping off. */
  maxGradNorm: number;
}

/** One AdamW update of n parameters in place; m and v are the moment buffers, norm[0] the grad norm. */
export function adamw(
  gpu: Gpu,
  param: Tensor,
  grad: Tensor,
  m: Tensor,
  v: Tensor,
  norm: Tensor,
  n: number,
  hp: AdamwHyper,
): void {
  if (!(Number.isInteger(hp.step) && hp.step >= 1)) {
    throw new Error(`adamw: step must be an integer ≥ 1, got ${hp.step}`);
  }
  const vec = n % 4 === 0;
  const pipeline = gpu.pipeline(vec ? VEC4 : SCALAR, "adamw");
  gpu.dispatch(pipeline, grid(vec ? n / 4 : n, WG), [param, grad, m, v, norm], [n], [
    1 - hp.lr * hp.weightDecay,
    hp.beta1,
    1 - hp.beta1,
    hp.beta2,
    1 - hp.beta2,
    hp.lr / (1 - hp.beta1 ** hp.step),
    Math.sqrt(1 - hp.beta2 ** hp.step),
    hp.eps,
    hp.maxGradNorm,
  ]);
}
