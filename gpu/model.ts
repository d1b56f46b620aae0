// The Qwen2 model on the GPU: its weights as tensors, the forward pass that keeps what the
// backward pass needs, the backward pass into accumulated gradients, and the AdamW step.
//
// One forward over a batch of B rows of L tokens (T = B·L positions, row-major) computes, for
// every position t, logp[t] = log p(ids[t+1] | ids[..t]) (the last position of each row has no
// next token; its value is meaningless). The loss lives on the CPU (core/grpo.ts): it reads logp,
// returns dLoss/dlogp, and backward() pushes that through the network. The vocabulary
// projection runs in token chunks, recomputed in backward, so T × vocab logits never exist at
// once; and, given `first`, only on every row's positions from `first` on, packed (a GRPO batch
// wants log-probs only where completions are, and at Qwen2.5's vocabulary the projection is a
// quarter of a forward's multiply-adds).
//
// A weight larger than one storage binding (Qwen's [vocab, hidden] embedding and lm_head) is
// kept as row slices, each its own tensor, as are its gradient and AdamW moments. An embedding
// lookup runs per slice over the ids in its rows; a linear layer runs one matmul per slice, each
// writing its block of the output's columns (so the logits of a token chunk are whole again);
// its backward reads the same block of the output's gradient. Reads and writes of weights,
// gradients and moments join and split the slices, so checkpoints never see them.
//
// Projections that read the same input run as one product: each layer's q/k/v projections (its
// output [T, nH·D + 2·nKv·D] is what ropeQkv rotates into q, k and v) and its gate/up projections
// (output [T, 2·I], which swiglu reads). Their weights are stored as one matrix whose rows are
// the members' weights, each member's weight a view of its rows, whenever the views can be bound
// (same dtype, one binding, 256-byte aligned); else the members keep their own tensors and run
// as row slices do, each writing its block of the output's columns. A group's biases are also
// kept concatenated (a copy, refreshed whenever they change). So a layer runs 4 products where
// it ran 7, and its backward 8 where it ran 14; the fused products, wider, also run faster.
// Generation on a software adapter goes further, since nothing is kept for a backward and each
// dispatch saved there is ~130 µs of waking threads: the gate/up product applies SwiGLU itself,
// and a small model's products read the RMSNorms' inputs and fold the norms in
// (`generationFusions`).
//
// Every f32 weight, and a LoRA adapter's A and B, lives in an arena (gpu/arena.ts); gradients
// and AdamW moments are laid out as what is trained, so clearing the gradients, their norm and
// the AdamW step take a dispatch or two per arena, not per tensor.
//
// A frozen matrix (every weight of a scoring model; a LoRA run's base) may be stored in 16 bits
// (`weightDtypes`): bf16 or f16, widened to f32 inside the matmul and embedding kernels that
// read it; it can have no gradient. Norm weights and biases stay f32.
//
// A GRPO batch's rows come in groups that share a prompt (S samples of each). forwardShared runs
// each group's prompt once: the token list is every row's tail (its prompt's last token and its
// completion but the row's last token, see below), then every group's prefix (the prompt but its
// last token). Every per-token kernel runs over that list as over any other; only attention
// differs — the prefixes attend among themselves, each tail over its group's prefix keys and its
// own (kernels/attention.ts assembleKv), and in backward each prefix key gathers the gradients of
// its group's rows (scatterKvGrads). A row's last token is no input in any layout but the joined
// one: no log-prob is read from its position and no later position attends to it. A GRPO step of
// the default's shape (16 prompts of 7 tokens × 8 samples of 6) then runs 864 tokens through
// training and the reference instead of 1,664 (992 while tails kept their last token).
//
// With gradient checkpointing the training forward keeps only each layer's input (plus one set
// of layer buffers that every layer reuses); backward recomputes a layer's forward from its input
// with the same kernels, then runs its backward, so gradients are bit for bit those without it.
//
// With a LoRA adapter (core/lora.ts) every targeted projection adds s·(x·Aᵀ)·Bᵀ to its output
// through two small matmuls (B·A is never formed), the base weights are frozen (no gradients, no
// moments) and only A and B — `trained`, by PEFT name — are optimised, read and saved. A forward
// with `adapter: false` skips the adapter: the base model, which is a LoRA run's reference.

import { AhaError } from "../core/errors.ts";
import type { ModelConfig } from "../core/model_config.ts";
import { weightShapes } from "../core/model_config.ts";
import {
  CHUNK_ALIGN,
  LOGIT_CHUNK_FLOATS,
  logitChunkTokens,
  rowChunkTokens,
  weightSliceRows,
} from "../core/plan.ts";
import { BINDING_ALIGNMENT, type DType, elementBytes, type Gpu, Tensor } from "./device.ts";
import { type HalfDType, packHalves, pairHalves, unpackHalves } from "../core/half.ts";
import { type TensorReader, WeightsOnDemand } from "../core/checkpoint.ts";
import { embedding, embeddingBackward } from "./kernels/embedding.ts";
import { rmsnorm, rmsnormBackward } from "./kernels/rmsnorm.ts";
import { generationFusions, matmul, sumRows } from "./kernels/matmul.ts";
import { ropeQkv } from "./kernels/rope.ts";
import {
  assembleKv,
  attention,
  attentionBackward,
  attentionKernel,
  type AttentionShape,
  type KvDtype,
  scatterKvGrads,
  writeKvCache,
} from "./kernels/attention.ts";
import { swiglu, swigluBackward } from "./kernels/swiglu.ts";
import { packTails, unpackTails } from "./kernels/row_tails.ts";
import { type Adapter, loraModules, loraScale } from "../core/lora.ts";
import { tokenLogprobs, tokenLogprobsBackward } from "./kernels/logprobs.ts";
import { GradNorm } from "./kernels/gradnorm.ts";
import { adamw, type AdamwHyper } from "./kernels/adamw.ts";
import { ARENA_MAX_BYTES, Arenas, packArenas } from "./arena.ts";
import { KeptTextures } from "./kept_textures.ts";

/** What one layer's forward keeps for its backward. */
export interface LayerActivations {
  input: Tensor; // residual stream entering the layer [T,H]
  norm1: Tensor; // input_layernorm output [T,H]
  rstd1: Tensor; // [T]
  qkv: Tensor; // the fused q/k/v product's rows [T, nH·D + 2·nKv·D], shared by every layer
  q: Tensor; // after rotary [T, nH·D]
  k: Tensor; // after rotary [T, nKv·D]
  v: Tensor; // [T, nKv·D]
  attn: Tensor; // attention output [T, nH·D]
  lse: Tensor; // [B, nH, L]
  mid: Tensor; // residual stream after attention [T,H]
  norm2: Tensor; // post_attention_layernorm output [T,H]
  rstd2: Tensor; // [T]
  gateUp: Tensor; // the fused gate/up product's rows [T, 2·I]: gate_proj's, then up_proj's
  act: Tensor; // silu(gate)·up [T,I]
}

/**
 * The buffers one layer needs for T tokens of a batch of B rows of length L; `qkv`, which the
 * layer reads only right after writing it, may be another layer's.
 */
export function layerBuffers(
  gpu: Gpu,
  c: ModelConfig,
  B: number,
  L: number,
  qkv?: Tensor,
): LayerActivations {
  const T = B * L, H = c.hiddenSize, I = c.intermediateSize;
  const qDim = c.numHeads * c.headDim, kvDim = c.numKvHeads * c.headDim;
  const f = (...shape: number[]) => gpu.zeros(shape);
  return {
    input: f(T, H),
    norm1: f(T, H),
    rstd1: f(T),
    qkv: qkv ?? f(T, qDim + 2 * kvDim),
    q: f(T, qDim),
    k: f(T, kvDim),
    v: f(T, kvDim),
    attn: f(T, qDim),
    lse: f(B, c.numHeads, L),
    mid: f(T, H),
    norm2: f(T, H),
    rstd2: f(T),
    gateUp: f(T, 2 * I),
    act: f(T, I),
  };
}

/** Where one layerForward call reads positions and lengths, and (generation) its KV cache. */
export interface LayerStep {
  T: number;
  positions: Tensor; // i32 [T]
  kvLens: Tensor; // i32 [B]
  shape: AttentionShape;
  /** [B, capacity, nKv, D]; `kept`: their texture copies, kept across steps (gpu/generate.ts). */
  cache?: { k: Tensor; v: Tensor; kept?: KeptTextures };
  /** false: the LoRA adapter is skipped (the base model); default true. */
  adapter?: boolean;
  /** A shared-prompt batch (forwardShared): attention runs per part, over assembled caches. */
  shared?: SharedLayout;
  /** A packed batch (forwardPacked): each position's sequence as [start, end), i32 pairs. */
  segments?: Tensor;
}

/**
 * A batch whose rows come in groups sharing one prompt (a GRPO step's samples of a prompt), for
 * forwardShared: each group's prompt is computed once. Row b's tail is its prompt's last token
 * followed by its completion; group g's prefix is its prompt but that last token (maybe empty).
 * A group's rows are consecutive.
 */
export interface SharedPromptBatch {
  tails: number[][];
  prefixes: number[][];
  groupOf: number[];
}

/**
 * Rows (prompt + completion) as a SharedPromptBatch: consecutive rows with the same prompt form
 * a group. `promptLens[b]` ≥ 1.
 */
export function sharePrompts(rows: number[][], promptLens: number[]): SharedPromptBatch {
  const tails: number[][] = [], prefixes: number[][] = [], groupOf: number[] = [];
  rows.forEach((row, b) => {
    const prefix = row.slice(0, promptLens[b] - 1);
    const last = prefixes[prefixes.length - 1];
    const same = b > 0 && promptLens[b] === promptLens[b - 1] &&
      prefix.every((id, j) => id === last[j]) &&
      row[promptLens[b] - 1] === rows[b - 1][promptLens[b] - 1];
    if (!same) prefixes.push(prefix);
    groupOf.push(prefixes.length - 1);
    tails.push(row.slice(promptLens[b] - 1));
  });
  return { tails, prefixes, groupOf };
}

/**
 * The rows as a SharedPromptBatch when that runs at most 90% of the tokens of the rows joined
 * (sharing adds a few dispatches a layer, and its padding); else null, also when a prompt is
 * empty or longer than its row.
 */
export function worthSharing(rows: number[][], promptLens: number[]): SharedPromptBatch | null {
  if (promptLens.some((n, b) => n < 1 || n > rows[b].length)) return null;
  const shared = sharePrompts(rows, promptLens);
  const B = rows.length, G = shared.prefixes.length;
  if (G === B) return null;
  const L = Math.max(...rows.map((r) => r.length));
  const C = tailPositions(shared.tails);
  const P = Math.max(...shared.prefixes.map((p) => p.length));
  return sharedTokens(B, C, G, P) <= 0.9 * B * L ? shared : null;
}

/** Positions a row takes in forwardPacked's layout: its tokens but the last (see the top). */
export function packedPositions(row: number[]): number {
  return Math.max(0, row.length - 1);
}

/**
 * Positions every tail takes in forwardShared's layout: the longest tail's tokens but its last,
 * at least one. Its log-probs are [B · tailPositions].
 */
export function tailPositions(tails: number[][]): number {
  return Math.max(1, ...tails.map((tail) => tail.length - 1));
}

/**
 * Where a shared-prompt batch's parts lie in its token list: B tails of C tokens from 0, then
 * (from prefixStart, a multiple of CHUNK_ALIGN tokens so that every per-token view of the
 * prefixes is bindable) G prefixes of P tokens; T in all. Its attention's tables and cache rows, one set
 * that every layer reuses (assembled again in backward).
 */
interface SharedLayout {
  B: number;
  C: number;
  G: number;
  P: number;
  prefixStart: number;
  T: number;
  rowPrefix: Tensor; // i32 [B, 2]: (group, prefix length) of each row
  groupRows: Tensor; // i32 [G, 2]: (first row, rows) of each group
  tailKvLens: Tensor; // i32 [B]: Pg + C, so that tail token t sits at position Pg + t
  prefixKvLens: Tensor; // i32 [G]: P
  kCache: Tensor; // [B, P + C, nKv·D]
  vCache: Tensor;
}

/** Tokens a shared-prompt layout of B tails of C and G prefixes of P takes (with padding). */
export function sharedTokens(B: number, C: number, G: number, P: number): number {
  return sharedPrefixStart(B, C) + G * P;
}

function sharedPrefixStart(B: number, C: number): number {
  return Math.ceil((B * C) / CHUNK_ALIGN) * CHUNK_ALIGN;
}

/**
 * The tails' and the prefixes' rows of one of a shared-prompt batch's per-token tensors ([T, w],
 * or attention's lse, [T, nH] in effect: each part's [rows, nH, L] lies in its tokens' span).
 */
function sharedRows(s: SharedLayout, t: Tensor): { tails: Tensor; prefixes: Tensor } {
  const width = t.size / s.T;
  return {
    tails: rows(t, 0, s.B * s.C, width),
    prefixes: rows(t, s.prefixStart, s.G * s.P, width),
  };
}

/** Gradients flowing back through the network, for one batch shape. */
interface BackwardBuffers {
  dLogits: Tensor; // one chunk [chunk, V]
  dLogp: Tensor; // [T]
  dTailLogp: Tensor; // dLogp at the positions the forward's projection ran on, packed
  dResidual: Tensor; // [T,H]
  dNorm: Tensor; // [T,H]
  dAttn: Tensor; // [T, nH·D]
  dq: Tensor;
  dk: Tensor;
  dv: Tensor;
  dQkv: Tensor; // dq (unrotated), dk, dv as the fused q/k/v product's rows
  dAct: Tensor; // [T,I]
  dGateUp: Tensor; // [T, 2·I], as the fused gate/up product's rows
}

/** Buffers for one batch shape, reused across steps. */
class Activations {
  /** Every layer's buffers (kept for backward), or one set that every layer reuses. */
  readonly layers: LayerActivations[] = [];
  /** With checkpointing: each layer's input [T,H], all the training forward keeps of a layer. */
  readonly inputs: Tensor[] = [];
  readonly ids: Tensor;
  readonly targets: Tensor;
  readonly positions: Tensor;
  readonly kvLens: Tensor;
  readonly final: Tensor; // residual stream after the last layer [T,H]
  readonly finalNorm: Tensor; // [T,H]
  readonly rstdFinal: Tensor;
  readonly logits: Tensor; // one chunk [chunk, V]
  readonly logp: Tensor; // [T]
  /** The positions the vocabulary projection ran on: every row's from `first` on, packed. */
  readonly tailRows: Tensor; // finalNorm's [B·(L − first), H]
  readonly tailLogp: Tensor; // [B·(L − first)]
  readonly lse: Tensor; // [B·(L − first)], as targets
  /** Where the last forward's log-probs start in every row (0: everywhere). */
  first = 0;
  /** Tokens in all: B·L, or a shared-prompt layout's T. */
  readonly T: number;
  /** A shared-prompt batch's layout (then B rows are its tails, L = C): forwardShared. */
  readonly shared: SharedLayout | null = null;
  /** A packed batch's sequence bounds [L, 2] (then B = 1): forwardPacked writes them. */
  readonly segments: Tensor | null = null;
  /** A shared-prompt backward's cache-row gradients [B, P + C, nKv·D]. */
  private dCache: { k: Tensor; v: Tensor } | null = null;
  readonly chunk: number;
  idsHost: Int32Array = new Int32Array(0);
  private backward: BackwardBuffers | null = null;

  /**
   * With `keep`, every layer's activations stay for backward — or, `checkpointed`, only every
   * layer's input, with one set of buffers for the recomputation; without, one set is reused.
   */
  constructor(
    gpu: Gpu,
    c: ModelConfig,
    readonly B: number,
    readonly L: number,
    readonly keep: boolean,
    logitChunkFloats: number,
    readonly checkpointed = false,
    prefix?: { G: number; P: number },
    packed = false,
  ) {
    const H = c.hiddenSize;
    const T = this.T = prefix ? sharedTokens(B, L, prefix.G, prefix.P) : B * L;
    this.chunk = logitChunkTokens(T, c.vocabSize, logitChunkFloats);
    const f = (...shape: number[]) => gpu.zeros(shape);
    const everyLayer = keep && !checkpointed;
    for (let i = 0; i < (everyLayer ? c.numLayers : 1); i++) {
      this.layers.push(layerBuffers(gpu, c, 1, T, this.layers[0]?.qkv));
    }
    if (keep && checkpointed) {
      this.inputs.push(this.layers[0].input);
      for (let i = 1; i < c.numLayers; i++) this.inputs.push(f(T, H));
    }
    this.ids = gpu.zeros([T], "i32");
    this.targets = gpu.zeros([T], "i32");
    this.positions = gpu.zeros([T], "i32");
    this.kvLens = gpu.zeros([B], "i32");
    this.final = f(T, H);
    this.finalNorm = f(T, H);
    this.rstdFinal = f(T);
    this.logits = f(this.chunk, c.vocabSize);
    this.logp = f(T);
    this.tailRows = f(T, H);
    this.tailLogp = f(T);
    this.lse = f(T);
    if (prefix) {
      // Positions and the tables are the batch's: forwardShared writes them.
      const { G, P } = prefix, kvDim = c.numKvHeads * c.headDim;
      this.shared = {
        B,
        C: L,
        G,
        P,
        prefixStart: sharedPrefixStart(B, L),
        T,
        rowPrefix: gpu.zeros([B * 2], "i32"),
        groupRows: gpu.zeros([Math.max(G, 1) * 2], "i32"),
        tailKvLens: this.kvLens,
        prefixKvLens: gpu.zeros([Math.max(G, 1)], "i32"),
        kCache: f(B, P + L, kvDim),
        vCache: f(B, P + L, kvDim),
      };
      gpu.write(this.shared.prefixKvLens, new Int32Array(Math.max(G, 1)).fill(P));
      return;
    }
    gpu.write(this.kvLens, new Int32Array(B).fill(L));
    if (packed) {
      // Positions and sequence bounds are the batch's: forwardPacked writes them.
      this.segments = gpu.zeros([T * 2], "i32");
      return;
    }
    // Every row holds positions 0..L-1 and attends over its own L keys.
    const positions = new Int32Array(T);
    for (let t = 0; t < T; t++) positions[t] = t % L;
    gpu.write(this.positions, positions);
  }

  /** Layer i's buffers: its own, or the shared set (with its own input when checkpointed). */
  layer(i: number): LayerActivations {
    if (this.inputs.length > 0) return { ...this.layers[0], input: this.inputs[i] };
    return this.layers[this.keep ? i : 0];
  }

  /** The backward pass's buffers, made on its first use (inference never needs them). */
  backwardBuffers(gpu: Gpu, c: ModelConfig): BackwardBuffers {
    if (!this.backward) {
      const T = this.T, H = c.hiddenSize, I = c.intermediateSize;
      const qDim = c.numHeads * c.headDim, kvDim = c.numKvHeads * c.headDim;
      const f = (...shape: number[]) => gpu.zeros(shape);
      this.backward = {
        dLogits: f(this.chunk, c.vocabSize),
        dLogp: f(T),
        dTailLogp: f(T),
        dResidual: f(T, H),
        dNorm: f(T, H),
        dAttn: f(T, qDim),
        dq: f(T, qDim),
        dk: f(T, kvDim),
        dv: f(T, kvDim),
        dQkv: f(T, qDim + 2 * kvDim),
        dAct: f(T, I),
        dGateUp: f(T, 2 * I),
      };
    }
    return this.backward;
  }

  /** The shared-prompt backward's cache-row gradients, made on first use. */
  cacheGradients(gpu: Gpu): { k: Tensor; v: Tensor } {
    const s = this.shared!;
    return this.dCache ??= {
      k: gpu.zeros([s.kCache.size]),
      v: gpu.zeros([s.vCache.size]),
    };
  }

  /** Free every buffer once the work recorded so far has been submitted (a shared one repeats). */
  release(gpu: Gpu): void {
    for (const layer of this.layers) for (const t of Object.values(layer)) gpu.release(t);
    for (const t of this.inputs.slice(1)) gpu.release(t); // inputs[0] is layers[0].input
    for (const t of Object.values(this.backward ?? {})) gpu.release(t);
    for (const t of Object.values(this.dCache ?? {})) gpu.release(t);
    for (const t of Object.values(this.shared ?? {})) {
      if (t instanceof Tensor && t !== this.kvLens) gpu.release(t);
    }
    for (const t of Object.values(this)) if (t instanceof Tensor) gpu.release(t);
  }
}

/** `count` elements of `t` from `start` on (token chunks start at multiples of CHUNK_ALIGN). */
function slice(t: Tensor, start: number, count: number): Tensor {
  return start === 0 && count === t.size ? t : t.view(start, [count]);
}

/** Rows start … start + n − 1 of a row-major [·, width] tensor. */
function rows(t: Tensor, start: number, n: number, width: number): Tensor {
  return slice(t, start * width, n * width);
}

/** The parts of a whole weight's values that its row slices hold, in order. */
function splitRows(data: Float32Array, slices: Tensor[]): Float32Array[] {
  let at = 0;
  return slices.map((t) => data.subarray(at, at += t.size));
}

/** A whole weight's values from its row slices' values. */
function joinRows(parts: Float32Array[]): Float32Array {
  if (parts.length === 1) return parts[0];
  const whole = new Float32Array(parts.reduce((n, part) => n + part.length, 0));
  let at = 0;
  for (const part of parts) {
    whole.set(part, at);
    at += part.length;
  }
  return whole;
}

export interface GpuModelOptions {
  /** Floats of one token chunk's logits (default LOGIT_CHUNK_FLOATS). */
  logitChunkFloats?: number;
  /** Bytes of the largest weight slice (default: the device's binding and buffer limits). */
  maxBindingBytes?: number;
  /**
   * Weights stored in 16 bits, frozen (no gradients, no moments), by Hugging Face name; every
   * other weight is f32. Only matrices (2-D) may be 16-bit. See `frozenWeightDtypes`.
   */
  weightDtypes?: Map<string, HalfDType>;
  /** Gradient checkpointing: keep only layer inputs in the training forward, recompute in backward. */
  gradientCheckpointing?: boolean;
  /** How generation (gpu/generate.ts) stores its KV cache (default f32). */
  kvCacheDtype?: KvDtype;
  /** A LoRA adapter: its A and B are trained, every base weight is frozen. */
  lora?: Adapter;
  /** Store q/k/v and gate/up as one matrix each where they can be (default true; tests). */
  fuseProjections?: boolean;
}

/**
 * Projections that read the same input, run as one product: q/k/v, gate/up, or a module alone.
 * `weight` is the fused matrix, or the members' row slices in order; member j writes columns
 * [firsts[j], firsts[j] + rows[j]) of the [T, outFeatures] output.
 */
interface Group {
  modules: string[];
  weight: Tensor[];
  rows: number[];
  firsts: number[];
  outFeatures: number;
  /** The members' biases (a concatenated copy when there are several); null without. */
  bias: Tensor | null;
  /** Whether `weight` is one fused matrix (its gradient is then one tensor too). */
  fused: boolean;
}

/** The groups of layer i's projections, by the key linear() takes, with their members. */
function layerGroups(i: number): [string, string[]][] {
  const pre = `model.layers.${i}.`;
  return [
    [`${pre}self_attn.qkv`, ["q_proj", "k_proj", "v_proj"].map((m) => `${pre}self_attn.${m}`)],
    [`${pre}self_attn.o_proj`, [`${pre}self_attn.o_proj`]],
    [`${pre}mlp.gate_up`, [`${pre}mlp.gate_proj`, `${pre}mlp.up_proj`]],
    [`${pre}mlp.down_proj`, [`${pre}mlp.down_proj`]],
  ];
}

/** One adapted projection on the GPU: A [r, in], B [out, r] and their PEFT names. */
interface LoraPair {
  a: Tensor;
  b: Tensor;
  aName: string;
  bName: string;
}

const EMBEDDING = "model.embed_tokens.weight";
/** How much a save reads back from the GPU at a time (GpuModel.reader). */
const READ_BATCH_BYTES = 64 * 2 ** 20;

/**
 * An f32 tensor as consecutive views of at most `maxBytes` (whole binding alignments, so that
 * each starts aligned), for reading it back a piece at a time; the tensor itself when it is
 * within that already, 16-bit, or not at an aligned offset.
 */
function piecesOf(t: Tensor, maxBytes: number): Tensor[] {
  const step = Math.max(1, Math.floor(maxBytes / BINDING_ALIGNMENT)) * BINDING_ALIGNMENT / 4;
  if (t.dtype !== "f32" || t.size <= step || t.offset % BINDING_ALIGNMENT !== 0) return [t];
  const pieces: Tensor[] = [];
  for (let start = 0; start < t.size; start += step) {
    pieces.push(t.view(start, [Math.min(step, t.size - start)]));
  }
  return pieces;
}

export class GpuModel {
  /**
   * Weights by Hugging Face name, each as its row slices (one unless over maxBindingBytes); a
   * fused group's members are views of its matrix.
   */
  readonly params = new Map<string, Tensor[]>();
  /** The products linear() runs, by key: layerGroups' and the vocabulary projection. */
  private readonly groups = new Map<string, Group>();
  /**
   * What the optimizer updates, by checkpoint name: every weight (params itself), or with a
   * LoRA adapter only its A and B matrices, by PEFT name.
   */
  readonly trained: Map<string, Tensor[]>;
  /** Gradients of `trained`, sliced alike, accumulated across backward() until zeroGrads(). */
  readonly grads = new Map<string, Tensor[]>();
  /** Where the f32 weights live (gpu/arena.ts). */
  private readonly weightArenas: Arenas;
  /** Where the trained tensors live (the weights', or the LoRA adapter's); gradients and moments lie alike. */
  private trainedArenas: Arenas;
  private gradArenas: Arenas | null = null;
  /** The gradient norm's block table over every gradient, in `trained` order (made on first use). */
  private normTable: GradNorm | null = null;
  private moments: { m: Arenas; v: Arenas } | null = null;
  /** The training forward's activations, and those of forwards without backward (scoring). */
  private acts: Activations | null = null;
  private scoringActs: Activations | null = null;
  /** The adapter's matrices by module ("model.layers.0.self_attn.q_proj"); empty without. */
  private readonly lora = new Map<string, LoraPair>();
  private readonly loraScale: number;
  /** The adapter branch's x·Aᵀ and its gradient, [T, r] each, grown to the largest T seen. */
  private loraScratch: { u: Tensor; du: Tensor } | null = null;
  /** The weights' texture copies for the products (software adapters), made again after a change. */
  private readonly weightTextures: KeptTextures;
  /** Buffers other modules keep for this model (generation's, by shape); freed by destroy(). */
  readonly kept = new Map<string, { release(gpu: Gpu): void }>();
  private readonly norm: Tensor;
  private readonly logitChunkFloats: number;
  /**
   * Bytes one storage binding may hold: weights are sliced and gate/up rows chunked to fit, and
   * scoring and prefill passes sized (core/plan.ts passTokens).
   */
  readonly maxBinding: number;
  private readonly checkpointing: boolean;
  /** Generation's KV cache storage (kv_cache_dtype). */
  readonly kvCacheDtype: KvDtype;
  /** The vocabulary projection's module: the embedding when tied. */
  private readonly head: string;

  constructor(
    readonly gpu: Gpu,
    readonly config: ModelConfig,
    weights: ReadonlyMap<string, Float32Array>,
    options: GpuModelOptions = {},
  ) {
    const limits = gpu.device.limits;
    const maxBytes = options.maxBindingBytes ??
      Math.min(limits.maxStorageBufferBindingSize, limits.maxBufferSize);
    this.logitChunkFloats = options.logitChunkFloats ?? LOGIT_CHUNK_FLOATS;
    this.maxBinding = maxBytes;
    this.checkpointing = options.gradientCheckpointing ?? false;
    this.kvCacheDtype = options.kvCacheDtype ?? "f32";
    this.head = config.tieWordEmbeddings ? "model.embed_tokens" : "lm_head";
    const shapes = weightShapes(config);
    const dtypeOf = (name: string): DType => options.weightDtypes?.get(name) ?? "f32";
    // Where every weight is stored, before any buffer exists: fused matrices first (their
    // members' weights are views of them), then every other weight's row slices.
    const units: { shape: number[]; dtype: DType; label: string }[] = [];
    const fused: { key: string; names: string[]; starts: number[]; unit: number }[] = [];
    for (let i = 0; i < config.numLayers; i++) {
      for (const [key, modules] of layerGroups(i)) {
        if (modules.length === 1 || options.fuseProjections === false) continue;
        const names = modules.map((m) => `${m}.weight`);
        const layout = this.fusedLayout(names, shapes, dtypeOf, maxBytes);
        if (!layout) continue;
        fused.push({ key, names, starts: layout.starts, unit: units.length });
        units.push({ shape: layout.shape, dtype: dtypeOf(names[0]), label: key });
      }
    }
    const fusedNames = new Set(fused.flatMap((f) => f.names));
    const sliceUnits = new Map<string, number[]>();
    for (const [name, shape] of shapes) {
      if (!weights.has(name)) throw new Error(`GpuModel: missing weight ${name}`);
      if (fusedNames.has(name)) continue;
      const rows = shape.length > 1 ? shape[0] : 1, perSlice = weightSliceRows(shape, maxBytes);
      if (perSlice === 0) {
        throw new AhaError(`one row of weight ${name} [${shape}] is over ${maxBytes} bytes`);
      }
      const dtype = dtypeOf(name);
      if (dtype !== "f32" && shape.length !== 2) {
        throw new Error(
          `GpuModel: ${name} [${shape}] cannot be stored as ${dtype} (matrices only)`,
        );
      }
      if (dtype === "f16" && !gpu.hasF16) {
        throw new AhaError(
          `f16 storage of ${name} needs the shader-f16 feature, which the adapter ` +
            `"${gpu.description}" lacks: use bf16 or f32`,
        );
      }
      const indices: number[] = [];
      for (let first = 0; first < rows; first += perSlice) {
        const n = Math.min(perSlice, rows - first);
        indices.push(units.length);
        units.push({
          shape: shape.length > 1 ? [n, ...shape.slice(1)] : shape,
          dtype,
          label: name,
        });
      }
      sliceUnits.set(name, indices);
    }
    // f32 weights live in arenas, the optimizer's unit (gpu/arena.ts); 16-bit ones, frozen, in
    // buffers of their own.
    const arenaBytes = Math.min(ARENA_MAX_BYTES, maxBytes);
    const inArena = units.map((u) => u.dtype === "f32");
    const arenaShapes = units.filter((_, i) => inArena[i]).map((u) => u.shape);
    this.weightArenas = new Arenas(gpu, packArenas(arenaShapes, arenaBytes), "weights");
    let arenaIndex = 0;
    const stored = units.map((u, i) =>
      inArena[i]
        ? this.weightArenas.view(arenaIndex++, u.shape)
        : gpu.zeros(u.shape, u.dtype, u.label)
    );
    const fusedMatrices = new Map<string, Tensor>(), views = new Map<string, Tensor>();
    for (const f of fused) {
      const matrix = stored[f.unit];
      fusedMatrices.set(f.key, matrix);
      f.names.forEach((name, j) => {
        views.set(name, matrix.view(f.starts[j], [shapes.get(name)![0], matrix.shape[1]]));
      });
    }
    for (const name of shapes.keys()) {
      const view = views.get(name);
      this.params.set(name, view ? [view] : sliceUnits.get(name)!.map((i) => stored[i]));
      this.writeWeight(name, weights);
    }
    for (let i = 0; i < config.numLayers; i++) {
      for (const [key, modules] of layerGroups(i)) {
        this.groups.set(key, this.group(modules, fusedMatrices.get(key)));
      }
    }
    this.groups.set(this.head, this.group([this.head]));
    this.refreshGroupBiases();
    this.norm = gpu.zeros([1]);
    this.weightTextures = new KeptTextures(gpu);
    this.trained = this.params;
    this.trainedArenas = this.weightArenas;
    this.loraScale = options.lora ? loraScale(options.lora.lora) : 0;
    if (options.lora) {
      this.trained = new Map();
      const { lora, tensors } = options.lora;
      const modules = loraModules(config, lora);
      const matrices = modules.flatMap((m) => [
        { name: m.a, shape: [lora.r, m.inFeatures] },
        { name: m.b, shape: [m.outFeatures, lora.r] },
      ]);
      for (const { name, shape } of matrices) {
        if (tensors.get(name)?.length !== shape[0] * shape[1]) {
          throw new Error(`GpuModel: LoRA tensor ${name} must hold ${shape} values`);
        }
      }
      this.trainedArenas = new Arenas(
        gpu,
        packArenas(matrices.map((m) => m.shape), arenaBytes),
        "adapter",
      );
      matrices.forEach(({ name, shape }, i) => {
        const t = this.trainedArenas.view(i, shape);
        gpu.write(t, tensors.get(name)!);
        this.trained.set(name, [t]);
      });
      for (const m of modules) {
        const [[a], [b]] = [this.trained.get(m.a)!, this.trained.get(m.b)!];
        this.lora.set(m.module, { a, b, aName: m.a, bName: m.b });
      }
    }
  }

  /** The keys of the products that run fused (a layer's "…self_attn.qkv", "…mlp.gate_up"). */
  get fusedGroups(): string[] {
    return [...this.groups].filter(([, g]) => g.fused).map(([key]) => key);
  }

  /** Whether the base weights are trained (no LoRA adapter). */
  get trainsBase(): boolean {
    return this.trained === this.params;
  }

  /** A weight kept whole (norm weights and biases always are) by Hugging Face name. */
  p(name: string): Tensor {
    const slices = this.params.get(name)!;
    if (slices.length > 1) throw new Error(`GpuModel.p: ${name} is kept as row slices`);
    return slices[0];
  }

  /**
   * How the weights `names` are stored as one matrix of consecutive rows: its shape and where
   * each member's rows start; null when they cannot be (different dtypes or widths, over one
   * binding, or a member not on a binding boundary), and they stay separate.
   */
  private fusedLayout(
    names: string[],
    shapes: Map<string, number[]>,
    dtypeOf: (name: string) => DType,
    maxBytes: number,
  ): { shape: number[]; starts: number[] } | null {
    const dtype = dtypeOf(names[0]), inF = shapes.get(names[0])![1];
    const rows = names.map((n) => shapes.get(n)![0]), total = rows.reduce((a, b) => a + b, 0);
    if (names.some((n) => dtypeOf(n) !== dtype || shapes.get(n)![1] !== inF)) return null;
    if (dtype === "f16" && !this.gpu.hasF16) return null; // refused below, by name
    if (weightSliceRows([total, inF], maxBytes) < total) return null;
    const starts = rows.map((_, j) => rows.slice(0, j).reduce((a, b) => a + b, 0) * inF);
    if (starts.some((start) => (start * elementBytes(dtype)) % BINDING_ALIGNMENT !== 0)) {
      return null;
    }
    return { shape: [total, inF], starts };
  }

  /** The product of `modules` (their fused matrix, if any), reading their weights from params. */
  private group(modules: string[], fusedMatrix?: Tensor): Group {
    const slices = modules.map((m) => this.params.get(`${m}.weight`)!);
    const rows = slices.map((w) => w.reduce((n, t) => n + t.shape[0], 0));
    const firsts = rows.map((_, j) => rows.slice(0, j).reduce((a, b) => a + b, 0));
    const outFeatures = rows.reduce((a, b) => a + b, 0);
    const biases = modules.map((m) => this.params.get(`${m}.bias`)?.[0]);
    if (biases.some((b) => b) && !biases.every((b) => b)) {
      throw new Error(`GpuModel: ${modules.join(", ")} must all have biases or none`);
    }
    const bias = !biases[0]
      ? null
      : modules.length === 1
      ? biases[0]
      : this.gpu.zeros([outFeatures]);
    return {
      modules,
      weight: fusedMatrix ? [fusedMatrix] : slices.flat(),
      rows,
      firsts,
      outFeatures,
      bias,
      fused: fusedMatrix !== undefined,
    };
  }

  /** Copy the members' biases into each group's concatenated bias (after they change). */
  private refreshGroupBiases(): void {
    for (const g of this.groups.values()) {
      if (!g.bias || g.modules.length === 1) continue;
      g.modules.forEach((m, j) =>
        this.gpu.copy(this.p(`${m}.bias`), g.bias!, g.rows[j], 0, g.firsts[j])
      );
    }
  }

  /**
   * Uploads one weight as the model is built. A 16-bit matrix whose checkpoint stores it in the
   * same 16 bits goes up as stored; every other weight from its f32 values. (Widening a BF16 7B
   * model to f32 and narrowing it back took its load from 51 s to 108 s here, and 2.2 GiB more.)
   */
  private writeWeight(name: string, weights: ReadonlyMap<string, Float32Array>): void {
    const slices = this.params.get(name)!, dtype = slices[0].dtype;
    const halves = (dtype === "bf16" || dtype === "f16") && weights instanceof WeightsOnDemand
      ? weights.halves(name, dtype)
      : null;
    if (!halves) return this.writeSlices(slices, weights.get(name)!);
    let at = 0;
    for (const t of slices) this.gpu.write(t, pairHalves(halves.subarray(at, at += t.size)));
  }

  /** Write a whole weight's f32 values into its slices, narrowed to their storage dtype. */
  private writeSlices(slices: Tensor[], data: Float32Array): void {
    splitRows(data, slices).forEach((part, i) => {
      const dtype = slices[i].dtype;
      this.gpu.write(
        slices[i],
        dtype === "bf16" || dtype === "f16" ? packHalves(part, dtype) : part,
      );
    });
  }

  /** The gradients' arenas, laid out as the trained tensors' (made on first use, zeroed). */
  private gradients(): Arenas {
    return this.gradArenas ??= this.trainedArenas.twin(this.gpu, "gradients");
  }

  /** A trained tensor's gradient, sliced like the tensor: views of the gradients' arenas. */
  private gradSlices(name: string): Tensor[] {
    let slices = this.grads.get(name);
    if (slices) return slices;
    const stored = this.trained.get(name)![0].dtype;
    if (stored === "bf16" || stored === "f16") {
      // 16-bit weights are frozen: only a LoRA run (whose base is not trained) goes through them.
      throw new Error(`GpuModel: ${name} is stored in 16 bits, frozen: it has no gradient`);
    }
    slices = this.trained.get(name)!.map((t) => this.gradients().mirror(t, this.trainedArenas));
    this.grads.set(name, slices);
    return slices;
  }

  /** The gradient of a weight kept whole (1-D weights always are); null when it is frozen. */
  private g(name: string): Tensor | null {
    return this.trained.has(name) ? this.gradSlices(name)[0] : null;
  }

  private activations(
    B: number,
    L: number,
    keep: boolean,
    prefix?: { G: number; P: number },
    packed = false,
  ): Activations {
    // Training and scoring keep separate buffers: a LoRA run's in-process reference scores
    // between the policy's forward and its backward.
    const current = keep ? this.acts : this.scoringActs;
    const same = (s: SharedLayout | null) =>
      prefix ? s !== null && s.G === prefix.G && s.P === prefix.P : s === null;
    if (
      current && current.B === B && current.L === L && same(current.shared) &&
      (current.segments !== null) === packed
    ) {
      return current;
    }
    current?.release(this.gpu);
    const a = new Activations(
      this.gpu,
      this.config,
      B,
      L,
      keep,
      this.logitChunkFloats,
      this.checkpointing,
      prefix,
      packed,
    );
    if (keep) this.acts = a;
    else this.scoringActs = a;
    return a;
  }

  /**
   * Forward over `ids` ([B, L] row-major). Returns the per-position log-prob tensor [B·L]
   * (valid for first ≤ t % L < L − 1; zero before `first`, where the vocabulary projection does
   * not run: a GRPO batch needs log-probs only from its shortest prompt's last token on). The
   * activations stay for backward() until the next forward.
   */
  forward(
    ids: Int32Array,
    B: number,
    L: number,
    invTemperature = 1,
    keepForBackward = true,
    adapter = true,
    first = 0,
  ): Tensor {
    const gpu = this.gpu, W = L - first;
    const a = this.activations(B, L, keepForBackward);
    a.first = first;
    // The next token of every position the projection runs on (packed: row b's from `first`).
    const targets = new Int32Array(B * W);
    for (let b = 0; b < B; b++) {
      for (let t = first; t < L - 1; t++) targets[b * W + t - first] = ids[b * L + t + 1];
    }
    gpu.write(a.ids, ids);
    gpu.write(a.targets, targets);
    a.idsHost = ids;
    return this.runForward(a, invTemperature, adapter);
  }

  /**
   * Forward over a shared-prompt batch (see SharedPromptBatch): every group's prompt runs once,
   * its keys and values serving each row of the group, so a GRPO batch of G prompts × S samples
   * costs G prompts and G·S completions, not G·S of both. The same function as forward() over
   * the rows joined (prompt + completion), up to the order of floating-point sums. Returns the
   * log-probs [B·C], C = tailPositions(tails): element b·C + t is log p(completion token t of
   * row b). backward() takes dLoss/dlogp in the same layout.
   */
  forwardShared(
    batch: SharedPromptBatch,
    invTemperature = 1,
    keepForBackward = true,
    adapter = true,
  ): Tensor {
    const gpu = this.gpu, { tails, prefixes, groupOf } = batch;
    const B = tails.length, G = prefixes.length;
    const C = tailPositions(tails);
    const P = Math.max(0, ...prefixes.map((p) => p.length));
    const a = this.activations(B, C, keepForBackward, { G, P });
    const s = a.shared!;
    a.first = 0;
    // Token list: tails from 0, prefixes from prefixStart (padding: id 0 at position 0).
    const ids = new Int32Array(s.T), positions = new Int32Array(s.T);
    const targets = new Int32Array(B * C), tailKvLens = new Int32Array(B);
    const rowPrefix = new Int32Array(B * 2), groupRows = new Int32Array(Math.max(G, 1) * 2);
    tails.forEach((tail, b) => {
      const g = groupOf[b], prefixLen = prefixes[g].length;
      for (let t = 0; t + 1 < tail.length; t++) {
        ids[b * C + t] = tail[t];
        positions[b * C + t] = prefixLen + t;
        targets[b * C + t] = tail[t + 1];
      }
      tailKvLens[b] = prefixLen + C;
      rowPrefix.set([g, prefixLen], b * 2);
      if (b === 0 || groupOf[b - 1] !== g) groupRows[g * 2] = b;
      groupRows[g * 2 + 1]++;
    });
    prefixes.forEach((prefix, g) => {
      prefix.forEach((id, j) => {
        ids[s.prefixStart + g * P + j] = id;
        positions[s.prefixStart + g * P + j] = j;
      });
    });
    gpu.write(a.ids, ids);
    gpu.write(a.targets, targets);
    gpu.write(a.positions, positions);
    gpu.write(s.tailKvLens, tailKvLens);
    gpu.write(s.rowPrefix, rowPrefix);
    gpu.write(s.groupRows, groupRows);
    a.idsHost = ids;
    return this.runForward(a, invTemperature, adapter);
  }

  /**
   * Forward over a packed batch: the rows laid end to end in one row of `L` positions (L at least
   * their total; the rest is padding), each attending only over itself, and each without its
   * last token (packedPositions). Costs the rows' own tokens where the joined layout pads every
   * row to the longest. The same function as forward() over the rows joined, up to the order of
   * floating-point sums. Returns the log-probs [L]: element start_b + t is
   * log p(rows[b][t + 1] | rows[b][..t]), start_b the positions of the rows before b; backward()
   * takes dLoss/dlogp in the same layout.
   */
  forwardPacked(
    batch: number[][],
    L: number,
    invTemperature = 1,
    keepForBackward = true,
    adapter = true,
  ): Tensor {
    const gpu = this.gpu;
    const a = this.activations(1, L, keepForBackward, undefined, true);
    a.first = 0;
    // Padding is a sequence of its own per position: id 0 at position 0, seeing only itself.
    const ids = new Int32Array(L), targets = new Int32Array(L), positions = new Int32Array(L);
    const segments = new Int32Array(L * 2);
    const bound = (at: number, start: number, end: number) => {
      segments[2 * at] = start;
      segments[2 * at + 1] = end;
    };
    let start = 0;
    for (const row of batch) {
      const end = start + packedPositions(row);
      if (end > L) throw new Error(`forwardPacked: the rows need ${end} positions, L is ${L}`);
      for (let t = 0; start + t < end; t++) {
        ids[start + t] = row[t];
        targets[start + t] = row[t + 1];
        positions[start + t] = t;
        bound(start + t, start, end);
      }
      start = end;
    }
    for (let t = start; t < L; t++) bound(t, t, t + 1);
    gpu.write(a.ids, ids);
    gpu.write(a.targets, targets);
    gpu.write(a.positions, positions);
    gpu.write(a.segments!, segments);
    a.idsHost = ids;
    return this.runForward(a, invTemperature, adapter);
  }

  /** The forward every layout shares, from the ids, targets and positions written into `a`. */
  private runForward(a: Activations, invTemperature: number, adapter: boolean): Tensor {
    const gpu = this.gpu, c = this.config, T = a.T, H = c.hiddenSize;
    const { B, L, first } = a;
    this.embed(a.ids, a.layer(0).input, T);
    const step: LayerStep = {
      T,
      positions: a.positions,
      kvLens: a.kvLens,
      shape: this.attentionShape(B, L),
      adapter,
      shared: a.shared ?? undefined,
      segments: a.segments ?? undefined,
    };
    for (let i = 0; i < c.numLayers; i++) {
      // Without backward, one set of buffers serves every layer, each writing over its input.
      const next = i + 1 < c.numLayers ? a.layer(i + 1).input : a.final;
      this.layerForward(i, a.layer(i), next, step);
    }
    rmsnorm(gpu, a.final, this.p("model.norm.weight"), a.finalNorm, a.rstdFinal, T, c.rmsNormEps);
    const headIn = first > 0 ? a.tailRows : a.finalNorm, logp = first > 0 ? a.tailLogp : a.logp;
    if (first > 0) packTails(gpu, a.finalNorm, a.tailRows, B, L, first, H);
    this.eachLogitChunk(a, (start, n) => {
      this.vocabLogits(rows(headIn, start, n, H), a.logits, n);
      tokenLogprobs(
        gpu,
        a.logits,
        slice(a.targets, start, n),
        slice(logp, start, n),
        slice(a.lse, start, n),
        n,
        c.vocabSize,
        invTemperature,
      );
    });
    if (first > 0) unpackTails(gpu, a.tailLogp, a.logp, B, L, first, 1);
    return a.logp;
  }

  /**
   * One transformer layer, x.input → out. With `cache`, this call's keys and values are written
   * into the cache (at positions kvLens − Lq …) and attention runs over the cache; without it,
   * attention runs over x.k and x.v themselves (training: the whole sequence at once).
   */
  layerForward(i: number, x: LayerActivations, out: Tensor, step: LayerStep): void {
    const gpu = this.gpu, c = this.config, { T, positions, kvLens, shape, cache } = step;
    const adapter = step.adapter ?? true;
    const pre = `model.layers.${i}.`;
    // Generation keeps nothing for a backward: the gate/up product may apply SwiGLU itself, and
    // the products read the norms' inputs, folding the norms in (`generationFusions`).
    const fusions = cache !== undefined
      ? this.generationFusions()
      : { norms: false, swiglu: false };
    const norm1 = { weight: this.p(pre + "input_layernorm.weight"), eps: c.rmsNormEps };
    if (fusions.norms) {
      this.linear(x.input, `${pre}self_attn.qkv`, x.qkv, T, adapter, false, norm1);
    } else {
      rmsnorm(gpu, x.input, norm1.weight, x.norm1, x.rstd1, T, c.rmsNormEps);
      this.linear(x.norm1, `${pre}self_attn.qkv`, x.qkv, T, adapter);
    }
    // The rotary embedding of q and k, from the product's rows into q, k and v or, in
    // generation, into q and the caches, in one dispatch; a 16-bit cache (kv_cache_dtype) is
    // written by writeKvCache, which rounds on the way in.
    const toCache = cache !== undefined && cache.k.dtype === "f32";
    ropeQkv(
      gpu,
      { qkv: x.qkv },
      toCache
        ? { q: x.q, kCache: cache.k, vCache: cache.v, kvLens, shape }
        : { q: x.q, k: x.k, v: x.v },
      positions,
      T,
      c.numHeads,
      c.numKvHeads,
      c.headDim,
      c.ropeTheta,
    );
    if (cache && !toCache) {
      writeKvCache(gpu, x.k, cache.k, kvLens, shape);
      writeKvCache(gpu, x.v, cache.v, kvLens, shape);
    }
    if (step.shared) this.sharedAttention(x, step.shared);
    else {
      const [k, v] = [cache?.k ?? x.k, cache?.v ?? x.v], kernel = attentionKernel(gpu);
      attention(
        gpu,
        x.q,
        k,
        v,
        kvLens,
        x.attn,
        x.lse,
        shape,
        kernel,
        undefined,
        step.segments,
        cache?.kept,
      );
    }
    // The residual adds ride on the products: a copy (a memcpy, not a kernel) of the residual
    // into the output, which the product then accumulates into.
    gpu.copy(x.input, x.mid, T * c.hiddenSize);
    this.linear(x.attn, pre + "self_attn.o_proj", x.mid, T, adapter, true);
    const norm2 = { weight: this.p(pre + "post_attention_layernorm.weight"), eps: c.rmsNormEps };
    if (!fusions.norms) rmsnorm(gpu, x.mid, norm2.weight, x.norm2, x.rstd2, T, c.rmsNormEps);
    const H = c.hiddenSize, I = c.intermediateSize, key = pre + "mlp.gate_up";
    const swigluInside = fusions.swiglu && this.swigluFuses(key, adapter);
    const [normed, folded] = fusions.norms ? [x.mid, norm2] : [x.norm2, undefined];
    this.eachGateUpChunk(T, (start, n) => {
      const input = rows(normed, start, n, H), act = rows(x.act, start, n, I);
      if (swigluInside) return this.linear(input, key, act, n, adapter, false, folded, true);
      const gateUp = rows(x.gateUp, start, n, 2 * I);
      this.linear(input, key, gateUp, n, adapter, false, folded);
      swiglu(gpu, gateUp, act, n, I);
    });
    gpu.copy(x.mid, out, T * c.hiddenSize);
    this.linear(x.act, pre + "mlp.down_proj", out, T, adapter, true);
  }

  /**
   * A shared-prompt batch's attention: the prefixes over themselves, then every tail over its
   * cache row (its group's prefix keys, then its own), which assembleKv builds.
   */
  private sharedAttention(x: LayerActivations, s: SharedLayout): void {
    const gpu = this.gpu;
    const [q, k, v, attn, lse] = [x.q, x.k, x.v, x.attn, x.lse].map((t) => sharedRows(s, t));
    if (s.G * s.P > 0) {
      attention(
        gpu,
        q.prefixes,
        k.prefixes,
        v.prefixes,
        s.prefixKvLens,
        attn.prefixes,
        lse.prefixes,
        this.prefixShape(s),
      );
    }
    assembleKv(gpu, x.k, x.v, s.rowPrefix, s.kCache, s.vCache, this.kvRows(s));
    attention(
      gpu,
      q.tails,
      s.kCache,
      s.vCache,
      s.tailKvLens,
      attn.tails,
      lse.tails,
      this.tailShape(s),
    );
  }

  /**
   * The backward of sharedAttention into d.dq, d.dk, d.dv: the tails' over their cache rows,
   * the prefixes' over themselves, then each cache row's key and value gradients back to the
   * tokens they came from (scatterKvGrads). `assemble`: rebuild the cache rows for this layer
   * (every layer shares them; a checkpointed backward has just rebuilt them).
   */
  private sharedAttentionBackward(
    x: LayerActivations,
    d: BackwardBuffers,
    a: Activations,
    assemble: boolean,
  ): void {
    const gpu = this.gpu, s = a.shared!, dCache = a.cacheGradients(gpu);
    const [q, k, v, attn, lse] = [x.q, x.k, x.v, x.attn, x.lse].map((t) => sharedRows(s, t));
    const [dAttn, dq, dk, dv] = [d.dAttn, d.dq, d.dk, d.dv].map((t) => sharedRows(s, t));
    if (assemble) assembleKv(gpu, x.k, x.v, s.rowPrefix, s.kCache, s.vCache, this.kvRows(s));
    attentionBackward(
      gpu,
      q.tails,
      s.kCache,
      s.vCache,
      s.tailKvLens,
      attn.tails,
      lse.tails,
      dAttn.tails,
      dq.tails,
      dCache.k,
      dCache.v,
      this.tailShape(s),
    );
    if (s.G * s.P > 0) {
      attentionBackward(
        gpu,
        q.prefixes,
        k.prefixes,
        v.prefixes,
        s.prefixKvLens,
        attn.prefixes,
        lse.prefixes,
        dAttn.prefixes,
        dq.prefixes,
        dk.prefixes,
        dv.prefixes,
        this.prefixShape(s),
      );
    }
    scatterKvGrads(gpu, dCache.k, dCache.v, s.rowPrefix, s.groupRows, d.dk, d.dv, {
      ...this.kvRows(s),
      T: s.T,
    });
  }

  /** A shared-prompt batch's prefixes as attention rows: G rows of P queries over P keys. */
  private prefixShape(s: SharedLayout): AttentionShape {
    return this.attentionShape(s.G, s.P);
  }

  /** Its tails: B rows of C queries over cache rows of P + C keys. */
  private tailShape(s: SharedLayout): AttentionShape {
    return { ...this.attentionShape(s.B, s.C), capacity: s.P + s.C };
  }

  /** What assembleKv and scatterKvGrads need of a shared-prompt layout. */
  private kvRows(s: SharedLayout) {
    return { ...s, rowSize: this.config.numKvHeads * this.config.headDim };
  }

  /**
   * Where backward() starts: the [B·L] dLoss/dlogp of the last training forward, for a loss
   * computed on the GPU to write into (then call backward("written")).
   */
  lossGradient(): Tensor {
    if (!this.acts) throw new Error("GpuModel.lossGradient: no training forward pass");
    return this.acts.backwardBuffers(this.gpu, this.config).dLogp;
  }

  /**
   * Backward from dLoss/dlogp ([B·L], same layout as forward's output; zero where unused), or
   * from what a GPU loss wrote into lossGradient() ("written"), adding every weight's gradient
   * into `grads`.
   */
  backward(dLogp: Float32Array | "written", invTemperature = 1): void {
    const gpu = this.gpu, c = this.config, a = this.acts;
    if (!a) throw new Error("GpuModel.backward: no training forward pass to go back through");
    const T = a.T, H = c.hiddenSize, first = a.first;
    const shape = this.attentionShape(a.B, a.L);
    const d = a.backwardBuffers(gpu, c);
    if (dLogp !== "written") gpu.write(d.dLogp, dLogp);

    // Vocabulary projection, chunk by chunk: recompute logits, then dLogits → dFinalNorm, dLmHead,
    // over the positions the forward ran it on. Packed, their dFinalNorm goes to dResidual (free
    // until the final norm's backward overwrites it), then into dNorm with zeros before `first`.
    const headIn = first > 0 ? a.tailRows : a.finalNorm,
      dHeadIn = first > 0 ? d.dResidual : d.dNorm;
    const dLogpRows = first > 0 ? d.dTailLogp : d.dLogp;
    if (first > 0) packTails(gpu, d.dLogp, d.dTailLogp, a.B, a.L, first, 1);
    this.eachLogitChunk(a, (start, n) => {
      const xs = rows(headIn, start, n, H);
      this.vocabLogits(xs, a.logits, n);
      tokenLogprobsBackward(
        gpu,
        a.logits,
        slice(a.targets, start, n),
        slice(a.lse, start, n),
        slice(dLogpRows, start, n),
        d.dLogits,
        n,
        c.vocabSize,
        invTemperature,
      );
      this.linearBackward(xs, this.head, d.dLogits, n, rows(dHeadIn, start, n, H), false);
    });
    if (first > 0) unpackTails(gpu, d.dResidual, d.dNorm, a.B, a.L, first, H);
    if (a.shared) {
      // Padding and prefixes have no log-probs: their gradient starts at zero.
      const tails = a.B * a.L, bytes = tails * H * 4;
      gpu.clear(new Tensor(d.dNorm.buffer, [(T - tails) * H], "f32", d.dNorm.offset + bytes));
    }
    rmsnormBackward(
      gpu,
      a.final,
      this.p("model.norm.weight"),
      a.rstdFinal,
      d.dNorm,
      d.dResidual,
      this.g("model.norm.weight"),
      T,
      { accumulateDx: false, accumulateDw: true },
    );

    const step = {
      T,
      positions: a.positions,
      kvLens: a.kvLens,
      shape,
      shared: a.shared ?? undefined,
      segments: a.segments ?? undefined,
    };
    for (let i = c.numLayers - 1; i >= 0; i--) {
      const x = a.layer(i), pre = `model.layers.${i}.`;
      if (a.checkpointed) {
        // Recompute the layer from its input. Its output lands where the forward put it (the
        // next layer's input, already gone back through): the same kernels give the same values.
        this.layerForward(i, x, i + 1 < c.numLayers ? a.layer(i + 1).input : a.final, step);
      }
      // MLP branch: out = mid + down(silu(gate(norm2)) · up(norm2)).
      this.linearBackward(x.act, pre + "mlp.down_proj", d.dResidual, T, d.dAct, false);
      this.eachGateUpChunk(T, (start, n) => {
        const I = c.intermediateSize, dGateUp = rows(d.dGateUp, start, n, 2 * I);
        const gateUp = rows(x.gateUp, start, n, 2 * I), dAct = rows(d.dAct, start, n, I);
        swigluBackward(gpu, gateUp, dAct, dGateUp, n, I);
        const xs = rows(x.norm2, start, n, H), dNorm = rows(d.dNorm, start, n, H);
        this.linearBackward(xs, pre + "mlp.gate_up", dGateUp, n, dNorm, false);
      });
      rmsnormBackward(
        gpu,
        x.mid,
        this.p(pre + "post_attention_layernorm.weight"),
        x.rstd2,
        d.dNorm,
        d.dResidual,
        this.g(pre + "post_attention_layernorm.weight"),
        T,
        { accumulateDx: true, accumulateDw: true },
      );
      // Attention branch: mid = input + o(attention(rope(q(norm1)), rope(k(norm1)), v(norm1))).
      this.linearBackward(x.attn, pre + "self_attn.o_proj", d.dResidual, T, d.dAttn, false);
      if (a.shared) {
        this.sharedAttentionBackward(x, d, a, !a.checkpointed);
      } else {
        attentionBackward(
          gpu,
          x.q,
          x.k,
          x.v,
          a.kvLens,
          x.attn,
          x.lse,
          d.dAttn,
          d.dq,
          d.dk,
          d.dv,
          shape,
          undefined,
          a.segments ?? undefined,
        );
      }
      ropeQkv(
        gpu,
        { q: d.dq, k: d.dk, v: d.dv },
        { qkv: d.dQkv },
        a.positions,
        T,
        c.numHeads,
        c.numKvHeads,
        c.headDim,
        c.ropeTheta,
        true,
      );
      this.linearBackward(x.norm1, pre + "self_attn.qkv", d.dQkv, T, d.dNorm, false);
      rmsnormBackward(
        gpu,
        x.input,
        this.p(pre + "input_layernorm.weight"),
        x.rstd1,
        d.dNorm,
        d.dResidual,
        this.g(pre + "input_layernorm.weight"),
        T,
        { accumulateDx: true, accumulateDw: true },
      );
    }
    if (this.trainsBase) {
      embeddingBackward(gpu, a.idsHost, d.dResidual, this.gradSlices(EMBEDDING), true);
    }
  }

  /** Set every accumulated gradient to zero: one clear per arena. */
  zeroGrads(): void {
    for (const t of this.gradients().buffers) this.gpu.clear(t);
  }

  /** The global gradient norm tensor [1], computed on the GPU (read it only when needed). */
  gradNorm(): Tensor {
    // By tensor in `trained` order, so the norm does not depend on how the arenas are packed.
    this.normTable ??= new GradNorm(
      this.gpu,
      [...this.trained.keys()].flatMap((n) => this.gradSlices(n)),
    );
    this.normTable.run(this.gpu, this.norm);
    return this.norm;
  }

  /**
   * Clip by the global gradient norm and apply AdamW to every trained tensor, one dispatch per
   * arena (the gaps between tensors stay zero); leaves gradients as they are.
   */
  adamwStep(hp: AdamwHyper): Tensor {
    const norm = this.gradNorm(), grads = this.gradients().buffers;
    const { m, v } = this.momentArenas();
    this.trainedArenas.buffers.forEach((param, i) =>
      adamw(this.gpu, param, grads[i], m.buffers[i], v.buffers[i], norm, param.size, hp)
    );
    this.refreshGroupBiases();
    this.weightsChanged();
    return norm;
  }

  /** Copy every trained tensor back to the CPU (with LoRA: the adapter's A and B). */
  async readWeights(): Promise<Map<string, Float32Array>> {
    return await this.readMap(this.trained);
  }

  /**
   * The trained tensors, or their AdamW moments (none before the first step), read back when a
   * save asks for each: in pieces of at most `batchBytes` (views of the row slices), a batch of
   * pieces up to `batchBytes` at a time from the one asked for on in order (one GPU wait a
   * batch), each handed over once and not kept. Saving full fine-tuning's checkpoint held the
   * weights and moments whole (12 bytes a parameter), and then each weight whole (a 0.5B model's
   * embedding is 545 MB as f32): a save now holds one batch.
   */
  reader(which: "weights" | "moments", batchBytes = READ_BATCH_BYTES): TensorReader {
    const tensors = which === "weights"
      ? this.trained
      : this.moments
      ? this.momentSlices()
      : new Map<string, Tensor[]>();
    const sizes = new Map(
      [...tensors].map(([name, slices]) => [name, slices.reduce((a, t) => a + t.size, 0)]),
    );
    const pieces = [...tensors].flatMap(([name, slices]) =>
      slices.flatMap((slice) => piecesOf(slice, batchBytes).map((tensor) => ({ name, tensor })))
    );
    const ready = new Map<number, Float32Array>(); // by index in pieces
    const piece = async (index: number) => {
      if (!ready.has(index)) {
        const batch: number[] = [];
        for (let i = index, bytes = 0; i < pieces.length; i++) {
          bytes += pieces[i].tensor.bytes;
          if (batch.length > 0 && bytes > batchBytes) break;
          batch.push(i);
        }
        const values = await this.readParts(new Map(batch.map((i) => [i, [pieces[i].tensor]])));
        for (const [i, [data]] of values) ready.set(i, data);
      }
      const data = ready.get(index)!;
      ready.delete(index);
      return data;
    };
    return {
      sizes,
      async *read(name: string) {
        if (!sizes.has(name)) throw new Error(`GpuModel.reader: no tensor ${name}`);
        for (let index = 0; index < pieces.length; index++) {
          if (pieces[index].name === name) yield await piece(index);
        }
      },
    };
  }

  /** Copy every accumulated gradient of the trained tensors back to the CPU. */
  async readGrads(): Promise<Map<string, Float32Array>> {
    const names = [...this.trained.keys()];
    return await this.readMap(new Map(names.map((name) => [name, this.gradSlices(name)])));
  }

  /** The AdamW moments' arenas (made on first use, zeroed). */
  private momentArenas(): { m: Arenas; v: Arenas } {
    return this.moments ??= {
      m: this.trainedArenas.twin(this.gpu, "exp_avg"),
      v: this.trainedArenas.twin(this.gpu, "exp_avg_sq"),
    };
  }

  /** Each trained tensor's AdamW moments, by checkpoint name: views of the moments' arenas. */
  private momentSlices(): Map<string, Tensor[]> {
    const { m, v } = this.momentArenas();
    const at = (arenas: Arenas, slices: Tensor[]) =>
      slices.map((t) => arenas.mirror(t, this.trainedArenas));
    return new Map(
      [...this.trained].flatMap(([name, slices]) => [
        [`${name}.exp_avg`, at(m, slices)],
        [`${name}.exp_avg_sq`, at(v, slices)],
      ]),
    );
  }

  /** AdamW moments for checkpoints (m and v per weight); none before the first step. */
  async readOptimizerState(): Promise<Map<string, Float32Array>> {
    return this.moments ? await this.readMap(this.momentSlices()) : new Map();
  }

  /** Load AdamW moments (a weight missing from `state` starts from zero). */
  loadOptimizerState(state: ReadonlyMap<string, Float32Array>): void {
    for (const [name, slices] of this.momentSlices()) {
      const data = state.get(name);
      if (data) splitRows(data, slices).forEach((part, i) => this.gpu.write(slices[i], part));
    }
  }

  /** Replace the trained tensors (same shapes), e.g. for reference-model syncing. */
  setWeights(weights: ReadonlyMap<string, Float32Array>): void {
    for (const [name, slices] of this.trained) {
      const data = weights.get(name);
      if (data) this.writeSlices(slices, data);
    }
    this.weightsChanged();
    this.refreshGroupBiases();
  }

  destroy(): void {
    this.acts?.release(this.gpu);
    this.scoringActs?.release(this.gpu);
    for (const buffers of this.kept.values()) buffers.release(this.gpu);
    this.kept.clear();
    this.weightTextures.destroy();
    this.gpu.flush();
    // Views at an offset leave their buffer alone: arenas and fused matrices go as such.
    const all = [...this.params.values()];
    for (const g of this.groups.values()) {
      all.push(g.weight);
      if (g.bias && g.modules.length > 1) all.push([g.bias]);
    }
    if (this.loraScratch) all.push([this.loraScratch.u, this.loraScratch.du]);
    for (const t of all.flat()) t.destroy();
    const { weightArenas, trainedArenas, gradArenas, moments } = this;
    for (const arenas of [weightArenas, trainedArenas, gradArenas, moments?.m, moments?.v]) {
      arenas?.destroy();
    }
    this.normTable?.destroy(this.gpu);
    this.norm.destroy();
  }

  /** After the trained tensors change: with full fine-tuning they are the weights the products read. */
  private weightsChanged(): void {
    if (this.lora.size === 0) this.weightTextures.stale();
  }

  /** out[T, H] = the embeddings of ids (i32 [T]). */
  embed(ids: Tensor, out: Tensor, T: number): void {
    embedding(this.gpu, ids, this.params.get(EMBEDDING)!, out, T);
  }

  /**
   * logits[n, V] = x[n, H]·lm_headᵀ (the embedding matrix when tied); with `norm`, of the final
   * RMSNorm of x, folded into the product (generation, when `generationFusions` folds norms).
   */
  vocabLogits(x: Tensor, logits: Tensor, n: number, norm?: boolean): void {
    const weight = this.p("model.norm.weight"), eps = this.config.rmsNormEps;
    this.linear(x, this.head, logits, n, true, false, norm ? { weight, eps } : undefined);
  }

  /** Whether generation folds the RMSNorms and SwiGLU into this model's products. */
  generationFusions(): { norms: boolean; swiglu: boolean } {
    return generationFusions(this.gpu, this.config.hiddenSize, this.config.intermediateSize);
  }

  /**
   * Whether the gate/up product of `key` can apply SwiGLU itself: one weight tensor, no bias,
   * and no adapter adding to its output first.
   */
  private swigluFuses(key: string, adapter: boolean): boolean {
    const g = this.groups.get(key)!;
    return g.weight.length === 1 && !g.bias &&
      !(adapter && g.modules.some((module) => this.lora.has(module)));
  }

  // ---- helpers ---------------------------------------------------------------------------

  /**
   * y[T, out] = x[T, in]·Wᵀ (+ b) for a group of nn.Linear modules (`key`: layerGroups', or the
   * vocabulary projection's module): one matmul per tensor of its weight, each writing its block
   * of y's columns. Each adapted member then adds s·(x·Aᵀ)·Bᵀ to its columns, unless `adapter`
   * is false. With `accumulate`, all of it is added to what y holds (a residual copied there).
   * With `norm`, every product reads the RMSNorm of x (MatmulOptions.rmsnorm); with `swiglu`
   * (`swigluFuses`), y [T, out/2] is SwiGLU of the output's halves.
   */
  private linear(
    x: Tensor,
    key: string,
    y: Tensor,
    T: number,
    adapter = true,
    accumulate = false,
    norm?: { weight: Tensor; eps: number },
    swiglu = false,
  ): void {
    const g = this.groups.get(key)!, inF = g.weight[0].shape[1];
    const foldedNorm = norm && { ...norm, kept: this.weightTextures };
    let first = 0;
    for (const slice of g.weight) {
      const rows = slice.shape[0];
      matmul(this.gpu, x, slice, y, { M: T, N: rows, K: inF }, {
        transB: true,
        accumulate,
        bias: g.bias ?? undefined,
        outBlock: swiglu ? undefined : { stride: g.outFeatures, first },
        keptB: this.weightTextures,
        rmsnorm: foldedNorm,
        swiglu,
      });
      first += rows;
    }
    g.modules.forEach((module, j) => {
      const pair = adapter ? this.lora.get(module) : undefined;
      if (!pair) return;
      // u = s·(x·Aᵀ) [T, r];  y[:, member's columns] += u·Bᵀ.
      const r = pair.a.shape[0], { u } = this.loraBuffers(T, r);
      matmul(this.gpu, x, pair.a, u, { M: T, N: r, K: inF }, {
        transB: true,
        rmsnorm: foldedNorm,
        scale: this.loraScale,
      });
      matmul(this.gpu, u, pair.b, y, { M: T, N: g.rows[j], K: r }, {
        transB: true,
        accumulate: true,
        outBlock: { stride: g.outFeatures, first: g.firsts[j] },
      });
    });
  }

  /** The adapter branch's [T, r] buffers (views of ones grown to the largest T seen). */
  private loraBuffers(T: number, r: number): { u: Tensor; du: Tensor } {
    if (!this.loraScratch || this.loraScratch.u.size < T * r) {
      if (this.loraScratch) {
        this.gpu.release(this.loraScratch.u);
        this.gpu.release(this.loraScratch.du);
      }
      this.loraScratch = { u: this.gpu.zeros([T, r]), du: this.gpu.zeros([T, r]) };
    }
    const { u, du } = this.loraScratch;
    return { u: slice(u, 0, T * r), du: slice(du, 0, T * r) };
  }

  /**
   * The backward of linear(): dx (+)= dy·W, and accumulated dW += dyᵀ·x and db += Σ_t dy[t],
   * one tensor of the group's weight at a time, each reading its block of dy's columns.
   */
  private linearBackward(
    x: Tensor,
    key: string,
    dy: Tensor,
    T: number,
    dx: Tensor,
    dxAccumulate: boolean,
  ): void {
    const gpu = this.gpu, g = this.groups.get(key)!, inF = g.weight[0].shape[1];
    const dw = this.groupGrads(g);
    let first = 0;
    g.weight.forEach((slice, i) => {
      const rows = slice.shape[0], dyBlock = { stride: g.outFeatures, first };
      matmul(gpu, dy, slice, dx, { M: T, N: inF, K: rows }, {
        accumulate: dxAccumulate || i > 0,
        aBlock: dyBlock,
        keptB: this.weightTextures,
      });
      if (dw) {
        matmul(gpu, dy, x, dw[i], { M: rows, N: inF, K: T }, {
          transA: true,
          accumulate: true,
          aBlock: dyBlock,
        });
      }
      first += rows;
    });
    g.modules.forEach((module, j) => {
      const outF = g.rows[j], dyBlock = { stride: g.outFeatures, first: g.firsts[j] };
      const db = this.g(`${module}.bias`);
      if (db) sumRows(gpu, dy, db, T, outF, true, dyBlock);
      const pair = this.lora.get(module);
      if (!pair) return;
      // y = … + u·Bᵀ with u = s·(x·Aᵀ):  dB += dyᵀ·u;  du = s·(dy·B);  dA += duᵀ·x;  dx += du·A.
      const r = pair.a.shape[0], { u, du } = this.loraBuffers(T, r);
      const [dA] = this.gradSlices(pair.aName), [dB] = this.gradSlices(pair.bName);
      matmul(gpu, x, pair.a, u, { M: T, N: r, K: inF }, { transB: true, scale: this.loraScale });
      matmul(gpu, dy, u, dB, { M: outF, N: r, K: T }, {
        transA: true,
        accumulate: true,
        aBlock: dyBlock,
      });
      matmul(gpu, dy, pair.b, du, { M: T, N: r, K: outF }, {
        aBlock: dyBlock,
        scale: this.loraScale,
      });
      matmul(gpu, du, x, dA, { M: r, N: inF, K: T }, { transA: true, accumulate: true });
      matmul(gpu, du, pair.a, dx, { M: T, N: inF, K: r }, { accumulate: true });
    });
  }

  /** The gradients of a group's weight tensors, in order (null when frozen: a LoRA run's base). */
  private groupGrads(g: Group): Tensor[] | null {
    if (!this.trained.has(`${g.modules[0]}.weight`)) return null;
    if (g.fused) return [this.gradients().mirror(g.weight[0], this.trainedArenas)];
    return g.modules.flatMap((m) => this.gradSlices(`${m}.weight`));
  }

  private attentionShape(B: number, L: number): AttentionShape {
    const c = this.config;
    return {
      B,
      Lq: L,
      capacity: L,
      nHeads: c.numHeads,
      nKvHeads: c.numKvHeads,
      headDim: c.headDim,
    };
  }

  /**
   * Chunks of T tokens for the gate/up product and SwiGLU: all at once, or as many as one binding
   * holds of their [T, 2·I] rows (llvmpipe's 128 MiB: 3,449 tokens of Qwen2.5-0.5B's).
   */
  private eachGateUpChunk(T: number, body: (start: number, n: number) => void): void {
    const chunk = rowChunkTokens(T, 2 * this.config.intermediateSize * 4, this.maxBinding);
    for (let start = 0; start < T; start += chunk) body(start, Math.min(chunk, T - start));
  }

  /** Chunks of the positions the vocabulary projection runs on (every row's from a.first). */
  private eachLogitChunk(a: Activations, body: (start: number, n: number) => void): void {
    const T = a.B * (a.L - a.first);
    for (let start = 0; start < T; start += a.chunk) body(start, Math.min(a.chunk, T - start));
  }

  /** Read tensors' values, joining each name's row slices (16-bit ones widened to f32). */
  private async readMap(tensors: Map<string, Tensor[]>): Promise<Map<string, Float32Array>> {
    const parts = await this.readParts(tensors);
    return new Map([...parts].map(([name, values]) => [name, joinRows(values)]));
  }

  /** Each tensor's row slices read back with one GPU wait, widened to f32, not joined. */
  private async readParts<K>(tensors: Map<K, Tensor[]>): Promise<Map<K, Float32Array[]>> {
    const names = [...tensors.keys()];
    const all = names.flatMap((n) => tensors.get(n)!);
    const data = (await this.gpu.readMany(all)).map((values, i) => {
      const dtype = all[i].dtype;
      return dtype === "bf16" || dtype === "f16"
        ? unpackHalves(values as Uint32Array, all[i].size, dtype)
        : values as Float32Array;
    });
    let at = 0;
    return new Map(names.map((n) => [n, data.slice(at, at += tensors.get(n)!.length)]));
  }
}
