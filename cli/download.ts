// `aha download`: a model (or dataset) from the Hugging Face Hub into the shared Hugging Face
// cache, exactly as every other command fetches a Hub id on its own (data/hub.ts); prints the
// snapshot directory, which any command accepts as a model directory.

import { parseCommandArgs } from "./args.ts";
import { UsageError } from "../core/errors.ts";
import { downloadRepo, parseHubId } from "../data/hub.ts";

export const help = `usage: aha download ID [--revision R] [--include GLOB ...] [--dataset]

Downloads ORG/NAME[@revision] from the Hugging Face Hub into the Hugging Face cache
($HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub) and prints the local snapshot
directory. Files already there are not fetched again; a partial file is resumed.

  --revision R     a branch, tag or commit (default: main, or the @revision of ID)
  --include GLOB   only files matching GLOB (repeatable; * within a folder, ** across folders);
                   default for a model: config.json, tokenizer files, generation_config.json
                   and the safetensors weights (all shards of the index)
  --dataset        ID is a dataset repository (default: a model)

Environment: HF_ENDPOINT (default https://huggingface.co), HF_TOKEN (else the token file
$HF_HOME/token) for private or gated repositories, HF_HUB_OFFLINE=1 to use the cache only.`;

export async function run(args: string[]): Promise<void> {
  const { values, positionals } = parseCommandArgs("download", args, {
    revision: { type: "string" },
    include: { type: "string", multiple: true },
    dataset: { type: "boolean", default: false },
  }, true);
  if (positionals.length !== 1) {
    throw new UsageError(
      `download: expected one repository id (ORG/NAME), got ${positionals.length}`,
    );
  }
  const repo = parseHubId(positionals[0], values.dataset ? "dataset" : "model");
  if (repo === null) {
    throw new UsageError(`download: "${positionals[0]}" is not a Hub id (ORG/NAME[@revision])`);
  }
  if (values.revision) repo.revision = values.revision as string;
  console.log(await downloadRepo(repo, (values.include ?? []) as string[]));
}
