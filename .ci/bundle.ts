// `deno task bundle [DIR]`: DIR/aha.js (default dist/), one JavaScript file holding aha and every dependency, with
// the commit it was built from written in, and onnxruntime-web's WASM engine copied beside it
// (onnxruntime-web loads its .mjs/.wasm pair from the directory of the module that imports it,
// which in a bundle is the bundle's own). `deno task compile` turns that bundle into a binary.

import { createRequire } from "node:module";
import { dirname, join } from "node:path";

const root = new URL("..", import.meta.url).pathname;
const dist = Deno.args[0] ?? join(root, "dist");
await Deno.mkdir(dist, { recursive: true });

const bundle = await new Deno.Command(Deno.execPath(), {
  args: ["bundle", "-q", "-o", join(dist, "aha.js"), join(root, "main.ts")],
  cwd: root,
}).output();
if (!bundle.success) {
  console.error(new TextDecoder().decode(bundle.stderr));
  Deno.exit(1);
}

const git = await new Deno.Command("git", {
  args: ["-C", root, "rev-parse", "--short=12", "HEAD"],
  stdout: "piped",
  stderr: "null",
}).output().catch(() => null);
const commit = git?.success ? new TextDecoder().decode(git.stdout).trim() : "unknown";
const path = join(dist, "aha.js");
const text = await Deno.readTextFile(path);
const marker = 'BUILD_COMMIT = ""';
if (!text.includes(marker)) throw new Error(`${path}: the commit marker is missing`);
await Deno.writeTextFile(path, text.replace(marker, `BUILD_COMMIT = ${JSON.stringify(commit)}`));

const ort = dirname(createRequire(join(root, "main.ts")).resolve("onnxruntime-web"));
for (const name of ["ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm"]) {
  await Deno.copyFile(join(ort, name), join(dist, name));
}
console.log(`${path} (commit ${commit}) and onnxruntime-web's WASM engine beside it`);
