// The global gradient norm used for clipping: norm[0] = sqrt(Σ over all gradients of g²).
// Each tensor gets its own dispatch (storage bindings per stage are few; the model passes its
// gradient arenas, gpu/arena.ts, so a few tensors hold every gradient), whose invocations each
// write the sum of squares of one fixed block of elements, summed in order with no barrier
// (barriers are slow on llvmpipe; vec4 loads when the size allows), into a partials buffer; one
// last workgroup adds the partials in a fixed order. No atomics: equal inputs give a
// bitwise-equal norm.

import { Gpu, grid, Tensor } from "../device.ts";

const WG = 256;
const BLOCK_WG = 64;
const BLOCK = 1024; // elements summed by one invocation into one partial

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

// partials[offset + b] = Σ g² over block b = [b·BLOCK, (b+1)·BLOCK) of one tensor of n
// elements (read as vec4s when n is a multiple of 4, then the four lane sums added).
const blockSums = (vec: boolean) => /* wgsl */ `
struct Params { n: u32, blocks: u32, offset: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> grad: array<${vec ? "vec4f" : "f32"}>;
@group(0) @binding(2) var<storage, read_write> partials: array<f32>;

@compute @workgroup_size(${BLOCK_WG})
fn main(@builtin(global_invocation_id) gid: vec3u, @builtin(num_workgroups) nwg: vec3u) {
  let b = gid.x + gid.y * nwg.x * ${BLOCK_WG}u;
  if (b >= p.blocks) { return; }
  let per = ${vec ? BLOCK / 4 : BLOCK}u;
  let end = min((b + 1u) * per, ${vec ? "p.n / 4u" : "p.n"});
  var acc = ${vec ? "vec4f(0.0)" : "0.0"};
  for (var i = b * per; i < end; i++) { acc += grad[i] * grad[i]; }
  partials[p.offset + b] = ${vec ? "dot(acc, vec4f(1.0))" : "acc"};
}`;
const BLOCK_SUMS = blockSums(false), BLOCK_SUMS_VEC4 = blockSums(true);

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
  const partials = gpu.scratch("gradnorm partials", Math.max(count, 1));
  let offset = 0;
  grads.forEach((g, i) => {
    const kernel = g.size % 4 === 0 ? BLOCK_SUMS_VEC4 : BLOCK_SUMS;
    gpu.dispatch(
      gpu.pipeline(kernel, "gradnorm_blocks"),
      grid(blocks[i], BLOCK_WG),
      [g, partials],
      [g.size, blocks[i], offset],
    );
    offset += blocks[i];
  });
  gpu.dispatch(gpu.pipeline(FINAL, "gradnorm_final"), [1], [partials, norm], [count]);
}
