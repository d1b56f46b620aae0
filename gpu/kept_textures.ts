// Texture copies of a model's weights, kept across products until the weights change.
//
// On a software adapter the matmul reads its operands from texture copies (`Gpu.textureCopy`):
// gallivm gathers texels but loads storage one SIMD lane at a time. An activation is new at every
// call and is copied every time; a weight changes only when the optimizer steps (or its values
// are replaced), yet it was copied for every product too: a 0.5B model's decode step copied its
// 0.7 GB of bf16 weights, ~3.4 ms for each 17 MB. So a model keeps one copy per
// weight tensor, made on first use and made again only after `stale()`. The copies hold as
// many bytes again as the weights: all of a process's copies stay within a quarter of the
// machine's memory, and each new one within half of what is free when it is made; a weight past
// that is copied per product as before.

import type { Gpu, Tensor } from "./device.ts";

/** Bytes of kept copies in this process. */
let keptBytes = 0;

interface KeptCopy {
  texture: GPUTexture;
  view: GPUTextureView;
  bytes: number;
  /** Made since the last stale(): its texels are the tensor's. */
  fresh: boolean;
}

export class KeptTextures {
  private readonly copies = new Map<Tensor, KeptCopy | null>();

  /** `budget`: bytes this instance may keep (tests); by default, the machine's memory decides. */
  constructor(private readonly gpu: Gpu, private readonly budget?: number) {}

  /**
   * t's kept copy (copied now if it is new or stale), or null: t cannot be a texture or the budget
   * is spent, and the caller copies it per use. t is identified by the object: pass the same
   * Tensor each time (a model's weight slices).
   */
  view(t: Tensor): GPUTextureView | null {
    let copy = this.copies.get(t);
    if (copy === undefined) {
      const made = this.roomFor(t.bytes) ? this.gpu.copyTexture(t, "kept copy") : null;
      copy = made && { ...made, bytes: t.bytes, fresh: false };
      if (copy) keptBytes += copy.bytes;
      this.copies.set(t, copy);
    }
    if (!copy) return null;
    if (!copy.fresh) {
      this.gpu.recordTextureCopy(t, copy.texture);
      copy.fresh = true;
    }
    return copy.view;
  }

  /** Whether a copy of `bytes` more may be kept (the budget given, or the machine's memory). */
  private roomFor(bytes: number): boolean {
    if (this.budget !== undefined) return keptBytes + bytes <= this.budget;
    try {
      const memory = Deno.systemMemoryInfo();
      return keptBytes + bytes <= memory.total / 4 && bytes <= memory.available / 2;
    } catch {
      return false; // no --allow-sys: copy per product
    }
  }

  /** The tensors' values changed: each copy is made again when next read. */
  stale(): void {
    for (const copy of this.copies.values()) if (copy) copy.fresh = false;
  }

  /** Free every copy (once the work recorded so far is submitted). */
  destroy(): void {
    for (const copy of this.copies.values()) {
      if (!copy) continue;
      this.gpu.releaseTexture(copy.texture);
      keptBytes -= copy.bytes;
    }
    this.copies.clear();
  }
}
