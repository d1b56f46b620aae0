// 16-bit floats on the CPU side: f32 values narrowed to bf16 or IEEE f16 (round to nearest,
// ties to even) and packed two to a little-endian u32 — element 2i in the low half, 2i+1 in the
// high half — the layout the GPU kernels read frozen weights in; and back to f32.
//
// A value that came from a BF16 (F16) checkpoint is exactly representable, so narrowing it again
// is exact and the GPU, widening it, computes with the very f32 the checkpoint loader produced.

export type HalfDType = "bf16" | "f16";
/** The config's frozen_dtype: "auto" = each tensor's dtype in the checkpoint. */
export type FrozenDtype = "auto" | "bf16" | "f16" | "f32";

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

/** The bf16 bits of x (round to nearest even; NaN stays NaN). */
export function bf16Bits(x: number): number {
  f32[0] = x;
  const bits = u32[0];
  if ((bits & 0x7f800000) === 0x7f800000 && (bits & 0x7fffff) !== 0) return (bits >>> 16) | 0x40;
  return ((bits + 0x7fff + ((bits >>> 16) & 1)) >>> 16) & 0xffff;
}

/** The IEEE half bits of x (round to nearest even; overflow → ±Inf; NaN stays NaN). */
export function f16Bits(x: number): number {
  f32[0] = x;
  const bits = u32[0];
  const sign = (bits >>> 16) & 0x8000;
  const exponent = (bits >>> 23) & 0xff, mantissa = bits & 0x7fffff;
  if (exponent === 0xff) return sign | 0x7c00 | (mantissa !== 0 ? 0x200 : 0);
  const e = exponent - 127 + 15;
  if (e >= 0x1f) return sign | 0x7c00;
  if (e <= 0) {
    // Subnormal half (or zero): shift the full mantissa (with its hidden bit) into place.
    if (e < -10) return sign;
    const full = mantissa | 0x800000, shift = 14 - e;
    const half = full >>> shift, rest = full & ((1 << shift) - 1), halfway = 1 << (shift - 1);
    return sign | (half + (rest > halfway || (rest === halfway && (half & 1)) ? 1 : 0));
  }
  const half = (e << 10) | (mantissa >>> 13), rest = mantissa & 0x1fff;
  // A carry out of the mantissa rightly bumps the exponent (up to Inf).
  return sign | (half + (rest > 0x1000 || (rest === 0x1000 && (half & 1)) ? 1 : 0));
}

/** The f32 value of bf16 bits. */
export function bf16Value(bits: number): number {
  u32[0] = bits << 16;
  return f32[0];
}

/** The f32 value of IEEE half bits. */
export function f16Value(bits: number): number {
  const sign = bits & 0x8000 ? -1 : 1, exponent = (bits >>> 10) & 0x1f, mantissa = bits & 0x3ff;
  if (exponent === 0) return sign * mantissa * 2 ** -24;
  if (exponent === 0x1f) return mantissa ? NaN : sign * Infinity;
  return sign * (1 + mantissa / 1024) * 2 ** (exponent - 15);
}

/** data narrowed to `dtype`, packed two per u32 (an odd length leaves the last high half 0). */
export function packHalves(data: Float32Array, dtype: HalfDType): Uint32Array {
  const narrow = dtype === "bf16" ? bf16Bits : f16Bits;
  const packed = new Uint32Array(Math.ceil(data.length / 2));
  for (let i = 0; i < data.length; i += 2) {
    const high = i + 1 < data.length ? narrow(data[i + 1]) : 0;
    packed[i >> 1] = (narrow(data[i]) | (high << 16)) >>> 0;
  }
  return packed;
}

/**
 * 16-bit values already narrowed (a checkpoint's own BF16 or F16 bits), packed two per u32: the
 * same memory where it can be (an even count at a 4-byte offset), else a copy (an odd count
 * leaves the last high half 0).
 */
export function pairHalves(halves: Uint16Array): Uint32Array {
  if (halves.length % 2 === 0 && halves.byteOffset % 4 === 0) {
    return new Uint32Array(halves.buffer, halves.byteOffset, halves.length / 2);
  }
  const packed = new Uint32Array(Math.ceil(halves.length / 2));
  new Uint16Array(packed.buffer, 0, halves.length).set(halves);
  return packed;
}

/** The index of the first NaN or infinite value among 16-bit bits of `dtype`, or −1. */
export function firstNonFiniteHalf(halves: Uint16Array, dtype: HalfDType): number {
  const exponent = dtype === "bf16" ? 0x7f80 : 0x7c00; // all ones: Inf or NaN
  for (let i = 0; i < halves.length; i++) if ((halves[i] & exponent) === exponent) return i;
  return -1;
}

/** The f32 value of one value's bits in `dtype`. */
export const halfValue = (bits: number, dtype: HalfDType): number =>
  dtype === "bf16" ? bf16Value(bits) : f16Value(bits);

/** The first n values of packed 16-bit data, widened to f32. */
export function unpackHalves(packed: Uint32Array, n: number, dtype: HalfDType): Float32Array {
  const widen = dtype === "bf16" ? bf16Value : f16Value;
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) out[i] = widen((packed[i >> 1] >>> (i & 1 ? 16 : 0)) & 0xffff);
  return out;
}

/** data rounded through `dtype` (what 16-bit storage of it holds). */
export function roundThrough(data: Float32Array, dtype: HalfDType): Float32Array {
  return unpackHalves(packHalves(data, dtype), data.length, dtype);
}

/**
 * How each frozen matrix of a checkpoint is stored on the GPU for `frozen_dtype`: "auto" keeps
 * each tensor's own 16-bit dtype (BF16 → bf16; F16 → f16 where the adapter has shader-f16, else
 * f32, which holds it exactly too); "bf16"/"f16" narrow every matrix; "f32" none. Weights not
 * named (1-D ones, and any given in F32 under "auto") are f32.
 */
export function frozenWeightDtypes(
  frozenDtype: FrozenDtype,
  shapes: Map<string, number[]>,
  checkpointDtypes: Map<string, string>,
  hasF16: boolean,
): Map<string, HalfDType> {
  const storage = new Map<string, HalfDType>();
  for (const [name, shape] of shapes) {
    if (shape.length !== 2) continue;
    const own = checkpointDtypes.get(name);
    const dtype = frozenDtype === "auto"
      ? own === "BF16" ? "bf16" : own === "F16" && hasF16 ? "f16" : null
      : frozenDtype === "f32"
      ? null
      : frozenDtype;
    if (dtype !== null) storage.set(name, dtype);
  }
  return storage;
}
