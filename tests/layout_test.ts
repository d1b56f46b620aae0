// The building's rules, checked mechanically: which folder may import which (the floors of
// DESIGN.md), no import cycles, one module per subcommand in cli/, one file per kernel family in
// gpu/kernels/, a header comment on every source file, and nothing read from outside the clone.

import assert from "node:assert/strict";
import { exists } from "../core/save_dir.ts";

const ROOT = new URL("../", import.meta.url).pathname;
const FOLDERS = ["cli", "reference", "gpu", "data", "core"];
/** Higher imports lower; gpu/ and data/ share a floor but do not import each other. */
const FLOOR: Record<string, number> = { main: 5, cli: 4, reference: 3, gpu: 2, data: 2, core: 1 };

function sourceFiles(): string[] {
  const files = ["main.ts"];
  const walk = (dir: string) => {
    for (const entry of Deno.readDirSync(`${ROOT}${dir}`)) {
      const path = `${dir}/${entry.name}`;
      if (entry.isDirectory) walk(path);
      else if (path.endsWith(".ts")) files.push(path);
    }
  };
  for (const folder of FOLDERS) walk(folder);
  return files.sort();
}

/** The project files a source file imports (static, type-only and dynamic), as root paths. */
function importsOf(file: string): string[] {
  const text = Deno.readTextFileSync(`${ROOT}${file}`);
  const specifiers = [
    ...text.matchAll(/(?:^|\n)\s*(?:import|export)\b[^"'`;]*?from\s*["']([^"']+)["']/g),
    ...text.matchAll(/\bimport\s*\(\s*["']([^"']+)["']\s*\)/g),
  ].map((m) => m[1]).filter((s) => s.startsWith("."));
  return specifiers.map((s) => new URL(s, `file://${ROOT}${file}`).pathname.slice(ROOT.length));
}

const folderOf = (file: string) => file === "main.ts" ? "main" : file.split("/")[0];

Deno.test("imports go down the floors: main → cli → reference → gpu, data → core", () => {
  const files = sourceFiles();
  assert.ok(files.length > 40, `found only ${files.length} source files`);
  const wrong: string[] = [];
  for (const file of files) {
    const from = folderOf(file);
    for (const target of importsOf(file)) {
      const to = folderOf(target);
      assert.ok(to in FLOOR, `${file} imports ${target}, outside the source folders`);
      const sideways = from !== to && FLOOR[from] === FLOOR[to];
      if (FLOOR[to] > FLOOR[from] || sideways) wrong.push(`${file} → ${target}`);
    }
  }
  assert.deepEqual(wrong, [], `imports against the floors:\n${wrong.join("\n")}`);
});

Deno.test("no import cycles between project modules", () => {
  const graph = new Map(sourceFiles().map((f) => [f, importsOf(f)]));
  const state = new Map<string, "open" | "done">();
  const cycles: string[] = [];
  const visit = (file: string, path: string[]) => {
    if (state.get(file) === "done") return;
    if (state.get(file) === "open") {
      cycles.push([...path.slice(path.indexOf(file)), file].join(" → "));
      return;
    }
    state.set(file, "open");
    for (const next of graph.get(file) ?? []) visit(next, [...path, file]);
    state.set(file, "done");
  };
  for (const file of graph.keys()) visit(file, []);
  assert.deepEqual(cycles, []);
  // The two adapter modules in particular: at most one of them imports the other.
  const adapters = importsOf("gpu/adapters.ts"), device = importsOf("gpu/device.ts");
  assert.ok(!(adapters.includes("gpu/device.ts") && device.includes("gpu/adapters.ts")));
});

Deno.test("every subcommand is a module of cli/, and main.ts only dispatches", () => {
  const main = Deno.readTextFileSync(`${ROOT}main.ts`);
  const loaded = [...main.matchAll(/load: \(\) => import\("\.\/([^"]+)"\)/g)].map((m) => m[1]);
  assert.ok(loaded.length >= 10, `main.ts loads ${loaded.length} commands`);
  for (const path of loaded) assert.match(path, /^cli\/[a-z_]+\.ts$/);
  for (const name of ["train", "plan", "sft", "score", "loss", "gpu", "init", "rewards"]) {
    assert.ok(loaded.includes(`cli/${name}.ts`), `cli/${name}.ts is a command`);
  }
  assert.ok(loaded.includes("cli/tokenize.ts") && sourceFiles().includes("cli/args.ts"));
  for (const file of sourceFiles().filter((f) => f.startsWith("cli/") && f !== "cli/args.ts")) {
    const text = Deno.readTextFileSync(`${ROOT}${file}`);
    assert.match(text, /export const help\b/, `${file} exports help`);
    assert.match(text, /export async function run\(/, `${file} exports run`);
  }
});

Deno.test("gpu/kernels/ holds one file per op family, each with its WGSL and its dispatch", () => {
  const families = [
    "matmul",
    "attention",
    "rmsnorm",
    "rope",
    "swiglu",
    "embedding",
    "logprobs",
    "sample",
    "adamw",
    "gradnorm",
    "elementwise",
  ];
  for (const family of families) {
    const text = Deno.readTextFileSync(`${ROOT}gpu/kernels/${family}.ts`);
    assert.match(text, /@compute/, `${family}.ts has its WGSL`);
    assert.match(text, /export function/, `${family}.ts dispatches it`);
  }
  // Kernels live only there: no other gpu/ file holds a compute shader.
  for (const file of sourceFiles().filter((f) => f.startsWith("gpu/") && !f.includes("kernels/"))) {
    assert.doesNotMatch(Deno.readTextFileSync(`${ROOT}${file}`), /@compute/, file);
  }
});

Deno.test("every source file opens with a comment saying what it owns", () => {
  for (const file of sourceFiles()) {
    const first = Deno.readTextFileSync(`${ROOT}${file}`).trimStart();
    assert.ok(first.startsWith("//") || first.startsWith("/*"), `${file} has no header comment`);
  }
});

Deno.test("nothing in the repository reads from outside the clone (../shared)", () => {
  const tracked = new TextDecoder().decode(
    new Deno.Command("git", { args: ["-C", ROOT, "ls-files"], stdout: "piped" }).outputSync()
      .stdout,
  ).split("\n").filter((f) => /\.(ts|sh|json|yaml|ya?ml)$|^\.ci\/run$/.test(f));
  assert.ok(tracked.length > 20);
  for (const file of tracked) {
    const text = Deno.readTextFileSync(`${ROOT}${file}`);
    assert.doesNotMatch(text, /\.\.\/shared\//, `${file} refers to ../shared`);
  }
});

Deno.test("the release workflow builds, smoke-tests and publishes the five binaries", () => {
  const text = Deno.readTextFileSync(`${ROOT}.github/workflows/release.yml`);
  for (
    const target of [
      "x86_64-unknown-linux-gnu",
      "aarch64-unknown-linux-gnu",
      "x86_64-apple-darwin",
      "aarch64-apple-darwin",
      "x86_64-pc-windows-msvc",
    ]
  ) assert.ok(text.includes(`target: ${target}`), target);
  for (const step of ["deno task bundle", "deno compile", "--version", " gpu", " train ", "SHA"]) {
    assert.ok(text.includes(step), step);
  }
});

Deno.test("the GPU check (.ci/device/check.sh) names files that exist", async () => {
  const check = Deno.readTextFileSync(`${ROOT}.ci/device/check.sh`);
  const names = [...check.matchAll(/^(?:KERNEL|END_TO_END)_TESTS=\(([^)]*)\)/gm)]
    .flatMap((m) => m[1].split(/\s+/).filter((name) => name !== ""));
  assert.ok(names.length > 20, "check.sh lists its test files");
  for (const name of names) {
    assert.ok(await exists(`${ROOT}tests/${name}_test.ts`), `check.sh runs tests/${name}_test.ts`);
  }
  const paths = [...check.matchAll(/(?:\.ci\/device|tests\/fixtures)\/[\w./-]+/g)].map((m) => m[0]);
  assert.ok(paths.length >= 4, "check.sh names its scripts and fixtures");
  for (const path of paths) assert.ok(await exists(`${ROOT}${path}`), `check.sh reads ${path}`);
});
