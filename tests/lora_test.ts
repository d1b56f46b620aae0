// LoRA against an independent PyTorch LoRA written from PEFT's definition
// (tests/fixtures/lora_torch.py, cases by tests/fixtures/make_lora_golden.py): log-probs with
// each adapter, `aha loss` gradients of every lora_A / lora_B, and `aha merge` scoring as the
// unmerged adapter; then the adapter files' errors, each one line naming the file and tensor, and
// the reference of a LoRA run that shares the policy's frozen base.

import assert from "node:assert/strict";
import { computeLoss } from "../cli/loss.ts";
import { loadCheckpoint } from "../core/checkpoint.ts";
import {
  initLora,
  loadAdapter,
  loraModules,
  loraShapes,
  referenceSharesBase,
} from "../core/lora.ts";
import { parseModelConfig, PRESETS } from "../core/model_config.ts";
import { Rng } from "../core/rng.ts";
import { defaultLoraConfig, loadTrainConfig } from "../core/train_config.ts";
import { GpuModel } from "../gpu/model.ts";
import { GpuBaseReference, GpuPolicy, GpuReference } from "../gpu/policy.ts";
import { scoreSequences } from "../gpu/score.ts";
import { assertRowsClose, gpuTest, openGpu } from "./helpers.ts";

const gpu = await openGpu();
const ROOT = new URL("../", import.meta.url).pathname;
const MAIN = `${ROOT}main.ts`;
const CASES = `${ROOT}tests/fixtures/lora/`;
const NAMES = [...Deno.readDirSync(CASES)].map((e) => e.name).sort();

const readJson = (path: string) => JSON.parse(Deno.readTextFileSync(path));

async function aha(...args: string[]) {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", MAIN, ...args],
    stdout: "piped",
    stderr: "piped",
  }).output();
  const text = (bytes: Uint8Array) => new TextDecoder().decode(bytes);
  const stderr = text(out.stderr).trim().split("\n").filter((l) => l && !l.includes("XDG"));
  return { code: out.code, stdout: text(out.stdout), stderr };
}

Deno.test("the committed LoRA cases are all here", () => {
  assert.deepEqual(NAMES, ["bf16_tied_r2", "gqa3_untied_rslora_subset", "gqa_tied_all_linear"]);
});

let ran = 0;
for (const name of NAMES) {
  const dir = CASES + name;
  Deno.test(`LoRA log-probs and gradients match PyTorch: ${name}`, gpuTest, async () => {
    const expected = readJson(`${dir}/expected.json`);
    const base = await loadCheckpoint(ROOT + expected.model);
    const adapter = await loadAdapter(dir, base.config);
    const model = new GpuModel(gpu, base.config, base.weights, { lora: adapter });
    // f32 on the GPU against float64 PyTorch on the same (stored) values.
    assertRowsClose(await scoreSequences(model, expected.sequences), expected.logprobs, 1e-4, name);

    const policy = new GpuPolicy(model);
    const got = await computeLoss(policy, readJson(`${dir}/batch.json`));
    assert.ok(Math.abs(got.loss - expected.loss) < 1e-5, `loss ${got.loss} vs ${expected.loss}`);
    assert.ok(Math.abs(got.grad_norm - expected.grad_norm) < 1e-4 * expected.grad_norm);
    // aha loss reports the adapter's matrices only, by their PEFT names.
    assert.deepEqual(Object.keys(got.grads).sort(), Object.keys(expected.grads).sort());
    const grads = await model.readGrads();
    model.destroy();
    for (const [tensor, want] of Object.entries(expected.grads) as [string, number[]][]) {
      const g = grads.get(tensor)!;
      const largest = Math.max(...want.map(Math.abs));
      const worst = Math.max(...want.map((w, i) => Math.abs(g[i] - w)));
      assert.ok(worst <= 1e-3 * largest, `${tensor}: max error ${worst}, largest ${largest}`);
    }
    ran++;
  });
}

Deno.test("aha merge: the merged checkpoint scores as the unmerged adapter", gpuTest, async () => {
  const out = await Deno.makeTempDir({ prefix: "aha-merge-" });
  let merged = 0;
  for (const name of NAMES) {
    const dir = CASES + name, expected = readJson(`${dir}/expected.json`);
    const run = await aha(
      "merge",
      "--model",
      ROOT + expected.model,
      "--adapter",
      dir,
      "--out",
      `${out}/${name}`,
    );
    assert.equal(run.code, 0, run.stderr.join("\n"));
    const files = [...Deno.readDirSync(`${out}/${name}`)].map((e) => e.name).sort();
    assert.deepEqual(files, ["config.json", "model.safetensors"]);
    // A plain checkpoint, scored without any adapter, against PyTorch's unmerged log-probs.
    const checkpoint = await loadCheckpoint(`${out}/${name}`);
    const model = new GpuModel(gpu, checkpoint.config, checkpoint.weights);
    assertRowsClose(await scoreSequences(model, expected.sequences), expected.logprobs, 1e-4, name);
    model.destroy();
    merged++;
  }
  assert.equal(merged, NAMES.length);
  // In bf16 the merged weights are rounded: close to the f32 merge, and marked as bf16.
  const name = "gqa_tied_all_linear", expected = readJson(`${CASES}${name}/expected.json`);
  const bf16 = await aha(
    "merge",
    "--model",
    ROOT + expected.model,
    "--adapter",
    CASES + name,
    "--out",
    `${out}/bf16`,
    "--dtype",
    "bf16",
  );
  assert.equal(bf16.code, 0, bf16.stderr.join("\n"));
  assert.equal(readJson(`${out}/bf16/config.json`).torch_dtype, "bfloat16");
  const [f32w, bf16w] = [
    await loadCheckpoint(`${out}/${name}`),
    await loadCheckpoint(`${out}/bf16`),
  ];
  for (const [w, a] of f32w.weights) {
    const b = bf16w.weights.get(w)!;
    a.forEach((x, i) => assert.ok(Math.abs(b[i] - x) <= Math.abs(x) / 256, `${w}[${i}]`));
  }
  await Deno.remove(out, { recursive: true });
});

Deno.test("aha score and aha loss take --adapter", gpuTest, async () => {
  const name = "gqa3_untied_rslora_subset", dir = CASES + name;
  const expected = readJson(`${dir}/expected.json`);
  const tmp = await Deno.makeTempDir();
  Deno.writeTextFileSync(`${tmp}/seqs.json`, JSON.stringify({ sequences: expected.sequences }));
  const score = await aha(
    "score",
    "--model",
    ROOT + expected.model,
    "--adapter",
    dir,
    "--input",
    `${tmp}/seqs.json`,
  );
  assert.equal(score.code, 0, score.stderr.join("\n"));
  assertRowsClose(
    JSON.parse(score.stdout).logprobs,
    expected.logprobs,
    1e-4,
    "aha score --adapter",
  );
  const loss = await aha(
    "loss",
    "--model",
    ROOT + expected.model,
    "--adapter",
    dir,
    "--batch",
    `${dir}/batch.json`,
  );
  assert.equal(loss.code, 0, loss.stderr.join("\n"));
  const result = JSON.parse(loss.stdout);
  assert.deepEqual(Object.keys(result.grads).sort(), Object.keys(expected.grads).sort());
  assert.ok(
    Object.keys(result.grads).every((k) =>
      /^base_model\.model\.model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.lora_[AB]\.weight$/.test(
        k,
      )
    ),
  );
  await Deno.remove(tmp, { recursive: true });
});

Deno.test("adapter errors are one line naming the file and the tensor", gpuTest, async () => {
  const tmp = await Deno.makeTempDir();
  const good = `${CASES}gqa_tied_all_linear`;
  const model = `${ROOT}tests/fixtures/golden/gqa_tied`;
  const seqs = `${tmp}/seqs.json`;
  Deno.writeTextFileSync(seqs, JSON.stringify({ sequences: [[1, 2, 3]] }));
  const score = (adapter: string, base = model) =>
    aha("score", "--model", base, "--adapter", adapter, "--input", seqs);
  const expectOneLine = async (
    run: Promise<{ code: number; stderr: string[] }>,
    pattern: RegExp,
  ) => {
    const { code, stderr } = await run;
    assert.equal(code, 1, stderr.join("\n"));
    assert.equal(stderr.length, 1, stderr.join("\n"));
    assert.match(stderr[0], pattern);
  };
  // No adapter_config.json.
  await expectOneLine(
    score(`${ROOT}tests/fixtures/golden/gqa_tied`),
    /gqa_tied: no adapter_config\.json \(not a PEFT adapter directory\)/,
  );
  // An adapter of another base: gqa3_untied has 3 layers of width 24, not 2 of 32.
  await expectOneLine(
    score(good, `${ROOT}tests/fixtures/golden/gqa3_untied`),
    /adapter_model\.safetensors: tensor "base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight" has shape \[4, 32\], expected \[4, 24\]/,
  );
  // An adapter for another architecture (GPT-2's fused attention).
  let copies = 0;
  const copy = (config: Record<string, unknown>) => {
    const dir = `${tmp}/adapter-${copies++}`;
    Deno.mkdirSync(dir);
    Deno.copyFileSync(`${good}/adapter_model.safetensors`, `${dir}/adapter_model.safetensors`);
    Deno.writeTextFileSync(
      `${dir}/adapter_config.json`,
      JSON.stringify({ ...readJson(`${good}/adapter_config.json`), ...config }),
    );
    return dir;
  };
  await expectOneLine(
    score(copy({ target_modules: ["c_attn"] })),
    /target module "c_attn" is not a projection of a Qwen2 model/,
  );
  // Targets that name fewer modules than the file holds; more than it holds.
  await expectOneLine(
    score(copy({ target_modules: ["q_proj"] })),
    /tensor "base_model\.model\.model\.layers\.0\.self_attn\.k_proj\.lora_A\.weight" is not a LoRA matrix of this base model/,
  );
  const partial = copy({
    target_modules: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    r: 4,
    lora_alpha: 8,
    use_dora: false,
    bias: "none",
  });
  Deno.writeFileSync(
    `${partial}/adapter_model.safetensors`,
    Deno.readFileSync(`${CASES}bf16_tied_r2/adapter_model.safetensors`),
  );
  await expectOneLine(
    score(partial),
    /missing tensor "base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight"/,
  );
  await expectOneLine(score(copy({ use_dora: true })), /field "use_dora" must be false/);
  await Deno.remove(tmp, { recursive: true });
});

Deno.test("every PyTorch LoRA case ran", () => {
  assert.equal(ran, NAMES.length);
});

Deno.test("the reference shares the base only for LoRA runs on the policy's adapter", () => {
  const cfg = (sets: string[]) => loadTrainConfig(null, sets);
  const lora = ["lora.r=8"];
  assert.equal(referenceSharesBase(cfg(lora), false), true);
  assert.equal(referenceSharesBase(cfg(lora), true), false);
  assert.equal(referenceSharesBase(cfg([...lora, "reference.adapter=same"]), true), true);
  assert.equal(referenceSharesBase(cfg([...lora, "reference.engine=onnx"]), false), false);
  assert.equal(referenceSharesBase(cfg([...lora, "beta=0"]), false), false);
  assert.equal(referenceSharesBase(cfg([]), false), false);
  assert.throws(
    () => cfg([...lora, "sync_ref_model=true"]),
    /"sync_ref_model" cannot be used with "lora"/,
  );
});

Deno.test(
  "the in-process base reference scores between the policy's forward and backward",
  gpuTest,
  async () => {
    const dir = `${CASES}gqa_tied_all_linear`, expected = readJson(`${dir}/expected.json`);
    const base = await loadCheckpoint(ROOT + expected.model);
    const adapter = await loadAdapter(dir, base.config);
    const batch = readJson(`${dir}/batch.json`);
    const rows = { rows: batch.sequences, promptLens: batch.sequences.map(() => batch.prompt_len) };
    const plain = new GpuModel(gpu, base.config, base.weights);
    const want = await new GpuReference(plain).completionLogprobs(rows, 1);
    // The same policy gradients with and without the reference scoring in between.
    const gradients = async (withReference: boolean) => {
      const policy = new GpuPolicy(new GpuModel(gpu, base.config, base.weights, { lora: adapter }));
      const reference = new GpuBaseReference(policy.model);
      let ref: number[][] = [];
      await policy.accumulateGradients(rows, 1, async (logprobs) => {
        if (withReference) ref = await reference.completionLogprobs(rows, 1);
        return logprobs.map((row) => row.map((_, t) => (t % 3) - 1));
      });
      const grads = await policy.model.readGrads();
      await reference.close();
      policy.model.destroy();
      return { grads, ref };
    };
    const alone = await gradients(false), interleaved = await gradients(true);
    assert.deepEqual(interleaved.grads, alone.grads);
    // The adapter switched off is the base model exactly.
    assert.deepEqual(interleaved.ref, want);
    plain.destroy();
  },
);

Deno.test("PEFT's init: A uniform in ±1/√in (Kaiming, a = √5), B zero, seeded", () => {
  const config = parseModelConfig({ ...PRESETS.tiny, vocab_size: 20 });
  const lora = { ...defaultLoraConfig(), r: 8 };
  const tensors = initLora(config, lora, new Rng(42));
  assert.deepEqual([...tensors.keys()], [...loraShapes(config, lora).keys()]);
  for (const m of loraModules(config, lora)) {
    const a = tensors.get(m.a)!, bound = 1 / Math.sqrt(m.inFeatures);
    assert.ok(a.every((x) => Math.abs(x) <= bound), m.a);
    const mean = a.reduce((s, x) => s + x, 0) / a.length;
    const variance = a.reduce((s, x) => s + x * x, 0) / a.length;
    // U(−b, b): mean 0, variance b²/3 (within sampling error of a few hundred values).
    assert.ok(Math.abs(mean) < 0.2 * bound, `${m.a}: mean ${mean}`);
    assert.ok(Math.abs(variance / (bound * bound / 3) - 1) < 0.25, `${m.a}: variance ${variance}`);
    assert.ok(tensors.get(m.b)!.every((x) => x === 0), m.b);
  }
  assert.deepEqual(initLora(config, lora, new Rng(42)), tensors);
  assert.notDeepEqual(initLora(config, lora, new Rng(43)), tensors);
});
