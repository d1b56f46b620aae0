// Exports a Qwen2 checkpoint to an ONNX model that computes per-token log-probs, so that
// onnxruntime-web can run it as aha's second, independent reference engine (onnx_engine.ts).
//
// The graph's interface (also what a user-supplied export must offer):
//   input  "input_ids"        int64 [B, L], L ≥ 2
//   input  "inv_temperature"  float scalar: the logits are multiplied by it (1 = plain log-probs;
//                             optional in a user-supplied export, which then serves 1 only)
//   input  "first"            int64 [1]: the first position whose log-prob is wanted (optional in
//                             a user-supplied export, which then computes them all)
//   output "logprobs"         float [B, L-1-first]
//                             logprobs[b][t] = log p(ids[b][first+t+1] | ids[b][0..first+t])
// The vocabulary projection (a quarter of a Qwen2.5 forward's multiply-adds) runs only on the
// positions from "first" on: a GRPO batch wants log-probs only where completions are.
//
// Tokens are flattened to rows [B·L, H], so every linear layer is one Gemm with transB=1 on the
// Hugging Face [out, in] weight as stored (no transposed copies; a tied lm_head reuses the
// embedding). RMSNorm is SimplifiedLayerNormalization and the rotary embedding (rotate-half) is
// com.microsoft's RotaryEmbedding, both contrib ops of onnxruntime. Attention is spelled out in
// standard ops (MatMul, Where for the causal mask, Softmax): the fused GroupQueryAttention op
// needs a head dimension that is a multiple of 8 (16 with rotary) on the WASM backend.

import onnxProto from "onnx-proto";
import type { onnx as Onnx } from "onnx-proto";
import { AhaError } from "../core/errors.ts";
import type { ModelConfig } from "../core/model_config.ts";

const { onnx } = onnxProto;
const { DataType } = onnx.TensorProto;
const { AttributeType } = onnx.AttributeProto;

/** Bumped whenever the graph changes, so cached exports of older graphs are not reused. */
export const EXPORT_VERSION = 3;

const int = (name: string, i: number): Onnx.IAttributeProto => ({
  name,
  type: AttributeType.INT,
  i,
});
const ints = (name: string, values: number[]): Onnx.IAttributeProto => ({
  name,
  type: AttributeType.INTS,
  ints: values,
});
const float = (name: string, f: number): Onnx.IAttributeProto => ({
  name,
  type: AttributeType.FLOAT,
  f,
});

/** The nodes and initializers of the graph being built; node outputs get fresh names. */
class GraphBuilder {
  nodes: Onnx.INodeProto[] = [];
  initializers: Onnx.ITensorProto[] = [];

  /** Appends one node and returns the name of its output. */
  op(opType: string, input: string[], attribute: Onnx.IAttributeProto[] = [], domain = ""): string {
    const name = `${opType}_${this.nodes.length}`;
    this.nodes.push({ opType, domain, input, output: [name], attribute, name });
    return name;
  }

  tensor(name: string, dims: number[], data: Float32Array | BigInt64Array): string {
    const dataType = data instanceof Float32Array ? DataType.FLOAT : DataType.INT64;
    const rawData = new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
    this.initializers.push({ name, dims, dataType, rawData });
    return name;
  }

  /** An int64 constant (a 1-D tensor, or a scalar when `scalar`). */
  int64(values: number[], scalar = false): string {
    const name = `const_${this.initializers.length}`;
    return this.tensor(name, scalar ? [] : [values.length], BigInt64Array.from(values, BigInt));
  }
}

/** The rotary tables RotaryEmbedding reads: cos/sin(pos · θ^(-2i/D)), [maxPos, D/2]. */
function rotaryTables(c: ModelConfig): { cos: Float32Array; sin: Float32Array } {
  const half = c.headDim / 2;
  const cos = new Float32Array(c.maxPositionEmbeddings * half);
  const sin = new Float32Array(c.maxPositionEmbeddings * half);
  for (let pos = 0; pos < c.maxPositionEmbeddings; pos++) {
    for (let i = 0; i < half; i++) {
      const angle = pos * Math.pow(c.ropeTheta, -(2 * i) / c.headDim);
      cos[pos * half + i] = Math.cos(angle);
      sin[pos * half + i] = Math.sin(angle);
    }
  }
  return { cos, sin };
}

/** The serialized ONNX model (protobuf bytes) for a checkpoint's config and float32 weights. */
export function exportOnnx(c: ModelConfig, weights: ReadonlyMap<string, Float32Array>): Uint8Array {
  const g = new GraphBuilder();
  const w = (name: string, dims: number[]): string => {
    const data = weights.get(name);
    if (!data || data.length !== dims.reduce((a, b) => a * b, 1)) {
      throw new AhaError(`ONNX export: weight "${name}" missing or not of shape [${dims}]`);
    }
    return g.tensor(name, dims, data);
  };
  const H = c.hiddenSize, D = c.headDim, I = c.intermediateSize, V = c.vocabSize;
  const qDim = c.numHeads * D, kvDim = c.numKvHeads * D;
  const linear = (x: string, weight: string, bias?: string) =>
    g.op("Gemm", bias ? [x, weight, bias] : [x, weight], [int("transB", 1)]);
  const rmsNorm = (x: string, weight: string) =>
    g.op("SimplifiedLayerNormalization", [x, weight], [
      int("axis", -1),
      float("epsilon", c.rmsNormEps),
    ]);

  // Shapes derived from input_ids [B, L]: rows [B·L, X] ↔ [B, L, X] ↔ [B, L, heads, group, D].
  const ids = "input_ids";
  const idsShape = g.op("Shape", [ids]);
  const toBL = (x: string, ...dims: number[]) =>
    g.op("Reshape", [x, g.op("Concat", [idsShape, g.int64(dims)], [int("axis", 0)])]);
  const toRows = (x: string, width: number) => g.op("Reshape", [x, g.int64([-1, width])]);

  // Causal mask: future[i][j] = j > i for positions i, j in 0..L-1.
  const length = g.op("Gather", [idsShape, g.int64([1], true)]);
  const positions = g.op("Range", [g.int64([0], true), length, g.int64([1], true)]);
  const future = g.op("Greater", [
    g.op("Unsqueeze", [positions, g.int64([0])]),
    g.op("Unsqueeze", [positions, g.int64([1])]),
  ]);
  const minusInf = g.tensor("minus_inf", [], Float32Array.of(-Infinity));
  const { cos, sin } = rotaryTables(c);
  const cosTable = g.tensor("rotary_cos", [c.maxPositionEmbeddings, D / 2], cos);
  const sinTable = g.tensor("rotary_sin", [c.maxPositionEmbeddings, D / 2], sin);
  const firstPosition = g.int64([0]);
  const rotary = (x: string, heads: number) =>
    g.op("RotaryEmbedding", [x, firstPosition, cosTable, sinTable], [
      int("num_heads", heads),
      int("interleaved", 0),
    ], "com.microsoft");
  const scale = g.tensor("attention_scale", [], Float32Array.of(1 / Math.sqrt(D)));
  const group = c.numHeads / c.numKvHeads;

  // Causal attention with grouped kv heads: query head h = kv·group + j reads kv head kv, so
  // queries are laid out [B, nKv, group, L, D] and keys/values [B, nKv, 1, L, D] broadcast.
  const attention = (q: string, k: string, v: string): string => {
    const qh = g.op("Transpose", [toBL(q, c.numKvHeads, group, D)], [
      ints("perm", [0, 2, 3, 1, 4]),
    ]);
    const kT = g.op("Transpose", [toBL(k, c.numKvHeads, 1, D)], [ints("perm", [0, 2, 3, 4, 1])]);
    const vh = g.op("Transpose", [toBL(v, c.numKvHeads, 1, D)], [ints("perm", [0, 2, 3, 1, 4])]);
    const scores = g.op("Mul", [g.op("MatMul", [qh, kT]), scale]); // [B, nKv, group, L, L]
    const probs = g.op("Softmax", [g.op("Where", [future, minusInf, scores])], [int("axis", -1)]);
    const out = g.op("MatMul", [probs, vh]); // [B, nKv, group, L, D]
    return toRows(g.op("Transpose", [out], [ints("perm", [0, 3, 1, 2, 4])]), qDim);
  };

  const embed = w("model.embed_tokens.weight", [V, H]);
  let x = g.op("Gather", [embed, g.op("Reshape", [ids, g.int64([-1])])]); // [B·L, H]
  for (let l = 0; l < c.numLayers; l++) {
    const p = `model.layers.${l}.`;
    let h = rmsNorm(x, w(p + "input_layernorm.weight", [H]));
    const project = (name: string, dim: number) =>
      toBL(
        linear(
          h,
          w(p + `self_attn.${name}.weight`, [dim, H]),
          w(p + `self_attn.${name}.bias`, [dim]),
        ),
        dim,
      );
    const q = rotary(project("q_proj", qDim), c.numHeads);
    const k = rotary(project("k_proj", kvDim), c.numKvHeads);
    const attn = attention(q, k, project("v_proj", kvDim));
    x = g.op("Add", [x, linear(attn, w(p + "self_attn.o_proj.weight", [H, qDim]))]);

    h = rmsNorm(x, w(p + "post_attention_layernorm.weight", [H]));
    const gate = linear(h, w(p + "mlp.gate_proj.weight", [I, H]));
    const up = linear(h, w(p + "mlp.up_proj.weight", [I, H]));
    const act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up]); // silu(gate)·up
    x = g.op("Add", [x, linear(act, w(p + "mlp.down_proj.weight", [H, I]))]);
  }
  x = rmsNorm(x, w("model.norm.weight", [H]));

  // Log-probs of the next tokens: positions first..L-2 predict ids[:, first+1..L-1].
  const axis1 = g.int64([1]);
  const predicting = g.op("Slice", [toBL(x, H), "first", g.int64([-1]), axis1]);
  const head = c.tieWordEmbeddings ? embed : w("lm_head.weight", [V, H]);
  const logits = linear(toRows(predicting, H), head); // [B·(L-1), V]
  const scaled = g.op("Mul", [logits, "inv_temperature"]);
  const logProbs = g.op("LogSoftmax", [scaled], [int("axis", -1)]);
  const afterFirst = g.op("Add", ["first", g.int64([1])]);
  const next = g.op("Slice", [ids, afterFirst, g.int64([Number.MAX_SAFE_INTEGER]), axis1]);
  const picked = g.op("GatherElements", [logProbs, g.op("Reshape", [next, g.int64([-1, 1])])], [
    int("axis", 1),
  ]);
  g.op("Reshape", [picked, g.op("Shape", [next])]);
  g.nodes[g.nodes.length - 1].output = ["logprobs"];

  const tensorType = (elemType: number, dims: string[]): Onnx.ITypeProto => ({
    tensorType: { elemType, shape: { dim: dims.map((dimParam) => ({ dimParam })) } },
  });
  const model = onnx.ModelProto.create({
    irVersion: 8,
    producerName: "aha",
    producerVersion: String(EXPORT_VERSION),
    opsetImport: [{ domain: "", version: 17 }, { domain: "com.microsoft", version: 1 }],
    graph: {
      name: "qwen2_logprobs",
      node: g.nodes,
      initializer: g.initializers,
      input: [
        { name: ids, type: tensorType(DataType.INT64, ["batch", "length"]) },
        { name: "inv_temperature", type: tensorType(DataType.FLOAT, []) },
        {
          name: "first",
          type: { tensorType: { elemType: DataType.INT64, shape: { dim: [{ dimValue: 1 }] } } },
        },
      ],
      output: [{ name: "logprobs", type: tensorType(DataType.FLOAT, ["batch", "length_1"]) }],
    },
  });
  const size = g.initializers.reduce((n, t) => n + t.rawData!.length, 0);
  if (size >= 2 ** 31) {
    throw new AhaError(
      `ONNX export: the weights take ${(size / 2 ** 30).toFixed(1)} GiB, over ONNX's 2 GiB`,
    );
  }
  return onnx.ModelProto.encode(model).finish();
}
