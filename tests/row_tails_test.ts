// gpu/kernels/row_tails.ts against a TypeScript twin: packing the positions from `first` on of
// every row of a [B, L, width] batch, and unpacking them with zeros before `first`. Moves only,
// so results are exact; outputs are allocated longer than needed and the tail must stay
// untouched.

import assert from "node:assert/strict";

import { packTails, unpackTails } from "../gpu/kernels/row_tails.ts";
import { gpuTest, openGpu, randoms, sentinels, unpad } from "./helpers.ts";

const gpu = await openGpu();

// [B, L, first, width]: the whole row, one position, odd widths, the model's hidden sizes.
const SHAPES = [[1, 1, 0, 1], [3, 7, 0, 5], [3, 7, 6, 5], [4, 11, 6, 1], [5, 13, 4, 48], [
  2,
  9,
  3,
  64,
]];

Deno.test(
  "packTails and unpackTails move the tails of every row, zeros before them",
  gpuTest,
  async () => {
    for (const [B, L, first, width] of SHAPES) {
      const W = L - first, what = `B ${B} L ${L} first ${first} width ${width}`;
      const full = randoms(B * L * width, B * L + width);
      const packed = gpu.upload(sentinels(B * W * width));
      packTails(gpu, gpu.upload(full), packed, B, L, first, width);
      const want = new Float32Array(B * W * width);
      for (let b = 0; b < B; b++) {
        want.set(full.subarray((b * L + first) * width, (b + 1) * L * width), b * W * width);
      }
      const got = unpad(await gpu.read(packed), B * W * width, `pack ${what}`);
      assert.deepEqual(got, want, `pack ${what}`);

      const back = gpu.upload(sentinels(B * L * width));
      unpackTails(gpu, packed, back, B, L, first, width);
      const unpacked = unpad(await gpu.read(back), B * L * width, `unpack ${what}`);
      for (let b = 0; b < B; b++) {
        for (let t = 0; t < L; t++) {
          const row = unpacked.subarray((b * L + t) * width, (b * L + t + 1) * width);
          const expected = t < first
            ? new Float32Array(width)
            : full.subarray((b * L + t) * width, (b * L + t + 1) * width);
          assert.deepEqual(row, expected, `unpack ${what}: row ${b} position ${t}`);
        }
      }
    }
  },
);
