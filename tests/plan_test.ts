// The memory plan (core/plan.ts): a small config's bytes counted by hand from gpu/model.ts and
// gpu/generate.ts, the built-in Qwen2.5 shapes against the genuine 0.5B config.json, weights over
// one binding split by rows, refusals with advice that names the tensor, advice whose values are
// the largest that fit, a reference on the ONNX engine counted on no adapter, and `aha plan`
// (with the memory a software adapter's run leaves for kept texture copies).

import assert from "node:assert/strict";
import { planReport } from "../cli/plan.ts";
import { runAha as aha } from "./helpers.ts";
import { AhaError } from "../core/errors.ts";
import {
  type ModelConfig,
  parameterCount,
  parseModelConfig,
  PRESETS,
} from "../core/model_config.ts";
import {
  type AdapterLimits,
  advise,
  builtinShape,
  checkPlan,
  passTokens,
  planMemory,
  planProblems,
  PREFILL_BATCH_TOKENS,
  rowChunkTokens,
  SCORE_BATCH_TOKENS,
  SOFTWARE_PROGRAM_BYTES,
  softwareLimits,
  softwareOverheadBytes,
  weightSliceRows,
} from "../core/plan.ts";
import { defaultTrainConfig, loadTrainConfig, type TrainConfig } from "../core/train_config.ts";

const MiB = 2 ** 20, GiB = 2 ** 30;
const limits = (binding: number, memory: number | null = null): AdapterLimits => ({
  description: "test adapter",
  maxStorageBufferBindingSize: binding,
  maxBufferSize: 2 * GiB,
  memory,
});
const configs = new URL("../configs/", import.meta.url).pathname;
const qwen = (size: string) => parseModelConfig(builtinShape(`models/Qwen2.5-${size}`));

Deno.test("a small plan, counted by hand", () => {
  // vocab 10, hidden 4, intermediate 6, 1 layer, 2 heads of 2, 1 kv head, tied: 180 weights.
  const model = parseModelConfig({
    vocab_size: 10,
    hidden_size: 4,
    intermediate_size: 6,
    num_hidden_layers: 1,
    num_attention_heads: 2,
    num_key_value_heads: 1,
    tie_word_embeddings: true,
  });
  assert.equal(parameterCount(model), 180);
  const cfg: TrainConfig = {
    ...defaultTrainConfig(),
    prompts_per_step: 2,
    prompts_per_generation: 2, // unset, the built-in model samples 3 × prompts_per_step
    num_generations: 2,
    max_prompt_length: 3,
    max_completion_length: 2,
    micro_batch_size: 2,
    eval_prompts: 1,
    beta: 0.04,
  };
  const plan = planMemory(cfg, model, true);
  const bytes = Object.fromEntries(plan.items.map((i) => [`${i.adapter} ${i.what}`, i.bytes]));
  // Floats, ×4 bytes. A layer keeps per token 4H + 2 + 2·qDim + 2·kvDim + heads + 3I = 50, and
  // the fused q/k/v product's rows qDim + 2·kvDim = 8 (one set for every layer): 58.
  // Training: 2 rows × 5 tokens = 10 tokens.
  //   activations: 10·58 + ids/targets/positions 30 + kvLens 2 + final, finalNorm 80 + rstd 10
  //   backward:    dLogp, dTailLogp 20 + dResidual, dNorm 80 + dAttn, dq 80 + dk, dv 40 + dQkv 80
  //                + dAct, dGateUp 180
  //   log-probs:   logits, dLogits 2·(10 tokens × 10) + logp, lse 20 + tailRows 40, tailLogp 10
  // Generation (2 prompts × 2 > 1 eval prompt): 4 rows; capacity 5 and prefill 3 (whole prompts)
  // rounded up to 16 and 4 (CAPACITY_ROUND, PREFILL_ROUND).
  //   KV cache: 2·(4·16·2) + prompt cache 2·(2·16·2)
  //   buffers:  prefill 8·58 + ids, positions 16 + kvLens 2;
  //             decode 4·58 + hidden 16 + logits 40 + six [4] 24 + outputs 2·(2·4)
  // Reference: weights; one scoring pass of 4 rows × 5 tokens = 20 tokens, forward only:
  //   20·58 + 60 + 4 + 160 + 20; log-probs 2·(20 × 10) + 40 + 80 + 20.
  // Weights, gradients and moments lie in arenas (gpu/arena.ts), each of the 14 tensors on its
  // own 256 bytes (none holds more than 64 floats): 3584 bytes where their 180 floats are 720.
  assert.deepEqual(bytes, {
    "policy weights": 3584,
    "policy gradients": 3584,
    "policy AdamW moments": 2 * 3584,
    "policy training activations": 4 * 702,
    "policy backward scratch": 4 * 480,
    "policy log-prob buffers": 4 * 270,
    "policy generation KV cache": 4 * 384,
    "policy generation buffers": 4 * (482 + 328),
    "reference weights": 3584,
    "reference forward activations": 4 * 1404,
    "reference log-prob buffers": 4 * 540,
  });
  assert.equal(plan.policyBytes, 13464 + 4 * (3584 - 720));
  assert.equal(plan.referenceBytes, 8496 + 3584 - 720);
  assert.equal(planMemory({ ...cfg, beta: 0 }, model).referenceBytes, 0);
  // Sampling 6 prompts a call (unset: the built-in model's 3 × prompts_per_step): 12 rows, and
  // the prompt cache holds all 6 prompts of a prefill batch: 2·(12·16·2) + 2·(6·16·2).
  for (const prompts_per_generation of [6, null]) {
    const ahead = planMemory({ ...cfg, prompts_per_generation }, model, true).items;
    const cache = ahead.find((i) => i.what === "generation KV cache")!;
    assert.equal(cache.bytes, 4 * 1152);
    assert.match(cache.detail, /^12 rows × 16 tokens$/);
  }
  // …never more than a step can use: 2 prompts × (max_refill_rounds 0 + 1).
  const most = planMemory({ ...cfg, prompts_per_generation: 4, max_refill_rounds: 0 }, model, true);
  assert.equal(most.items.find((i) => i.what === "generation KV cache")!.bytes, 4 * 384);
});

Deno.test("the built-in Qwen2.5 shapes: 0.5B equals its genuine config.json", async () => {
  const genuine = JSON.parse(
    await Deno.readTextFile(
      new URL("./fixtures/qwen2-tokenizer/config.json", import.meta.url),
    ),
  );
  const { bosTokenId: _b, eosTokenId: _e, maxPositionEmbeddings: _m, ...shape } = parseModelConfig(
    genuine,
  );
  const { bosTokenId: _b2, eosTokenId: _e2, maxPositionEmbeddings: _m2, ...ours } = qwen("0.5B");
  assert.deepEqual(ours, shape);
  const millions = (m: ModelConfig) => Math.round(parameterCount(m) / 1e6);
  assert.deepEqual(["0.5B", "1.5B", "3B", "7B"].map((s) => millions(qwen(s))), [
    494,
    1544,
    3086,
    7616,
  ]);
  assert.equal(qwen("7B").tieWordEmbeddings, false);
  assert.equal(builtinShape("/models/Qwen2.5-1.5B-Instruct/")?.hidden_size, 1536);
  assert.equal(builtinShape("models/Qwen2.5-15B"), null);
});

Deno.test("weights over one binding are split and passes shrink to fit: a 7B plans on 128 MiB", () => {
  const cfg = loadTrainConfig(`${configs}qwen2.5-7b-gsm8k.yaml`, []);
  // The 2.03 GiB embedding and lm_head are kept as two row slices each.
  assert.equal(weightSliceRows([152064, 3584], 2 * GiB), 149796);
  assert.deepEqual(planProblems(planMemory(cfg, qwen("7B")), limits(2 * GiB)), []);
  // On 128 MiB the weights split too, and a scoring or prefill pass holds the tokens whose
  // SwiGLU output (18,944 floats a token) fits one binding: 1,771, so the reference scores one
  // row of 1,020 tokens at a time and generation prefills five prompts of 320.
  assert.equal(passTokens(qwen("7B"), 128 * MiB, SCORE_BATCH_TOKENS), 1771);
  assert.equal(passTokens(qwen("7B"), 128 * MiB, PREFILL_BATCH_TOKENS), 1771);
  assert.equal(passTokens(qwen("7B"), 2 * GiB, SCORE_BATCH_TOKENS), SCORE_BATCH_TOKENS);
  const plan = checkPlan(cfg, qwen("7B"), limits(128 * MiB));
  const item = (what: string) => plan.items.find((i) => i.what === what)!;
  assert.match(item("forward activations").detail, /^1 row × 1020 tokens per pass/);
  assert.ok(
    item("generation buffers").tensors.some((t) =>
      t.name === "prefill.act" &&
      t.shape[0] === 5 * 320
    ),
    "five prompts a prefill",
  );
  // A training micro-batch is the config's own: 8 rows would bind a SwiGLU output of 589.7 MiB,
  // refused, naming it.
  assert.throws(
    () => checkPlan({ ...cfg, micro_batch_size: 8 }, qwen("7B"), limits(128 * MiB)),
    (e: Error) => {
      assert.ok(e instanceof AhaError);
      assert.match(e.message, /layers\.0\.act \[8160, 18944\] \(589\.7 MiB\) is over one storage/);
      assert.ok(!e.message.includes("weights"), e.message);
      assert.ok(!e.message.includes("\n"), "one line");
      return true;
    },
  );
  // Below one row of a weight (down_proj's: 18944 floats) nothing helps.
  assert.match(
    planProblems(planMemory(cfg, qwen("7B")), limits(64 * 1024)).join("; "),
    /policy weights: one row of model\.layers\.0\.mlp\.down_proj\.weight \(74\.0 KiB\)/,
  );
});

Deno.test("the 0.5B LoRA recipe plans on llvmpipe's 128 MiB bindings, the reference 6 rows a pass", () => {
  // Eight rows of 1,020 tokens a pass would bind a SwiGLU output of 151.4 MiB; 6,898 tokens fit.
  const cfg = loadTrainConfig(`${configs}qwen2.5-0.5b-gsm8k-lora.yaml`, []);
  assert.equal(passTokens(qwen("0.5B"), 128 * MiB, SCORE_BATCH_TOKENS), 6898);
  const plan = checkPlan(cfg, qwen("0.5B"), limits(128 * MiB, 23.5 * GiB));
  const reference = plan.items.find((i) => i.what === "forward activations")!;
  assert.match(reference.detail, /^6 rows × 1020 tokens per pass/);
  assert.ok(reference.tensors.some((t) => t.name === "layers.0.act" && t.shape[0] === 6120));
});

Deno.test("the gate/up rows are bound in chunks of tokens: only 64 of their rows must fit", () => {
  // 0.5B on llvmpipe's 128 MiB bindings: 4 rows × 1020 tokens of gate/up rows [4080, 9728] take
  // 151.4 MiB, but the product runs on chunks of at most 3,392 tokens (3,449 fit).
  const cfg = loadTrainConfig(`${configs}qwen2.5-0.5b-gsm8k-lora.yaml`, []);
  assert.equal(rowChunkTokens(4080, 9728 * 4, 128 * MiB), 3392);
  const plan = planMemory(cfg, qwen("0.5B"));
  const training = plan.items.find((i) => i.what === "training activations")!;
  const gateUp = training.tensors.find((t) => t.name === "layers.0.gateUp")!;
  assert.deepEqual(gateUp.shape, [4080, 9728]);
  assert.ok(4080 * 9728 * 4 > 128 * MiB && gateUp.rowChunks);
  const problems = (binding: number) => planProblems(plan, limits(binding)).join("; ");
  assert.ok(!problems(128 * MiB).includes("policy training"), problems(128 * MiB));
  // The rule itself: 64 rows of a chunked tensor must fit one binding, and all of it one buffer.
  const item = {
    adapter: "policy" as const,
    what: "activations",
    detail: "",
    bytes: 1000 * 100 * 4,
    tensors: [{ name: "gateUp", shape: [1000, 100], rowChunks: true }],
  };
  const alone = { ...plan, items: [item] };
  assert.deepEqual(planProblems(alone, limits(64 * 100 * 4)), []);
  assert.match(
    planProblems(alone, limits(64 * 100 * 4 - 4)).join("; "),
    /policy activations: 64 rows \(25\.0 KiB\) of gateUp \[1000, 100\] is over one storage binding/,
  );
  const smallBuffers = { ...limits(64 * 100 * 4), maxBufferSize: 1000 * 100 * 4 - 4 };
  assert.match(
    planProblems(alone, smallBuffers).join("; "),
    /gateUp \[1000, 100\].* over one buffer/,
  );
});

Deno.test("a tiny run is accepted", () => {
  const tiny = parseModelConfig({ ...PRESETS.tiny, vocab_size: 18 });
  const plan = checkPlan(defaultTrainConfig(), tiny, limits(128 * MiB, 1 * GiB));
  assert.ok(plan.policyBytes + plan.referenceBytes < 64 * MiB);
});

Deno.test("advice: each suggested value is the largest that fits", () => {
  const cfg = loadTrainConfig(`${configs}qwen2.5-1.5b-gsm8k.yaml`, []);
  const model = qwen("1.5B");
  const adapter = limits(2 * GiB, 40 * GiB);
  const fits = (c: TrainConfig, shared = true) =>
    planProblems(planMemory(c, model, shared), adapter).length === 0;
  assert.ok(!fits(cfg) && fits(cfg, false));
  const [advice] = advise(cfg, model, adapter);
  assert.match(advice, /^Any one of these fits: put the reference on a second adapter/);
  const suggested = [...advice.matchAll(/(\w+) (\d+) → (\d+)/g)];
  assert.ok(suggested.length > 0, advice);
  for (const [, key, , value] of suggested) {
    assert.ok(fits({ ...cfg, [key]: Number(value) }), `${key} ${value} fits`);
    assert.ok(!fits({ ...cfg, [key]: Number(value) + 1 }), `${key} ${Number(value) + 1} does not`);
  }
  // In aha train the reference cannot move: then it is not suggested.
  assert.ok(!advise(cfg, model, adapter, true, false)[0].includes("second adapter"));
  // Sampling ahead (prompts_per_generation) costs memory and no learning: lowering it is advised
  // first of the settings.
  const ahead = { ...cfg, prompts_per_generation: 12 };
  const need = (c: TrainConfig) => {
    const plan = planMemory(c, model, true);
    return plan.policyBytes + plan.referenceBytes;
  };
  const roomy = limits(2 * GiB, (need(cfg) + need(ahead)) / 2);
  const fitsRoomy = (c: TrainConfig) =>
    planProblems(planMemory(c, model, true), roomy).length === 0;
  assert.ok(fitsRoomy(cfg) && !fitsRoomy(ahead));
  const [aheadAdvice] = advise(ahead, model, roomy, true, false);
  const [, value] = aheadAdvice.match(/[:;] prompts_per_generation 12 → (\d+); micro_batch_size/)!;
  assert.ok(fitsRoomy({ ...ahead, prompts_per_generation: Number(value) }), aheadAdvice);
  assert.ok(!fitsRoomy({ ...ahead, prompts_per_generation: Number(value) + 1 }), aheadAdvice);
});

Deno.test("aha plan prints the table and advice without asking the GPU; exit 1 when it does not fit", async () => {
  const limits = ["--max-binding-gb=2", "--max-buffer-gb=2"];
  const big = await aha("plan", `${configs}qwen2.5-1.5b-gsm8k.yaml`, "--memory-gb=24", ...limits);
  assert.equal(big.code, 1, big.stderr);
  for (const line of ["policy adapter", "generation KV cache", "does not fit:", "advice:"]) {
    assert.ok(big.stdout.includes(line), `${line} in:\n${big.stdout}`);
  }
  assert.match(big.stdout, /shape from the built-in Qwen2\.5 table/);
  const small = await aha("plan", `${configs}qwen2.5-0.5b-gsm8k.yaml`, "--memory-gb=80", ...limits);
  assert.equal(small.code, 0, small.stderr);
  assert.match(small.stdout, /fits this adapter/);
  assert.doesNotMatch(small.stdout, /does not fit/);
});

Deno.test("aha train refuses a run that does not fit before creating its output directory", async () => {
  const dir = await Deno.makeTempDir();
  const out = `${dir}/run`;
  const result = await aha(
    "train",
    "--set",
    `output_dir=${out}`,
    "--set",
    "prompts_per_step=200000",
    "--set",
    "micro_batch_size=1000000",
  );
  assert.equal(result.code, 1, result.stderr);
  assert.match(result.stderr, /^aha: this run does not fit/m);
  assert.equal(await Deno.stat(out).then(() => true, () => false), false, "no output directory");
  await Deno.remove(dir, { recursive: true });
});

Deno.test("a LoRA plan with 16-bit weights and cache and checkpointing, counted by hand", () => {
  // vocab 10, hidden 4, intermediate 6, 2 layers, 2 heads of 2, 1 kv head, tied. Per layer 120
  // matrix values (q 16, k 8, v 8, o 16, gate, up, down 24 each) and 16 norm and bias values.
  const model = parseModelConfig({
    vocab_size: 10,
    hidden_size: 4,
    intermediate_size: 6,
    num_hidden_layers: 2,
    num_attention_heads: 2,
    num_key_value_heads: 1,
    tie_word_embeddings: true,
  });
  const cfg: TrainConfig = {
    ...defaultTrainConfig(),
    prompts_per_step: 2,
    prompts_per_generation: 2,
    num_generations: 2,
    max_prompt_length: 3,
    max_completion_length: 2,
    micro_batch_size: 2,
    eval_prompts: 1,
    beta: 0.04,
    lora: {
      r: 2,
      alpha: 4,
      target_modules: ["q_proj", "down_proj"],
      use_rslora: false,
      dropout: 0,
    },
    frozen_dtype: "bf16",
    gradient_checkpointing: true,
    kv_cache_dtype: "bf16",
  };
  const plan = planMemory(cfg, model, true);
  const bytes = Object.fromEntries(plan.items.map((i) => [`${i.adapter} ${i.what}`, i.bytes]));
  // Weights: embedding 40 + 2·120 matrix values at 2 bytes; 2·16 + final norm 4 at 4 bytes.
  // LoRA: q_proj A [2,4] B [4,2], down_proj A [2,6] B [4,2]: 36 per layer, 72 floats.
  // Training, 10 tokens, checkpointed: one layer's buffers 10·58, layer 1's input 40, then as
  //   without: ids/targets/positions 30 + kvLens 2 + final, finalNorm 80 + rstd 10.
  // Generation: prompts of 3 prefill 3 tokens, rounded up to 4 (PREFILL_ROUND); capacity 5
  //   rounded up to 16 (CAPACITY_ROUND). 4 rows in bf16 caches [4,16,1,2] and one prefill batch
  //   of both prompts in prompt caches [2,16,1,2]: per layer 2·128 + 2·64 values at 2 bytes.
  //   Buffers: prefill of 8 tokens 8·58 + ids, positions 16 + kvLens 2; decode 328.
  // LoRA scratch: u and du [10 tokens, r 2]. Reference: the base, on the policy's adapter: no
  //   weights of its own; its scoring pass as without LoRA.
  // f32 tensors lie in arenas (gpu/arena.ts), each on its own 256 bytes here: the 11 norm
  //   weights and biases (36 floats), the 8 adapter matrices (72) and their gradients and moments.
  assert.deepEqual(bytes, {
    "policy weights": 2 * 280 + 11 * 256,
    "policy LoRA adapters": 8 * 256,
    "policy LoRA gradients": 8 * 256,
    "policy LoRA AdamW moments": 2 * 8 * 256,
    "policy training activations": 4 * 742,
    "policy backward scratch": 4 * 480,
    "policy log-prob buffers": 4 * 270,
    "policy generation KV cache": 2 * 2 * 384,
    "policy generation buffers": 4 * (482 + 328),
    "policy LoRA scratch": 4 * 40,
    "reference forward activations": 4 * 1404,
    "reference log-prob buffers": 4 * 540,
  });
  assert.equal(
    plan.policyBytes,
    9736 - 480 - 4 * 538 + 2 * 2 * 384 + 4 * (482 + 328) + 4 * 160 + 4 * 60 +
      (11 * 256 - 4 * 36) + 4 * (8 * 256 - 4 * 72),
  );
  assert.equal(plan.referenceBytes, 7776);
  // On a second adapter the reference holds the base itself, frozen in bf16.
  assert.equal(planMemory(cfg, model, false).referenceBytes, 7776 + 2 * 280 + 11 * 256);
  // frozen_dtype auto keeps the checkpoint's dtype: f32 here, as the policy's own base: all 26
  // tensors (316 floats) in arenas.
  const auto = planMemory({ ...cfg, frozen_dtype: "auto" }, model, true, "f32");
  assert.equal(auto.items.find((i) => i.what === "weights")!.bytes, 26 * 256);
});

Deno.test("the LoRA configs fit their targets as aha plan reports them", () => {
  // --max-binding-gb 2 --max-buffer-gb 2 --memory-gb N, the reference on the policy's adapter.
  const target = (gib: number): AdapterLimits => ({
    description: "target",
    maxStorageBufferBindingSize: 2 * GiB,
    maxBufferSize: 2 * GiB,
    memory: gib * GiB,
  });
  for (const [size, gib] of [["7B", 24], ["3B", 16], ["1.5B", 8], ["0.5B", 8]] as const) {
    const cfg = loadTrainConfig(`${configs}qwen2.5-${size.toLowerCase()}-gsm8k-lora.yaml`, []);
    const plan = planMemory(cfg, qwen(size), true, "bf16");
    assert.deepEqual(planProblems(plan, target(gib)), [], `${size} LoRA on ${gib} GiB`);
    const what = plan.items.map((i) => `${i.adapter} ${i.what}`);
    for (const item of ["LoRA adapters", "LoRA gradients", "LoRA AdamW moments", "LoRA scratch"]) {
      assert.ok(what.includes(`policy ${item}`), `${size}: ${item}`);
    }
    // The frozen base has no gradients or moments, and the reference shares it.
    assert.ok(!what.includes("policy gradients") && !what.includes("reference weights"), size);
  }
  // 7B LoRA: the bf16 base (14.2 GiB) and adapters of r 16 on all seven projections (40.4M).
  const cfg7 = loadTrainConfig(`${configs}qwen2.5-7b-gsm8k-lora.yaml`, []);
  const plan7 = planMemory(cfg7, qwen("7B"), true, "bf16");
  const item = (what: string) => plan7.items.find((i) => i.what === what)!;
  assert.equal(item("LoRA adapters").bytes, 4 * 40_370_176);
  // Matrices at 2 bytes; the 333,312 norm and bias values (per layer two norms of 3584, biases
  // of 3584 + 512 + 512; the final norm) at 4.
  const vectors = 28 * (3 * 3584 + 2 * 512) + 3584;
  assert.equal(item("weights").bytes, 2 * parameterCount(qwen("7B")) + 2 * vectors);
  // Without the 16-bit base or without checkpointing it would not fit 24 GiB.
  for (const change of [{ frozen_dtype: "f32" as const }, { gradient_checkpointing: false }]) {
    const plan = planMemory({ ...cfg7, ...change }, qwen("7B"), true, "bf16");
    assert.notDeepEqual(planProblems(plan, target(24)), [], JSON.stringify(change));
  }
  // Full fine-tuning of 0.5B fits 16 GiB with checkpointing, and not without.
  const full = loadTrainConfig(`${configs}qwen2.5-0.5b-gsm8k.yaml`, []);
  const on = planMemory({ ...full, gradient_checkpointing: true }, qwen("0.5B"), true, "bf16");
  assert.deepEqual(planProblems(on, target(16)), []);
  assert.notDeepEqual(planProblems(planMemory(full, qwen("0.5B"), true, "bf16"), target(16)), []);
  assert.match(
    advise(full, qwen("0.5B"), target(16), true, true, "bf16")[0],
    /gradient_checkpointing: true/,
  );
});

Deno.test("a reference on the ONNX engine needs no adapter memory: a run refused with it on the GPU fits", () => {
  const cfg = loadTrainConfig(`${configs}qwen2.5-1.5b-gsm8k.yaml`, []);
  const model = qwen("1.5B");
  const adapter = limits(2 * GiB, 40 * GiB);
  assert.notDeepEqual(planProblems(planMemory(cfg, model), adapter), [], "webgpu: does not fit");
  const onnx = { ...cfg, reference: { ...cfg.reference, engine: "onnx" as const } };
  const plan = checkPlan(onnx, model, adapter);
  assert.equal(plan.referenceBytes, 0);
  assert.ok(plan.referenceOnCpu);
  assert.ok(plan.policyBytes > 0 && plan.policyBytes === planMemory(cfg, model).policyBytes);
  const report = planReport("onnx.yaml", onnx, { config: model, source: "test", dtype: "bf16" }, {
    ...adapter,
  }, "stated");
  assert.ok(report.includes("fits this adapter"), report.join("\n"));
  assert.ok(
    report.some((l) => /^reference \(reference\.engine onnx\): .* not on an adapter$/.test(l)),
  );
  // "auto" without an export stays on an adapter (ONNX only beside a software one, same RAM).
  assert.ok(!planMemory(cfg, model).referenceOnCpu);
  assert.ok(
    planMemory({ ...cfg, reference: { ...cfg.reference, onnx: "/m.onnx" } }, model)
      .referenceOnCpu,
  );
});

Deno.test("aha plan on a software adapter: the memory the run leaves for kept texture copies, per process", () => {
  const cfg = loadTrainConfig(`${configs}qwen2.5-0.5b-gsm8k-lora.yaml`, []);
  const model = { config: qwen("0.5B"), source: "test", dtype: "bf16" as const };
  const adapter = limits(4 * GiB, 24 * GiB);
  const line = (c: TrainConfig, software = true) =>
    planReport("lora.yaml", c, model, adapter, "stated", software).find((l) =>
      l.startsWith("kept texture copies")
    );
  const left = (c: TrainConfig) => {
    const plan = planMemory(c, model.config, undefined, "bf16");
    return 24 * GiB * 7 / 8 - plan.policyBytes - plan.referenceBytes; // an eighth kept back
  };
  const gib = (bytes: number) => `${(bytes / GiB).toFixed(2)} GiB`;
  // The reference in a worker of its own (reference.adapter names another backend): each
  // process gets half of what is left.
  const gl = { ...cfg, reference: { ...cfg.reference, adapter: "gl" as const } };
  assert.match(
    line(gl)!,
    new RegExp(
      `${gib(left(gl) / 2)} for the trainer and ${gib(left(gl) / 2)} for the reference worker`,
    ),
  );
  // The LoRA base in the training process (auto, as the recipe ships, or same): all of it to the
  // trainer; likewise with no reference.
  const same = { ...cfg, reference: { ...cfg.reference, adapter: "same" as const } };
  for (const c of [cfg, same]) {
    assert.match(line(c)!, new RegExp(`: ${gib(left(c))} for the trainer, what the run leaves`));
  }
  const noReference = { ...cfg, beta: 0 };
  assert.match(line(noReference)!, new RegExp(`: ${gib(left(noReference))} for the trainer, `));
  assert.ok(left(noReference) > left(cfg));
  // A hardware adapter keeps no copies: no line.
  assert.equal(line(cfg, false), undefined);
  // A budget stated by the variable is what the processes get.
  Deno.env.set("AHA_KEPT_TEXTURE_BYTES", String(3 * GiB));
  try {
    assert.match(
      line(gl)!,
      /: 3\.00 GiB for the trainer and 3\.00 GiB for the reference worker, as AHA_KEPT/,
    );
  } finally {
    Deno.env.delete("AHA_KEPT_TEXTURE_BYTES");
  }
});

Deno.test("on a software adapter a run plans within the RAM less the program and the largest weight's per-use copy", async () => {
  // The largest weight is the vocabulary's matrix: [151936, 896] for 0.5B, bf16 in the LoRA
  // recipe (frozen), f32 when every weight is trained; per-use copies of it, up to two.
  const lora = loadTrainConfig(`${configs}qwen2.5-0.5b-gsm8k-lora.yaml`, []);
  const full = loadTrainConfig(`${configs}qwen2.5-0.5b-gsm8k.yaml`, []);
  const vocabMatrix = 151936 * 896;
  assert.equal(
    softwareOverheadBytes(lora, qwen("0.5B"), "bf16"),
    SOFTWARE_PROGRAM_BYTES + 2 * 2 * vocabMatrix,
  );
  assert.equal(
    softwareOverheadBytes(full, qwen("0.5B"), "bf16"),
    SOFTWARE_PROGRAM_BYTES + 2 * 4 * vocabMatrix,
  );
  // A plan that fits the RAM but not what the program leaves of it is refused.
  const plan = planMemory(full, qwen("0.5B"), undefined, "bf16");
  const ram = plan.policyBytes + plan.referenceBytes + GiB;
  assert.deepEqual(planProblems(plan, limits(4 * GiB, ram)), []);
  const usable = softwareLimits(
    limits(4 * GiB, ram),
    softwareOverheadBytes(full, qwen("0.5B"), "f32"),
  );
  assert.equal(usable.memory, ram - SOFTWARE_PROGRAM_BYTES - 2 * 4 * vocabMatrix);
  assert.match(planProblems(plan, usable).join("\n"), /the policy and reference need/);
  // `aha plan` on this machine's software adapter says what it takes off the RAM.
  const run = await aha("plan", `${configs}qwen2.5-0.5b-gsm8k-lora.yaml`);
  const overhead = (SOFTWARE_PROGRAM_BYTES + 2 * 2 * vocabMatrix) / GiB;
  if (run.stdout.includes("a software adapter")) {
    assert.match(
      run.stdout,
      new RegExp(
        `GiB less ${overhead.toFixed(2)} GiB for the program and per-use copies of weights`,
      ),
    );
  }
});
