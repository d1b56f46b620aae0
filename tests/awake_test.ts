// gpu/awake.ts: on a software adapter, idle-class spinners keep the cores from halting while work
// is submitted. What must hold, read back from Linux's /proc rather than from what the spinners
// report: they are threads at SCHED_IDLE, one a core, that use CPU while dispatches come fast and
// none while they come slowly, end when none come (an idle process must be able to end), stop when
// told, and do not start with AHA_KEEP_AWAKE=0; and no spinning under a CPU quota, read from cgroup
// files of either version.

import assert from "node:assert/strict";
import { cpuQuotaApplies, SPIN_IDLE_MS, SPIN_MIN_RATE } from "../gpu/awake.ts";
import { gpuTest, openGpu } from "./helpers.ts";

const gpu = await openGpu();
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** This process's threads: scheduling policy and CPU ticks used (fields 41, 14 and 15 of stat). */
function threads(): Map<string, { policy: number; ticks: number }> {
  const out = new Map<string, { policy: number; ticks: number }>();
  for (const task of Deno.readDirSync("/proc/self/task")) {
    try {
      const stat = Deno.readTextFileSync(`/proc/self/task/${task.name}/stat`);
      const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
      out.set(task.name, {
        policy: Number(fields[38]),
        ticks: Number(fields[11]) + Number(fields[12]),
      });
    } catch {
      // The thread ended while being listed.
    }
  }
  return out;
}

const SCHED_IDLE = 5;
const idleClass = () => [...threads().values()].filter((t) => t.policy === SCHED_IDLE);
const idleThreads = () => idleClass().length;

/** Submit a little work and read it back (a flush, then a wait). */
async function submitWork() {
  const t = gpu.upload(new Float32Array([1, 2, 3]));
  assert.deepEqual([...await gpu.read(t)], [1, 2, 3]);
  t.destroy();
}

const BUMP_WGSL = `
struct Params { n: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3u) {
  if (gid.x < p.n) { out[gid.x] = out[gid.x] + 1.0; }
}`;

/** Submit trivial dispatches, about `perSecond` of them, for `ms`; check that all of them ran. */
async function dispatchAt(perSecond: number, ms: number) {
  const pipeline = gpu.pipeline(BUMP_WGSL, "awake test");
  const t = gpu.zeros([64]);
  const batch = Math.max(1, Math.round(perSecond / 50)); // a submit every 20 ms
  let sent = 0;
  for (const start = performance.now(); performance.now() - start < ms;) {
    for (let i = 0; i < batch; i++) gpu.dispatch(pipeline, [1], [t], [64]);
    gpu.flush();
    sent += batch;
    await sleep(20);
  }
  assert.equal((await gpu.read(t))[0], sent, "every dispatch ran");
  t.destroy();
}

/** CPU ticks the SCHED_IDLE threads use while `body` runs. */
async function idleClassTicks(body: () => Promise<void>): Promise<number> {
  const ticks = () => idleClass().reduce((n, t) => n + t.ticks, 0);
  const before = ticks();
  await body();
  return ticks() - before;
}

/** Wait until `want()` holds, up to `ms`, looking every 20 ms. */
async function eventually(want: () => boolean, ms: number): Promise<boolean> {
  for (const end = performance.now() + ms; performance.now() < end; await sleep(20)) {
    if (want()) return true;
  }
  return want();
}

const linuxSoftware = Deno.build.os === "linux" && gpu.software;

Deno.test(
  "on a software adapter, one idle-class spinner a core spins while dispatches come fast",
  { ...gpuTest, ignore: !linuxSoftware },
  async () => {
    const cores = navigator.hardwareConcurrency;
    gpu.keepCoresAwake(true);
    assert.equal(gpu.keepsCoresAwake, true);
    await submitWork();
    assert.ok(await eventually(() => idleThreads() === cores, 2000), "a spinner a core");
    assert.equal(gpu.awakeSpinners, cores);
    // Fast dispatches (ten times SPIN_MIN_RATE): the spinners spin in the gaps between them.
    const fast = await idleClassTicks(() => dispatchAt(SPIN_MIN_RATE * 10, 1000));
    assert.ok(fast >= 40, `the spinners spun ${fast} ticks while dispatches came fast`);
    // Slow ones (a tenth of it) put them to sleep.
    await dispatchAt(SPIN_MIN_RATE / 10, 300);
    const slow = await idleClassTicks(() => dispatchAt(SPIN_MIN_RATE / 10, 600));
    assert.ok(slow <= 4, `the spinners used ${slow} ticks while dispatches came slowly`);
    assert.equal(idleThreads(), cores, "asleep, not ended");
    // Without any work they end by themselves; the next submit starts them again.
    assert.ok(await eventually(() => idleThreads() === 0, SPIN_IDLE_MS * 3), "ended when idle");
    assert.equal(gpu.awakeSpinners, 0);
    await submitWork();
    assert.ok(await eventually(() => idleThreads() === cores, 2000), "started again");
    gpu.keepCoresAwake(false);
    assert.ok(await eventually(() => idleThreads() === 0, 300), "stopped at once");
    await submitWork();
    await sleep(200);
    assert.equal(idleThreads(), 0, "stopped stays stopped");
  },
);

Deno.test(
  "AHA_KEEP_AWAKE=0 starts no spinner",
  { ...gpuTest, ignore: !linuxSoftware },
  async () => {
    Deno.env.set("AHA_KEEP_AWAKE", "0");
    try {
      gpu.keepCoresAwake(true);
      assert.equal(gpu.keepsCoresAwake, false);
      await submitWork();
      await sleep(300);
      assert.equal(idleThreads(), 0);
    } finally {
      Deno.env.delete("AHA_KEEP_AWAKE");
      gpu.keepCoresAwake(false);
    }
  },
);

Deno.test("a CPU quota is found in cgroup v2 and v1 files, on the group or above it", () => {
  const files = (entries: Record<string, string>) => (path: string) => entries[path] ?? null;
  const v2 = "0::/user.slice/run-1.scope\n";
  // cgroup v2: cpu.max "max 100000" is no quota; a number is, on the group or a parent.
  assert.equal(
    cpuQuotaApplies(v2, files({ "/sys/fs/cgroup/user.slice/run-1.scope/cpu.max": "max 100000" })),
    false,
  );
  assert.equal(
    cpuQuotaApplies(v2, files({ "/sys/fs/cgroup/user.slice/cpu.max": "200000 100000\n" })),
    true,
  );
  assert.equal(
    cpuQuotaApplies("0::/\n", files({ "/sys/fs/cgroup/cpu.max": "50000 100000" })),
    true,
  );
  // cgroup v1: cpu.cfs_quota_us -1 is none; the cpu controller's own hierarchy, joined or not.
  const v1 = "5:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n";
  assert.equal(
    cpuQuotaApplies(v1, files({ "/sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "-1" })),
    false,
  );
  assert.equal(
    cpuQuotaApplies(v1, files({ "/sys/fs/cgroup/cpu/docker/cpu.cfs_quota_us": "150000" })),
    true,
  );
  // The memory controller's files say nothing about CPU; missing files mean no quota.
  assert.equal(
    cpuQuotaApplies(v1, files({ "/sys/fs/cgroup/memory/docker/abc/cpu.max": "1" })),
    false,
  );
  assert.equal(cpuQuotaApplies(v1, files({})), false);
  assert.equal(cpuQuotaApplies("", files({})), false);
});
