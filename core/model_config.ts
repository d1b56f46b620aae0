// The Qwen2 model configuration: parsing and validating a Hugging Face `config.json`, the
// built-in presets used by `aha init`, and the canonical list of weight names and shapes.

import { AhaError } from "./errors.ts";

export interface ModelConfig {
  vocabSize: number;
  hiddenSize: number;
  intermediateSize: number;
  numLayers: number;
  numHeads: number;
  numKvHeads: number;
  headDim: number;
  rmsNormEps: number;
  ropeTheta: number;
  tieWordEmbeddings: boolean;
  maxPositionEmbeddings: number;
  bosTokenId: number | null;
  eosTokenId: number | number[] | null;
}

type Json = Record<string, unknown>;

/** Parse a Hugging Face Qwen2 `config.json` object; `file` is named in every error. */
export function parseModelConfig(json: unknown, file = "config.json"): ModelConfig {
  if (typeof json !== "object" || json === null || Array.isArray(json)) {
    throw new AhaError(`${file}: expected a JSON object`);
  }
  const j = json as Json;
  const int = (key: string, fallback?: number): number => {
    const v = j[key] ?? fallback;
    if (typeof v !== "number" || !Number.isInteger(v) || v <= 0) {
      throw new AhaError(
        `${file}: field "${key}" must be a positive integer, got ${JSON.stringify(v)}`,
      );
    }
    return v;
  };
  const num = (key: string, fallback: number): number => {
    const v = j[key] ?? fallback;
    if (typeof v !== "number" || !(v > 0)) {
      throw new AhaError(
        `${file}: field "${key}" must be a positive number, got ${JSON.stringify(v)}`,
      );
    }
    return v;
  };
  const modelType = j.model_type;
  if (modelType !== undefined && modelType !== "qwen2") {
    throw new AhaError(
      `${file}: field "model_type" must be "qwen2", got ${JSON.stringify(modelType)}`,
    );
  }
  const hiddenSize = int("hidden_size");
  const numHeads = int("num_attention_heads");
  const numKvHeads = int("num_key_value_heads", numHeads);
  if (hiddenSize % numHeads !== 0) {
    throw new AhaError(
      `${file}: "hidden_size" (${hiddenSize}) must be divisible by "num_attention_heads" (${numHeads})`,
    );
  }
  if (numHeads % numKvHeads !== 0) {
    throw new AhaError(
      `${file}: "num_attention_heads" (${numHeads}) must be divisible by "num_key_value_heads" (${numKvHeads})`,
    );
  }
  const headDim = hiddenSize / numHeads;
  if (headDim % 2 !== 0) {
    throw new AhaError(`${file}: head dimension ${headDim} must be even for rotary embeddings`);
  }
  const tie = j.tie_word_embeddings ?? false;
  if (typeof tie !== "boolean") {
    throw new AhaError(`${file}: field "tie_word_embeddings" must be true or false`);
  }
  const optId = (key: string) => (typeof j[key] === "number" ? (j[key] as number) : null);
  const eos = j.eos_token_id;
  return {
    vocabSize: int("vocab_size"),
    hiddenSize,
    intermediateSize: int("intermediate_size"),
    numLayers: int("num_hidden_layers"),
    numHeads,
    numKvHeads,
    headDim,
    rmsNormEps: num("rms_norm_eps", 1e-6),
    ropeTheta: num("rope_theta", 10000),
    tieWordEmbeddings: tie,
    maxPositionEmbeddings: int("max_position_embeddings", 32768),
    bosTokenId: optId("bos_token_id"),
    eosTokenId: typeof eos === "number" || Array.isArray(eos) ? (eos as number | number[]) : null,
  };
}

/** The Hugging Face `config.json` object for a config (what transformers needs to load it). */
export function toHfConfig(c: ModelConfig): Json {
  return {
    architectures: ["Qwen2ForCausalLM"],
    model_type: "qwen2",
    vocab_size: c.vocabSize,
    hidden_size: c.hiddenSize,
    intermediate_size: c.intermediateSize,
    num_hidden_layers: c.numLayers,
    num_attention_heads: c.numHeads,
    num_key_value_heads: c.numKvHeads,
    hidden_act: "silu",
    rms_norm_eps: c.rmsNormEps,
    rope_theta: c.ropeTheta,
    tie_word_embeddings: c.tieWordEmbeddings,
    max_position_embeddings: c.maxPositionEmbeddings,
    attention_dropout: 0.0,
    use_sliding_window: false,
    torch_dtype: "float32",
    bos_token_id: c.bosTokenId,
    eos_token_id: c.eosTokenId,
  };
}

/** Presets for `aha init --preset NAME`, as Hugging Face config objects. */
export const PRESETS: Record<string, Json> = {
  // For tests: 2 layers, hidden 64, grouped-query attention (4 query heads share 2 kv heads).
  tiny: {
    vocab_size: 97,
    hidden_size: 64,
    intermediate_size: 172,
    num_hidden_layers: 2,
    num_attention_heads: 4,
    num_key_value_heads: 2,
    rms_norm_eps: 1e-6,
    rope_theta: 10000,
    tie_word_embeddings: true,
    max_position_embeddings: 512,
  },
  // For benchmarks: about 10M parameters.
  small: {
    vocab_size: 8000,
    hidden_size: 256,
    intermediate_size: 704,
    num_hidden_layers: 10,
    num_attention_heads: 8,
    num_key_value_heads: 2,
    rms_norm_eps: 1e-6,
    rope_theta: 10000,
    tie_word_embeddings: true,
    max_position_embeddings: 2048,
  },
};

/** Every weight of the model, in Hugging Face names and order, with its shape. */
export function weightShapes(c: ModelConfig): Map<string, number[]> {
  const h = c.hiddenSize, d = c.headDim;
  const shapes = new Map<string, number[]>();
  shapes.set("model.embed_tokens.weight", [c.vocabSize, h]);
  for (let i = 0; i < c.numLayers; i++) {
    const p = `model.layers.${i}.`;
    shapes.set(p + "input_layernorm.weight", [h]);
    shapes.set(p + "self_attn.q_proj.weight", [c.numHeads * d, h]);
    shapes.set(p + "self_attn.q_proj.bias", [c.numHeads * d]);
    shapes.set(p + "self_attn.k_proj.weight", [c.numKvHeads * d, h]);
    shapes.set(p + "self_attn.k_proj.bias", [c.numKvHeads * d]);
    shapes.set(p + "self_attn.v_proj.weight", [c.numKvHeads * d, h]);
    shapes.set(p + "self_attn.v_proj.bias", [c.numKvHeads * d]);
    shapes.set(p + "self_attn.o_proj.weight", [h, c.numHeads * d]);
    shapes.set(p + "post_attention_layernorm.weight", [h]);
    shapes.set(p + "mlp.gate_proj.weight", [c.intermediateSize, h]);
    shapes.set(p + "mlp.up_proj.weight", [c.intermediateSize, h]);
    shapes.set(p + "mlp.down_proj.weight", [h, c.intermediateSize]);
  }
  shapes.set("model.norm.weight", [h]);
  if (!c.tieWordEmbeddings) shapes.set("lm_head.weight", [c.vocabSize, h]);
  return shapes;
}

export function parameterCount(c: ModelConfig): number {
  let n = 0;
  for (const shape of weightShapes(c).values()) n += shape.reduce((a, b) => a * b, 1);
  return n;
}
