// reference/onnx_export.ts + onnx_engine.ts: the ONNX export run by onnxruntime-web (WASM,
// 2 threads) against the PyTorch golden log-probs and against the float64 CPU twin on a fresh
// untied checkpoint (both to ≤ 1e-4 absolute), the export cache (re-used, then invalidated by
// new weights), user-supplied exports (one without the "inv_temperature" input serves
// temperature 1 only), and clear errors for bad input. Temperature ≠ 1 against the WebGPU
// engine: engines_test.ts.

import assert from "node:assert/strict";
import onnxProto from "onnx-proto";
import { loadCheckpoint, saveCheckpoint } from "../core/checkpoint.ts";
import { cpuLogprobs, type Weights } from "../core/cpu_model.ts";
import { AhaError } from "../core/errors.ts";
import { initWeights } from "../core/init.ts";
import { type ModelConfig, parseModelConfig, PRESETS, toHfConfig } from "../core/model_config.ts";
import { Rng } from "../core/rng.ts";
import { readSafetensors, writeSafetensors } from "../core/safetensors.ts";
import { OnnxEngine } from "../reference/onnx_engine.ts";
import { exportOnnx } from "../reference/onnx_export.ts";
import { assertRowsClose, fixtureCases, GOLDEN_CASES } from "./helpers.ts";

const TOLERANCE = 1e-4;
const THREADS = 2;
const GOLDEN = new URL("./fixtures/golden/", import.meta.url).pathname;
const tmp = await Deno.makeTempDir({ prefix: "aha_onnx_test_" });
globalThis.addEventListener("unload", () => Deno.removeSync(tmp, { recursive: true }));

// An untied grouped-query model (6 query heads over 2 kv heads, head dim 8) with every weight
// random: biases and norm weights too, which initWeights leaves at 0 and 1.
const untied = parseModelConfig({
  vocab_size: 61,
  hidden_size: 48,
  intermediate_size: 37,
  num_hidden_layers: 2,
  num_attention_heads: 6,
  num_key_value_heads: 2,
  rms_norm_eps: 1e-5,
  rope_theta: 1e6,
  tie_word_embeddings: false,
  max_position_embeddings: 64,
});
function randomWeights(seed: number) {
  const weights = initWeights(untied, seed);
  const rng = new Rng(seed);
  for (const [name, data] of weights) {
    if (name.endsWith(".bias")) data.forEach((_, i) => data[i] = 0.1 * (rng.next() - 0.5));
    if (name.endsWith("norm.weight")) data.forEach((_, i) => data[i] = 0.5 + rng.next());
  }
  return weights;
}
function randomSequences(seed: number, lengths: number[], vocab: number) {
  const rng = new Rng(seed);
  return lengths.map((n) => Array.from({ length: n }, () => Math.floor(rng.next() * vocab)));
}

/** An engine's log-probs of `sequences` against the float64 CPU twin's. */
async function assertMatchesTwin(
  engine: OnnxEngine,
  config: ModelConfig,
  weights: Weights,
  sequences: number[][],
  what: string,
) {
  const want = cpuLogprobs(config, weights, sequences);
  assertRowsClose(await engine.logprobs(sequences), want, TOLERANCE, what);
}

Deno.test("onnx engine matches the PyTorch golden log-probs", async () => {
  let ran = 0;
  for (const name of fixtureCases(GOLDEN, GOLDEN_CASES)) {
    const entry = { name };
    const dir = GOLDEN + entry.name;
    ran++;
    const expected = JSON.parse(await Deno.readTextFile(`${dir}/expected.json`));
    // In-memory export: nothing is written into the fixture directories.
    const engine = await OnnxEngine.create(await loadCheckpoint(dir), { threads: THREADS });
    assertRowsClose(
      await engine.logprobs(expected.sequences),
      expected.logprobs,
      TOLERANCE,
      entry.name,
    );
    await engine.release();
  }
  assert.equal(ran, GOLDEN_CASES.length);
});

Deno.test("onnx engine matches the CPU twin (untied, random biases; tiny preset)", async () => {
  const weights = randomWeights(7);
  const sequences = randomSequences(8, [33, 1, 7, 2, 64, 7], untied.vocabSize);
  const engine = await OnnxEngine.create({ config: untied, weights }, { threads: THREADS });
  await assertMatchesTwin(engine, untied, weights, sequences, "untied");
  await engine.release();

  const tiny = parseModelConfig(PRESETS.tiny);
  const tinyWeights = initWeights(tiny, 3);
  const tinySequences = randomSequences(4, [97, 5, 40], tiny.vocabSize);
  const tinyEngine = await OnnxEngine.create({ config: tiny, weights: tinyWeights });
  await assertMatchesTwin(tinyEngine, tiny, tinyWeights, tinySequences, "tiny");
  await tinyEngine.release();
});

Deno.test("onnx engine with `from`: each row from its own position on, against the CPU twin", async () => {
  // One batch of rows whose first wanted positions differ (the export projects from the
  // smallest, 3, on), one wanting none (from = its last position), one of a single token.
  const weights = randomWeights(13);
  const sequences = randomSequences(14, [33, 12, 7, 40, 1, 9], untied.vocabSize);
  const from = [20, 3, 6, 31, 0, 5];
  const engine = await OnnxEngine.create({ config: untied, weights }, { threads: THREADS });
  const got = await engine.logprobs(sequences, 1, from);
  await engine.release();
  const want = cpuLogprobs(untied, weights, sequences).map((row, i) => row.slice(from[i]));
  assert.deepEqual(got.map((row) => row.length), want.map((row) => row.length));
  assertRowsClose(got, want, TOLERANCE, "from");
});

Deno.test("onnx export cache: re-used while the weights stay, replaced when they change", async () => {
  const dir = `${tmp}/model`;
  await saveCheckpoint(dir, toHfConfig(untied), randomWeights(11));
  const sequences = randomSequences(12, [20, 9], untied.vocabSize);
  const cached = async () => {
    const names = [];
    for await (const e of Deno.readDir(`${dir}/.aha-onnx`)) names.push(e.name);
    assert.equal(names.length, 1, `one export in the cache: ${names}`);
    const path = `${dir}/.aha-onnx/${names[0]}`;
    return { path, mtime: (await Deno.stat(path)).mtime!.getTime() };
  };

  const first = await OnnxEngine.create(dir, { threads: THREADS });
  const firstLogprobs = await first.logprobs(sequences);
  await first.release();
  const export1 = await cached();
  assert.ok(first.description.includes(export1.path), first.description);

  const again = await OnnxEngine.create(dir, { threads: THREADS });
  assert.deepEqual(await again.logprobs(sequences), firstLogprobs);
  await again.release();
  assert.deepEqual(await cached(), export1, "the export is re-used, not rewritten");

  // New weights in place (the cache directory survives): a new export replaces the old one.
  const tensors = await readSafetensors(`${dir}/model.safetensors`);
  const newWeights = randomWeights(13);
  for (const [name, t] of tensors) t.data.set(newWeights.get(name)!);
  await writeSafetensors(`${dir}/model.safetensors`, tensors, { format: "pt" });
  const changed = await OnnxEngine.create(dir, { threads: THREADS });
  await assertMatchesTwin(changed, untied, newWeights, sequences, "after new weights");
  await changed.release();
  const export2 = await cached();
  assert.notEqual(export2.path, export1.path);

  // A user-supplied export runs as is.
  const copy = `${tmp}/copy.onnx`;
  await Deno.copyFile(export2.path, copy);
  const supplied = await OnnxEngine.create(dir, { threads: THREADS, onnxPath: copy });
  assert.ok(supplied.description.includes(copy), supplied.description);
  await supplied.release();
});

Deno.test("onnx engine: clear errors for bad input", async () => {
  const garbage = `${tmp}/garbage.onnx`;
  await Deno.writeTextFile(garbage, "not a model");
  const config = untied, weights = randomWeights(1);
  await assert.rejects(
    OnnxEngine.create({ config, weights }, { onnxPath: garbage }),
    (e) => e instanceof AhaError && e.message.startsWith(`${garbage}: onnxruntime cannot load`),
  );
  await assert.rejects(
    OnnxEngine.create({ config, weights }, { onnxPath: `${tmp}/missing.onnx` }),
    (e) => e instanceof AhaError && e.message.includes("missing.onnx: cannot read"),
  );
  const engine = await OnnxEngine.create({ config, weights });
  await assert.rejects(
    engine.logprobs([[1, 2], [3, 61]]),
    (e) => e instanceof AhaError && e.message.includes("sequences[1][1] = 61 is outside"),
  );
  await assert.rejects(
    engine.logprobs([new Array(65).fill(0)]),
    (e) => e instanceof AhaError && e.message.includes("max_position_embeddings (64)"),
  );
  assert.deepEqual(await engine.logprobs([[5], []]), [[], []]);
  await engine.release();
});

Deno.test("an export without the inv_temperature input serves temperature 1 only", async () => {
  // An older-style export: inv_temperature is a constant 1 instead of a graph input.
  const { ModelProto } = onnxProto.onnx;
  const weights = randomWeights(21);
  const model = ModelProto.decode(exportOnnx(untied, weights));
  const graph = model.graph!;
  graph.input = graph.input!.filter((i) => i.name !== "inv_temperature");
  graph.initializer!.push({
    name: "inv_temperature",
    dims: [],
    dataType: onnxProto.onnx.TensorProto.DataType.FLOAT,
    floatData: [1],
  });
  const path = `${tmp}/plain.onnx`;
  await Deno.writeFile(path, ModelProto.encode(model).finish());

  const engine = await OnnxEngine.create({ config: untied, weights }, { onnxPath: path });
  const sequences = randomSequences(22, [9, 4], untied.vocabSize);
  await assertMatchesTwin(engine, untied, weights, sequences, "plain export");
  await assert.rejects(
    engine.logprobs(sequences, 1 / 0.7),
    (e) =>
      e instanceof AhaError &&
      e.message.startsWith(`${path}: this ONNX export has no "inv_temperature" input`),
  );
  await engine.release();
});
