// The shared evaluation (core/evaluate.ts): pass@k against a brute-force enumeration of every
// k-subset of the samples; evaluatePolicy on a scripted policy whose right answers per prompt
// are known (greedy accuracy, format rate, pass@k, mean rewards, one record per prompt, the
// user's async reward function overlapping generation); the eval_prompts selection; and
// `aha eval` on a tiny model in a subprocess, its summary recomputed from its own JSONL lines,
// and with a LoRA adapter, equal to the merged model's.

import assert from "node:assert/strict";
import { saveCheckpoint } from "../core/checkpoint.ts";
import type { Completions, PolicyEngine, SamplingOptions } from "../core/engine.ts";
import {
  EVAL_ALL_LIMIT,
  type EvalRecord,
  evalSelection,
  evaluatePolicy,
  passAtK,
  reportedKs,
} from "../core/evaluate.ts";
import { initWeights } from "../core/init.ts";
import { initLora, saveAdapter } from "../core/lora.ts";
import { Rng } from "../core/rng.ts";
import { parseModelConfig, PRESETS, toHfConfig } from "../core/model_config.ts";
import { defaultLoraConfig, loadTrainConfig } from "../core/train_config.ts";
import { arithCorrect, arithFormat, ArithmeticTokenizer } from "../data/arithmetic.ts";
import { ARITHMETIC_TOKENIZER_FILE, arithmeticTask } from "../data/tasks.ts";
import { gpuTest } from "./helpers.ts";

const MAIN = new URL("../main.ts", import.meta.url).pathname;

/** The share of k-subsets of n samples (c of them right) holding at least one right one. */
function bruteForcePassAtK(n: number, c: number, k: number): number {
  let hit = 0, all = 0;
  for (let mask = 0; mask < 1 << n; mask++) {
    let bits = 0, right = false;
    for (let i = 0; i < n; i++) {
      if (mask & (1 << i)) {
        bits++;
        if (i < c) right = true;
      }
    }
    if (bits !== k) continue;
    all++;
    if (right) hit++;
  }
  return hit / all;
}

Deno.test("pass@k is the share of k-subsets holding a right sample", () => {
  for (let n = 1; n <= 10; n++) {
    for (let c = 0; c <= n; c++) {
      for (let k = 1; k <= n; k++) {
        const want = bruteForcePassAtK(n, c, k);
        assert.ok(Math.abs(passAtK(n, c, k) - want) < 1e-12, `n=${n} c=${c} k=${k}`);
      }
    }
  }
  assert.throws(() => passAtK(4, 1, 5), RangeError);
  assert.deepEqual(reportedKs(8), [1, 2, 4, 8]);
  assert.deepEqual(reportedKs(6), [1, 2, 4, 6]);
  assert.deepEqual(reportedKs(0), []);
});

Deno.test("eval_prompts: all held-out prompts when few, else a fixed sample said so", () => {
  assert.equal(evalSelection(null, 100).count, 100);
  assert.match(evalSelection(null, 100).note, /^all 100 held-out prompts$/);
  const large = evalSelection(null, 1319);
  assert.equal(large.count, EVAL_ALL_LIMIT);
  assert.match(large.note, /fixed sample: the first 200 of 1319/);
  assert.equal(evalSelection(50, 1319).count, 50);
  assert.equal(evalSelection(500, 30).count, 30);
});

/** Answers prompt g right greedily when g is even; of its n samples, the first g % (n + 1) are
 * right (and in the canonical format), the rest wrong ("0 0<end>": two numbers). */
class ScriptedPolicy {
  readonly description = "scripted";
  readonly calls: { rows: number; temperature: number }[] = [];
  constructor(
    private readonly tokenizer: ArithmeticTokenizer,
    private readonly index: Map<string, number>,
  ) {}

  generate(prompts: number[][], groupSize: number, opts: SamplingOptions): Promise<Completions> {
    this.calls.push({ rows: prompts.length * groupSize, temperature: opts.temperature });
    const tokens: number[][] = [];
    for (const ids of prompts) {
      const prompt = this.tokenizer.decode(ids);
      const g = this.index.get(prompt)!;
      const [a, b] = prompt.slice(0, -1).split("+").map(Number);
      for (let j = 0; j < groupSize; j++) {
        const right = opts.temperature === 0 ? g % 2 === 0 : j < g % (groupSize + 1);
        tokens.push(this.tokenizer.encode(right ? `${a + b}<end>` : "0 0<end>"));
      }
    }
    return Promise.resolve({
      tokens,
      logprobs: tokens.map((t) => t.map(() => 0)),
      truncated: tokens.map(() => false),
    });
  }
}

Deno.test("evaluatePolicy: greedy accuracy, format, pass@k, rewards, one record per prompt", async () => {
  const cfg = loadTrainConfig(null, ["arithmetic.held_out=7"]);
  // A user reward that is slow and asynchronous: its scoring overlaps the next generation.
  let inFlight = 0, overlapped = false;
  const policyCalls: number[] = [];
  const lengthReward = async (batch: { completions: string[]; a: unknown[] }) => {
    inFlight++;
    await new Promise((r) => setTimeout(r, 30));
    inFlight--;
    assert.equal(batch.a.length, batch.completions.length, "dataset columns arrive per row");
    return batch.completions.map((c) => c.length / 10);
  };
  const task = arithmeticTask(
    loadTrainConfig(null, [
      "arithmetic.held_out=7",
      "reward_funcs=[arith_correct, arith_format, ./length.ts#len]",
      "reward_weights=[1, 0.5, 2]",
    ]),
    new Map([[`${Deno.cwd()}/length.ts#len`, lengthReward as never]]),
  );
  const tokenizer = new ArithmeticTokenizer();
  const index = new Map(task.heldOut.map((e, g) => [e.prompt, g]));
  const scripted = new ScriptedPolicy(tokenizer, index);
  const policy = new Proxy(scripted, {
    get: (target, key) =>
      key === "generate"
        ? (...args: Parameters<ScriptedPolicy["generate"]>) => {
          policyCalls.push(inFlight);
          if (inFlight > 0) overlapped = true;
          return target.generate(...args);
        }
        : Reflect.get(target, key),
  }) as unknown as PolicyEngine;
  const n = 4;
  const records: EvalRecord[] = [];
  const result = await evaluatePolicy(task, policy, task.heldOut, {
    numSamples: n,
    temperature: 0.7,
    topP: 1,
    topK: 0,
    maxNewTokens: 6,
    batchRows: 8, // two prompts × four samples per call
    seed: 1,
    rewardErrors: "fail",
  }, (r) => {
    records.push(r);
  });
  assert.equal(cfg.arithmetic.held_out, 7);
  const G = task.heldOut.length;
  assert.equal(records.length, G);
  assert.ok(overlapped, "scoring a batch overlaps generating the next");
  assert.ok(scripted.calls.every((c) => c.rows <= 8 || c.temperature === 0));

  // Expected figures, from the script.
  const greedyRight = [...Array(G).keys()].filter((g) => g % 2 === 0).length;
  assert.equal(result.accuracy, greedyRight / G);
  assert.equal(result.format_rate, greedyRight / G, "wrong answers are not canonical");
  for (const k of [1, 2, 4]) {
    const want = [...Array(G).keys()].reduce((a, g) =>
      a + bruteForcePassAtK(n, g % (n + 1), k), 0) / G;
    assert.ok(Math.abs(result[`pass@${k}`] - want) < 1e-12, `pass@${k}`);
  }
  // Rewards recomputed from the records with the built-in functions and the length reward.
  let greedyReward = 0, sampleReward = 0;
  records.forEach((r, g) => {
    assert.equal(r.prompt, task.heldOut[g].prompt);
    assert.equal(r.completions.length, n + 1);
    r.completions.forEach((c, i) => {
      const example = task.heldOut[g];
      const total = arithCorrect(r.prompt, c, example) + 0.5 * arithFormat(r.prompt, c) +
        2 * (c.length / 10);
      assert.ok(Math.abs(r.rewards[i].total - total) < 1e-12);
      assert.equal(r.rewards[i].len, c.length / 10, "logged under the export's name");
      assert.equal(r.correct[i], arithCorrect(r.prompt, c, example) > 0);
      if (i === 0) greedyReward += total / G;
      else sampleReward += total / n / G;
    });
  });
  assert.ok(Math.abs(result.reward - greedyReward) < 1e-12);
  assert.ok(Math.abs(result.sample_reward - sampleReward) < 1e-12);
  assert.equal(result.reward_errors, 0);
});

Deno.test(
  "aha eval on a tiny model: the summary is what its JSONL lines say",
  gpuTest,
  async () => {
    const dir = await Deno.makeTempDir({ prefix: "aha-eval-" });
    try {
      const tokenizer = new ArithmeticTokenizer();
      const config = parseModelConfig({
        ...PRESETS.tiny,
        vocab_size: tokenizer.vocabSize,
        eos_token_id: tokenizer.eosIds[0],
      });
      await saveCheckpoint(`${dir}/m`, toHfConfig(config), initWeights(config, 3), {
        [ARITHMETIC_TOKENIZER_FILE]: JSON.stringify({ type: "aha-arithmetic" }) + "\n",
      });
      const out = await new Deno.Command(Deno.execPath(), {
        args: [
          "run",
          "-A",
          MAIN,
          "eval",
          "--model",
          `${dir}/m`,
          "--set",
          "arithmetic.held_out=6",
          "--set",
          "max_completion_length=5",
          "--num-samples",
          "4",
          "--temperature",
          "1.5",
          "--out",
          `${dir}/eval.jsonl`,
        ],
      }).output();
      const stdout = new TextDecoder().decode(out.stdout);
      assert.equal(out.code, 0, new TextDecoder().decode(out.stderr));
      const records: EvalRecord[] = (await Deno.readTextFile(`${dir}/eval.jsonl`)).trim()
        .split("\n").map((l) => JSON.parse(l));
      assert.equal(records.length, 6);
      const mean = (f: (r: EvalRecord) => number) =>
        records.reduce((a, r) => a + f(r), 0) / records.length;
      const pct = (x: number) => `${(100 * x).toFixed(1)}%`;
      assert.match(stdout, /all 6 held-out prompts/);
      assert.match(
        stdout,
        new RegExp(`greedy accuracy +${pct(mean((r) => Number(r.correct[0])))}`),
      );
      assert.match(stdout, new RegExp(`format rate +${pct(mean((r) => Number(r.formatted[0])))}`));
      const pass2 = mean((r) => bruteForcePassAtK(4, r.correct.slice(1).filter(Boolean).length, 2));
      // Samples are ordered right-first for the brute force; only their count matters.
      assert.match(stdout, new RegExp(`pass@2 \\(4 samples, T=1.5\\) +${pct(pass2)}`));
      assert.match(stdout, /pass@1 .*pass@2 .*pass@4/s);
      const greedyReward = mean((r) => r.rewards[0].total);
      assert.match(stdout, new RegExp(`mean reward \\(greedy\\) +${greedyReward.toFixed(3)}`));
      for (const r of records) {
        assert.equal(r.completions.length, 5);
        r.completions.forEach((c, i) =>
          assert.equal(r.rewards[i].arith_format, /^(0|[1-9]\d*)<end>/.test(c) ? 1 : 0)
        );
      }

      // With a LoRA adapter: the greedy completions are those of the model with the adapter
      // merged in (aha merge, itself checked against PyTorch), and not the base model's.
      const lora = { ...defaultLoraConfig(), r: 2, alpha: 4 };
      const tensors = initLora(config, lora, new Rng(5));
      const rng = new Rng(6);
      for (const [name, t] of tensors) {
        if (name.includes("lora_B")) { for (let i = 0; i < t.length; i++) t[i] = 2 * rng.normal(); }
      }
      await saveAdapter(`${dir}/a`, { lora, tensors }, config, `${dir}/m`);
      const aha = async (...args: string[]) => {
        const run = await new Deno.Command(Deno.execPath(), { args: ["run", "-A", MAIN, ...args] })
          .output();
        assert.equal(run.code, 0, new TextDecoder().decode(run.stderr));
      };
      const held = ["--set", "arithmetic.held_out=6", "--set", "max_completion_length=5"];
      await aha("merge", "--model", `${dir}/m`, "--adapter", `${dir}/a`, "--out", `${dir}/merged`);
      await aha(
        "eval",
        "--model",
        `${dir}/m`,
        "--adapter",
        `${dir}/a`,
        ...held,
        "--out",
        `${dir}/a.jsonl`,
      );
      await aha("eval", "--model", `${dir}/merged`, ...held, "--out", `${dir}/merged.jsonl`);
      const greedy = async (path: string) =>
        (await Deno.readTextFile(path)).trim().split("\n").map((l) => JSON.parse(l).completions[0]);
      const withAdapter = await greedy(`${dir}/a.jsonl`);
      assert.deepEqual(withAdapter, await greedy(`${dir}/merged.jsonl`));
      assert.notDeepEqual(withAdapter, records.map((r) => r.completions[0]));
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
);
