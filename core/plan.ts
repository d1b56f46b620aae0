// The memory plan of a training run, device-free: every buffer `aha train` allocates for a config
// and a model shape, mirroring gpu/model.ts (weights, gradients, AdamW moments, the activations
// the forward keeps, the logit chunk) and gpu/generate.ts (KV caches, prefill and decode
// buffers), grouped by purpose and adapter. It follows the memory settings: a LoRA run trains
// only the adapters' A and B (gradients and moments for those alone) over a frozen base; frozen
// weights are 16-bit per frozen_dtype; gradient checkpointing keeps each layer's input and one
// layer's buffers; the KV cache is kv_cache_dtype; and a LoRA run's reference is its base, so on
// one adapter it needs no weights of its own; a reference on onnxruntime's WASM engine
// (reference.engine onnx) is in CPU memory, on no adapter. The plan is checked against the
// adapter's limits — a weight larger than one storage binding is kept as row slices, so one row
// must fit; every other tensor is bound whole, so the largest must fit; the totals must fit the
// adapter's memory when it is known — and advice says which setting to lower, and to what.
// `aha plan` prints it (cli/plan.ts); `aha train` calls checkPlan before loading anything.

import { AhaError } from "./errors.ts";
import {
  type ModelConfig,
  parameterCount,
  parseModelConfig,
  PRESETS,
  weightShapes,
} from "./model_config.ts";
import { loraShapes, referenceSharesBase } from "./lora.ts";
import { referenceEngine, type TrainConfig } from "./train_config.ts";

// The sizes that bound the GPU engine's memory; gpu/model.ts and gpu/score.ts use these.

/** Logits are computed for at most this many floats at a time (64 MiB). */
export const LOGIT_CHUNK_FLOATS = 16 * 1024 * 1024;
/** Token chunks are multiples of this, so every chunk's views start 256-byte aligned. */
export const CHUNK_ALIGN = 64;
/** Every element aha stores (f32, i32) takes 4 bytes, but 16-bit frozen weights and caches. */
const ELEMENT_BYTES = 4;
/**
 * Generation rounds its KV cache length and prefill length up to multiples of these, so that
 * calls of nearby shapes reuse the buffers gpu/generate.ts keeps.
 */
export const CAPACITY_ROUND = 16;
export const PREFILL_ROUND = 4;
/** Tokens per scoring forward pass (the reference model, `aha score`), at most. */
export const SCORE_BATCH_TOKENS = 8192;
/** Tokens per prefill pass of generation (gpu/generate.ts prefills prompts in such batches). */
export const PREFILL_BATCH_TOKENS = 2048;

/**
 * The most tokens one forward pass of model `c` runs: `most` (SCORE_BATCH_TOKENS,
 * PREFILL_BATCH_TOKENS), or fewer when the pass's widest buffer bound whole would be over one
 * storage binding of `maxBinding` bytes. Per token that is the SwiGLU output's I values or the
 * fused q/k/v's (gate/up and the logits run in row chunks). Qwen2.5-0.5B's SwiGLU output over
 * 8,192 tokens is 152 MiB, over llvmpipe's 128 MiB binding: its scoring passes take 6,898 tokens.
 */
export function passTokens(c: ModelConfig, maxBinding: number, most: number): number {
  const qkv = (c.numHeads + 2 * c.numKvHeads) * c.headDim;
  const widest = Math.max(c.intermediateSize, qkv, c.hiddenSize) * ELEMENT_BYTES;
  return Math.min(most, Math.floor(maxBinding / widest));
}

/**
 * Prompts per prefill pass for P prompts prefilled to `prefillLen` tokens, at most `tokens`
 * tokens a pass (passTokens); at least one.
 */
export function prefillPrompts(P: number, prefillLen: number, tokens: number): number {
  return Math.min(P, Math.max(1, Math.floor(tokens / Math.max(1, prefillLen))));
}

/**
 * Tokens of a [T, …] activation bound at a time when all T rows are over one binding: as many
 * rows of `rowBytes` as fit, in multiples of CHUNK_ALIGN. gpu/model.ts runs the fused gate/up
 * product, SwiGLU and their backward in such chunks: their [T, 2·I] rows are twice any other
 * activation's, and would otherwise halve the tokens a binding of llvmpipe's 128 MiB holds.
 */
export function rowChunkTokens(T: number, rowBytes: number, maxBinding: number): number {
  const fit = Math.floor(maxBinding / rowBytes / CHUNK_ALIGN) * CHUNK_ALIGN;
  return Math.min(T, Math.max(CHUNK_ALIGN, fit));
}

/** Tokens per logit chunk for T tokens over a vocabulary of V. */
export function logitChunkTokens(T: number, V: number, chunkFloats = LOGIT_CHUNK_FLOATS): number {
  const fit = Math.floor(chunkFloats / V / CHUNK_ALIGN) * CHUNK_ALIGN;
  return Math.min(T, Math.max(CHUNK_ALIGN, fit));
}

/** Bytes one storage binding of an adapter may hold. */
export function bindingBytes(limits: AdapterLimits): number {
  return Math.min(limits.maxStorageBufferBindingSize, limits.maxBufferSize);
}

/** How a planned buffer is stored: 4-byte elements, or 2-byte (bf16/f16) ones. */
export type PlanDType = "f32" | "bf16" | "f16";

/** Bytes of one row of a weight (a 1-D weight is one row): what splitting cannot go below. */
export function weightRowBytes(shape: number[]): number {
  return (shape.length > 1 ? shape.slice(1) : shape).reduce((a, b) => a * b, 1) * ELEMENT_BYTES;
}

/**
 * Rows per slice of a weight kept as row slices of at most `maxBytes` each (gpu/model.ts): all
 * its rows when it fits, else as many as fit, a multiple of 4 when 4 fit (each slice then writes
 * vec4-aligned columns of its outputs); 0 when not even one row fits.
 */
export function weightSliceRows(shape: number[], maxBytes: number): number {
  const rows = shape.length > 1 ? shape[0] : 1;
  const fit = Math.floor(maxBytes / weightRowBytes(shape));
  if (fit >= rows) return rows;
  return fit >= 4 ? fit - fit % 4 : fit;
}

export interface AdapterLimits {
  description: string;
  maxBufferSize: number;
  maxStorageBufferBindingSize: number;
  /** Bytes of memory, or null when unknown (WebGPU does not report it). */
  memory: number | null;
}

/** One buffer: its name and shape, in elements, and its storage when not 4 bytes. */
export interface PlannedTensor {
  name: string;
  shape: number[];
  dtype?: PlanDType;
  /** Bound CHUNK_ALIGN rows or more at a time (rowChunkTokens): one binding needs only those. */
  rowChunks?: boolean;
  /**
   * Packed with others of its kind in an arena (gpu/arena.ts: f32 weights, what is trained,
   * gradients, moments), where each starts on a binding boundary: padded to ARENA_ALIGN bytes.
   */
  arena?: boolean;
}

export interface PlanItem {
  adapter: "policy" | "reference";
  what: string;
  /** The sizes it depends on, e.g. "4 rows × 1020 tokens". */
  detail: string;
  tensors: PlannedTensor[];
  bytes: number;
  /** Model weights, kept as row slices when over one binding (so one row must fit). */
  weights?: boolean;
}

export interface Plan {
  items: PlanItem[];
  policyBytes: number;
  /** 0 without a reference model (beta = 0). */
  referenceBytes: number;
  /** The reference shares the policy's adapter: its memory adds to the policy's. */
  referenceShared: boolean;
  /** The reference runs on onnxruntime's WASM engine: CPU memory, not counted here. */
  referenceOnCpu: boolean;
}

/** Where tensors packed in an arena start: WebGPU's storage binding alignment. */
const ARENA_ALIGN = 256;

/**
 * A buffer's bytes, as gpu/device.ts allocates them (16-bit ones padded to whole words), or as
 * gpu/arena.ts packs it.
 */
export const tensorBytes = (t: PlannedTensor) => {
  const size = t.shape.reduce((a, b) => a * b, 1);
  if (t.dtype === "bf16" || t.dtype === "f16") return Math.ceil(size / 2) * 4;
  const bytes = size * ELEMENT_BYTES;
  return t.arena ? Math.ceil(bytes / ARENA_ALIGN) * ARENA_ALIGN : bytes;
};

/** The storage of a checkpoint's tensors, from config.json's torch_dtype (f32 when unknown). */
export function torchDtype(hfConfig: unknown): PlanDType {
  const name = (hfConfig as { torch_dtype?: unknown } | null)?.torch_dtype;
  return name === "bfloat16" ? "bf16" : name === "float16" ? "f16" : "f32";
}

/**
 * How frozen weight matrices are stored (core/half.ts frozenWeightDtypes): frozen_dtype, or for
 * "auto" the checkpoint's own dtype (f16 needs shader-f16 on the adapter; else f32, which the
 * plan cannot know, so it assumes the adapter has it).
 */
export function frozenStorage(cfg: TrainConfig, checkpointDtype: PlanDType): PlanDType {
  return cfg.frozen_dtype === "auto" ? checkpointDtype : cfg.frozen_dtype;
}

/** A weight as stored when frozen: matrices in `dtype`, norm weights and biases in f32. */
const frozenTensor = (name: string, shape: number[], dtype: PlanDType): PlannedTensor =>
  shape.length === 2 && dtype !== "f32" ? { name, shape, dtype } : { name, shape, arena: true };

// ---------------------------------------------------------------------------------------------
// What each part of the program allocates.

/**
 * gpu/model.ts layerBuffers: what one layer keeps for B rows of L tokens (`qkv` false: the
 * fused q/k/v product's rows are another layer's).
 */
function layerTensors(
  c: ModelConfig,
  layer: string,
  B: number,
  L: number,
  qkv = true,
): PlannedTensor[] {
  const T = B * L, H = c.hiddenSize, I = c.intermediateSize;
  const qDim = c.numHeads * c.headDim, kvDim = c.numKvHeads * c.headDim;
  const shapes: [string, number[]][] = [
    ["input", [T, H]],
    ["norm1", [T, H]],
    ["rstd1", [T]],
    ...(qkv ? [["qkv", [T, qDim + 2 * kvDim]] as [string, number[]]] : []),
    ["q", [T, qDim]],
    ["k", [T, kvDim]],
    ["v", [T, kvDim]],
    ["attn", [T, qDim]],
    ["lse", [B, c.numHeads, L]],
    ["mid", [T, H]],
    ["norm2", [T, H]],
    ["rstd2", [T]],
    ["gateUp", [T, 2 * I]],
    ["act", [T, I]],
  ];
  return shapes.map(([name, shape]) => ({
    name: `${layer}.${name}`,
    shape,
    ...(name === "gateUp" ? { rowChunks: true } : {}),
  }));
}

/**
 * gpu/model.ts Activations: a forward over B rows of L tokens — every layer's buffers when kept
 * for backward; with checkpointing, every layer's input and one set of buffers for recomputing;
 * one set reused by all layers when not kept. A batch whose groups share a prompt may run as
 * forwardShared instead, only when that takes at most 90% of these tokens (`worthSharing`); its
 * four cache rows of at most L tokens × nKv·D take less than the 10% of every per-token buffer
 * it saves, so these bound it.
 */
function forwardTensors(
  c: ModelConfig,
  B: number,
  L: number,
  keep = true,
  checkpointed = false,
) {
  const T = B * L, H = c.hiddenSize, I = c.intermediateSize, V = c.vocabSize;
  const qDim = c.numHeads * c.headDim, kvDim = c.numKvHeads * c.headDim;
  const chunk = logitChunkTokens(T, V);
  const t = (name: string, ...shape: number[]): PlannedTensor => ({ name, shape });
  const activations: PlannedTensor[] = [];
  const everyLayer = keep && !checkpointed;
  for (let i = 0; i < (everyLayer ? c.numLayers : 1); i++) {
    activations.push(...layerTensors(c, `layers.${i}`, B, L, i === 0));
  }
  if (keep && checkpointed) {
    for (let i = 1; i < c.numLayers; i++) activations.push(t(`layers.${i}.input`, T, H));
  }
  activations.push(
    t("ids", T),
    t("targets", T),
    t("positions", T),
    t("kvLens", B),
    t("final", T, H),
    t("finalNorm", T, H),
    t("rstdFinal", T),
  );
  // The vocabulary projection's input and log-probs, packed to the positions it runs on.
  const logprobs = [
    t("logits", chunk, V),
    t("dLogits", chunk, V),
    t("logp", T),
    t("lse", T),
    t("tailRows", T, H),
    t("tailLogp", T),
  ];
  const backward = [
    t("dLogp", T),
    t("dTailLogp", T),
    t("dResidual", T, H),
    t("dNorm", T, H),
    t("dAttn", T, qDim),
    t("dq", T, qDim),
    t("dk", T, kvDim),
    t("dv", T, kvDim),
    t("dQkv", T, qDim + 2 * kvDim),
    t("dAct", T, I),
    { ...t("dGateUp", T, 2 * I), rowChunks: true },
  ];
  return { activations, logprobs, backward, chunk };
}

/**
 * Prompts one generation call of a step samples (core/trainer.ts): prompts_per_generation; unset,
 * three times prompts_per_step for the built-in model (whose calls cost about the same for any
 * number of rows, and whose memory is small: one call covers the default's two refill rounds),
 * prompts_per_step for a checkpoint; never more than a step can use (every refill round at its
 * largest).
 */
export function generationPrompts(cfg: TrainConfig): number {
  const P = cfg.prompts_per_step;
  const perCall = cfg.prompts_per_generation ?? (cfg.model === null ? 3 * P : P);
  return Math.min(perCall, P * (cfg.max_refill_rounds + 1));
}

/**
 * gpu/generate.ts: G completions of up to maxNew tokens for each of P prompts of up to
 * promptLen tokens (rounded up as generate.ts rounds them), prefilled in batches of
 * prefillPrompts (as many as one binding of `maxBinding` bytes allows, passTokens). Everything
 * stays allocated between calls (kept on the model).
 */
function generationTensors(
  c: ModelConfig,
  P: number,
  G: number,
  promptLen: number,
  maxNew: number,
  kvDtype: PlanDType,
  maxBinding: number,
) {
  const round = (n: number, m: number) => Math.ceil(n / m) * m;
  const rows = P * G, prefill = round(promptLen, PREFILL_ROUND);
  const capacity = round(Math.max(promptLen + maxNew, prefill), CAPACITY_ROUND);
  // Prompts are prefilled in batches: the prompt cache and prefill buffers hold one batch.
  const batch = prefillPrompts(P, prefill, passTokens(c, maxBinding, PREFILL_BATCH_TOKENS));
  const H = c.hiddenSize, kv = [capacity, c.numKvHeads, c.headDim];
  const t = (name: string, ...shape: number[]): PlannedTensor => ({ name, shape });
  const kvT = (name: string, ...shape: number[]): PlannedTensor =>
    kvDtype === "f32" ? { name, shape } : { name, shape, dtype: kvDtype };
  const cache: PlannedTensor[] = [];
  for (let i = 0; i < c.numLayers; i++) {
    cache.push(
      kvT(`layers.${i}.k cache`, rows, ...kv),
      kvT(`layers.${i}.v cache`, rows, ...kv),
      kvT(`layers.${i}.k prompt cache`, batch, ...kv),
      kvT(`layers.${i}.v prompt cache`, batch, ...kv),
    );
  }
  const T = batch * prefill;
  const work: PlannedTensor[] = [
    ...layerTensors(c, "prefill", batch, prefill),
    t("prefill ids", T),
    t("prefill positions", T),
    t("prefill kvLens", batch),
  ];
  work.push(
    ...layerTensors(c, "decode", rows, 1),
    t("decode hidden", rows, H),
    t("decode logits", rows, c.vocabSize),
    ...["ids", "positions", "kvLens", "sampled", "logp", "done"].map((n) => t(`decode ${n}`, rows)),
    t("sampled tokens", maxNew, rows),
    t("sampled log-probs", maxNew, rows),
  );
  // The most tokens one pass runs: a prefill batch, or one decode step of every row.
  return { cache, work, rows, capacity, tokens: Math.max(batch * prefill, rows) };
}

const sumBytes = (tensors: PlannedTensor[]) => tensors.reduce((a, t) => a + tensorBytes(t), 0);

/**
 * The reference shares the policy's adapter unless reference.adapter names another backend
 * ("auto" may find a second adapter at run time; the plan assumes the worst).
 */
function referenceSharesAdapter(cfg: TrainConfig): boolean {
  return cfg.reference.adapter === "same" || cfg.reference.adapter === "auto";
}

/**
 * The config puts the reference on onnxruntime-web's WASM engine in its worker process, whatever
 * the adapter (reference.engine onnx, or an export given). "auto" picks that engine only beside a
 * software adapter, whose memory is the same RAM: the plan then counts the reference there.
 */
function referenceOnCpu(cfg: TrainConfig, model: ModelConfig): boolean {
  return referenceEngine(cfg, false, parameterCount(model)) === "onnx";
}

/**
 * Every buffer of a training run of `model` under `cfg`, by adapter and purpose.
 * `checkpointDtype` is the checkpoint's storage (frozen_dtype "auto" keeps it); `maxBinding`,
 * the adapter's binding size, sets the reference's and the prefill's tokens per pass (passTokens).
 */
export function planMemory(
  cfg: TrainConfig,
  model: ModelConfig,
  referenceShared = referenceSharesAdapter(cfg),
  checkpointDtype: PlanDType = "f32",
  maxBinding = Infinity,
): Plan {
  const items: PlanItem[] = [];
  const add = (
    adapter: PlanItem["adapter"],
    what: string,
    detail: string,
    tensors: PlannedTensor[],
    weights = false,
  ) =>
    items.push({
      adapter,
      what,
      detail,
      tensors,
      bytes: sumBytes(tensors),
      ...(weights ? { weights } : {}),
    });
  const P = cfg.prompts_per_step, G = cfg.num_generations;
  const L = cfg.max_prompt_length + cfg.max_completion_length;
  const tokens = (rows: number) => `${rows} row${rows === 1 ? "" : "s"} × ${L} tokens`;

  const lora = cfg.lora;
  const frozen = frozenStorage(cfg, checkpointDtype);
  const frozenWeights = [...weightShapes(model)].map(([name, shape]) =>
    frozenTensor(name, shape, frozen)
  );
  // What is trained gets gradients and AdamW moments: every weight, or the LoRA adapters alone.
  const trained = (what: string, detail: string, tensors: PlannedTensor[]) => {
    const prefix = lora === null ? "" : "LoRA ";
    add("policy", what, detail, tensors, lora === null);
    add("policy", `${prefix}gradients`, "one per trained tensor", [
      ...tensors.map((w) => ({ ...w, name: `${w.name} grad` })),
    ]);
    add("policy", `${prefix}AdamW moments`, "m and v per trained tensor", [
      ...tensors.map((w) => ({ ...w, name: `${w.name} exp_avg` })),
      ...tensors.map((w) => ({ ...w, name: `${w.name} exp_avg_sq` })),
    ]);
  };
  // (Left out as too small to matter: the fused q/k/v bias copies, nH·D + 2·nKv·D floats a layer.)
  if (lora === null) {
    const weights = [...weightShapes(model)].map(([name, shape]) => ({ name, shape, arena: true }));
    trained("weights", `${weights.length} tensors`, weights);
  } else {
    const detail = `${frozenWeights.length} tensors, frozen base, matrices ${frozen}`;
    add("policy", "weights", detail, frozenWeights, true);
    const adapters = [...loraShapes(model, lora)].map(([name, shape]) => ({
      name,
      shape,
      arena: true,
    }));
    trained(
      "LoRA adapters",
      `r ${lora.r}, ${lora.target_modules.length} projections × ${model.numLayers} layers`,
      adapters,
    );
  }
  // A micro-batch never holds more rows than a step has completions.
  const micro = Math.min(cfg.micro_batch_size, P * G);
  const checkpointed = cfg.gradient_checkpointing;
  const train = forwardTensors(model, micro, L, true, checkpointed);
  add(
    "policy",
    "training activations",
    `micro_batch_size ${tokens(micro)}` +
      (checkpointed ? ", checkpointed: layer inputs + one layer" : ""),
    train.activations,
  );
  add("policy", "backward scratch", tokens(micro), train.backward);
  add("policy", "log-prob buffers", `logit chunk ${train.chunk} tokens × vocab`, train.logprobs);
  // Sampling (a generation call's prompts × G) or evaluation (core/evaluate.ts: batches of at
  // most P × G rows), whichever is larger.
  const kv = cfg.kv_cache_dtype;
  const evalRows = Math.min(cfg.eval_prompts ?? P * G, P * G);
  const generation = [
    generationTensors(
      model,
      generationPrompts(cfg),
      G,
      cfg.max_prompt_length,
      cfg.max_completion_length,
      kv,
      maxBinding,
    ),
    generationTensors(
      model,
      evalRows,
      1,
      cfg.max_prompt_length,
      cfg.max_completion_length,
      kv,
      maxBinding,
    ),
  ].reduce((a, b) => sumBytes([...b.cache, ...b.work]) > sumBytes([...a.cache, ...a.work]) ? b : a);
  const rows = `${generation.rows} rows × ${generation.capacity} tokens`;
  add("policy", "generation KV cache", `${rows}${kv === "f32" ? "" : `, ${kv}`}`, generation.cache);
  add(
    "policy",
    "generation buffers",
    `prefill and decode, ${generation.rows} rows`,
    generation.work,
  );
  if (lora !== null) {
    // gpu/model.ts loraBuffers: u = s·x·Aᵀ and its gradient, [T, r] for the largest pass the
    // adapters run in (training, a prefill batch or a decode step; the reference runs without).
    const T = Math.max(micro * L, generation.tokens);
    add("policy", "LoRA scratch", `x·Aᵀ and its gradient, ${T} tokens × r`, [
      { name: "lora u", shape: [T, lora.r] },
      { name: "lora du", shape: [T, lora.r] },
    ]);
  }

  const onCpu = cfg.beta > 0 && referenceOnCpu(cfg, model);
  if (cfg.beta > 0 && !onCpu) {
    // The reference scores the batch in forward passes of at most passTokens tokens.
    const perPass = passTokens(model, maxBinding, SCORE_BATCH_TOKENS);
    const rows = Math.min(P * G, Math.max(1, Math.floor(perPass / L)));
    const ref = forwardTensors(model, rows, L, false);
    // A LoRA run's reference is its base: on the policy's adapter it runs in the training
    // process on the policy's frozen weights, with the adapters off (no second copy).
    if (lora === null || !referenceShared) {
      const detail = `${frozenWeights.length} tensors, frozen, matrices ${frozen}`;
      add("reference", "weights", detail, frozenWeights, true);
    }
    add("reference", "forward activations", `${tokens(rows)} per pass`, ref.activations);
    add("reference", "log-prob buffers", `logit chunk ${ref.chunk} tokens × vocab`, ref.logprobs);
  }
  const total = (adapter: string) =>
    items.filter((i) => i.adapter === adapter).reduce((a, i) => a + i.bytes, 0);
  return {
    items,
    policyBytes: total("policy"),
    referenceBytes: total("reference"),
    referenceShared,
    referenceOnCpu: onCpu,
  };
}

// ---------------------------------------------------------------------------------------------
// Checking a plan against an adapter, and advice.

/** The largest tensor of an item. */
export function largestTensor(item: PlanItem): PlannedTensor {
  return item.tensors.reduce((a, b) => tensorBytes(b) > tensorBytes(a) ? b : a);
}

/** The part of a tensor one binding holds: all of it, or a chunk of CHUNK_ALIGN rows. */
const boundPart = (t: PlannedTensor): PlannedTensor =>
  t.rowChunks ? { ...t, shape: [Math.min(t.shape[0], CHUNK_ALIGN), ...t.shape.slice(1)] } : t;

export const describeTensor = (t: PlannedTensor) =>
  `${t.name} [${t.shape.join(", ")}] (${formatBytes(tensorBytes(t))})`;

/** Why the plan cannot run on the adapter (empty when it fits). */
export function planProblems(plan: Plan, limits: AdapterLimits): string[] {
  const problems: string[] = [];
  const binding = bindingBytes(limits);
  const limitName = limits.maxStorageBufferBindingSize <= limits.maxBufferSize
    ? "maxStorageBufferBindingSize"
    : "maxBufferSize";
  // Gradients, moments and the reference's weights have the policy weights' shapes: not repeated.
  const mirrorsWeights = (i: PlanItem) =>
    i.what === "gradients" || i.what === "AdamW moments" ||
    (i.adapter === "reference" && i.what === "weights");
  for (const item of plan.items.filter((i) => !mirrorsWeights(i))) {
    if (item.weights) {
      const widest = item.tensors.reduce((a, b) =>
        weightRowBytes(b.shape) > weightRowBytes(a.shape) ? b : a
      );
      if (weightSliceRows(widest.shape, binding) === 0) {
        problems.push(
          `${item.adapter} weights: one row of ${widest.name} (${
            formatBytes(weightRowBytes(widest.shape))
          }) is over one storage binding (${limitName} ${formatBytes(binding)})`,
        );
      }
      continue;
    }
    const bound = item.tensors.reduce((a, b) =>
      tensorBytes(boundPart(b)) > tensorBytes(boundPart(a)) ? b : a
    );
    if (tensorBytes(boundPart(bound)) > binding) {
      const what = bound.rowChunks
        ? `${CHUNK_ALIGN} rows (${formatBytes(tensorBytes(boundPart(bound)))}) of ${bound.name} ` +
          `[${bound.shape.join(", ")}]`
        : describeTensor(bound);
      problems.push(
        `${item.adapter} ${item.what}: ${what} is over one storage binding ` +
          `(${limitName} ${formatBytes(binding)})`,
      );
    }
    const chunked = item.tensors.find((t) => t.rowChunks && tensorBytes(t) > limits.maxBufferSize);
    if (chunked) {
      problems.push(
        `${item.adapter} ${item.what}: ${describeTensor(chunked)} is over one buffer ` +
          `(maxBufferSize ${formatBytes(limits.maxBufferSize)})`,
      );
    }
  }
  if (limits.memory === null) return problems;
  const memory = formatBytes(limits.memory);
  if (plan.referenceShared && plan.referenceBytes > 0) {
    const both = plan.policyBytes + plan.referenceBytes;
    if (both > limits.memory) {
      problems.push(
        `the policy and reference need ${formatBytes(both)} of the adapter's ${memory}`,
      );
    }
    return problems;
  }
  if (plan.policyBytes > limits.memory) {
    problems.push(`the policy needs ${formatBytes(plan.policyBytes)} of the adapter's ${memory}`);
  }
  if (plan.referenceBytes > limits.memory) {
    problems.push(
      `the reference needs ${formatBytes(plan.referenceBytes)} of its adapter's ${memory} ` +
        "(the same memory assumed)",
    );
  }
  return problems;
}

/**
 * Settings `advise` may lower, from the one that matters least to learning to the most (none:
 * prompts_per_generation, when set, changes only speed).
 */
const KNOBS = [
  "prompts_per_generation",
  "micro_batch_size",
  "prompts_per_step",
  "max_completion_length",
] as const;

/**
 * What to change so the plan fits: each single setting that suffices, lowered as little as
 * possible; else a combination; else what no setting can change.
 */
export function advise(
  cfg: TrainConfig,
  model: ModelConfig,
  limits: AdapterLimits,
  referenceShared = referenceSharesAdapter(cfg),
  referenceMovable = true,
  checkpointDtype: PlanDType = "f32",
): string[] {
  const fits = (c: TrainConfig, shared: boolean) =>
    planProblems(planMemory(c, model, shared, checkpointDtype, bindingBytes(limits)), limits)
      .length === 0;
  /** The largest value of `knob` below the current one that fits, or null. */
  const lower = (c: TrainConfig, knob: typeof KNOBS[number], shared: boolean) => {
    const now = c[knob];
    if (now === null) return null; // prompts_per_generation unset: it follows prompts_per_step
    let lo = 0, hi = now - 1; // the answer is in [lo, hi]; 0 means none
    while (lo < hi) {
      const mid = Math.ceil((lo + hi) / 2);
      if (fits({ ...c, [knob]: mid }, shared)) lo = mid;
      else hi = mid - 1;
    }
    return lo > 0 ? lo : null;
  };
  const moveReference = referenceShared && referenceMovable && cfg.beta > 0;
  const advice: string[] = [];
  if (moveReference && fits(cfg, false)) {
    advice.push(
      "put the reference on a second adapter (reference.adapter: vulkan, gl, metal or dx12)",
    );
  }
  if (
    !cfg.gradient_checkpointing && fits({ ...cfg, gradient_checkpointing: true }, referenceShared)
  ) {
    advice.push("gradient_checkpointing: true");
  }
  for (const knob of KNOBS) {
    const value = lower(cfg, knob, referenceShared);
    if (value !== null) advice.push(`${knob} ${cfg[knob]} → ${value}`);
  }
  if (advice.length > 0) return [`Any one of these fits: ${advice.join("; ")}`];

  // No single setting suffices: keep the ones that matter most as high as possible, each
  // decided with those that matter less at their least.
  let shared = referenceShared;
  const changes: string[] = [];
  if (moveReference) {
    shared = false;
    changes.push("the reference on a second adapter");
  }
  // Checkpointing costs compute, not learning: on before any setting is lowered.
  if (!cfg.gradient_checkpointing) changes.push("gradient_checkpointing: true");
  const knobs = KNOBS.filter((k) => cfg[k] !== null);
  let c: TrainConfig = {
    ...cfg,
    gradient_checkpointing: true,
    ...Object.fromEntries(knobs.map((k) => [k, 1])),
  };
  for (const knob of [...knobs].reverse()) {
    c = { ...c, [knob]: cfg[knob] };
    if (!fits(c, shared)) c = { ...c, [knob]: lower(c, knob, shared) ?? 1 };
  }
  changes.push(...knobs.filter((k) => c[k]! < cfg[k]!).map((k) => `${k} ${cfg[k]} → ${c[k]}`));
  if (fits(c, shared)) return [`These together fit: ${changes.join(", ")}`];

  // What is left does not depend on the settings: the model's own tensors.
  const plan = planMemory(c, model, shared, checkpointDtype, bindingBytes(limits));
  const left: string[] = [];
  const fixed = plan.items.filter((i) =>
    i.adapter === "policy" && [
      "weights",
      "gradients",
      "AdamW moments",
      "LoRA adapters",
      "LoRA gradients",
      "LoRA AdamW moments",
    ].includes(i.what)
  ).reduce((a, i) => a + i.bytes, 0);
  const needed = shared
    ? plan.policyBytes + plan.referenceBytes
    : Math.max(plan.policyBytes, plan.referenceBytes);
  if (limits.memory !== null && fixed > limits.memory) {
    left.push(
      `The weights, gradients and AdamW moments alone need ${formatBytes(fixed)} of ` +
        `${formatBytes(limits.memory)}: use a smaller model or an adapter with more memory`,
    );
  } else if (limits.memory !== null && needed > limits.memory) {
    left.push(
      `Even with ${changes.join(", ")}, an adapter needs ${formatBytes(needed)} of ` +
        `${formatBytes(limits.memory)}: use a smaller model or an adapter with more memory`,
    );
  }
  if (left.length === 0) left.push(`Even with ${changes.join(", ")}, it does not fit`);
  return left;
}

/**
 * Refuse a run that cannot fit the adapter, with what to change; returns the plan otherwise.
 * `referenceShared` says where the reference runs when the caller knows.
 */
export function checkPlan(
  cfg: TrainConfig,
  model: ModelConfig,
  limits: AdapterLimits,
  referenceShared = referenceSharesAdapter(cfg),
  checkpointDtype: PlanDType = "f32",
): Plan {
  const plan = planMemory(cfg, model, referenceShared, checkpointDtype, bindingBytes(limits));
  const problems = planProblems(plan, limits);
  if (problems.length > 0) {
    const advice = advise(cfg, model, limits, referenceShared, false, checkpointDtype);
    throw new AhaError(
      `this run does not fit the adapter "${limits.description}": ${problems.join("; ")}. ` +
        `${advice.join(". ")}. ("aha plan CONFIG" shows the whole estimate.)`,
    );
  }
  return plan;
}

/**
 * What a run's process holds on a software adapter (whose memory is the machine's RAM) beside its
 * plan's buffers: the program (Deno, Mesa and the kernels it compiled) and the texture copies of
 * weights made per use when no kept copy has room for them, up to twice the largest weight (a
 * training step reads each weight in the forward's product and in the backward's). Measured on
 * llvmpipe beyond the buffers and the kept copies: 1.2 GiB in a 0.5B LoRA run, 2.9 GiB in a 7B
 * model's scoring (lm_head alone is 1.0 GiB in bf16), 3.6 GiB in a 7B LoRA step.
 */
export const SOFTWARE_PROGRAM_BYTES = 2 * 2 ** 30;

export function softwareOverheadBytes(
  cfg: TrainConfig,
  model: ModelConfig,
  checkpointDtype: PlanDType,
): number {
  const frozen = frozenStorage(cfg, checkpointDtype);
  const weights = [...weightShapes(model)].map(([name, shape]) =>
    cfg.lora === null ? { name, shape } : frozenTensor(name, shape, frozen)
  );
  return SOFTWARE_PROGRAM_BYTES + 2 * Math.max(...weights.map(tensorBytes));
}

/** A software adapter's limits for its plan: its memory less softwareOverheadBytes. */
export function softwareLimits(limits: AdapterLimits, overhead: number): AdapterLimits {
  return {
    ...limits,
    memory: limits.memory === null ? null : Math.max(0, limits.memory - overhead),
  };
}

/**
 * What a run leaves of a software adapter's memory (the machine's RAM less the program's share:
 * softwareLimits) for the texture copies its kernels keep (gpu/kept_textures.ts), an eighth of it
 * kept back as the copies' own rule does (memoryBudget), per process that keeps them: the trainer,
 * and a reference worker when one runs, which gets the other half (a LoRA run whose reference is
 * its base runs it in the trainer). \`aha train\` hands this to both through
 * AHA_KEPT_TEXTURE_BYTES, so a run the plan admits still fits with its copies. Without the eighth,
 * a 7B LoRA step on a 24 GB machine was killed for want of memory with 4.4 GiB of copies.
 */
export function keptCopyBytes(plan: Plan, memory: number, cfg: TrainConfig): number {
  const free = memory * 7 / 8 - plan.policyBytes - plan.referenceBytes;
  return Math.max(0, Math.floor(free / (referenceWorker(cfg) ? 2 : 1)));
}

/**
 * Whether the reference runs in a worker process of its own (reference/): a LoRA run's reference
 * is its base in the trainer unless reference.adapter names another backend.
 */
export function referenceWorker(cfg: TrainConfig): boolean {
  return cfg.beta > 0 && !referenceSharesBase(cfg);
}

export function formatBytes(bytes: number): string {
  if (bytes >= 2 ** 30) return `${(bytes / 2 ** 30).toFixed(2)} GiB`;
  if (bytes >= 2 ** 20) return `${(bytes / 2 ** 20).toFixed(1)} MiB`;
  return `${(bytes / 2 ** 10).toFixed(1)} KiB`;
}

// ---------------------------------------------------------------------------------------------
// Model shapes without the weights.

/** The Qwen2.5 shapes (base and Instruct alike), as their config.json files give them. */
const QWEN25_SHAPES: Record<string, Record<string, unknown>> = {
  "0.5b": qwen25(896, 4864, 24, 14, 2, 151936, true),
  "1.5b": qwen25(1536, 8960, 28, 12, 2, 151936, true),
  "3b": qwen25(2048, 11008, 36, 16, 2, 151936, true),
  "7b": qwen25(3584, 18944, 28, 28, 4, 152064, false),
};

function qwen25(
  hidden: number,
  intermediate: number,
  layers: number,
  heads: number,
  kvHeads: number,
  vocab: number,
  tied: boolean,
): Record<string, unknown> {
  return {
    model_type: "qwen2",
    hidden_size: hidden,
    intermediate_size: intermediate,
    num_hidden_layers: layers,
    num_attention_heads: heads,
    num_key_value_heads: kvHeads,
    vocab_size: vocab,
    tie_word_embeddings: tied,
    rms_norm_eps: 1e-6,
    rope_theta: 1000000,
  };
}

/** The built-in shape for a model directory named like "Qwen2.5-7B" or "Qwen2.5-0.5B-Instruct". */
export function builtinShape(modelPath: string): Record<string, unknown> | null {
  const name = modelPath.replace(/\/+$/, "").split("/").at(-1) ?? "";
  const size = name.match(/qwen2\.5-(0\.5b|1\.5b|3b|7b)(?![\d.])/i)?.[1].toLowerCase();
  return size === undefined ? null : QWEN25_SHAPES[size];
}

/**
 * The model's shape for a plan: a stated config.json, else MODEL/config.json, else the built-in
 * Qwen2.5 table; the embedded default's tiny model has the built-in task's vocabulary.
 */
export async function planModel(
  cfg: TrainConfig,
  builtinVocabSize: number,
  modelConfigFile?: string,
): Promise<{ config: ModelConfig; source: string; dtype: PlanDType }> {
  const file = modelConfigFile ?? (cfg.model === null ? null : `${cfg.model}/config.json`);
  const text = file === null ? null : await Deno.readTextFile(file).catch((e) => {
    if (e instanceof Deno.errors.NotFound && modelConfigFile === undefined) return null;
    throw new AhaError(`${file}: cannot read: ${(e as Error).message}`);
  });
  if (file !== null && text !== null) {
    let json: unknown;
    try {
      json = JSON.parse(text);
    } catch {
      throw new AhaError(`${file}: not valid JSON`);
    }
    return { config: parseModelConfig(json, file), source: file, dtype: torchDtype(json) };
  }
  if (cfg.model === null) {
    return {
      config: parseModelConfig({ ...PRESETS.tiny, vocab_size: builtinVocabSize }),
      source: "the built-in tiny model",
      dtype: "f32",
    };
  }
  const shape = builtinShape(cfg.model);
  if (shape === null) {
    throw new AhaError(
      `${cfg.model}/config.json: not found, and the name is not one of the built-in Qwen2.5 ` +
        `shapes (0.5B, 1.5B, 3B, 7B): give "model" a directory with its config.json ` +
        `(aha plan also takes --model-config FILE)`,
    );
  }
  // The published Qwen2.5 checkpoints are BF16.
  return {
    config: parseModelConfig(shape),
    source: `the built-in Qwen2.5 table (no ${file})`,
    dtype: "bf16",
  };
}
