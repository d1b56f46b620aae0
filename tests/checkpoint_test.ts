// core/checkpoint.ts: loading the golden Hugging Face directories (single file F32 and BF16,
// sharded F16), byte-exact save → load round trips, clear errors for missing or misshapen
// weights, and saves that replace a directory atomically.

import assert from "node:assert/strict";
import {
  loadCheckpoint,
  saveCheckpoint,
  type TensorReader,
  tensorsOnDemand,
  WeightsOnDemand,
} from "../core/checkpoint.ts";
import { AhaError } from "../core/errors.ts";
import { weightShapes } from "../core/model_config.ts";
import { halfValue } from "../core/half.ts";
import {
  readSafetensors,
  readSafetensorsHeader,
  readSafetensorsRaw,
  writeSafetensors,
} from "../core/safetensors.ts";

const GOLDEN = new URL("./fixtures/golden/", import.meta.url).pathname;
const dir = await Deno.makeTempDir({ prefix: "aha_checkpoint_test_" });
globalThis.addEventListener("unload", () => Deno.removeSync(dir, { recursive: true }));

async function copyDir(from: string, to: string) {
  await Deno.mkdir(to, { recursive: true });
  for await (const e of Deno.readDir(from)) {
    await Deno.copyFile(`${from}/${e.name}`, `${to}/${e.name}`);
  }
}

/** Rewrites <path>/model.safetensors with `edit` applied to its tensors. */
async function editWeights(
  path: string,
  edit: (t: Map<string, { shape: number[]; data: Float32Array }>) => void,
) {
  const tensors = await readSafetensors(`${path}/model.safetensors`);
  edit(tensors);
  await writeSafetensors(`${path}/model.safetensors`, tensors, { format: "pt" });
}

function rejectsWith(promise: Promise<unknown>, pattern: RegExp) {
  return assert.rejects(promise, (e: Error) => {
    assert.ok(e instanceof AhaError, `${e}`);
    assert.match(e.message, pattern);
    assert.ok(!e.message.includes("\n"), "one line");
    return true;
  });
}

for (const name of ["gqa_tied", "gqa3_untied", "mha_untied"]) {
  Deno.test(`load → save of golden/${name} (F32) reproduces model.safetensors byte for byte`, async () => {
    const loaded = await loadCheckpoint(GOLDEN + name);
    assert.deepEqual([...loaded.weights.keys()], [...weightShapes(loaded.config).keys()]);
    const out = `${dir}/${name}`;
    await saveCheckpoint(out, loaded.hfConfig, loaded.weights);
    assert.deepEqual(
      await Deno.readFile(`${out}/model.safetensors`),
      await Deno.readFile(`${GOLDEN}${name}/model.safetensors`),
    );
    assert.deepEqual(JSON.parse(await Deno.readTextFile(`${out}/config.json`)), loaded.hfConfig);
    const again = await loadCheckpoint(out);
    assert.deepEqual(new Map(again.weights), new Map(loaded.weights));
    assert.deepEqual(again.config, loaded.config);
  });
}

Deno.test("loads BF16 and sharded F16 checkpoints; they survive a save → load as F32", async () => {
  for (const name of ["bf16_tied", "f16_sharded"]) {
    const loaded = await loadCheckpoint(GOLDEN + name);
    const shapes = weightShapes(loaded.config);
    assert.deepEqual([...loaded.weights.keys()], [...shapes.keys()]);
    for (const [w, shape] of shapes) {
      assert.equal(
        loaded.weights.get(w)!.length,
        shape.reduce((a, b) => a * b),
      );
    }
    await saveCheckpoint(`${dir}/re_${name}`, loaded.hfConfig, loaded.weights);
    const again = await loadCheckpoint(`${dir}/re_${name}`);
    assert.deepEqual(new Map(again.weights), new Map(loaded.weights));
  }
  // Spot value: the F16 shards hold values rounded to 11 significant bits.
  const { weights } = await loadCheckpoint(GOLDEN + "f16_sharded");
  for (const v of weights.get("lm_head.weight")!) assert.equal(v, new Float16Array([v])[0]);
});

Deno.test("weights are read from the files when asked for; a replaced or corrupt file is an error at the read", async () => {
  const path = `${dir}/lazy`;
  await copyDir(GOLDEN + "gqa3_untied", path);
  const { hfConfig, weights } = await loadCheckpoint(path);
  // Each read is the file's values (as the async reader sees them), and a fresh array.
  const file = await readSafetensors(`${path}/model.safetensors`);
  for (const [name, data] of weights) assert.deepEqual(data, file.get(name)!.data, name);
  const name = "model.layers.1.mlp.up_proj.weight";
  const first = weights.get(name)!;
  first.fill(7);
  assert.deepEqual(weights.get(name), file.get(name)!.data, "not kept: a read is the file's");
  assert.equal(weights.get("no.such.weight"), undefined);

  // The checkpoint replaced by another of the same size: its weights are no longer these.
  const changed = new Map(weights).set(name, new Float32Array(first.length).fill(0.5));
  await saveCheckpoint(path, hfConfig, changed);
  assert.throws(() => weights.get(name), (e: Error) => {
    assert.ok(e instanceof AhaError, `${e}`);
    assert.match(e.message, /lazy\/model\.safetensors: changed since its header was read/);
    return true;
  });
  await Deno.remove(`${path}/model.safetensors`);
  assert.throws(() => weights.get(name), /lazy\/model\.safetensors: gone since its header/);

  // NaN in a weight: the header is fine, so loading succeeds and reading that weight fails.
  await copyDir(GOLDEN + "gqa3_untied", path);
  await editWeights(path, (t) => t.get(name)!.data[5] = NaN);
  const corrupt = await loadCheckpoint(path);
  assert.equal(corrupt.weights.get("model.norm.weight")!.length, 24);
  assert.throws(
    () => corrupt.weights.get(name),
    /"model\.layers\.1\.mlp\.up_proj\.weight" holds NaN at index 5/,
  );
});

Deno.test("a 16-bit checkpoint gives its weights' own bits, checked as its f32 reads are", async () => {
  // Each weight's bits against the file's bytes read by the async reader; no bits where the file
  // stores another dtype.
  const sixteenBit = [["bf16_tied", "bf16", "f16"], ["f16_sharded", "f16", "bf16"]] as const;
  for (const [name, dtype, other] of sixteenBit) {
    const { weights } = await loadCheckpoint(GOLDEN + name);
    const files = [...Deno.readDirSync(GOLDEN + name)].filter((e) =>
      e.name.endsWith(".safetensors")
    );
    const raw = new Map<string, { dtype: string; bytes: Uint8Array }>();
    for (const f of files) {
      for (const [n, t] of await readSafetensorsRaw(`${GOLDEN}${name}/${f.name}`)) raw.set(n, t);
    }
    assert.ok(weights instanceof WeightsOnDemand);
    let sixteen = 0;
    for (const [n, data] of weights) {
      const halves = weights.halves(n, dtype), stored = raw.get(n)!;
      if (stored.dtype === "F32") {
        assert.equal(halves, null, n);
        continue;
      }
      sixteen++;
      assert.deepEqual(halves, new Uint16Array(stored.bytes.buffer), n);
      assert.deepEqual(Float32Array.from(halves!, (h) => halfValue(h, dtype)), data, n);
      assert.equal(weights.halves(n, other), null, n);
    }
    assert.ok(sixteen > 0, name);
  }
  const f32 = (await loadCheckpoint(GOLDEN + "gqa3_untied")).weights as WeightsOnDemand;
  assert.equal(f32.halves("model.layers.0.mlp.up_proj.weight", "bf16"), null);
  assert.equal(f32.halves("no.such.weight", "bf16"), null);

  // A NaN or an infinity in the bits, and a file changed since its header was read.
  const path = `${dir}/bits`, name = "model.layers.1.mlp.up_proj.weight";
  for (const [bits, shown] of [[0x7fc0, "NaN"], [0xff80, "-Infinity"]] as const) {
    await copyDir(GOLDEN + "bf16_tied", path);
    const file = `${path}/model.safetensors`;
    const { entries, dataOffset } = await readSafetensorsHeader(file);
    const bytes = await Deno.readFile(file);
    new DataView(bytes.buffer).setUint16(dataOffset + entries.get(name)!.begin + 2 * 9, bits, true);
    await Deno.writeFile(file, bytes);
    const { weights } = await loadCheckpoint(path);
    const halves = (n: string) => (weights as WeightsOnDemand).halves(n, "bf16");
    assert.ok(halves("model.layers.0.mlp.up_proj.weight"));
    assert.throws(() => halves(name), (e: Error) => {
      assert.ok(e instanceof AhaError, `${e}`);
      assert.match(
        e.message,
        new RegExp(`"${name}" holds ${shown} at index 9: the checkpoint is corrupt`),
      );
      return true;
    });
    await Deno.utime(file, new Date(), new Date(Date.now() + 5000));
    assert.throws(
      () => halves("model.layers.0.mlp.up_proj.weight"),
      /bits\/model\.safetensors: changed since/,
    );
  }
});

Deno.test("a tied checkpoint that also stores lm_head.weight loads, ignoring it", async () => {
  const path = `${dir}/extra_head`;
  await copyDir(GOLDEN + "gqa_tied", path);
  await editWeights(path, (t) => {
    t.set("lm_head.weight", { shape: [41, 32], data: new Float32Array(41 * 32) });
  });
  const { weights } = await loadCheckpoint(path);
  assert.equal(weights.has("lm_head.weight"), false);
});

Deno.test("missing weight, wrong shape and missing files are named in one line", async () => {
  const missing = `${dir}/missing_weight`;
  await copyDir(GOLDEN + "mha_untied", missing);
  await editWeights(missing, (t) => t.delete("model.layers.0.mlp.up_proj.weight"));
  await rejectsWith(
    loadCheckpoint(missing),
    /missing_weight\/model.safetensors: missing weight "model.layers.0.mlp.up_proj.weight" \(expected shape \[24, 16\]\)/,
  );

  const misshapen = `${dir}/wrong_shape`;
  await copyDir(GOLDEN + "mha_untied", misshapen);
  await editWeights(misshapen, (t) => {
    t.set("model.layers.0.self_attn.k_proj.bias", { shape: [15], data: new Float32Array(15) });
  });
  await rejectsWith(
    loadCheckpoint(misshapen),
    /wrong_shape\/model.safetensors: weight "model.layers.0.self_attn.k_proj.bias" has shape \[15\], expected \[16\] from config.json/,
  );

  // A weight stored as integers is refused; an extra integer tensor (a buffer some checkpoints
  // keep) is not a weight and is ignored. tensorsOnDemand, which takes every tensor, refuses it.
  const ints = `${dir}/int_weight`;
  await copyDir(GOLDEN + "mha_untied", ints);
  const tensors = await readSafetensors(`${ints}/model.safetensors`);
  type Values = { shape: number[]; data: Float32Array | Int32Array };
  const asInts = (name: string): Values => ({
    shape: tensors.get(name)!.shape,
    data: new Int32Array(tensors.get(name)!.data.length),
  });
  await writeSafetensors(
    `${ints}/model.safetensors`,
    new Map<string, Values>([...tensors, ["position_ids", {
      shape: [2],
      data: Int32Array.of(0, 1),
    }]]),
  );
  assert.equal((await loadCheckpoint(ints)).weights.size, tensors.size);
  await rejectsWith(
    tensorsOnDemand(`${ints}/model.safetensors`),
    /int_weight\/model.safetensors: tensor "position_ids" has dtype I32; expected F32, F16 or BF16/,
  );
  await writeSafetensors(
    `${ints}/model.safetensors`,
    new Map<string, Values>([...tensors, ["model.norm.weight", asInts("model.norm.weight")]]),
  );
  await rejectsWith(
    loadCheckpoint(ints),
    /int_weight\/model.safetensors: weight "model.norm.weight" has dtype I32; expected F32, F16 or BF16/,
  );

  const noWeights = `${dir}/no_weights`;
  await copyDir(GOLDEN + "mha_untied", noWeights);
  await Deno.remove(`${noWeights}/model.safetensors`);
  await rejectsWith(
    loadCheckpoint(noWeights),
    /no_weights: no model.safetensors or model.safetensors.index.json/,
  );
  await rejectsWith(loadCheckpoint(`${dir}/nowhere`), /nowhere\/config.json: file not found/);

  const badConfig = `${dir}/bad_config`;
  await copyDir(GOLDEN + "mha_untied", badConfig);
  await Deno.writeTextFile(`${badConfig}/config.json`, '{"hidden_size": 16,');
  await rejectsWith(loadCheckpoint(badConfig), /bad_config\/config.json: not valid JSON/);

  const shards = `${dir}/bad_index`;
  await copyDir(GOLDEN + "f16_sharded", shards);
  const index = JSON.parse(await Deno.readTextFile(`${shards}/model.safetensors.index.json`));
  delete index.weight_map["model.norm.weight"];
  await Deno.writeTextFile(`${shards}/model.safetensors.index.json`, JSON.stringify(index));
  await rejectsWith(
    loadCheckpoint(shards),
    /bad_index\/model.safetensors.index.json: weight_map has no file for weight "model.norm.weight"/,
  );
});

Deno.test("saving replaces a directory whole, and a failed save leaves the old one intact", async () => {
  const { hfConfig, weights } = await loadCheckpoint(GOLDEN + "mha_untied");
  const parent = `${dir}/atomic`;
  const path = `${parent}/ckpt`;
  await saveCheckpoint(path, hfConfig, weights, {
    "old.txt": "old",
    "state.bin": Uint8Array.of(1, 2),
  });
  assert.equal(await Deno.readTextFile(`${path}/old.txt`), "old");
  assert.deepEqual(await Deno.readFile(`${path}/state.bin`), Uint8Array.of(1, 2));
  const before = await Deno.readFile(`${path}/model.safetensors`);

  // Failures: a missing weight (before writing anything), then an unwritable extra file.
  const partial = new Map(weights);
  partial.delete("model.norm.weight");
  await rejectsWith(
    saveCheckpoint(path, hfConfig, partial),
    /cannot save weight "model.norm.weight"/,
  );
  await rejectsWith(
    saveCheckpoint(path, hfConfig, weights, { "no/such/dir.txt": "x" }),
    /atomic\/ckpt: cannot save checkpoint/,
  );
  assert.deepEqual(await Deno.readFile(`${path}/model.safetensors`), before);
  assert.equal(await Deno.readTextFile(`${path}/old.txt`), "old");

  // A weight found non-finite when its turn to be written comes (each is asked for one at a
  // time, after the earlier ones are written): refused, the old checkpoint intact.
  const asked: string[] = [];
  const temporaryFile = `${parent}/.ckpt.${Deno.pid}.tmp/model.safetensors.${Deno.pid}.tmp`;
  let writtenBefore = -1;
  const diverged = new WeightsOnDemand([...weights.keys()], (name) => {
    asked.push(name);
    const data = weights.get(name)!;
    if (name !== "model.layers.0.mlp.up_proj.weight") return data;
    writtenBefore = Deno.statSync(temporaryFile).size;
    return data.map(() => NaN);
  });
  await rejectsWith(
    saveCheckpoint(path, hfConfig, diverged),
    /not saved: weight "model\.layers\.0\.mlp\.up_proj\.weight" holds NaN at index 0/,
  );
  assert.deepEqual(await Deno.readFile(`${path}/model.safetensors`), before);
  const order = [...weights.keys()];
  const upTo = order.slice(0, order.indexOf("model.layers.0.mlp.up_proj.weight"));
  assert.deepEqual(asked, [...upTo, "model.layers.0.mlp.up_proj.weight"]);
  const earlier = upTo.reduce((bytes, name) => bytes + 4 * weights.get(name)!.length, 0);
  assert.ok(writtenBefore >= earlier, `${writtenBefore} bytes written before, ${earlier} expected`);

  // A successful save replaces everything: old.txt is gone.
  const changed = new Map(weights);
  changed.set("model.norm.weight", new Float32Array(16).fill(2));
  await saveCheckpoint(path + "/", hfConfig, changed, { "new.txt": "new" });
  const names = [...Deno.readDirSync(path)].map((e) => e.name).sort();
  assert.deepEqual(names, ["config.json", "model.safetensors", "new.txt"]);
  assert.deepEqual(
    (await loadCheckpoint(path)).weights.get("model.norm.weight"),
    new Float32Array(16).fill(2),
  );
  assert.deepEqual(
    [...Deno.readDirSync(parent)].map((e) => e.name),
    ["ckpt"],
    "no temporaries left",
  );
});

Deno.test("a save through a TensorReader writes each weight's parts as one, and finds a NaN at its index in the whole", async () => {
  const { hfConfig, weights } = await loadCheckpoint(GOLDEN + "mha_untied");
  const whole = new Map(weights);
  // Every weight in three uneven parts (as row slices come), read when asked for.
  const inParts = (change?: (name: string, parts: Float32Array[]) => void): TensorReader => ({
    sizes: new Map([...whole].map(([name, data]) => [name, data.length])),
    read: async function* (name) {
      const data = whole.get(name)!, third = Math.floor(data.length / 3);
      const parts = [data.slice(0, third), data.slice(third, third + 1), data.slice(third + 1)];
      change?.(name, parts);
      yield* parts;
    },
  });
  for (const dtype of ["f32", "bf16"] as const) {
    await saveCheckpoint(`${dir}/parts-whole`, hfConfig, whole, {}, dtype);
    await saveCheckpoint(`${dir}/parts-read`, hfConfig, inParts(), {}, dtype);
    assert.deepEqual(
      Deno.readFileSync(`${dir}/parts-read/model.safetensors`),
      Deno.readFileSync(`${dir}/parts-whole/model.safetensors`),
      dtype,
    );
  }
  const name = "model.layers.0.mlp.up_proj.weight", length = whole.get(name)!.length;
  const nan = inParts((n, parts) => n === name && (parts[2][4] = NaN));
  await rejectsWith(
    saveCheckpoint(`${dir}/parts-read`, hfConfig, nan),
    new RegExp(`"${name}" holds NaN at index ${Math.floor(length / 3) + 1 + 4} `),
  );
  // Parts that end a value short: found when they end, and the checkpoint there is kept.
  const short = inParts((n, parts) => n === name && (parts[2] = parts[2].subarray(1)));
  await rejectsWith(
    saveCheckpoint(`${dir}/parts-read`, hfConfig, short),
    new RegExp(`cannot save weight "${name}": expected ${length} values .*got ${length - 1}`),
  );
  assert.deepEqual(
    Deno.readFileSync(`${dir}/parts-read/model.safetensors`),
    Deno.readFileSync(`${dir}/parts-whole/model.safetensors`),
  );
});

Deno.test("a save removes what killed saves of its name left, and only theirs", async () => {
  const { hfConfig, weights } = await loadCheckpoint(GOLDEN + "mha_untied");
  const parent = `${dir}/killed`;
  await Deno.mkdir(parent);
  const child = new Deno.Command("true").spawn();
  await child.status; // its PID is now a process that is gone
  const live = new Deno.Command("sleep", { args: ["30"] }).spawn();
  try {
    const left = [
      `.ckpt.${child.pid}.tmp`, // a killed save's half-written directory
      `.ckpt.${live.pid}.tmp`, // a save in progress in another process
      `.other.${child.pid}.tmp`, // another name's: not this save's to judge
      `.moved.${child.pid}.old`, // a killed save had moved "moved" aside, and nothing replaced it
    ];
    for (const name of left) {
      await Deno.mkdir(`${parent}/${name}`);
      await Deno.writeTextFile(`${parent}/${name}/config.json`, name);
    }
    await saveCheckpoint(`${parent}/ckpt`, hfConfig, weights);
    const after = () => [...Deno.readDirSync(parent)].map((e) => e.name).sort();
    assert.deepEqual(
      after(),
      [`.ckpt.${live.pid}.tmp`, `.moved.${child.pid}.old`, `.other.${child.pid}.tmp`, "ckpt"]
        .sort(),
    );
    // Saving "moved" first puts the old directory back, then replaces it whole.
    await saveCheckpoint(`${parent}/moved`, hfConfig, weights, { "new.txt": "new" });
    assert.deepEqual(
      after(),
      [`.ckpt.${live.pid}.tmp`, `.other.${child.pid}.tmp`, "ckpt", "moved"].sort(),
    );
    assert.deepEqual([...Deno.readDirSync(`${parent}/moved`)].map((e) => e.name).sort(), [
      "config.json",
      "model.safetensors",
      "new.txt",
    ]);
  } finally {
    live.kill();
    await live.status;
  }
});
