// Training checkpoints: a Hugging Face model directory (config.json, model.safetensors, the
// tokenizer files) plus what an exact resume needs — the AdamW moments (optimizer.safetensors)
// and the trainer state (trainer_state.json: step, optimizer step count, data position, the
// reference model), with the resolved config beside them (train_config.yaml, which --resume
// reads back). Written to a temporary directory and renamed into place.

import { type Checkpoint, loadCheckpoint, saveCheckpoint } from "./checkpoint.ts";
import { AhaError } from "./errors.ts";
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

export interface TrainingCheckpoint extends Checkpoint {
  state: TrainerState;
  moments: Map<string, Float32Array>;
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
  const optimizer = new Map(
    [...moments].map(([name, data]) => [name, { shape: [data.length], data }]),
  );
  await saveCheckpoint(dir, hfConfig, weights, {
    ...extraFiles,
    "optimizer.safetensors": encodeSafetensors(optimizer),
    "trainer_state.json": JSON.stringify(state, null, 2) + "\n",
    [CONFIG_FILE]: YAML.stringify(config),
  });
}

export async function loadTrainingCheckpoint(dir: string): Promise<TrainingCheckpoint> {
  const checkpoint = await loadCheckpoint(dir);
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
  return { ...checkpoint, state, moments };
}
