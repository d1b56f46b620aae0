// `aha eval`: measure a model on a task's held-out prompts with the run's prompt template and
// rewards — the same evaluation `aha train` logs at eval_steps (core/evaluate.ts) — so a model
// is measured before and after training with one command each.

import { parseCommandArgs } from "./args.ts";
import { AhaError, UsageError } from "../core/errors.ts";
import { loadCheckpoint } from "../core/checkpoint.ts";
import { loadAdapter } from "../core/lora.ts";
import { type EvalRecord, evaluatePolicy } from "../core/evaluate.ts";
import { loadTrainConfig } from "../core/train_config.ts";
import { evalOptions } from "../core/trainer.ts";
import { resolveModel } from "../data/hub.ts";
import { configTask } from "../data/tasks.ts";
import { Gpu, modelNeeds } from "../gpu/device.ts";
import { GpuModel } from "../gpu/model.ts";
import { GpuPolicy } from "../gpu/policy.ts";

export const help =
  `usage: aha eval --model DIR|ID [CONFIG.yaml] [--set key=value ...] [--adapter DIR|ID]
                [--num-samples N] [--temperature T] [--limit N] [--out FILE.jsonl]

Measures a model on the held-out prompts of CONFIG's task (dataset.eval_path, dataset.eval_split
of a Hub dataset, else the eval_fraction split; the built-in arithmetic task without CONFIG),
with the config's prompt template and reward functions: greedy accuracy, format rate and mean
reward; with --num-samples N also pass@k (unbiased estimator, k = 1, 2, 4, ... N) and the mean
reward of the samples. Prints a summary table.

  --model DIR|ID     a checkpoint directory or a Hub id ORG/NAME[@revision] (default: the
                     config's model)
  --adapter DIR|ID   a PEFT LoRA adapter on top of the model
  --num-samples N    sampled completions per prompt besides the greedy one (default 0)
  --temperature T    for the samples (default: the config's temperature)
  --limit N          only the first N held-out prompts (default: all)
  --out FILE.jsonl   one line per prompt: {prompt, answer, completions, rewards, correct,
                     formatted}; completions[0] is the greedy one, then the samples
  --set key=value    override a config key, as for aha train`;

export async function run(args: string[]): Promise<void> {
  const { values, positionals } = parseCommandArgs("eval", args, {
    model: { type: "string" },
    adapter: { type: "string" },
    set: { type: "string", multiple: true },
    "num-samples": { type: "string" },
    temperature: { type: "string" },
    limit: { type: "string" },
    out: { type: "string" },
  }, true);
  if (positionals.length > 1) {
    throw new UsageError(`eval: expected at most one config file, got ${positionals.length}`);
  }
  const number = (name: string, text: string | undefined, ok: (n: number) => boolean) => {
    if (text === undefined) return undefined;
    const n = Number(text);
    if (!ok(n)) throw new UsageError(`eval: --${name} got "${text}"`);
    return n;
  };
  const numSamples = number(
    "num-samples",
    values["num-samples"] as string | undefined,
    (n) => Number.isInteger(n) && n >= 0,
  ) ?? 0;
  const temperature = number("temperature", values.temperature as string | undefined, (n) => n > 0);
  const limit = number(
    "limit",
    values.limit as string | undefined,
    (n) => Number.isInteger(n) && n >= 1,
  );
  const cfg = loadTrainConfig(positionals[0] ?? null, (values.set ?? []) as string[]);
  const model = (values.model as string | undefined) ?? cfg.model;
  if (model === null) {
    throw new UsageError(`eval: give --model DIR|ID (or a config whose "model" names one)`);
  }
  // Every held-out prompt unless --limit: an evaluation is the measurement, not a glimpse.
  cfg.eval_prompts = null;
  cfg.model = await resolveModel(model);
  const adapterDir = values.adapter === undefined
    ? undefined
    : await resolveModel(values.adapter as string, "adapter");
  const task = await configTask(cfg);
  const examples = task.heldOut.slice(0, limit ?? task.heldOut.length);
  if (examples.length === 0) throw new AhaError(`${task.name}: no held-out prompts to evaluate`);

  const checkpoint = await loadCheckpoint(cfg.model);
  // A LoRA adapter is checked against the model (names, shapes) before any GPU work.
  const lora = adapterDir === undefined
    ? undefined
    : await loadAdapter(adapterDir, checkpoint.config);
  const gpu = await Gpu.open(modelNeeds(checkpoint.config));
  const policy = new GpuPolicy(new GpuModel(gpu, checkpoint.config, checkpoint.weights, { lora }));
  const opts = {
    ...evalOptions(cfg),
    numSamples,
    temperature: temperature ?? cfg.temperature,
  };
  const out = values.out as string | undefined;
  const lines: string[] = [];
  const started = performance.now();
  let done = 0;
  const tty = Deno.stderr.isTerminal();
  const onRecord = (record: EvalRecord) => {
    lines.push(JSON.stringify(record));
    done++;
    if (tty) {
      Deno.stderr.writeSync(new TextEncoder().encode(`\r${done}/${examples.length} prompts`));
    }
  };
  const available = task.heldOut.length;
  const selection = limit === undefined || limit >= available
    ? `all ${available} held-out prompts`
    : `the first ${limit} of ${available} held-out prompts (--limit)`;
  const what = adapterDir === undefined ? model : `${model} with the adapter ${adapterDir}`;
  console.log(`aha eval: ${what} on ${task.name}, ${selection}, on "${gpu.description}"`);
  let result;
  try {
    result = await evaluatePolicy(task, policy, examples, opts, onRecord);
  } finally {
    if (tty) Deno.stderr.writeSync(new TextEncoder().encode("\n"));
    policy.model.destroy();
    gpu.destroy();
  }
  if (out) await Deno.writeTextFile(out, lines.map((l) => l + "\n").join(""));

  const pct = (x: number) => `${(100 * x).toFixed(1)}%`;
  const rows: [string, string][] = [
    ["prompts", String(result.examples)],
    ["greedy accuracy", pct(result.accuracy)],
    ["format rate", pct(result.format_rate)],
    ["mean reward (greedy)", result.reward.toFixed(3)],
    ["completion length", `${result.completion_length.toFixed(1)} tokens`],
  ];
  for (const key of Object.keys(result).filter((k) => k.startsWith("pass@"))) {
    rows.push([`${key} (${numSamples} samples, T=${opts.temperature})`, pct(result[key])]);
  }
  if (numSamples > 0) rows.push(["mean reward (samples)", result.sample_reward.toFixed(3)]);
  if (result.reward_errors > 0) {
    rows.push(["reward errors (scored 0)", String(result.reward_errors)]);
  }
  const width = Math.max(...rows.map(([k]) => k.length));
  for (const [k, v] of rows) console.log(`  ${k.padEnd(width)}  ${v}`);
  console.log(
    `  ${"time".padEnd(width)}  ${((performance.now() - started) / 1000).toFixed(1)} s` +
      (out ? `; per-prompt lines in ${out}` : ""),
  );
}
