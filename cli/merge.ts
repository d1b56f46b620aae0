// `aha merge`: fold a LoRA adapter into its base model — W + s·B·A for every adapted projection —
// and write a plain Hugging Face checkpoint that any loader reads without PEFT.

import { parseCommandArgs, required } from "./args.ts";
import { loadCheckpoint, saveCheckpoint } from "../core/checkpoint.ts";
import { UsageError } from "../core/errors.ts";
import { loadAdapter, mergeAdapter } from "../core/lora.ts";
import { tokenizerFiles } from "../data/tasks.ts";

export const help = `usage: aha merge --model DIR --adapter DIR --out DIR [--dtype f32|bf16|f16]

Writes OUT, a Hugging Face checkpoint (config.json, model.safetensors, the tokenizer files) of
the base model with the PEFT LoRA adapter folded in: W + s·B·A for every adapted projection,
s = lora_alpha / r (lora_alpha / √r with use_rslora). The merge is summed in float64.

  --model DIR     the base model the adapter was trained on
  --adapter DIR   a PEFT LoRA adapter directory (adapter_config.json, adapter_model.safetensors)
  --out DIR       where to write the merged checkpoint (replaced if it exists)
  --dtype NAME    f32 (default), bf16 or f16: how model.safetensors stores the weights`;

const TORCH_DTYPES = { f32: "float32", bf16: "bfloat16", f16: "float16" } as const;

export async function run(args: string[]): Promise<void> {
  const { values } = parseCommandArgs("merge", args, {
    model: { type: "string" },
    adapter: { type: "string" },
    out: { type: "string" },
    dtype: { type: "string", default: "f32" },
  });
  const modelDir = required("merge", "model", values.model);
  const adapterDir = required("merge", "adapter", values.adapter);
  const out = required("merge", "out", values.out);
  const dtype = values.dtype as string;
  if (!(dtype in TORCH_DTYPES)) {
    throw new UsageError(`merge: --dtype must be f32, bf16 or f16, got "${dtype}"`);
  }
  const base = await loadCheckpoint(modelDir);
  const adapter = await loadAdapter(adapterDir, base.config);
  const merged = mergeAdapter(base.config, base.weights, adapter);
  const hfConfig = { ...base.hfConfig, torch_dtype: TORCH_DTYPES[dtype as "f32"] };
  // The adapter's tokenizer files (a training checkpoint keeps them), else the base's.
  const files = { ...await tokenizerFiles(modelDir), ...await tokenizerFiles(adapterDir) };
  await saveCheckpoint(out, hfConfig, merged, files, dtype as "f32" | "bf16" | "f16");
  const l = adapter.lora;
  console.log(
    `merged ${adapterDir} (r ${l.r}, alpha ${l.alpha}, ${l.target_modules.length} targets) ` +
      `into ${modelDir}: wrote ${out} (${dtype})`,
  );
}
