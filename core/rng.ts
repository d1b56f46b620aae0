// The one seeded random number generator of aha: xoshiro128** (Blackman & Vigna), 128 bits of
// state in four 32-bit words, seeded through splitmix32. Every random choice in a run (dataset
// shuffles, weight init, sampling) draws from an Rng, so a seed reproduces the run, and a
// checkpoint stores `rng.state()` so a resumed run continues the very same sequence.

export class Rng {
  private s: Uint32Array;

  /** A generator seeded by any safe integer (both 32-bit halves of it matter). */
  constructor(seed: number) {
    if (!Number.isSafeInteger(seed)) throw new RangeError(`Rng: seed must be an integer: ${seed}`);
    // splitmix32 turns the seed into four well-mixed words that are never all zero.
    let x = (seed >>> 0) ^ Math.imul(Math.floor(seed / 2 ** 32) >>> 0, 0x9e3779b9);
    this.s = new Uint32Array(4);
    for (let i = 0; i < 4; i++) {
      x = (x + 0x9e3779b9) | 0;
      let z = x;
      z = Math.imul(z ^ (z >>> 16), 0x85ebca6b);
      z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35);
      this.s[i] = z ^ (z >>> 16);
    }
  }

  /** The next 32 random bits, as an unsigned integer. */
  u32(): number {
    const s = this.s;
    const result = Math.imul(rotl(Math.imul(s[1], 5), 7), 9) >>> 0;
    const t = s[1] << 9;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 11);
    return result;
  }

  /** A uniform float in [0, 1) with 53 random bits. */
  next(): number {
    const hi = this.u32() >>> 5, lo = this.u32() >>> 6; // 27 + 26 bits
    return (hi * 2 ** 26 + lo) / 2 ** 53;
  }

  /** A uniform integer in [0, n). */
  int(n: number): number {
    return Math.floor(this.next() * n);
  }

  /** A standard normal sample (Box–Muller; one of the pair is discarded to keep state simple). */
  normal(): number {
    const u = 1 - this.next(); // (0, 1]: log(u) is finite
    return Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * this.next());
  }

  /** Shuffle `items` in place (Fisher–Yates) and return it. */
  shuffle<T>(items: T[]): T[] {
    for (let i = items.length - 1; i > 0; i--) {
      const j = this.int(i + 1);
      [items[i], items[j]] = [items[j], items[i]];
    }
    return items;
  }

  /** The state as 32 hex digits; `Rng.restore(state)` continues the same sequence. */
  state(): string {
    return [...this.s].map((w) => w.toString(16).padStart(8, "0")).join("");
  }

  static restore(state: string): Rng {
    if (!/^[0-9a-f]{32}$/.test(state) || /^0{32}$/.test(state)) {
      throw new RangeError(`Rng.restore: expected 32 hex digits, not all zero, got "${state}"`);
    }
    const rng = new Rng(0);
    for (let i = 0; i < 4; i++) rng.s[i] = parseInt(state.slice(8 * i, 8 * i + 8), 16);
    return rng;
  }
}

function rotl(x: number, k: number): number {
  return (x << k) | (x >>> (32 - k));
}
