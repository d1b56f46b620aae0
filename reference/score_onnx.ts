// `aha score --engine onnx`: per-token log-probs of token sequences computed by the
// onnxruntime-web engine, in the same format as aha's own WebGPU engine.

import { OnnxEngine } from "./onnx_engine.ts";

/** logprobs[i][t] = log p(seq_i[t+1] | seq_i[0..t]) under the checkpoint in `modelDir`. */
export async function scoreWithOnnx(
  modelDir: string,
  sequences: number[][],
  threads?: number,
): Promise<number[][]> {
  const engine = await OnnxEngine.create(modelDir, { threads });
  try {
    return await engine.logprobs(sequences);
  } finally {
    await engine.release();
  }
}
