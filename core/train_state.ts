// Training checkpoints: a Hugging Face model directory (config.json, model.safetensors, the
// tokenizer files) plus what an exact resume needs — the AdamW moments (optimizer.safetensors)
// and the trainer state (trainer_state.json: step, optimizer step count, data position, the
// reference model), with the resolved config beside them (train_config.yaml, which --resume
// reads back). Written to a temporary directory and renamed into place.
//
// A LoRA run's checkpoint is a PEFT adapter directory instead of a model (adapter_config.json,
// adapter_model.safetensors; never the frozen base weights), with the same tokenizer files,
// trainer state and config; its moments are keyed by the adapter's PEFT tensor names and
// trainer_state.json's reference_model names the base it adapts.

import {
  type Checkpoint,
  isReader,
  loadCheckpoint,
  partsOf,
  saveCheckpoint,
  type TensorReader,
  tensorsOnDemand,
} from "./checkpoint.ts";
import { AhaError } from "./errors.ts";
import { type Adapter, isAdapterDir, loadAdapter, loraShapes, saveAdapter } from "./lora.ts";
import { type ModelConfig, weightShapes } from "./model_config.ts";
import { writeSafetensors } from "./safetensors.ts";
import type { FileContent } from "./save_dir.ts";
import type { SamplerState } from "./task.ts";
import type { TrainConfig } from "./train_config.ts";
import YAML from "yaml";

/** The resolved training config inside a checkpoint; `aha train --resume DIR` reads it. */
export const CONFIG_FILE = "train_config.yaml";

/** A checkpoint's trainer state (step, optimizer steps, data position, reference model). */
export const TRAINER_STATE_FILE = "trainer_state.json";

/** A checkpoint's AdamW moments. */
const OPTIMIZER_FILE = "optimizer.safetensors";

/** In a checkpoint of a sync_ref_model run: the reference weights as last synced. */
export const SYNCED_REFERENCE_FILE = "reference.safetensors";

/** In the built-in base model's directory: the settings it was pretrained with. */
export const PRETRAINING_FILE = "pretraining.json";

/**
 * A model directory's files that say how its weights were trained rather than what the model is:
 * a training checkpoint's state, and the built-in base's recipe. A model made from it (aha sft)
 * leaves them behind: it is not that checkpoint, to resume or to reuse as that base.
 */
export const TRAINING_STATE_FILES = [
  TRAINER_STATE_FILE,
  OPTIMIZER_FILE,
  CONFIG_FILE,
  SYNCED_REFERENCE_FILE,
  PRETRAINING_FILE,
];

export interface TrainerState {
  /** GRPO steps completed. */
  step: number;
  /** AdamW steps taken (bias correction continues from here). */
  adam_step: number;
  sampler: SamplerState;
  /** Directory of the reference model's weights. */
  reference_model: string;
}

/** A training checkpoint: the model to continue (for a LoRA run, its base) and its adapter. */
export interface TrainingCheckpoint extends Checkpoint {
  state: TrainerState;
  /** The AdamW moments, read from optimizer.safetensors at each `get` (WeightsOnDemand). */
  moments: ReadonlyMap<string, Float32Array>;
  adapter: Adapter | null;
}

/** What every training checkpoint holds beside its weights; the moments are written one tensor
 * at a time as they are read (full fine-tuning's are 8 bytes a parameter). */
function stateFiles(
  moments: ReadonlyMap<string, Float32Array> | TensorReader,
  state: TrainerState,
  config: TrainConfig,
): Record<string, FileContent> {
  const sizes = isReader(moments)
    ? moments.sizes
    : new Map([...moments].map(([name, data]) => [name, data.length]));
  const read = isReader(moments)
    ? (name: string) => moments.read(name)
    : (name: string) => partsOf(moments, name);
  const optimizer = new Map<string, { shape: number[]; data: () => AsyncIterable<Float32Array> }>();
  for (const [name, size] of sizes) optimizer.set(name, { shape: [size], data: () => read(name) });
  return {
    [OPTIMIZER_FILE]: (path) => writeSafetensors(path, optimizer),
    [TRAINER_STATE_FILE]: JSON.stringify(state, null, 2) + "\n",
    [CONFIG_FILE]: YAML.stringify(config),
  };
}

export async function saveTrainingCheckpoint(
  dir: string,
  hfConfig: Record<string, unknown>,
  weights: ReadonlyMap<string, Float32Array> | TensorReader,
  moments: ReadonlyMap<string, Float32Array> | TensorReader,
  state: TrainerState,
  config: TrainConfig,
  extraFiles: Record<string, FileContent> = {},
): Promise<void> {
  await saveCheckpoint(dir, hfConfig, weights, {
    ...extraFiles,
    ...stateFiles(moments, state, config),
  });
}

/** A LoRA run's checkpoint: the adapter (PEFT files), its moments and the trainer state. */
export async function saveAdapterTrainingCheckpoint(
  dir: string,
  adapter: Adapter,
  modelConfig: ModelConfig,
  moments: ReadonlyMap<string, Float32Array> | TensorReader,
  state: TrainerState,
  config: TrainConfig,
  extraFiles: Record<string, FileContent> = {},
): Promise<void> {
  await saveAdapter(dir, adapter, modelConfig, state.reference_model, {
    ...extraFiles,
    ...stateFiles(moments, state, config),
  });
}

/** Every field of a trainer state, with its type and range; a problem is one AhaError line. */
export function parseTrainerState(json: unknown, path: string): TrainerState {
  if (typeof json !== "object" || json === null || Array.isArray(json)) {
    throw new AhaError(`${path}: expected a JSON object`);
  }
  const raw = json as Record<string, unknown>;
  const fail = (field: string, expect: string, got: unknown): never => {
    throw new AhaError(
      `${path}: field "${field}" must be ${expect}, got ${JSON.stringify(got) ?? "nothing"}`,
    );
  };
  const count = (v: unknown) => Number.isSafeInteger(v) && (v as number) >= 0;
  if (!count(raw.step)) fail("step", "an integer ≥ 0", raw.step);
  if (!count(raw.adam_step)) fail("adam_step", "an integer ≥ 0", raw.adam_step);
  const sampler = raw.sampler as Record<string, unknown> | undefined;
  if (typeof sampler !== "object" || sampler === null || Array.isArray(sampler)) {
    fail("sampler", "an object {epoch, position, rng}", sampler);
  }
  if (!count(sampler!.epoch)) fail("sampler.epoch", "an integer ≥ 0", sampler!.epoch);
  if (!count(sampler!.position)) fail("sampler.position", "an integer ≥ 0", sampler!.position);
  const rng = sampler!.rng;
  if (typeof rng !== "string" || !/^[0-9a-f]{32}$/.test(rng) || /^0{32}$/.test(rng)) {
    fail("sampler.rng", "32 hex digits, not all zero", rng);
  }
  if (typeof raw.reference_model !== "string" || raw.reference_model === "") {
    fail("reference_model", "a model directory", raw.reference_model);
  }
  return {
    ...raw,
    step: raw.step as number,
    adam_step: raw.adam_step as number,
    sampler: { epoch: sampler!.epoch, position: sampler!.position, rng } as SamplerState,
    reference_model: raw.reference_model as string,
  };
}

/**
 * The AdamW moments of `optimizer.safetensors` checked against the model: only
 * `<weight>.exp_avg` / `<weight>.exp_avg_sq` of the model's weights, each with the weight's
 * element count, finite; after any optimizer step (adam_step > 0) every weight has both.
 */
export function checkMoments(
  moments: ReadonlyMap<string, Float32Array>,
  shapes: Map<string, number[]>,
  adamStep: number,
  path: string,
): void {
  for (const [name, data] of moments) {
    const m = name.match(/^(.*)\.(exp_avg|exp_avg_sq)$/);
    const shape = m ? shapes.get(m[1]) : undefined;
    if (!shape) {
      throw new AhaError(`${path}: tensor "${name}" is not a moment of any weight of this model`);
    }
    const size = shape.reduce((a, b) => a * b, 1);
    if (data.length !== size) {
      throw new AhaError(
        `${path}: tensor "${name}" has ${data.length} values, expected ${size} ` +
          `(weight shape [${shape.join(", ")}]): not this model's optimizer state`,
      );
    }
    const bad = data.findIndex((x) => !Number.isFinite(x));
    if (bad >= 0) {
      throw new AhaError(`${path}: tensor "${name}" holds ${data[bad]} at index ${bad}`);
    }
  }
  if (adamStep > 0) {
    for (const name of shapes.keys()) {
      for (const kind of ["exp_avg", "exp_avg_sq"]) {
        if (!moments.has(`${name}.${kind}`)) {
          throw new AhaError(
            `${path}: missing tensor "${name}.${kind}" (adam_step is ${adamStep}, so every ` +
              `weight has moments)`,
          );
        }
      }
    }
  }
}

/**
 * Loads and checks a whole training checkpoint (weights, trainer state, optimizer moments)
 * before anything is changed on disk. `where` maps the paths the trainer state names (the
 * reference model, which a LoRA checkpoint's base is) to where they are now: a run directory
 * may have moved since it was saved.
 */
export async function loadTrainingCheckpoint(
  dir: string,
  where: (path: string) => string = (path) => path,
): Promise<TrainingCheckpoint> {
  const statePath = `${dir}/${TRAINER_STATE_FILE}`;
  let text: string;
  try {
    text = await Deno.readTextFile(statePath);
  } catch (e) {
    throw new AhaError(
      `${statePath}: ${
        e instanceof Deno.errors.NotFound
          ? "missing: not a training checkpoint (resume from a checkpoint-N directory)"
          : `cannot read (${(e as Error).message})`
      }`,
    );
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch {
    throw new AhaError(`${statePath}: not valid JSON`);
  }
  const state = parseTrainerState(json, statePath);
  state.reference_model = where(state.reference_model);
  const optimizerPath = `${dir}/${OPTIMIZER_FILE}`;
  // Read from the file when asked for, never whole: full fine-tuning's are 8 bytes a parameter,
  // and a map of them, cleared once on the GPU, stayed allocated until V8 next collected.
  const moments = await tensorsOnDemand(optimizerPath);
  if (await isAdapterDir(dir)) {
    // A LoRA checkpoint: the base it adapts, and the adapter itself.
    const base = await loadCheckpoint(state.reference_model);
    const adapter = await loadAdapter(dir, base.config);
    checkMoments(moments, loraShapes(base.config, adapter.lora), state.adam_step, optimizerPath);
    return { ...base, state, moments, adapter };
  }
  const checkpoint = await loadCheckpoint(dir);
  checkMoments(moments, weightShapes(checkpoint.config), state.adam_step, optimizerPath);
  return { ...checkpoint, state, moments, adapter: null };
}
