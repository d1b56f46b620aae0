// Per-token log-probabilities from logits: the fused log-softmax + gather behind the GRPO loss,
// and its backward. One workgroup owns one token row and reduces over the vocabulary in a fixed
// order (the row max, then the sum of exponentials shifted by it), so results are deterministic
// and stay finite for large logits.

import { Gpu, grid, Tensor } from "./device.ts";

const WG = 256;

// Shared by both kernels: the tree reduction over one workgroup's WG partial values.
const REDUCE = /* wgsl */ `
var<workgroup> red: array<f32, ${WG}>;

fn reduceMax(lid: u32, x: f32) -> f32 {
  red[lid] = x;
  for (var k = ${WG / 2}u; k > 0u; k >>= 1u) {
    workgroupBarrier();
    if (lid < k) { red[lid] = max(red[lid], red[lid + k]); }
  }
  let r = workgroupUniformLoad(&red[0]);
  workgroupBarrier();
  return r;
}

fn reduceSum(lid: u32, x: f32) -> f32 {
  red[lid] = x;
  for (var k = ${WG / 2}u; k > 0u; k >>= 1u) {
    workgroupBarrier();
    if (lid < k) { red[lid] += red[lid + k]; }
  }
  let r = workgroupUniformLoad(&red[0]);
  workgroupBarrier();
  return r;
}
`;

const FORWARD = /* wgsl */ `
struct Params { T: u32, V: u32, s: f32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read> targets: array<i32>;
@group(0) @binding(3) var<storage, read_write> logp: array<f32>;
@group(0) @binding(4) var<storage, read_write> lse: array<f32>;
${REDUCE}
@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
        @builtin(local_invocation_index) lid: u32) {
  let t = wid.x + wid.y * nwg.x;
  if (t >= p.T) { return; }
  let row = t * p.V;
  var m = -3.4e38;
  for (var v = lid; v < p.V; v += ${WG}u) { m = max(m, p.s * logits[row + v]); }
  let rowMax = reduceMax(lid, m);
  var sum = 0.0;
  for (var v = lid; v < p.V; v += ${WG}u) { sum += exp(p.s * logits[row + v] - rowMax); }
  let rowLse = rowMax + log(reduceSum(lid, sum));
  if (lid == 0u) {
    lse[t] = rowLse;
    logp[t] = p.s * logits[row + u32(targets[t])] - rowLse;
  }
}`;

const BACKWARD = /* wgsl */ `
struct Params { T: u32, V: u32, s: f32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read> targets: array<i32>;
@group(0) @binding(3) var<storage, read> lse: array<f32>;
@group(0) @binding(4) var<storage, read> dLogp: array<f32>;
@group(0) @binding(5) var<storage, read_write> dLogits: array<f32>;

@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
        @builtin(local_invocation_index) lid: u32) {
  let t = wid.x + wid.y * nwg.x;
  if (t >= p.T) { return; }
  let row = t * p.V;
  let tgt = u32(targets[t]);
  let scale = dLogp[t] * p.s;
  for (var v = lid; v < p.V; v += ${WG}u) {
    let softmax = exp(p.s * logits[row + v] - lse[t]);
    dLogits[row + v] = scale * (select(0.0, 1.0, v == tgt) - softmax);
  }
}`;

/**
 * logp[t] = s·logits[t,targets[t]] − logsumexp_v(s·logits[t,v]) with s = invTemperature;
 * lse[t] (the log-sum-exp) is saved for the backward. Targets must lie in [0, V).
 */
export function tokenLogprobs(
  gpu: Gpu,
  logits: Tensor,
  targets: Tensor,
  logp: Tensor,
  lse: Tensor,
  T: number,
  V: number,
  invTemperature = 1,
): void {
  gpu.dispatch(gpu.pipeline(FORWARD, "logprobs"), grid(T, 1), [logits, targets, logp, lse], [
    T,
    V,
  ], [invTemperature]);
}

/** dLogits[t,v] = dLogp[t]·s·(onehot(targets[t]) − softmax(s·logits[t]))[v] (overwrites). */
export function tokenLogprobsBackward(
  gpu: Gpu,
  logits: Tensor,
  targets: Tensor,
  lse: Tensor,
  dLogp: Tensor,
  dLogits: Tensor,
  T: number,
  V: number,
  invTemperature = 1,
): void {
  gpu.dispatch(
    gpu.pipeline(BACKWARD, "logprobs_backward"),
    grid(T, 1),
    [logits, targets, lse, dLogp, dLogits],
    [T, V],
    [invTemperature],
  );
}
