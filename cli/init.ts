// `aha init`: write a freshly initialised Qwen2 checkpoint in Hugging Face format.

import { intOption, parseCommandArgs, required } from "./args.ts";
import { saveCheckpoint } from "../core/checkpoint.ts";
import { AhaError, UsageError } from "../core/errors.ts";
import { initWeights } from "../core/init.ts";
import { parameterCount, parseModelConfig, PRESETS, toHfConfig } from "../core/model_config.ts";

export const help = `usage: aha init --preset NAME --out DIR [--seed N] [--config FILE] [--force]

Writes a Qwen2 checkpoint with freshly initialised weights (config.json + model.safetensors,
loadable by transformers) into DIR.

  --preset NAME   model shape: ${Object.keys(PRESETS).join(" or ")}
  --config FILE   JSON object of Hugging Face config.json fields that override the preset's
                  (without --preset it must give the whole shape)
  --out DIR       where to write; refused if it exists and is not empty
  --seed N        random seed for the weights (default 0)
  --force         replace DIR and everything in it`;

async function readConfigOverrides(file: string): Promise<Record<string, unknown>> {
  let json: unknown;
  try {
    json = JSON.parse(await Deno.readTextFile(file));
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) throw new AhaError(`${file}: file not found`);
    throw new AhaError(`${file}: not valid JSON (${(e as Error).message.split("\n")[0]})`);
  }
  if (typeof json !== "object" || json === null || Array.isArray(json)) {
    throw new AhaError(`${file}: expected a JSON object of config.json fields`);
  }
  return json as Record<string, unknown>;
}

async function isMissingOrEmpty(dir: string): Promise<boolean> {
  try {
    for await (const _ of Deno.readDir(dir)) return false;
    return true;
  } catch (e) {
    return e instanceof Deno.errors.NotFound;
  }
}

export async function run(args: string[]): Promise<void> {
  const { values } = parseCommandArgs("init", args, {
    preset: { type: "string" },
    config: { type: "string" },
    out: { type: "string" },
    seed: { type: "string" },
    force: { type: "boolean" },
  });
  const out = required("init", "out", values.out);
  const seed = intOption("init", "seed", values.seed, 0);
  const { preset, config: configFile } = values;
  if (preset === undefined && configFile === undefined) {
    throw new UsageError(`init: missing --preset or --config (see "aha init --help")`);
  }
  if (preset !== undefined && !Object.hasOwn(PRESETS, preset)) {
    throw new UsageError(
      `init: unknown preset "${preset}" (available: ${Object.keys(PRESETS).join(", ")})`,
    );
  }
  const overrides = configFile === undefined ? {} : await readConfigOverrides(configFile);
  const fields = { ...(preset === undefined ? {} : PRESETS[preset]), ...overrides };
  const config = parseModelConfig(fields, configFile ?? `preset "${preset}"`);
  // Held whole in memory as f32 while written: refuse what cannot be, before allocating.
  const bytes = parameterCount(config) * 4, total = Deno.systemMemoryInfo().total;
  if (bytes > total) {
    throw new AhaError(
      `init: ${configFile ?? `preset "${preset}"`} describes ${parameterCount(config)} ` +
        `parameters (${(bytes / 2 ** 30).toFixed(1)} GiB in f32), more than this machine's ` +
        `${(total / 2 ** 30).toFixed(1)} GiB of memory`,
    );
  }
  if (!values.force && !(await isMissingOrEmpty(out))) {
    throw new AhaError(`init: ${out} exists and is not empty (use --force to replace it)`);
  }
  await saveCheckpoint(out, { ...toHfConfig(config), ...overrides }, initWeights(config, seed));
  console.log(
    `wrote ${out}: Qwen2 with ${parameterCount(config)} parameters (${config.numLayers} layers, ` +
      `hidden ${config.hiddenSize}, vocab ${config.vocabSize}, seed ${seed})`,
  );
}
