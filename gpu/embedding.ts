// Token embedding: out[t] = table[ids[t]], and its backward, which sums the rows of dOut that
// share a token id into that id's row of dTable. The backward has no atomics: the CPU groups
// the positions of each distinct id (a CSR list), and one invocation owns one (id, column) of
// dTable, summing its positions in ascending order, so results are bit-for-bit reproducible.

import { type Gpu, grid, type Tensor } from "./device.ts";

const WG = 256;

const FORWARD = /* wgsl */ `
struct Params { T: u32, H: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> ids: array<i32>;
@group(0) @binding(2) var<storage, read> table: array<f32>;
@group(0) @binding(3) var<storage, read_write> result: array<f32>;

@compute @workgroup_size(${WG})
fn main(@builtin(global_invocation_id) gid: vec3u, @builtin(num_workgroups) nwg: vec3u) {
  let i = gid.x + gid.y * nwg.x * ${WG}u;
  if (i >= p.T * p.H) { return; }
  let t = i / p.H;
  let j = i - t * p.H;
  result[i] = table[u32(ids[t]) * p.H + j];
}`;

// groups = [ids: distinct] [starts: distinct + 1] [positions: T]; the positions of id k are
// positions[starts[k] .. starts[k + 1]).
const BACKWARD = /* wgsl */ `
struct Params { distinct: u32, H: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> groups: array<u32>;
@group(0) @binding(2) var<storage, read> dOut: array<f32>;
@group(0) @binding(3) var<storage, read_write> dTable: array<f32>;

@compute @workgroup_size(${WG})
fn main(@builtin(global_invocation_id) gid: vec3u, @builtin(num_workgroups) nwg: vec3u) {
  let i = gid.x + gid.y * nwg.x * ${WG}u;
  if (i >= p.distinct * p.H) { return; }
  let k = i / p.H;
  let j = i - k * p.H;
  let positions = 2u * p.distinct + 1u;
  var sum = 0.0;
  for (var q = groups[p.distinct + k]; q < groups[p.distinct + k + 1u]; q++) {
    sum += dOut[groups[positions + q] * p.H + j];
  }
  let at = groups[k] * p.H + j;
  dTable[at] = dTable[at] + sum;
}`;

/** out[t, :] = table[ids[t], :] for t < T; table is [V, H]. */
export function embedding(gpu: Gpu, ids: Tensor, table: Tensor, out: Tensor, T: number): void {
  const H = table.shape[1];
  gpu.dispatch(gpu.pipeline(FORWARD, "embedding"), grid(T * H, WG), [ids, table, out], [T, H]);
}

/**
 * dTable[v, :] (+)= Σ_{t: ids[t] = v} dOut[t, :]. Without accumulate, rows of ids that do not
 * occur end zero. Work is proportional to the distinct ids present, not to V.
 */
export function embeddingBackward(
  gpu: Gpu,
  ids: Int32Array,
  dOut: Tensor,
  dTable: Tensor,
  accumulate: boolean,
): void {
  const [V, H] = dTable.shape;
  const { distinct, packed } = groupPositions(ids, V);
  const groups = gpu.upload(packed);
  if (!accumulate) gpu.clear(dTable);
  const pipeline = gpu.pipeline(BACKWARD, "embeddingBackward");
  gpu.dispatch(pipeline, grid(distinct * H, WG), [groups, dOut, dTable], [distinct, H]);
  gpu.release(groups);
}

/** The CSR grouping read by BACKWARD: distinct ids ascending, each with its positions ascending. */
function groupPositions(ids: Int32Array, V: number): { distinct: number; packed: Uint32Array } {
  const order = new Uint32Array(ids.length).map((_, t) => t);
  order.sort((a, b) => ids[a] - ids[b] || a - b);
  const distinctIds: number[] = [];
  const starts: number[] = [];
  order.forEach((t, q) => {
    if (q > 0 && ids[t] === ids[order[q - 1]]) return;
    if (ids[t] < 0 || ids[t] >= V) {
      throw new Error(`embeddingBackward: token id ${ids[t]} is outside the vocabulary [0, ${V})`);
    }
    distinctIds.push(ids[t]);
    starts.push(q);
  });
  starts.push(ids.length);
  const packed = new Uint32Array(distinctIds.length + starts.length + ids.length);
  packed.set(distinctIds);
  packed.set(starts, distinctIds.length);
  packed.set(order, distinctIds.length + starts.length);
  return { distinct: distinctIds.length, packed };
}
