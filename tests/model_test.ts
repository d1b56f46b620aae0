// The whole GPU model against independent math: log-probs against golden values from a PyTorch
// Qwen2 (tests/fixtures/make_golden.py), every weight's gradient against the float64 CPU twin,
// and save → load → score. With a LoRA adapter: every A and B gradient against the twin, the
// base weights frozen (no gradients, no moments), PEFT's init and the adapter switched off
// leaving the base model's log-probs.

import assert from "node:assert/strict";
import { loadCheckpoint, saveCheckpoint } from "../core/checkpoint.ts";
import { cpuForwardBackward } from "../core/cpu_model.ts";
import { initWeights } from "../core/init.ts";
import { type Adapter, initLora } from "../core/lora.ts";
import { defaultLoraConfig, defaultTrainConfig, type LoraConfig } from "../core/train_config.ts";
import { saveTrainingCheckpoint, type TrainerState } from "../core/train_state.ts";
import { parseModelConfig, toHfConfig } from "../core/model_config.ts";
import { Rng } from "../core/rng.ts";

import { GpuModel } from "../gpu/model.ts";
import { scoreSequences } from "../gpu/score.ts";
import { assertRowsClose, fixtureCases, GOLDEN_CASES, gpuTest, openGpu } from "./helpers.ts";

const gpu = await openGpu();
const GOLDEN = new URL("./fixtures/golden/", import.meta.url).pathname;

for (const name of fixtureCases(GOLDEN, GOLDEN_CASES)) {
  const entry = { name };
  Deno.test(`GPU log-probs match PyTorch golden values: ${entry.name}`, gpuTest, async () => {
    const dir = GOLDEN + entry.name;
    const expected = JSON.parse(Deno.readTextFileSync(`${dir}/expected.json`));
    const checkpoint = await loadCheckpoint(dir);
    const model = new GpuModel(gpu, checkpoint.config, checkpoint.weights);
    const logprobs = await scoreSequences(model, expected.sequences);
    model.destroy();
    // f32 on the GPU against float64 in PyTorch, on the same (rounded) weights.
    assertRowsClose(logprobs, expected.logprobs, 1e-4, entry.name);
  });
}

// An odd shape: 3 layers, 6 query heads over 2 kv heads, vocab 37, untied, hidden 48.
const oddConfig = parseModelConfig({
  vocab_size: 37,
  hidden_size: 48,
  intermediate_size: 70,
  num_hidden_layers: 3,
  num_attention_heads: 6,
  num_key_value_heads: 2,
  rope_theta: 5000,
  rms_norm_eps: 1e-5,
  tie_word_embeddings: false,
});

// The same with intermediate 64: its gate and up weights (64 × 48 floats) lie on binding
// boundaries, so they are fused into one matrix; oddConfig's (70 × 48) are not. Both fuse q/k/v.
const fusingConfig = parseModelConfig({ ...toHfConfig(oddConfig), intermediate_size: 64 });

/** Which of layer 0's groups are stored as one matrix (their members' views share a buffer). */
function fusedGroups(model: GpuModel) {
  return {
    qkv: model.fusedGroups.includes("model.layers.0.self_attn.qkv"),
    gateUp: model.fusedGroups.includes("model.layers.0.mlp.gate_up"),
  };
}

function randomWeights(seed: number, config = oddConfig) {
  // Larger than init scale so every path (norm weights, biases) carries signal.
  const weights = initWeights(config, seed);
  const rng = new Rng(seed + 1);
  for (const [name, w] of weights) {
    for (let i = 0; i < w.length; i++) {
      w[i] = name.endsWith("norm.weight") ? 1 + 0.3 * rng.normal() : 0.15 * rng.normal();
    }
  }
  return weights;
}

/**
 * Every weight's gradient against the twin's, to 1e-4 of its largest entry (f32 accumulation
 * over a few hundred terms); `passes`: how many backward passes `got` summed.
 */
function assertGradsMatch(
  got: Map<string, Float32Array>,
  want: Map<string, Float64Array>,
  passes = 1,
) {
  for (const [name, expected] of want) {
    const values = got.get(name)!;
    const scale = Math.max(...expected.map(Math.abs));
    let worst = 0;
    for (let i = 0; i < expected.length; i++) {
      worst = Math.max(worst, Math.abs(values[i] / passes - expected[i]));
    }
    assert.ok(worst <= 1e-4 * scale + 1e-6, `${name}: max error ${worst} (scale ${scale})`);
  }
}

// Fused and separate projections must give the same gradients: each case says what it fuses.
// With 32 KiB bindings the 183 tokens' gate/up rows (512 bytes each) run in chunks of 64, 64, 55.
const GRADIENT_CASES = [
  { label: "q/k/v fused", config: oddConfig, fuse: true, fused: { qkv: true, gateUp: false } },
  { label: "all fused", config: fusingConfig, fuse: true, fused: { qkv: true, gateUp: true } },
  { label: "none fused", config: fusingConfig, fuse: false, fused: { qkv: false, gateUp: false } },
  {
    label: "all fused, gate/up in token chunks",
    config: fusingConfig,
    fuse: true,
    fused: { qkv: true, gateUp: true },
    maxBindingBytes: 32 * 1024,
  },
];

for (const { label, config, fuse, fused, maxBindingBytes } of GRADIENT_CASES) {
  Deno.test(
    `GPU gradients of every weight match the float64 CPU twin (${label})`,
    gpuTest,
    async () => {
      const weights = randomWeights(7, config);
      const rng = new Rng(3);
      // 3 × 61 = 183 tokens: with 64-token logit chunks, three chunks, the last one partial.
      const B = 3, L = 61;
      const sequences = Array.from(
        { length: B },
        () => Array.from({ length: L }, () => rng.int(37)),
      );
      const dLogprobs = sequences.map((s) =>
        Array.from({ length: s.length - 1 }, () => rng.normal())
      );
      const cpu = cpuForwardBackward(config, weights, sequences, dLogprobs);

      const model = new GpuModel(gpu, config, weights, {
        logitChunkFloats: 64 * config.vocabSize,
        fuseProjections: fuse,
        maxBindingBytes,
      });
      assert.deepEqual(fusedGroups(model), fused);
      const ids = Int32Array.from(sequences.flat());
      const logp = await gpu.read(model.forward(ids, B, L));
      const upstream = new Float32Array(B * L);
      dLogprobs.forEach((row, b) => row.forEach((d, t) => upstream[b * L + t] = d));
      // Twice, to check gradients accumulate.
      model.backward(upstream);
      model.forward(ids, B, L);
      model.backward(upstream);
      const grads = await model.readGrads();
      model.destroy();

      for (let b = 0; b < B; b++) {
        for (let t = 0; t < L - 1; t++) {
          assert.ok(Math.abs(logp[b * L + t] - cpu.logprobs[b][t]) < 1e-4);
        }
      }
      assertGradsMatch(grads, cpu.grads, 2); // summed over two backward passes
    },
  );
}

Deno.test(
  "with `first`, the projection runs on the rows' tails: their log-probs and every gradient match the CPU twin",
  gpuTest,
  async () => {
    // Prompts of 20, 33 and 41 tokens in rows of 61: log-probs are wanted from each prompt's
    // last token on, so the forward projects positions 19… only (a third of them left out).
    const weights = randomWeights(23, fusingConfig);
    const rng = new Rng(8);
    const B = 3, L = 61, promptLens = [20, 33, 41], first = 19;
    const sequences = Array.from({ length: B }, () => Array.from({ length: L }, () => rng.int(37)));
    const dLogprobs = sequences.map((s, b) =>
      s.slice(1).map((_, t) => t >= promptLens[b] - 1 ? rng.normal() : 0)
    );
    const cpu = cpuForwardBackward(fusingConfig, weights, sequences, dLogprobs);
    const model = new GpuModel(gpu, fusingConfig, weights, { logitChunkFloats: 16 * 37 });
    const ids = Int32Array.from(sequences.flat());
    const logp = await gpu.read(model.forward(ids, B, L, 1, true, true, first));
    const upstream = new Float32Array(B * L);
    dLogprobs.forEach((row, b) => row.forEach((d, t) => upstream[b * L + t] = d));
    model.backward(upstream);
    const grads = await model.readGrads();
    model.destroy();
    for (let b = 0; b < B; b++) {
      for (let t = 0; t < L - 1; t++) {
        const want = t < first ? 0 : cpu.logprobs[b][t]; // not computed before `first`: zero
        assert.ok(Math.abs(logp[b * L + t] - want) < 1e-4, `logp ${b},${t}: ${logp[b * L + t]}`);
      }
    }
    assertGradsMatch(grads, cpu.grads);
    // Scoring with `from` returns each row from its own first wanted position.
    const scorer = new GpuModel(gpu, fusingConfig, weights);
    const from = promptLens.map((n) => n - 1);
    const scored = await scoreSequences(scorer, sequences, 1, true, from);
    scorer.destroy();
    scored.forEach((row, b) => {
      assert.equal(row.length, L - promptLens[b]);
      row.forEach((v, i) => assert.ok(Math.abs(v - cpu.logprobs[b][from[b] + i]) < 1e-4));
    });
  },
);

Deno.test(
  "after an AdamW step or setWeights, the model scores as one built from its weights",
  gpuTest,
  async () => {
    // The fused groups' concatenated biases are copies: they must follow the biases.
    const weights = randomWeights(19, fusingConfig);
    const rng = new Rng(6);
    const sequences = Array.from({ length: 2 }, () => Array.from({ length: 9 }, () => rng.int(37)));
    const model = new GpuModel(gpu, fusingConfig, weights);
    model.forward(Int32Array.from(sequences.flat()), 2, 9);
    model.backward(Float32Array.from({ length: 18 }, () => rng.normal()));
    const hp = { lr: 0.05, beta1: 0.9, beta2: 0.99, eps: 1e-8, weightDecay: 0, step: 1 };
    model.adamwStep({ ...hp, maxGradNorm: 0 });
    const updated = await model.readWeights();
    const bias = "model.layers.0.self_attn.v_proj.bias";
    assert.ok(updated.get(bias)!.some((x, i) => x !== weights.get(bias)![i]), "biases moved");
    const scoreWith = async (w: Map<string, Float32Array>) => {
      const fresh = new GpuModel(gpu, fusingConfig, w);
      const logprobs = await scoreSequences(fresh, sequences);
      fresh.destroy();
      return logprobs;
    };
    assert.deepEqual(await scoreSequences(model, sequences), await scoreWith(updated));
    model.setWeights(weights);
    assert.deepEqual(await scoreSequences(model, sequences), await scoreWith(weights));
    model.destroy();
  },
);

Deno.test("save → load → score gives identical log-probs", gpuTest, async () => {
  const weights = randomWeights(11);
  const dir = await Deno.makeTempDir();
  await saveCheckpoint(dir, toHfConfig(oddConfig), weights);
  const loaded = await loadCheckpoint(dir);
  const sequences = [[1, 5, 9, 2], [3, 3, 3, 3, 3, 36, 0]];
  const a = new GpuModel(gpu, oddConfig, weights),
    b = new GpuModel(gpu, loaded.config, loaded.weights);
  assert.deepEqual(await scoreSequences(a, sequences), await scoreSequences(b, sequences));
  a.destroy();
  b.destroy();
  await Deno.remove(dir, { recursive: true });
});

// LoRA on the odd shape: r 3 (not a multiple of 4) on all seven projections, and rsLoRA r 4 on
// three of them. B is random here (PEFT's B = 0 would give A no gradient).
const LORA_CASES: [string, LoraConfig][] = [
  ["all seven, r 3", { ...defaultLoraConfig(), r: 3, alpha: 7 }],
  [
    "q v down, rsLoRA r 4",
    {
      r: 4,
      alpha: 3,
      target_modules: ["q_proj", "v_proj", "down_proj"],
      use_rslora: true,
      dropout: 0,
    },
  ],
];

function randomAdapter(lora: LoraConfig, seed: number, config = oddConfig): Adapter {
  const tensors = initLora(config, lora, new Rng(seed));
  const rng = new Rng(seed + 1);
  for (const [name, t] of tensors) {
    if (name.includes("lora_B")) { for (let i = 0; i < t.length; i++) t[i] = 0.3 * rng.normal(); }
  }
  return { lora, tensors };
}

// The first case also on fusingConfig: adapters on the members of a fused gate/up matrix.
const LORA_GRADIENT_CASES = [
  ...LORA_CASES.map(([label, lora]) => [label, lora, oddConfig] as const),
  [`${LORA_CASES[0][0]}, gate/up fused`, LORA_CASES[0][1], fusingConfig] as const,
];

for (const [label, lora, config] of LORA_GRADIENT_CASES) {
  Deno.test(
    `GPU LoRA gradients of every A and B match the CPU twin (${label})`,
    gpuTest,
    async () => {
      const weights = randomWeights(7, config);
      const adapter = randomAdapter(lora, 5, config);
      const rng = new Rng(4);
      const B = 2, L = 45;
      const sequences = Array.from(
        { length: B },
        () => Array.from({ length: L }, () => rng.int(37)),
      );
      const dLogprobs = sequences.map((s) => s.slice(1).map(() => rng.normal()));
      const cpu = cpuForwardBackward(config, weights, sequences, dLogprobs, adapter);

      const model = new GpuModel(gpu, config, weights, { lora: adapter });
      const ids = Int32Array.from(sequences.flat());
      const logp = await gpu.read(model.forward(ids, B, L));
      const upstream = new Float32Array(B * L);
      dLogprobs.forEach((row, b) => row.forEach((d, t) => upstream[b * L + t] = d));
      model.backward(upstream);
      const grads = await model.readGrads();
      // Only the adapter is trained: no gradient exists for any base weight.
      assert.deepEqual([...grads.keys()], [...adapter.tensors.keys()]);
      assert.deepEqual([...model.grads.keys()].sort(), [...adapter.tensors.keys()].sort());
      model.destroy();

      for (let b = 0; b < B; b++) {
        for (let t = 0; t < L - 1; t++) {
          assert.ok(Math.abs(logp[b * L + t] - cpu.logprobs[b][t]) < 1e-4, `logp ${b},${t}`);
        }
      }
      let checked = 0;
      for (const [name, got] of grads) {
        const expected = cpu.grads.get(name)!;
        const scale = Math.max(...expected.map(Math.abs));
        assert.ok(scale > 1e-3, `${name}: the expected gradient is ~0`);
        let worst = 0;
        for (let i = 0; i < expected.length; i++) {
          worst = Math.max(worst, Math.abs(got[i] - expected[i]));
        }
        assert.ok(worst <= 1e-4 * scale + 1e-6, `${name}: max error ${worst} (scale ${scale})`);
        checked++;
      }
      assert.equal(checked, 2 * lora.target_modules.length * config.numLayers);
    },
  );
}

Deno.test(
  "LoRA at PEFT's init and with the adapter off give the base model's log-probs",
  gpuTest,
  async () => {
    const weights = randomWeights(13);
    const lora = { ...defaultLoraConfig(), r: 3 };
    const sequences = [[1, 5, 9, 2, 30], [3, 3, 3, 3, 3, 36, 0]];
    const base = new GpuModel(gpu, oddConfig, weights);
    const want = await scoreSequences(base, sequences);
    base.destroy();
    const fresh = new GpuModel(gpu, oddConfig, weights, {
      lora: { lora, tensors: initLora(oddConfig, lora, new Rng(1)) },
    });
    assert.deepEqual(await scoreSequences(fresh, sequences), want);
    fresh.destroy();
    const trained = new GpuModel(gpu, oddConfig, weights, { lora: randomAdapter(lora, 2) });
    assert.notDeepEqual(await scoreSequences(trained, sequences), want);
    assert.deepEqual(await scoreSequences(trained, sequences, 1, false), want);
    trained.destroy();
  },
);

/** A first AdamW step with a large learning rate, so that every trained value moves. */
const FIRST_ADAMW_STEP = {
  lr: 1e-2,
  beta1: 0.9,
  beta2: 0.99,
  eps: 1e-8,
  weightDecay: 0,
  maxGradNorm: 1,
  step: 1,
};

Deno.test("a LoRA AdamW step moves A and B only, with moments for them only", gpuTest, async () => {
  const weights = randomWeights(17);
  const adapter = randomAdapter({
    ...defaultLoraConfig(),
    r: 2,
    target_modules: ["k_proj", "up_proj"],
  }, 9);
  const model = new GpuModel(gpu, oddConfig, weights, { lora: adapter });
  const ids = Int32Array.from({ length: 20 }, (_, i) => (i * 7) % 37);
  model.forward(ids, 2, 10);
  model.backward(new Float32Array(20).fill(1));
  model.adamwStep(FIRST_ADAMW_STEP);
  const moments = await model.readOptimizerState();
  assert.deepEqual(
    [...moments.keys()],
    [...adapter.tensors.keys()].flatMap((n) => [`${n}.exp_avg`, `${n}.exp_avg_sq`]),
  );
  const after = await model.readWeights();
  assert.deepEqual([...after.keys()], [...adapter.tensors.keys()]);
  for (const [name, t] of after) assert.notDeepEqual(t, adapter.tensors.get(name), name);
  // The base is untouched: the adapter switched off still scores as the base model.
  const base = new GpuModel(gpu, oddConfig, weights);
  const sequences = [[1, 2, 3, 4, 5, 6]];
  assert.deepEqual(
    await scoreSequences(model, sequences, 1, false),
    await scoreSequences(base, sequences),
  );
  model.destroy();
  base.destroy();
});

Deno.test(
  "a save reads weights and moments back a batch at a time, and writes what reading them whole writes",
  gpuTest,
  async () => {
    // Row slices (a 2 KiB binding) and fused groups, so batches cut through both.
    const model = new GpuModel(gpu, oddConfig, randomWeights(23), { maxBindingBytes: 2048 });
    const state: TrainerState = {
      step: 1,
      adam_step: 1,
      sampler: { epoch: 0, position: 2, rng: "0123456789abcdef0123456789abcdef" },
      reference_model: "base",
    };
    const dir = await Deno.makeTempDir({ prefix: "aha_model_test_" });
    const save = async (name: string, batchBytes?: number) => {
      const whole = batchBytes === undefined;
      await saveTrainingCheckpoint(
        `${dir}/${name}`,
        toHfConfig(oddConfig),
        whole ? await model.readWeights() : model.reader("weights", batchBytes),
        whole ? await model.readOptimizerState() : model.reader("moments", batchBytes),
        state,
        defaultTrainConfig(),
      );
      return Object.fromEntries(
        [...Deno.readDirSync(`${dir}/${name}`)].map((e) => [
          e.name,
          Deno.readFileSync(`${dir}/${name}/${e.name}`),
        ]),
      );
    };
    const weightBytes = [...await model.readWeights()].map(([, data]) => 4 * data.length);
    // Every readMany the batched saves make: the bytes of each tensor it reads.
    const calls: number[][] = [];
    const readMany = gpu.readMany.bind(gpu);
    gpu.readMany = (tensors, uncounted) => {
      calls.push(tensors.map((t) => t.bytes));
      return readMany(tensors, uncounted);
    };
    try {
      for (const stepped of [false, true]) {
        if (stepped) {
          model.forward(Int32Array.from({ length: 12 }, (_, i) => (i * 5) % 37), 2, 6);
          model.backward(new Float32Array(12).fill(1));
          model.adamwStep(FIRST_ADAMW_STEP);
        }
        const expected = await save("whole");
        calls.length = 0;
        const batched = await save("batched", 1000);
        assert.deepEqual(Object.keys(batched).sort(), Object.keys(expected).sort());
        for (const file of Object.keys(expected)) {
          const [a, b] = [batched[file], expected[file]]; // (a failing deepEqual's diff is slow)
          assert.ok(a.length === b.length && a.every((x, i) => x === b[i]), `${file} (${stepped})`);
        }
        // Each batch within its bytes (the 2 KiB row slices read in pieces); each weight read
        // once.
        for (const call of calls) {
          const bytes = call.reduce((a, b) => a + b, 0);
          assert.ok(bytes <= 1000, `a batch of ${bytes} bytes: ${call}`);
        }
        const read = calls.flat().reduce((a, b) => a + b, 0);
        assert.equal(read, weightBytes.reduce((a, b) => a + b) * (stepped ? 3 : 1));
        assert.ok(calls.length > 10, `${calls.length} batches`);
      }
    } finally {
      gpu.readMany = readMany;
      model.destroy();
      await Deno.remove(dir, { recursive: true });
    }
  },
);
