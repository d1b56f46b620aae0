// The global gradient norm used for clipping: norm[0] = sqrt(Σ over all gradients of g²).
// Each tensor gets its own dispatch (storage bindings per stage are few), whose workgroups each
// write the sum of squares of one fixed block of elements into a partials buffer; one last
// workgroup adds the partials in a fixed order. No atomics: equal inputs give a bitwise-equal norm.

import { Gpu, grid, Tensor } from "../device.ts";

const WG = 256;
const PER_THREAD = 16;
const BLOCK = WG * PER_THREAD; // elements summed by one workgroup into one partial

const REDUCE = /* wgsl */ `
var<workgroup> red: array<f32, ${WG}>;

fn reduceSum(lid: u32, x: f32) -> f32 {
  red[lid] = x;
  for (var k = ${WG / 2}u; k > 0u; k >>= 1u) {
    workgroupBarrier();
    if (lid < k) { red[lid] += red[lid + k]; }
  }
  return workgroupUniformLoad(&red[0]);
}
`;

// partials[offset + b] = Σ g² over block b = [b·BLOCK, (b+1)·BLOCK) of one tensor of n elements.
const BLOCK_SUMS = /* wgsl */ `
struct Params { n: u32, blocks: u32, offset: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> grad: array<f32>;
@group(0) @binding(2) var<storage, read_write> partials: array<f32>;
${REDUCE}
@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
        @builtin(local_invocation_index) lid: u32) {
  let b = wid.x + wid.y * nwg.x;
  if (b >= p.blocks) { return; }
  var acc = 0.0;
  for (var j = 0u; j < ${PER_THREAD}u; j++) {
    let i = b * ${BLOCK}u + j * ${WG}u + lid;
    if (i < p.n) { acc += grad[i] * grad[i]; }
  }
  let total = reduceSum(lid, acc);
  if (lid == 0u) { partials[p.offset + b] = total; }
}`;

// norm[0] = sqrt(Σ partials[0..count)), one workgroup.
const FINAL = /* wgsl */ `
struct Params { count: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> partials: array<f32>;
@group(0) @binding(2) var<storage, read_write> norm: array<f32>;
${REDUCE}
@compute @workgroup_size(${WG})
fn main(@builtin(local_invocation_index) lid: u32) {
  var acc = 0.0;
  for (var i = lid; i < p.count; i += ${WG}u) { acc += partials[i]; }
  let total = reduceSum(lid, acc);
  if (lid == 0u) { norm[0] = sqrt(total); }
}`;

/** norm[0] = sqrt(Σ over all grads of g²); each tensor's extent is its shape. */
export function gradNorm(gpu: Gpu, grads: Tensor[], norm: Tensor): void {
  const blocks = grads.map((g) => Math.ceil(g.size / BLOCK));
  const count = blocks.reduce((a, b) => a + b, 0);
  const partials = gpu.zeros([Math.max(count, 1)], "f32", "gradnorm partials");
  const blockSums = gpu.pipeline(BLOCK_SUMS, "gradnorm_blocks");
  let offset = 0;
  grads.forEach((g, i) => {
    gpu.dispatch(blockSums, grid(blocks[i], 1), [g, partials], [g.size, blocks[i], offset]);
    offset += blocks[i];
  });
  gpu.dispatch(gpu.pipeline(FINAL, "gradnorm_final"), [1], [partials, norm], [count]);
  gpu.release(partials);
}
