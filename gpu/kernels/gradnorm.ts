// The global gradient norm used for clipping: norm[0] = sqrt(Σ over all gradients of g²).
// Each tensor is cut into blocks of BLOCK elements; an invocation writes the sum of squares of
// one block, summed in order with no barrier (barriers are slow on llvmpipe; four lane sums by
// vec4s when the tensor's size is a multiple of 4), into a partials buffer at the block's place
// in the list; one last workgroup adds the partials in a fixed order. The blocks are listed in a
// table made once for a list of tensors (`GradNorm`), so one dispatch covers every tensor of a
// buffer (the model's gradients lie in a few arenas, gpu/arena.ts) and the sums do not depend on
// how the tensors are packed. No atomics: equal inputs give a bitwise-equal norm.

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

// partials[block.partial] = Σ g² over block b of the table: elements [start, end) of the buffer
// `grad`, bound as vec4s when its size allows (`vecBinding`) or as f32s; `vec` blocks (of tensors
// whose size is a multiple of 4) sum four lanes and add them at the end.
const blockSums = (vecBinding: boolean) => /* wgsl */ `
struct Params { blocks: u32 }
struct Block { start: u32, end: u32, partial: u32, vec: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> grad: array<${vecBinding ? "vec4f" : "f32"}>;
@group(0) @binding(2) var<storage, read> table: array<Block>;
@group(0) @binding(3) var<storage, read_write> partials: array<f32>;

fn load4(i: u32) -> vec4f {
  return ${
  vecBinding
    ? "grad[i]"
    : "vec4f(grad[4u * i], grad[4u * i + 1u], grad[4u * i + 2u], grad[4u * i + 3u])"
};
}

fn load1(i: u32) -> f32 {
  return ${vecBinding ? "grad[i / 4u][i % 4u]" : "grad[i]"};
}

@compute @workgroup_size(${BLOCK_WG})
fn main(@builtin(global_invocation_id) gid: vec3u, @builtin(num_workgroups) nwg: vec3u) {
  let b = gid.x + gid.y * nwg.x * ${BLOCK_WG}u;
  if (b >= p.blocks) { return; }
  let block = table[b];
  if (block.vec != 0u) {
    var acc = vec4f(0.0);
    for (var i = block.start / 4u; i < block.end / 4u; i++) { let g = load4(i); acc += g * g; }
    partials[block.partial] = dot(acc, vec4f(1.0));
  } else {
    var acc = 0.0;
    for (var i = block.start; i < block.end; i++) { let g = load1(i); acc += g * g; }
    partials[block.partial] = acc;
  }
}`;
const BLOCK_SUMS_VEC4 = blockSums(true), BLOCK_SUMS = blockSums(false);

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

/**
 * The norm of a fixed list of tensors (each's extent its shape; views of shared buffers welcome):
 * the blocks' table is uploaded once, then each run is one dispatch per buffer and the final sum.
 */
export class GradNorm {
  private readonly passes: { whole: Tensor; table: Tensor; blocks: number }[] = [];
  private readonly count: number;

  constructor(gpu: Gpu, grads: Tensor[]) {
    const byBuffer = new Map<GPUBuffer, number[]>(); // the table's rows for each buffer
    let partial = 0;
    for (const g of grads) {
      const first = g.offset / 4, vec = g.size % 4 === 0 ? 1 : 0;
      const rows = byBuffer.get(g.buffer) ?? byBuffer.set(g.buffer, []).get(g.buffer)!;
      for (let start = 0; start < g.size; start += BLOCK) {
        rows.push(first + start, first + Math.min(g.size, start + BLOCK), partial++, vec);
      }
    }
    this.count = partial;
    for (const [buffer, rows] of byBuffer) {
      const whole = new Tensor(buffer, [buffer.size / 4]);
      this.passes.push({
        whole,
        table: gpu.upload(Uint32Array.from(rows)),
        blocks: rows.length / 4,
      });
    }
  }

  /** norm[0] = sqrt(Σ over the tensors of g²). */
  run(gpu: Gpu, norm: Tensor): void {
    const partials = gpu.scratch("gradnorm partials", Math.max(this.count, 1));
    for (const { whole, table, blocks } of this.passes) {
      const kernel = whole.bytes % 16 === 0 ? BLOCK_SUMS_VEC4 : BLOCK_SUMS;
      gpu.dispatch(
        gpu.pipeline(kernel, "gradnorm_blocks"),
        grid(blocks, BLOCK_WG),
        [whole, table, partials],
        [blocks],
      );
    }
    gpu.dispatch(gpu.pipeline(FINAL, "gradnorm_final"), [1], [partials, norm], [this.count]);
  }

  destroy(gpu: Gpu): void {
    for (const { table } of this.passes) gpu.release(table);
  }
}

/** norm[0] = sqrt(Σ over all grads of g²), once (a table made and released for this call). */
export function gradNorm(gpu: Gpu, grads: Tensor[], norm: Tensor): void {
  const once = new GradNorm(gpu, grads);
  once.run(gpu, norm);
  once.destroy(gpu);
}
