// Per-token log-probs of whole token sequences on the GPU model: the engine behind `aha score`
// and the WebGPU reference engine. Sequences of different lengths are right-padded into batches
// (causal attention makes the padding invisible to the real tokens); a GRPO batch's rows that
// share a prompt run it once (GpuModel.forwardShared) when that saves tokens. Every batch's
// log-probs are copied into one buffer as its forward is recorded, and that buffer is read once:
// a call waits on the GPU once however many batches it takes, and the GPU runs the batches back to
// back. Or not read at all (`heldScores`): an in-process reference leaves them on the GPU, where
// the policy's GRPO loss reads them.

import type { HeldLogprobs } from "../core/engine.ts";
import { passTokens, SCORE_BATCH_TOKENS } from "../core/plan.ts";
import type { Gpu, Tensor } from "./device.ts";
import { type GpuModel, tailPositions, worthSharing } from "./model.ts";

/**
 * Log-probs on the GPU: row i's `count` values from element `at` of `values` (a scratch buffer:
 * valid until the next scoring call on this GPU). A GRPO loss on the same GPU reads them there.
 */
export class GpuHeldLogprobs implements HeldLogprobs {
  constructor(
    readonly gpu: Gpu,
    readonly values: Tensor,
    readonly rows: { at: number; count: number }[],
  ) {}

  slice(start: number, end: number): GpuHeldLogprobs {
    return new GpuHeldLogprobs(this.gpu, this.values, this.rows.slice(start, end));
  }

  async read(): Promise<number[][]> {
    const data = await this.gpu.read(this.values);
    return this.rows.map(({ at, count }) => Array.from(data.subarray(at, at + count)));
  }
}

/** heldScores, read back: logprobs[i] as numbers, with one GPU wait however many batches. */
export async function scoreSequences(
  ...args: Parameters<typeof heldScores>
): Promise<number[][]> {
  return await heldScores(...args).read();
}

/**
 * logprobs[i][t] = log p(seq_i[t+1] | seq_i[0..t]); row i has max(0, len_i − 1) values, or
 * with `from` only those from t = from[i] on (the vocabulary projection then skips positions
 * before each batch's smallest from[i]). `adapter` false scores a LoRA model's base (its adapter
 * switched off). Batches hold at most `batchTokens` tokens (padding included; by default as many
 * as one storage binding allows: core/plan.ts passTokens) or one sequence.
 * The work is recorded and submitted; the log-probs stay on the GPU until read.
 */
export function heldScores(
  model: GpuModel,
  sequences: number[][],
  invTemperature = 1,
  adapter = true,
  from?: number[],
  batchTokens = passTokens(model.config, model.maxBinding, SCORE_BATCH_TOKENS),
): GpuHeldLogprobs {
  const gpu = model.gpu;
  // Rows [start, end) padded to L tokens, at `at` in the joined log-probs.
  const batches: { start: number; end: number; L: number; at: number }[] = [];
  let total = 0;
  for (let start = 0; start < sequences.length;) {
    let end = start, L = 1;
    while (end < sequences.length) {
      const longest = Math.max(L, sequences[end].length);
      if (end > start && longest * (end - start + 1) > batchTokens) break;
      L = longest;
      end++;
    }
    batches.push({ start, end, L, at: total });
    total += (end - start) * L;
    start = end;
  }
  const joined = gpu.scratch("score logprobs", Math.max(total, 1));
  const rows: { at: number; count: number }[] = [];
  for (const { start, end, L, at } of batches) {
    const B = end - start, rowsHere = sequences.slice(start, end);
    // A GRPO batch (from[i]: row i's prompt ends there) runs each group's prompt once when that
    // saves tokens: log-probs [B·C], row b's completion's from b·C.
    const shared = from ? worthSharing(rowsHere, from.slice(start, end).map((f) => f + 1)) : null;
    if (shared) {
      const C = tailPositions(shared.tails);
      const logp = model.forwardShared(shared, invTemperature, false, adapter);
      gpu.copy(logp, joined, B * C, 0, at);
      shared.tails.forEach((tail, b) => rows.push({ at: at + b * C, count: tail.length - 1 }));
      continue;
    }
    const ids = new Int32Array(B * L);
    for (let b = 0; b < B; b++) ids.set(sequences[start + b], b * L);
    const first = from ? Math.min(...from.slice(start, end)) : 0;
    const logp = model.forward(ids, B, L, invTemperature, false, adapter, first);
    gpu.copy(logp, joined, B * L, 0, at);
    for (let b = 0; b < B; b++) {
      const n = Math.max(0, sequences[start + b].length - 1);
      const f = Math.min(from?.[start + b] ?? 0, n);
      rows.push({ at: at + b * L + f, count: n - f });
    }
  }
  gpu.flush(); // the GPU starts on them while the caller records what comes next
  return new GpuHeldLogprobs(gpu, joined.view(0, [Math.max(total, 1)]), rows);
}
