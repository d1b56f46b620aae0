// Per-token log-probabilities from logits: the fused log-softmax + gather behind the GRPO loss,
// and its backward. One workgroup owns one token row and reduces over the vocabulary in a fixed
// order (the row max, then the sum of exponentials shifted by it), so results are deterministic
// and stay finite for large logits.

import { Gpu, grid, Tensor } from "../device.ts";

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

// Small vocabularies: one invocation per row walks the whole row, with no barriers (which are
// expensive on CPU adapters and leave most of a 256-wide workgroup idle when V is small).
const SERIAL_MAX_V = 1024;

const FORWARD_SERIAL = /* wgsl */ `
struct Params { T: u32, V: u32, s: f32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read> targets: array<i32>;
@group(0) @binding(3) var<storage, read_write> logp: array<f32>;
@group(0) @binding(4) var<storage, read_write> lse: array<f32>;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3u, @builtin(num_workgroups) nwg: vec3u) {
  let t = gid.x + gid.y * nwg.x * 64u;
  if (t >= p.T) { return; }
  let row = t * p.V;
  var m = -3.4e38;
  for (var v = 0u; v < p.V; v++) { m = max(m, p.s * logits[row + v]); }
  var sum = 0.0;
  for (var v = 0u; v < p.V; v++) { sum += exp(p.s * logits[row + v] - m); }
  let rowLse = m + log(sum);
  lse[t] = rowLse;
  logp[t] = p.s * logits[row + u32(targets[t])] - rowLse;
}`;

const BACKWARD = /* wgsl */ `
struct Params { T: u32, V: u32, s: f32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read> targets: array<i32>;
@group(0) @binding(3) var<storage, read> lse: array<f32>;
@group(0) @binding(4) var<storage, read> dLogp: array<f32>;
@group(0) @binding(5) var<storage, read_write> dLogits: array<f32>;

// One invocation per logit: no reduction, so every lane has work whatever V is.
@compute @workgroup_size(${WG})
fn main(@builtin(global_invocation_id) gid: vec3u, @builtin(num_workgroups) nwg: vec3u) {
  let i = gid.x + gid.y * nwg.x * ${WG}u;
  if (i >= p.T * p.V) { return; }
  let t = i / p.V;
  let v = i - t * p.V;
  let softmax = exp(p.s * logits[i] - lse[t]);
  dLogits[i] = dLogp[t] * p.s * (select(0.0, 1.0, v == u32(targets[t])) - softmax);
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
  const serial = V <= SERIAL_MAX_V;
  const pipeline = serial
    ? gpu.pipeline(FORWARD_SERIAL, "logprobs_serial")
    : gpu.pipeline(FORWARD, "logprobs");
  gpu.dispatch(pipeline, serial ? grid(T, 64) : grid(T, 1), [logits, targets, logp, lse], [
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
    grid(T * V, WG),
    [logits, targets, lse, dLogp, dLogits],
    [T, V],
    [invTemperature],
  );
}
