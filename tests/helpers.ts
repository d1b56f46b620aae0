// What the tests share: the options GPU tests run with, seeded random inputs, outputs allocated
// longer than the work (padded with sentinels that must stay untouched), the checks of a result
// against a float64 twin (within a tolerance, or against central finite differences), and
// running `aha` itself in a child process.

import assert from "node:assert/strict";
import { Rng } from "../core/rng.ts";
import { Gpu } from "../gpu/device.ts";

/**
 * Deno.test options for tests that use the GPU, in process or in a child: Deno's sanitizers
 * would report its resources as leaks.
 */
export const gpuTest = { sanitizeResources: false, sanitizeOps: false };

/** The test file's device, destroyed when the module unloads (a clean WebGPU teardown). */
export async function openGpu(): Promise<Gpu> {
  const gpu = await Gpu.open();
  globalThis.addEventListener("unload", () => gpu.destroy());
  return gpu;
}

/**
 * Run `body` with kernels reading their inputs from texture copies (software adapters only) and
 * from storage (`Gpu.textureInputs`); `how` names the path for messages.
 */
export async function eachInputPath(gpu: Gpu, body: (how: string) => Promise<void>) {
  const before = gpu.textureInputs;
  try {
    for (const textures of gpu.software ? [true, false] : [false]) {
      gpu.textureInputs = textures ? "always" : "never";
      await body(textures ? "texture inputs" : "storage inputs");
    }
  } finally {
    gpu.textureInputs = before;
  }
}

/**
 * Bytes `gpu.zeros` (and so `gpu.upload`) allocates while `body` runs: the engine's side of the
 * memory plan (core/plan.ts).
 */
export async function allocatedBytes(gpu: Gpu, body: () => Promise<unknown>): Promise<number> {
  const zeros = gpu.zeros;
  let bytes = 0;
  gpu.zeros = (...args: Parameters<typeof zeros>) => {
    const t = zeros.apply(gpu, args);
    bytes += t.bytes;
    return t;
  };
  try {
    await body();
  } finally {
    gpu.zeros = zeros;
  }
  return bytes;
}

/** n uniform f32 values in [−scale, scale) drawn from `rng`, or from a new Rng seeded by it. */
export function randoms(n: number, rng: Rng | number, scale = 1): Float32Array {
  const source = typeof rng === "number" ? new Rng(rng) : rng;
  return Float32Array.from({ length: n }, () => (2 * source.next() - 1) * scale);
}

/** A padded output holds SLACK values past the work, each SENTINEL. */
export const SLACK = 5;
export const SENTINEL = 42;

/** n + SLACK sentinels: an output in which every value the work leaves unwritten shows. */
export function sentinels(n: number): Float32Array {
  return new Float32Array(n + SLACK).fill(SENTINEL);
}

/** `values` followed by SLACK sentinels. */
export function padded(values: ArrayLike<number>): Float32Array {
  const v = sentinels(values.length);
  v.set(values);
  return v;
}

/** The first n values of a padded output, once its SLACK sentinels are found untouched. */
export function unpad(got: Float32Array, n: number, what: string): Float32Array {
  const tail = new Array(SLACK).fill(SENTINEL);
  assert.deepEqual([...got.subarray(n)], tail, `${what}: wrote past its ${n} values`);
  return got.subarray(0, n);
}

/** got[i] within atol + rtol·|want[i]| of want[i] at every i (NaN fails), lengths equal. */
export function assertClose(
  got: ArrayLike<number>,
  want: ArrayLike<number>,
  atol: number,
  rtol: number,
  what: string,
) {
  assert.equal(got.length, want.length, `${what}: length`);
  for (let i = 0; i < want.length; i++) {
    if (!(Math.abs(got[i] - want[i]) <= atol + rtol * Math.abs(want[i]))) {
      assert.fail(`${what}[${i}] = ${got[i]}, want ${want[i]} (atol ${atol}, rtol ${rtol})`);
    }
  }
}

/** Rows (log-probs per sequence) of the same shape, every value within `atol`. */
export function assertRowsClose(got: number[][], want: number[][], atol: number, what: string) {
  assert.equal(got.length, want.length, `${what}: rows`);
  got.forEach((row, i) => assertClose(row, want[i], atol, 0, `${what}: row ${i}`));
}

/** (f() at values[i] + h − f() at values[i] − h) / 2h; f reads `values`, values[i] is restored. */
export function centralDifference(
  values: Float64Array,
  i: number,
  h: number,
  f: () => number,
): number {
  const keep = values[i];
  values[i] = keep + h;
  const up = f();
  values[i] = keep - h;
  const down = f();
  values[i] = keep;
  return (up - down) / (2 * h);
}

/** The committed golden fixtures (tests/fixtures/golden, tests/fixtures/loss), by name. */
export const GOLDEN_CASES = ["bf16_tied", "f16_sharded", "gqa3_untied", "gqa_tied", "mha_untied"];
export const LOSS_CASES = [
  "bf16_tied_bnpo",
  "gqa3_untied_clip",
  "gqa_tied_ref",
  "mha_untied_dr_grpo",
];

/**
 * The case directories in `dir`, which must be exactly `expected`: a loop over fixtures must not
 * pass by running nothing (an empty or partial fixture directory fails here).
 */
export function fixtureCases(dir: string, expected: string[]): string[] {
  const found = [...Deno.readDirSync(dir)].filter((e) => e.isDirectory).map((e) => e.name).sort();
  assert.deepEqual(found, [...expected].sort(), `${dir}: the golden cases`);
  return found;
}

const MAIN = new URL("../main.ts", import.meta.url).pathname;

/** Run `aha ARGS…` (main.ts under this Deno) in a child process: its status and trimmed output. */
export async function runAha(...args: string[]) {
  const { code, stdout, stderr } = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", MAIN, ...args],
    stdout: "piped",
    stderr: "piped",
  }).output();
  const text = (bytes: Uint8Array) => new TextDecoder().decode(bytes).trim();
  return { code, stdout: text(stdout), stderr: text(stderr) };
}
