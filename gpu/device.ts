// The WebGPU device and the one way kernels are run on it.
//
// `Gpu` owns the adapter, the device, a cache of compiled pipelines and one open command
// encoder. Kernels call `gpu.dispatch(...)`, which only records work; nothing reaches the GPU
// until `flush()` (or a read, which flushes). A read waits until the GPU has finished all that
// was submitted, and Deno's mapAsync then sleeps 10 ms more (on the Deno version where it is safe,
// reads take their values without that sleep: `earlyReads`), so read as rarely as possible and
// batch reads with `readMany` (`waitCount` counts them).
// A dispatch allocates nothing: its Params go to a slot of one uniform ring buffer, uploaded
// once per submit, and its bind group is cached, so repeated work reuses both.
//
// Binding convention for every WGSL kernel in gpu/:
//   @group(0) @binding(0) var<uniform> p: Params;   // u32 fields first, then f32 fields
//   @group(0) @binding(1..n) storage buffers, in the order passed to dispatch()
// Kernels must use every binding they declare (pipelines use layout "auto").

import { AhaError } from "../core/errors.ts";
import { privateRuntimeDir } from "../core/self_command.ts";
import { type ModelConfig, weightShapes } from "../core/model_config.ts";
import { CHUNK_ALIGN, weightRowBytes } from "../core/plan.ts";

export type DType = "f32" | "i32" | "u32" | "bf16" | "f16";

/**
 * Bytes per element: 4, or 2 for the 16-bit storage of frozen weights (bf16 packed two to a
 * u32 and widened with shifts; f16 read as WGSL's f16 behind the shader-f16 feature).
 */
export function elementBytes(dtype: DType): number {
  return dtype === "bf16" || dtype === "f16" ? 2 : 4;
}

/** Storage bindings must start at a multiple of this many bytes (WebGPU's default limit). */
export const BINDING_ALIGNMENT = 256;

/**
 * Whether reads take their values as soon as the GPU has finished rather than when mapAsync's
 * promise settles. Deno 2.9's mapAsync (ext/webgpu/buffer.rs) polls the device until the GPU is
 * done synchronously inside the call, so the buffer is mapped in wgpu when the call returns,
 * and then sleeps 10 ms before its promise resolves: every read waited ≥ 10 ms after the GPU was
 * done (11.2 ms for 16 bytes after a trivial copy). Its getMappedRange copies the bytes out
 * without checking the promise, and its unmap unmaps in wgpu at once (the sleeping promise only
 * records its state). So readMany calls getMappedRange right after mapAsync, unmaps and returns
 * the buffer to the pool, and awaits the promise only when getMappedRange throws (wgpu has not
 * mapped it). These are that version's internals, not WebGPU's contract, and its getMappedRange
 * panics (ends the process) on a buffer never mapped before, so the first map of each staging
 * buffer awaits its promise, and early reads run only on the Deno minor version checked by
 * tests/device_test.ts ("reads take their values …"). AHA_EARLY_READS=0 turns them off.
 */
export function earlyReads(): boolean {
  let setting: string | undefined;
  try {
    setting = Deno.env.get("AHA_EARLY_READS");
  } catch {
    setting = undefined; // no --allow-env
  }
  if (setting === "0") return false;
  return /^2\.9\./.test(Deno.version.deno);
}
const EARLY_READS = earlyReads();

/** Uniform slots per submit (a submit is made when they run out) and 32-bit words per slot. */
const UNIFORM_SLOTS = 1024;
const UNIFORM_SLOT_WORDS = BINDING_ALIGNMENT / 4;
/** Texels in a row of a tensor's texture copy (`Gpu.textureCopy`). */
const TEXTURE_ROW = 1024;

/**
 * A matrix whose rows are a multiple of this many bytes long gets a texture copy with padded
 * rows (`Gpu.matrixRows`): its rows would otherwise start at addresses that share their low bits,
 * and the rows an invocation reads side by side would fall in the same few sets of the CPU's
 * caches, evicting one another. A run of 8 lanes with 16 columns each reads 128 rows at once;
 * rows 512·j bytes apart (j odd) fall in 8 of the L1's 64 sets, 16 to a set of 8 ways. On the
 * 2-core Zen 3, x·Wᵀ over 1024×2048 f32 rows (8 KB apart) ran at 28 GFLOPS against 41 with rows
 * of 2,056; over rows of 896 floats (3.5 KB: the 0.5B model's hidden size) 45 against 48–49.
 */
const ALIASED_ROW_BYTES = 512;

/** WebGPU's alignment of a buffer's rows in a copy to a texture (COPY_BYTES_PER_ROW_ALIGNMENT). */
const COPY_ROW_BYTES = 256;

/**
 * Bytes of queue.writeBuffer data after which `write` submits: the queue keeps a staging copy of
 * every write until a submit hands it to the GPU, so a model's upload (gigabytes, before any
 * dispatch) would otherwise hold a second copy of every weight. On llvmpipe, writing 2 GiB
 * peaked at 4.31 GiB resident without submits and 2.49 GiB with them.
 */
const WRITE_SUBMIT_BYTES = 64 * 2 ** 20;

/**
 * The largest staging buffer a read uses; a larger read goes through several. Reading a 0.5B
 * model's weights whole (1.84 GiB, rounded up to a 2 GiB buffer) failed on llvmpipe ("Buffer with
 * 'staging' label is invalid"), and pooled staging buffers stay allocated for the run.
 */
const STAGING_MAX_BYTES = 256 * 2 ** 20;

/**
 * A texture copy of a matrix laid out by its rows: row r's vec4 t at texel (⌊r / 2^bandShift⌋ ·
 * rowTexels + t, r mod 2^bandShift). A row is `padded` by a texel past its data when rows would
 * alias in the caches (ALIASED_ROW_BYTES). A texture holds fewer rows than a large weight has,
 * so the rows go in bands of 2^bandShift side by side, the band's height a power of two so that
 * a kernel finds a row's band with a shift and a mask. In one band, row r of the matrix is row r
 * of the texture, and its vec4 t texel (t, r): the matmul then reads a tile's rows at one texel
 * column and works out no coordinates in its loop.
 */
export interface TextureRows {
  rowTexels: number;
  padded: boolean;
  bandShift: number;
  bands: number;
}

/**
 * Where a texture copy's texels lie: TEXTURE_ROW texels a row in order (vec4 i at (i %
 * TEXTURE_ROW, i / TEXTURE_ROW)), or a matrix's rows. A texture's rows lie `width` texels apart
 * in memory, so a copy by rows has a texture exactly as wide as its bands.
 */
export interface TextureLayout {
  width: number;
  height: number;
  rows?: TextureRows;
}

/** A texture copy's texel format: four f32s, or four 16-bit halves as two u32s. */
function textureFormat(t: Tensor): GPUTextureFormat {
  return t.dtype === "bf16" || t.dtype === "f16" ? "rg32uint" : "rgba32float";
}

/** Bytes of one texel of t's texture copy. */
function texelBytes(t: Tensor): number {
  return textureFormat(t) === "rg32uint" ? 8 : 16;
}

/**
 * WGSL declaring a texture copy (`Gpu.textureCopy`) of an f32 tensor, or of a 16-bit one when
 * `halves`. It is read as a read-only storage texture: llvmpipe inlines such a load as one
 * gather, where a sampled texture's `textureLoad` is a call that works out a mip level and its
 * offsets for every lane (the matmul ran 1.6–1.8× faster this way).
 */
export function textureDecl(name: string, halves = false): string {
  return `var ${name}: texture_storage_2d<${halves ? "rg32uint" : "rgba32float"}, read>;`;
}

/** WGSL for the texel of vec4 `i` (an index expression) of a texture copy (`Gpu.textureCopy`). */
export function texelLoad(texture: string, i: string): string {
  return `textureLoad(${texture}, vec2u((${i}) % ${TEXTURE_ROW}u, (${i}) / ${TEXTURE_ROW}u))`;
}

/**
 * WGSL for a kernel's read-only vec4 input `name` at `binding`, read as `name_at(i)` (vec4 i):
 * from a texture copy when `texture` (what `Gpu.input` bound), else from storage.
 */
export function vec4Input(binding: number, name: string, texture: boolean): string {
  return texture
    ? `@group(0) @binding(${binding}) ${textureDecl(name)}
fn ${name}_at(i: u32) -> vec4f { return ${texelLoad(name, "i")}; }`
    : `@group(0) @binding(${binding}) var<storage, read> ${name}: array<vec4f>;
fn ${name}_at(i: u32) -> vec4f { return ${name}[i]; }`;
}

/**
 * Fewer vec4 loads than this read an input from storage (`Gpu.input`): a texture copy splits the
 * compute pass, ~40 µs on lavapipe, about what 3,000 storage loads cost (RMSNorm over 128 rows
 * of 64 broke even; over 16 rows storage was 70 µs faster).
 */
const TEXTURE_MIN_LOADS = 4096;

/** Bind groups kept before the cache is emptied. */
const MAX_BIND_GROUPS = 20000;

/**
 * A buffer on the GPU with a shape. Elements are 4 bytes, or 2 for bf16/f16 (padded to whole
 * 4-byte words). A view shares its parent's buffer from `offset` bytes on.
 */
export class Tensor {
  constructor(
    readonly buffer: GPUBuffer,
    readonly shape: number[],
    readonly dtype: DType = "f32",
    readonly offset = 0,
  ) {}
  get size(): number {
    return this.shape.reduce((a, b) => a * b, 1);
  }
  /** Bytes the elements take, rounded up to whole 4-byte words (at least one). */
  get bytes(): number {
    return Math.max(4, Math.ceil((this.size * elementBytes(this.dtype)) / 4) * 4);
  }
  /** A view of this tensor's elements from `start` on, with the given shape. */
  view(start: number, shape: number[]): Tensor {
    const offset = this.offset + start * elementBytes(this.dtype);
    const size = shape.reduce((a, b) => a * b, 1);
    if (offset % BINDING_ALIGNMENT !== 0) {
      throw new Error(`view: byte offset ${offset} is not ${BINDING_ALIGNMENT}-aligned`);
    }
    if (start + size > this.size) {
      throw new Error(`view: [${start}, ${start + size}) is outside ${this.size} elements`);
    }
    return new Tensor(this.buffer, shape, this.dtype, offset);
  }
  destroy(): void {
    if (this.offset === 0) this.buffer.destroy();
  }
}

/**
 * What a model needs of an adapter in one binding and one buffer: a row of its widest weight
 * (larger weights are kept as row slices) and the logits of one chunk of CHUNK_ALIGN tokens.
 */
export function modelNeeds(config: ModelConfig): GpuOptions {
  const largest = Math.max(
    ...[...weightShapes(config).values()].map(weightRowBytes),
    CHUNK_ALIGN * config.vocabSize * 4,
  );
  return { minStorageBinding: largest, minBufferSize: largest };
}

export interface GpuOptions {
  /** Bytes the model needs in one storage binding / one buffer; checked against the adapter. */
  minStorageBinding?: number;
  minBufferSize?: number;
}

export interface AdapterSummary {
  description: string;
  vendor: string;
  architecture: string;
  isFallbackAdapter: boolean;
  backend: string;
  features: string[];
  limits: Record<string, number>;
}

const KEY_LIMITS = [
  "maxBufferSize",
  "maxStorageBufferBindingSize",
  "maxStorageBuffersPerShaderStage",
  "maxComputeWorkgroupStorageSize",
  "maxComputeInvocationsPerWorkgroup",
  "maxComputeWorkgroupSizeX",
  "maxComputeWorkgroupsPerDimension",
] as const;

export function summarizeAdapter(adapter: GPUAdapter): AdapterSummary {
  const info = adapter.info;
  const limits: Record<string, number> = {};
  for (const k of KEY_LIMITS) limits[k] = adapter.limits[k];
  return {
    description: info.description || "(no description)",
    vendor: info.vendor,
    architecture: info.architecture,
    isFallbackAdapter: (info as unknown as { isFallbackAdapter?: boolean }).isFallbackAdapter ??
      false,
    backend: Deno.env.get("DENO_WEBGPU_BACKEND") ?? "default",
    features: [...adapter.features].sort(),
    limits,
  };
}

/**
 * Whether an adapter runs on the CPU (llvmpipe, lavapipe, SwiftShader, a fallback adapter): the
 * one switch between the CPU-shaped kernels and settings and those for hardware GPUs. With
 * AHA_HARDWARE_PATHS=1 every adapter is taken for a hardware one, so that the tests can run the
 * hardware GPUs' paths (tiled matmul, flash attention, no texture copies, a WebGPU reference) on
 * llvmpipe: `AHA_HARDWARE_PATHS=1 deno task test`.
 */
export function isSoftwareAdapter(adapter: GPUAdapter): boolean {
  if (Deno.env.get("AHA_HARDWARE_PATHS") === "1") return false;
  const info = adapter.info as GPUAdapterInfo & { isFallbackAdapter?: boolean };
  return info.isFallbackAdapter === true ||
    /llvmpipe|lavapipe|swiftshader|software/i.test(`${info.description} ${info.device}`);
}

export async function requestAdapter(): Promise<GPUAdapter> {
  // Mesa's Vulkan driver warns on every start unless XDG_RUNTIME_DIR names a private directory.
  if (!Deno.env.get("XDG_RUNTIME_DIR")) Deno.env.set("XDG_RUNTIME_DIR", privateRuntimeDir());
  if (!("gpu" in navigator) || !navigator.gpu) {
    throw new AhaError("WebGPU is not available in this Deno (navigator.gpu is missing)");
  }
  const adapter = await navigator.gpu.requestAdapter({ powerPreference: "high-performance" });
  if (!adapter) {
    throw new AhaError(
      "no WebGPU adapter found; on a machine without a GPU install Mesa (llvmpipe, or lavapipe via mesa-vulkan-drivers)",
    );
  }
  return adapter;
}

export class Gpu {
  private pipelines = new Map<string, GPUComputePipeline>();
  private keyedPipelines = new Map<string, GPUComputePipeline>();
  private encoder: GPUCommandEncoder | null = null;
  private pass: GPUComputePassEncoder | null = null;
  private pendingDestroy: GPUBuffer[] = [];
  private pendingTextures: GPUTexture[] = [];
  /**
   * Every dispatch's Params live in one slot of a ring of uniform slots: written to `uniformData`
   * on the CPU, and to the GPU with one writeBuffer when the work is submitted. A submit's
   * writeBuffer runs after the work submitted before it, so the ring is reused at every flush.
   */
  private uniformRing: GPUBuffer | null = null;
  private uniformData = new Uint32Array(UNIFORM_SLOTS * UNIFORM_SLOT_WORDS);
  private uniformFloats = new Float32Array(this.uniformData.buffer);
  private slotsUsed = 0;
  /**
   * Bind groups by pipeline, uniform slot and tensors. A repeated sequence of dispatches (a decode
   * step, a training step with buffers cached by shape) finds its bind groups here.
   */
  private bindGroups = new Map<string, GPUBindGroup>();
  private ids = new WeakMap<object, number>();
  private nextId = 1;
  /** Dispatches recorded since the device was opened (for benchmarks). */
  dispatchCount = 0;
  /** GPU→CPU waits (reads and syncs) since the device was opened. */
  waitCount = 0;
  /** Buffers and bind groups created since the device was opened (for benchmarks). */
  bufferCount = 0;
  bindGroupCount = 0;
  /** Bytes written since the last submit (WRITE_SUBMIT_BYTES). */
  private unsubmittedWrites = 0;
  private scratchBuffers = new Map<string, Tensor>();
  private textures = new Map<string, { texture: GPUTexture; view: GPUTextureView }>();
  private isSoftware: boolean | undefined;
  /** The largest staging buffer readMany fills (STAGING_MAX_BYTES; tests make it small). */
  stagingMaxBytes = STAGING_MAX_BYTES;
  /** Free MAP_READ buffers for readMany, by size. */
  private stagingPool = new Map<number, GPUBuffer[]>();
  /** Staging buffers mapped once already: only these are read early (`earlyReads`). */
  private mappedBefore = new WeakSet<GPUBuffer>();
  /** The word `sync` reads. */
  private syncWord: Tensor | null = null;
  /** Reads whose values were taken before mapAsync settled (`earlyReads`). */
  earlyReadCount = 0;
  /** Per-kernel GPU time while profiling (`startProfile`), else null. */
  private profiler: Profiler | null = null;

  private constructor(
    readonly adapter: GPUAdapter,
    readonly device: GPUDevice,
    /** Whether 16-bit tensors may have texture copies (rg32uint storage textures). */
    private readonly halfTextures: boolean,
  ) {
    // Texture copies are read as read-only storage textures (textureDecl), a WGSL extension
    // that Deno offers but its types do not declare yet.
    const wgsl = (navigator.gpu as { wgslLanguageFeatures?: ReadonlySet<string> })
      .wgslLanguageFeatures;
    const readableStorageTextures = wgsl?.has("readonly_and_readwrite_storage_textures") ?? false;
    this.textureInputs = this.software && readableStorageTextures ? "auto" : "never";
  }

  static async open(options: GpuOptions = {}): Promise<Gpu> {
    const adapter = await requestAdapter();
    const need = (name: "maxStorageBufferBindingSize" | "maxBufferSize", bytes: number) => {
      if (adapter.limits[name] < bytes) {
        throw new AhaError(
          `the WebGPU adapter "${adapter.info.description}" offers ${name} = ${
            adapter.limits[name]
          } bytes, the model needs ${bytes}`,
        );
      }
    };
    need("maxStorageBufferBindingSize", options.minStorageBinding ?? 0);
    need("maxBufferSize", options.minBufferSize ?? 0);
    // f16 storage of frozen weights needs shader-f16 (lavapipe has it, llvmpipe's GL does not).
    const requiredFeatures: GPUFeatureName[] = adapter.features.has("shader-f16")
      ? ["shader-f16"]
      : [];
    // Timestamps only serve the bench's per-kernel profile (startProfile).
    if (adapter.features.has("timestamp-query")) requiredFeatures.push("timestamp-query");
    const device = await adapter.requestDevice({
      requiredFeatures,
      requiredLimits: {
        maxStorageBufferBindingSize: adapter.limits.maxStorageBufferBindingSize,
        maxBufferSize: adapter.limits.maxBufferSize,
        maxStorageBuffersPerShaderStage: adapter.limits.maxStorageBuffersPerShaderStage,
        maxComputeWorkgroupStorageSize: adapter.limits.maxComputeWorkgroupStorageSize,
        maxComputeInvocationsPerWorkgroup: adapter.limits.maxComputeInvocationsPerWorkgroup,
        maxComputeWorkgroupSizeX: adapter.limits.maxComputeWorkgroupSizeX,
        maxTextureDimension2D: adapter.limits.maxTextureDimension2D,
      },
    });
    device.addEventListener("uncapturederror", (e) => {
      console.error("WebGPU error:", (e as GPUUncapturedErrorEvent).error.message);
    });
    // A downlevel adapter (wgpu's GL backend) refuses rg32uint storage textures: there 16-bit
    // weights are read from storage rather than from texture copies (textureCopy).
    device.pushErrorScope("validation");
    device.createTexture({
      size: [1, 1],
      format: "rg32uint",
      usage: GPUTextureUsage.STORAGE_BINDING,
    }).destroy();
    const halfTextures = (await device.popErrorScope()) === null;
    return new Gpu(adapter, device, halfTextures);
  }

  get description(): string {
    return this.adapter.info.description;
  }

  /**
   * Whether the adapter is a CPU one: kernels pick their CPU-shaped variants (register blocks,
   * streaming attention, texture copies) from this.
   */
  get software(): boolean {
    this.isSoftware ??= isSoftwareAdapter(this.adapter);
    return this.isSoftware;
  }

  /** Whether kernels may read f16 storage (the device was opened with shader-f16). */
  get hasF16(): boolean {
    return this.device.features.has("shader-f16");
  }

  // ---- tensors -------------------------------------------------------------------------

  private createBuffer(descriptor: GPUBufferDescriptor): GPUBuffer {
    this.bufferCount++;
    return this.device.createBuffer(descriptor);
  }

  /** A zero-filled tensor. */
  zeros(shape: number[], dtype: DType = "f32", label?: string): Tensor {
    const size = shape.reduce((a, b) => a * b, 1);
    const buffer = this.createBuffer({
      label,
      size: Math.max(4, Math.ceil((size * elementBytes(dtype)) / 4) * 4),
      usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST,
    });
    return new Tensor(buffer, shape, dtype);
  }

  /** A tensor holding `data` (Float32Array for f32, Int32Array for i32, Uint32Array for u32). */
  upload(data: Float32Array | Int32Array | Uint32Array, shape?: number[], label?: string): Tensor {
    const dtype: DType = data instanceof Float32Array
      ? "f32"
      : data instanceof Int32Array
      ? "i32"
      : "u32";
    const t = this.zeros(shape ?? [data.length], dtype, label);
    if (t.size !== data.length) {
      throw new Error(`upload: shape [${shape}] does not hold ${data.length} values`);
    }
    this.write(t, data);
    return t;
  }

  /**
   * A buffer of at least `size` f32 values kept under `name` for the device's life, grown when a
   * call needs more: scratch space (partial sums, a loss's inputs) that every call of a kernel
   * reuses instead of allocating. Work recorded later sees what the last user left in it.
   */
  scratch(name: string, size: number): Tensor {
    let t = this.scratchBuffers.get(name);
    if (!t || t.size < size) {
      if (t) this.release(t);
      t = this.zeros([size], "f32", name);
      this.scratchBuffers.set(name, t);
    }
    return t;
  }

  /**
   * A copy of a tensor in a texture kept under `name` (grown when needed), recorded like a
   * dispatch: TEXTURE_ROW texels a row, its vec4 i (four consecutive elements) at texel
   * (i % TEXTURE_ROW, i / TEXTURE_ROW); an f32 tensor as rgba32float, a 16-bit one (bf16, f16)
   * as rg32uint holding its four halves as stored; or, read as a matrix of rows of `rowLength`
   * elements, by its rows when it may be (`matrixRows`). Null when the tensor does not fit
   * such a texture, is not whole vec4s, or is 16-bit on an adapter without rg32uint storage
   * textures.
   */
  textureCopy(name: string, t: Tensor, rowLength?: number): GPUTextureView | null {
    const layout = this.textureLayout(t, rowLength);
    if (layout === null) return null;
    // A copy by rows has a texture exactly as wide as its bands (its width sets the row pitch).
    name = `${name} ${textureFormat(t)} ${layout.width}`;
    let kept = this.textures.get(name);
    if (!kept || kept.texture.height < layout.height) {
      if (kept) this.releaseTexture(kept.texture);
      kept = this.makeTexture(t, layout, name);
      this.textures.set(name, kept);
    }
    this.recordWholeCopy(t, kept.texture, layout);
    return kept.view;
  }

  /**
   * How t's texture copy lies by its rows when t, read as a matrix of rows of `rowLength`
   * elements, has one: rows a multiple of ALIASED_ROW_BYTES long are padded, in bands that fit
   * the adapter's textures (the band height wasting the fewest texels, the tallest of those);
   * other rows a multiple of 256 bytes long lie by rows when they fit one band. Else null, and
   * the copy lies TEXTURE_ROW texels a row.
   */
  matrixRows(t: Tensor, rowLength?: number): TextureRows | null {
    if (rowLength === undefined || rowLength % 4 !== 0 || t.size % rowLength !== 0) return null;
    const rowBytes = rowLength * elementBytes(t.dtype), rows = t.size / rowLength;
    const padded = rowBytes % ALIASED_ROW_BYTES === 0;
    const rowTexels = rowLength / 4 + (padded ? 1 : 0);
    const maxSide = this.device.limits.maxTextureDimension2D,
      maxShift = Math.floor(Math.log2(maxSide));
    if (!padded) {
      // One copy command writes all the rows, from a buffer whose rows it must find 256-byte
      // aligned (COPY_BYTES_PER_ROW_ALIGNMENT), as padded rows always are.
      const fits = rowBytes % COPY_ROW_BYTES === 0 && rows <= maxSide && rowTexels <= maxSide;
      return fits ? { rowTexels, padded, bandShift: maxShift, bands: 1 } : null;
    }
    let best: TextureRows | null = null, bestTexels = Infinity;
    for (let bandShift = maxShift; bandShift >= 0; bandShift--) {
      const bands = Math.ceil(rows / 2 ** bandShift);
      if (bands * rowTexels > maxSide) break; // lower bands only get wider
      const texels = bands * Math.min(rows, 2 ** bandShift);
      if (texels < bestTexels) {
        [best, bestTexels] = [{ rowTexels, padded, bandShift, bands }, texels];
      }
    }
    return best;
  }

  /** t's texture copy's layout (see TextureLayout); null when t cannot have one (textureCopy). */
  private textureLayout(t: Tensor, rowLength?: number): TextureLayout | null {
    const halves = t.dtype === "bf16" || t.dtype === "f16", bytes = texelBytes(t);
    const fits = t.dtype === "f32" || (halves && this.halfTextures);
    const rows = Math.ceil(t.bytes / (TEXTURE_ROW * bytes));
    // Whether t has a copy does not depend on its layout (the memory plan counts on that).
    if (!fits || t.bytes % bytes !== 0 || rows > this.device.limits.maxTextureDimension2D) {
      return null;
    }
    const byRows = this.matrixRows(t, rowLength);
    if (byRows === null) return { width: TEXTURE_ROW, height: rows };
    const bandRows = Math.min(t.size / rowLength!, 2 ** byRows.bandShift);
    return { width: byRows.bands * byRows.rowTexels, height: bandRows, rows: byRows };
  }

  /** Bytes of t's texture copy (whole rows of texels), or null when t cannot have one. */
  textureCopyBytes(t: Tensor, rowLength?: number): number | null {
    const layout = this.textureLayout(t, rowLength);
    return layout === null ? null : layout.width * layout.height * texelBytes(t);
  }

  /**
   * A texture able to hold t's copy (textureCopy's layout, by rows when `rowLength` asks for
   * them and t gets them), or null when t cannot have one; the copy itself is
   * recordWholeCopy's. For copies kept by their owner (gpu/kept_textures.ts).
   */
  copyTexture(
    t: Tensor,
    label = "texture copy",
    rowLength?: number,
  ): { texture: GPUTexture; view: GPUTextureView; layout: TextureLayout } | null {
    const layout = this.textureLayout(t, rowLength);
    return layout && { ...this.makeTexture(t, layout, label), layout };
  }

  private makeTexture(t: Tensor, size: { width: number; height: number }, label: string) {
    this.bufferCount++;
    const texture = this.device.createTexture({
      label,
      size: [size.width, size.height],
      format: textureFormat(t),
      usage: GPUTextureUsage.STORAGE_BINDING | GPUTextureUsage.COPY_DST,
    });
    return { texture, view: texture.createView() };
  }

  /**
   * Record copying all of t into `texture` as `layout` lays it out (textureCopy's, or what
   * copyTexture returned): by rows a band at a time, else as recordTextureCopy.
   */
  recordWholeCopy(t: Tensor, texture: GPUTexture, layout: TextureLayout): void {
    if (!layout.rows) return this.recordTextureCopy(t, texture);
    const { rowTexels, padded, bandShift, bands } = layout.rows;
    const texel = texelBytes(t), dataTexels = rowTexels - (padded ? 1 : 0);
    const rows = t.bytes / texel / dataTexels;
    const bandRows = 2 ** bandShift;
    this.endPass();
    const encoder = this.getEncoder();
    for (let band = 0; band < bands; band++) {
      encoder.copyBufferToTexture(
        {
          buffer: t.buffer,
          offset: t.offset + band * bandRows * dataTexels * texel,
          bytesPerRow: dataTexels * texel,
        },
        { texture, origin: [band * rowTexels, 0] },
        [dataTexels, Math.min(bandRows, rows - band * bandRows)],
      );
    }
  }

  /**
   * Record copying t's texels [first, first + count) (all of them by default) into the same
   * texels of `texture` (made by copyTexture for t or a larger tensor, TEXTURE_ROW texels a row):
   * a partial first row, the whole rows in one copy, a partial last row.
   */
  recordTextureCopy(
    t: Tensor,
    texture: GPUTexture,
    first = 0,
    count = t.bytes / texelBytes(t),
  ): void {
    const texel = texelBytes(t), end = first + count;
    this.endPass();
    const encoder = this.getEncoder();
    const copy = (at: number, texels: number, rows: number) =>
      encoder.copyBufferToTexture(
        { buffer: t.buffer, offset: t.offset + at * texel, bytesPerRow: TEXTURE_ROW * texel },
        { texture, origin: [at % TEXTURE_ROW, Math.floor(at / TEXTURE_ROW)] },
        [texels, rows],
      );
    let at = first;
    if (at % TEXTURE_ROW !== 0) {
      const texels = Math.min(end - at, TEXTURE_ROW - (at % TEXTURE_ROW));
      copy(at, texels, 1);
      at += texels;
    }
    const rows = Math.floor((end - at) / TEXTURE_ROW);
    if (rows > 0) {
      copy(at, TEXTURE_ROW, rows);
      at += rows * TEXTURE_ROW;
    }
    if (at < end) copy(at, end - at, 1);
  }

  /** Destroy a texture once the work recorded so far, which may read it, is submitted. */
  releaseTexture(texture: GPUTexture): void {
    this.pendingTextures.push(texture);
  }

  /**
   * How a kernel binds a read-only f32 input read as vec4s (`vec4Input`): on a software adapter,
   * a texture copy kept under `role` (gallivm fetches texels as one gather but loads storage one
   * SIMD lane at a time, 3–4× slower per element on an AMD Zen 3, more than the copy costs);
   * else, or when the tensor does not fit a texture or is read too little to repay the copy
   * (`loads`: the vec4 loads the dispatch makes of it; fewer than TEXTURE_MIN_LOADS, or fewer
   * than the tensor holds, as when a few rows of an embedding table are read), the tensor itself. Copies are recorded in
   * order with the dispatches, so kernels run one after another may share roles.
   */
  input(role: string, t: Tensor, loads = t.size / 4): Tensor | GPUTextureView {
    if (this.textureInputs === "never" || t.dtype !== "f32") return t;
    if (this.textureInputs === "auto" && loads < Math.max(TEXTURE_MIN_LOADS, t.size / 4)) return t;
    return this.textureCopy(role, t) ?? t;
  }

  /**
   * Whether kernels read inputs from texture copies: "auto" on software adapters (the matmul and
   * attention always, `input` where it repays the copy), "never" elsewhere; tests set "always"
   * and "never" to run both paths.
   */
  textureInputs: "auto" | "always" | "never";

  /** Overwrite a tensor's contents (ordered before any later-flushed dispatch). */
  write(t: Tensor, data: Float32Array | Int32Array | Uint32Array, offsetElements = 0): void {
    // queue.writeBuffer runs before work submitted later, but after work already submitted:
    // flush pending dispatches first so they see the old contents.
    this.flush();
    this.device.queue.writeBuffer(
      t.buffer,
      t.offset + offsetElements * elementBytes(t.dtype),
      data.buffer as ArrayBuffer,
      data.byteOffset,
      data.byteLength,
    );
    this.unsubmittedWrites += data.byteLength;
    if (this.unsubmittedWrites >= WRITE_SUBMIT_BYTES) {
      this.device.queue.submit([]);
      this.unsubmittedWrites = 0;
    }
  }

  /** Set every element of a tensor to zero (recorded like a dispatch). */
  clear(t: Tensor): void {
    this.endPass();
    this.getEncoder().clearBuffer(t.buffer, t.offset, t.bytes);
  }

  /** Copy `count` elements between tensors of one dtype (recorded like a dispatch). */
  copy(src: Tensor, dst: Tensor, count = src.size, srcOffset = 0, dstOffset = 0): void {
    this.endPass();
    const bytes = elementBytes(src.dtype);
    this.getEncoder().copyBufferToBuffer(
      src.buffer,
      src.offset + srcOffset * bytes,
      dst.buffer,
      dst.offset + dstOffset * bytes,
      count * bytes,
    );
  }

  // ---- kernels -------------------------------------------------------------------------

  /** Compile (once) a WGSL compute shader whose entry point is `main`. */
  pipeline(wgsl: string, label = "kernel"): GPUComputePipeline {
    let p = this.pipelines.get(wgsl);
    if (!p) {
      const module = this.device.createShaderModule({ label, code: wgsl });
      p = this.device.createComputePipeline({
        label,
        layout: "auto",
        compute: { module, entryPoint: "main" },
      });
      this.pipelines.set(wgsl, p);
    }
    return p;
  }

  /**
   * The pipeline of the WGSL that `build` writes, looked up by `key` before it is written: for
   * kernels whose WGSL costs more to write than a dispatch records (the matmul's: ~15 µs a call).
   * `key` must name everything the WGSL depends on.
   */
  pipelineFor(key: string, build: () => string, label?: string): GPUComputePipeline {
    let p = this.keyedPipelines.get(key);
    if (!p) {
      p = this.pipeline(build(), label);
      this.keyedPipelines.set(key, p);
    }
    return p;
  }

  /**
   * Record one dispatch. `u32s` and `f32s` fill the uniform Params struct at binding 0
   * (u32 fields first); `tensors` bind at 1..n.
   */
  dispatch(
    pipeline: GPUComputePipeline,
    workgroups: [number, number?, number?],
    tensors: (Tensor | GPUTextureView)[],
    u32s: number[] = [],
    f32s: number[] = [],
  ): void {
    const [x, y = 1, z = 1] = workgroups;
    const limit = this.device.limits.maxComputeWorkgroupsPerDimension;
    if (x > limit || y > limit || z > limit) {
      throw new Error(`dispatch of [${x}, ${y}, ${z}] workgroups exceeds ${limit} per dimension`);
    }
    if (x === 0 || y === 0 || z === 0) return;
    // Params longer than a slot (rope's frequencies) take several consecutive slots.
    const slots = Math.max(1, Math.ceil((u32s.length + f32s.length) / UNIFORM_SLOT_WORDS));
    if (slots > UNIFORM_SLOTS) throw new Error(`dispatch: Params of ${slots} slots`);
    if (this.slotsUsed + slots > UNIFORM_SLOTS || this.profiler?.full) this.flush();
    const slot = this.slotsUsed;
    this.slotsUsed += slots;
    const base = slot * UNIFORM_SLOT_WORDS;
    for (let i = 0; i < u32s.length; i++) this.uniformData[base + i] = u32s[i] >>> 0;
    for (let i = 0; i < f32s.length; i++) this.uniformFloats[base + u32s.length + i] = f32s[i];
    let key = `${this.id(pipeline)}:${slot}`;
    for (const t of tensors) {
      key += t instanceof Tensor
        ? `:${this.id(t.buffer)}@${t.offset}+${t.size}`
        : `:t${this.id(t)}`;
    }
    let bindGroup = this.bindGroups.get(key);
    if (!bindGroup) {
      // Bind groups of destroyed buffers are never asked for again (ids are never reused):
      // forget them all now and then.
      if (this.bindGroups.size >= MAX_BIND_GROUPS) this.bindGroups.clear();
      const words = Math.max(4, Math.ceil((u32s.length + f32s.length) / 4) * 4);
      const entries: GPUBindGroupEntry[] = [{
        binding: 0,
        resource: { buffer: this.ring(), offset: base * 4, size: words * 4 },
      }];
      tensors.forEach((t, i) =>
        entries.push({
          binding: i + 1,
          resource: t instanceof Tensor ? { buffer: t.buffer, offset: t.offset, size: t.bytes } : t,
        })
      );
      bindGroup = this.device.createBindGroup({ layout: pipeline.getBindGroupLayout(0), entries });
      this.bindGroups.set(key, bindGroup);
      this.bindGroupCount++;
    }
    if (this.profiler) {
      // Profiling: one pass per dispatch, its start and end timestamped.
      this.endPass();
      this.pass = this.getEncoder().beginComputePass({
        // The first Params fields name the dispatch's shape (a matmul's M, N, K).
        timestampWrites: this.profiler.next(pipeline.label, u32s.slice(0, 3).join("×")),
      });
    }
    if (!this.pass) this.pass = this.getEncoder().beginComputePass();
    this.pass.setPipeline(pipeline);
    this.pass.setBindGroup(0, bindGroup);
    this.pass.dispatchWorkgroups(x, y, z);
    this.dispatchCount++;
    if (this.profiler) this.endPass();
  }

  /**
   * Start timing every dispatch on the GPU, by kernel (for the bench; needs the adapter's
   * timestamp-query). Each dispatch then gets its own pass, which adds a little time of its own.
   */
  startProfile(): boolean {
    if (!this.device.features.has("timestamp-query")) return false;
    this.flush();
    this.profiler = new Profiler(this.device);
    return true;
  }

  /**
   * Stop profiling: milliseconds of GPU time and dispatch counts by kernel, largest first, each
   * with the same by shape (its first three Params fields: a matmul's M×N×K).
   */
  async stopProfile(): Promise<ProfiledKernel[]> {
    const profiler = this.profiler;
    if (!profiler) return [];
    this.flush();
    this.profiler = null;
    return await profiler.totals();
  }

  /** Destroy a temporary tensor once the work recorded so far has been submitted. */
  release(t: Tensor): void {
    this.pendingDestroy.push(t.buffer);
  }

  /** Submit everything recorded so far. Does not wait. */
  flush(): void {
    this.endPass();
    if (this.slotsUsed > 0) {
      this.device.queue.writeBuffer(
        this.ring(),
        0,
        this.uniformData.buffer,
        0,
        this.slotsUsed * UNIFORM_SLOT_WORDS * 4,
      );
      this.slotsUsed = 0;
    }
    if (this.encoder) {
      const timestamps = this.profiler?.resolve(this.encoder);
      this.device.queue.submit([this.encoder.finish()]);
      this.unsubmittedWrites = 0;
      timestamps?.();
      this.encoder = null;
    }
    // Buffers used by submitted work may be destroyed now: the GPU keeps them until done.
    for (const u of this.pendingDestroy) u.destroy();
    this.pendingDestroy = [];
    for (const t of this.pendingTextures) t.destroy();
    this.pendingTextures = [];
  }

  /**
   * Wait until the GPU has finished all submitted work: a read of one word, since a read waits
   * for everything submitted before it and, taken early (`earlyReads`), returns ~10 ms before
   * onSubmittedWorkDone would resolve.
   */
  async sync(): Promise<void> {
    // The device's own word, not a tensor of the caller's (`zeros` counts those).
    this.syncWord ??= new Tensor(
      this.createBuffer({ label: "sync", size: 4, usage: GPUBufferUsage.COPY_SRC }),
      [1],
      "f32",
    );
    await this.read(this.syncWord);
  }

  // ---- reading back ----------------------------------------------------------------------

  async read(t: Tensor): Promise<Float32Array> {
    const [out] = await this.readMany([t]);
    return out as Float32Array;
  }

  async readInt(t: Tensor): Promise<Int32Array> {
    const [out] = await this.readMany([t]);
    return new Int32Array(out.buffer);
  }

  /**
   * Start reading tensors without waiting: the copies are recorded and submitted now, and the
   * values arrive with the next read anyone waits for. Waiting on it before then counts as a
   * GPU wait; after, it is free.
   */
  readLater(tensors: Tensor[]): PendingRead<(Float32Array | Int32Array | Uint32Array)[]> {
    return new PendingRead(this.readMany(tensors, true), () => this.waitCount++);
  }

  /**
   * Read several tensors with one GPU wait. f32 tensors come back as Float32Array, i32 as
   * Int32Array, others (u32, and bf16/f16 as their packed words) as Uint32Array. The copies are
   * recorded before this returns.
   */
  async readMany(
    tensors: Tensor[],
    uncounted = false,
  ): Promise<(Float32Array | Int32Array | Uint32Array)[]> {
    if (tensors.length === 0) return [];
    this.endPass();
    const encoder = this.getEncoder();
    // Into staging buffers of at most STAGING_MAX_BYTES (a tensor larger alone has one of its
    // own), each tensor at its own offset, every copy recorded now.
    const parts: { tensors: Tensor[]; offsets: number[]; total: number }[] = [];
    for (const t of tensors) {
      const bytes = Math.ceil(t.bytes / 8) * 8;
      let part = parts.at(-1);
      if (!part || part.total + bytes > this.stagingMaxBytes) {
        parts.push(part = { tensors: [], offsets: [], total: 0 });
      }
      part.tensors.push(t);
      part.offsets.push(part.total);
      part.total += bytes;
    }
    const stagings = parts.map(({ tensors, offsets, total }) => {
      const staging = this.takeStaging(total);
      tensors.forEach((t, i) =>
        encoder.copyBufferToBuffer(t.buffer, t.offset, staging, offsets[i], t.bytes)
      );
      return staging;
    });
    this.flush();
    if (!uncounted) this.waitCount++;
    const settled = parts.map(({ total }, i) => stagings[i].mapAsync(GPUMapMode.READ, 0, total));
    settled.forEach((p) => p.catch(() => {})); // awaited below, where a failure surfaces
    const values: (Float32Array | Int32Array | Uint32Array)[] = [];
    for (const [i, { tensors, offsets, total }] of parts.entries()) {
      const staging = stagings[i];
      let mapped = this.mappedBefore.has(staging) ? this.earlyRange(staging, total) : null;
      if (mapped) {
        // Its promise settles later with nothing left to do (the buffer may be mapped again by
        // then: Deno only records its state).
        this.earlyReadCount++;
      } else {
        await settled[i];
        mapped = staging.getMappedRange(0, total);
      }
      for (const [k, t] of tensors.entries()) {
        const bytes = mapped.slice(offsets[k], offsets[k] + t.bytes);
        values.push(
          t.dtype === "f32"
            ? new Float32Array(bytes)
            : t.dtype === "i32"
            ? new Int32Array(bytes)
            : new Uint32Array(bytes),
        );
      }
      staging.unmap();
      this.mappedBefore.add(staging);
      this.stagingPool.get(staging.size)!.push(staging);
    }
    return values;
  }

  /** The mapped bytes of a staging buffer whose mapAsync has not settled, if wgpu mapped it. */
  private earlyRange(staging: GPUBuffer, total: number): ArrayBuffer | null {
    if (!EARLY_READS) return null;
    try {
      return staging.getMappedRange(0, total);
    } catch {
      return null; // not mapped yet: the promise it is
    }
  }

  /**
   * A MAP_READ buffer of at least `bytes`, from the pool when one is free: sizes are powers of
   * two, so that once a run has seen its read sizes, reads create no buffers.
   */
  private takeStaging(bytes: number): GPUBuffer {
    const size = Math.max(256, 2 ** Math.ceil(Math.log2(bytes)));
    let free = this.stagingPool.get(size);
    if (!free) this.stagingPool.set(size, free = []);
    return free.pop() ?? this.createBuffer({
      label: "staging",
      size,
      usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST,
    });
  }

  destroy(): void {
    this.flush();
    this.device.destroy();
  }

  /** The uniform ring, made on first use. */
  private ring(): GPUBuffer {
    if (!this.uniformRing) {
      this.uniformRing = this.createBuffer({
        label: "uniform ring",
        size: this.uniformData.byteLength,
        usage: GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST,
      });
    }
    return this.uniformRing;
  }

  /** A small number naming a buffer or pipeline in bind-group keys. */
  private id(o: object): number {
    let id = this.ids.get(o);
    if (id === undefined) this.ids.set(o, id = this.nextId++);
    return id;
  }

  private getEncoder(): GPUCommandEncoder {
    if (!this.encoder) this.encoder = this.device.createCommandEncoder();
    return this.encoder;
  }

  private endPass(): void {
    if (this.pass) {
      this.pass.end();
      this.pass = null;
    }
  }
}

/** GPU time of one kernel over a profile, in all and by shape. */
export interface ProfiledKernel {
  kernel: string;
  ms: number;
  dispatches: number;
  shapes: { shape: string; ms: number; dispatches: number }[];
}

/** A profiled dispatch: its kernel and its shape. */
type ProfileLabel = { kernel: string; shape: string };

/** Timestamps of profiled dispatches: a query set resolved and read back at every submit. */
class Profiler {
  private static readonly QUERIES = 2048;
  private querySet: GPUQuerySet;
  private labels: ProfileLabel[] = [];
  private batches: Promise<{ labels: ProfileLabel[]; ticks: BigInt64Array }>[] = [];

  constructor(private readonly device: GPUDevice) {
    this.querySet = device.createQuerySet({ type: "timestamp", count: Profiler.QUERIES });
  }

  get full(): boolean {
    return 2 * (this.labels.length + 1) > Profiler.QUERIES;
  }

  next(kernel: string, shape: string): GPUComputePassTimestampWrites {
    const i = this.labels.length;
    this.labels.push({ kernel, shape });
    return {
      querySet: this.querySet,
      beginningOfPassWriteIndex: 2 * i,
      endOfPassWriteIndex: 2 * i + 1,
    };
  }

  /**
   * Record the resolve of this submit's timestamps into `encoder`; the returned function starts
   * their read-back once the encoder is submitted.
   */
  resolve(encoder: GPUCommandEncoder): (() => void) | undefined {
    const count = 2 * this.labels.length;
    if (count === 0) return undefined;
    const bytes = count * 8;
    const resolved = this.device.createBuffer({
      size: bytes,
      usage: GPUBufferUsage.QUERY_RESOLVE | GPUBufferUsage.COPY_SRC,
    });
    const staging = this.device.createBuffer({
      size: bytes,
      usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST,
    });
    encoder.resolveQuerySet(this.querySet, 0, count, resolved, 0);
    encoder.copyBufferToBuffer(resolved, 0, staging, 0, bytes);
    const labels = this.labels;
    this.labels = [];
    return () =>
      this.batches.push(
        staging.mapAsync(GPUMapMode.READ).then(() => {
          const ticks = new BigInt64Array(staging.getMappedRange().slice(0));
          staging.destroy();
          resolved.destroy();
          return { labels, ticks };
        }),
      );
  }

  async totals(): Promise<ProfiledKernel[]> {
    const byKernel = new Map<string, ProfiledKernel>();
    for (const { labels, ticks } of await Promise.all(this.batches)) {
      labels.forEach(({ kernel, shape }, i) => {
        const ms = Number(ticks[2 * i + 1] - ticks[2 * i]) / 1e6;
        let entry = byKernel.get(kernel);
        if (!entry) byKernel.set(kernel, entry = { kernel, ms: 0, dispatches: 0, shapes: [] });
        entry.ms += ms;
        entry.dispatches++;
        let byShape = entry.shapes.find((s) => s.shape === shape);
        if (!byShape) entry.shapes.push(byShape = { shape, ms: 0, dispatches: 0 });
        byShape.ms += ms;
        byShape.dispatches++;
      });
    }
    this.querySet.destroy();
    for (const entry of byKernel.values()) entry.shapes.sort((a, b) => b.ms - a.ms);
    return [...byKernel.values()].sort((a, b) => b.ms - a.ms);
  }
}

/** A read in flight (Gpu.readLater): awaiting it before its values arrived is a GPU wait. */
export class PendingRead<T> implements PromiseLike<T> {
  private arrived = false;
  private readonly values: Promise<T>;

  constructor(values: Promise<T>, private readonly onWait: () => void) {
    this.values = values.then((v) => {
      this.arrived = true;
      return v;
    });
  }

  then<A = T, B = never>(
    onArrived?: ((value: T) => A | PromiseLike<A>) | null,
    onFailed?: ((reason: unknown) => B | PromiseLike<B>) | null,
  ): Promise<A | B> {
    if (!this.arrived) {
      this.onWait();
      this.arrived = true; // counted once
    }
    return this.values.then(onArrived, onFailed);
  }

  /** The same read, its values transformed when they arrive. */
  map<U>(f: (value: T) => U): PendingRead<U> {
    return new PendingRead(this.values.then(f), this.onWait);
  }
}

/**
 * Workgroup counts covering `n` invocations of `size` each, spread over x and y (≤ 65535 each).
 * In WGSL the flat index is `gid.x + gid.y * nwg.x * SIZE` with
 * `@builtin(global_invocation_id) gid` and `@builtin(num_workgroups) nwg`; guard `i < n`.
 */
export function grid(n: number, size: number): [number, number] {
  const groups = Math.ceil(n / size);
  if (groups <= 65535) return [Math.max(groups, 1), 1];
  const y = Math.ceil(groups / 65535);
  return [Math.ceil(groups / y), y];
}
