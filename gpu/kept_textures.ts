// Texture copies kept across kernels until what they copy changes: a model's weights, and
// generation's KV caches.
//
// On a software adapter the matmul and attention read their operands from texture copies
// (`Gpu.textureCopy`): gallivm gathers texels but loads storage one SIMD lane at a time. An
// activation is new at every call and is copied every time. A weight changes only when the
// optimizer steps (or its values are replaced), yet it was copied for every product too: a 0.5B
// model's decode step copied its 0.7 GB of bf16 weights, ~3.4 ms for each 17 MB. So a model keeps
// one copy per weight tensor, made on first use and made again only after `stale()`. A decode
// step writes one position of each row's cache, so the caches' copies take just those
// (`changed()`) instead of whole layers. The copies hold as many bytes again as what they copy:
// aha train gives them what its memory plan leaves free (AHA_KEPT_TEXTURE_BYTES); elsewhere the
// copies of one KeptTextures stay within what its first copy finds (memoryBudget): a quarter of
// the machine's memory, and no more than leaves an eighth of it available. Past that, copies are
// made per use as before.

import { AhaError } from "../core/errors.ts";
import type { Gpu, Tensor, TextureLayout } from "./device.ts";

/**
 * What one more copy command costs, in bytes of memcpy (changed()'s choice between ranges and the
 * whole): on lavapipe ~6 µs a range against ~6 GB/s (8 ranges of a 3.8 MB cache: 335 µs, the whole
 * 648 µs; 32 ranges of a 16.8 MB one: 489 µs against 2.9 ms).
 */
const RANGE_BYTES = 32 * 1024;

/** Bytes of kept copies in this process. */
let keptBytes = 0;

/** Bytes the kept copies of this process hold now (textures of whole rows of texels). */
export function keptTextureBytes(): number {
  return keptBytes;
}

/** The environment variable that sets the copies' budget in bytes (each process's). */
export const BUDGET_VARIABLE = "AHA_KEPT_TEXTURE_BYTES";

/**
 * The bytes this process's copies may hold when AHA_KEPT_TEXTURE_BYTES sets them (aha train does,
 * from its memory plan's headroom; main.ts checks the variable before any command's work); null
 * when unset. Read at each new copy, so a budget set later applies. A bad value is an AhaError.
 */
export function keptTextureBudget(): number | null {
  let value: string | undefined;
  try {
    value = Deno.env.get(BUDGET_VARIABLE);
  } catch {
    value = undefined; // no --allow-env
  }
  if (value === undefined || value === "") return null;
  const budget = Number(value);
  if (!(budget >= 0)) {
    throw new AhaError(`${BUDGET_VARIABLE} must be a number of bytes ≥ 0, got "${value}"`);
  }
  return budget;
}

interface KeptCopy {
  texture: GPUTexture;
  view: GPUTextureView;
  bytes: number;
  layout: TextureLayout;
  /** Made since the last stale(): its texels are the tensor's but for `changed`. */
  fresh: boolean;
  /** Texel ranges [first, count) written since the copy was made, copied at the next view(). */
  changed: [number, number][];
}

/**
 * The bytes one KeptTextures may keep when the machine's memory decides, taken when it makes its
 * first copy (the model's buffers are in memory by then, and copies are not until their commands
 * run, so what is available is read once): together with every other copy within a quarter of the
 * memory, and leaving an eighth of it available for what grows later (per-use copies,
 * activations, the program). A 7B model's `aha score` on a 24 GB machine was killed for want of
 * memory when each copy had only to fit half of what was available.
 */
export function memoryBudget(memory: { total: number; available: number }): number {
  return Math.max(0, Math.min(memory.total / 4 - keptBytes, memory.available - memory.total / 8));
}

export class KeptTextures {
  private readonly copies = new Map<Tensor, KeptCopy | null>();
  /** Bytes of this instance's copies, and its budget from memoryBudget once taken. */
  private ownBytes = 0;
  private fromMemory: number | undefined;

  /** `budget`: bytes this instance may keep (tests); by default, the machine's memory decides. */
  constructor(private readonly gpu: Gpu, private readonly budget?: number) {}

  /**
   * t's kept copy (copied now if it is new or stale), or null: t cannot be a texture or the budget
   * is spent, and the caller copies it per use. t is identified by the object: pass the same
   * Tensor each time (a model's weight slices), with the same `rowLength` (a matrix's rows, for a
   * copy laid out by them: `Gpu.matrixRows`).
   */
  view(t: Tensor, rowLength?: number): GPUTextureView | null {
    let copy = this.copies.get(t);
    if (copy === undefined) {
      // Counted as the texture is: whole rows of texels.
      const bytes = this.gpu.textureCopyBytes(t, rowLength);
      const made = bytes !== null && this.roomFor(bytes)
        ? this.gpu.copyTexture(t, "kept copy", rowLength)
        : null;
      copy = made && { ...made, bytes: bytes!, fresh: false, changed: [] };
      if (copy) {
        keptBytes += copy.bytes;
        this.ownBytes += copy.bytes;
      }
      this.copies.set(t, copy);
    }
    if (!copy) return null;
    const asked = this.gpu.matrixRows(t, rowLength), made = copy.layout.rows;
    if (asked?.rowTexels !== made?.rowTexels || asked?.bandShift !== made?.bandShift) {
      throw new Error("KeptTextures.view: a tensor's copy was asked for with other rows");
    }
    if (!copy.fresh) {
      this.gpu.recordWholeCopy(t, copy.texture, copy.layout);
      copy.fresh = true;
    } else {
      for (const [first, count] of copy.changed) {
        this.gpu.recordTextureCopy(t, copy.texture, first, count);
      }
    }
    copy.changed = [];
    return copy.view;
  }

  /**
   * Whether a copy of `bytes` more may be kept: within the budget given, else the one the
   * environment sets, else the machine's memory (memoryBudget).
   */
  private roomFor(bytes: number): boolean {
    const budget = this.budget ?? keptTextureBudget();
    if (budget !== null) return keptBytes + bytes <= budget;
    if (this.fromMemory === undefined) {
      try {
        this.fromMemory = memoryBudget(Deno.systemMemoryInfo());
      } catch {
        this.fromMemory = 0; // no --allow-sys: copy per product
      }
    }
    return this.ownBytes + bytes <= this.fromMemory;
  }

  /**
   * Elements [start, start + count) of t were written (each a multiple of 4): its copy takes just
   * those at the next view(), or all of it when that is cheaper (a copy command costs about what
   * RANGE_BYTES of memcpy do).
   */
  changed(t: Tensor, ranges: [number, number][]): void {
    const copy = this.copies.get(t);
    if (!copy?.fresh) return; // none, or to be made whole anyway
    if (copy.layout.rows) throw new Error("KeptTextures.changed: a copy laid out by rows");
    copy.changed.push(...ranges.map(([start, count]): [number, number] => [start / 4, count / 4]));
    if (copy.changed.length * RANGE_BYTES >= t.bytes) copy.fresh = false;
  }

  /**
   * The tensors' values changed: each copy is made again when next read, and a tensor refused a
   * copy for want of room asks again (room may have been freed since).
   */
  stale(): void {
    for (const [t, copy] of this.copies) {
      if (copy) copy.fresh = false;
      else this.copies.delete(t);
    }
  }

  /** Free every copy (once the work recorded so far is submitted). */
  destroy(): void {
    for (const copy of this.copies.values()) {
      if (!copy) continue;
      this.gpu.releaseTexture(copy.texture);
      keptBytes -= copy.bytes;
    }
    this.copies.clear();
    this.ownBytes = 0;
  }
}
