// Keeping the CPU's cores awake while a software adapter computes.
//
// lavapipe hands each dispatch to its worker threads and sleeps until they have finished; between
// dispatches every one of its threads sleeps. A core with nothing to run halts, and in a virtual
// machine undoing a halt is the host's work: ~20 µs each way, so a dispatch that computes for 5 µs
// costs 50–75 µs (README's platform facts). Thread pools that own their threads spin between tasks
// for this reason (OpenMP's wait policy, onnxruntime's allow_spinning); lavapipe's do not, so aha
// spins beside them: one thread a core at SCHED_IDLE, Linux's lowest scheduling class, which runs
// only when nothing else wants the core and gives it up at once when something does. Each spinner
// sets its own class through libc (Deno's FFI) and spins only once that has succeeded: a spinner
// at normal priority would take half a core from the kernels.
//
// They spin only while dispatches come faster than SPIN_MIN_RATE a second, where a wake-up is a
// real share of a dispatch (the default model's steps: ~3,000 a second), and sleep otherwise: a
// real model's products run for milliseconds each (a 0.5B or 3B LoRA step: under 300 a second),
// and spinning through them would only burn power.
//
// Not done where it could cost: outside Linux, without FFI permission, with AHA_KEEP_AWAKE=0, and
// under a CPU quota (a cgroup's cpu.max or cfs_quota_us), whose accounting charges idle-class time
// too, so spinning would throttle the kernels themselves.

/** Spinners end once no dispatch has been submitted for this long, so an idle process can end. */
export const SPIN_IDLE_MS = 1000;
/** Spinners spin while at least this many dispatches a second are submitted, and sleep otherwise. */
export const SPIN_MIN_RATE = 500;
/** The window the rate is taken over: a sleeping spinner looks again after this long. */
const RATE_WINDOW_MS = 100;

// Words shared with the spinners of one start.
const DISPATCHED = 0; // dispatches submitted so far, modulo 2^32 (AwakeCores.submitted sets it)
const ALIVE = 1; // spinners started and not ended
const ENDED = 2; // spinners that have ended (or never spun)
const REFUSED = 3; // spinners that could not take the idle class
const STOP = 4; // 1: end now
const ASLEEP = 5; // always 0: what a sleeping spinner waits on, until its timeout

// A spinner, once in the idle class: every RATE_WINDOW_MS it counts the dispatches submitted
// since, and spins through the next window if they reach SPIN_MIN_RATE, else sleeps through it;
// it ends when told to, or when none have come for SPIN_IDLE_MS. Spinning, it looks at the clock
// every 4,096 turns.
const SPINNER = `
self.onmessage = (event) => {
  const state = new Int32Array(event.data);
  try {
    const libc = Deno.dlopen("libc.so.6", {
      sched_setscheduler: { parameters: ["i32", "i32", "buffer"], result: "i32" },
    });
    const SCHED_IDLE = 5; // pid 0: the calling thread; its priority must be 0
    const idle = libc.symbols.sched_setscheduler(0, SCHED_IDLE, new Uint8Array(4)) === 0;
    libc.close();
    if (!idle) throw new Error("the idle class was refused");
  } catch {
    Atomics.add(state, ${REFUSED}, 1); // no libc, no FFI or no idle class: never spin here
    Atomics.add(state, ${ENDED}, 1);
    self.close();
    return;
  }
  Atomics.add(state, ${ALIVE}, 1);
  let seen = Atomics.load(state, ${DISPATCHED}), lastNew = performance.now();
  let windowStart = lastNew, windowCount = seen, spin = false;
  while (Atomics.load(state, ${STOP}) === 0) {
    if (spin) for (let turn = 0; turn < 4096; turn++) Atomics.load(state, ${STOP});
    else Atomics.wait(state, ${ASLEEP}, 0, ${RATE_WINDOW_MS});
    const now = performance.now(), count = Atomics.load(state, ${DISPATCHED});
    if (count !== seen) [seen, lastNew] = [count, now];
    else if (now - lastNew > ${SPIN_IDLE_MS}) break;
    if (now - windowStart >= ${RATE_WINDOW_MS}) {
      spin = ((count - windowCount) | 0) * 1000 >= ${SPIN_MIN_RATE} * (now - windowStart);
      [windowStart, windowCount] = [now, count];
    }
  }
  Atomics.sub(state, ${ALIVE}, 1);
  Atomics.add(state, ${ENDED}, 1);
  self.close();
};`;

// The web Worker, taken when this module loads: onnxruntime-web's WASM engine, started in the same
// process, replaces globalThis.Worker with Node's worker_threads one, as Emscripten does in Node.
const WebWorker = globalThis.Worker;

/**
 * Idle-class spinners, one a core, told of each submit (`submitted`), which spin while dispatches
 * come fast and end by themselves SPIN_IDLE_MS after the last, so that they never keep an idle
 * process alive; the next submit starts them again. If the idle class is refused, never again.
 */
export class AwakeCores {
  private readonly cores = Math.max(1, navigator.hardwareConcurrency || 1);
  private state: Int32Array | null = null;
  private refused = false;
  private stopped = false;

  /** Spinners alive now (spinning or asleep). */
  get spinners(): number {
    return this.state ? Atomics.load(this.state, ALIVE) : 0;
  }

  /**
   * Work was just submitted, `dispatches` of them since the device opened: tell the spinners, or
   * start them if they have ended.
   */
  submitted(dispatches: number): void {
    if (this.stopped || this.refused) return;
    const state = this.state;
    if (state) {
      Atomics.store(state, DISPATCHED, dispatches | 0);
      if (Atomics.load(state, REFUSED) > 0) {
        this.refused = true;
        return;
      }
      if (Atomics.load(state, ENDED) < this.cores) return; // spinning, or still starting
    }
    // Each start has its own words, so that no spinner of an earlier one counts in them.
    this.state = new Int32Array(new SharedArrayBuffer(6 * 4));
    this.state[DISPATCHED] = dispatches | 0;
    const url = URL.createObjectURL(new Blob([SPINNER], { type: "application/javascript" }));
    try {
      for (let i = 0; i < this.cores; i++) {
        const worker = new WebWorker(url, { type: "module" });
        // A spinner that fails to start must not stop the process: it counts as refused.
        worker.onerror = (event) => event.preventDefault();
        worker.postMessage(this.state.buffer);
      }
    } catch {
      // No web workers here: keep the cores as they are, and the work going.
      this.stop();
      this.refused = true;
    } finally {
      URL.revokeObjectURL(url);
    }
  }

  /** End the spinners (at their next look at the flag) and start none again. */
  stop(): void {
    this.stopped = true;
    if (this.state) Atomics.store(this.state, STOP, 1);
  }
}

/**
 * Whether a CPU quota applies to this process, from /proc/self/cgroup and the cgroup files it
 * names (`read` returns a file's text or null): cgroup v2's cpu.max other than "max", or v1's
 * cpu.cfs_quota_us other than -1, on the process's group or any group above it.
 */
export function cpuQuotaApplies(procSelfCgroup: string, read: (path: string) => string | null) {
  for (const line of procSelfCgroup.split("\n")) {
    const [, controllers, path] = line.match(/^\d+:([^:]*):(\/.*)$/) ?? [];
    if (path === undefined) continue;
    const v2 = controllers === "", v1 = controllers.split(",").includes("cpu");
    if (!v2 && !v1) continue;
    const roots = v2 ? ["/sys/fs/cgroup"] : [`/sys/fs/cgroup/${controllers}`, "/sys/fs/cgroup/cpu"];
    for (let dir = path;; dir = dir.slice(0, dir.lastIndexOf("/")) || "/") {
      for (const root of roots) {
        const text = read(
          `${root}${dir === "/" ? "" : dir}/${v2 ? "cpu.max" : "cpu.cfs_quota_us"}`,
        );
        const quota = text?.trim().split(/\s+/)[0];
        if (quota !== undefined && quota !== "" && quota !== "max" && quota !== "-1") return true;
      }
      if (dir === "/") break;
    }
  }
  return false;
}

function readOrNull(path: string): string | null {
  try {
    return Deno.readTextFileSync(path);
  } catch {
    return null;
  }
}

/** Spinners for this process, or null where keeping the cores awake is not done (see above). */
export function awakeCores(): AwakeCores | null {
  if (Deno.env.get("AHA_KEEP_AWAKE") === "0" || Deno.build.os !== "linux") return null;
  if (Deno.permissions.querySync({ name: "ffi" }).state !== "granted") return null;
  // A cgroup file that cannot be read might hide a quota: no spinning then either.
  const cgroup = readOrNull("/proc/self/cgroup");
  return cgroup === null || cpuQuotaApplies(cgroup, readOrNull) ? null : new AwakeCores();
}
