// RMSNorm over rows of x [T, H]: y = x · rstd · w with rstd[t] = 1/sqrt(mean_j x[t,j]² + eps),
// saved for the backward. One invocation owns one row and sums it in order: on llvmpipe this
// beat one workgroup per row with a tree reduction (barriers are slow there).
// Backward, with g = w·dy:  dx = rstd·g − x·rstd³·mean_j(x·g)   and   dw[j] = Σ_t dy·x·rstd.
// dw is summed over t in two fixed-order stages: blocks of CHUNK rows, then the blocks.

import { type Gpu, grid, type Tensor } from "../device.ts";

const ROWS_WG = 32;
const WG = 256;
const CHUNK = 64;

const FORWARD = /* wgsl */ `
struct Params { T: u32, H: u32, eps: f32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<storage, read_write> rstd: array<f32>;

@compute @workgroup_size(${ROWS_WG})
fn main(@builtin(global_invocation_id) gid: vec3u, @builtin(num_workgroups) nwg: vec3u) {
  let t = gid.x + gid.y * nwg.x * ${ROWS_WG}u;
  if (t >= p.T) { return; }
  let row = t * p.H;
  var sumSq = 0.0;
  for (var j = 0u; j < p.H; j++) {
    let v = x[row + j];
    sumSq += v * v;
  }
  let r = inverseSqrt(sumSq / f32(p.H) + p.eps);
  rstd[t] = r;
  for (var j = 0u; j < p.H; j++) {
    y[row + j] = x[row + j] * r * w[j];
  }
}`;

const BACKWARD_DX = /* wgsl */ `
struct Params { T: u32, H: u32, accumulate: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read> rstd: array<f32>;
@group(0) @binding(4) var<storage, read> dy: array<f32>;
@group(0) @binding(5) var<storage, read_write> dx: array<f32>;

@compute @workgroup_size(${ROWS_WG})
fn main(@builtin(global_invocation_id) gid: vec3u, @builtin(num_workgroups) nwg: vec3u) {
  let t = gid.x + gid.y * nwg.x * ${ROWS_WG}u;
  if (t >= p.T) { return; }
  let row = t * p.H;
  let r = rstd[t];
  var sumXg = 0.0;
  for (var j = 0u; j < p.H; j++) {
    sumXg += x[row + j] * w[j] * dy[row + j];
  }
  let c = r * r * r * sumXg / f32(p.H);
  for (var j = 0u; j < p.H; j++) {
    let g = r * w[j] * dy[row + j] - x[row + j] * c;
    if (p.accumulate != 0u) { dx[row + j] += g; } else { dx[row + j] = g; }
  }
}`;

// partial[c, j] = Σ over rows t of chunk c of dy[t,j]·x[t,j]·rstd[t].
const BACKWARD_DW_CHUNKS = /* wgsl */ `
struct Params { T: u32, H: u32, chunks: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> rstd: array<f32>;
@group(0) @binding(3) var<storage, read> dy: array<f32>;
@group(0) @binding(4) var<storage, read_write> partial: array<f32>;

@compute @workgroup_size(${WG})
fn main(@builtin(global_invocation_id) gid: vec3u, @builtin(num_workgroups) nwg: vec3u) {
  let i = gid.x + gid.y * nwg.x * ${WG}u;
  if (i >= p.chunks * p.H) { return; }
  let c = i / p.H;
  let j = i - c * p.H;
  var sum = 0.0;
  for (var t = c * ${CHUNK}u; t < min(p.T, (c + 1u) * ${CHUNK}u); t++) {
    sum += dy[t * p.H + j] * x[t * p.H + j] * rstd[t];
  }
  partial[i] = sum;
}`;

// dw[j] (+)= Σ_c partial[c, j].
const BACKWARD_DW_SUM = /* wgsl */ `
struct Params { H: u32, chunks: u32, accumulate: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> partial: array<f32>;
@group(0) @binding(2) var<storage, read_write> dw: array<f32>;

@compute @workgroup_size(${WG})
fn main(@builtin(global_invocation_id) gid: vec3u, @builtin(num_workgroups) nwg: vec3u) {
  let j = gid.x + gid.y * nwg.x * ${WG}u;
  if (j >= p.H) { return; }
  var sum = 0.0;
  for (var c = 0u; c < p.chunks; c++) {
    sum += partial[c * p.H + j];
  }
  if (p.accumulate != 0u) { dw[j] += sum; } else { dw[j] = sum; }
}`;

/** y = x · rstd · w for the first T rows of x [T, H] (H = w.shape[0]); writes rstd [T]. */
export function rmsnorm(
  gpu: Gpu,
  x: Tensor,
  w: Tensor,
  y: Tensor,
  rstd: Tensor,
  T: number,
  eps: number,
): void {
  const H = w.shape[0];
  gpu.dispatch(gpu.pipeline(FORWARD, "rmsnorm"), grid(T, ROWS_WG), [x, w, y, rstd], [T, H], [eps]);
}

/** dx (+)= ∂L/∂x and dw (+)= ∂L/∂w given dy = ∂L/∂y and the forward's rstd (dw null: a frozen
 * weight, no dw). */
export function rmsnormBackward(
  gpu: Gpu,
  x: Tensor,
  w: Tensor,
  rstd: Tensor,
  dy: Tensor,
  dx: Tensor,
  dw: Tensor | null,
  T: number,
  opts: { accumulateDx: boolean; accumulateDw: boolean },
): void {
  const H = w.shape[0];
  const chunks = Math.ceil(T / CHUNK);
  gpu.dispatch(
    gpu.pipeline(BACKWARD_DX, "rmsnormBackwardDx"),
    grid(T, ROWS_WG),
    [x, w, rstd, dy, dx],
    [T, H, opts.accumulateDx ? 1 : 0],
  );
  if (!dw) return;
  const partial = gpu.zeros([chunks, H], "f32", "rmsnorm dw partial");
  gpu.dispatch(
    gpu.pipeline(BACKWARD_DW_CHUNKS, "rmsnormBackwardDwChunks"),
    grid(chunks * H, WG),
    [x, rstd, dy, partial],
    [T, H, chunks],
  );
  gpu.dispatch(
    gpu.pipeline(BACKWARD_DW_SUM, "rmsnormBackwardDwSum"),
    grid(H, WG),
    [partial, dw],
    [H, chunks, opts.accumulateDw ? 1 : 0],
  );
  gpu.release(partial);
}
