// gpu/awake.ts: on a software adapter, idle-class spinners keep the cores from halting while work
// is submitted. What must hold: they run at SCHED_IDLE and never at normal priority (read back
// from Linux's /proc, not from what the spinners report), one a core, only while work keeps being
// submitted (an idle process must be able to end), not at all with AHA_KEEP_AWAKE=0; and no
// spinning under a CPU quota, read from cgroup files of either version.

import assert from "node:assert/strict";
import { cpuQuotaApplies, SPIN_IDLE_MS } from "../gpu/awake.ts";
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

function threadsByPolicy(): Map<number, number> {
  const count = new Map<number, number>();
  for (const { policy } of threads().values()) count.set(policy, (count.get(policy) ?? 0) + 1);
  return count;
}

/** The policies of the threads that kept a CPU busy for most of `ms` while this thread slept. */
async function busyThreadPolicies(ms: number): Promise<number[]> {
  const before = threads();
  await sleep(ms);
  const ticksPerMs = 100 / 1000; // USER_HZ
  return [...threads()].filter(([tid, t]) =>
    t.ticks - (before.get(tid)?.ticks ?? 0) > 0.6 * ms * ticksPerMs
  ).map(([, t]) => t.policy);
}

const SCHED_IDLE = 5;
const idleThreads = () => threadsByPolicy().get(SCHED_IDLE) ?? 0;

/** Submit a little work and read it back (a flush, then a wait). */
async function submitWork() {
  const t = gpu.upload(new Float32Array([1, 2, 3]));
  assert.deepEqual([...await gpu.read(t)], [1, 2, 3]);
  t.destroy();
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
  "on a software adapter, one idle-class spinner a core runs while work is submitted, then ends",
  { ...gpuTest, ignore: !linuxSoftware },
  async () => {
    const cores = navigator.hardwareConcurrency;
    gpu.keepCoresAwake(true);
    assert.equal(gpu.keepsCoresAwake, true);
    await submitWork();
    assert.ok(await eventually(() => idleThreads() === cores, 2000), "a spinner a core");
    assert.equal(gpu.awakeSpinners, cores);
    // What keeps the cores busy while this thread sleeps is the spinners, all at SCHED_IDLE.
    const busy = await busyThreadPolicies(500);
    assert.deepEqual(busy, busy.map(() => SCHED_IDLE), "no thread spins at another priority");
    assert.ok(busy.length >= 1, "the spinners spin");
    // Work keeps them going past SPIN_IDLE_MS ...
    for (const end = performance.now() + SPIN_IDLE_MS * 1.5; performance.now() < end;) {
      await submitWork();
      await sleep(100);
    }
    assert.equal(idleThreads(), cores, "still spinning while work is submitted");
    // ... and without work they end by themselves; the next submit starts them again.
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
