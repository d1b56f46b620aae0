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
import type { PolicyEngine, TokenBatch } from "../core/engine.ts";
import { runSft } from "../core/sft.ts";
import { assertClose, gpuTest, openGpu, runAha as aha } from "./helpers.ts";

const tokenizer = new ArithmeticTokenizer();
const rows = Array.from(
  { length: 40 },
  (_, i) => ({ prompt: `${i}+${i % 7}=`, completion: `${i + (i % 7)}<end>` }),
);

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
  // A training checkpoint's state and the built-in base's recipe stay behind; the model's
  // other files (its tokenizer, a generation config) go with the new weights.
  const trainingState = [
    "trainer_state.json",
    "optimizer.safetensors",
    "train_config.yaml",
    "reference.safetensors",
    "pretraining.json",
  ];
  await saveCheckpoint(`${dir}/model`, toHfConfig(config), initWeights(config, 3), {
    [ARITHMETIC_TOKENIZER_FILE]: "{}",
    "generation_config.json": "{}",
    ...Object.fromEntries(trainingState.map((name) => [name, "x"])),
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
  const tuned = [...Deno.readDirSync(`${dir}/tuned`)].map((e) => e.name).sort();
  assert.deepEqual(
    tuned,
    [ARITHMETIC_TOKENIZER_FILE, "config.json", "generation_config.json", "model.safetensors"]
      .sort(),
  );
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

/**
 * A fake policy for runSft: log p of the token at position i of `row` in its call-th batch (from
 * 1) is `logp(call, row, i)`. It records each batch and the dLogp runSft returns for it.
 */
function fakePolicy(logp: (call: number, row: number[], i: number) => number) {
  const calls: { batch: TokenBatch; dLogp: number[][]; loss: number }[] = [];
  let call = 0;
  const policy = {
    accumulateGradients: async (
      batch: TokenBatch,
      _inv: number,
      fn: (lp: number[][]) => Promise<number[][]>,
    ) => {
      call++;
      const lp = batch.rows.map((row, b) =>
        row.slice(batch.promptLens[b]).map((_, t) => logp(call, row, batch.promptLens[b] + t))
      );
      calls.push({ batch, dLogp: await fn(lp), loss: 0 });
    },
    optimizerStep: () => Promise.resolve(1),
  };
  return { policy, calls };
}

Deno.test("runSft trains on completion tokens only: the batch, its masks and the loss", async () => {
  // A fake policy records what runSft hands it; log p of each token is a known function.
  const logp = (row: number[], t: number) => -0.1 * ((row[t] + t) % 5) - 0.2;
  const fake = fakePolicy((_call, row, t) => logp(row, t)), calls = fake.calls;
  const policy = fake.policy as unknown as PolicyEngine;
  let loss = 0;
  const sftRows = [
    { promptIds: [1, 2, 3], completionIds: [4, 5] },
    { promptIds: [6], completionIds: [7, 8, 9, 10] },
    { promptIds: [11, 12], completionIds: [13] },
  ];
  await runSft(policy, sftRows, {
    steps: 2,
    batchSize: 3,
    optimizer: { lr: 1, beta1: 0.9, beta2: 0.99, eps: 1e-8, weightDecay: 0, maxGradNorm: 1 },
    warmupSteps: 1,
    seed: 0,
    // A step's loss is reported once it arrives, after the next step is recorded.
    onStep: (step, l) => {
      loss = l;
      calls[step - 1].loss = l;
    },
  });
  assert.equal(calls.length, 2);
  for (const { batch, dLogp, loss: stepLoss } of calls) {
    const tokens = batch.rows.reduce((n, row, b) => n + row.length - batch.promptLens[b], 0);
    let nll = 0;
    batch.rows.forEach((row, b) => {
      const source = sftRows.find((r) => r.promptIds[0] === row[0])!;
      assert.deepEqual(row, [...source.promptIds, ...source.completionIds]);
      assert.equal(batch.promptLens[b], source.promptIds.length, "prompt tokens are masked");
      assert.deepEqual(dLogp[b], source.completionIds.map(() => -1 / tokens));
      source.completionIds.forEach((_, t) => nll -= logp(row, source.promptIds.length + t));
    });
    assert.equal(tokens, 7);
    assertClose([stepLoss], [nll / tokens], 1e-12, 0, "mean completion-token NLL");
  }
  assert.ok(loss > 0);
});

Deno.test("runSft stops at a NaN loss with one line naming the step", async () => {
  const policy = fakePolicy((call) => call > 1 ? NaN : -1).policy as unknown as PolicyEngine;
  await assert.rejects(
    () =>
      runSft(policy, [{ promptIds: [1], completionIds: [2] }], {
        steps: 5,
        batchSize: 1,
        optimizer: { lr: 1, beta1: 0.9, beta2: 0.99, eps: 1e-8, weightDecay: 0, maxGradNorm: 1 },
        warmupSteps: 1,
        seed: 0,
      }),
    /^AhaError: sft step 2: the loss is NaN; nothing was saved/,
  );
});

Deno.test("runSft reads the gradient norm every 10 steps and reports every step's loss", async () => {
  // An engine that can step without reading: only every 10th step (and the last) reads back.
  const reads: number[] = [], reported: number[] = [];
  const fake = fakePolicy((call) => -call);
  const policy = {
    ...fake.policy,
    optimizerStep: () => {
      reads.push(fake.calls.length);
      return Promise.resolve(1);
    },
    optimizerStepUnread: () => {},
  } as unknown as PolicyEngine;
  const options = {
    steps: 25,
    batchSize: 1,
    optimizer: { lr: 1, beta1: 0.9, beta2: 0.99, eps: 1e-8, weightDecay: 0, maxGradNorm: 1 },
    warmupSteps: 1,
    seed: 0,
    onStep: (s: number, loss: number) => {
      reported.push(s);
      assert.equal(loss, s, `step ${s}'s own loss`);
    },
  };
  await runSft(policy, [{ promptIds: [1], completionIds: [2] }], options);
  assert.deepEqual(reads, [10, 20, 25]);
  assert.deepEqual(reported, Array.from({ length: 25 }, (_, i) => i + 1));
  // A NaN between reads is still named by its own step.
  const nanAt13 = {
    ...policy,
    accumulateGradients: fakePolicy((call) => call === 13 ? NaN : -1).policy.accumulateGradients,
  } as unknown as PolicyEngine;
  await assert.rejects(
    () =>
      runSft(nanAt13, [{ promptIds: [1], completionIds: [2] }], { ...options, onStep: () => {} }),
    /^AhaError: sft step 13: the loss is NaN; nothing was saved/,
  );
});
