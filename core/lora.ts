// LoRA adapters with PEFT's semantics and files. A targeted projection W [out, in] gains two
// small trained matrices, A [r, in] and B [out, r], and computes y = x·Wᵀ (+ b) + s·(x·Aᵀ)·Bᵀ
// with s = alpha / r (alpha / √r with use_rslora); W stays frozen. PEFT initialises A
// Kaiming-uniform (a = √5, i.e. U(−1/√in, 1/√in)) and B to zero, so an untrained adapter leaves
// the model exactly as it was.
//
// This file owns everything about adapters that needs no device: the tensor names PEFT uses
// (`base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`), their shapes and
// initialisation, the adapter directory (adapter_config.json + adapter_model.safetensors), its
// validation against a base model, and merging W + s·B·A for a plain checkpoint.

import { readJson, WeightsOnDemand } from "./checkpoint.ts";
import { type FileContent, writeDirectory, writeFiles } from "./save_dir.ts";
import { AhaError } from "./errors.ts";
import type { ModelConfig } from "./model_config.ts";
import type { Rng } from "./rng.ts";
import { encodeSafetensors, readSafetensors, readSafetensorsHeader } from "./safetensors.ts";
import {
  LORA_TARGETS,
  type LoraConfig,
  type LoraTarget,
  type TrainConfig,
} from "./train_config.ts";

export const ADAPTER_CONFIG_FILE = "adapter_config.json";
export const ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors";

/** The scale s of the update: alpha / r, or alpha / √r with use_rslora (rank-stabilised). */
export function loraScale(lora: LoraConfig): number {
  return lora.use_rslora ? lora.alpha / Math.sqrt(lora.r) : lora.alpha / lora.r;
}

/** One adapted projection: its module path in the base model and its shapes. */
export interface LoraModule {
  /** e.g. "model.layers.0.self_attn.q_proj" (its weight is `${module}.weight`). */
  module: string;
  inFeatures: number;
  outFeatures: number;
  /** PEFT's tensor names of A [r, in] and B [out, r]. */
  a: string;
  b: string;
}

/** The PEFT name of a module's A or B matrix. */
export function peftName(module: string, matrix: "A" | "B"): string {
  return `base_model.model.${module}.lora_${matrix}.weight`;
}

const ATTENTION_TARGETS: readonly LoraTarget[] = ["q_proj", "k_proj", "v_proj", "o_proj"];

/** e.g. model.layers.3.self_attn.q_proj, model.layers.3.mlp.down_proj. */
const modulePath = (layer: number, target: LoraTarget) =>
  `model.layers.${layer}.${ATTENTION_TARGETS.includes(target) ? "self_attn" : "mlp"}.${target}`;

/** The adapted projections of a model, layer by layer, targets in LORA_TARGETS order. */
export function loraModules(config: ModelConfig, lora: LoraConfig): LoraModule[] {
  const H = config.hiddenSize, I = config.intermediateSize;
  const q = config.numHeads * config.headDim, kv = config.numKvHeads * config.headDim;
  const shapes: Record<LoraTarget, [number, number]> = {
    q_proj: [H, q],
    k_proj: [H, kv],
    v_proj: [H, kv],
    o_proj: [q, H],
    gate_proj: [H, I],
    up_proj: [H, I],
    down_proj: [I, H],
  };
  const modules: LoraModule[] = [];
  for (let layer = 0; layer < config.numLayers; layer++) {
    for (const target of LORA_TARGETS) {
      if (!lora.target_modules.includes(target)) continue;
      const module = modulePath(layer, target);
      const [inFeatures, outFeatures] = shapes[target];
      modules.push({
        module,
        inFeatures,
        outFeatures,
        a: peftName(module, "A"),
        b: peftName(module, "B"),
      });
    }
  }
  return modules;
}

/** Every adapter tensor's PEFT name and shape, in the order files list them. */
export function loraShapes(config: ModelConfig, lora: LoraConfig): Map<string, number[]> {
  const shapes = new Map<string, number[]>();
  for (const m of loraModules(config, lora)) {
    shapes.set(m.a, [lora.r, m.inFeatures]);
    shapes.set(m.b, [m.outFeatures, lora.r]);
  }
  return shapes;
}

/** The number of trained parameters of an adapter. */
export function loraParameterCount(config: ModelConfig, lora: LoraConfig): number {
  let n = 0;
  for (const shape of loraShapes(config, lora).values()) n += shape[0] * shape[1];
  return n;
}

/** PEFT's initialisation from `rng`: A ~ U(−1/√in, 1/√in) (Kaiming-uniform, a = √5), B = 0. */
export function initLora(
  config: ModelConfig,
  lora: LoraConfig,
  rng: Rng,
): Map<string, Float32Array> {
  const tensors = new Map<string, Float32Array>();
  for (const m of loraModules(config, lora)) {
    const bound = 1 / Math.sqrt(m.inFeatures);
    tensors.set(
      m.a,
      Float32Array.from({ length: lora.r * m.inFeatures }, () => (2 * rng.next() - 1) * bound),
    );
    tensors.set(m.b, new Float32Array(m.outFeatures * lora.r));
  }
  return tensors;
}

/** An adapter: its settings and its tensors by PEFT name. */
export interface Adapter {
  lora: LoraConfig;
  tensors: Map<string, Float32Array>;
}

/**
 * Whether the reference model of a run is the policy's own frozen base with the adapter
 * switched off, in the training process (no second copy of the weights): a LoRA run whose
 * reference would share the policy's adapter anyway — reference.adapter "same", or no second
 * adapter (`secondAdapter` false: by default, unless reference.adapter names a backend; auto
 * looks for none, which would be the same GPU again or the CPU) — with no reference syncing,
 * unless reference.engine asks for ONNX (auto does not: the shared base costs no second copy and
 * no process).
 */
export function referenceSharesBase(
  cfg: TrainConfig,
  secondAdapter = cfg.reference.adapter !== "auto" && cfg.reference.adapter !== "same",
): boolean {
  return cfg.lora !== null && cfg.beta > 0 && cfg.reference.engine !== "onnx" &&
    !cfg.sync_ref_model && (cfg.reference.adapter === "same" || !secondAdapter);
}

// ---------------------------------------------------------------------------------------------
// Adapter directories.

/** adapter_config.json as PEFT writes it for a LoRA adapter of a causal LM. */
export function adapterConfigJson(lora: LoraConfig, baseModel: string): Record<string, unknown> {
  return {
    peft_type: "LORA",
    task_type: "CAUSAL_LM",
    base_model_name_or_path: baseModel,
    r: lora.r,
    lora_alpha: lora.alpha,
    lora_dropout: 0,
    target_modules: [...lora.target_modules],
    use_rslora: lora.use_rslora,
    bias: "none",
    fan_in_fan_out: false,
    inference_mode: true,
    init_lora_weights: true,
    modules_to_save: null,
    layers_to_transform: null,
    use_dora: false,
    rank_pattern: {},
    alpha_pattern: {},
  };
}

/** The files of an adapter directory (adapter_config.json, adapter_model.safetensors). */
export function adapterFiles(
  adapter: Adapter,
  config: ModelConfig,
  baseModel: string,
): Record<string, Uint8Array | string> {
  const tensors = new Map<string, { shape: number[]; data: Float32Array }>();
  for (const [name, shape] of loraShapes(config, adapter.lora)) {
    tensors.set(name, { shape, data: adapter.tensors.get(name)! });
  }
  return {
    [ADAPTER_CONFIG_FILE]: JSON.stringify(adapterConfigJson(adapter.lora, baseModel), null, 2) +
      "\n",
    [ADAPTER_WEIGHTS_FILE]: encodeSafetensors(tensors, { format: "pt" }),
  };
}

/** Writes an adapter directory (plus `extraFiles`) through a temporary sibling. */
export async function saveAdapter(
  dir: string,
  adapter: Adapter,
  config: ModelConfig,
  baseModel: string,
  extraFiles: Record<string, FileContent> = {},
): Promise<void> {
  await writeDirectory(
    dir,
    (temporary) =>
      writeFiles(temporary, { ...adapterFiles(adapter, config, baseModel), ...extraFiles }),
  );
}

export const isAdapterDir = (dir: string) =>
  Deno.stat(`${dir}/${ADAPTER_CONFIG_FILE}`).then(() => true, () => false);

/** The LoRA settings of an adapter_config.json, refusing what aha does not implement. */
export function parseAdapterConfig(json: unknown, path: string): LoraConfig {
  const j = (typeof json === "object" && json !== null ? json : {}) as Record<string, unknown>;
  const fail = (field: string, expect: string): never => {
    throw new AhaError(
      `${path}: field "${field}" must be ${expect}, got ${JSON.stringify(j[field])}`,
    );
  };
  if (j.peft_type !== "LORA") fail("peft_type", `"LORA"`);
  if (!Number.isSafeInteger(j.r) || (j.r as number) < 1) fail("r", "an integer ≥ 1");
  if (typeof j.lora_alpha !== "number" || !(j.lora_alpha > 0)) {
    fail("lora_alpha", "a number > 0");
  }
  const targets = j.target_modules === "all-linear" ? [...LORA_TARGETS] : j.target_modules;
  if (!Array.isArray(targets) || targets.length === 0) {
    fail("target_modules", `"all-linear" or a list of ${LORA_TARGETS.join(" ")}`);
  }
  for (const t of targets as unknown[]) {
    if (!(LORA_TARGETS as readonly unknown[]).includes(t)) {
      throw new AhaError(
        `${path}: target module ${JSON.stringify(t)} is not a projection of a Qwen2 model ` +
          `(${LORA_TARGETS.join(" ")}): an adapter for another architecture?`,
      );
    }
  }
  const absentOr = (field: string, ok: (v: unknown) => boolean, expect: string) => {
    if (j[field] !== undefined && j[field] !== null && !ok(j[field])) fail(field, expect);
  };
  absentOr("use_rslora", (v) => typeof v === "boolean", "true or false");
  absentOr("bias", (v) => v === "none", `"none" (aha adapts weights only)`);
  absentOr("fan_in_fan_out", (v) => v === false, "false");
  absentOr("use_dora", (v) => v === false, "false (DoRA is not implemented)");
  absentOr("modules_to_save", (v) => Array.isArray(v) && v.length === 0, "null");
  absentOr("layers_to_transform", (v) => Array.isArray(v) && v.length === 0, "null");
  const empty = (v: unknown) => typeof v === "object" && Object.keys(v as object).length === 0;
  absentOr("rank_pattern", empty, "{} (per-module ranks are not implemented)");
  absentOr("alpha_pattern", empty, "{} (per-module alphas are not implemented)");
  return {
    r: j.r as number,
    alpha: j.lora_alpha as number,
    target_modules: LORA_TARGETS.filter((t) => (targets as string[]).includes(t)),
    use_rslora: j.use_rslora === true,
    dropout: 0,
  };
}

/**
 * Reads a PEFT LoRA adapter directory for a base model of `config`, checking every tensor's name
 * and shape before reading any data; every problem is one line naming the file and tensor.
 */
export async function loadAdapter(dir: string, config: ModelConfig): Promise<Adapter> {
  const configPath = `${dir}/${ADAPTER_CONFIG_FILE}`;
  if (!(await isAdapterDir(dir))) {
    throw new AhaError(`${dir}: no ${ADAPTER_CONFIG_FILE} (not a PEFT adapter directory)`);
  }
  const lora = parseAdapterConfig(await readJson(configPath), configPath);
  const file = `${dir}/${ADAPTER_WEIGHTS_FILE}`;
  if (!(await Deno.stat(file).then(() => true, () => false))) {
    throw new AhaError(`${dir}: no ${ADAPTER_WEIGHTS_FILE}`);
  }
  const { entries } = await readSafetensorsHeader(file);
  const shapes = loraShapes(config, lora);
  const shapeText = (s: number[]) => `[${s.join(", ")}]`;
  for (const [name, shape] of shapes) {
    const entry = entries.get(name);
    if (!entry) {
      throw new AhaError(
        `${file}: missing tensor "${name}" (expected shape ${shapeText(shape)} for the base ` +
          `model's ${config.numLayers} layers and targets ${lora.target_modules.join(" ")})`,
      );
    }
    if (shapeText(entry.shape) !== shapeText(shape)) {
      throw new AhaError(
        `${file}: tensor "${name}" has shape ${shapeText(entry.shape)}, expected ` +
          `${shapeText(shape)} from the base model's config.json and r ${lora.r}`,
      );
    }
  }
  for (const name of entries.keys()) {
    if (!shapes.has(name)) {
      throw new AhaError(
        `${file}: tensor "${name}" is not a LoRA matrix of this base model (layers ` +
          `0–${config.numLayers - 1}, targets ${lora.target_modules.join(" ")})`,
      );
    }
  }
  const read = await readSafetensors(file, [...shapes.keys()]);
  const tensors = new Map<string, Float32Array>();
  for (const name of shapes.keys()) tensors.set(name, read.get(name)!.data);
  return { lora, tensors };
}

// ---------------------------------------------------------------------------------------------
// Merging.

/**
 * The base weights with every adapted W replaced by W + s·B·A (summed in float64, stored f32);
 * other weights are passed through unchanged. Each is made when asked for (WeightsOnDemand), so
 * saving the merged model holds one weight at a time.
 */
export function mergeAdapter(
  config: ModelConfig,
  weights: ReadonlyMap<string, Float32Array>,
  adapter: Adapter,
): ReadonlyMap<string, Float32Array> {
  const s = loraScale(adapter.lora), r = adapter.lora.r;
  const targets = new Map(loraModules(config, adapter.lora).map((m) => [`${m.module}.weight`, m]));
  return new WeightsOnDemand([...weights.keys()], (name) => {
    const w = weights.get(name)!, m = targets.get(name);
    if (!m) return w;
    const a = adapter.tensors.get(m.a)!, b = adapter.tensors.get(m.b)!;
    const out = new Float32Array(w.length);
    const { inFeatures: nIn, outFeatures: nOut } = m;
    for (let o = 0; o < nOut; o++) {
      for (let i = 0; i < nIn; i++) {
        let delta = 0;
        for (let k = 0; k < r; k++) delta += b[o * r + k] * a[k * nIn + i];
        out[o * nIn + i] = w[o * nIn + i] + s * delta;
      }
    }
    return out;
  });
}
