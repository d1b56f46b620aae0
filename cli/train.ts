// `aha train`: GRPO on the policy adapter. With no config it is the embedded default — R1-zero
// in miniature: a fresh tiny model is pretrained briefly on an imperfect corpus of sums (the
// "base model"), then GRPO makes it reliable. This file wires the pieces together: config,
// task, engines, console and metrics output, checkpoints, Ctrl-C.

import { parseCommandArgs } from "./args.ts";
import { AhaError, Interrupted, UsageError } from "../core/errors.ts";
import { loadCheckpoint, readJson, saveCheckpoint } from "../core/checkpoint.ts";
import { exists } from "../core/save_dir.ts";
import {
  type Adapter,
  initLora,
  loadAdapter,
  loraParameterCount,
  loraScale,
  referenceSharesBase,
} from "../core/lora.ts";
import { initWeights } from "../core/init.ts";
import {
  type ModelConfig,
  parameterCount,
  parseModelConfig,
  PRESETS,
  toHfConfig,
  weightShapes,
} from "../core/model_config.ts";
import { Rng } from "../core/rng.ts";
import { encodeSafetensors, readSafetensors } from "../core/safetensors.ts";
import { runSft } from "../core/sft.ts";
import type { Task } from "../core/task.ts";
import { loadTrainConfig, referenceEngine, type TrainConfig } from "../core/train_config.ts";
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
  PRETRAINING_FILE,
  saveAdapterTrainingCheckpoint,
  saveTrainingCheckpoint,
  SYNCED_REFERENCE_FILE,
  type TrainerState,
} from "../core/train_state.ts";
import {
  appendLine,
  lockRunDir,
  prepareRunDir,
  removeOldCheckpoints,
  resolveResume,
  type ResumeTarget,
} from "../core/run_dir.ts";
import { ArithmeticTokenizer, pretrainingCorpus, splitProblems } from "../data/arithmetic.ts";
import {
  ARITHMETIC_TOKENIZER_FILE,
  arithmeticTask,
  configTask,
  tokenizerFiles,
} from "../data/tasks.ts";
import { resolveModel } from "../data/hub.ts";
import { evalSelection } from "../core/evaluate.ts";
import {
  checkPlan,
  keptCopyBytes,
  planModel,
  softwareLimits,
  softwareOverheadBytes,
} from "../core/plan.ts";
import { BUDGET_VARIABLE } from "../gpu/kept_textures.ts";
import { describeAdapter, probeAdapter } from "../gpu/adapters.ts";
import { Gpu, summarizeAdapter } from "../gpu/device.ts";
import { GpuModel } from "../gpu/model.ts";
import { GpuBaseReference, GpuPolicy } from "../gpu/policy.ts";
import type { ReferenceEngine } from "../core/engine.ts";
import { WorkerReference } from "../reference/client.ts";
import { serveDashboard } from "../core/dashboard.ts";
import { writeReport } from "../core/report.ts";
import { TensorBoardWriter } from "../core/tensorboard.ts";
import { frozenWeightDtypes } from "../core/half.ts";

export const help =
  `usage: aha train [CONFIG.yaml] [--set key=value ...] [--resume DIR] [--overwrite]

Trains a policy with GRPO. Without CONFIG the embedded default runs: a tiny Qwen2 model is
pretrained on an imperfect corpus of sums (the base model), then GRPO teaches it to add
reliably. Keys follow trl's GRPOConfig (learning_rate, num_generations, beta, ...).

  --set key=value   override one config key (dotted for sections: --set sft.steps=100)
  --resume DIR      continue exactly from a checkpoint directory written by a previous run
                    (output goes to the run directory that holds it, wherever it now is)
  --adapter DIR     continue training an existing PEFT LoRA adapter (same as --set adapter=DIR)
  --dashboard       serve this run's live dashboard (aha dashboard) while it trains
  --overwrite       start over in an output_dir that holds an earlier run (its logs and
                    checkpoints are removed); with --resume of an earlier checkpoint, remove
                    the run's checkpoints after it

Writes OUTPUT_DIR/metrics.jsonl (one line per step), samples.jsonl, eval.jsonl and
checkpoint-STEP/ directories (Hugging Face format plus optimizer and trainer state; with a
lora section, PEFT adapter directories: only the adapter is trained and saved).
Ctrl-C saves a checkpoint and exits with status 130 (143 after SIGTERM); during the built-in
pretraining it exits at once, and the base model is pretrained again on the next run.
One run per output directory at a time (a lock on .aha.lock, which names its PID).
With report_to: [tensorboard] also TensorBoard event files; the embedded default ends with
OUTPUT_DIR/report.html (aha report).`;

export async function run(args: string[]): Promise<void> {
  const { values, positionals } = parseCommandArgs("train", args, {
    set: { type: "string", multiple: true },
    resume: { type: "string" },
    overwrite: { type: "boolean" },
    dashboard: { type: "boolean" },
    adapter: { type: "string" },
  }, true);
  if (positionals.length > 1) {
    throw new UsageError(`train: expected at most one config file, got ${positionals.length}`);
  }
  const sets = (values.set ?? []) as string[];
  // --adapter implies a LoRA run (the adapter's own settings apply; the section may be empty).
  if (values.adapter !== undefined) sets.push("lora={}", `adapter=${values.adapter}`);
  const target = values.resume ? await resolveResume(values.resume as string) : null;
  const resume = target?.checkpoint;
  const configPath = positionals[0] ?? (resume ? `${resume}/${CONFIG_FILE}` : null);
  const cfg = loadTrainConfig(configPath, sets);
  // Hub ids become their snapshot directories in the Hugging Face cache (fetched if missing).
  if (cfg.model !== null) cfg.model = await resolveModel(cfg.model);
  if (cfg.adapter !== null) cfg.adapter = await resolveModel(cfg.adapter, "adapter");
  // Checked whole (weights, trainer state, optimizer) before anything on disk changes.
  const savedOutputDir = cfg.output_dir;
  const resumed = target
    ? await loadTrainingCheckpoint(target.checkpoint, (path) => target.rebase(path, savedOutputDir))
    : null;
  if (target && resumed) {
    rebaseResumedRun(cfg, target, sets);
    checkResumedKind(target.checkpoint, resumed.adapter !== null, cfg);
  }
  // An adapter to continue is checked against its base before any work.
  if (!resumed && cfg.adapter !== null && cfg.model !== null) {
    const configPath = `${cfg.model}/config.json`;
    await loadAdapter(cfg.adapter, parseModelConfig(await readJson(configPath), configPath));
  }

  const task = await makeTask(cfg);
  const gpu = await Gpu.open();
  // Refuse a run that cannot fit before loading any weights or creating the output directory.
  const planned = await planModel(cfg, new ArithmeticTokenizer().vocabSize);
  // A software adapter's memory is the machine's, which the program itself also takes.
  const adapterLimits = describeAdapter(gpu.adapter).limits;
  const limits = gpu.software
    ? softwareLimits(adapterLimits, softwareOverheadBytes(cfg, planned.config, planned.dtype))
    : adapterLimits;
  const plan = checkPlan(cfg, planned.config, limits, undefined, planned.dtype);
  // On a software adapter the texture copies kept for the kernels (gpu/kept_textures.ts) take what
  // the plan leaves of the machine's memory, less an eighth: half to a reference worker if any.
  if (gpu.software && limits.memory !== null && !Deno.env.get(BUDGET_VARIABLE)) {
    Deno.env.set(BUDGET_VARIABLE, String(keptCopyBytes(plan, limits.memory, cfg)));
  }

  // What can be checked without weights is checked before the output directory changes
  // (--overwrite clears it): the reference's adapter, and a given model against the task.
  if (cfg.beta > 0) await checkReferenceAdapter(cfg);
  const modelChecked = !resumed && cfg.model !== null;
  if (modelChecked) await checkModelFitsTask(cfg, task, planned.config, cfg.model!);

  const lock = await lockRunDir(cfg.output_dir, "train");
  try {
    await prepareRunDir(cfg.output_dir, {
      resumeStep: resumed?.state.step ?? null,
      resumeRunDir: target?.runDir,
      overwrite: values.overwrite === true,
      log: (line) => console.log(line),
    });
    await train(cfg, task, gpu, resumed, resume, {
      dashboard: values.dashboard === true,
      report: positionals[0] === undefined,
      modelChecked,
    });
  } finally {
    lock.release();
  }
}

/**
 * A resumed run writes into the run directory its checkpoint sits in (unless output_dir is set
 * explicitly), and what the checkpoint saved under its old run directory — the built-in base
 * model here, the reference as the checkpoint is loaded — is read from the same place under the
 * new one.
 */
function rebaseResumedRun(cfg: TrainConfig, target: ResumeTarget, sets: string[]): void {
  const saved = cfg.output_dir;
  if (!sets.some((s) => s.startsWith("output_dir="))) cfg.output_dir = target.runDir;
  if (cfg.model !== null) cfg.model = target.rebase(cfg.model, saved);
}

/**
 * A resumed run trains what its checkpoint trained, a LoRA adapter or every weight: a config of
 * the other kind would drop the adapter (and its optimizer moments), or start a fresh one.
 */
function checkResumedKind(checkpoint: string, lora: boolean, cfg: TrainConfig): void {
  if (lora && cfg.lora === null) {
    throw new AhaError(
      `--resume ${checkpoint}: it trained a LoRA adapter, but the config has no "lora" section ` +
        `(resuming would drop the adapter): resume with the checkpoint's own config, or add its ` +
        `"lora" section`,
    );
  }
  if (!lora && cfg.lora !== null) {
    throw new AhaError(
      `--resume ${checkpoint}: it trained every weight, but the config has a "lora" section: ` +
        `to train an adapter on these weights, start a new run with --set model=${checkpoint}`,
    );
  }
}

async function train(
  cfg: TrainConfig,
  task: Task,
  gpu: Gpu,
  resumed: Awaited<ReturnType<typeof loadTrainingCheckpoint>> | null,
  resume: string | undefined,
  /**
   * report: the embedded default ends with an HTML report of the run; modelChecked: the model
   * was checked against the task before the output directory was prepared.
   */
  options: { dashboard: boolean; report: boolean; modelChecked: boolean },
): Promise<void> {
  const console_ = new Console(cfg);
  const dashboard = options.dashboard ? serveDashboard([cfg.output_dir]) : null;
  if (dashboard) console_.line(`dashboard: ${dashboard.url}`);
  const tensorboard = cfg.report_to.includes("tensorboard")
    ? await TensorBoardWriter.open(cfg.output_dir)
    : null;
  console_.line(
    `aha train: task ${task.name}, policy adapter "${gpu.description}", output ${cfg.output_dir}` +
      (resume ? ` (resuming ${resume})` : ""),
  );

  // Ctrl-C / SIGTERM: during the built-in pretraining, exit at once (nothing is saved); later,
  // finish the step, save, and exit with 130 / 143.
  let stop: "SIGINT" | "SIGTERM" | null = null;
  let pretraining = false;
  const listeners = (["SIGINT", "SIGTERM"] as const).map(
    (signal) => {
      const listener = () => {
        if (pretraining) {
          console_.line(
            `interrupted during the built-in pretraining: the base model is not saved ` +
              `(it is pretrained again on the next run)`,
          );
          Deno.exit(new Interrupted(signal, "").status);
        }
        if (stop) Deno.exit(new Interrupted(signal, "").status);
        stop = signal;
        console_.line("stopping after this step (Ctrl-C again to quit without saving)");
      };
      Deno.addSignalListener(signal, listener);
      return () => Deno.removeSignalListener(signal, listener);
    },
  );

  // The model GRPO starts from, and the frozen reference (the same weights).
  pretraining = !resumed && cfg.model === null;
  const referenceDir = resumed?.state.reference_model ?? cfg.model ??
    await builtinBaseModel(cfg, gpu, console_);
  pretraining = false;
  const start = resumed ?? await loadCheckpoint(referenceDir);
  if (!options.modelChecked) await checkModelFitsTask(cfg, task, start.config, referenceDir);
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
    new GpuModel(gpu, start.config, start.weights, {
      lora: adapter ?? undefined,
      // A LoRA run's base is frozen: kept as frozen_dtype says (auto: the checkpoint's dtype).
      weightDtypes: adapter === null ? undefined : frozenWeightDtypes(
        cfg.frozen_dtype,
        weightShapes(start.config),
        start.dtypes,
        gpu.hasF16,
      ),
      gradientCheckpointing: cfg.gradient_checkpointing,
      kvCacheDtype: cfg.kv_cache_dtype,
    }),
  );
  if (resumed) {
    // Read from the checkpoint's file one tensor at a time as the GPU takes them.
    policy.loadOptimizerState({ step: resumed.state.adam_step, moments: resumed.moments });
    task.restoreSampler(resumed.state.sampler);
  }
  // The reference model runs in a process of its own, on another adapter when there is one. A
  // LoRA run's reference is the base model: unless reference.adapter names another backend, it is
  // the policy's own frozen weights with the adapter switched off, as the memory plan counts it.
  // A second backend found on its own would be the same GPU again (Vulkan and GL) or the CPU's
  // llvmpipe, holding a second copy of the base for nothing (the 7B recipe's base twice is over a
  // 24 GB machine's memory), or scoring a large model on the CPU.
  const sharesBase = referenceSharesBase(cfg);
  const reference: ReferenceEngine | null = cfg.beta === 0
    ? null
    : sharesBase
    ? new GpuBaseReference(policy.model)
    : await WorkerReference.start({
      modelDir: referenceDir,
      adapter: cfg.reference.adapter,
      engine: referenceEngine(cfg, gpu.software, parameterCount(start.config)),
      env: cfg.reference.env,
      timeoutS: cfg.reference.timeout_s,
      maxRestarts: cfg.reference.max_restarts,
      onnxPath: cfg.reference.onnx,
      frozenDtype: cfg.frozen_dtype,
      policy: {
        vocabSize: start.config.vocabSize,
        dir: resume ?? referenceDir,
        adapter: summarizeAdapter(gpu.adapter),
      },
      log: (line) => console_.line(line),
    });
  // sync_ref_model: the reference the run had synced to when it saved.
  const syncedReference = resume ? `${resume}/${SYNCED_REFERENCE_FILE}` : null;
  if (reference && syncedReference && await exists(syncedReference)) {
    const tensors = await readSafetensors(syncedReference);
    await reference.mixIn(new Map([...tensors].map(([name, t]) => [name, t.data])), 1);
  }
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

  const startStep = resumed?.state.step ?? 0;
  console_.line(`evaluation: ${evalSelection(cfg.eval_prompts, task.heldOut.length).note}`);
  if (startStep === 0) {
    const base = await evaluate(cfg, task, policy);
    console_.evaluation(0, base);
    await appendLogLine(`${cfg.output_dir}/eval.jsonl`, { step: 0, ...base });
    await tensorboard?.scalars(0, base, "eval/");
  }
  const io: TrainerIO = {
    metrics: async (step, metrics) => {
      console_.step(step, metrics);
      await appendLogLine(`${cfg.output_dir}/metrics.jsonl`, { step, ...metrics });
      await tensorboard?.scalars(step, metrics);
    },
    samples: async (step, samples) => {
      console_.sample(step, samples[0]);
      for (const s of samples) {
        await appendLogLine(`${cfg.output_dir}/samples.jsonl`, { step, ...s });
      }
    },
    evaluation: async (step, result) => {
      console_.evaluation(step, result);
      await appendLogLine(`${cfg.output_dir}/eval.jsonl`, { step, ...result });
      await tensorboard?.scalars(step, result, "eval/");
    },
    save: async (step, sampler = task.samplerState()) => {
      const dir = `${cfg.output_dir}/checkpoint-${step}`;
      // Read back from the GPU a batch at a time as the files are written.
      const { weights, optimizer } = policy.forSaving();
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
        const synced = cfg.sync_ref_model && reference instanceof WorkerReference
          ? await reference.syncedWeights()
          : null;
        await saveTrainingCheckpoint(
          dir,
          start.hfConfig,
          weights,
          optimizer.moments,
          state,
          cfg,
          synced
            ? { ...extraFiles, [SYNCED_REFERENCE_FILE]: encodeSafetensors(flatTensors(synced)) }
            : extraFiles,
        );
      }
      console_.line(`saved ${dir}`);
      if (cfg.save_total_limit !== null) {
        // A checkpoint that cannot be removed costs disk, not the run: say so and go on.
        const limit = `save_total_limit ${cfg.save_total_limit}`;
        try {
          const removed = await removeOldCheckpoints(cfg.output_dir, cfg.save_total_limit);
          if (removed.length) console_.line(`removed ${removed.join(", ")} (${limit})`);
        } catch (e) {
          console_.line(`warning: old checkpoints not removed (${limit}): ${(e as Error).message}`);
        }
      }
    },
    stopRequested: () => stop !== null,
  };
  try {
    await new GrpoTrainer(cfg, task, policy, reference, io).run(startStep);
    if (options.report) {
      console_.line(
        `report: ${await writeReport([cfg.output_dir], `${cfg.output_dir}/report.html`)}`,
      );
    }
  } finally {
    tensorboard?.close();
    await dashboard?.close();
    for (const remove of listeners) remove();
    await reference?.close();
    console_.close();
  }
  // Saved; scripts tell an interrupted run from a finished one by the status.
  if (stop) throw new Interrupted(stop, "saved; continue with --resume");
}

export async function makeTask(cfg: TrainConfig): Promise<Task> {
  return await configTask(cfg);
}

/** Checks before any work that the model can read the task's tokens and hold its sequences. */
async function checkModelFitsTask(
  cfg: TrainConfig,
  task: Task,
  config: ModelConfig,
  modelDir: string,
): Promise<void> {
  if (
    cfg.dataset.format === "arithmetic" &&
    !(await exists(`${modelDir}/${ARITHMETIC_TOKENIZER_FILE}`))
  ) {
    throw new AhaError(
      `model ${modelDir}: the arithmetic task needs a model made for its character tokenizer ` +
        `(${ARITHMETIC_TOKENIZER_FILE}); this one has vocab_size ${config.vocabSize} and no such file`,
    );
  }
  const ids = [...task.eosIds, ...task.heldOut.flatMap((e) => e.promptIds)];
  const largest = Math.max(...ids);
  if (largest >= config.vocabSize) {
    throw new AhaError(
      `model ${modelDir}: vocab_size ${config.vocabSize} is too small for the task's tokenizer ` +
        `(token id ${largest})`,
    );
  }
  const L = cfg.max_prompt_length + cfg.max_completion_length;
  if (L > config.maxPositionEmbeddings) {
    throw new AhaError(
      `max_prompt_length + max_completion_length = ${L} exceeds the model's ` +
        `max_position_embeddings (${config.maxPositionEmbeddings}) in ${modelDir}/config.json`,
    );
  }
}

/** A reference.adapter named explicitly must exist before any work (pretraining included). */
async function checkReferenceAdapter(cfg: TrainConfig): Promise<void> {
  const { adapter, env, engine } = cfg.reference;
  if (engine === "onnx" || adapter === "same") return;
  // An explicit adapter, else a backend named in reference.env; "auto" alone always finds one.
  const backend = adapter !== "auto" ? adapter : env.DENO_WEBGPU_BACKEND;
  if (backend === undefined) return;
  const field = adapter !== "auto" ? "reference.adapter" : "reference.env.DENO_WEBGPU_BACKEND";
  if (!(await probeAdapter({ ...env, DENO_WEBGPU_BACKEND: backend }, cfg.reference.timeout_s))) {
    throw new AhaError(
      `${field}: "${backend}" gives no WebGPU adapter on this machine ` +
        `(run "aha gpu" to see which backends work)`,
    );
  }
}

/**
 * The embedded default's base model: a fresh tiny Qwen2 pretrained on the imperfect corpus of
 * sums (`aha sft` in-process). Made once per output directory and reused.
 */
async function builtinBaseModel(cfg: TrainConfig, gpu: Gpu, console_: Console): Promise<string> {
  const dir = `${cfg.output_dir}/base`;
  // The settings it was pretrained with, saved beside it: a base made with others is made again
  // (a base saved before they were kept is reused, as then).
  const recipe = JSON.stringify({ seed: cfg.seed, sft: cfg.sft, arithmetic: cfg.arithmetic });
  if (await exists(`${dir}/model.safetensors`)) {
    const made = await Deno.readTextFile(`${dir}/${PRETRAINING_FILE}`).catch(() => null);
    if (made === null || made.trim() === recipe) {
      console_.line(`base model: ${dir} (delete it to pretrain again)`);
      return dir;
    }
    console_.line(`base model: ${dir} was pretrained with other seed, sft or arithmetic settings`);
  }
  const task = arithmeticTask(cfg);
  const tokenizer = task.tokenizer;
  const config = parseModelConfig({
    ...PRESETS.tiny,
    vocab_size: tokenizer.vocabSize,
    eos_token_id: tokenizer.eosIds[0],
  });
  const policy = new GpuPolicy(
    new GpuModel(gpu, config, initWeights(config, cfg.seed), {
      gradientCheckpointing: cfg.gradient_checkpointing,
      kvCacheDtype: cfg.kv_cache_dtype,
    }),
  );
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
  await saveCheckpoint(dir, toHfConfig(config), policy.forSaving().weights, {
    [ARITHMETIC_TOKENIZER_FILE]: JSON.stringify({ type: "aha-arithmetic" }) + "\n",
    [PRETRAINING_FILE]: recipe + "\n",
  });
  policy.model.destroy();
  return dir;
}

const flatTensors = (weights: Map<string, Float32Array>) =>
  new Map([...weights].map(([name, data]) => [name, { shape: [data.length], data }]));

/** A log line with the wall clock (for the dashboard's time axis), appended whole. */
function appendLogLine(path: string, record: Record<string, unknown>): Promise<void> {
  return appendLine(path, { ...record, time: Date.now() / 1000 });
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
    if (e.examples === 0) {
      this.line(`eval @${step} (${elapsed.toFixed(0)}s): no held-out problems, nothing measured`);
      return;
    }
    this.line(
      `eval @${step} (${elapsed.toFixed(0)}s): held-out greedy accuracy ${
        (100 * e.accuracy).toFixed(1)
      }%, ` +
        `format ${(100 * e.format_rate).toFixed(1)}% over ${e.examples} problems` +
        Object.keys(e).filter((k) => k.startsWith("pass@"))
          .map((k) => `, ${k} ${(100 * e[k]).toFixed(1)}%`).join(""),
    );
  }

  close(): void {
    if (this.pending) console.log();
    this.pending = false;
  }
}
