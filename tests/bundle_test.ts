// The shipped form: `deno task bundle` makes one JavaScript file that, copied alone (with the
// WASM engine beside it) into an empty directory, trains the built-in task — pretraining, the
// reference worker started from the bundle itself, the ONNX engine's WASM, a checkpoint.

import assert from "node:assert/strict";

const ROOT = new URL("../", import.meta.url).pathname;

Deno.test("the bundle trains the built-in task in an empty directory, worker and ONNX engine included", async () => {
  const dist = await Deno.makeTempDir({ prefix: "aha-bundle-" });
  const work = await Deno.makeTempDir({ prefix: "aha-empty-" });
  try {
    const build = await new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", `${ROOT}.ci/bundle.ts`, dist],
      stdout: "piped",
      stderr: "piped",
    }).output();
    assert.ok(build.success, new TextDecoder().decode(build.stderr));
    const names = [...Deno.readDirSync(dist)].map((e) => e.name).sort();
    assert.deepEqual(names, [
      "aha.js",
      "ort-wasm-simd-threaded.mjs",
      "ort-wasm-simd-threaded.wasm",
    ]);

    const run = (...args: string[]) =>
      new Deno.Command(Deno.execPath(), {
        args: ["run", "-A", `${dist}/aha.js`, ...args],
        cwd: work,
        stdout: "piped",
        stderr: "piped",
      }).output();
    const version = new TextDecoder().decode((await run("--version")).stdout);
    const head = new Deno.Command("git", {
      args: ["-C", ROOT, "rev-parse", "--short=12", "HEAD"],
      stdout: "piped",
      stderr: "null",
    }).outputSync();
    const commit = head.success ? new TextDecoder().decode(head.stdout).trim() : "unknown";
    assert.match(version, new RegExp(`^aha \\d+\\.\\d+\\.\\d+ \\(commit ${commit}\\)\\ndeno `));

    const train = await run(
      "train",
      ...["--set", "max_steps=2", "--set", "sft.steps=5", "--set", "eval_prompts=5"],
      ...["--set", "reference.engine=onnx", "--set", "arithmetic.corpus_size=200"],
    );
    const out = new TextDecoder().decode(train.stdout);
    const err = new TextDecoder().decode(train.stderr);
    assert.equal(train.code, 0, out + err);
    assert.match(out, /reference: worker pid \d+, onnx engine/);
    assert.match(out, /step 2\/2/);
    const checkpoint = `${work}/runs/arithmetic/checkpoint-2`;
    assert.ok((await Deno.stat(`${checkpoint}/model.safetensors`)).size > 0);
  } finally {
    await Deno.remove(dist, { recursive: true });
    await Deno.remove(work, { recursive: true });
  }
});
