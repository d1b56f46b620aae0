// Training checkpoints: a Hugging Face model directory (config.json, model.safetensors, the
// tokenizer files) plus what an exact resume needs — the AdamW moments (optimizer.safetensors)
// and the trainer state (trainer_state.json: step, optimizer step count, data position, the
// reference model), with the resolved config beside them (train_config.yaml, which --resume
// reads back). Written to a temporary directory and renamed into place.

import { type Checkpoint, loadCheckpoint, saveCheckpoint } from "./checkpoint.ts";
import { AhaError } from "./errors.ts";
import { weightShapes } from "./model_config.ts";
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
  moments: Map<string, Float32Array>,
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

/** Loads and checks a whole training checkpoint (weights, trainer state, optimizer moments)
 * before anything is changed on disk. */
export async function loadTrainingCheckpoint(dir: string): Promise<TrainingCheckpoint> {
  const statePath = `${dir}/trainer_state.json`;
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
  const checkpoint = await loadCheckpoint(dir);
  const optimizerPath = `${dir}/optimizer.safetensors`;
  const moments = new Map<string, Float32Array>();
  for (const [name, t] of await readSafetensors(optimizerPath)) moments.set(name, t.data);
  checkMoments(moments, weightShapes(checkpoint.config), state.adam_step, optimizerPath);
  return { ...checkpoint, state, moments };
}
