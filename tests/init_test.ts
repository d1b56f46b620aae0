// `aha init` and core/init.ts: the command run as a subprocess writes a checkpoint that loads
// back with the preset's shape and Hugging Face-style initial values; --config, --seed, --force
// and the error messages.

import assert from "node:assert/strict";
import { runAha as aha } from "./helpers.ts";
import { loadCheckpoint } from "../core/checkpoint.ts";
import { initWeights } from "../core/init.ts";
import { parameterCount, parseModelConfig, PRESETS } from "../core/model_config.ts";

const dir = await Deno.makeTempDir({ prefix: "aha_init_test_" });
globalThis.addEventListener("unload", () => Deno.removeSync(dir, { recursive: true }));

Deno.test("aha init --preset tiny writes a checkpoint that loads with HF-style initial values", async () => {
  const out = `${dir}/tiny`;
  const run = await aha("init", "--preset", "tiny", "--out", out, "--seed", "3");
  assert.equal(run.code, 0, run.stderr);
  assert.equal(run.stdout.split("\n").length, 1);
  assert.match(run.stdout, new RegExp(`wrote .*tiny: Qwen2 with 97408 parameters`));
  const { config, weights } = await loadCheckpoint(out);
  assert.deepEqual(config, parseModelConfig(PRESETS.tiny));
  assert.equal(parameterCount(config), 97408);
  assert.deepEqual(
    new Map(weights),
    initWeights(config, 3),
    "the command writes initWeights(config, seed)",
  );

  // Norm weights 1, biases 0, every matrix ~ N(0, 0.02²).
  const matrixValues: number[] = [];
  for (const [name, w] of weights) {
    if (name.endsWith("norm.weight")) assert.ok(w.every((v) => v === 1), name);
    else if (name.endsWith(".bias")) assert.ok(w.every((v) => v === 0), name);
    else matrixValues.push(...w);
  }
  const n = matrixValues.length;
  const mean = matrixValues.reduce((a, b) => a + b, 0) / n;
  const std = Math.sqrt(matrixValues.reduce((a, b) => a + (b - mean) ** 2, 0) / n);
  const withinOneStd = matrixValues.filter((v) => Math.abs(v) < 0.02).length / n;
  assert.ok(Math.abs(mean) < 5e-4, `mean ${mean}`); // ~4 standard errors for n ≈ 97k
  assert.ok(Math.abs(std - 0.02) < 4e-4, `std ${std}`);
  assert.ok(Math.abs(withinOneStd - 0.6827) < 0.01, `fraction within 1σ ${withinOneStd}`);
});

Deno.test("initWeights is deterministic in the seed", () => {
  const config = parseModelConfig(PRESETS.tiny);
  assert.deepEqual(initWeights(config, 5), initWeights(config, 5));
  const a = initWeights(config, 5).get("model.embed_tokens.weight")!;
  const b = initWeights(config, 6).get("model.embed_tokens.weight")!;
  assert.notDeepEqual(a, b);
});

Deno.test("aha init --config overrides the preset's shape, or gives the whole shape", async () => {
  const overrides = `${dir}/overrides.json`;
  await Deno.writeTextFile(
    overrides,
    JSON.stringify({
      num_hidden_layers: 1,
      vocab_size: 50,
      tie_word_embeddings: false,
      rope_theta: 500000,
    }),
  );
  const out = `${dir}/custom`;
  const run = await aha("init", "--preset", "tiny", "--config", overrides, "--out", out);
  assert.equal(run.code, 0, run.stderr);
  const { config, weights, hfConfig } = await loadCheckpoint(out);
  assert.equal(config.numLayers, 1);
  assert.equal(config.vocabSize, 50);
  assert.equal(config.ropeTheta, 500000);
  assert.equal(config.hiddenSize, 64, "the rest from the preset");
  assert.deepEqual(weights.get("lm_head.weight")!.length, 50 * 64);
  assert.equal(hfConfig.model_type, "qwen2");
  assert.match(run.stdout, new RegExp(`with ${parameterCount(config)} parameters`));

  const whole = `${dir}/whole.json`;
  await Deno.writeTextFile(whole, JSON.stringify({ ...PRESETS.tiny, hidden_size: 32 }));
  const alone = await aha("init", "--config", whole, "--out", `${dir}/alone`);
  assert.equal(alone.code, 0, alone.stderr);
  assert.equal((await loadCheckpoint(`${dir}/alone`)).config.hiddenSize, 32);
});

Deno.test("aha init errors: unknown preset, non-empty --out, bad --config; --force replaces", async () => {
  const unknown = await aha("init", "--preset", "huge", "--out", `${dir}/x`);
  assert.equal(unknown.code, 2);
  assert.equal(unknown.stderr, `aha: init: unknown preset "huge" (available: tiny, small)`);

  const out = `${dir}/occupied`;
  await Deno.mkdir(out);
  await Deno.writeTextFile(`${out}/notes.txt`, "keep me");
  const refused = await aha("init", "--preset", "tiny", "--out", out);
  assert.equal(refused.code, 1);
  assert.equal(
    refused.stderr,
    `aha: init: ${out} exists and is not empty (use --force to replace it)`,
  );
  assert.equal(await Deno.readTextFile(`${out}/notes.txt`), "keep me");

  const bad = `${dir}/bad.json`;
  await Deno.writeTextFile(bad, JSON.stringify({ hidden_size: 0 }));
  const invalid = await aha("init", "--preset", "tiny", "--config", bad, "--out", `${dir}/y`);
  assert.equal(invalid.code, 1);
  assert.match(
    invalid.stderr,
    /^aha: .*bad.json: field "hidden_size" must be a positive integer, got 0$/,
  );

  const forced = await aha("init", "--preset", "tiny", "--out", out, "--force");
  assert.equal(forced.code, 0, forced.stderr);
  assert.deepEqual([...Deno.readDirSync(out)].map((e) => e.name).sort(), [
    "config.json",
    "model.safetensors",
  ]);

  const noOut = await aha("init", "--preset", "tiny");
  assert.equal(noOut.code, 2);
  assert.match(noOut.stderr, /missing --out/);
});
