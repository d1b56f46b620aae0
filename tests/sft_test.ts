// `aha sft`: supervised fine-tuning lowers the completion loss it trains on (an outcome check),
// and bad rows are rejected with one line naming the file and line.

import assert from "node:assert/strict";
import { loadCheckpoint, saveCheckpoint } from "../core/checkpoint.ts";
import { initWeights } from "../core/init.ts";
import { parseModelConfig, PRESETS, toHfConfig } from "../core/model_config.ts";
import { ArithmeticTokenizer } from "../data/arithmetic.ts";
import { ARITHMETIC_TOKENIZER_FILE } from "../data/tasks.ts";

import { GpuModel } from "../gpu/model.ts";
import { scoreSequences } from "../gpu/score.ts";
import { gpuTest, openGpu } from "./helpers.ts";

const MAIN = new URL("../main.ts", import.meta.url).pathname;
const tokenizer = new ArithmeticTokenizer();
const rows = Array.from(
  { length: 40 },
  (_, i) => ({ prompt: `${i}+${i % 7}=`, completion: `${i + (i % 7)}<end>` }),
);

async function aha(...args: string[]) {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", MAIN, ...args],
    stdout: "piped",
    stderr: "piped",
  })
    .output();
  return { code: out.code, stderr: new TextDecoder().decode(out.stderr) };
}

async function completionLogprob(dir: string): Promise<number> {
  const gpu = await openGpu();
  const { config, weights } = await loadCheckpoint(dir);
  const model = new GpuModel(gpu, config, weights);
  const sequences = rows.map((
    r,
  ) => [...tokenizer.encode(r.prompt), ...tokenizer.encode(r.completion)]);
  const logprobs = await scoreSequences(model, sequences);
  model.destroy();
  gpu.destroy();
  // Sum over completion tokens only.
  return rows.reduce((sum, r, i) => {
    const P = tokenizer.encode(r.prompt).length;
    return sum + logprobs[i].slice(P - 1).reduce((a, b) => a + b, 0);
  }, 0) / rows.length;
}

Deno.test("aha sft raises the log-likelihood of the trained completions", gpuTest, async () => {
  const dir = await Deno.makeTempDir();
  const config = parseModelConfig({ ...PRESETS.tiny, vocab_size: tokenizer.vocabSize });
  await saveCheckpoint(`${dir}/model`, toHfConfig(config), initWeights(config, 3), {
    [ARITHMETIC_TOKENIZER_FILE]: "{}",
  });
  await Deno.writeTextFile(
    `${dir}/rows.jsonl`,
    rows.map((r) => JSON.stringify(r)).join("\n") + "\n",
  );
  const run = await aha(
    "sft",
    "--model",
    `${dir}/model`,
    "--data",
    `${dir}/rows.jsonl`,
    "--out",
    `${dir}/tuned`,
    "--steps",
    "40",
    "--batch-size",
    "16",
    "--learning-rate",
    "3e-3",
  );
  assert.equal(run.code, 0, run.stderr);
  const before = await completionLogprob(`${dir}/model`),
    after = await completionLogprob(`${dir}/tuned`);
  // A random model is near −log(18) ≈ −2.9 per token; 40 steps must gain at least 1 nat per row.
  assert.ok(after > before + 1, `before ${before}, after ${after}`);
  await Deno.writeTextFile(`${dir}/bad.jsonl`, `{"prompt": "1+1="}\n`);
  const bad = await aha("sft", "--model", `${dir}/model`, "--data", `${dir}/bad.jsonl`);
  assert.equal(bad.code, 1);
  assert.match(
    bad.stderr,
    /bad\.jsonl:1: expected \{"prompt": string, "completion": non-empty string\}/,
  );
  await Deno.remove(dir, { recursive: true });
});
