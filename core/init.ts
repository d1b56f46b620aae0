// Fresh model weights, initialised as Hugging Face does for Qwen2 (initializer_range 0.02):
// linear and embedding weights ~ N(0, 0.02²), biases 0, RMSNorm weights 1. Seeded and
// deterministic: the same config and seed give the same bytes on every machine.

import { type ModelConfig, weightShapes } from "./model_config.ts";

const INIT_STD = 0.02;

/** mulberry32: a small 32-bit generator; returns uniform numbers in [0, 1). */
function uniformGenerator(seed: number): () => number {
  let state = seed >>> 0;
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Standard normal samples by the Box–Muller transform, two per pair of uniforms. */
function normalGenerator(seed: number): () => number {
  const uniform = uniformGenerator(seed);
  let spare: number | null = null;
  return () => {
    if (spare !== null) {
      const z = spare;
      spare = null;
      return z;
    }
    const radius = Math.sqrt(-2 * Math.log(1 - uniform())); // 1 - u is in (0, 1]
    const angle = 2 * Math.PI * uniform();
    spare = radius * Math.sin(angle);
    return radius * Math.cos(angle);
  };
}

/** Every weight of weightShapes(config), in that order. */
export function initWeights(config: ModelConfig, seed: number): Map<string, Float32Array> {
  const normal = normalGenerator(seed);
  const weights = new Map<string, Float32Array>();
  for (const [name, shape] of weightShapes(config)) {
    const data = new Float32Array(shape.reduce((a, b) => a * b, 1));
    if (name.endsWith("norm.weight")) data.fill(1);
    else if (!name.endsWith(".bias")) {
      for (let i = 0; i < data.length; i++) data[i] = INIT_STD * normal();
    }
    weights.set(name, data);
  }
  return weights;
}
