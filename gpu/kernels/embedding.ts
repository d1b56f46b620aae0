// Token embedding: out[t] = table[ids[t]], and its backward, which sums the rows of dOut that
// share a token id into that id's row of dTable. The backward has no atomics: the CPU groups
// the positions of each distinct id (a CSR list), and one invocation owns one (id, column) of
// dTable, summing its positions in ascending order, so results are bit-for-bit reproducible.
// A table larger than one storage binding is kept as row slices (gpu/model.ts): each slice's
// dispatch handles the ids that fall in its rows. An f32 table of whole vec4 rows is read by
// vec4s, through `Gpu.input` (a texture copy on software adapters when the rows read outnumber
// the table's), and so is the backward's dOut.

import { type Gpu, grid, Tensor, vec4Input } from "../device.ts";

const WG = 256;

// The table may be a frozen weight in 16 bits, widened as it is read (see gpu/kernels/matmul.ts).
const TABLE = {
  f32: { decl: "array<f32>", read: "table[e]" },
  f16: { decl: "array<f16>", read: "f32(table[e])" },
  bf16: {
    decl: "array<u32>",
    read:
      "bitcast<f32>(select(table[e >> 1u] << 16u, table[e >> 1u] & 0xffff0000u, (e & 1u) == 1u))",
  },
};

// `vec4`: an f32 table read by vec4s (H then counts vec4s), from a texture copy when `texture`.
const forwardWgsl = (dtype: keyof typeof TABLE, vec4: { texture: boolean } | null) => {
  const table = vec4
    ? vec4Input(2, "table", vec4.texture)
    : `@group(0) @binding(2) var<storage, read> table: ${TABLE[dtype].decl};`;
  return /* wgsl */ `${dtype === "f16" ? "enable f16;" : ""}
struct Params { T: u32, H: u32, first: u32, rows: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> ids: array<i32>;
${table} // rows first .. first+rows-1
@group(0) @binding(3) var<storage, read_write> result: array<${vec4 ? "vec4f" : "f32"}>;

@compute @workgroup_size(${WG})
fn main(@builtin(global_invocation_id) gid: vec3u, @builtin(num_workgroups) nwg: vec3u) {
  let i = gid.x + gid.y * nwg.x * ${WG}u;
  if (i >= p.T * p.H) { return; }
  let t = i / p.H;
  let j = i - t * p.H;
  let row = u32(ids[t]) - p.first; // ids below first wrap around to ≥ rows
  if (row >= p.rows) { return; }
  let e = row * p.H + j;
  result[i] = ${vec4 ? "table_at(e)" : TABLE[dtype].read};
}`;
};

// groups = [ids: distinct] [starts: distinct + 1] [positions: T]; the positions of id k are
// positions[starts[k] .. starts[k + 1]). One dispatch handles ids k0 .. k0+count-1, which lie
// in the rows of dTable, the slice starting at row `first`.
const backwardWgsl = (vec: boolean, texture: boolean) => {
  const type = vec ? "vec4f" : "f32";
  return /* wgsl */ `
struct Params { distinct: u32, H: u32, k0: u32, count: u32, first: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> groups: array<u32>;
${
    vec
      ? vec4Input(2, "dOut", texture)
      : "@group(0) @binding(2) var<storage, read> dOut: array<f32>;"
  }
@group(0) @binding(3) var<storage, read_write> dTable: array<${type}>;

@compute @workgroup_size(${WG})
fn main(@builtin(global_invocation_id) gid: vec3u, @builtin(num_workgroups) nwg: vec3u) {
  let i = gid.x + gid.y * nwg.x * ${WG}u;
  if (i >= p.count * p.H) { return; }
  let k = p.k0 + i / p.H;
  let j = i - (k - p.k0) * p.H;
  let positions = 2u * p.distinct + 1u;
  var sum = ${type}(0.0);
  for (var q = groups[p.distinct + k]; q < groups[p.distinct + k + 1u]; q++) {
    let at_q = groups[positions + q] * p.H + j;
    sum += ${vec ? "dOut_at(at_q)" : "dOut[at_q]"};
  }
  let at = (groups[k] - p.first) * p.H + j;
  dTable[at] = dTable[at] + sum;
}`;
};

/**
 * out[t, :] = table[ids[t], :] for t < T; table is [V, H], whole or as row slices in order,
 * stored f32, bf16 or f16.
 */
export function embedding(
  gpu: Gpu,
  ids: Tensor,
  table: Tensor | Tensor[],
  out: Tensor,
  T: number,
): void {
  let first = 0;
  for (const slice of [table].flat()) {
    const dtype = slice.dtype;
    if (dtype !== "f32" && dtype !== "bf16" && dtype !== "f16") {
      throw new Error(`embedding: the table must be f32, bf16 or f16, got ${dtype}`);
    }
    const [rows, H] = slice.shape;
    const vec = dtype === "f32" && H % 4 === 0, width = vec ? 4 : 1;
    const input = vec ? gpu.input("input 0", slice, (T * H) / 4) : slice;
    const vec4 = vec ? { texture: !(input instanceof Tensor) } : null;
    gpu.dispatch(
      gpu.pipeline(forwardWgsl(dtype, vec4), "embedding"),
      grid((T * H) / width, WG),
      [ids, input, out],
      [T, H / width, first, rows],
    );
    first += rows;
  }
}

/**
 * dTable[v, :] (+)= Σ_{t: ids[t] = v} dOut[t, :], dTable whole or as row slices in order.
 * Without accumulate, rows of ids that do not occur end zero. Work is proportional to the
 * distinct ids present, not to V.
 */
export function embeddingBackward(
  gpu: Gpu,
  ids: Int32Array,
  dOut: Tensor,
  dTable: Tensor | Tensor[],
  accumulate: boolean,
): void {
  const slices = [dTable].flat();
  const V = slices.reduce((rows, slice) => rows + slice.shape[0], 0);
  const { distinct, packed } = groupPositions(ids, V);
  // Kept per device (Gpu.scratch): written after the work already recorded, which it orders.
  const groups = gpu.scratch("embedding backward groups", packed.length);
  gpu.write(groups, packed);
  // By vec4s when rows are whole vec4s; dOut [T, H] is read once.
  const H = slices[0].shape[1], vec = H % 4 === 0, width = vec ? 4 : 1;
  const input = vec ? gpu.input("input 0", dOut.view(0, [ids.length * H])) : dOut;
  const pipeline = gpu.pipeline(
    backwardWgsl(vec, !(input instanceof Tensor)),
    "embeddingBackward",
  );
  // The distinct ids come ascending: each slice's are the next run of them.
  let k = 0, first = 0;
  for (const slice of slices) {
    const rows = slice.shape[0], k0 = k;
    while (k < distinct && packed[k] < first + rows) k++;
    if (!accumulate) gpu.clear(slice);
    const count = k - k0;
    gpu.dispatch(pipeline, grid((count * H) / width, WG), [groups, input, slice], [
      distinct,
      H / width,
      k0,
      count,
      first,
    ]);
    first += rows;
  }
}

/** The CSR grouping the backward reads: distinct ids ascending, each with its positions ascending. */
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
