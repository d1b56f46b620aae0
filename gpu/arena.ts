// Arenas: a model's trained f32 tensors packed into a few buffers, so that the optimizer step
// clears, norms and updates them one buffer at a time instead of one tensor at a time.
//
// AdamW and the gradient norm are elementwise over every trained value with the same
// hyperparameters, so they do not care where one tensor ends and the next begins. Laid out
// alike — each gradient, moment and weight at the same offset of a same-sized buffer — the
// whole optimizer step is a few dispatches (Qwen2.5-0.5B's LoRA adapter has 336 tensors; the
// default model 26) and zeroing the gradients a few clears. Each tensor is a view starting on a
// binding boundary (kernels bind it alone); the gaps between them hold zeros, which AdamW keeps
// at zero and which add nothing to the norm. An arena holds at most ARENA_MAX_BYTES or one
// binding, whichever is less; a tensor larger than that (a row slice of a large embedding)
// gets an arena of its own.

import { BINDING_ALIGNMENT, type Gpu, Tensor } from "./device.ts";

/** Bytes one arena holds unless a single tensor needs more (keeps allocations moderate). */
export const ARENA_MAX_BYTES = 256 * 1024 * 1024;

/** Elements between binding boundaries (f32). */
const ALIGN = BINDING_ALIGNMENT / 4;

/** Where each tensor of a list lies: its arena and first element, and every arena's size. */
export interface ArenaLayout {
  sizes: number[];
  places: { arena: number; start: number }[];
}

/**
 * Pack f32 tensors of `shapes` into arenas of at most `maxBytes` (a tensor over that gets an
 * arena of its own), each into the first arena with room for it (so small tensors fill the
 * tails that large ones leave), starting at a multiple of ALIGN elements.
 */
export function packArenas(shapes: number[][], maxBytes: number): ArenaLayout {
  const maxElements = Math.max(ALIGN, Math.floor(maxBytes / 4 / ALIGN) * ALIGN);
  const layout: ArenaLayout = { sizes: [], places: [] };
  for (const shape of shapes) {
    const size = shape.reduce((a, b) => a * b, 1);
    const padded = Math.ceil(Math.max(size, 1) / ALIGN) * ALIGN;
    let arena = layout.sizes.findIndex((used) => used + padded <= maxElements);
    if (arena < 0) arena = layout.sizes.push(0) - 1;
    layout.places.push({ arena, start: layout.sizes[arena] });
    layout.sizes[arena] += padded;
  }
  return layout;
}

/** A set of arenas: zeroed f32 buffers laid out by one ArenaLayout. */
export class Arenas {
  /** Each arena as one f32 tensor (what the optimizer binds). */
  readonly buffers: Tensor[];

  constructor(gpu: Gpu, readonly layout: ArenaLayout, label: string) {
    this.buffers = layout.sizes.map((n, i) => gpu.zeros([n], "f32", `${label} ${i}`));
  }

  /** Tensor i of the layout, with its shape. */
  view(i: number, shape: number[]): Tensor {
    const { arena, start } = this.layout.places[i];
    return this.buffers[arena].view(start, shape);
  }

  /** Arenas of the same layout, zeroed: a tensor's counterpart lies at its place (`mirror`). */
  twin(gpu: Gpu, label: string): Arenas {
    return new Arenas(gpu, this.layout, label);
  }

  /** The counterpart in this set of `t`, a tensor of the set `of` (whose twin this is). */
  mirror(t: Tensor, of: Arenas): Tensor {
    const arena = of.buffers.findIndex((b) => b.buffer === t.buffer);
    if (arena < 0 || t.dtype !== "f32") throw new Error("Arenas.mirror: not a tensor of the set");
    return this.buffers[arena].view(t.offset / 4, t.shape);
  }

  destroy(): void {
    for (const b of this.buffers) b.destroy();
  }
}
