// gpu/device.ts's dispatch machinery: Params in slots of one uniform ring (uploaded once per
// submit, reused at the next) and cached bind groups. The property checked: every dispatch sees
// its own Params and tensors, however many dispatches share a submit, repeat a bind group or
// outrun the ring, and the counters count what they say; and the bench's profile files each timed
// dispatch under its kernel and its shape.

import assert from "node:assert/strict";
import { earlyReads, isSoftwareAdapter, Tensor } from "../gpu/device.ts";
import { gpuTest, openGpu } from "./helpers.ts";

const gpu = await openGpu();

// out[i] = out[i] · p.scale + p.add, for i < p.n. With scales ±1 and integer adds the result is
// exact and remembers every step, so a dispatch that saw another's Params shows at the end.
const STEP_WGSL = `
struct Params { n: u32, add: f32, scale: f32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3u) {
  if (gid.x < p.n) { out[gid.x] = out[gid.x] * p.scale + p.add; }
}`;

/** The same recurrence on the CPU in f32. */
function twin(values: number[], steps: { add: number; scale: number }[]): number[] {
  return values.map((v) => {
    let x = Math.fround(v);
    for (const s of steps) {
      x = Math.fround(Math.fround(x * Math.fround(s.scale)) + Math.fround(s.add));
    }
    return x;
  });
}

Deno.test("every dispatch sees its own Params, past the uniform ring's size", gpuTest, async () => {
  const pipeline = gpu.pipeline(STEP_WGSL, "step");
  const a = gpu.upload(Float32Array.from([1, 2, 3, 4, 5])), b = gpu.upload(new Float32Array(3));
  const stepsA: { add: number; scale: number }[] = [], stepsB: typeof stepsA = [];
  const dispatches = gpu.dispatchCount;
  // 2,500 dispatches in one submit window (the ring has 1,024 slots), alternating tensors and
  // sizes, so bind groups repeat in different slots with different Params.
  for (let i = 0; i < 2500; i++) {
    const step = { add: (i % 7) - 3, scale: i % 3 === 0 ? -1 : 1 };
    if (i % 2 === 0) {
      gpu.dispatch(pipeline, [1], [a], [5], [step.add, step.scale]);
      stepsA.push(step);
    } else {
      gpu.dispatch(pipeline, [1], [b], [3], [step.add, step.scale]);
      stepsB.push(step);
    }
    // A write between dispatches submits early (the ring restarts at slot 0) and resets b.
    if (i === 1700) {
      gpu.write(b, Float32Array.from([0, 0, 0]));
      stepsB.length = 0;
    }
  }
  assert.equal(gpu.dispatchCount - dispatches, 2500);
  const waits = gpu.waitCount;
  const [gotA, gotB] = await gpu.readMany([a, b]);
  assert.equal(gpu.waitCount - waits, 1, "readMany is one wait");
  assert.deepEqual([...gotA], twin([1, 2, 3, 4, 5], stepsA));
  assert.deepEqual([...gotB], twin([0, 0, 0], stepsB));
  a.destroy();
  b.destroy();
});

Deno.test("a view binds its own range: cached bind groups tell views apart", gpuTest, async () => {
  const pipeline = gpu.pipeline(STEP_WGSL, "step");
  const whole = gpu.upload(new Float32Array(128));
  const first = new Tensor(whole.buffer, [64]), second = whole.view(64, [64]);
  // Each dispatch in a submit of its own: both use slot 0 of the ring.
  for (let i = 0; i < 3; i++) {
    gpu.dispatch(pipeline, [1], [first], [64], [1, 1]);
    gpu.flush();
    gpu.dispatch(pipeline, [1], [second], [64], [10, 1]);
    gpu.flush();
  }
  const got = await gpu.read(whole);
  assert.deepEqual([got[0], got[63], got[64], got[127]], [3, 3, 30, 30]);
  whole.destroy();
});

Deno.test(
  "a read started early and awaited after a later read is not a second wait",
  gpuTest,
  async () => {
    const x = gpu.upload(Float32Array.from([1, 2, 3])), y = gpu.upload(Float32Array.from([4]));
    let waits = gpu.waitCount;
    const early = gpu.readLater([x]);
    gpu.write(x, Float32Array.from([7, 8, 9])); // after the early read's copy: not seen by it
    assert.deepEqual([...await gpu.read(y)], [4]);
    await new Promise((resolve) => setTimeout(resolve, 0)); // let the early read arrive
    assert.deepEqual([...(await early)[0]], [1, 2, 3]);
    assert.equal(gpu.waitCount - waits, 1, "only the awaited read waited");
    waits = gpu.waitCount;
    const value = await gpu.readLater([x]).map(([data]) => data[2]);
    assert.equal(value, 9);
    assert.equal(gpu.waitCount - waits, 1, "awaiting a read in flight is a wait");
    x.destroy();
    y.destroy();
  },
);

Deno.test(
  "reads share one staging buffer, each tensor at its offset, and reuse it once warm",
  gpuTest,
  async () => {
    // Odd sizes and mixed types: each tensor must come back whole and alone, whatever its offset.
    const f = gpu.upload(Float32Array.from({ length: 37 }, (_, i) => i * 0.5 - 3));
    const n = gpu.upload(Int32Array.from({ length: 5 }, (_, i) => -7 * i - 1));
    const u = gpu.upload(Uint32Array.from([0xffffffff, 1, 2]));
    const whole = gpu.upload(Float32Array.from({ length: 80 }, (_, i) => 100 + i));
    const view = whole.view(64, [9]); // 256 bytes in
    const want = [
      Array.from({ length: 37 }, (_, i) => i * 0.5 - 3),
      Array.from({ length: 5 }, (_, i) => -7 * i - 1),
      [0xffffffff, 1, 2],
      Array.from({ length: 9 }, (_, i) => 164 + i),
    ];
    const read = async () => (await gpu.readMany([f, n, u, view])).map((a) => [...a]);
    assert.deepEqual(await read(), want);
    const buffers = gpu.bufferCount;
    gpu.write(n, Int32Array.from([1, 2, 3, 4, 5]));
    want[1] = [1, 2, 3, 4, 5];
    assert.deepEqual(await read(), want, "the same staging buffer, refilled");
    assert.equal(gpu.bufferCount, buffers, "a read once warm creates no buffer");
    // Two reads in flight at once each take a buffer; both are kept afterwards.
    const both = () => Promise.all([gpu.readMany([f]), gpu.readMany([u])]);
    const [a, b] = await both();
    assert.deepEqual([[...a[0]], [...b[0]]], [want[0], want[2]]);
    const warm = gpu.bufferCount;
    const [c, d] = await both();
    assert.deepEqual([[...c[0]], [...d[0]]], [want[0], want[2]]);
    assert.deepEqual(await read(), want);
    assert.equal(gpu.bufferCount, warm, "none once two reads in flight were seen");
    // Staging buffers of at most 160 bytes: f alone, then n, u and the view together. One wait,
    // every copy recorded at the call (a write right after it is not seen), every value right.
    const [waits, maxBytes] = [gpu.waitCount, gpu.stagingMaxBytes];
    const pool = gpu as unknown as { takeStaging(bytes: number): GPUBuffer };
    const take = pool.takeStaging, taken: number[] = [];
    try {
      gpu.stagingMaxBytes = 160;
      pool.takeStaging = (bytes) => (taken.push(bytes), take.call(gpu, bytes));
      const pending = read();
      gpu.write(n, Int32Array.from([9, 9, 9, 9, 9]));
      gpu.write(whole, new Float32Array(80));
      assert.deepEqual(await pending, want);
      assert.equal(gpu.waitCount - waits, 1);
      assert.deepEqual(taken, [152, 24 + 16 + 40]); // each tensor's bytes rounded up to 8
    } finally {
      gpu.stagingMaxBytes = maxBytes;
      pool.takeStaging = take;
    }
    for (const t of [f, n, u, whole]) t.destroy();
  },
);

Deno.test(
  "Gpu.input copies an f32 input into a texture when it is read enough, on software adapters",
  gpuTest,
  () => {
    const small = gpu.zeros([64]), large = gpu.zeros([64, 1024]), ints = gpu.zeros([4096], "i32");
    const copied = (t: Tensor, loads?: number) =>
      !(gpu.input("input 0", t, loads) instanceof Tensor);
    assert.equal(gpu.textureInputs, gpu.software ? "auto" : "never");
    // "auto": a copy splits the compute pass, so only inputs loaded often enough are copied.
    assert.equal(copied(large), gpu.software);
    assert.equal(copied(small), false);
    assert.equal(copied(small, 1 << 20), gpu.software, "a small input loaded many times");
    assert.equal(copied(ints), false, "only f32 inputs");
    const before = gpu.textureInputs;
    try {
      gpu.textureInputs = "always";
      assert.equal(copied(small), true);
      gpu.textureInputs = "never";
      assert.equal(copied(large), false);
    } finally {
      gpu.textureInputs = before;
    }
  },
);

Deno.test(
  "the profile counts every dispatch under its kernel and its shape, and the shapes sum to it",
  gpuTest,
  async () => {
    const step = gpu.pipeline(STEP_WGSL, "step");
    const out = gpu.upload(new Float32Array(200));
    if (!gpu.startProfile()) return; // no timestamp-query: nothing to profile
    // A dispatch's shape is its first three u32 Params (a matmul's M×N×K); this kernel has one, n.
    for (const n of [5, 200, 5, 64, 5, 200]) {
      gpu.dispatch(step, [Math.ceil(n / 64)], [out], [n], [1, 1]);
    }
    const other = gpu.pipeline(STEP_WGSL.replace("* p.scale", "* 1.0"), "other");
    gpu.dispatch(other, [1], [out], [3], [2, 1]);
    const kernels = await gpu.stopProfile();
    const counts = kernels.map((k) => [k.kernel, k.dispatches]).sort();
    assert.deepEqual(counts, [["other", 1], ["step", 6]]);
    const stepProfile = kernels.find((k) => k.kernel === "step")!;
    assert.deepEqual(
      stepProfile.shapes.map((s) => [s.shape, s.dispatches]).sort(),
      [["200", 2], ["5", 3], ["64", 1]],
    );
    for (const k of kernels) {
      const sum = k.shapes.reduce((s, shape) => s + shape.ms, 0);
      assert.ok(Math.abs(sum - k.ms) <= 1e-9 * Math.max(1, k.ms), `${k.kernel}: ${sum} vs ${k.ms}`);
      assert.ok(k.shapes.every((s, i) => i === 0 || k.shapes[i - 1].ms >= s.ms), "largest first");
    }
    assert.ok(kernels.every((k, i) => i === 0 || kernels[i - 1].ms >= k.ms), "largest first");
    out.destroy();
  },
);

Deno.test(
  "reads take their values as soon as the GPU is done, and wait for the map where they cannot",
  gpuTest,
  async () => {
    // A tensor changed by a dispatch between reads, read back to back: every value right.
    const n = 333, step = gpu.pipeline(STEP_WGSL, "step");
    const x = gpu.upload(Float32Array.from({ length: n }, (_, i) => i));
    let want = Array.from({ length: n }, (_, i) => i);
    await gpu.read(x); // the staging buffer's first map, which always awaits its promise
    const readAfterStep = async (r: number) => {
      gpu.dispatch(step, [Math.ceil(n / 64)], [x], [n], [r, -1]);
      want = twin(want, [{ add: r, scale: -1 }]);
      assert.deepEqual([...await gpu.read(x)], want, `read ${r}`);
    };
    const early = gpu.earlyReadCount;
    for (let r = 0; r < 12; r++) await readAfterStep(r);
    assert.equal(gpu.earlyReadCount - early, earlyReads() ? 12 : 0, "reads taken early");
    // A getMappedRange that checks the map's promise (as WebGPU says it should) takes the
    // promise's path: the values are the same.
    const proto = GPUBuffer.prototype, original = proto.getMappedRange;
    proto.getMappedRange = function (this: GPUBuffer, ...args: [number?, number?]) {
      if (this.mapState !== "mapped") throw new DOMException("not mapped", "OperationError");
      return original.apply(this, args);
    };
    try {
      const before = gpu.earlyReadCount;
      for (let r = 12; r < 16; r++) await readAfterStep(r);
      assert.equal(gpu.earlyReadCount, before, "no read taken early");
    } finally {
      proto.getMappedRange = original;
    }
    x.destroy();
  },
);

Deno.test("AHA_EARLY_READS=0 turns early reads off; on Deno 2.9 they are on", () => {
  const before = Deno.env.get("AHA_EARLY_READS");
  try {
    Deno.env.set("AHA_EARLY_READS", "0");
    assert.equal(earlyReads(), false);
    Deno.env.delete("AHA_EARLY_READS");
    assert.equal(earlyReads(), Deno.version.deno.startsWith("2.9."));
  } finally {
    if (before === undefined) Deno.env.delete("AHA_EARLY_READS");
    else Deno.env.set("AHA_EARLY_READS", before);
  }
});

Deno.test(
  "this Deno's mapAsync maps in wgpu before it returns, and unmapping before its promise settles is safe",
  gpuTest,
  async () => {
    // What early reads rely on (gpu/device.ts earlyReads), checked on the Deno that runs the
    // tests: a buffer mapped once before can be read right after mapAsync returns, with the
    // final bytes, unmapped at once and mapped again while the first promise still sleeps.
    if (!earlyReads()) return;
    const device = gpu.device, bytes = 4096;
    const source = device.createBuffer({
      size: bytes,
      usage: GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST,
    });
    const staging = device.createBuffer({
      size: bytes,
      usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST,
    });
    const copy = (value: number) => {
      device.queue.writeBuffer(source, 0, new Float32Array(bytes / 4).fill(value));
      const encoder = device.createCommandEncoder();
      encoder.copyBufferToBuffer(source, 0, staging, 0, bytes);
      device.queue.submit([encoder.finish()]);
    };
    copy(1);
    await staging.mapAsync(GPUMapMode.READ);
    staging.unmap();
    const settled: Promise<unknown>[] = [];
    for (let value = 2; value < 6; value++) {
      copy(value);
      const map = staging.mapAsync(GPUMapMode.READ);
      settled.push(map);
      assert.equal(staging.mapState, "pending");
      const got = new Float32Array(staging.getMappedRange().slice(0));
      assert.ok(got.every((v) => v === value), `read ${value}`);
      staging.unmap();
    }
    await Promise.all(settled);
    source.destroy();
    staging.destroy();
  },
);

Deno.test("AHA_HARDWARE_PATHS=1 takes every adapter for a hardware one, and only then", () => {
  const given = Deno.env.get("AHA_HARDWARE_PATHS");
  try {
    Deno.env.delete("AHA_HARDWARE_PATHS");
    const software = isSoftwareAdapter(gpu.adapter);
    if (/llvmpipe|lavapipe/.test(gpu.adapter.info.description)) assert.ok(software, "Mesa's is");
    Deno.env.set("AHA_HARDWARE_PATHS", "1");
    assert.equal(isSoftwareAdapter(gpu.adapter), false);
    Deno.env.set("AHA_HARDWARE_PATHS", "0");
    assert.equal(isSoftwareAdapter(gpu.adapter), software);
  } finally {
    if (given === undefined) Deno.env.delete("AHA_HARDWARE_PATHS");
    else Deno.env.set("AHA_HARDWARE_PATHS", given);
  }
});
