// The tails of a batch's rows, packed and unpacked: a batch of B rows of L positions, each
// position `width` values ([B, L, width]), and the positions from `first` on in every row
// ([B, L − first, width], row after row). A GRPO forward needs log-probs only where completions
// are (a row's prompt ends at or after `first`), so the model runs its vocabulary projection,
// the largest product of a real model (Qwen2.5's 151,936 × hidden), on the packed tails alone,
// and unpacks the log-probs (zeros before `first`) and packs their gradient back. One dispatch
// each way, where a copy per row would split the compute pass B times.

import { type Gpu, grid, type Tensor } from "../device.ts";

const WG = 256;

// Params: B rows of L positions, tails from `first` (W = L − first), `width` values a position.
const PARAMS = `struct Params { B: u32, L: u32, first: u32, width: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;`;

const PACK = /* wgsl */ `
${PARAMS}

@compute @workgroup_size(${WG})
fn main(@builtin(global_invocation_id) gid: vec3u, @builtin(num_workgroups) nwg: vec3u) {
  let i = gid.x + gid.y * nwg.x * ${WG}u;
  let W = p.L - p.first;
  if (i >= p.B * W * p.width) { return; }
  let m = i / p.width;        // packed position: row b, tail position m % W
  let b = m / W;
  dst[i] = src[(b * p.L + p.first + m % W) * p.width + i % p.width];
}`;

const UNPACK = /* wgsl */ `
${PARAMS}

@compute @workgroup_size(${WG})
fn main(@builtin(global_invocation_id) gid: vec3u, @builtin(num_workgroups) nwg: vec3u) {
  let i = gid.x + gid.y * nwg.x * ${WG}u;
  if (i >= p.B * p.L * p.width) { return; }
  let t = i / p.width;        // row t / L, position t % L
  let at = t % p.L;
  let W = p.L - p.first;
  var value = 0.0;
  if (at >= p.first) { value = src[((t / p.L) * W + at - p.first) * p.width + i % p.width]; }
  dst[i] = value;
}`;

/** packed [B, L − first, width] = the positions from `first` on of every row of full [B, L, width]. */
export function packTails(
  gpu: Gpu,
  full: Tensor,
  packed: Tensor,
  B: number,
  L: number,
  first: number,
  width: number,
): void {
  const n = B * (L - first) * width;
  gpu.dispatch(gpu.pipeline(PACK, "pack tails"), grid(n, WG), [full, packed], [
    B,
    L,
    first,
    width,
  ]);
}

/** full [B, L, width] = packed's tails at positions first… of every row, zeros before them. */
export function unpackTails(
  gpu: Gpu,
  packed: Tensor,
  full: Tensor,
  B: number,
  L: number,
  first: number,
  width: number,
): void {
  const n = B * L * width;
  gpu.dispatch(gpu.pipeline(UNPACK, "unpack tails"), grid(n, WG), [packed, full], [
    B,
    L,
    first,
    width,
  ]);
}
