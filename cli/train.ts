// `aha train`: GRPO on the policy adapter. With no config it is the embedded default — R1-zero
// in miniature: a fresh tiny model is pretrained briefly on an imperfect corpus of sums (the
// "base model"), then GRPO makes it reliable. This file wires the pieces together: config,
// task, engines, console and metrics output, checkpoints, Ctrl-C.

import { parseCommandArgs } from "./args.ts";
import { AhaError, UsageError } from "../core/errors.ts";
import { loadCheckpoint, readJson, saveCheckpoint } from "../core/checkpoint.ts";
import {
  type Adapter,
  initLora,
  loadAdapter,
  loraParameterCount,
  loraScale,
  referenceSharesBase,
} from "../core/lora.ts";
import { initWeights } from "../core/init.ts";
import { parameterCount, parseModelConfig, PRESETS, toHfConfig } from "../core/model_config.ts";
import { Rng } from "../core/rng.ts";
import { runSft } from "../core/sft.ts";
import type { Task } from "../core/task.ts";
import { loadTrainConfig, type TrainConfig } from "../core/train_config.ts";
import {
  evaluate,
  type Evaluation,
  GrpoTrainer,
  type Metrics,
  type TrainerIO,
} from "../core/trainer.ts";
import {
  CONFIG_FILE,
  loadTrainingCheckpoint,
  saveAdapterTrainingCheckpoint,
  saveTrainingCheckpoint,
  type TrainerState,
} from "../core/train_state.ts";
import { ArithmeticTokenizer, pretrainingCorpus, splitProblems } from "../data/arithmetic.ts";
import {
  ARITHMETIC_TOKENIZER_FILE,
  arithmeticTask,
  datasetTask,
  tokenizerFiles,
} from "../data/tasks.ts";
import { loadTokenizer } from "../core/tokenizer.ts";
import { checkPlan, planModel } from "../core/plan.ts";
import { describeAdapter } from "../gpu/adapters.ts";
import { Gpu, summarizeAdapter } from "../gpu/device.ts";
import { GpuModel } from "../gpu/model.ts";
import { GpuBaseReference, GpuPolicy } from "../gpu/policy.ts";
import type { ReferenceEngine } from "../core/engine.ts";
import { otherAdapterBackend, WorkerReference } from "../reference/client.ts";
import { privateRuntimeDir } from "../core/self_command.ts";

export const help = `usage: aha train [CONFIG.yaml] [--set key=value ...] [--resume DIR]

Trains a policy with GRPO. Without CONFIG the embedded default runs: a tiny Qwen2 model is
pretrained on an imperfect corpus of sums (the base model), then GRPO teaches it to add
reliably. Keys follow trl's GRPOConfig (learning_rate, num_generations, beta, ...).

  --set key=value   override one config key (dotted for sections: --set sft.steps=100)
  --resume DIR      continue exactly from a checkpoint directory written by a previous run
  --adapter DIR     continue training an existing PEFT LoRA adapter (same as --set adapter=DIR)

Writes OUTPUT_DIR/metrics.jsonl (one line per step), samples.jsonl, eval.jsonl and
checkpoint-STEP/ directories (Hugging Face format plus optimizer and trainer state; with a
lora section, PEFT adapter directories: only the adapter is trained and saved).
Ctrl-C saves a checkpoint and exits.`;

export async function run(args: string[]): Promise<void> {
  const { values, positionals } = parseCommandArgs("train", args, {
    set: { type: "string", multiple: true },
    resume: { type: "string" },
    adapter: { type: "string" },
  }, true);
  if (positionals.length > 1) {
    throw new UsageError(`train: expected at most one config file, got ${positionals.length}`);
  }
  const sets = (values.set ?? []) as string[];
  // --adapter implies a LoRA run (the adapter's own settings apply; the section may be empty).
  if (values.adapter !== undefined) sets.push("lora={}", `adapter=${values.adapter}`);
  const resume = values.resume as string | undefined;
  const configPath = positionals[0] ?? (resume ? `${resume}/${CONFIG_FILE}` : null);
  const cfg = loadTrainConfig(configPath, sets);
  const resumed = resume ? await loadTrainingCheckpoint(resume) : null;
  // An adapter to continue is checked against its base before any work.
  if (!resumed && cfg.adapter !== null && cfg.model !== null) {
    const configPath = `${cfg.model}/config.json`;
    await loadAdapter(cfg.adapter, parseModelConfig(await readJson(configPath), configPath));
  }

  await prepareOutputDir(cfg.output_dir, resumed?.state.step ?? null);
  const task = await makeTask(cfg);
  const gpu = await Gpu.open();
  // Refuse a run that cannot fit before loading any weights.
  checkPlan(
    cfg,
    (await planModel(cfg, new ArithmeticTokenizer().vocabSize)).config,
    describeAdapter(gpu.adapter).limits,
  );
  const console_ = new Console(cfg);
  console_.line(`aha train: task ${task.name}, policy adapter "${gpu.description}"`);

  // The model GRPO starts from, and the frozen reference (the same weights).
  const referenceDir = resumed?.state.reference_model ?? cfg.model ??
    await builtinBaseModel(cfg, gpu, console_);
  const start = resumed ?? await loadCheckpoint(referenceDir);
  // A LoRA run trains an adapter on the frozen base: the checkpoint's, an existing one
  // (`adapter:`, whose own r, alpha and targets then apply) or a fresh one (PEFT's init).
  let adapter: Adapter | null = null;
  if (cfg.lora !== null) {
    adapter = resumed?.adapter ??
      (cfg.adapter !== null ? await loadAdapter(cfg.adapter, start.config) : {
        lora: cfg.lora,
        tensors: initLora(start.config, cfg.lora, new Rng(cfg.seed)),
      });
    cfg.lora = adapter.lora;
  }
  const policy = new GpuPolicy(
    new GpuModel(gpu, start.config, start.weights, { lora: adapter ?? undefined }),
  );
  if (resumed) {
    policy.loadOptimizerState({ step: resumed.state.adam_step, moments: resumed.moments });
    task.restoreSampler(resumed.state.sampler);
  }
  // The reference model runs in a process of its own, on another adapter when there is one. A
  // LoRA run's reference is the base model: sharing the policy's adapter, it is the policy's
  // own frozen weights with the adapter switched off.
  let referenceAdapter = cfg.reference.adapter;
  if (cfg.lora !== null && referenceAdapter === "auto" && referenceSharesBase(cfg, false)) {
    const env = { XDG_RUNTIME_DIR: privateRuntimeDir(), ...cfg.reference.env };
    const other = await otherAdapterBackend(
      summarizeAdapter(gpu.adapter),
      env,
      cfg.reference.timeout_s,
    );
    if (other) referenceAdapter = other as typeof referenceAdapter;
  }
  const sharesBase = referenceSharesBase(
    cfg,
    referenceAdapter !== "auto" && referenceAdapter !== "same",
  );
  const reference: ReferenceEngine | null = cfg.beta === 0
    ? null
    : sharesBase
    ? new GpuBaseReference(policy.model)
    : await WorkerReference.start({
      modelDir: referenceDir,
      adapter: referenceAdapter,
      engine: cfg.reference.engine,
      env: cfg.reference.env,
      timeoutS: cfg.reference.timeout_s,
      maxRestarts: cfg.reference.max_restarts,
      onnxPath: cfg.reference.onnx,
      policy: {
        vocabSize: start.config.vocabSize,
        dir: resume ?? referenceDir,
        adapter: summarizeAdapter(gpu.adapter),
      },
      log: (line) => console_.line(line),
    });
  console_.line(
    `model ${referenceDir} (${(parameterCount(start.config) / 1e6).toFixed(2)}M parameters); ` +
      `reference: ${reference ? reference.description : "none (beta = 0)"}` +
      (cfg.lora && reference && !sharesBase ? " (its own copy of the base model)" : ""),
  );
  if (cfg.lora !== null) {
    const l = cfg.lora;
    console_.line(
      `LoRA: r ${l.r}, alpha ${l.alpha} (scale ${loraScale(l).toPrecision(4)}), targets ` +
        `${l.target_modules.join(" ")}: ${loraParameterCount(start.config, l)} trained ` +
        `parameters, base frozen${resumed ? "" : cfg.adapter ? `; continuing ${cfg.adapter}` : ""}`,
    );
  }
  const extraFiles = await tokenizerFiles(referenceDir);

  let stop = false;
  const onSignal = () => {
    if (stop) Deno.exit(130);
    stop = true;
    console_.line("stopping after this step (Ctrl-C again to quit without saving)");
  };
  Deno.addSignalListener("SIGINT", onSignal);
  Deno.addSignalListener("SIGTERM", onSignal);

  const startStep = resumed?.state.step ?? 0;
  if (startStep === 0) {
    const base = await evaluate(cfg, task, policy);
    console_.evaluation(0, base);
    await appendJsonl(`${cfg.output_dir}/eval.jsonl`, { step: 0, ...base });
  }
  const io: TrainerIO = {
    metrics: async (step, metrics) => {
      console_.step(step, metrics);
      await appendJsonl(`${cfg.output_dir}/metrics.jsonl`, { step, ...metrics });
    },
    samples: async (step, samples) => {
      console_.sample(step, samples[0]);
      for (const s of samples) await appendJsonl(`${cfg.output_dir}/samples.jsonl`, { step, ...s });
    },
    evaluation: async (step, result) => {
      console_.evaluation(step, result);
      await appendJsonl(`${cfg.output_dir}/eval.jsonl`, { step, ...result });
    },
    save: async (step, sampler = task.samplerState()) => {
      const dir = `${cfg.output_dir}/checkpoint-${step}`;
      const optimizer = await policy.optimizerState();
      const state: TrainerState = {
        step,
        adam_step: optimizer.step,
        sampler,
        reference_model: referenceDir,
      };
      if (cfg.lora !== null) {
        // A LoRA run saves its adapter only, never the frozen base.
        const tensors = await policy.weights();
        await saveAdapterTrainingCheckpoint(
          dir,
          { lora: cfg.lora, tensors },
          start.config,
          optimizer.moments,
          state,
          cfg,
          extraFiles,
        );
      } else {
        await saveTrainingCheckpoint(
          dir,
          start.hfConfig,
          await policy.weights(),
          optimizer.moments,
          state,
          cfg,
          extraFiles,
        );
      }
      console_.line(`saved ${dir}`);
    },
    stopRequested: () => stop,
  };
  try {
    await new GrpoTrainer(cfg, task, policy, reference, io).run(startStep);
  } finally {
    Deno.removeSignalListener("SIGINT", onSignal);
    Deno.removeSignalListener("SIGTERM", onSignal);
    await reference?.close();
    console_.close();
  }
}

const LOGS = ["metrics.jsonl", "samples.jsonl", "eval.jsonl"];

/**
 * A fresh run refuses an output directory that already holds a run's logs (nothing is
 * overwritten); a resumed run drops the log lines after the step it resumes from, so the logs
 * read as one uninterrupted run.
 */
async function prepareOutputDir(dir: string, resumedStep: number | null): Promise<void> {
  await Deno.mkdir(dir, { recursive: true });
  for (const name of LOGS) {
    const path = `${dir}/${name}`;
    const text = await Deno.readTextFile(path).catch(() => null);
    if (text === null) continue;
    if (resumedStep === null) {
      throw new AhaError(
        `output_dir ${dir} already holds a run (${name}): resume it with --resume ` +
          `${dir}/checkpoint-N, or choose another --set output_dir=...`,
      );
    }
    const kept = text.split("\n").filter((line) => line && JSON.parse(line).step <= resumedStep);
    await Deno.writeTextFile(path, kept.map((line) => line + "\n").join(""));
  }
}

export async function makeTask(cfg: TrainConfig): Promise<Task> {
  if (cfg.dataset.format === "arithmetic") return arithmeticTask(cfg);
  if (cfg.model === null || !(await exists(cfg.model))) {
    throw new AhaError(
      `model: "${cfg.model}" is not a directory: a ${cfg.dataset.format} dataset needs a ` +
        "Hugging Face model directory (config.json, weights, tokenizer files)",
    );
  }
  return await datasetTask(cfg, await loadTokenizer(cfg.model));
}

/**
 * The embedded default's base model: a fresh tiny Qwen2 pretrained on the imperfect corpus of
 * sums (`aha sft` in-process). Made once per output directory and reused.
 */
async function builtinBaseModel(cfg: TrainConfig, gpu: Gpu, console_: Console): Promise<string> {
  const dir = `${cfg.output_dir}/base`;
  if (await exists(`${dir}/model.safetensors`)) {
    console_.line(`base model: ${dir} (delete it to pretrain again)`);
    return dir;
  }
  const task = arithmeticTask(cfg);
  const tokenizer = task.tokenizer;
  const config = parseModelConfig({
    ...PRESETS.tiny,
    vocab_size: tokenizer.vocabSize,
    eos_token_id: tokenizer.eosIds[0],
  });
  const policy = new GpuPolicy(new GpuModel(gpu, config, initWeights(config, cfg.seed)));
  const { train } = splitProblems(cfg.arithmetic);
  const rows = pretrainingCorpus(train, cfg.arithmetic, new Rng(cfg.seed)).map((r) => ({
    promptIds: tokenizer.encode(r.prompt),
    completionIds: tokenizer.encode(r.completion),
  }));
  console_.line(
    `pretraining the base model: ${cfg.sft.steps} steps on ${rows.length} imperfect worked sums`,
  );
  const started = performance.now();
  await runSft(policy, rows, {
    steps: cfg.sft.steps,
    batchSize: cfg.sft.batch_size,
    optimizer: {
      lr: cfg.sft.learning_rate,
      beta1: 0.9,
      beta2: 0.99,
      eps: 1e-8,
      weightDecay: 0,
      maxGradNorm: 1,
    },
    warmupSteps: 10,
    seed: cfg.seed,
    onStep: (step, loss) => {
      if (step % 50 === 0 || step === cfg.sft.steps) {
        console_.line(`  sft step ${step}: loss ${loss.toFixed(4)}`);
      }
    },
  });
  console_.line(`base model pretrained in ${((performance.now() - started) / 1000).toFixed(1)} s`);
  await saveCheckpoint(dir, toHfConfig(config), await policy.weights(), {
    [ARITHMETIC_TOKENIZER_FILE]: JSON.stringify({ type: "aha-arithmetic" }) + "\n",
  });
  policy.model.destroy();
  return dir;
}

const exists = (path: string) => Deno.stat(path).then(() => true, () => false);

async function appendJsonl(path: string, record: Record<string, unknown>): Promise<void> {
  await Deno.writeTextFile(path, JSON.stringify(record) + "\n", { append: true });
}

/** Console output: one line per logging step (a progress line on a terminal). */
class Console {
  private readonly started = performance.now();
  private readonly tty = Deno.stdout.isTerminal();
  private pending = false;

  constructor(private readonly cfg: TrainConfig) {}

  line(text: string): void {
    if (this.pending) Deno.stdout.writeSync(new TextEncoder().encode("\n"));
    this.pending = false;
    console.log(text);
  }

  step(step: number, m: Metrics): void {
    const elapsed = (performance.now() - this.started) / 1000;
    const total = this.cfg.max_steps;
    const width = 20, filled = Math.round((step / total) * width);
    const bar = "█".repeat(filled) + "░".repeat(width - filled);
    const text = `step ${String(step).padStart(String(total).length)}/${total} ${bar} ` +
      `reward ${m.reward.toFixed(3)} acc ${(100 * m.accuracy).toFixed(1)}% ` +
      `format ${(100 * m.format_rate).toFixed(1)}% kl ${m.kl.toFixed(4)} ` +
      `len ${m.completion_length.toFixed(1)} ${elapsed.toFixed(0)}s`;
    if (this.tty) {
      Deno.stdout.writeSync(new TextEncoder().encode(`\r${text}`));
      this.pending = true;
    } else if (step % this.cfg.logging_steps === 0 || step === total) {
      console.log(text);
    }
  }

  sample(step: number, sample: Record<string, unknown> | undefined): void {
    if (!sample) return;
    this.line(
      `  sample @${step}: ${JSON.stringify(sample.prompt)} → ${
        JSON.stringify(sample.completion)
      } ` +
        `(reward ${(sample.rewards as Record<string, number>).total.toFixed(2)})`,
    );
  }

  evaluation(step: number, e: Evaluation): void {
    const elapsed = (performance.now() - this.started) / 1000;
    this.line(
      `eval @${step} (${elapsed.toFixed(0)}s): held-out greedy accuracy ${
        (100 * e.accuracy).toFixed(1)
      }%, ` +
        `format ${(100 * e.format_rate).toFixed(1)}% over ${e.examples} problems`,
    );
  }

  close(): void {
    if (this.pending) console.log();
    this.pending = false;
  }
}
