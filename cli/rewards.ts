// `aha rewards`: score {"completion", "answer"} rows with the reward functions a config selects
// (built-in or the user's own modules, called on the batch as training calls them), one JSON line
// per row — the way to debug reward functions before training with them.

import { parse as parseYaml } from "yaml";
import { parseCommandArgs, required } from "./args.ts";
import { AhaError } from "../core/errors.ts";
import {
  anchorRewardModules,
  DEFAULT_REWARDS,
  isRewardModule,
  loadRewardModule,
  type RewardErrors,
  rewardModuleName,
  scoreBatch,
  selectRewards,
  type ToScore,
  type WeightedReward,
} from "../core/rewards.ts";

export const help = `usage: aha rewards [--config CONFIG.yaml] --input FILE.jsonl

For each row {"completion": …, "answer": …} of FILE.jsonl, prints one JSON line with each reward
function's score and their weighted "total". An optional "prompt" and every other field of the
row are passed on as dataset columns; the rows go to the functions as one batch, the way training
calls them, so a user's reward module (reward_funcs: ./rewards/mine.ts#name) is debugged here.

  --config CONFIG.yaml   a training config; only its reward_funcs, reward_weights and
                         reward_errors are used (default: ${
  DEFAULT_REWARDS.join(" and ")
}, weights 1)
  --input FILE.jsonl     the rows to score`;

export async function run(args: string[]): Promise<void> {
  const { values } = parseCommandArgs("rewards", args, {
    config: { type: "string" },
    input: { type: "string" },
  });
  const input = required("rewards", "input", values.input);
  const { rewards, onError } = values.config
    ? await rewardsOfConfig(values.config)
    : { rewards: selectRewards(DEFAULT_REWARDS), onError: "fail" as const };
  let text: string;
  try {
    text = await Deno.readTextFile(input);
  } catch (e) {
    throw new AhaError(`${input}: cannot read: ${(e as Error).message}`);
  }
  const builtins = rewards.some((r) => !r.batch);
  const items: ToScore[] = [];
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
    if (typeof row !== "object" || row === null || Array.isArray(row)) {
      throw new AhaError(`${where}: expected a JSON object`);
    }
    const field = (name: string): string => {
      const v = row[name];
      if (typeof v === "string") return v;
      if (typeof v === "number") return String(v);
      throw new AhaError(`${where}: field "${name}" must be a string`);
    };
    const prompt = row.prompt === undefined ? "" : field("prompt");
    // The built-in rewards judge against "answer"; a user's functions read what they need.
    const answer = builtins || row.answer !== undefined ? field("answer") : "";
    const { completion: _c, prompt: _p, ...columns } = row;
    items.push({ prompt, completion: field("completion"), example: { answer, columns } });
  }
  const { scores } = await scoreBatch(rewards, items, onError);
  for (const score of scores) console.log(JSON.stringify(score));
}

/** The reward_funcs / reward_weights / reward_errors of a YAML config (modules relative to it);
 * its other keys are not read here. */
async function rewardsOfConfig(
  path: string,
): Promise<{ rewards: WeightedReward[]; onError: RewardErrors }> {
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
  const onError = config.reward_errors ?? "fail";
  if (!Array.isArray(names) || !names.every((n) => typeof n === "string")) {
    throw new AhaError(`${path}: "reward_funcs" must be a list of names`);
  }
  if (weights !== undefined && (!Array.isArray(weights) || !weights.every(Number.isFinite))) {
    throw new AhaError(`${path}: "reward_weights" must be a list of numbers`);
  }
  if (onError !== "fail" && onError !== "skip") {
    throw new AhaError(`${path}: "reward_errors" must be fail or skip`);
  }
  const dir = path.includes("/") ? path.slice(0, path.lastIndexOf("/")) || "/" : ".";
  const anchored = anchorRewardModules(names, dir);
  try {
    const builtins = selectRewards(
      anchored.filter((n) => !isRewardModule(n)),
      weights?.filter((_: number, i: number) => !isRewardModule(anchored[i])),
    );
    const rewards: WeightedReward[] = [];
    for (const [i, name] of anchored.entries()) {
      if (!isRewardModule(name)) {
        rewards.push(builtins.shift()!);
        continue;
      }
      const batch = await loadRewardModule(name);
      rewards.push({
        name: rewardModuleName(name),
        batch,
        source: name,
        weight: weights?.[i] ?? 1,
      });
    }
    return { rewards, onError };
  } catch (e) {
    if (e instanceof AhaError) throw e;
    throw new AhaError(`${path}: ${(e as Error).message}`);
  }
}
