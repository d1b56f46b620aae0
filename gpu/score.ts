// Per-token log-probs of whole token sequences on the GPU model: the engine behind `aha score`
// and the WebGPU reference engine. Sequences of different lengths are right-padded into batches
// (causal attention makes the padding invisible to the real tokens).

import { SCORE_BATCH_TOKENS } from "../core/plan.ts";
import type { GpuModel } from "./model.ts";

/**
 * logprobs[i][t] = log p(seq_i[t+1] | seq_i[0..t]); row i has max(0, len_i − 1) values, or
 * with `from` only those from t = from[i] on (the vocabulary projection then skips positions
 * before each batch's smallest from[i]). `adapter` false scores a LoRA model's base (its adapter
 * switched off).
 */
export async function scoreSequences(
  model: GpuModel,
  sequences: number[][],
  invTemperature = 1,
  adapter = true,
  from?: number[],
): Promise<number[][]> {
  const result: number[][] = sequences.map(() => []);
  let start = 0;
  while (start < sequences.length) {
    let end = start, L = 1;
    while (end < sequences.length) {
      const longest = Math.max(L, sequences[end].length);
      if (end > start && longest * (end - start + 1) > SCORE_BATCH_TOKENS) break;
      L = longest;
      end++;
    }
    const B = end - start;
    const ids = new Int32Array(B * L);
    for (let b = 0; b < B; b++) ids.set(sequences[start + b], b * L);
    const first = from ? Math.min(...from.slice(start, end)) : 0;
    const logp = await model.gpu.read(
      model.forward(ids, B, L, invTemperature, false, adapter, first),
    );
    for (let b = 0; b < B; b++) {
      const n = Math.max(0, sequences[start + b].length - 1);
      const f = Math.min(from?.[start + b] ?? 0, n);
      result[start + b] = Array.from(logp.subarray(b * L + f, b * L + n));
    }
    start = end;
  }
  return result;
}
