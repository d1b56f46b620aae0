// Matrix products: matmul (any of a/b transposed, optional accumulate and bias), the nn.Linear
// forward and backward built on it, and sumRows (the bias gradient).
//
// The kernel is register-blocked: each invocation keeps a block of out (up to 16×16) in
// registers as 4×4 matrices, steps k four at a time (eight in long products: `pairedSteps`)
// loading 4×4 tiles of a and b as vec4s, and uses no workgroup memory. On CPU adapters
// (llvmpipe/lavapipe) barriers are expensive and this beats shared-memory tiling by 10× or more.
// The block and workgroup shapes for an adapter and a product are decided in `matmulKernel` alone.
//
// On CPU adapters the loads are the cost: Mesa's gallivm reads a storage buffer lane by lane in
// a loop with a branch per lane, but fetches texels as a plain gather. So there an operand read
// by many invocations is first copied (`Gpu.textureCopy`, a memcpy on a CPU adapter) into a
// texture, one texel per vec4 (rgba32float, or rg32uint for a 16-bit weight), and read with
// textureLoad: the 0.5B MLP product x·Wᵀ went from 16 to 27 GFLOPS on llvmpipe, its input
// gradient dy·W from 10 to 24; over a bf16 weight, 178 → 128 and 230 → 128 ms. The copies lie
// by the matrices' rows (`Gpu.matrixRows`): in one band a row's vec4 t is texel (t, row), so a
// tile's loads share their column and the loop works out no coordinates (x·Wᵀ 512×4864×896:
// 3–8% faster than copies in TEXTURE_ROW order). b's rows are padded when their addresses would
// share their low bits and evict one another from the CPU's caches, and a weight too tall for
// one band lies in bands of rows, which the kernel finds by shifts and masks (`rowsB`).
//
// Layouts: a is [M,K] (or [K,M] when transA), b is [K,N] (or [N,K] when transB), out is
// [M,N], all row-major. An operand is bound as array<vec4f> when its row stride is a multiple
// of 4 (every vec4 then lies inside one row), otherwise as array<f32> read one scalar at a time.
// Rows and columns past M and N are clamped to the last one on load (their results are never
// stored), and a K that is not a multiple of 4 ends with a one-k-at-a-time tail loop. a and out
// may be column blocks of wider matrices (a weight kept as row slices writes its block of the
// output's columns, and its backward reads the same block of the output's gradient).
// b may be a frozen weight stored in 16 bits (bf16 packed two to a u32, widened with a shift and
// a bitcast, which every adapter can do; or f16 behind shader-f16): it is widened to f32 as it
// is loaded, so the products and sums are the f32 kernel's own.
// On software adapters the register-blocked kernel can also fold an RMSNorm of a into the product
// and apply SwiGLU to a gate/up product's halves (the `rmsnorm` and `swiglu` options: generation's
// decode steps, whose small dispatches cost more in waking threads than in work).

import { AhaError } from "../../core/errors.ts";
import {
  Gpu,
  grid,
  Tensor,
  texelLoad,
  textureDecl,
  type TextureRows,
  vec4Input,
} from "../device.ts";
import type { KeptTextures } from "../kept_textures.ts";

export interface MatmulShape {
  M: number;
  N: number;
  K: number;
}

/** Columns [first, first + width) of a row-major matrix whose rows are `stride` elements apart. */
export interface ColumnBlock {
  stride: number;
  first: number;
}

export interface MatmulOptions {
  transA?: boolean;
  transB?: boolean;
  accumulate?: boolean;
  /** Indexed by out's column in the whole matrix when out is a block. */
  bias?: Tensor;
  /** a as a block of a wider matrix (its width is K, or M when transA). */
  aBlock?: ColumnBlock;
  /** out as a block of a wider matrix (its width is N). */
  outBlock?: ColumnBlock;
  /** Force a kernel (tests); else AHA_MATMUL, else the adapter decides (`matmulKernel`). */
  kernel?: MatmulKernel;
  /**
   * Make the register-blocked kernel read its vec4 operands from texture copies, or not
   * (tests); by default it does on software adapters for products large enough (`matmul`).
   */
  textures?: boolean;
  /**
   * b is a weight whose texture copy these keep across calls (software adapters): copied when
   * new or stale rather than at every call.
   */
  keptB?: KeptTextures;
  /** Force the register-blocked kernel's block on a software adapter (tests): one of BLOCKS. */
  block?: { rowGroups: number; colGroups: number };
  /**
   * a is an RMSNorm's input and the product reads its output: row m of a scaled by
   * 1/sqrt(mean_k a[m,k]² + eps) and column k by weight[k] (`generationFusions`). The weight's
   * texture copy is kept in `kept` when given, else made per call.
   */
  rmsnorm?: { weight: Tensor; eps: number; kept?: KeptTextures };
  /**
   * out [M, N/2] = silu(g)·u with g and u the product's first and second halves of columns:
   * SwiGLU on the fused gate/up product (`generationFusions`).
   */
  swiglu?: boolean;
  /**
   * out = scale·(op(a)·op(b)), the product's sum times scale as it is stored: LoRA's u = s·(x·Aᵀ)
   * without a dispatch of its own. Not with accumulate, bias or swiglu.
   */
  scale?: number;
}

/**
 * Which of the `rmsnorm` and `swiglu` options generation uses for a model. They exist in the
 * register-blocked kernel (software adapters), for hidden and intermediate sizes that are
 * multiples of 4. A decode step's products are small and on llvmpipe each dispatch costs ~130 µs
 * of waking threads, so applying the activation inside the gate/up product, and folding the
 * norms into the products that read them, takes dispatches away (7 of the 23 of a tiny model's
 * decode step). A folded norm costs every invocation work at every step of k, though: against a
 * separate RMSNorm kernel it was 0.5–0.9× the time at hidden sizes of 32–256 and 1.0–1.2× at 512
 * and 896 (decode- and prefill-sized products on the 2-core llvmpipe), so norms fold only up to
 * FOLDED_NORM_MAX_HIDDEN. Training keeps the separate kernels, whose outputs its backward reads.
 */
export function generationFusions(
  gpu: Gpu,
  hidden: number,
  intermediate: number,
): { norms: boolean; swiglu: boolean } {
  const swiglu = gpu.software && (envKernel() ?? "blocked") === "blocked" && hidden % 4 === 0 &&
    intermediate % 4 === 0;
  return { norms: swiglu && hidden <= FOLDED_NORM_MAX_HIDDEN, swiglu };
}

/** The largest hidden size whose RMSNorms generation folds into products (generationFusions). */
export const FOLDED_NORM_MAX_HIDDEN = 256;

/**
 * "blocked": register blocks, no workgroup memory (CPU adapters). "tiled": 64×64 tiles staged
 * through workgroup memory, 8 along k, 8×8 outputs per invocation (hardware GPUs).
 */
export type MatmulKernel = "blocked" | "tiled";

interface KernelChoice {
  /** Invocations per workgroup along column blocks (x) and row blocks (y). */
  workgroup: [number, number];
  /** Each invocation computes 4·rowGroups rows × 4·colGroups columns of out. */
  rowGroups: number;
  colGroups: number;
}

/** The kernel the environment forces (AHA_MATMUL=tiled|blocked), read once. */
let forcedKernel: MatmulKernel | null | undefined;
function envKernel(): MatmulKernel | null {
  if (forcedKernel === undefined) {
    let value: string | undefined;
    try {
      value = Deno.env.get("AHA_MATMUL");
    } catch {
      value = undefined; // no --allow-env: nothing forced
    }
    if (value !== undefined && value !== "" && value !== "tiled" && value !== "blocked") {
      throw new AhaError(`AHA_MATMUL must be "tiled" or "blocked", got "${value}"`);
    }
    forcedKernel = (value || null) as MatmulKernel | null;
  }
  return forcedKernel;
}

/**
 * Register blocks for software adapters, as [rowGroups, colGroups, GFLOPS]: an invocation owns
 * 4·rowGroups rows × 4·colGroups columns of out, in a workgroup of 8×8 invocations; GFLOPS is
 * the block's measured speed on a product that fills it evenly (1024×1024×896 x·Wᵀ on the
 * 2-core llvmpipe, operands read from textures). Larger blocks load less per multiply-add;
 * 32×16 ran ~10% faster than 16×16 on large products but compiles for seconds, so it is left out.
 * The 4-row blocks 4×16 and 4×8 are for products of one to four rows (decode steps of one or two
 * samples): each lane's a tile serves more columns than in a 4×4 block (over bf16 weights, three
 * alternating runs: 2×1152×896 0.39–0.49 → 0.31–0.45 ms, 1×9728×896 2.8–3.3 → 2.0–3.0 ms). They
 * ran at 1.22× the 4×4 block's speed on the AMD Zen 3 machine, so are listed at that ratio to it.
 */
export const BLOCKS: [number, number, number][] = [
  [4, 4, 22],
  [4, 2, 22],
  [2, 2, 19],
  [2, 1, 16],
  [1, 4, 17],
  [1, 2, 17],
  [1, 1, 14],
];

/** CPU threads a software adapter runs workgroups on. */
const cpuThreads = Math.max(1, navigator.hardwareConcurrency || 1);

/**
 * The one place the matmul kernel is chosen, from the adapter and the product. Hardware
 * adapters get the tiled kernel (tiledMatmulWgsl). A software adapter runs a workgroup's
 * invocations eight at a time as the SIMD lanes of one CPU core, x (columns) fastest, and every
 * lane loads its own operands; so the block an invocation owns is picked from BLOCKS by
 * modelled time: each run of 8 lanes costs its block's work over the block's speed (lanes past
 * N compute clamped copies, runs wholly past M end at once), and the CPU threads take whole
 * workgroups, each once per range of k when the product is split along k (splitKChunks). A
 * product of 64 columns thus takes 16×8 blocks rather than 16×16 ones with half the lanes idle
 * (1.5× faster on the default model's training products), a weight gradient of 64×64 over
 * 1,408 rows takes 16×8 blocks split 8 ways rather than 8×4 ones split 4 ways (1.5×), and
 * generation's few rows take small blocks in enough workgroups for every thread. Shapes that
 * are not multiples of 4 (rare in a model) get 8×8: large blocks with scalar bindings compile
 * for seconds. AHA_MATMUL=tiled|blocked or the `kernel` option overrides the choice.
 */
function matmulKernel(
  gpu: Gpu,
  M: number,
  N: number,
  K: number,
  allVec4: boolean,
  blocks: boolean,
  forced?: MatmulKernel,
  forcedBlock?: { rowGroups: number; colGroups: number },
  fused = { rmsnorm: false, swiglu: false },
): KernelChoice | "tiled" {
  const kernel = forced ?? envKernel() ?? (gpu.software ? "blocked" : "tiled");
  if (kernel === "tiled") return "tiled";
  if (!gpu.software) return { workgroup: [16, 16], rowGroups: 1, colGroups: 1 };
  if (forcedBlock) {
    if (fused.swiglu && forcedBlock.colGroups % 2 !== 0) {
      throw new Error("matmul: swiglu needs an even number of column groups");
    }
    return { workgroup: [8, 8], ...forcedBlock };
  }
  if (!allVec4) return { workgroup: [8, 8], rowGroups: 2, colGroups: 2 };
  let best: KernelChoice | null = null, bestTime = Infinity;
  for (const [rowGroups, colGroups, gflops] of BLOCKS) {
    // SwiGLU pairs each gate column group with its up group in one invocation.
    if (fused.swiglu && colGroups % 2 !== 0) continue;
    const runs = Math.ceil(M / (4 * rowGroups)); // runs of 8 lanes down the rows
    const workgroups = Math.ceil(runs / 8) * Math.ceil(N / (32 * colGroups));
    // A product split along k (splitKChunks) runs each workgroup once per range of k.
    const split = fused.rmsnorm || fused.swiglu
      ? null
      : splitKChunks(gpu, workgroups, { M, N, K }, blocks);
    const { count, kLen } = split ?? { count: 1, kLen: K };
    const runWork = 4 * rowGroups * 32 * colGroups * (kLen / K);
    const rounds = Math.ceil(workgroups * count / cpuThreads);
    const time = rounds * Math.min(8, runs) * runWork / gflops;
    if (time < bestTime) {
      bestTime = time;
      best = { workgroup: [8, 8], rowGroups, colGroups };
    }
  }
  return best!;
}

interface Variant {
  transA: boolean;
  transB: boolean;
  vecA: boolean; // a bound as array<vec4f>
  vecB: boolean;
  kTail: boolean; // K % 4 != 0
  vecOut: boolean; // out (and bias) bound as array<vec4f>: N, out's stride and first % 4 == 0
  accumulate: boolean;
  bias: boolean;
  blocks: boolean; // a and out are column blocks: strides and first columns in Params
  bType: "f32" | "bf16" | "f16"; // how b is stored
  texA: boolean; // a read from its texture copy (`Gpu.textureCopy`); only when vecA
  texB: boolean; // likewise b, also when stored in 16 bits; only when vecB
  /** How a's copy lies: in order (TEXTURE_ROW texels a row), or a's rows in one band. */
  rowsA: Layout;
  /** Likewise b's, which may also lie in bands of rows (p.rowTexelsB, p.bandShiftB, p.bandMaskB). */
  rowsB: Layout;
  tile: KernelChoice;
  /** Workgroup z picks a range of p.kLen along k; out is the partial sums [z, M, N]. */
  splitK?: boolean;
  /** k stepped 8 at a time (`pairedSteps`): only when K is a multiple of 8 and not split. */
  kPairs: boolean;
  /** a is an RMSNorm's input (`MatmulOptions.rmsnorm`): normW, p.eps. */
  rmsnorm: boolean;
  /** normW is read from its texture copy (in TEXTURE_ROW layout), not from storage. */
  normTex: boolean;
  /** With accumulate and vecOut, the old out is read from a texture copy (oldOut), not out. */
  oldOutTex: boolean;
  /** out is SwiGLU of the product's column halves (`MatmulOptions.swiglu`). */
  swiglu: boolean;
  /** out = p.scale·(the product) (`MatmulOptions.scale`). */
  scaled: boolean;
}

/**
 * How an operand's texture copy lies (`TextureRows`): "ordered" TEXTURE_ROW texels a row, or
 * by the matrix's rows: "oneBand", row r of the matrix in row r of the texture, so that its vec4
 * t is texel (t, r) with no arithmetic on the coordinates; or "bands" of rows side by side.
 */
type Layout = "ordered" | "oneBand" | "bands";

function layoutOf(rows: TextureRows | null): Layout {
  return rows === null ? "ordered" : rows.bands === 1 ? "oneBand" : "bands";
}

// b's declaration and its loads: `vec(i)` is the vec4 at vec4 index i, `one(i)` the element i;
// in a copy laid out by rows, `at(x, y)` is the vec4 at texel (x, y).
interface BLoads {
  decl: string;
  helpers: string;
  vec(i: string): string;
  one(i: string): string;
  at(x: string, y: string): string;
}

function bStorage(bType: Variant["bType"], vec: boolean, texture: boolean): BLoads {
  if (texture) {
    // A texel holds four elements: f32 as rgba32float, 16-bit as rg32uint (two halves a word,
    // the lower one first, as in storage), widened as the storage loads below do.
    const widen = bType === "bf16"
      ? "bitcast<vec4f>(vec4u(w.x << 16u, w.x & 0xffff0000u, w.y << 16u, w.y & 0xffff0000u))"
      : "vec4f(unpack2x16float(w.x), unpack2x16float(w.y))";
    return {
      decl: textureDecl("b", bType !== "f32"),
      helpers: bType === "f32" ? "" : `
fn loadB4(i: u32) -> vec4f {
  let w = ${texelLoad("b", "i")}.xy;
  return ${widen};
}
fn loadB4At(x: u32, y: u32) -> vec4f {
  let w = textureLoad(b, vec2u(x, y)).xy;
  return ${widen};
}`,
      vec: (i: string) => bType === "f32" ? texelLoad("b", i) : `loadB4(${i})`,
      at: (x: string, y: string) =>
        bType === "f32" ? `textureLoad(b, vec2u(${x}, ${y}))` : `loadB4At(${x}, ${y})`,
      one: (i: string) =>
        bType === "f32"
          ? `${texelLoad("b", `(${i}) / 4u`)}[(${i}) % 4u]`
          : `loadB4((${i}) / 4u)[(${i}) % 4u]`,
    };
  }
  if (bType === "f32") {
    return {
      decl: `var<storage, read> b: array<${vec ? "vec4f" : "f32"}>;`,
      helpers: "",
      vec: (i: string) => `b[${i}]`,
      one: (i: string) => `b[${i}]`,
      at: noTexture,
    };
  }
  if (bType === "f16") {
    return {
      decl: `var<storage, read> b: array<${vec ? "vec4<f16>" : "f16"}>;`,
      helpers: "",
      vec: (i: string) => `vec4f(b[${i}])`,
      one: (i: string) => `f32(b[${i}])`,
      at: noTexture,
    };
  }
  // bf16: element 2i is the low half of word i, 2i+1 the high half; a bf16 is an f32's top half.
  return {
    decl: `var<storage, read> b: array<${vec ? "vec2u" : "u32"}>;`,
    helpers: vec
      ? `
fn loadB4(i: u32) -> vec4f {
  let w = b[i];
  return bitcast<vec4f>(vec4u(w.x << 16u, w.x & 0xffff0000u, w.y << 16u, w.y & 0xffff0000u));
}`
      : `
fn loadB1(i: u32) -> f32 {
  let w = b[i >> 1u];
  return bitcast<f32>(select(w << 16u, w & 0xffff0000u, (i & 1u) == 1u));
}`,
    vec: (i: string) => `loadB4(${i})`,
    one: (i: string) => `loadB1(${i})`,
    at: noTexture,
  };
}

function noTexture(): string {
  throw new Error("matmul: b is read from storage, not a texture");
}

// The WGSL for one variant. An invocation owns rows m0 .. m0+4·rowGroups and columns
// n0 .. n0+4·colGroups of out; acc_r_c is the 4×4 block of row group r and column group c,
// stored as a matrix whose column i is out row m0+4r+i.
function matmulWgsl(v: Variant): string {
  const { workgroup: [wx, wy], rowGroups, colGroups } = v.tile;
  const range = (n: number) => [...Array(n).keys()];
  const bs = bStorage(v.bType, v.vecB, v.texB);
  const aVec = (i: string) => v.texA ? texelLoad("a", i) : `a[${i}]`; // the vec4 at vec4 index i
  const normAt = (i: string) => v.normTex ? texelLoad("normW", i) : `normW[${i}]`;
  const rs = range(rowGroups), cs = range(colGroups), four = range(4);
  const vec4 = (f: (i: number) => string) => `vec4f(${four.map(f).join(", ")})`;
  const mat4 = (f: (i: number) => string) => `mat4x4f(${four.map(f).join(", ")})`;
  // Where row `row` of a (a [K,M] when transA) and of out start; bias by out's whole column.
  const rowA = (row: string) =>
    v.blocks ? `${row} * p.strideA + p.firstA` : `${row} * ${v.transA ? "p.M" : "p.K"}`;
  // With swiglu, out's rows are half the product's: I = p.N / 2 columns.
  const outWidth = v.swiglu ? "(p.N / 2u)" : "p.N";
  const rowOut = (row: string) =>
    v.blocks
      ? `${row} * p.strideOut + p.firstOut`
      : v.splitK
      ? `(${row} + wid.z * p.M) * p.N`
      : `${row} * ${outWidth}`;
  const biasAt = (column: string) => v.blocks ? `(${column} + p.firstOut)` : column;
  // Row group r: cm_r = its 4 rows clamped to M-1; rA_r = where they start in a [M,K];
  // gm_r = its first row, clamped so that a vec4 along m stays inside [0, M), and tA_r the
  // texel it starts (a [K,M] in one band).
  const rowSetup = rs.map((r) =>
    `let cm${r} = clamp4(m0 + ${4 * r}u, p.M);` +
    (v.transA
      ? (v.vecA ? ` let gm${r} = min(m0 + ${4 * r}u, p.M - 4u);` : "") +
        (v.rowsA === "oneBand" ? ` let tA${r} = gm${r} / 4u;` : "")
      : v.rowsA === "oneBand"
      ? ""
      : ` let rA${r} = ${rowA(`cm${r}`)};`)
  );
  // Column group c: cn_c = its 4 columns clamped to N-1; rB_c = where they start in b [N,K];
  // gn_c = its first column, clamped so that a vec4 along n stays inside [0, N), and tB_c the
  // texel it starts (b [K,N] by rows). In bands of b [N,K]'s rows, bandB_c is where the band
  // of rows cn_c starts in the texture and yB_c their rows within it.
  // With swiglu the first half of the column groups are gate columns n0…, the second half the
  // up columns I + n0… of the same outputs (b's rows I apart).
  const half = colGroups / 2;
  const columnsOf = (c: number) =>
    !v.swiglu
      ? `clamp4(n0 + ${4 * c}u, p.N)`
      : c < half
      ? `clamp4(n0 + ${4 * c}u, p.N / 2u)`
      : `clamp4(n0 + ${4 * (c - half)}u, p.N / 2u) + vec4u(p.N / 2u)`;
  const colSetup = cs.map((c) =>
    `let cn${c} = ${columnsOf(c)};` +
    (v.transB
      ? (v.rowsB === "bands"
        ? ` let bandB${c} = (cn${c} >> vec4u(p.bandShiftB)) * p.rowTexelsB;` +
          ` let yB${c} = cn${c} & vec4u(p.bandMaskB);`
        : v.rowsB === "oneBand"
        ? ""
        : ` let rB${c} = cn${c} * p.K;`)
      : "") +
    ((v.vecOut || (v.vecB && !v.transB)) && !v.swiglu
      ? ` let gn${c} = min(n0 + ${4 * c}u, p.N - 4u);` +
        (!v.transB && v.rowsB !== "ordered" ? ` let tB${c} = gn${c} / 4u;` : "")
      : "")
  );
  // a's vec4 from element 4·t on of its row `row`, from a copy in one band.
  const aAt = (t: string, row: string) => `textureLoad(a, vec2u(${t}, ${row}))`;
  // The 4×4 tile of op(a) at step k for row group r: column i holds A(row i, k..k+3).
  const tileA = (r: number, k: string) =>
    v.transA
      ? `transpose(${
        mat4((kk) =>
          v.rowsA === "oneBand"
            ? aAt(`tA${r}`, `${k} + ${kk}u`)
            : v.vecA
            ? aVec(`(${rowA(`(${k} + ${kk}u)`)} + gm${r}) / 4u`)
            : vec4((i) => `a[${rowA(`(${k} + ${kk}u)`)} + cm${r}[${i}]]`)
        )
      })`
      : mat4((i) =>
        v.rowsA === "oneBand"
          ? aAt(`(${k}) / 4u`, `cm${r}[${i}]`)
          : v.vecA
          ? aVec(`(rA${r}[${i}] + ${k}) / 4u`)
          : vec4((kk) => `a[rA${r}[${i}] + ${k} + ${kk}u]`)
      );
  // b's vec4 from element 4·t on of its row `row`, from a copy laid out by rows.
  const bRow = (row: string, t: string) =>
    v.rowsB === "oneBand"
      ? bs.at(t, row)
      : bs.at(`((${row}) >> p.bandShiftB) * p.rowTexelsB + ${t}`, `(${row}) & p.bandMaskB`);
  // The 4×4 tile of op(b) at step k for column group c: column kk holds B(k+kk, cols).
  const tileB = (c: number, k: string) =>
    v.transB
      ? `transpose(${
        mat4((j) =>
          v.rowsB === "oneBand"
            ? bs.at(`(${k}) / 4u`, `cn${c}[${j}]`)
            : v.rowsB === "bands"
            ? bs.at(`bandB${c}[${j}] + (${k}) / 4u`, `yB${c}[${j}]`)
            : v.vecB
            ? bs.vec(`(rB${c}[${j}] + ${k}) / 4u`)
            : vec4((kk) => bs.one(`rB${c}[${j}] + ${k} + ${kk}u`))
        )
      })`
      : mat4((kk) =>
        v.rowsB !== "ordered"
          ? bRow(`${k} + ${kk}u`, `tB${c}`)
          : v.vecB
          ? bs.vec(`((${k} + ${kk}u) * p.N + gn${c}) / 4u`)
          : vec4((j) => bs.one(`(${k} + ${kk}u) * p.N + cn${c}[${j}]`))
      );
  // The tiles of one step of 4 along k, from k on, named A<r><name> and B<c><name>. With
  // rmsnorm, a's tiles add their squares to ss<r> and are scaled along k by the norm's weight.
  const tiles = (k: string, name: string) =>
    [
      ...(v.rmsnorm ? [`let g${name} = ${normAt(`(${k}) / 4u`)};`] : []),
      ...rs.map((r) =>
        v.rmsnorm
          ? `let A${r}${name} = normTile(${tileA(r, k)}, g${name}, &ss${r});`
          : `let A${r}${name} = ${tileA(r, k)};`
      ),
      ...cs.map((c) => `let B${c}${name} = ${tileB(c, k)};`),
    ].join("\n    ");
  // One k of the tail (only when K % 4 != 0, so a row stride of K means a scalar binding).
  const sliceA = (r: number) =>
    v.transA
      ? (v.rowsA === "oneBand"
        ? aAt(`tA${r}`, "k")
        : v.vecA
        ? aVec(`(${rowA("k")} + gm${r}) / 4u`)
        : vec4((i) => `a[${rowA("k")} + cm${r}[${i}]]`))
      : vec4((i) => `a[rA${r}[${i}] + k]`);
  const sliceB = (c: number) =>
    v.transB
      ? vec4((j) => bs.one(`rB${c}[${j}] + k`)) // K % 4 != 0: never a texture
      : v.rowsB !== "ordered"
      ? bRow("k", `tB${c}`)
      : (v.vecB
        ? bs.vec(`(k * p.N + gn${c}) / 4u`)
        : vec4((j) => bs.one(`k * p.N + cn${c}[${j}]`)));
  const blocks = rs.flatMap((r) => cs.map((c) => [r, c]));
  const lines = (f: (r: number, c: number) => string) =>
    blocks.map(([r, c]) => f(r, c)).join("\n    ");
  // Row i of block (r, c) gains Σ B_c[kk]·A_r[i][kk] over the pass's k (the tiles named in
  // `steps`), summed first and then added to the accumulator once: a row of 4 columns at a time,
  // each row's A values reused across the column groups. Written as the 4×4 products B_c·A_r
  // instead, LLVM computed every product of the pass before adding any, and spilled them all.
  const component = ["x", "y", "z", "w"];
  const rowProducts = (r: number, c: number, i: number, steps: string[]) =>
    steps.flatMap((s) => four.map((kk) => `B${c}${s}[${kk}] * A${r}${s}[${i}].${component[kk]}`))
      .join(" + ");
  const addProducts = (steps: string[]) =>
    rs.flatMap((r) =>
      four.flatMap((i) => cs.map((c) => `acc${r}_${c}[${i}] += ${rowProducts(r, c, i, steps)};`))
    ).join("\n    ");
  // Steps of 4 along k, or of 8 (kPairs), the two steps' products summed before they are added
  // to the accumulators.
  const loop = v.kPairs
    ? `for (var k = kBegin; k < k4; k += 8u) {
    ${tiles("k", "")}
    ${tiles("(k + 4u)", "_4")}
    ${addProducts(["", "_4"])}
  }`
    : `for (var k = kBegin; k < k4; k += 4u) {
    ${tiles("k", "")}
    ${addProducts([""])}
  }`;
  const tail = v.kTail
    ? `
  for (var k = k4; k < kEnd; k++) {
    ${rs.map((r) => `let av${r} = ${sliceA(r)};`).join(" ")}
    ${cs.map((c) => `let bv${c} = ${sliceB(c)};`).join(" ")}
    ${
      lines((r, c) =>
        `acc${r}_${c} += mat4x4f(${four.map((i) => `bv${c} * av${r}[${i}]`).join(", ")});`
      )
    }
  }`
    : "";
  // acc starts from the old out (accumulate) and the bias, read at clamped indices, so the
  // stores at the end need no loads: masked memory accesses make llvmpipe compile slowly.
  const oldOut = (r: number, c: number, i: number) =>
    v.vecOut
      ? (v.oldOutTex
        ? texelLoad("oldOut", `(${rowOut(`cm${r}[${i}]`)} + gn${c}) / 4u`)
        : `out[(${rowOut(`cm${r}[${i}]`)} + gn${c}) / 4u]`)
      : vec4((j) => `out[${rowOut(`cm${r}[${i}]`)} + cn${c}[${j}]]`);
  const biasSetup = cs.map((c) =>
    v.vecOut
      ? `let bias${c} = bias[${biasAt(`gn${c}`)} / 4u];`
      : `let bias${c} = ${vec4((j) => `bias[${biasAt(`cn${c}[${j}]`)}]`)};`
  );
  // With rmsnorm, acc starts from zero; the rows' scales and the bias come after the loop.
  const init = blocks.map(([r, c]) => {
    const columns = four.map((i) => {
      const terms = [];
      if (v.accumulate) terms.push(oldOut(r, c, i));
      if (v.bias && !v.rmsnorm) terms.push(`bias${c}`);
      return terms.join(" + ") || "vec4f()";
    });
    return `var acc${r}_${c} = mat4x4f(${columns.join(", ")});`;
  });
  const normSums = v.rmsnorm ? rs.map((r) => `var ss${r} = vec4f();`) : [];
  // Row i of row group r times 1/sqrt(mean of its squares + eps), plus the bias.
  const normScales = v.rmsnorm
    ? [
      ...rs.map((r) => `let rs${r} = inverseSqrt(ss${r} / f32(p.K) + p.eps);`),
      ...blocks.map(([r, c]) =>
        `acc${r}_${c} = mat4x4f(${
          four.map((i) => `acc${r}_${c}[${i}] * rs${r}[${i}]${v.bias ? ` + bias${c}` : ""}`)
            .join(", ")
        });`
      ),
    ]
    : [];
  // Stores, fully unrolled: a dynamic index into acc would push it out of registers. With
  // swiglu, the gate groups' blocks store silu(gate)·up; scaled, every value is times p.scale.
  const scaleBy = v.scaled ? " * p.scale" : "";
  const stores = blocks.flatMap(([r, c]) =>
    four.map((i) => {
      if (v.swiglu) {
        if (c >= half) return "";
        return `if (m0 + ${4 * r + i}u < p.M && n0 + ${4 * c}u < p.N / 2u) { out[(${
          rowOut(`(m0 + ${4 * r + i}u)`)
        } + n0) / 4u + ${c}u] = silu(acc${r}_${c}[${i}]) * acc${r}_${c + half}[${i}]; }`;
      }
      const m = `m0 + ${4 * r + i}u`;
      if (v.vecOut) {
        return `if (${m} < p.M && n0 + ${4 * c}u < p.N) { out[(${
          rowOut(`(${m})`)
        } + n0) / 4u + ${c}u] = acc${r}_${c}[${i}]${scaleBy}; }`;
      }
      const row = four.map((j) =>
        `if (n0 + ${4 * c + j}u < p.N) { out[o + ${j}u] = acc${r}_${c}[${i}][${j}]${scaleBy}; }`
      );
      return `if (${m} < p.M) {\n    let o = ${rowOut(`(${m})`)} + n0 + ${4 * c}u;\n    ${
        row.join("\n    ")
      }\n  }`;
    })
  );
  const outType = v.vecOut ? "vec4f" : "f32";
  return `${v.bType === "f16" ? "enable f16;" : ""}
struct Params { M: u32, N: u32, K: u32${
    v.blocks ? ", strideA: u32, firstA: u32, strideOut: u32, firstOut: u32" : ""
  }${v.splitK ? ", kLen: u32" : ""}${
    v.rowsB === "bands" ? ", rowTexelsB: u32, bandShiftB: u32, bandMaskB: u32" : ""
  }${v.rmsnorm ? ", eps: f32" : ""}${v.scaled ? ", scale: f32" : ""} }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) ${
    v.texA ? textureDecl("a") : `var<storage, read> a: array<${v.vecA ? "vec4f" : "f32"}>;`
  }
@group(0) @binding(2) ${bs.decl}
@group(0) @binding(3) var<storage, read_write> out: array<${outType}>;
${v.bias ? `@group(0) @binding(4) var<storage, read> bias: array<${outType}>;` : ""}
${
    v.rmsnorm
      ? `@group(0) @binding(${v.bias ? 5 : 4}) ${
        v.normTex ? textureDecl("normW") : "var<storage, read> normW: array<vec4f>;"
      }

// a's 4×4 tile (column i: row i's four k) scaled along k by g; its rows' squares added to ss.
fn normTile(t: mat4x4f, g: vec4f, ss: ptr<function, vec4f>) -> mat4x4f {
  *ss += vec4f(dot(t[0], t[0]), dot(t[1], t[1]), dot(t[2], t[2]), dot(t[3], t[3]));
  return mat4x4f(t[0] * g, t[1] * g, t[2] * g, t[3] * g);
}`
      : ""
  }
${
    v.oldOutTex
      ? `@group(0) @binding(${4 + Number(v.bias) + Number(v.rmsnorm)}) ${textureDecl("oldOut")}`
      : ""
  }
${
    v.swiglu
      ? `
// silu(g) = g·σ(g), σ from exp(−|g|) as kernels/swiglu.ts computes it.
fn silu(g: vec4f) -> vec4f {
  let e = exp(-abs(g));
  return g * select(e / (1.0 + e), 1.0 / (1.0 + e), g >= vec4f(0.0));
}`
      : ""
  }

${bs.helpers}

// Indices first .. first+3, clamped to n-1.
fn clamp4(first: u32, n: u32) -> vec4u {
  return min(vec4u(first) + vec4u(0u, 1u, 2u, 3u), vec4u(n - 1u));
}

@compute @workgroup_size(${wx}, ${wy})
fn main(@builtin(global_invocation_id) gid: vec3u, @builtin(local_invocation_id) lid: vec3u,
        @builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u) {
  let n0 = gid.x * ${4 * (v.swiglu ? half : colGroups)}u;
  let m0 = ((${v.splitK ? "" : "wid.z * nwg.y + "}wid.y) * ${wy}u + lid.y) * ${4 * rowGroups}u;
  if (n0 >= ${outWidth} || m0 >= p.M) { return; }
  let kBegin = ${v.splitK ? "wid.z * p.kLen" : "0u"};
  let kEnd = ${v.splitK ? "min(p.K, kBegin + p.kLen)" : "p.K"};
  ${rowSetup.join("\n  ")}
  ${colSetup.join("\n  ")}
  ${v.bias ? biasSetup.join("\n  ") : ""}
  ${init.join("\n  ")}
  ${normSums.join("\n  ")}
  let k4 = kBegin + ((kEnd - kBegin) & ~3u);
  ${loop}${tail}
  ${normScales.join("\n  ")}
  ${stores.filter((line) => line).join("\n  ")}
}
`;
}

/** How a tensor read as a float operand is stored. */
function storedAs(t: Tensor): Variant["bType"] {
  if (t.dtype === "bf16" || t.dtype === "f16" || t.dtype === "f32") return t.dtype;
  throw new Error(`matmul: b must be f32, bf16 or f16, got ${t.dtype}`);
}

// ---- the tiled kernel, for hardware GPUs ------------------------------------------------------
//
// A workgroup of 8×8 invocations owns a 64×64 tile of out. Per step of 8 along k it stages the
// 64×8 slice of op(a) and the 8×64 slice of op(b) in workgroup memory (coalesced: neighbouring
// invocations load neighbouring elements of whichever dimension is contiguous in memory, four
// at a time as a vec4 when that dimension is a multiple of 4), then each invocation multiplies
// its 8 rows × 8 columns from there. Loads past M, N or K read zero; stores are bounds-checked.

/** Rows and columns of out per workgroup, and k per staged slice. */
const TILE = 64;
const TILE_K = 8;

interface TiledVariant {
  transA: boolean;
  transB: boolean;
  bType: Variant["bType"];
  vecA: boolean;
  vecB: boolean;
  vecOut: boolean;
  accumulate: boolean;
  bias: boolean;
  blocks: boolean;
  scaled: boolean; // out = p.scale·(the product)
}

function tiledMatmulWgsl(v: TiledVariant): string {
  const eight = [...Array(8).keys()];
  const bs = bStorage(v.bType, v.vecB, false); // b may be a 16-bit frozen weight, widened on load
  // Element (row, col) of a as stored: a [M,K], or [K,M] when transA; b [K,N], or [N,K].
  const aIndex = (m: string, k: string) =>
    v.transA
      ? (v.blocks ? `(${k}) * p.strideA + p.firstA + ${m}` : `(${k}) * p.M + ${m}`)
      : (v.blocks ? `(${m}) * p.strideA + p.firstA + ${k}` : `(${m}) * p.K + ${k}`);
  const bIndex = (k: string, n: string) => v.transB ? `(${n}) * p.K + ${k}` : `(${k}) * p.N + ${n}`;
  const rowOut = (m: string) => v.blocks ? `(${m}) * p.strideOut + p.firstOut` : `(${m}) * p.N`;
  // Staging a: 512 values, 8 per invocation (2 vec4s). Contiguous along k unless transA.
  const loadA = v.vecA
    ? v.transA
      ? `for (var e = 0u; e < 2u; e++) {
      let idx = e * 64u + tid; let kk = idx / 16u; let mq = (idx % 16u) * 4u;
      let m = tileM + mq; let k = k0 + kk;
      var x = vec4f();
      if (m < p.M && k < p.K) { x = a[(${aIndex("m", "k")}) / 4u]; }
      As[kk * 16u + mq / 4u] = x;
    }`
      : `for (var e = 0u; e < 2u; e++) {
      let idx = e * 64u + tid; let mm = idx / 2u; let kq = (idx % 2u) * 4u;
      let m = tileM + mm; let k = k0 + kq;
      var x = vec4f();
      if (m < p.M && k < p.K) { x = a[(${aIndex("m", "k")}) / 4u]; }
      for (var i = 0u; i < 4u; i++) { As[(kq + i) * 16u + mm / 4u][mm % 4u] = x[i]; }
    }`
    : v.transA
    ? `for (var e = 0u; e < 8u; e++) {
      let idx = e * 64u + tid; let kk = idx / 64u; let mm = idx % 64u;
      let m = tileM + mm; let k = k0 + kk;
      var x = 0.0;
      if (m < p.M && k < p.K) { x = a[${aIndex("m", "k")}]; }
      As[kk * 16u + mm / 4u][mm % 4u] = x;
    }`
    : `for (var e = 0u; e < 8u; e++) {
      let idx = e * 64u + tid; let mm = idx / 8u; let kk = idx % 8u;
      let m = tileM + mm; let k = k0 + kk;
      var x = 0.0;
      if (m < p.M && k < p.K) { x = a[${aIndex("m", "k")}]; }
      As[kk * 16u + mm / 4u][mm % 4u] = x;
    }`;
  // Staging b: contiguous along n unless transB.
  const loadB = v.vecB
    ? v.transB
      ? `for (var e = 0u; e < 2u; e++) {
      let idx = e * 64u + tid; let nn = idx / 2u; let kq = (idx % 2u) * 4u;
      let n = tileN + nn; let k = k0 + kq;
      var x = vec4f();
      if (n < p.N && k < p.K) { x = ${bs.vec(`(${bIndex("k", "n")}) / 4u`)}; }
      for (var i = 0u; i < 4u; i++) { Bs[(kq + i) * 16u + nn / 4u][nn % 4u] = x[i]; }
    }`
      : `for (var e = 0u; e < 2u; e++) {
      let idx = e * 64u + tid; let kk = idx / 16u; let nq = (idx % 16u) * 4u;
      let n = tileN + nq; let k = k0 + kk;
      var x = vec4f();
      if (n < p.N && k < p.K) { x = ${bs.vec(`(${bIndex("k", "n")}) / 4u`)}; }
      Bs[kk * 16u + nq / 4u] = x;
    }`
    : v.transB
    ? `for (var e = 0u; e < 8u; e++) {
      let idx = e * 64u + tid; let nn = idx / 8u; let kk = idx % 8u;
      let n = tileN + nn; let k = k0 + kk;
      var x = 0.0;
      if (n < p.N && k < p.K) { x = ${bs.one(bIndex("k", "n"))}; }
      Bs[kk * 16u + nn / 4u][nn % 4u] = x;
    }`
    : `for (var e = 0u; e < 8u; e++) {
      let idx = e * 64u + tid; let kk = idx / 64u; let nn = idx % 64u;
      let n = tileN + nn; let k = k0 + kk;
      var x = 0.0;
      if (n < p.N && k < p.K) { x = ${bs.one(bIndex("k", "n"))}; }
      Bs[kk * 16u + nn / 4u][nn % 4u] = x;
    }`;
  // Invocation (lx, ly) owns rows tileM + 8·ly + i and columns tileN + 8·lx + 0..7, held as
  // two vec4s per row: acc_i_0 (columns 0..3) and acc_i_1 (4..7).
  const accs = eight.map((i) => `var acc${i}_0 = vec4f(); var acc${i}_1 = vec4f();`).join("\n  ");
  const fma = eight.map((i) =>
    `acc${i}_0 += a${Math.floor(i / 4)}[${i % 4}] * b0; acc${i}_1 += a${Math.floor(i / 4)}[${
      i % 4
    }] * b1;`
  ).join("\n      ");
  // acc starts from the old out and the bias (as the blocked kernel's does, so that a product
  // split along k into accumulated pieces sums in the same order as the whole one).
  const perElement = (f: (i: number, h: number, at: string, biasAt: string, j: number) => string) =>
    eight.map((i) => {
      const m = `m0 + ${i}u`;
      const halves = [0, 1].map((h) => {
        const n = `n0 + ${4 * h}u`;
        if (v.vecOut) {
          const at = `(${rowOut(m)} + ${n}) / 4u`;
          const biasAt = `(${v.blocks ? "p.firstOut + " : ""}${n}) / 4u`;
          return `if (${n} < p.N) { ${f(i, h, at, biasAt, -1)} }`;
        }
        return [0, 1, 2, 3].map((j) => {
          const col = `${n} + ${j}u`;
          const biasAt = v.blocks ? `p.firstOut + ${col}` : col;
          return `if (${col} < p.N) { ${f(i, h, `${rowOut(m)} + ${col}`, biasAt, j)} }`;
        }).join("\n      ");
      }).join("\n      ");
      return `if (${m} < p.M) {\n      ${halves}\n    }`;
    }).join("\n    ");
  const acc = (i: number, h: number, j: number) => `acc${i}_${h}${j < 0 ? "" : `[${j}]`}`;
  const inits = v.accumulate || v.bias
    ? perElement((i, h, at, biasAt, j) => {
      const terms = [v.accumulate ? `out[${at}]` : "", v.bias ? `bias[${biasAt}]` : ""];
      return `${acc(i, h, j)} = ${terms.filter((t) => t).join(" + ")};`;
    })
    : "";
  const scaleBy = v.scaled ? " * p.scale" : "";
  const stores = perElement((i, h, at, _biasAt, j) => `out[${at}] = ${acc(i, h, j)}${scaleBy};`);
  const outType = v.vecOut ? "vec4f" : "f32";
  return `${v.bType === "f16" ? "enable f16;" : ""}
struct Params { M: u32, N: u32, K: u32${
    v.blocks ? ", strideA: u32, firstA: u32, strideOut: u32, firstOut: u32" : ""
  }${v.scaled ? ", scale: f32" : ""} }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<${v.vecA ? "vec4f" : "f32"}>;
@group(0) @binding(2) ${bs.decl}
@group(0) @binding(3) var<storage, read_write> out: array<${outType}>;
${v.bias ? `@group(0) @binding(4) var<storage, read> bias: array<${outType}>;` : ""}

${bs.helpers}

// Slices of op(a) [k][m] and op(b) [k][n], as vec4s: element [k][x] is at [k·16 + x/4][x%4].
var<workgroup> As: array<vec4f, ${TILE_K * TILE / 4}>;
var<workgroup> Bs: array<vec4f, ${TILE_K * TILE / 4}>;

@compute @workgroup_size(8, 8)
fn main(@builtin(local_invocation_id) lid: vec3u, @builtin(workgroup_id) wid: vec3u,
        @builtin(num_workgroups) nwg: vec3u) {
  let tileN = wid.x * ${TILE}u;
  let tileM = (wid.z * nwg.y + wid.y) * ${TILE}u;
  let tid = lid.y * 8u + lid.x;
  let m0 = tileM + lid.y * 8u;
  let n0 = tileN + lid.x * 8u;
  ${accs}
  ${inits}
  for (var k0 = 0u; k0 < p.K; k0 += ${TILE_K}u) {
    ${loadA}
    ${loadB}
    workgroupBarrier();
    for (var kk = 0u; kk < ${TILE_K}u; kk++) {
      let a0 = As[kk * 16u + lid.y * 2u];
      let a1 = As[kk * 16u + lid.y * 2u + 1u];
      let b0 = Bs[kk * 16u + lid.x * 2u];
      let b1 = Bs[kk * 16u + lid.x * 2u + 1u];
      ${fma}
    }
    workgroupBarrier();
  }
  if (m0 >= p.M || n0 >= p.N) { return; }
  ${stores}
}
`;
}

/**
 * out[M,N] (+)= op(a)·op(b) (+ bias[N]); op transposes a [K,M] / b [N,K] when asked. b may be
 * stored in 16 bits (a frozen weight); a, out and bias are f32.
 */
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
  const aBlock = opts.aBlock ?? { stride: transA ? M : K, first: 0 };
  const outBlock = opts.outBlock ?? { stride: N, first: 0 };
  // A block that is the whole matrix runs the plain kernel.
  const blocks = aBlock.stride !== (transA ? M : K) || aBlock.first !== 0 ||
    outBlock.stride !== N || outBlock.first !== 0;
  // A vec4 must lie inside one row of the block.
  const aligned = (block: ColumnBlock) => block.stride % 4 === 0 && block.first % 4 === 0;
  const vecA = (transA ? M : K) % 4 === 0 && aligned(aBlock), vecB = (transB ? K : N) % 4 === 0;
  const vecOut = N % 4 === 0 && aligned(outBlock);
  const bType = storedAs(b);
  const allVec4 = vecA && vecB && vecOut;
  const swiglu = opts.swiglu ?? false, norm = opts.rmsnorm;
  // A fusion's shapes (`generationFusions`): x·Wᵀ without accumulate, x whole with rows of
  // whole vec4s (rmsnorm; out may be a column block, as a sliced vocabulary projection's is);
  // out whole, of vec4s, with no bias (swiglu).
  const wholeA = aBlock.stride === K && aBlock.first === 0;
  if (
    (norm || swiglu) &&
    (transA || !transB || accumulate || (norm && (K % 4 !== 0 || !wholeA)) ||
      (swiglu && (blocks || !allVec4 || (N / 2) % 4 !== 0 || opts.bias)))
  ) {
    throw new Error(`matmul: no fused rmsnorm or swiglu for ${M}×${N}×${K} with these options`);
  }
  const scaled = opts.scale !== undefined;
  if (scaled && (accumulate || opts.bias || swiglu)) {
    throw new Error("matmul: scale is for a plain product (no accumulate, bias or swiglu)");
  }
  const scaleParams = scaled ? [opts.scale!] : [];
  const tile = matmulKernel(gpu, M, N, K, allVec4, blocks, opts.kernel, opts.block, {
    rmsnorm: norm !== undefined,
    swiglu,
  });
  if ((norm || swiglu) && (tile === "tiled" || (swiglu && tile.colGroups % 2 !== 0))) {
    throw new Error("matmul: rmsnorm and swiglu are fused in the software adapters' kernel only");
  }
  const tensors: (Tensor | GPUTextureView)[] = opts.bias ? [a, b, out, opts.bias] : [a, b, out];
  const strides = blocks ? [aBlock.stride, aBlock.first, outBlock.stride, outBlock.first] : [];
  if (tile === "tiled") {
    const tiled: TiledVariant = {
      transA,
      transB,
      bType,
      vecA,
      vecB,
      vecOut,
      accumulate,
      bias: opts.bias !== undefined,
      blocks,
      scaled,
    };
    const pipeline = gpu.pipelineFor(
      `tiled ${JSON.stringify(tiled)}`,
      () => tiledMatmulWgsl(tiled),
      "matmul tiled",
    );
    const gy = Math.ceil(M / TILE), gz = Math.ceil(gy / 65535);
    gpu.dispatch(
      pipeline,
      [Math.ceil(N / TILE), Math.ceil(gy / gz), gz],
      tensors,
      [M, N, K, ...strides],
      scaleParams,
    );
    return;
  }
  // On a software adapter the register-blocked kernel reads its vec4 operands from texture
  // copies, whatever the product's size: gallivm loads storage one lane at a time, and on an AMD
  // Zen 3 even generation's products (128×128×64: 1.2 → 0.6 ms; 2×896×896: 5.8 → 1.1 ms) and an
  // operand read by one run of invocations (8×4864×896: 18 → 8 ms) gain more than the copies
  // cost. The `textures` option forces either way (`Gpu.textureInputs` in tests).
  const copied = opts.textures ?? gpu.textureInputs !== "never";
  // A whole a's copy lies by its rows when they fit one band (`Gpu.matrixRows`), else in order.
  const aRowLength = transA ? M : K;
  const aWhole = aBlock.stride === aRowLength && aBlock.first === 0;
  const aOneBand = vecA && copied && aWhole && gpu.matrixRows(a, aRowLength)?.bands === 1;
  const aTexture = vecA && copied
    ? gpu.textureCopy("matmul a", a, aOneBand ? aRowLength : undefined)
    : null;
  // b's copy is asked for by the weight's rows, whichever way it is read, so that a weight's
  // kept copy serves both.
  const bRowLength = transB ? K : N;
  const bTexture = vecB && copied
    ? opts.keptB?.view(b, bRowLength) ?? gpu.textureCopy("matmul b", b, bRowLength)
    : null;
  const bRows = bTexture ? gpu.matrixRows(b, bRowLength) : null;
  // The norm's weight from a copy too: every lane reads it at every step of k, and a storage
  // load runs lane by lane (2×9728×896 over a bf16 weight: 10.0 → 3.5 ms).
  const normTexture = norm && copied && norm.weight.dtype === "f32"
    ? norm.kept?.view(norm.weight) ?? gpu.textureCopy("matmul norm", norm.weight)
    : null;
  if (norm) tensors.push(normTexture ?? norm.weight);
  const bandParams = bRows && bRows.bands > 1
    ? [bRows.rowTexels, bRows.bandShift, 2 ** bRows.bandShift - 1]
    : [];
  // x covers column blocks; row blocks spread over y and, past 65535 workgroups, z.
  const gx = Math.ceil(N / (4 * tile.colGroups * tile.workgroup[0]));
  const gy = Math.ceil(M / (4 * tile.rowGroups * tile.workgroup[1]));
  const gz = Math.ceil(gy / 65535);
  // A fused product needs all of k in one invocation: never split.
  const chunks = norm || swiglu ? null : splitKChunks(gpu, gx * gy, shape, blocks);
  // Accumulating, the old out is read from a copy too (its storage loads run lane by lane): a
  // LoRA adapter's B product 181×4864×16 took 4.7–5.5 ms reading storage, 2.8–3.2 from a copy;
  // the default model's o_proj over 1,664 rows 1.1–1.7 against 0.6–0.8. Up to OLD_OUT_COPY_BYTES.
  // The copy spans the elements the product reads: whole vec4s, since vecOut.
  const outSpan = blocks ? (M - 1) * outBlock.stride + outBlock.first + N : M * N;
  const oldOutTexture =
    accumulate && vecOut && copied && !chunks && outSpan * 4 <= OLD_OUT_COPY_BYTES
      ? gpu.textureCopy("matmul old out", out.view(0, [outSpan]))
      : null;
  if (oldOutTexture) tensors.push(oldOutTexture);
  const variant: Variant = {
    transA,
    transB,
    vecA,
    vecB,
    kTail: K % 4 !== 0,
    vecOut,
    accumulate,
    bias: opts.bias !== undefined,
    blocks,
    bType,
    texA: aTexture !== null,
    texB: bTexture !== null,
    rowsA: aTexture && aOneBand ? "oneBand" : "ordered",
    rowsB: layoutOf(bRows),
    tile,
    kPairs: pairedSteps(transA, K, chunks !== null, tile),
    rmsnorm: norm !== undefined,
    normTex: normTexture !== null,
    oldOutTex: oldOutTexture !== null,
    swiglu,
    scaled,
  };
  const operands = [aTexture ?? a, bTexture ?? b];
  if (chunks) {
    // Few workgroups over a long k (weight gradients of small layers): llvmpipe runs one
    // workgroup per CPU thread, so split k into ranges that run in parallel into partial sums,
    // then add them up in order (deterministic).
    const partials = gpu.scratch("matmul partial sums", chunks.count * M * N);
    const split = { ...variant, accumulate: false, bias: false, scaled: false, splitK: true };
    gpu.dispatch(
      gpu.pipelineFor(JSON.stringify(split), () => matmulWgsl(split), "matmul split-k"),
      [gx, gy, chunks.count],
      [...operands, partials],
      [M, N, K, chunks.kLen, ...bandParams],
    );
    // In vec4s (n, N counted in them) when N is a multiple of 4.
    const vec = N % 4 === 0, width = vec ? 4 : 1;
    const input = vec ? gpu.input("input 0", partials) : partials;
    const reduce = gpu.pipeline(
      sumPartialsWgsl(accumulate, opts.bias !== undefined, scaled, vec, !(input instanceof Tensor)),
      "sum partials",
    );
    gpu.dispatch(
      reduce,
      grid((M * N) / width, SUM_ROWS_SIZE),
      opts.bias ? [input, out, opts.bias] : [input, out],
      [(M * N) / width, N / width, chunks.count],
      scaleParams,
    );
    return;
  }
  const pipeline = gpu.pipelineFor(JSON.stringify(variant), () => matmulWgsl(variant), "matmul");
  gpu.dispatch(
    pipeline,
    [gx, Math.ceil(gy / gz), gz],
    [...operands, ...tensors.slice(2)],
    [M, N, K, ...strides, ...bandParams],
    [...(norm ? [norm.eps] : []), ...scaleParams],
  );
}

/**
 * Whether the register-blocked kernel steps k 8 at a time, adding two steps' tile products to the
 * accumulators at once. gallivm writes a variable assigned inside a loop under the loop's
 * execution mask (a blend per accumulator vector and write), and the accumulators of a block of
 * 16 rows do not fit in registers (a spill and a reload per write); pairing the steps halves
 * both. On llvmpipe, with 16×16 blocks: 7–9% faster products at k ≥ 512 (x·Wᵀ 512×4864×896 and
 * 1024×896×896, dy·W 512×896×4864 and 420×896×896, and over a bf16 weight), and 4–9% with 16×8;
 * none at k ≤ 256 or for weight gradients (transA: dyᵀ·x 896×896×1024); slower with 8×8 blocks
 * (a LoRA run's bf16 gate/up product over 183 rows, alone: 75 → 96 ms), whose tiles spill too.
 * Only a K that is a multiple of 8, not split along k, so that the loop needs no remainder step.
 * A paired loop body is twice as long and compiles about 1.5× as long. The sums' order differs
 * from the 4-step loop's; whether a product pairs follows from its shape and its block, so on one
 * machine the same product always sums the same way.
 */
export const PAIRED_K_MIN = 512;
function pairedSteps(transA: boolean, K: number, split: boolean, tile: KernelChoice): boolean {
  return !transA && K % 8 === 0 && K >= PAIRED_K_MIN && !split && tile.rowGroups === 4;
}

/**
 * The largest out whose old values an accumulating product reads from a texture copy: a scratch
 * texture as large as that, which the memory plan does not count.
 */
const OLD_OUT_COPY_BYTES = 64 * 2 ** 20;

/** Fewer workgroups than this leave CPU threads idle: split k (software adapters only). */
const SPLIT_K_WORKGROUPS = 8;
/** Each k range is at least this long. */
const SPLIT_K_MIN = 128;
/**
 * Products of fewer multiply-adds than this are not split: they end about as soon as the second
 * dispatch, which adds the partial sums, would. A decode step's LoRA A products: 2×16×896 took
 * 0.15–0.16 ms split in two dispatches and 0.08–0.10 whole in one, 2×16×4864 0.15–0.18 either way.
 */
const SPLIT_K_MIN_WORK = 2 ** 18;

/**
 * How many ranges of k to split a product of few workgroups into, and how long each is. llvmpipe
 * hands a dispatch's workgroups to its threads in equal shares, so the split that ends soonest
 * has the fewest rounds of ranges (workgroups × ranges over threads) times the range's length:
 * over 2 threads, k = 432 splits in 2 ranges of 216 (one round), not 3 of 144 (two rounds, one
 * thread idle in the second). Ties go to fewer ranges (fewer partial sums to write and add), and
 * to no split at all (one CPU thread gains nothing from ranges).
 */
function splitKChunks(
  gpu: Gpu,
  workgroups: number,
  shape: MatmulShape,
  blocks: boolean,
): { count: number; kLen: number } | null {
  const { M, N, K } = shape;
  if (!gpu.software || blocks || workgroups >= SPLIT_K_WORKGROUPS / 2) return null;
  if (M * N * K < SPLIT_K_MIN_WORK) return null;
  const most = Math.min(Math.ceil(SPLIT_K_WORKGROUPS / workgroups), Math.floor(K / SPLIT_K_MIN));
  // Unsplit, the product takes ceil(workgroups / threads) rounds of all of k.
  let best: { count: number; kLen: number } | null = null;
  let bestTime = Math.ceil(workgroups / cpuThreads) * K;
  for (let wanted = 2; wanted <= most; wanted++) {
    const kLen = Math.ceil(K / wanted / 4) * 4, count = Math.ceil(K / kLen);
    const time = Math.ceil(workgroups * count / cpuThreads) * kLen;
    if (time < bestTime) [best, bestTime] = [{ count, kLen }, time];
  }
  return best;
}

// out[i] = (out[i] +) (bias[i % N] +) Σ_s partials[s·n + i], the partials added in order, the
// sum times p.scale when scaled; by vec4s when N is a multiple of 4, the partials read through
// `Gpu.input`.
function sumPartialsWgsl(
  accumulate: boolean,
  bias: boolean,
  scaled: boolean,
  vec: boolean,
  texture: boolean,
): string {
  const type = vec ? "vec4f" : "f32";
  const start = [accumulate ? "out[i]" : "", bias ? "bias[i % p.N]" : ""].filter((t) => t);
  const partial = vec ? "partials_at(c * p.n + i)" : "partials[c * p.n + i]";
  return `
struct Params { n: u32, N: u32, count: u32${scaled ? ", scale: f32" : ""} }
@group(0) @binding(0) var<uniform> p: Params;
${
    vec
      ? vec4Input(1, "partials", texture)
      : "@group(0) @binding(1) var<storage, read> partials: array<f32>;"
  }
@group(0) @binding(2) var<storage, read_write> out: array<${type}>;
${bias ? `@group(0) @binding(3) var<storage, read> bias: array<${type}>;` : ""}
@compute @workgroup_size(${SUM_ROWS_SIZE})
fn main(@builtin(global_invocation_id) gid: vec3u, @builtin(num_workgroups) nwg: vec3u) {
  let i = gid.x + gid.y * nwg.x * ${SUM_ROWS_SIZE}u;
  if (i >= p.n) { return; }
  var s = ${start.length ? start.join(" + ") : `${type}(0.0)`};
  for (var c = 0u; c < p.count; c++) { s += ${partial}; }
  out[i] = s${scaled ? " * p.scale" : ""};
}`;
}

/** y[T,out] = x[T,in]·Wᵀ + bias, with W [out,in] (PyTorch nn.Linear layout). */
export function linear(
  gpu: Gpu,
  x: Tensor,
  w: Tensor,
  bias: Tensor | null,
  y: Tensor,
  T: number,
): void {
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
/**
 * sumRows' workgroup: one SIMD run of invocations, so that a bias of 16 vec4s (64 columns) runs
 * as two workgroups on two CPU threads rather than one workgroup on one.
 */
const BIAS_SUM_SIZE = 8;

// By vec4s of columns (N, stride and first counted in them) when all are multiples of 4, x read
// through `Gpu.input`.
function sumRowsWgsl(accumulate: boolean, vec: boolean, texture: boolean): string {
  const type = vec ? "vec4f" : "f32";
  const row = "x_at(m * p.stride + p.first + n)";
  return `
struct Params { M: u32, N: u32, stride: u32, first: u32 }
@group(0) @binding(0) var<uniform> p: Params;
${vec ? vec4Input(1, "x", texture) : "@group(0) @binding(1) var<storage, read> x: array<f32>;"}
@group(0) @binding(2) var<storage, read_write> out: array<${type}>;

@compute @workgroup_size(${BIAS_SUM_SIZE})
fn main(@builtin(global_invocation_id) gid: vec3u) {
  let n = gid.x;
  if (n >= p.N) { return; }
  var s = ${type}(0.0);
  for (var m = 0u; m < p.M; m++) { s += ${vec ? row : "x[m * p.stride + p.first + n]"}; }
  out[n] = ${accumulate ? "out[n] + s" : "s"};
}
`;
}

/**
 * out[N] (+)= Σ_m x[m,:], one invocation per column summing rows in order (deterministic); x
 * may be a block of a wider matrix (the bias gradient of one module of a fused product).
 */
export function sumRows(
  gpu: Gpu,
  x: Tensor,
  out: Tensor,
  M: number,
  N: number,
  accumulate: boolean,
  block: ColumnBlock = { stride: N, first: 0 },
): void {
  const vec = N % 4 === 0 && block.stride % 4 === 0 && block.first % 4 === 0;
  const width = vec ? 4 : 1;
  const input = vec ? gpu.input("input 0", x.view(0, [M * block.stride])) : x;
  const pipeline = gpu.pipeline(
    sumRowsWgsl(accumulate, vec, !(input instanceof Tensor)),
    "sumRows",
  );
  gpu.dispatch(pipeline, [Math.ceil(N / width / BIAS_SUM_SIZE)], [input, out], [
    M,
    N / width,
    block.stride / width,
    block.first / width,
  ]);
}
