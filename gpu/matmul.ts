// Matrix products: matmul (any of a/b transposed, optional accumulate and bias), the nn.Linear
// forward and backward built on it, and sumRows (the bias gradient).
//
// The kernel is register-blocked: each invocation computes a 4×4 block of the output in
// registers, stepping k four at a time with vec4 loads, and uses no workgroup memory. On CPU
// adapters (llvmpipe/lavapipe) barriers are expensive and this beats shared-memory tiling by
// 5-20×. Which kernel and workgroup shape an adapter gets is decided in `matmulKernel` alone.
//
// Layouts: a is [M,K] (or [K,M] when transA), b is [K,N] (or [N,K] when transB), out is
// [M,N], all row-major. An operand is bound as array<vec4f> when its row stride is a multiple
// of 4 (every vec4 then lies inside one row), otherwise as array<f32> read one scalar at a time.
// Rows and columns past M and N are clamped to the last one on load (their results are never
// stored), and a K that is not a multiple of 4 ends with a one-k-at-a-time tail loop.

import { Gpu, Tensor } from "./device.ts";

export interface MatmulShape {
  M: number;
  N: number;
  K: number;
}

export interface MatmulOptions {
  transA?: boolean;
  transB?: boolean;
  accumulate?: boolean;
  bias?: Tensor;
}

interface KernelChoice {
  /** Invocations per workgroup along n blocks (x) and m blocks (y). */
  workgroup: [number, number];
}

const choices = new WeakMap<Gpu, KernelChoice>();

/**
 * The one place the matmul kernel is chosen for an adapter. Software adapters run a workgroup
 * as SIMD lanes on one CPU core, so small workgroups of the register-blocked kernel spread work
 * over cores best. A real GPU would do better with a shared-memory tiled kernel (not written
 * yet); until then it gets the register-blocked kernel with larger workgroups.
 */
function matmulKernel(gpu: Gpu): KernelChoice {
  let choice = choices.get(gpu);
  if (!choice) {
    const info = gpu.adapter.info as GPUAdapterInfo & { isFallbackAdapter?: boolean };
    const software = info.isFallbackAdapter === true ||
      /llvmpipe|lavapipe|swiftshader|software/i.test(info.description);
    choice = { workgroup: software ? [8, 8] : [16, 16] };
    choices.set(gpu, choice);
  }
  return choice;
}

interface Variant {
  transA: boolean;
  transB: boolean;
  vecA: boolean; // a bound as array<vec4f>
  vecB: boolean;
  kTail: boolean; // K % 4 != 0
  accumulate: boolean;
  bias: boolean;
  workgroup: [number, number];
}

function matmulWgsl(v: Variant): string {
  const [wx, wy] = v.workgroup;
  const four = [0, 1, 2, 3];
  const vec4 = (f: (i: number) => string) => `vec4f(${four.map(f).join(", ")})`;
  const mat4 = (f: (i: number) => string) => `mat4x4f(${four.map(f).join(", ")})`;
  // A 4×4 tile of op(a) at step k, as a matrix whose column i holds A(m0+i, k..k+3).
  // rA[i] = first element of row m0+i of a (not transposed); cm[i] = clamped m0+i.
  const tileA = v.transA
    ? `transpose(${
      mat4((kk) =>
        v.vecA
          ? `a[((k + ${kk}u) * p.M + m0) / 4u]`
          : vec4((i) => `a[(k + ${kk}u) * p.M + cm[${i}]]`)
      )
    })`
    : mat4((i) => v.vecA ? `a[(rA[${i}] + k) / 4u]` : vec4((kk) => `a[rA[${i}] + k + ${kk}u]`));
  // A 4×4 tile of op(b) at step k, as a matrix whose column kk holds B(k+kk, n0..n0+3).
  const tileB = v.transB
    ? `transpose(${
      mat4((j) => v.vecB ? `b[(rB[${j}] + k) / 4u]` : vec4((kk) => `b[rB[${j}] + k + ${kk}u]`))
    })`
    : mat4((kk) =>
      v.vecB ? `b[((k + ${kk}u) * p.N + n0) / 4u]` : vec4((j) => `b[(k + ${kk}u) * p.N + cn[${j}]]`)
    );
  // One k of the tail (only when K % 4 != 0, so a row stride of K means scalar binding).
  const sliceA = v.transA
    ? (v.vecA ? `a[(k * p.M + m0) / 4u]` : vec4((i) => `a[k * p.M + cm[${i}]]`))
    : vec4((i) => `a[rA[${i}] + k]`);
  const sliceB = v.transB
    ? vec4((j) => `b[rB[${j}] + k]`)
    : (v.vecB ? `b[(k * p.N + n0) / 4u]` : vec4((j) => `b[k * p.N + cn[${j}]]`));
  const tail = v.kTail
    ? `
  for (var k = k4; k < p.K; k++) {
    let av = ${sliceA};
    let bv = ${sliceB};
    acc += mat4x4f(bv * av.x, bv * av.y, bv * av.z, bv * av.w);
  }`
    : "";
  let value = "acc[i][j]";
  if (v.accumulate) value = `out[o] + ${value}`;
  if (v.bias) value += " + bias[n]";
  return `
struct Params { M: u32, N: u32, K: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<${v.vecA ? "vec4f" : "f32"}>;
@group(0) @binding(2) var<storage, read> b: array<${v.vecB ? "vec4f" : "f32"}>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
${v.bias ? "@group(0) @binding(4) var<storage, read> bias: array<f32>;" : ""}

@compute @workgroup_size(${wx}, ${wy})
fn main(@builtin(global_invocation_id) gid: vec3u, @builtin(local_invocation_id) lid: vec3u,
        @builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u) {
  let n0 = gid.x * 4u;
  let m0 = ((wid.z * nwg.y + wid.y) * ${wy}u + lid.y) * 4u;
  if (n0 >= p.N || m0 >= p.M) { return; }
  let cm = vec4u(m0, min(m0 + 1u, p.M - 1u), min(m0 + 2u, p.M - 1u), min(m0 + 3u, p.M - 1u));
  let cn = vec4u(n0, min(n0 + 1u, p.N - 1u), min(n0 + 2u, p.N - 1u), min(n0 + 3u, p.N - 1u));
  let rA = cm * p.K;
  let rB = cn * p.K;
  let k4 = p.K & ~3u;
  var acc = mat4x4f();
  for (var k = 0u; k < k4; k += 4u) {
    acc += ${tileB} * ${tileA};
  }${tail}
  for (var i = 0u; i < 4u; i++) {
    let m = m0 + i;
    for (var j = 0u; j < 4u; j++) {
      let n = n0 + j;
      if (m < p.M && n < p.N) {
        let o = m * p.N + n;
        out[o] = ${value};
      }
    }
  }
}
`;
}

/** out[M,N] (+)= op(a)·op(b) (+ bias[N]); op transposes a [K,M] / b [N,K] when asked. */
export function matmul(
  gpu: Gpu,
  a: Tensor,
  b: Tensor,
  out: Tensor,
  shape: MatmulShape,
  opts: MatmulOptions = {},
): void {
  const { M, N, K } = shape;
  if (M === 0 || N === 0) return;
  const transA = opts.transA ?? false;
  const transB = opts.transB ?? false;
  const accumulate = opts.accumulate ?? false;
  const { workgroup } = matmulKernel(gpu);
  const variant: Variant = {
    transA,
    transB,
    vecA: (transA ? M : K) % 4 === 0,
    vecB: (transB ? K : N) % 4 === 0,
    kTail: K % 4 !== 0,
    accumulate,
    bias: opts.bias !== undefined,
    workgroup,
  };
  const pipeline = gpu.pipeline(matmulWgsl(variant), "matmul");
  // x covers blocks of 4 columns; blocks of 4 rows spread over y and, past 65535, z.
  const gx = Math.ceil(N / 4 / workgroup[0]);
  const rowGroups = Math.ceil(M / 4 / workgroup[1]);
  const gz = Math.ceil(rowGroups / 65535);
  const tensors = opts.bias ? [a, b, out, opts.bias] : [a, b, out];
  gpu.dispatch(pipeline, [gx, Math.ceil(rowGroups / gz), gz], tensors, [M, N, K]);
}

/** y[T,out] = x[T,in]·Wᵀ + bias, with W [out,in] (PyTorch nn.Linear layout). */
export function linear(gpu: Gpu, x: Tensor, w: Tensor, bias: Tensor | null, y: Tensor, T: number) {
  const [outF, inF] = w.shape;
  matmul(gpu, x, w, y, { M: T, N: outF, K: inF }, { transB: true, bias: bias ?? undefined });
}

export interface LinearGrads {
  dx?: Tensor;
  dxAccumulate?: boolean;
  dw?: Tensor;
  db?: Tensor;
  accumulateParams?: boolean;
}

/** dx (+)= dy·W ; dW (+)= dyᵀ·x ; db (+)= Σ_t dy[t,:]. Omitted outputs are not computed. */
export function linearBackward(
  gpu: Gpu,
  x: Tensor,
  w: Tensor,
  dy: Tensor,
  T: number,
  grads: LinearGrads,
): void {
  const [outF, inF] = w.shape;
  const accumulate = grads.accumulateParams ?? false;
  if (grads.dx) {
    matmul(gpu, dy, w, grads.dx, { M: T, N: inF, K: outF }, {
      accumulate: grads.dxAccumulate ?? false,
    });
  }
  if (grads.dw) {
    matmul(gpu, dy, x, grads.dw, { M: outF, N: inF, K: T }, { transA: true, accumulate });
  }
  if (grads.db) sumRows(gpu, dy, grads.db, T, outF, accumulate);
}

const SUM_ROWS_SIZE = 64;

function sumRowsWgsl(accumulate: boolean): string {
  return `
struct Params { M: u32, N: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(${SUM_ROWS_SIZE})
fn main(@builtin(global_invocation_id) gid: vec3u) {
  let n = gid.x;
  if (n >= p.N) { return; }
  var s = 0.0;
  for (var m = 0u; m < p.M; m++) { s += x[m * p.N + n]; }
  out[n] = ${accumulate ? "out[n] + s" : "s"};
}
`;
}

/** out[N] (+)= Σ_m x[m,:], one invocation per column summing rows in order (deterministic). */
export function sumRows(
  gpu: Gpu,
  x: Tensor,
  out: Tensor,
  M: number,
  N: number,
  accumulate: boolean,
): void {
  const pipeline = gpu.pipeline(sumRowsWgsl(accumulate), "sumRows");
  gpu.dispatch(pipeline, [Math.ceil(N / SUM_ROWS_SIZE)], [x, out], [M, N]);
}
