// gpu/kernels/embedding.ts against plain TypeScript. The forward is a copy and the backward sums the
// positions of each id in ascending order, as the twin does in f32, so both must match bit for
// bit (tolerance 0). Without accumulate, rows of ids that do not occur must end zero even when
// dTable held garbage; a vocabulary of 151,936 checks that only the ids present are touched.

import assert from "node:assert/strict";

import { embedding, embeddingBackward } from "../gpu/kernels/embedding.ts";
import { eachInputPath, gpuTest, openGpu, randoms, SENTINEL, sentinels, unpad } from "./helpers.ts";

const gpu = await openGpu();

const tokenIds = (T: number, V: number, seed: number) =>
  Int32Array.from(randoms(T, seed), (v) => Math.min(V - 1, Math.floor((v + 1) / 2 * V)));

function embeddingBackwardTwin(
  ids: Int32Array,
  dOut: Float32Array,
  prior: Float32Array,
  H: number,
) {
  const sums = new Map<number, Float32Array>();
  ids.forEach((id, t) => {
    const row = sums.get(id) ?? sums.set(id, new Float32Array(H)).get(id)!;
    for (let j = 0; j < H; j++) row[j] += dOut[t * H + j];
  });
  const dTable = Float32Array.from(prior);
  for (const [id, row] of sums) for (let j = 0; j < H; j++) dTable[id * H + j] += row[j];
  return dTable;
}

const SHAPES = [1, 7, 33, 97].flatMap((T) => [7, 33, 64, 97].map((H) => [T, H]));

Deno.test("embedding forward copies table rows", gpuTest, () =>
  eachInputPath(gpu, async (how) => {
    // H = 64 takes the vec4 kernel.
    const V = 50;
    for (const [T, H] of SHAPES) {
      const table = randoms(V * H, H), ids = tokenIds(T, V, T);
      const out = gpu.upload(sentinels(T * H));
      embedding(gpu, gpu.upload(ids), gpu.upload(table, [V, H]), out, T);
      const got = unpad(await gpu.read(out), T * H, `out T=${T} H=${H} ${how}`);
      for (let i = 0; i < T * H; i++) {
        const what = `out[${i}] T=${T} H=${H} ${how}`;
        assert.equal(got[i], table[ids[Math.floor(i / H)] * H + (i % H)], what);
      }
    }
  }));

Deno.test(
  "embedding backward sums repeated ids, with and without accumulate",
  gpuTest,
  () =>
    eachInputPath(gpu, async (how) => {
      const V = 11; // few ids, many repeats; some ids absent when T is small
      for (const [T, H] of SHAPES) {
        for (const accumulate of [false, true]) {
          const ids = tokenIds(T, V, T + H), dOut = randoms(T * H, 3);
          const prior = accumulate ? randoms(V * H, 4) : new Float32Array(V * H).fill(SENTINEL);
          const dTable = gpu.upload(prior, [V, H]);
          embeddingBackward(gpu, ids, gpu.upload(dOut), dTable, accumulate);
          const want = embeddingBackwardTwin(
            ids,
            dOut,
            accumulate ? prior : new Float32Array(V * H),
            H,
          );
          const what = `T=${T} H=${H} accumulate=${accumulate} ${how}`;
          assert.deepEqual(await gpu.read(dTable), want, what);
        }
      }
    }),
);

Deno.test("embedding backward over Qwen2's vocabulary clears absent rows", gpuTest, async () => {
  const V = 151936, H = 7, T = 97;
  const ids = tokenIds(T, V, 5);
  ids.set([0, V - 1, 0]);
  const dOut = randoms(T * H, 6);
  const dTable = gpu.upload(new Float32Array(V * H).fill(SENTINEL), [V, H]);
  embeddingBackward(gpu, ids, gpu.upload(dOut), dTable, false);
  const want = embeddingBackwardTwin(ids, dOut, new Float32Array(V * H), H);
  assert.deepEqual(await gpu.read(dTable), want);
});

Deno.test("embedding backward rejects ids outside the vocabulary", gpuTest, () => {
  const dTable = gpu.zeros([4, 3]), dOut = gpu.zeros([2, 3]);
  assert.throws(
    () => embeddingBackward(gpu, Int32Array.of(1, 4), dOut, dTable, false),
    /vocabulary/,
  );
  assert.throws(() => embeddingBackward(gpu, Int32Array.of(-1), dOut, dTable, true), /vocabulary/);
});
