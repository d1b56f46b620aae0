// `aha rewards`: score {"completion", "answer"} rows with the reward functions a config selects,
// one JSON line per row — the way to debug reward functions before training with them.

import { parse as parseYaml } from "yaml";
import { parseCommandArgs, required } from "./args.ts";
import { AhaError } from "../core/errors.ts";
import {
  DEFAULT_REWARDS,
  scoreCompletion,
  selectRewards,
  type WeightedReward,
} from "../core/rewards.ts";

export const help = `usage: aha rewards [--config CONFIG.yaml] --input FILE.jsonl

For each row {"completion": …, "answer": …} of FILE.jsonl (an optional "prompt" is passed on
to the reward functions), prints one JSON line with each reward function's score and their
weighted "total".

  --config CONFIG.yaml   a training config; only its reward_funcs and reward_weights are used
                         (default: ${DEFAULT_REWARDS.join(" and ")}, weights 1)
  --input FILE.jsonl     the rows to score`;

export async function run(args: string[]): Promise<void> {
  const { values } = parseCommandArgs("rewards", args, {
    config: { type: "string" },
    input: { type: "string" },
  });
  const input = required("rewards", "input", values.input);
  const rewards = values.config
    ? await rewardsOfConfig(values.config)
    : selectRewards(DEFAULT_REWARDS);
  let text: string;
  try {
    text = await Deno.readTextFile(input);
  } catch (e) {
    throw new AhaError(`${input}: cannot read: ${(e as Error).message}`);
  }
  const lines = text.split("\n");
  for (let i = 0; i < lines.length; i++) {
    if (lines[i].trim() === "") continue;
    const where = `${input}:${i + 1}`;
    let row;
    try {
      row = JSON.parse(lines[i]);
    } catch {
      throw new AhaError(`${where}: invalid JSON`);
    }
    const field = (name: string): string => {
      const v = row?.[name];
      if (typeof v === "string") return v;
      if (typeof v === "number") return String(v);
      throw new AhaError(`${where}: field "${name}" must be a string`);
    };
    const prompt = row?.prompt === undefined ? "" : field("prompt");
    const answer = field("answer");
    console.log(JSON.stringify(scoreCompletion(rewards, prompt, field("completion"), { answer })));
  }
}

/** The reward_funcs / reward_weights of a YAML config; its other keys are not read here. */
async function rewardsOfConfig(path: string): Promise<WeightedReward[]> {
  let config;
  try {
    config = parseYaml(await Deno.readTextFile(path)) ?? {};
  } catch (e) {
    throw new AhaError(`${path}: cannot read YAML: ${(e as Error).message.split("\n")[0]}`);
  }
  if (typeof config !== "object" || Array.isArray(config)) {
    throw new AhaError(`${path}: expected a mapping of config keys`);
  }
  const names = config.reward_funcs ?? DEFAULT_REWARDS;
  const weights = config.reward_weights;
  if (!Array.isArray(names) || !names.every((n) => typeof n === "string")) {
    throw new AhaError(`${path}: "reward_funcs" must be a list of names`);
  }
  if (weights !== undefined && (!Array.isArray(weights) || !weights.every(Number.isFinite))) {
    throw new AhaError(`${path}: "reward_weights" must be a list of numbers`);
  }
  try {
    return selectRewards(names, weights);
  } catch (e) {
    throw new AhaError(`${path}: ${(e as Error).message}`);
  }
}
