// aha — a GRPO trainer for language models whose model math runs in WebGPU.
// This file is only the command line: it finds the subcommand and hands it the remaining
// arguments, after checking the one setting every command shares (AHA_KEPT_TEXTURE_BYTES, read
// deep inside the kernels). Each subcommand lives in its own module, which exports `help` and
// `run(args)`.

import { AhaError, UsageError } from "./core/errors.ts";
import { setEntryModule } from "./core/self_command.ts";
import { versionText } from "./core/version.ts";
import { keptTextureBudget } from "./gpu/kept_textures.ts";

interface Command {
  summary: string;
  /** run() may return the exit status (default 0). */
  load: () => Promise<{ help: string; run: (args: string[]) => Promise<void | number> }>;
}

const COMMANDS: Record<string, Command> = {
  train: { summary: "train a policy with GRPO", load: () => import("./cli/train.ts") },
  plan: { summary: "memory plan of a training run", load: () => import("./cli/plan.ts") },
  sft: {
    summary: "supervised fine-tuning on {prompt, completion} rows",
    load: () => import("./cli/sft.ts"),
  },
  eval: {
    summary: "accuracy, format rate and pass@k of a model on held-out prompts",
    load: () => import("./cli/eval.ts"),
  },
  download: {
    summary: "a model or dataset from the Hugging Face Hub into its cache",
    load: () => import("./cli/download.ts"),
  },
  init: { summary: "write a random Qwen2 checkpoint", load: () => import("./cli/init.ts") },
  score: {
    summary: "per-token log-probs of token sequences",
    load: () => import("./cli/score.ts"),
  },
  loss: {
    summary: "one GRPO objective and its gradients, without updating",
    load: () => import("./cli/loss.ts"),
  },
  merge: {
    summary: "fold a LoRA adapter into its base model",
    load: () => import("./cli/merge.ts"),
  },
  gpu: {
    summary: "the WebGPU adapters this machine offers",
    load: () => import("./cli/gpu.ts"),
  },
  tokenize: {
    summary: "token ids of a text, optionally through the chat template",
    load: () => import("./cli/tokenize.ts"),
  },
  rewards: {
    summary: "score {completion, answer} rows with the reward functions",
    load: () => import("./cli/rewards.ts"),
  },
  dashboard: {
    summary: "live curves and samples of runs in the browser",
    load: () => import("./cli/dashboard.ts"),
  },
  report: {
    summary: "one self-contained HTML report of a run",
    load: () => import("./cli/report.ts"),
  },
  "ref-worker": {
    summary: "(internal) the reference model's process",
    load: () => import("./cli/ref_worker.ts"),
  },
};

const USAGE = `usage: aha <command> [options]

commands:
${Object.entries(COMMANDS).map(([name, c]) => `  ${name.padEnd(12)}${c.summary}`).join("\n")}

Run "aha <command> --help" for a command's options; "aha --version" for the version.`;

async function main(args: string[]): Promise<number> {
  const [name, ...rest] = args;
  if (name === undefined || name === "--help" || name === "-h" || name === "help") {
    console.log(USAGE);
    return name === undefined ? 2 : 0;
  }
  if (name === "--version" || name === "-V" || name === "version") {
    console.log(versionText(import.meta.url));
    return 0;
  }
  const command = COMMANDS[name];
  if (!command) throw new UsageError(`unknown command "${name}" (run "aha --help" for the list)`);
  const module = await command.load();
  if (rest.includes("--help") || rest.includes("-h")) {
    console.log(module.help);
    return 0;
  }
  keptTextureBudget(); // a bad AHA_KEPT_TEXTURE_BYTES stops every command here, before any work
  return (await module.run(rest)) ?? 0;
}

if (import.meta.main) {
  setEntryModule(import.meta.url);
  try {
    Deno.exit(await main(Deno.args));
  } catch (e) {
    if (e instanceof AhaError) {
      console.error(`aha: ${e.message}`);
      Deno.exit(e.status);
    }
    throw e;
  }
}
