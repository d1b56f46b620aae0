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

import { type Checkpoint, loadCheckpoint, saveCheckpoint } from "./checkpoint.ts";
import { AhaError } from "./errors.ts";
import { type Adapter, isAdapterDir, loadAdapter, saveAdapter } from "./lora.ts";
import type { ModelConfig } from "./model_config.ts";
import { encodeSafetensors, readSafetensors } from "./safetensors.ts";
import type { SamplerState } from "./task.ts";
import type { TrainConfig } from "./train_config.ts";
import YAML from "yaml";

/** The resolved training config inside a checkpoint; `aha train --resume DIR` reads it. */
export const CONFIG_FILE = "train_config.yaml";

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
  moments: Map<string, Float32Array>;
  adapter: Adapter | null;
}

/** What every training checkpoint holds beside its weights. */
function stateFiles(
  moments: Map<string, Float32Array>,
  state: TrainerState,
  config: TrainConfig,
): Record<string, Uint8Array | string> {
  const optimizer = new Map(
    [...moments].map(([name, data]) => [name, { shape: [data.length], data }]),
  );
  return {
    "optimizer.safetensors": encodeSafetensors(optimizer),
    "trainer_state.json": JSON.stringify(state, null, 2) + "\n",
    [CONFIG_FILE]: YAML.stringify(config),
  };
}

export async function saveTrainingCheckpoint(
  dir: string,
  hfConfig: Record<string, unknown>,
  weights: Map<string, Float32Array>,
  moments: Map<string, Float32Array>,
  state: TrainerState,
  config: TrainConfig,
  extraFiles: Record<string, Uint8Array | string> = {},
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
  moments: Map<string, Float32Array>,
  state: TrainerState,
  config: TrainConfig,
  extraFiles: Record<string, Uint8Array | string> = {},
): Promise<void> {
  await saveAdapter(dir, adapter, modelConfig, state.reference_model, {
    ...extraFiles,
    ...stateFiles(moments, state, config),
  });
}

export async function loadTrainingCheckpoint(dir: string): Promise<TrainingCheckpoint> {
  const statePath = `${dir}/trainer_state.json`;
  let state: TrainerState;
  try {
    state = JSON.parse(await Deno.readTextFile(statePath));
  } catch (e) {
    throw new AhaError(
      `${statePath}: ${
        e instanceof Deno.errors.NotFound
          ? "missing (not a training checkpoint?)"
          : "not valid JSON"
      }`,
    );
  }
  for (const key of ["step", "adam_step", "sampler", "reference_model"] as const) {
    if (state[key] === undefined) throw new AhaError(`${statePath}: field "${key}" is missing`);
  }
  const moments = new Map<string, Float32Array>();
  for (const [name, t] of await readSafetensors(`${dir}/optimizer.safetensors`)) {
    moments.set(name, t.data);
  }
  if (await isAdapterDir(dir)) {
    // A LoRA checkpoint: the base it adapts, and the adapter itself.
    const base = await loadCheckpoint(state.reference_model);
    return { ...base, state, moments, adapter: await loadAdapter(dir, base.config) };
  }
  return { ...await loadCheckpoint(dir), state, moments, adapter: null };
}
