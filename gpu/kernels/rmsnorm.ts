// RMSNorm over rows of x [T, H]: y = x · rstd · w with rstd[t] = 1/sqrt(mean_j x[t,j]² + eps),
// saved for the backward. One invocation owns one row and sums it in order: on llvmpipe this
// beat one workgroup per row with a tree reduction (barriers are slow there).
// Backward, with g = w·dy:  dx = rstd·g − x·rstd³·mean_j(x·g)   and   dw[j] = Σ_t dy·x·rstd.
// dw is summed over t in two fixed-order stages: blocks of CHUNK rows, then the blocks.
// In the vec4 form x, w and dy are read through `Gpu.input` (texture copies on software
// adapters, where a texel costs a third of a storage load).

import { type Gpu, grid, Tensor, vec4Input } from "../device.ts";

const ROWS_WG = 32;
const WG = 256;
const CHUNK = 64;
// The dw partials kernel's workgroup: small, so that a hidden size of 64 over 1,024 rows (16 × 16
// vec4 partials) runs as several workgroups on every CPU thread, not one on one.
const CHUNKS_WG = 32;

/** Which inputs a vec4 kernel reads from texture copies. */
interface Textures {
  x: boolean;
  w: boolean;
  dy: boolean;
}
const STORAGE: Textures = { x: false, w: false, dy: false };

/**
 * The kernels over rows of f32 values (`vec` false) or, when H is a multiple of 4, of vec4s:
 * on llvmpipe each load is a loop over the SIMD lanes, so a vec4 load costs about a scalar's.
 * A vec4 row sum keeps four running sums (columns j ≡ 0, 1, 2, 3 mod 4) added at the end.
 */
function kernels(vec: boolean, textures: Textures = STORAGE) {
  const type = vec ? "vec4f" : "f32";
  // Input `name`'s declaration at `binding`, and the load of its element (vec4) i.
  const decl = (binding: number, name: keyof Textures) =>
    vec
      ? vec4Input(binding, name, textures[name])
      : `@group(0) @binding(${binding}) var<storage, read> ${name}: array<f32>;`;
  const at = (name: keyof Textures, i: string) => vec ? `${name}_at(${i})` : `${name}[${i}]`;
  const width = vec ? "(p.H / 4u)" : "p.H"; // elements of `type` per row
  const total = (v: string) => (vec ? `dot(${v}, vec4f(1.0))` : v);
  const forward = `
struct Params { T: u32, H: u32, eps: f32 }
@group(0) @binding(0) var<uniform> p: Params;
${decl(1, "x")}
${decl(2, "w")}
@group(0) @binding(3) var<storage, read_write> y: array<${type}>;
@group(0) @binding(4) var<storage, read_write> rstd: array<f32>;

@compute @workgroup_size(${ROWS_WG})
fn main(@builtin(global_invocation_id) gid: vec3u, @builtin(num_workgroups) nwg: vec3u) {
  let t = gid.x + gid.y * nwg.x * ${ROWS_WG}u;
  if (t >= p.T) { return; }
  let row = t * ${width};
  var sumSq = ${type}(0.0);
  for (var j = 0u; j < ${width}; j++) {
    let v = ${at("x", "row + j")};
    sumSq += v * v;
  }
  let r = inverseSqrt(${total("sumSq")} / f32(p.H) + p.eps);
  rstd[t] = r;
  for (var j = 0u; j < ${width}; j++) {
    y[row + j] = ${at("x", "row + j")} * r * ${at("w", "j")};
  }
}`;
  const backwardDx = `
struct Params { T: u32, H: u32, accumulate: u32 }
@group(0) @binding(0) var<uniform> p: Params;
${decl(1, "x")}
${decl(2, "w")}
@group(0) @binding(3) var<storage, read> rstd: array<f32>;
${decl(4, "dy")}
@group(0) @binding(5) var<storage, read_write> dx: array<${type}>;

@compute @workgroup_size(${ROWS_WG})
fn main(@builtin(global_invocation_id) gid: vec3u, @builtin(num_workgroups) nwg: vec3u) {
  let t = gid.x + gid.y * nwg.x * ${ROWS_WG}u;
  if (t >= p.T) { return; }
  let row = t * ${width};
  let r = rstd[t];
  var sumXg = ${type}(0.0);
  for (var j = 0u; j < ${width}; j++) {
    sumXg += ${at("x", "row + j")} * ${at("w", "j")} * ${at("dy", "row + j")};
  }
  let c = r * r * r * ${total("sumXg")} / f32(p.H);
  for (var j = 0u; j < ${width}; j++) {
    let g = r * ${at("w", "j")} * ${at("dy", "row + j")} - ${at("x", "row + j")} * c;
    if (p.accumulate != 0u) { dx[row + j] += g; } else { dx[row + j] = g; }
  }
}`;
  // partial[c, j] = Σ over rows t of chunk c of dy[t,j]·x[t,j]·rstd[t] (j in units of type).
  const backwardDwChunks = `
struct Params { T: u32, H: u32, chunks: u32 }
@group(0) @binding(0) var<uniform> p: Params;
${decl(1, "x")}
@group(0) @binding(2) var<storage, read> rstd: array<f32>;
${decl(3, "dy")}
@group(0) @binding(4) var<storage, read_write> partial: array<${type}>;

@compute @workgroup_size(${CHUNKS_WG})
fn main(@builtin(global_invocation_id) gid: vec3u, @builtin(num_workgroups) nwg: vec3u) {
  let i = gid.x + gid.y * nwg.x * ${CHUNKS_WG}u;
  let width = ${width};
  if (i >= p.chunks * width) { return; }
  let c = i / width;
  let j = i - c * width;
  var sum = ${type}(0.0);
  for (var t = c * ${CHUNK}u; t < min(p.T, (c + 1u) * ${CHUNK}u); t++) {
    sum += ${at("dy", "t * width + j")} * ${at("x", "t * width + j")} * rstd[t];
  }
  partial[i] = sum;
}`;
  // dw[j] (+)= Σ_c partial[c, j].
  const backwardDwSum = `
struct Params { H: u32, chunks: u32, accumulate: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> partial: array<${type}>;
@group(0) @binding(2) var<storage, read_write> dw: array<${type}>;

@compute @workgroup_size(${WG})
fn main(@builtin(global_invocation_id) gid: vec3u, @builtin(num_workgroups) nwg: vec3u) {
  let j = gid.x + gid.y * nwg.x * ${WG}u;
  let width = ${width};
  if (j >= width) { return; }
  var sum = ${type}(0.0);
  for (var c = 0u; c < p.chunks; c++) {
    sum += partial[c * width + j];
  }
  if (p.accumulate != 0u) { dw[j] += sum; } else { dw[j] = sum; }
}`;
  return { forward, backwardDx, backwardDwChunks, backwardDwSum };
}

const SCALAR = kernels(false);

/**
 * Bind the vec4 kernels' inputs through `Gpu.input` (only x's and dy's first T rows are read);
 * the kernels that read them so.
 */
function bindInputs(
  gpu: Gpu,
  vec: boolean,
  T: number,
  inputs: { x: Tensor; w: Tensor; dy?: Tensor },
) {
  if (!vec) return { x: inputs.x, w: inputs.w, dy: inputs.dy, k: SCALAR };
  const H = inputs.w.shape[0], rows = (t: Tensor) => t.view(0, [T, H]);
  // x and dy are read twice, w once a row.
  const x = gpu.input("input 0", rows(inputs.x), (T * H) / 2);
  const w = gpu.input("input 1", inputs.w, (T * H) / 4);
  const dy = inputs.dy && gpu.input("input 2", rows(inputs.dy), (T * H) / 2);
  const texture = (t: unknown) => !(t instanceof Tensor);
  const k = kernels(true, { x: texture(x), w: texture(w), dy: texture(dy) });
  return { x, w, dy, k };
}

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
  const H = w.shape[0], b = bindInputs(gpu, H % 4 === 0, T, { x, w });
  gpu.dispatch(gpu.pipeline(b.k.forward, "rmsnorm"), grid(T, ROWS_WG), [b.x, b.w, y, rstd], [
    T,
    H,
  ], [eps]);
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
  const H = w.shape[0], width = H % 4 === 0 ? H / 4 : H;
  const b = bindInputs(gpu, H % 4 === 0, T, { x, w, dy });
  const chunks = Math.ceil(T / CHUNK);
  gpu.dispatch(
    gpu.pipeline(b.k.backwardDx, "rmsnormBackwardDx"),
    grid(T, ROWS_WG),
    [b.x, b.w, rstd, b.dy!, dx],
    [T, H, opts.accumulateDx ? 1 : 0],
  );
  if (!dw) return;
  const partial = gpu.scratch("rmsnorm dw partials", chunks * H);
  gpu.dispatch(
    gpu.pipeline(b.k.backwardDwChunks, "rmsnormBackwardDwChunks"),
    grid(chunks * width, CHUNKS_WG),
    [b.x, rstd, b.dy!, partial],
    [T, H, chunks],
  );
  gpu.dispatch(
    gpu.pipeline(b.k.backwardDwSum, "rmsnormBackwardDwSum"),
    grid(width, WG),
    [partial, dw],
    [H, chunks, opts.accumulateDw ? 1 : 0],
  );
}
