// Hub ids against a stand-in Hub on 127.0.0.1 (tests/stand_in_hub.ts): a tiny sharded checkpoint
// made here is fetched into an empty cache, which must then have huggingface_hub's exact layout
// (refs/main holding the commit, blobs named by their etag, relative symlinks from the snapshot,
// .no_exist markers); the transfer cut halfway resumes with a Range request; a corrupt partial
// file is discarded; a second resolve needs no request; offline mode reads the cache or names
// what is missing; a private repository needs the token (from HF_TOKEN or the token file); a
// dataset's Parquet split comes from refs/convert/parquet; and `aha score` and `aha download`
// read the model back by id in a subprocess, offline, giving what the local directory gives,
// and `aha train` starts from it.

import assert from "node:assert/strict";
import { parquetWriteBuffer } from "hyparquet-writer";
import { loadCheckpoint } from "../core/checkpoint.ts";
import { initWeights } from "../core/init.ts";
import { parseModelConfig, PRESETS, toHfConfig, weightShapes } from "../core/model_config.ts";
import { encodeSafetensors } from "../core/safetensors.ts";
import {
  cachedFile,
  globMatcher,
  hubSettings,
  parseHubId,
  resolveDatasetSplit,
  resolveModel,
} from "../data/hub.ts";
import { loadDataset } from "../data/dataset.ts";
import { loadTrainConfig } from "../core/train_config.ts";
import { loadTokenizer } from "../core/tokenizer.ts";
import { datasetTask } from "../data/tasks.ts";
import { etagOf, StandInHub, type StandInRepo } from "./stand_in_hub.ts";

const MAIN = new URL("../main.ts", import.meta.url).pathname;
const QWEN = new URL("./fixtures/qwen2-tokenizer", import.meta.url).pathname;
const COMMIT = "0123456789abcdef0123456789abcdef01234567";
const text = (s: string) => new TextEncoder().encode(s);

/** A tiny Qwen2 checkpoint in two shards with an index, as the Hub holds large models. */
function tinyShardedModel(): {
  files: Map<string, Uint8Array>;
  weights: Map<string, Float32Array>;
} {
  const config = parseModelConfig(PRESETS.tiny);
  const weights = initWeights(config, 7);
  const names = [...weights.keys()];
  const shards = [names.slice(0, 5), names.slice(5)];
  const files = new Map<string, Uint8Array>();
  files.set("config.json", text(JSON.stringify(toHfConfig(config), null, 2)));
  const weightMap: Record<string, string> = {};
  shards.forEach((shard, i) => {
    const file = `model-0000${i + 1}-of-00002.safetensors`;
    const shapes = weightShapes(config);
    const tensors = new Map(
      shard.map((n) => [n, { shape: shapes.get(n)!, data: weights.get(n)! }]),
    );
    for (const n of shard) weightMap[n] = file;
    files.set(file, encodeSafetensors(tensors as never, { format: "pt" }));
  });
  files.set("model.safetensors.index.json", text(JSON.stringify({ weight_map: weightMap })));
  files.set("generation_config.json", text('{"eos_token_id": 0}'));
  // Made for the built-in arithmetic task's tokenizer, so `aha train` may start from it.
  files.set("aha_tokenizer.json", text('{"type": "aha-arithmetic"}\n'));
  return { files, weights };
}

/** Byte equality without deepEqual's diff (slow on a mismatch of this size). */
const sameBytes = (a: Uint8Array, b: Uint8Array) =>
  a.length === b.length && a.every((x, i) => x === b[i]);

async function tempDir(): Promise<string> {
  return await Deno.makeTempDir({ prefix: "aha-hub-" });
}

function settingsFor(hub: StandInHub, cache: string, extra: Record<string, string> = {}) {
  const logs: string[] = [];
  const settings = {
    ...hubSettings({ HF_ENDPOINT: hub.url, HF_HUB_CACHE: cache, HF_HOME: cache, ...extra }),
    progress: false,
    log: (line: string) => logs.push(line),
  };
  return { settings, logs };
}

Deno.test("Hub ids: ORG/NAME[@revision]; globs; a dataset id in a config", () => {
  const cfg = loadTrainConfig(null, [
    "model=Qwen/Qwen2.5-0.5B",
    "dataset.path=openai/gsm8k",
    "dataset.config=main",
    "dataset.eval_split=test",
  ]);
  assert.equal(cfg.dataset.format, "parquet");
  assert.deepEqual([cfg.dataset.config, cfg.dataset.split, cfg.dataset.eval_split], [
    "main",
    "train",
    "test",
  ]);
  assert.deepEqual(parseHubId("Qwen/Qwen2.5-0.5B"), {
    type: "model",
    name: "Qwen/Qwen2.5-0.5B",
    revision: "main",
  });
  assert.equal(parseHubId("org/name@v1.0")!.revision, "v1.0");
  assert.equal(parseHubId("models/a/b"), null);
  assert.equal(parseHubId("./x"), null);
  assert.equal(parseHubId("plain"), null);
  const m = globMatcher(["*.json", "onnx/**"]);
  assert.ok(m("config.json") && m("onnx/a/b.onnx") && !m("sub/config.json") && !m("x.bin"));
});

Deno.test("a sharded model from the stand-in Hub into the huggingface_hub cache layout", async () => {
  const { files, weights } = tinyShardedModel();
  const hub = new StandInHub([{ type: "model", name: "tiny-org/tiny", commit: COMMIT, files }]);
  const cache = await tempDir();
  try {
    hub.dropOnce.add("model-00002-of-00002.safetensors");
    const { settings } = settingsFor(hub, cache);
    assert.equal(await cachedFile("tiny-org/tiny", "config.json", settings), null);
    const dir = await resolveModel("tiny-org/tiny", "model", settings);
    assert.equal(
      await cachedFile("tiny-org/tiny", "config.json", settings),
      `${dir}/config.json`,
      "aha plan peeks at a cached config",
    );
    const repo = `${cache}/models--tiny-org--tiny`;
    assert.equal(dir, `${repo}/snapshots/${COMMIT}`);
    assert.equal(await Deno.readTextFile(`${repo}/refs/main`), COMMIT);

    // Every file: a relative symlink to blobs/<etag>, whose bytes are the Hub's.
    for (const [path, bytes] of files) {
      const link = `${dir}/${path}`;
      assert.ok((await Deno.lstat(link)).isSymlink, `${path} is a symlink`);
      assert.equal(await Deno.readLink(link), `../../blobs/${etagOf(path, bytes)}`);
      assert.ok(sameBytes(await Deno.readFile(link), bytes), `${path}: the Hub's bytes`);
    }
    const blobs = [...Deno.readDirSync(`${repo}/blobs`)].map((e) => e.name).sort();
    assert.deepEqual(blobs, [...files].map(([p, b]) => etagOf(p, b)).sort(), "no .incomplete");
    // Files the Hub does not have are remembered as absent.
    assert.ok((await Deno.stat(`${repo}/.no_exist/${COMMIT}/tokenizer.json`)).isFile);

    // The cut transfer was resumed from where it stopped, without the token on the blob host.
    const shardGets = hub.requests.filter((r) =>
      r.method === "GET" &&
      r.path.endsWith(etagOf("x.safetensors", files.get("model-00002-of-00002.safetensors")!))
    );
    assert.equal(shardGets.length, 2);
    assert.equal(shardGets[0].range, null);
    assert.match(shardGets[1].range ?? "", /^bytes=[1-9]\d*-$/);

    // The checkpoint reads back with the weights that were written.
    const checkpoint = await loadCheckpoint(dir);
    for (const [name, w] of weights) assert.deepEqual(checkpoint.weights.get(name), w);

    // Cache first: resolving again asks the Hub nothing.
    const before = hub.requests.length;
    assert.equal(await resolveModel("tiny-org/tiny", "model", settings), dir);
    assert.equal(hub.requests.length, before);
    // Only what is missing is fetched: a lost snapshot link to a blob that is there costs a HEAD.
    await Deno.remove(`${dir}/model-00001-of-00002.safetensors`);
    const since = hub.requests.length;
    assert.equal(await resolveModel("tiny-org/tiny", "model", settings), dir);
    const asked = hub.requests.slice(since);
    assert.ok(asked.length > 0 && asked.every((r) => r.method === "HEAD"), "no GET");
    assert.ok((await Deno.lstat(`${dir}/model-00001-of-00002.safetensors`)).isSymlink);
    // A local path stays a path.
    assert.equal(await resolveModel(dir, "model", settings), dir);
  } finally {
    await hub.close();
    await Deno.remove(cache, { recursive: true });
  }
});

Deno.test("a corrupt partial download is discarded and fetched again", async () => {
  const { files } = tinyShardedModel();
  const hub = new StandInHub([{ type: "model", name: "o/m", commit: COMMIT, files }]);
  const cache = await tempDir();
  try {
    const shard = files.get("model-00001-of-00002.safetensors")!;
    const blobs = `${cache}/models--o--m/blobs`;
    await Deno.mkdir(blobs, { recursive: true });
    // Half a file of the right length whose bytes are wrong: resuming after it cannot match.
    await Deno.writeFile(
      `${blobs}/${etagOf("x.safetensors", shard)}.incomplete`,
      new Uint8Array(shard.length >> 1).fill(7),
    );
    const { settings, logs } = settingsFor(hub, cache);
    const dir = await resolveModel("o/m", "model", settings);
    assert.ok(sameBytes(await Deno.readFile(`${dir}/model-00001-of-00002.safetensors`), shard));
    assert.equal(logs.filter((l) => /partial download was discarded/.test(l)).length, 1);
    assert.match(logs.join("\n"), /content hash [0-9a-f]{64} is not the announced/);
  } finally {
    await hub.close();
    await Deno.remove(cache, { recursive: true });
  }
});

Deno.test("offline mode, 401 without a token, 404, and the token file", async () => {
  const { files } = tinyShardedModel();
  const repos: StandInRepo[] = [
    { type: "model", name: "o/public", commit: COMMIT, files },
    { type: "model", name: "o/private", commit: COMMIT, files, token: "hf_secret" },
  ];
  const hub = new StandInHub(repos);
  const cache = await tempDir();
  try {
    // Offline with an empty cache: one line naming the repository and what is missing.
    const offline = settingsFor(hub, cache, { HF_HUB_OFFLINE: "1" }).settings;
    await assert.rejects(
      resolveModel("o/public", "model", offline),
      /HF_HUB_OFFLINE is set and o\/public@main is not complete in the cache .*models--o--public: missing everything/,
    );
    assert.equal(hub.requests.length, 0);
    // A partial cache (config only), offline: the weights are named.
    const online = settingsFor(hub, cache).settings;
    await resolveModel("o/public", "config", online);
    await assert.rejects(
      resolveModel("o/public", "model", offline),
      /missing model-00001-of-00002\.safetensors, model-00002-of-00002\.safetensors$/,
    );
    await resolveModel("o/public", "model", online);
    const requests = hub.requests.length;
    assert.ok((await loadCheckpoint(await resolveModel("o/public", "model", offline))).config);
    assert.equal(hub.requests.length, requests, "offline never asks the Hub");

    await assert.rejects(
      resolveModel("o/private", "model", online),
      /o\/private@main \(config\.json\): the Hub refused access \(401\).*set HF_TOKEN/,
    );
    await assert.rejects(
      resolveModel("o/nothing", "model", online),
      /^AhaError: o\/nothing: no such local directory, and o\/nothing@main.*not found on/,
    );
    await assert.rejects(resolveModel("o/public@v9", "model", online), /not found/);
    // The token from the token file ($HF_HOME/token) is sent to the Hub, not to the blob host.
    await Deno.writeTextFile(`${cache}/token`, "hf_secret\n");
    const withToken = settingsFor(hub, cache).settings;
    assert.equal(withToken.token, "hf_secret");
    await resolveModel("o/private", "model", withToken);
    const authed = hub.requests.filter((r) => r.auth === "Bearer hf_secret");
    assert.ok(authed.length > 0 && authed.every((r) => r.path.includes("/resolve/")));
    assert.equal(hubSettings({ HF_TOKEN: "hf_env", HF_HOME: cache }).token, "hf_env");
  } finally {
    await hub.close();
    await Deno.remove(cache, { recursive: true });
  }
});

Deno.test("a Hub dataset's Parquet split from refs/convert/parquet", async () => {
  const parquet = (qs: string[]) =>
    new Uint8Array(parquetWriteBuffer({
      columnData: [
        { name: "question", data: qs, type: "STRING" },
        { name: "answer", data: qs.map((_, i) => `work\n#### ${i + 1}`), type: "STRING" },
      ],
    }));
  const files = new Map([
    ["main/train/0000.parquet", parquet(["a?", "b?"])],
    ["main/train/0001.parquet", parquet(["c?"])],
    ["main/test/0000.parquet", parquet(["t?"])],
  ]);
  const hub = new StandInHub([
    { type: "dataset", name: "o/gsm", revision: "refs/convert/parquet", commit: COMMIT, files },
  ]);
  const cache = await tempDir();
  try {
    const { settings } = settingsFor(hub, cache);
    const paths = await resolveDatasetSplit("o/gsm", "main", "train", settings);
    const folder = `${cache}/datasets--o--gsm`;
    assert.deepEqual(paths, [
      `${folder}/snapshots/${COMMIT}/main/train/0000.parquet`,
      `${folder}/snapshots/${COMMIT}/main/train/0001.parquet`,
    ]);
    assert.equal(await Deno.readTextFile(`${folder}/refs/refs/convert/parquet`), COMMIT);
    assert.equal(
      await Deno.readLink(paths[0]),
      `../../../../blobs/${etagOf("x.parquet", files.get("main/train/0000.parquet")!)}`,
    );
    const offline = settingsFor(hub, cache, { HF_HUB_OFFLINE: "1" }).settings;
    assert.deepEqual(await resolveDatasetSplit("o/gsm", "main", "train", offline), paths);
    await assert.rejects(
      resolveDatasetSplit("o/gsm", "main", "test", offline),
      /HF_HUB_OFFLINE is set and o\/gsm \(main\/test\) is not in the cache/,
    );
    await assert.rejects(
      resolveDatasetSplit("o/gsm", "nope", "train", settings),
      /no Parquet files for config "nope", split "train"/,
    );
    // loadDataset reads the id's split (all shards, in order).
    const rows = await loadDataset({
      path: "o/gsm",
      hub: { config: "main", split: "train", settings },
      question_field: "question",
      answer_field: "answer",
      answer_extractor: "gsm8k",
    });
    assert.deepEqual(rows.map((r) => r.question), ["a?", "b?", "c?"]);

    // A training config naming the id: train from its train split, hold out its test split,
    // from the cache alone.
    await resolveDatasetSplit("o/gsm", "main", "test", settings);
    Deno.env.set("HF_HUB_CACHE", cache);
    Deno.env.set("HF_HUB_OFFLINE", "1");
    try {
      const task = await datasetTask(
        loadTrainConfig(null, [
          "model=unused",
          "dataset.path=o/gsm",
          "dataset.config=main",
          "dataset.eval_split=test",
          "max_prompt_length=300",
        ]),
        await loadTokenizer(QWEN),
      );
      assert.deepEqual(task.heldOut.map((e) => e.question), ["t?"]);
      assert.deepEqual(task.nextExamples(3).map((e) => e.question).sort(), ["a?", "b?", "c?"]);
      assert.equal(task.heldOut[0].answer, "1");
    } finally {
      Deno.env.delete("HF_HUB_CACHE");
      Deno.env.delete("HF_HUB_OFFLINE");
    }
  } finally {
    await hub.close();
    await Deno.remove(cache, { recursive: true });
  }
});

Deno.test("aha download and aha score by id, offline, as from the local directory", async () => {
  const { files } = tinyShardedModel();
  const hub = new StandInHub([{ type: "model", name: "o/m", commit: COMMIT, files }]);
  const cache = await tempDir();
  const aha = async (args: string[], env: Record<string, string>) => {
    const out = await new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", MAIN, ...args],
      env: { HF_HUB_CACHE: cache, HF_ENDPOINT: hub.url, ...env },
    }).output();
    const decode = (b: Uint8Array) => new TextDecoder().decode(b);
    return { code: out.code, stdout: decode(out.stdout), stderr: decode(out.stderr) };
  };
  try {
    const configOnly = await aha(["download", "o/m", "--include", "*.json"], {});
    assert.equal(configOnly.code, 0, configOnly.stderr);
    const dir = configOnly.stdout.trim();
    assert.equal(dir, `${cache}/models--o--m/snapshots/${COMMIT}`);
    assert.ok(await Deno.stat(`${dir}/config.json`));
    await assert.rejects(Deno.stat(`${dir}/model-00001-of-00002.safetensors`));
    const all = await aha(["download", "o/m"], {});
    assert.equal(all.stdout.trim(), dir, all.stderr);

    const input = `${cache}/seqs.json`;
    await Deno.writeTextFile(input, JSON.stringify({ sequences: [[1, 5, 9, 2], [3, 4]] }));
    await hub.close();
    const byId = await aha(["score", "--model", "o/m", "--input", input], { HF_HUB_OFFLINE: "1" });
    assert.equal(byId.code, 0, byId.stderr);
    const byDir = await aha(["score", "--model", dir, "--input", input], {});
    assert.equal(byDir.code, 0, byDir.stderr);
    assert.deepEqual(JSON.parse(byId.stdout), JSON.parse(byDir.stdout));
    assert.equal(JSON.parse(byId.stdout).logprobs[0].length, 3);

    // aha train starts from the id too (the built-in task on this small model), offline.
    const train = await aha([
      "train",
      ...["model=o/m", "max_steps=1", "beta=0", "prompts_per_step=2", "num_generations=2"]
        .flatMap((s) => ["--set", s]),
      ...["max_completion_length=3", "eval_prompts=2", `output_dir=${cache}/run`]
        .flatMap((s) => ["--set", s]),
    ], { HF_HUB_OFFLINE: "1" });
    assert.equal(train.code, 0, train.stderr);
    assert.match(train.stdout, new RegExp(`model ${dir} \\(`));
    assert.ok(await Deno.stat(`${cache}/run/checkpoint-1/model.safetensors`));

    const missing = await aha(["score", "--model", "o/other", "--input", input], {
      HF_HUB_OFFLINE: "1",
    });
    assert.equal(missing.code, 1);
    assert.match(missing.stderr, /^aha: HF_HUB_OFFLINE is set and o\/other@main is not complete/);
    assert.equal(missing.stderr.trim().split("\n").length, 1);
  } finally {
    await hub.close().catch(() => {});
    await Deno.remove(cache, { recursive: true });
  }
});
