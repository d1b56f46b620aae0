// core/trainer.ts against fake engines: what GrpoTrainer.step feeds the loss. A fake policy
// (log-probs a known function of each row and of how many optimizer steps it has taken) and a
// fake reference record every call; the gradient the trainer hands back for each row is
// compared with grpoLoss on rows the test builds itself — advantages and masks by hand, the
// sampling log-probs as logp_old, the reference's log-probs — across micro-batches that split
// groups, num_iterations > 1, scale_rewards false, sync_ref_model, and refill rounds (a worker
// reference asked call by call, its parts joined in order; prompts sampled ahead in calls of any
// size keep the same groups and return the unused ones to the stream). Also: a NaN loss stops
// the run with one line and saves nothing; a step's scalars are taken during the next step but
// before any save, and a failed step saves the last good one (unless one of its updates was
// applied); a stop or a failed evaluation after a step trained saves that step; update k runs
// at the schedule's rate k − 1. No GPU.

import assert from "node:assert/strict";
import type {
  Completions,
  OptimizerHyper,
  PolicyEngine,
  ReferenceEngine,
  SamplingOptions,
  TokenBatch,
} from "../core/engine.ts";
import { AhaError } from "../core/errors.ts";
import { grpoLoss, lossNormalizer, type LossRow } from "../core/grpo.ts";
import type { Task, TaskExample } from "../core/task.ts";
import { defaultTrainConfig, type TrainConfig } from "../core/train_config.ts";
import { grpoLossConfig, GrpoTrainer, type TrainerIO } from "../core/trainer.ts";
import { assertClose } from "./helpers.ts";

const EOS = 0;

/** log p the fake policy gives completion token t of `row` after `version` optimizer steps. */
const policyLogp = (row: number[], t: number, version: number) =>
  -0.3 - 0.07 * ((row[t] * 7 + t * 3) % 11) - 0.11 * version * Math.sin(row[t] + t);
/** The fake reference's log-p: the policy's at version 0 shifted, plus `syncs` times 0.05. */
const referenceLogp = (row: number[], t: number, syncs: number) =>
  policyLogp(row, t, 0) - 0.2 + 0.013 * t + 0.05 * syncs;

class FakePolicy implements PolicyEngine {
  readonly description = "fake policy";
  version = 0;
  /** Per accumulateGradients call: the version, the batch and the d(loss)/d(logp) returned. */
  calls: { version: number; batch: TokenBatch; dLogp: number[][] }[] = [];

  generate(prompts: number[][], G: number, opts: SamplingOptions): Promise<Completions> {
    const tokens: number[][] = [], logprobs: number[][] = [], truncated: boolean[] = [];
    prompts.forEach((prompt, g) => {
      // As the GPU sampler's, the draws are a function of the seed and the row's place in the
      // seed's stream (firstRow + the row), not of the call.
      const position = (opts.firstRow ?? 0) / G + g;
      for (let j = 0; j < G; j++) {
        // Lengths 1–4 differ within a group (so do the rewards); even samples end with EOS.
        const n = 1 + (((position + j + opts.seed) % 4) + 4) % 4; // seeds may be negative
        const row = Array.from({ length: n }, (_, t) => 3 + ((prompt[0] + 5 * j + t) % 13));
        if (j % 2 === 0) row[n - 1] = EOS;
        const full = [...prompt, ...row];
        tokens.push(row);
        logprobs.push(row.map((_, t) => policyLogp(full, prompt.length + t, this.version)));
        truncated.push(j % 2 === 1);
      }
    });
    return Promise.resolve({ tokens, logprobs, truncated });
  }

  completionLogprobs(batch: TokenBatch): Promise<number[][]> {
    return Promise.resolve(this.logprobs(batch));
  }

  private logprobs(batch: TokenBatch): number[][] {
    return batch.rows.map((row, b) =>
      row.slice(batch.promptLens[b]).map((_, t) =>
        policyLogp(row, batch.promptLens[b] + t, this.version)
      )
    );
  }

  async accumulateGradients(
    batch: TokenBatch,
    _invTemperature: number,
    loss: (logprobs: number[][]) => Promise<number[][]>,
  ): Promise<void> {
    const dLogp = await loss(this.logprobs(batch));
    this.calls.push({ version: this.version, batch, dLogp });
  }

  optimizerStep(_hp: OptimizerHyper): Promise<number> {
    this.version++;
    return Promise.resolve(0.5);
  }

  weights(): Promise<Map<string, Float32Array>> {
    return Promise.resolve(new Map([["w", new Float32Array([this.version])]]));
  }
  loadOptimizerState(): void {}
}

class FakeReference implements ReferenceEngine {
  readonly description = "fake reference";
  syncs: { version: number; alpha: number }[] = [];
  completionLogprobs(batch: TokenBatch): Promise<number[][]> {
    return Promise.resolve(
      batch.rows.map((row, b) =>
        row.slice(batch.promptLens[b]).map((_, t) =>
          referenceLogp(row, batch.promptLens[b] + t, this.syncs.length)
        )
      ),
    );
  }
  mixIn(policy: Map<string, Float32Array>, alpha: number): Promise<void> {
    this.syncs.push({ version: policy.get("w")![0], alpha });
    return Promise.resolve();
  }
  close(): Promise<void> {
    return Promise.resolve();
  }
}

/**
 * `evenPromptsEqual`: prompts p0, p2, p4, … get a reward of 1 whatever the completion, so their
 * groups teach nothing and are refilled (three rounds for three prompts a step).
 */
function fakeTask(evenPromptsEqual = false): Task {
  let next = 0;
  const equal = (prompt: string) => evenPromptsEqual && Number(prompt.slice(1)) % 2 === 0;
  const example = (i: number): TaskExample => ({
    prompt: `p${i}`,
    promptIds: [1 + (i % 5), 2, 1 + (i % 3)],
    answer: "",
  });
  return {
    name: "fake",
    eosIds: [EOS],
    // The reward is the completion's length in tokens: it differs within every group (but for
    // the groups evenPromptsEqual makes equal).
    rewards: [{ name: "length", fn: (p, c) => equal(p) ? 1 : c.split(" ").length, weight: 1 }],
    heldOut: [],
    nextExamples: (n) => Array.from({ length: n }, () => example(next++)),
    samplerState: () => ({ epoch: 0, position: next, rng: "1".repeat(32) }),
    restoreSampler: (state) => {
      next = state.position;
    },
    decode: (ids) => ids.join(" "),
    isCorrect: () => false,
    isFormatted: () => false,
  };
}

const silentIO = (saved: number[] = []): TrainerIO => ({
  metrics: () => Promise.resolve(),
  samples: () => Promise.resolve(),
  evaluation: () => Promise.resolve(),
  save: (step) => {
    saved.push(step);
    return Promise.resolve();
  },
  stopRequested: () => false,
});

/** The fake's gradient norm is NaN at its `version`-th optimizer step (the step that diverges). */
function nanNormAt(policy: FakePolicy, version: number): void {
  const optimizerStep = policy.optimizerStep.bind(policy);
  policy.optimizerStep = async (hp) => {
    const norm = await optimizerStep(hp);
    return policy.version === version ? NaN : norm;
  };
}

/** Sampling fails once the fake has taken `version` optimizer steps (in step version + 1). */
function failSamplingAt(policy: FakePolicy, version: number): void {
  const generate = policy.generate.bind(policy);
  policy.generate = (prompts, G, opts) => {
    if (policy.version === version) throw new AhaError("the sampler broke");
    return generate(prompts, G, opts);
  };
}

function config(overrides: Partial<TrainConfig>): TrainConfig {
  return {
    ...defaultTrainConfig(),
    prompts_per_step: 3,
    num_generations: 4,
    micro_batch_size: 5, // 12 rows in micro-batches of 5, 5, 2: groups split across them
    beta: 0.1,
    epsilon: 0.2,
    eval_steps: 0,
    sample_steps: 0,
    save_steps: 0,
    ...overrides,
  };
}

/**
 * Runs `steps` steps and checks every gradient the trainer handed back against grpoLoss on
 * rows built here: per optimizer version, the concatenated micro-batches are the whole batch.
 */
async function checkFedToLoss(
  cfg: TrainConfig,
  steps: number,
  policy = new FakePolicy(),
  reference = new FakeReference(),
  task = fakeTask(),
) {
  const trainer = new GrpoTrainer(cfg, task, policy, reference, silentIO());
  let callsChecked = 0;
  for (let step = 1; step <= steps; step++) {
    const sampled = policy.version;
    const syncsBefore = reference.syncs.length;
    const firstCall = policy.calls.length;
    await trainer.step(step);
    if (cfg.sync_ref_model && step % cfg.ref_model_sync_steps === 0) {
      // The trainer's run() syncs; step() alone does not: do what run() does, through the fake.
      await reference.mixIn(await policy.weights(), cfg.ref_model_mixup_alpha);
    }
    const calls = policy.calls.slice(firstCall);
    const perIteration = Math.ceil(
      (cfg.prompts_per_step * cfg.num_generations) /
        cfg.micro_batch_size,
    );
    assert.equal(calls.length, cfg.num_iterations * perIteration, "micro-batches per step");
    for (let k = 0; k < cfg.num_iterations; k++) {
      const group = calls.slice(k * perIteration, (k + 1) * perIteration);
      assert.ok(group.every((c) => c.version === sampled + k), "one optimizer step per pass");
      assert.ok(
        group.slice(0, -1).every((c) => c.batch.rows.length === cfg.micro_batch_size),
        "micro-batch sizes",
      );
      const rows = group.flatMap((c) => c.batch.rows);
      const promptLens = group.flatMap((c) => c.batch.promptLens);
      const got = group.flatMap((c) => c.dLogp);
      assert.equal(rows.length, cfg.prompts_per_step * cfg.num_generations);
      // Built by hand: completions, their sampling log-probs, masks, rewards and advantages.
      const completions = rows.map((row, b) => row.slice(promptLens[b]));
      const masks = completions.map((c) => c.map(() => 1)); // EOS only ever ends a completion
      const rewards = completions.map((c) => c.length);
      const G = cfg.num_generations;
      const advantages = rewards.map((r, i) => {
        const g = rewards.slice(i - (i % G), i - (i % G) + G);
        const mean = g.reduce((a, b) => a + b, 0) / G;
        const std = Math.sqrt(g.reduce((a, x) => a + (x - mean) ** 2, 0) / (G - 1));
        return cfg.scale_rewards ? (r - mean) / (std + 1e-4) : r - mean;
      });
      const lossRows: LossRow[] = rows.map((row, b) => {
        const ts = completions[b].map((_, t) => promptLens[b] + t);
        return {
          logp: ts.map((t) => policyLogp(row, t, sampled + k)),
          oldLogp: cfg.num_iterations > 1 ? ts.map((t) => policyLogp(row, t, sampled)) : null,
          refLogp: cfg.beta > 0 ? ts.map((t) => referenceLogp(row, t, syncsBefore)) : null,
          mask: masks[b],
          advantage: advantages[b],
        };
      });
      const lossConfig = grpoLossConfig(cfg);
      const want = grpoLoss(lossRows, lossConfig, lossNormalizer(lossConfig, masks)).dLogp;
      got.forEach((row, b) =>
        assertClose(row, want[b], 1e-12, 1e-9, `step ${step} pass ${k} row ${b}`)
      );
      callsChecked += group.length;
    }
  }
  return { callsChecked, reference };
}

Deno.test("the trainer feeds the loss the policy, old and reference log-probs, across micro-batches", async () => {
  const { callsChecked } = await checkFedToLoss(config({}), 2);
  assert.equal(callsChecked, 6);
});

Deno.test("micro-batches that split the batch get each group's completions longest first", async () => {
  /** Per pass of each step, every group's completion lengths in the order the loss got them. */
  const groupLengths = async (cfg: TrainConfig) => {
    const policy = new FakePolicy();
    await checkFedToLoss(cfg, 2, policy); // the gradients still match grpoLoss
    const lengths = policy.calls.flatMap((c) =>
      c.batch.rows.map((row, b) => row.length - c.batch.promptLens[b])
    );
    const G = cfg.num_generations;
    return Array.from({ length: lengths.length / G }, (_, g) => lengths.slice(g * G, (g + 1) * G));
  };
  const longestFirst = (lengths: number[]) =>
    lengths.every((n, i) => i === 0 || lengths[i - 1] >= n);
  // Micro-batches of 2 and 5 split the 12 rows: every group's rows come longest first.
  for (const micro of [2, 5]) {
    const groups = await groupLengths(config({ micro_batch_size: micro }));
    assert.equal(groups.length, 6);
    for (const lengths of groups) assert.ok(longestFirst(lengths), `${micro}: ${lengths}`);
  }
  // One micro-batch of all 12: the sampling order, which the fake draws unsorted.
  const whole = await groupLengths(config({ micro_batch_size: 12 }));
  assert.ok(whole.some((lengths) => !longestFirst(lengths)), JSON.stringify(whole));
});

Deno.test("num_iterations > 1: later passes use the sampling log-probs as logp_old", async () => {
  const { callsChecked } = await checkFedToLoss(config({ num_iterations: 3 }), 2);
  assert.equal(callsChecked, 18);
});

Deno.test("scale_rewards false: advantages are r − mean", async () => {
  const { callsChecked } = await checkFedToLoss(config({ scale_rewards: false }), 1);
  assert.equal(callsChecked, 3);
});

/** Records the fake engines' calls in `events`: "sample <prompts>", "reference <rows>". */
function recordCalls(policy: FakePolicy, reference: FakeReference, events: string[]): void {
  const generate = policy.generate.bind(policy);
  policy.generate = (prompts, G, opts) => {
    events.push(`sample ${prompts.length}`);
    return generate(prompts, G, opts);
  };
  const completionLogprobs = reference.completionLogprobs.bind(reference);
  reference.completionLogprobs = (batch) => {
    events.push(`reference ${batch.rows.length}`);
    return completionLogprobs(batch);
  };
}

Deno.test("refill rounds: a reference without held log-probs is asked call by call, in order", async () => {
  // A worker reference computes in another process: the groups kept so far go to it before each
  // later generation call, and its parts must meet their rows in the loss (checkFedToLoss).
  const policy = new FakePolicy(), reference = new FakeReference(), events: string[] = [];
  recordCalls(policy, reference, events);
  const cfg = config({ prompts_per_generation: 2 });
  const { callsChecked } = await checkFedToLoss(cfg, 2, policy, reference, fakeTask(true));
  assert.equal(callsChecked, 6);
  // Step 1 samples p0, p1 (keeps p1); p2, p3 (round 0 ends at p2; keeps p3); p4, p5 (round 1
  // ends at p4; round 2 keeps p5). Step 2 likewise from p6.
  const step = ["sample 2", "reference 4", "sample 2", "reference 4", "sample 2", "reference 4"];
  assert.deepEqual(events, [...step, ...step]);
});

Deno.test("prompts sampled ahead: any prompts_per_generation keeps the groups the refill rounds keep", async () => {
  // Three prompts a step with even ones equal: p0–p2 keep p1, the first refill p3–p4 keeps p3,
  // the second p5. However the calls split the step, each row is drawn as its position's, the
  // same groups train, and the prompts sampled past p5 go back to the stream for step 2.
  const run = async (prompts_per_generation: number | null) => {
    const policy = new FakePolicy(), reference = new FakeReference();
    // Completion tokens sampled per step (the fake takes one optimizer step a step).
    const tokens: number[] = [];
    const generate = policy.generate.bind(policy);
    policy.generate = async (prompts, G, opts) => {
      const out = await generate(prompts, G, opts);
      tokens[policy.version] = (tokens[policy.version] ?? 0) +
        out.tokens.reduce((n, t) => n + t.length, 0);
      return out;
    };
    const task = fakeTask(true), metrics: Record<string, number>[] = [];
    // A user reward that fails on every fourth prompt's completions, scored 0 and counted
    // (reward_errors skip): a prompt sampled ahead and handed back counts in the step using it.
    task.rewards.push({
      name: "picky",
      weight: 0,
      source: "test",
      batch: ({ prompts }) => prompts.map((p) => Number(p.slice(1)) % 4 === 0 ? NaN : 0),
    });
    const cfg = config({ prompts_per_generation, max_steps: 3, reward_errors: "skip" });
    const io = {
      ...silentIO(),
      metrics: (_: number, m: Record<string, number>) => {
        metrics.push(m);
        return Promise.resolve();
      },
    };
    await new GrpoTrainer(cfg, task, policy, reference, io).run(0);
    const [next] = task.nextExamples(1);
    // Everything but the timings, and what each call sampled.
    const skip = [
      "generate_s",
      "reference_s",
      "train_s",
      "step_s",
      "tokens_per_s",
      "prompts_sampled",
    ];
    const results = metrics.map((m) =>
      Object.fromEntries(Object.entries(m).filter(([k]) => !skip.includes(k)))
    );
    return {
      calls: policy.calls,
      results,
      sampled: metrics.map((m) => m.prompts_sampled),
      next: next.prompt,
      tokens,
      throughput: metrics.map((m) => m.tokens_per_s * m.step_s),
    };
  };
  const roundByRound = await run(1);
  assert.deepEqual(roundByRound.sampled, [6, 6, 6]);
  assert.equal(roundByRound.next, "p18");
  for (const m of roundByRound.results) {
    // The first round's p0 and p2 (p6, p8; …) teach nothing; the refills make up for them.
    assert.equal(m.frac_reward_zero_std, 2 / 3);
    assert.equal(m.groups_trained, 3);
  }
  // p0, p4 (step 1), p8 (step 2), p12, p16 (step 3), 4 completions each.
  assert.deepEqual(roundByRound.results.map((m) => m.reward_errors), [8, 4, 8]);
  // tokens_per_s × step_s: the completion tokens of every call the step made, sampled-ahead
  // prompts included.
  for (const perCall of [null, 4, 9]) {
    const ahead = await run(perCall);
    assertClose(ahead.throughput, ahead.tokens, 1e-9, 1e-9, `prompts_per_generation ${perCall}`);
  }
  for (
    const [perCall, sampled] of [
      [null, [9, 9, 9]], // the built-in model: 3 × prompts_per_step
      [2, [6, 6, 6]],
      [4, [8, 8, 8]],
      [9, [9, 9, 9]],
      [50, [9, 9, 9]],
    ] as const
  ) {
    const ahead = await run(perCall);
    assert.deepEqual(ahead.sampled, sampled, `prompts_per_generation ${perCall}`);
    assert.deepEqual(ahead.calls, roundByRound.calls, `prompts_per_generation ${perCall}`);
    assert.deepEqual(ahead.results, roundByRound.results, `prompts_per_generation ${perCall}`);
    assert.equal(ahead.next, "p18", `prompts_per_generation ${perCall}`);
  }
});

Deno.test("sync_ref_model: run() mixes the policy into the reference every N steps", async () => {
  const cfg = config({ sync_ref_model: true, ref_model_sync_steps: 2, ref_model_mixup_alpha: 0.3 });
  const policy = new FakePolicy(), reference = new FakeReference();
  await new GrpoTrainer({ ...cfg, max_steps: 5 }, fakeTask(), policy, reference, silentIO())
    .run(0);
  // After steps 2 and 4, with the policy as it was then (one optimizer step per step).
  assert.deepEqual(reference.syncs, [{ version: 2, alpha: 0.3 }, { version: 4, alpha: 0.3 }]);
  // And the loss of later steps sees the synced reference.
  const { callsChecked } = await checkFedToLoss(cfg, 4);
  assert.equal(callsChecked, 12);
});

Deno.test("a NaN loss stops the run with one line and saves nothing", async () => {
  const policy = new FakePolicy(), saved: number[] = [];
  let step = 0;
  policy.completionLogprobs = () => Promise.resolve([]);
  const accumulate = policy.accumulateGradients.bind(policy);
  policy.accumulateGradients = (batch, t, loss) =>
    accumulate(
      batch,
      t,
      (logprobs) => loss(step >= 2 ? logprobs.map((r) => r.map(() => NaN)) : logprobs),
    );
  const optimizerStep = policy.optimizerStep.bind(policy);
  policy.optimizerStep = (hp) => {
    step++;
    return optimizerStep(hp);
  };
  const trainer = new GrpoTrainer(
    config({ max_steps: 4 }),
    fakeTask(),
    policy,
    new FakeReference(),
    silentIO(saved),
  );
  await assert.rejects(
    () => trainer.run(0),
    (e: Error) => e instanceof AhaError && /^step 3: the loss is NaN/.test(e.message),
  );
  assert.deepEqual(saved, [], "nothing saved over the last good checkpoint");
});

Deno.test("a NaN gradient norm stops the run naming the step, nothing saved over good state", async () => {
  const policy = new FakePolicy(), saved: number[] = [];
  nanNormAt(policy, 2);
  const trainer = new GrpoTrainer(
    config({ max_steps: 4, save_steps: 1 }),
    fakeTask(),
    policy,
    new FakeReference(),
    silentIO(saved),
  );
  await assert.rejects(() => trainer.run(0), /^AhaError: step 2: the gradient norm is NaN/);
  assert.deepEqual(saved, [1], "step 1 saved; the diverged step 2 never is");
});

Deno.test("a step's scalars are taken during the next step, and before any save or evaluation", async () => {
  // The fake's gradient norm (0.1 × its version) arrives only when the next step samples, or
  // after 20 ms: a trainer that waited for it before going on would see it arrive late.
  const policy = new FakePolicy(), events: string[] = [];
  let unresolved: (() => void)[] = [];
  const generate = policy.generate.bind(policy);
  policy.generate = (prompts, G, opts) => {
    unresolved.forEach((arrive) => arrive());
    unresolved = [];
    // Labelled by the step sampling (refill rounds sample again within a step: logged once).
    const event = `sample for step ${policy.version + 1}`;
    if (events.at(-1) !== event) events.push(event);
    return generate(prompts, G, opts);
  };
  const accumulate = policy.accumulateGradients.bind(policy);
  policy.accumulateGradients = (batch, t, loss) => {
    const event = `train step ${policy.version + 1}`;
    if (events.at(-1) !== event) events.push(event);
    return accumulate(batch, t, loss);
  };
  let late = 0;
  policy.optimizerStep = (_hp) => {
    const norm = 0.1 * ++policy.version;
    return new Promise((resolve) => {
      const arrive = () => resolve(norm);
      unresolved.push(arrive);
      setTimeout(() => {
        if (unresolved.includes(arrive)) late++;
        arrive();
      }, 20);
    });
  };
  const io: TrainerIO = {
    ...silentIO(),
    metrics: (step, m) => {
      events.push(`metrics ${step} ${m.grad_norm.toFixed(1)}`);
      return Promise.resolve();
    },
    save: (step) => {
      events.push(`save ${step}`);
      return Promise.resolve();
    },
  };
  await new GrpoTrainer(config({ max_steps: 5, save_steps: 3 }), fakeTask(), policy, null, io)
    .run(0);
  assert.deepEqual(events, [
    "sample for step 1",
    "train step 1",
    "sample for step 2",
    "metrics 1 0.1", // once step 2 has sampled, before it trains
    "train step 2",
    "sample for step 3",
    "metrics 2 0.2",
    "train step 3",
    "metrics 3 0.3", // a step that saves takes its own scalars first
    "save 3",
    "sample for step 4",
    "train step 4",
    "sample for step 5",
    "metrics 4 0.4",
    "train step 5",
    "metrics 5 0.5",
    "save 5",
  ]);
  assert.equal(late, 2, "only the saved steps (3 and 5) waited for their norm");
});

Deno.test("a step that fails after one that diverged reports the divergence and saves nothing", async () => {
  const policy = new FakePolicy(), saved: number[] = [];
  nanNormAt(policy, 2);
  failSamplingAt(policy, 2);
  const trainer = new GrpoTrainer(
    config({ max_steps: 4 }),
    fakeTask(),
    policy,
    new FakeReference(),
    silentIO(saved),
  );
  await assert.rejects(() => trainer.run(0), /^AhaError: step 2: the gradient norm is NaN/);
  assert.deepEqual(saved, [], "the diverged step 2 is not saved over step 1's checkpoint");
});

Deno.test("a step that fails after a good one saves the good one", async () => {
  const policy = new FakePolicy(), saved: number[] = [];
  failSamplingAt(policy, 2);
  const metrics: number[] = [];
  const io = {
    ...silentIO(saved),
    metrics: (step: number) => (metrics.push(step), Promise.resolve()),
  };
  const trainer = new GrpoTrainer(config({ max_steps: 4 }), fakeTask(), policy, null, io);
  await assert.rejects(() => trainer.run(0), /the sampler broke/);
  assert.deepEqual(metrics, [1, 2], "both finished steps are logged");
  assert.deepEqual(saved, [2], "step 2, the last finished one, is saved");
});

Deno.test("a save that fails as the run gives up is added to the error that stopped it", async () => {
  // A full disk: step 2's metrics line cannot be appended (it is taken while step 3 samples), and
  // the save of step 2 that follows fails too.
  const full = (path: string) => new AhaError(`${path}: No space left on device`);
  const io: TrainerIO = {
    ...silentIO(),
    metrics: (step) => step === 2 ? Promise.reject(full("metrics.jsonl")) : Promise.resolve(),
    save: (step) => Promise.reject(full(`checkpoint-${step}`)),
  };
  const run = (io: TrainerIO) =>
    new GrpoTrainer(config({ max_steps: 4, eval_steps: 2 }), fakeTask(), new FakePolicy(), null, io)
      .run(0);
  await assert.rejects(() => run(io), (e: Error) => {
    assert.ok(e instanceof AhaError);
    assert.equal(
      e.message,
      "metrics.jsonl: No space left on device " +
        "(saving step 2 failed too: checkpoint-2: No space left on device)",
    );
    return true;
  });
  // An error that is not a one-line AhaError (a bug's) is thrown as it was.
  const broken = {
    ...io,
    metrics: () => Promise.resolve(),
    evaluation: () => Promise.reject(new Error("judge broke")),
  };
  await assert.rejects(() => run(broken), (e: Error) => e.message === "judge broke");
});

Deno.test("update k runs at the schedule's rate of update k − 1 from 0: warmup from its first step, none at 0", async () => {
  const policy = new FakePolicy(), lrs: number[] = [], logged: number[] = [];
  const optimizerStep = policy.optimizerStep.bind(policy);
  policy.optimizerStep = (hp) => {
    lrs.push(hp.lr);
    return optimizerStep(hp);
  };
  const io: TrainerIO = {
    ...silentIO(),
    metrics: (_step, m) => (logged.push(m.learning_rate), Promise.resolve()),
  };
  const cfg = config({
    max_steps: 4,
    learning_rate: 1,
    warmup_steps: 2,
    lr_scheduler_type: "linear",
  });
  await new GrpoTrainer(cfg, fakeTask(), policy, null, io).run(0);
  // Warmup 1/2 then 2/2, then linear decay over the two updates left: 1 and 1/2 (0 would be
  // the rate after the last update).
  assert.deepEqual(lrs, [0.5, 1, 1, 0.5]);
  assert.deepEqual(logged, lrs, "the logged rate is the one the step's update ran at");
});

Deno.test("a stop asked for during a step's evaluation saves that step before returning", async () => {
  const saved: number[] = [];
  let stop = false;
  const io: TrainerIO = {
    ...silentIO(saved),
    evaluation: () => (stop = true, Promise.resolve()),
    stopRequested: () => stop,
  };
  const trainer = new GrpoTrainer(
    config({ max_steps: 4, eval_steps: 2 }),
    fakeTask(),
    new FakePolicy(),
    null,
    io,
  );
  assert.equal(await trainer.run(0), 2);
  assert.deepEqual(saved, [2]);
});

Deno.test("an evaluation that fails after its step trained saves that step, then reports the failure", async () => {
  const saved: number[] = [];
  const failing = {
    ...silentIO(saved),
    evaluation: () => Promise.reject(new Error("judge broke")),
  };
  const run = (policy: FakePolicy) =>
    new GrpoTrainer(config({ max_steps: 4, eval_steps: 2 }), fakeTask(), policy, null, failing)
      .run(0);
  await assert.rejects(() => run(new FakePolicy()), /judge broke/);
  assert.deepEqual(saved, [2]);
  // A step whose own scalars diverged is never saved, whatever comes after.
  saved.length = 0;
  const diverging = new FakePolicy();
  nanNormAt(diverging, 2);
  await assert.rejects(() => run(diverging), /^AhaError: step 2: the gradient norm is NaN/);
  assert.deepEqual(saved, []);
});

Deno.test("a step that fails after one of its updates saves nothing: its weights are no step's", async () => {
  // num_iterations 2: step 1 takes the fake from version 0 to 2; step 2 fails in its first pass
  // (version 2, nothing of it applied: step 1 is saved) or in its second (version 3: nothing is).
  for (const [failAt, want] of [[2, [1]], [3, []]] as const) {
    const policy = new FakePolicy(), saved: number[] = [];
    const accumulate = policy.accumulateGradients.bind(policy);
    policy.accumulateGradients = (batch, t, loss) => {
      if (policy.version === failAt) throw new AhaError("the GPU broke");
      return accumulate(batch, t, loss);
    };
    const trainer = new GrpoTrainer(
      config({ max_steps: 3, num_iterations: 2 }),
      fakeTask(),
      policy,
      new FakeReference(),
      silentIO(saved),
    );
    await assert.rejects(() => trainer.run(0), /the GPU broke/);
    assert.deepEqual(saved, want, `failing at version ${failAt}`);
  }
});
