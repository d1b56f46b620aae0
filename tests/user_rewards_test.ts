// Reward functions of the user's own (core/rewards.ts scoreBatch, loadRewardModule): the batch
// they receive (trl's shape: prompts, completions, every dataset column), weights, async
// functions, and each way one can fail (throw, wrong count, NaN, Infinity) stopping with one
// line naming the function and the completion — or, with reward_errors: skip, scoring 0 and
// counted. Then as a user meets them: `aha rewards` on the README's example module, and
// `aha train` on the built-in task with a module next to its config file, whose scores appear
// in metrics.jsonl under the function's name.

import assert from "node:assert/strict";
import {
  anchorRewardModule,
  formatReward,
  isRewardModule,
  loadRewardModule,
  type RewardBatch,
  rewardModuleName,
  scoreBatch,
  type ToScore,
  type WeightedReward,
} from "../core/rewards.ts";

const MAIN = new URL("../main.ts", import.meta.url).pathname;
const EXAMPLE = new URL("./fixtures/rewards/mine.ts", import.meta.url).pathname;

const items: ToScore[] = ["a", "bb", "ccc"].map((completion, i) => ({
  prompt: `p${i}`,
  completion,
  example: { answer: String(i), columns: { question: `q${i}`, answer: `#### ${i}`, level: i } },
}));

/** A user's function as configTask makes it, from `./r.ts#name`. */
const user = (name: string, batch: (b: RewardBatch) => unknown, weight = 1) =>
  ({ name, batch, source: `./r.ts#${name}`, weight }) as unknown as WeightedReward;

Deno.test("scoreBatch: trl's batch, weights, async functions beside the built-ins", async () => {
  let seen: RewardBatch | null = null;
  const rewards: WeightedReward[] = [
    { name: "format", fn: formatReward, weight: 0.5 },
    user("len", async (b) => {
      seen = b;
      await new Promise((r) => setTimeout(r, 5));
      return new Float64Array(b.completions.map((c) => c.length)); // typed arrays are fine
    }, 2),
  ];
  const { scores, errors } = await scoreBatch(rewards, items);
  assert.deepEqual(seen, {
    prompts: ["p0", "p1", "p2"],
    completions: ["a", "bb", "ccc"],
    question: ["q0", "q1", "q2"],
    answer: ["#### 0", "#### 1", "#### 2"], // the column as the dataset has it
    level: [0, 1, 2],
  });
  assert.deepEqual(scores.map((s) => s.len), [1, 2, 3]);
  assert.deepEqual(scores.map((s) => s.total), [1, 2, 3].map((n) => 2 * n + 0.5 * -1));
  assert.deepEqual(errors, [0, 0, 0]);
});

Deno.test("a failing user function stops with one line naming it and the completion", async () => {
  const cases: [string, (b: RewardBatch) => unknown, RegExp][] = [
    [
      "throws",
      (b) =>
        b.completions.map((c) => {
          if (c === "bb") throw new Error("no bb");
          return 1;
        }),
      /threw "no bb" for completion 2 of 3 \(question "q1"\)/,
    ],
    [
      "count",
      (b) => b.completions.slice(1).map(() => 1),
      /returned 2 values for 3 completions \(a batch/,
    ],
    [
      "nan",
      (b) => b.completions.map((c) => c === "ccc" ? NaN : 0),
      /returned NaN for completion 3/,
    ],
    [
      "inf",
      (b) => b.completions.map((c) => c === "a" ? Infinity : 0),
      /returned Infinity for completion 1/,
    ],
    [
      "shape",
      () => "3",
      /returned string for 3 completions \(a batch beginning with question "q0"\)/,
    ],
    ["text", (b) => b.completions.map(() => "1"), /returned NaN for completion 1 of 3/],
  ];
  for (const [name, fn, message] of cases) {
    const error = await scoreBatch([user(name, fn)], items).then(() => null, (e) => e);
    assert.ok(error, `${name} must fail`);
    assert.match(error.message, new RegExp(`^reward function "${name}" \\(\\./r\\.ts#${name}\\) `));
    assert.match(error.message, message);
    assert.equal(error.message.split("\n").length, 1);
    // With reward_errors: skip, the completions it fails on score 0 and are counted.
    const skipped = await scoreBatch([user(name, fn)], items, "skip");
    const failed = skipped.errors.reduce((a, b) => a + b, 0);
    assert.ok(failed >= 1 && failed <= 3, name);
    assert.ok(skipped.scores.every((s) => Number.isFinite(s.total)));
  }
  const { scores, errors } = await scoreBatch([user("throws", cases[0][1])], items, "skip");
  assert.deepEqual(scores.map((s) => s.throws), [1, 0, 1]);
  assert.deepEqual(errors, [0, 1, 0], "the completion it failed on");
});

Deno.test("module entries: names, anchoring to the config's directory, import errors", async () => {
  assert.ok(isRewardModule("./rewards/mine.ts#lengthPenalty") && isRewardModule("r.js"));
  assert.ok(!isRewardModule("format") && !isRewardModule("correctness"));
  assert.equal(rewardModuleName("./rewards/mine.ts#lengthPenalty"), "lengthPenalty");
  assert.equal(rewardModuleName("./rewards/mine.ts"), "mine");
  assert.equal(anchorRewardModule("./r/mine.ts#f", "/cfg/dir"), "/cfg/dir/r/mine.ts#f");
  assert.equal(anchorRewardModule("/abs/mine.ts#f", "/cfg"), "/abs/mine.ts#f");
  assert.equal(anchorRewardModule("format", "/cfg"), "format");
  const fn = await loadRewardModule(`${EXAMPLE}#lengthPenalty`);
  assert.deepEqual(await fn({ prompts: [""], completions: ["x".repeat(1000)] }), [-0.5]);
  await assert.rejects(
    loadRewardModule(`${EXAMPLE}#nope`),
    /has no function export "nope" \(its functions: lengthPenalty, thinkHasEquation\)/,
  );
  await assert.rejects(
    loadRewardModule("/no/such/file.ts#f"),
    /reward_funcs: cannot import \/no\/such\/file\.ts/,
  );
});

async function aha(args: string[], cwd?: string) {
  const out = await new Deno.Command(Deno.execPath(), { args: ["run", "-A", MAIN, ...args], cwd })
    .output();
  const text = (b: Uint8Array) => new TextDecoder().decode(b);
  return { code: out.code, stdout: text(out.stdout), stderr: text(out.stderr) };
}

Deno.test("aha rewards runs the README's example module, relative to the config", async () => {
  const dir = await Deno.makeTempDir({ prefix: "aha-rewards-" });
  try {
    await Deno.mkdir(`${dir}/rewards`);
    await Deno.copyFile(EXAMPLE, `${dir}/rewards/mine.ts`);
    await Deno.writeTextFile(
      `${dir}/config.yaml`,
      "reward_funcs: [format, ./rewards/mine.ts#lengthPenalty, ./rewards/mine.ts#thinkHasEquation]\n" +
        "reward_weights: [1, 0.5, 2]\n",
    );
    const rows = [
      { completion: "<think>3 * 4 = 12</think><answer>12</answer>", answer: "12" },
      { completion: "<think>twelve</think><answer>12</answer>", answer: "12" },
      { completion: "12 = 3 * 4", answer: "12" },
    ];
    await Deno.writeTextFile(`${dir}/rows.jsonl`, rows.map((r) => JSON.stringify(r)).join("\n"));
    // Run from elsewhere: the module is found beside the config, not in the current directory.
    const out = await aha([
      "rewards",
      "--config",
      `${dir}/config.yaml`,
      "--input",
      `${dir}/rows.jsonl`,
    ], "/");
    assert.equal(out.code, 0, out.stderr);
    const scores = out.stdout.trim().split("\n").map((l) => JSON.parse(l));
    assert.deepEqual(scores.map((s) => s.thinkHasEquation), [1, 0, 0]);
    scores.forEach((s, i) => {
      const length = -rows[i].completion.length / 2000;
      assert.ok(Math.abs(s.lengthPenalty - length) < 1e-12);
      assert.ok(Math.abs(s.total - (s.format + 0.5 * length + 2 * s.thinkHasEquation)) < 1e-12);
    });
    assert.deepEqual(scores.map((s) => s.format), [1.25, 1.25, -1]);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

const TRAIN = [
  "arithmetic.max_operand=9",
  "arithmetic.held_out=4",
  "sft.steps=5",
  "prompts_per_step=2",
  "num_generations=4",
  "max_completion_length=4",
  "max_steps=2",
  "beta=0",
  "eval_steps=0",
  "sample_steps=0",
].flatMap((s) => ["--set", s]);

Deno.test("aha train on the built-in task with a reward module beside its config", async () => {
  const dir = await Deno.makeTempDir({ prefix: "aha-user-train-" });
  try {
    // The module logs every batch it receives and what it returned.
    await Deno.writeTextFile(
      `${dir}/short.ts`,
      `export async function shortAnswers(batch) {
  const out = batch.completions.map((c) => c.length <= 3 ? 1 : 0);
  await Deno.writeTextFile(${JSON.stringify(`${dir}/calls.jsonl`)},
    JSON.stringify({ batch, out }) + "\\n", { append: true });
  return out;
}
export function throwsOnNine({ question }) {
  return question.map((q) => { if (q.includes("9")) throw new Error("nine!"); return 0; });
}
`,
    );
    await Deno.writeTextFile(
      `${dir}/run.yaml`,
      "reward_funcs: [arith_correct, arith_format, ./short.ts#shortAnswers]\n" +
        "reward_weights: [1, 1, 0.5]\n",
    );
    const run = await aha(
      ["train", `${dir}/run.yaml`, ...TRAIN, "--set", `output_dir=${dir}/out`],
      "/",
    );
    assert.equal(run.code, 0, run.stderr);
    const metrics = (await Deno.readTextFile(`${dir}/out/metrics.jsonl`)).trim().split("\n")
      .map((l) => JSON.parse(l));
    assert.equal(metrics.length, 2);
    const calls = (await Deno.readTextFile(`${dir}/calls.jsonl`)).trim().split("\n")
      .map((l) => JSON.parse(l));
    // A step's first generation call holds 3 × prompts_per_step × num_generations rows (the
    // built-in model samples ahead: prompts_per_generation), refills and evaluations fewer.
    const training = calls.filter((c) => c.batch.completions.length === 24);
    assert.ok(training.length >= 2);
    for (const { batch } of calls) {
      const n = batch.completions.length;
      for (const column of ["prompts", "question", "answer", "a", "b"]) {
        assert.equal(batch[column].length, n, column);
      }
      batch.question.forEach((q: string, i: number) => {
        assert.equal(q, `${batch.a[i]}+${batch.b[i]}=`);
        assert.equal(batch.answer[i], String(batch.a[i] + batch.b[i]));
      });
    }
    // Step 1's logged figure is the mean of what the function returned for step 1's first batch.
    const first = training[0].out as number[];
    assert.equal(metrics[0]["rewards/shortAnswers"], first.reduce((a, b) => a + b, 0) / 8);
    assert.ok(!("reward_errors" in metrics[0]));

    // A function that throws stops the run with one line naming it and the question…
    const fails = await aha([
      "train",
      `${dir}/run.yaml`,
      ...TRAIN,
      "--set",
      `output_dir=${dir}/fails`,
      "--set",
      "arithmetic.max_operand=9",
      "--set",
      `reward_funcs=[arith_correct, ${dir}/short.ts#throwsOnNine]`,
      "--set",
      "reward_weights=null",
    ]);
    assert.equal(fails.code, 1);
    assert.match(
      fails.stderr.trim(),
      /^aha: reward function "throwsOnNine" \(.*short\.ts#throwsOnNine\) threw "nine!" for completion \d+ of \d+ \(question "\d*9\d*\+\d+=|\d+\+\d*9\d*="\)/,
    );
    // …or, with reward_errors: skip, scores 0 and is counted in the metrics.
    const skips = await aha([
      "train",
      `${dir}/run.yaml`,
      ...TRAIN,
      "--set",
      `output_dir=${dir}/skips`,
      "--set",
      `reward_funcs=[arith_correct, ${dir}/short.ts#throwsOnNine]`,
      "--set",
      "reward_weights=null",
      "--set",
      "reward_errors=skip",
    ]);
    assert.equal(skips.code, 0, skips.stderr);
    const skipped = (await Deno.readTextFile(`${dir}/skips/metrics.jsonl`)).trim().split("\n")
      .map((l) => JSON.parse(l));
    assert.ok(skipped.every((m) => Number.isInteger(m.reward_errors)));
    assert.ok(skipped.some((m) => m.reward_errors > 0), "some question holds a 9");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
