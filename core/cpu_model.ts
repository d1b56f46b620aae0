// The CPU twin of the Qwen2 model: forward and backward in float64 with plain loops, one
// sequence at a time (positions 0..L-1, no padding). It is the reference the WebGPU model is
// tested against; its log-probs are checked against PyTorch golden values and its gradients by
// finite differences (tests/cpu_model_test.ts). Slow by design: for small models and tests.
//
// Per layer:  x += o_proj(attention(rope(q_proj(n)), rope(k_proj(n)), v_proj(n))), n = rmsnorm(x)
//             x += down_proj(silu(gate_proj(n)) · up_proj(n)),                    n = rmsnorm(x)
// then logits = lm_head(rmsnorm(x)), lm_head being the embedding when tied. With a LoRA adapter
// (core/lora.ts) each adapted projection adds s·(x·Aᵀ)·Bᵀ, and its A and B get gradients too.

import { AhaError } from "./errors.ts";
import { loraModules, loraScale } from "./lora.ts";
import { type ModelConfig, weightShapes } from "./model_config.ts";
import type { LoraConfig } from "./train_config.ts";

export type Weights = ReadonlyMap<string, Float64Array | Float32Array>;
type Values = ArrayLike<number>;

/** A LoRA adapter for the twin: its settings and its A, B matrices by PEFT name. */
export interface CpuAdapter {
  lora: LoraConfig;
  tensors: Weights;
}

// ---------------------------------------------------------------------------------------------
// Building blocks. Activations are row-major [T, features].

/** y[t, o] = Σ_i x[t, i]·W[o, i] + b[o], for W [nOut, nIn] (PyTorch nn.Linear layout). */
function linear(x: Values, w: Values, b: Values | null, T: number, nOut: number, nIn: number) {
  const y = new Float64Array(T * nOut);
  for (let t = 0; t < T; t++) {
    for (let o = 0; o < nOut; o++) {
      let sum = b ? b[o] : 0;
      for (let i = 0; i < nIn; i++) sum += x[t * nIn + i] * w[o * nIn + i];
      y[t * nOut + o] = sum;
    }
  }
  return y;
}

/** Backward of linear: dW += dyᵀ·x, db += Σ_t dy; returns dx = dy·W. */
function linearBackward(
  x: Values,
  w: Values,
  dy: Float64Array,
  dw: Float64Array,
  db: Float64Array | null,
  T: number,
  nOut: number,
  nIn: number,
) {
  const dx = new Float64Array(T * nIn);
  for (let t = 0; t < T; t++) {
    for (let o = 0; o < nOut; o++) {
      const g = dy[t * nOut + o];
      if (db) db[o] += g;
      for (let i = 0; i < nIn; i++) {
        dx[t * nIn + i] += g * w[o * nIn + i];
        dw[o * nIn + i] += g * x[t * nIn + i];
      }
    }
  }
  return dx;
}

/** y = xWᵀ for W [nOut, nIn] given as values (no bias): a helper of the LoRA branch. */
const matmulT = (x: Values, w: Values, T: number, nOut: number, nIn: number) =>
  linear(x, w, null, T, nOut, nIn);

/** The adapter of one projection: A [r, in], B [out, r] and the scale s. */
interface LoraBranch {
  a: Values;
  b: Values;
  r: number;
  s: number;
  aName: string;
  bName: string;
}

/** y += s·(x·Aᵀ)·Bᵀ. */
function loraForward(
  x: Values,
  y: Float64Array,
  l: LoraBranch,
  T: number,
  nOut: number,
  nIn: number,
) {
  const u = matmulT(x, l.a, T, l.r, nIn);
  const delta = matmulT(u, l.b, T, nOut, l.r);
  for (let i = 0; i < y.length; i++) y[i] += l.s * delta[i];
}

/** Backward of loraForward: dA += s·(dy·B)ᵀ·x, dB += s·dyᵀ·(x·Aᵀ), dx += s·(dy·B)·A. */
function loraBackward(
  x: Values,
  dy: Float64Array,
  dx: Float64Array,
  l: LoraBranch,
  dA: Float64Array,
  dB: Float64Array,
  T: number,
  nOut: number,
  nIn: number,
) {
  const u = matmulT(x, l.a, T, l.r, nIn);
  const scaledDy = dy.map((g) => g * l.s);
  // u·Bᵀ is a linear of u by B: its backward gives du and dB.
  const du = linearBackward(u, l.b, scaledDy, dB, null, T, nOut, l.r);
  addInto(dx, linearBackward(x, l.a, du, dA, null, T, l.r, nIn));
}

/** y = x · r · w with r = 1/sqrt(mean(x²) + eps) per row; r is kept for the backward. */
function rmsnorm(x: Float64Array, w: Values, T: number, H: number, eps: number) {
  const y = new Float64Array(T * H);
  const rstd = new Float64Array(T);
  for (let t = 0; t < T; t++) {
    let sumSquares = 0;
    for (let i = 0; i < H; i++) sumSquares += x[t * H + i] ** 2;
    rstd[t] = 1 / Math.sqrt(sumSquares / H + eps);
    for (let i = 0; i < H; i++) y[t * H + i] = x[t * H + i] * rstd[t] * w[i];
  }
  return { y, rstd };
}

/** dw += Σ_t dy·x·r; returns dx = r·(dy·w) − x·r³/H · Σ_i dy_i·w_i·x_i. */
function rmsnormBackward(
  x: Float64Array,
  w: Values,
  rstd: Float64Array,
  dy: Float64Array,
  dw: Float64Array,
  T: number,
  H: number,
) {
  const dx = new Float64Array(T * H);
  for (let t = 0; t < T; t++) {
    const r = rstd[t];
    let dot = 0;
    for (let i = 0; i < H; i++) {
      dot += dy[t * H + i] * w[i] * x[t * H + i];
      dw[i] += dy[t * H + i] * x[t * H + i] * r;
    }
    for (let i = 0; i < H; i++) {
      dx[t * H + i] = r * dy[t * H + i] * w[i] - x[t * H + i] * r ** 3 / H * dot;
    }
  }
  return dx;
}

/** Rotary embedding in place on x [T, heads, D], rotate-half form: the pair (i, i + D/2) of
 * position t turns by angle t·θ^(-2i/D). direction −1 turns back: that is the backward. */
function rope(x: Float64Array, T: number, heads: number, D: number, theta: number, direction = 1) {
  const half = D / 2;
  for (let t = 0; t < T; t++) {
    for (let i = 0; i < half; i++) {
      const angle = t / Math.pow(theta, (2 * i) / D);
      const cos = Math.cos(angle), sin = direction * Math.sin(angle);
      for (let h = 0; h < heads; h++) {
        const base = (t * heads + h) * D;
        const a = x[base + i], b = x[base + i + half];
        x[base + i] = a * cos - b * sin;
        x[base + i + half] = b * cos + a * sin;
      }
    }
  }
}

/** Causal attention; query head h reads kv head floor(h / (heads / kvHeads)). Returns the
 * output [T, heads·D] and the attention probabilities probs[h][i][j] (j ≤ i) for the backward. */
function attention(q: Float64Array, k: Float64Array, v: Float64Array, T: number, c: ModelConfig) {
  const { numHeads, numKvHeads, headDim: D } = c;
  const group = numHeads / numKvHeads, scale = 1 / Math.sqrt(D);
  const out = new Float64Array(T * numHeads * D);
  const probs = new Float64Array(numHeads * T * T);
  for (let h = 0; h < numHeads; h++) {
    const kvh = Math.floor(h / group);
    for (let i = 0; i < T; i++) {
      const p = probs.subarray((h * T + i) * T, (h * T + i + 1) * T);
      const qi = (i * numHeads + h) * D;
      let max = -Infinity;
      for (let j = 0; j <= i; j++) {
        const kj = (j * numKvHeads + kvh) * D;
        let dot = 0;
        for (let d = 0; d < D; d++) dot += q[qi + d] * k[kj + d];
        p[j] = dot * scale;
        max = Math.max(max, p[j]);
      }
      let sum = 0;
      for (let j = 0; j <= i; j++) sum += p[j] = Math.exp(p[j] - max);
      for (let j = 0; j <= i; j++) {
        p[j] /= sum;
        const vj = (j * numKvHeads + kvh) * D;
        for (let d = 0; d < D; d++) out[qi + d] += p[j] * v[vj + d];
      }
    }
  }
  return { out, probs };
}

function attentionBackward(
  q: Float64Array,
  k: Float64Array,
  v: Float64Array,
  probs: Float64Array,
  dOut: Float64Array,
  T: number,
  c: ModelConfig,
) {
  const { numHeads, numKvHeads, headDim: D } = c;
  const group = numHeads / numKvHeads, scale = 1 / Math.sqrt(D);
  const dq = new Float64Array(q.length), dk = new Float64Array(k.length);
  const dv = new Float64Array(v.length);
  const dScores = new Float64Array(T);
  for (let h = 0; h < numHeads; h++) {
    const kvh = Math.floor(h / group);
    for (let i = 0; i < T; i++) {
      const p = probs.subarray((h * T + i) * T, (h * T + i + 1) * T);
      const qi = (i * numHeads + h) * D;
      // dp[j] = dOut_i · v_j;  dv_j += p[j]·dOut_i;  dScore[j] = p[j]·(dp[j] − Σ p·dp).
      let weighted = 0;
      for (let j = 0; j <= i; j++) {
        const vj = (j * numKvHeads + kvh) * D;
        let dp = 0;
        for (let d = 0; d < D; d++) {
          dp += dOut[qi + d] * v[vj + d];
          dv[vj + d] += p[j] * dOut[qi + d];
        }
        dScores[j] = dp;
        weighted += p[j] * dp;
      }
      for (let j = 0; j <= i; j++) {
        const g = p[j] * (dScores[j] - weighted) * scale;
        const kj = (j * numKvHeads + kvh) * D;
        for (let d = 0; d < D; d++) {
          dq[qi + d] += g * k[kj + d];
          dk[kj + d] += g * q[qi + d];
        }
      }
    }
  }
  return { dq, dk, dv };
}

const silu = (x: number) => x / (1 + Math.exp(-x));

/** acc += x, elementwise; returns acc. */
function addInto<A extends Float64Array>(acc: A, x: Float64Array): A {
  for (let i = 0; i < acc.length; i++) acc[i] += x[i];
  return acc;
}

// ---------------------------------------------------------------------------------------------
// The model.

interface LayerTrace {
  x: Float64Array; // layer input (residual stream)
  n1: Float64Array; // input_layernorm output
  rstd1: Float64Array;
  q: Float64Array; // after rope
  k: Float64Array; // after rope
  v: Float64Array;
  probs: Float64Array;
  att: Float64Array; // attention output before o_proj
  x1: Float64Array; // residual stream after attention
  n2: Float64Array; // post_attention_layernorm output
  rstd2: Float64Array;
  gate: Float64Array;
  up: Float64Array;
  act: Float64Array; // silu(gate)·up
}

interface Trace {
  ids: number[];
  layers: LayerTrace[];
  xLast: Float64Array; // residual stream into the final norm
  rstdLast: Float64Array;
  normed: Float64Array; // final norm output
  logp: Float64Array; // log-softmax of the logits [T, V]
}

function weight(w: Weights, name: string): Values {
  const a = w.get(name);
  if (!a) throw new AhaError(`cpu model: missing weight "${name}"`);
  return a;
}

/** The output projection: its own weight, or the embedding's when tied. */
const headName = (c: ModelConfig) => c.tieWordEmbeddings ? "model.embed_tokens" : "lm_head";

/** The LoRA branch of each adapted module ("model.layers.0.self_attn.q_proj"). */
function loraBranches(c: ModelConfig, adapter: CpuAdapter | null): Map<string, LoraBranch> {
  const branches = new Map<string, LoraBranch>();
  if (!adapter) return branches;
  const s = loraScale(adapter.lora);
  for (const m of loraModules(c, adapter.lora)) {
    branches.set(m.module, {
      a: weight(adapter.tensors, m.a),
      b: weight(adapter.tensors, m.b),
      r: adapter.lora.r,
      s,
      aName: m.a,
      bName: m.b,
    });
  }
  return branches;
}

function forward(
  c: ModelConfig,
  w: Weights,
  ids: number[],
  lora: Map<string, LoraBranch> = new Map(),
): Trace {
  const T = ids.length, H = c.hiddenSize, I = c.intermediateSize, V = c.vocabSize;
  const qDim = c.numHeads * c.headDim, kvDim = c.numKvHeads * c.headDim;
  const embed = weight(w, "model.embed_tokens.weight");
  let x = new Float64Array(T * H);
  for (let t = 0; t < T; t++) {
    if (!(Number.isInteger(ids[t]) && ids[t] >= 0 && ids[t] < V)) {
      throw new AhaError(`cpu model: token ${ids[t]} is outside the vocabulary (size ${V})`);
    }
    for (let i = 0; i < H; i++) x[t * H + i] = embed[ids[t] * H + i];
  }
  const layers: LayerTrace[] = [];
  for (let l = 0; l < c.numLayers; l++) {
    const p = `model.layers.${l}.`, W = (n: string) => weight(w, p + n);
    // A projection: its nn.Linear, plus the adapter's branch when it has one.
    const project = (name: string, x: Values, nOut: number, nIn: number, bias: boolean) => {
      const y = linear(x, W(name + ".weight"), bias ? W(name + ".bias") : null, T, nOut, nIn);
      const branch = lora.get(p + name);
      if (branch) loraForward(x, y, branch, T, nOut, nIn);
      return y;
    };
    const { y: n1, rstd: rstd1 } = rmsnorm(x, W("input_layernorm.weight"), T, H, c.rmsNormEps);
    const q = project("self_attn.q_proj", n1, qDim, H, true);
    const k = project("self_attn.k_proj", n1, kvDim, H, true);
    const v = project("self_attn.v_proj", n1, kvDim, H, true);
    rope(q, T, c.numHeads, c.headDim, c.ropeTheta);
    rope(k, T, c.numKvHeads, c.headDim, c.ropeTheta);
    const { out: att, probs } = attention(q, k, v, T, c);
    const x1 = addInto(project("self_attn.o_proj", att, H, qDim, false), x);
    const norm2 = rmsnorm(x1, W("post_attention_layernorm.weight"), T, H, c.rmsNormEps);
    const n2 = norm2.y, rstd2 = norm2.rstd;
    const gate = project("mlp.gate_proj", n2, I, H, false);
    const up = project("mlp.up_proj", n2, I, H, false);
    const act = gate.map((g, i) => silu(g) * up[i]);
    layers.push({ x, n1, rstd1, q, k, v, probs, att, x1, n2, rstd2, gate, up, act });
    x = addInto(project("mlp.down_proj", act, H, I, false), x1);
  }
  const last = rmsnorm(x, weight(w, "model.norm.weight"), T, H, c.rmsNormEps);
  const logp = linear(last.y, weight(w, headName(c) + ".weight"), null, T, V, H);
  for (let t = 0; t < T; t++) {
    const row = logp.subarray(t * V, (t + 1) * V);
    const max = row.reduce((a, b) => Math.max(a, b), -Infinity);
    const logSum = max + Math.log(row.reduce((sum, z) => sum + Math.exp(z - max), 0));
    for (let i = 0; i < V; i++) row[i] -= logSum;
  }
  return { ids, layers, xLast: x, rstdLast: last.rstd, normed: last.y, logp };
}

/** The log-prob of each next token: result[t] = logp[t][ids[t + 1]]. */
function tokenLogprobs(trace: Trace, V: number): number[] {
  return trace.ids.slice(1).map((next, t) => trace.logp[t * V + next]);
}

/** Adds d(scalar)/d(weight) to grads, given dLogprobs[t] = d(scalar)/d(logprob of token t+1). */
function backward(
  c: ModelConfig,
  w: Weights,
  tr: Trace,
  dLogprobs: number[],
  grads: Map<string, Float64Array>,
  lora: Map<string, LoraBranch> = new Map(),
) {
  const T = tr.ids.length, H = c.hiddenSize, I = c.intermediateSize, V = c.vocabSize;
  const qDim = c.numHeads * c.headDim, kvDim = c.numKvHeads * c.headDim;
  const grad = (name: string) => grads.get(name)!;
  // Backward of the projection `name` (nn.Linear [nOut, nIn], with or without bias) of input x.
  const linearBack = (
    name: string,
    x: Float64Array,
    dy: Float64Array,
    nOut: number,
    nIn: number,
  ) => {
    const weightName = name + ".weight", bias = grads.get(name + ".bias") ?? null;
    const dx = linearBackward(x, weight(w, weightName), dy, grad(weightName), bias, T, nOut, nIn);
    const branch = lora.get(name);
    if (branch) {
      loraBackward(x, dy, dx, branch, grad(branch.aName), grad(branch.bName), T, nOut, nIn);
    }
    return dx;
  };
  // Backward of the RMSNorm `name` of input x.
  const normBack = (name: string, x: Float64Array, rstd: Float64Array, dy: Float64Array) =>
    rmsnormBackward(x, weight(w, name + ".weight"), rstd, dy, grad(name + ".weight"), T, H);

  // d logp[t][target] / d logits[t][i] = 1[i = target] − softmax[t][i].
  const dLogits = new Float64Array(T * V);
  for (let t = 0; t + 1 < T; t++) {
    for (let i = 0; i < V; i++) dLogits[t * V + i] = -dLogprobs[t] * Math.exp(tr.logp[t * V + i]);
    dLogits[t * V + tr.ids[t + 1]] += dLogprobs[t];
  }
  const dNormed = linearBack(headName(c), tr.normed, dLogits, V, H);
  let dx = normBack("model.norm", tr.xLast, tr.rstdLast, dNormed);
  for (let l = c.numLayers - 1; l >= 0; l--) {
    const L = tr.layers[l], p = `model.layers.${l}.`;
    // MLP: dx reaches x1 directly and through down(silu(gate)·up).
    const dAct = linearBack(p + "mlp.down_proj", L.act, dx, H, I);
    const dGate = new Float64Array(T * I), dUp = new Float64Array(T * I);
    for (let i = 0; i < T * I; i++) {
      const sigmoid = 1 / (1 + Math.exp(-L.gate[i]));
      dUp[i] = dAct[i] * L.gate[i] * sigmoid;
      dGate[i] = dAct[i] * L.up[i] * sigmoid * (1 + L.gate[i] * (1 - sigmoid));
    }
    const dN2 = addInto(
      linearBack(p + "mlp.gate_proj", L.n2, dGate, I, H),
      linearBack(p + "mlp.up_proj", L.n2, dUp, I, H),
    );
    const dX1 = addInto(normBack(p + "post_attention_layernorm", L.x1, L.rstd2, dN2), dx);
    // Attention: dX1 reaches x directly and through o_proj(attention(rope(q), rope(k), v)).
    const dAtt = linearBack(p + "self_attn.o_proj", L.att, dX1, H, qDim);
    const { dq, dk, dv } = attentionBackward(L.q, L.k, L.v, L.probs, dAtt, T, c);
    rope(dq, T, c.numHeads, c.headDim, c.ropeTheta, -1);
    rope(dk, T, c.numKvHeads, c.headDim, c.ropeTheta, -1);
    const dN1 = linearBack(p + "self_attn.q_proj", L.n1, dq, qDim, H);
    addInto(dN1, linearBack(p + "self_attn.k_proj", L.n1, dk, kvDim, H));
    addInto(dN1, linearBack(p + "self_attn.v_proj", L.n1, dv, kvDim, H));
    dx = addInto(normBack(p + "input_layernorm", L.x, L.rstd1, dN1), dX1);
  }
  const dEmbed = grad("model.embed_tokens.weight");
  for (let t = 0; t < T; t++) {
    for (let i = 0; i < H; i++) dEmbed[tr.ids[t] * H + i] += dx[t * H + i];
  }
}

// ---------------------------------------------------------------------------------------------
// The API.

/** logprobs[i][t] = log p(seq_i[t+1] | seq_i[0..t]) — the format of `aha score`. */
export function cpuLogprobs(
  config: ModelConfig,
  weights: Weights,
  sequences: number[][],
  adapter: CpuAdapter | null = null,
): number[][] {
  const lora = loraBranches(config, adapter);
  return sequences.map((ids) =>
    ids.length < 2 ? [] : tokenLogprobs(forward(config, weights, ids, lora), config.vocabSize)
  );
}

/** The log-probs and the gradient of a scalar with respect to every weight (HF names) and,
 * with an adapter, every LoRA matrix (PEFT names), given dLogprobs[i][t] =
 * d(scalar)/d(logprobs[i][t]). For tied embeddings the lm_head part is added to
 * model.embed_tokens.weight. */
export function cpuForwardBackward(
  config: ModelConfig,
  weights: Weights,
  sequences: number[][],
  dLogprobs: number[][],
  adapter: CpuAdapter | null = null,
): { logprobs: number[][]; grads: Map<string, Float64Array> } {
  const grads = new Map<string, Float64Array>();
  for (const [name, shape] of weightShapes(config)) {
    grads.set(name, new Float64Array(shape.reduce((a, b) => a * b, 1)));
  }
  const lora = loraBranches(config, adapter);
  for (const branch of lora.values()) {
    grads.set(branch.aName, new Float64Array(branch.a.length));
    grads.set(branch.bName, new Float64Array(branch.b.length));
  }
  const logprobs = sequences.map((ids, i) => {
    if (ids.length < 2) return [];
    if (dLogprobs[i]?.length !== ids.length - 1) {
      throw new AhaError(`cpu model: dLogprobs[${i}] must have ${ids.length - 1} values`);
    }
    const trace = forward(config, weights, ids, lora);
    backward(config, weights, trace, dLogprobs[i], grads, lora);
    return tokenLogprobs(trace, config.vocabSize);
  });
  return { logprobs, grads };
}
