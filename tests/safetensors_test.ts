// core/safetensors.ts: round trips, F16/BF16 widening, and every kind of corrupt file rejected
// with a one-line AhaError naming the file and the problem.

import assert from "node:assert/strict";
import { AhaError } from "../core/errors.ts";
import {
  encodeSafetensors,
  float32ToBfloat16,
  readSafetensors,
  readSafetensorsHeader,
  readSafetensorsRaw,
  writeSafetensors,
} from "../core/safetensors.ts";

const dir = await Deno.makeTempDir({ prefix: "aha_safetensors_test_" });
globalThis.addEventListener("unload", () => Deno.removeSync(dir, { recursive: true }));

/** A file made of an explicit header length, header text and data bytes. */
async function rawFile(name: string, headerLength: bigint, header: string, data: Uint8Array) {
  const text = new TextEncoder().encode(header);
  const bytes = new Uint8Array(8 + text.length + data.length);
  new DataView(bytes.buffer).setBigUint64(0, headerLength, true);
  bytes.set(text, 8);
  bytes.set(data, 8 + text.length);
  const path = `${dir}/${name}`;
  await Deno.writeFile(path, bytes);
  return path;
}

/** A file with a correct header length for the given header object. */
function fileWithHeader(name: string, header: unknown, dataBytes: number) {
  const text = JSON.stringify(header);
  return rawFile(name, BigInt(text.length), text, new Uint8Array(dataBytes));
}

Deno.test("write then read: F32 and I32 tensors, metadata, order, subsets", async () => {
  const path = `${dir}/roundtrip.safetensors`;
  const weights = Float32Array.from({ length: 21 }, (_, i) => Math.sin(i) * 1e3);
  const ids = Int32Array.from([5, -1, 2147483647, 0, 7]);
  const tensors = new Map<string, { shape: number[]; data: Float32Array | Int32Array }>([
    ["w", { shape: [3, 7], data: weights }],
    ["ids", { shape: [5], data: ids }],
    ["empty", { shape: [0, 4], data: new Float32Array(0) }],
    ["scalar", { shape: [], data: Float32Array.of(-0.5) }],
  ]);
  await writeSafetensors(path, tensors, { format: "pt" });
  const bytes = await Deno.readFile(path);
  assert.deepEqual(bytes, encodeSafetensors(tensors, { format: "pt" }));

  const header = await readSafetensorsHeader(path);
  assert.deepEqual([...header.entries.keys()], ["w", "ids", "empty", "scalar"]);
  assert.deepEqual(header.metadata, { format: "pt" });
  assert.equal(header.dataOffset % 8, 0, "header padded to 8 bytes");
  assert.deepEqual(header.entries.get("ids"), { dtype: "I32", shape: [5], begin: 84, end: 104 });

  const floats = await readSafetensors(path, ["w", "scalar", "empty"]);
  assert.deepEqual(floats.get("w"), { shape: [3, 7], data: weights });
  assert.deepEqual(floats.get("scalar")!.data, Float32Array.of(-0.5));
  assert.equal(floats.get("empty")!.data.length, 0);
  const raw = await readSafetensorsRaw(path, ["ids"]);
  assert.deepEqual(new Int32Array(raw.get("ids")!.bytes.buffer), ids);
  await assert.rejects(readSafetensors(path), /roundtrip.safetensors: tensor "ids" has dtype I32/);
  await assert.rejects(readSafetensors(path, ["nope"]), /no tensor named "nope"/);
  assert.deepEqual([...Deno.readDirSync(dir)].filter((e) => e.name.endsWith(".tmp")), []);
});

Deno.test("F16 and BF16 widen to float32 exactly, subnormals, infinities and NaN included", async () => {
  // Every 16-bit pattern, once as F16 and once as BF16.
  const patterns = Uint16Array.from({ length: 65536 }, (_, i) => i);
  const data = new Uint8Array(patterns.buffer);
  const header = {
    h: { dtype: "F16", shape: [65536], data_offsets: [0, 131072] },
    b: { dtype: "BF16", shape: [256, 256], data_offsets: [131072, 262144] },
  };
  const text = JSON.stringify(header);
  const both = new Uint8Array(262144);
  both.set(data);
  both.set(data, 131072);
  const path = await rawFile("halves.safetensors", BigInt(text.length), text, both);
  const tensors = await readSafetensors(path);
  const half = tensors.get("h")!.data, bf16 = tensors.get("b")!.data;
  assert.deepEqual(tensors.get("b")!.shape, [256, 256]);
  // F16: compare with the platform's own Float16Array.
  const reference = new Float16Array(patterns.buffer);
  for (let i = 0; i < 65536; i++) {
    assert.ok(
      Object.is(half[i], reference[i]) || (isNaN(half[i]) && isNaN(reference[i])),
      `F16 ${i}`,
    );
  }
  const f16 = (bits: number) => half[bits];
  assert.equal(f16(0x3c00), 1);
  assert.equal(f16(0xc000), -2);
  assert.equal(f16(0x7bff), 65504);
  assert.equal(f16(0x0001), 2 ** -24); // smallest subnormal
  assert.equal(f16(0x03ff), 1023 * 2 ** -24); // largest subnormal
  assert.equal(f16(0x0400), 2 ** -14); // smallest normal
  assert.ok(Object.is(f16(0x8000), -0));
  assert.equal(f16(0x7c00), Infinity);
  assert.equal(f16(0xfc00), -Infinity);
  assert.ok(isNaN(f16(0x7e00)));
  // BF16: the top half of a float32.
  const b16 = (bits: number) => bf16[bits];
  assert.equal(b16(0x3f80), 1);
  assert.equal(b16(0xc000), -2);
  assert.equal(b16(0x3eab), 0.333984375);
  assert.equal(b16(0x7f7f), 3.3895313892515355e38); // largest finite
  assert.equal(b16(0x0001), 2 ** -133); // smallest subnormal
  assert.equal(b16(0x0080), 2 ** -126); // smallest normal
  assert.ok(Object.is(b16(0x8000), -0));
  assert.equal(b16(0x7f80), Infinity);
  assert.equal(b16(0xff80), -Infinity);
  assert.ok(isNaN(b16(0x7fc0)));
});

const f32 = (shape: number[], begin: number, end: number) => ({
  dtype: "F32",
  shape,
  data_offsets: [begin, end],
});

// Each corrupt file, and the problem its one-line error must name.
const CORRUPT: [string, () => Promise<string>, RegExp][] = [
  [
    "truncated before the header length",
    async () => {
      await Deno.writeFile(`${dir}/short.safetensors`, new Uint8Array(5));
      return `${dir}/short.safetensors`;
    },
    /truncated file \(5 bytes/,
  ],
  [
    "truncated data",
    () => fileWithHeader("cut.safetensors", { a: f32([4], 0, 16), b: f32([2], 16, 24) }, 20),
    /tensor "b": data_offsets \[16, 24\] go beyond the end of the data \(20 bytes; truncated/,
  ],
  [
    "header length beyond the file",
    () => rawFile("long.safetensors", 1000n, "{}", new Uint8Array(10)),
    /header length 1000 bytes goes beyond the end of the file \(20 bytes\)/,
  ],
  [
    "header length over 100 MB",
    () => rawFile("huge.safetensors", 1n << 40n, "{}", new Uint8Array(0)),
    /header length 1099511627776 bytes is over the 100 MB limit/,
  ],
  [
    "malformed JSON",
    () => rawFile("json.safetensors", 9n, '{"a": [1,', new Uint8Array(0)),
    /header is not valid JSON/,
  ],
  [
    "header not an object",
    () => fileWithHeader("array.safetensors", [1, 2], 0),
    /header is not a JSON object/,
  ],
  [
    "unknown dtype",
    () => fileWithHeader("dtype.safetensors", { a: { ...f32([2], 0, 8), dtype: "Q4" } }, 8),
    /tensor "a" has unknown dtype "Q4"/,
  ],
  [
    "invalid shape",
    () => fileWithHeader("shape.safetensors", { a: f32([2, -1], 0, 8) }, 8),
    /tensor "a" has an invalid shape \[2,-1\]/,
  ],
  [
    "shape × dtype size differs from the byte range",
    () => fileWithHeader("size.safetensors", { a: f32([2, 2], 0, 12) }, 16),
    /tensor "a": shape \[2, 2\] of F32 needs 16 bytes but data_offsets \[0, 12\] cover 12/,
  ],
  [
    "offsets out of range",
    () => fileWithHeader("range.safetensors", { a: f32([100], 400, 800) }, 16),
    /tensor "a": data_offsets \[400, 800\] go beyond the end of the data \(16 bytes/,
  ],
  [
    "offsets reversed",
    () => fileWithHeader("reversed.safetensors", { a: f32([0], 8, 4) }, 16),
    /tensor "a" has invalid data_offsets \[8,4\]/,
  ],
  [
    "overlapping ranges",
    () => fileWithHeader("overlap.safetensors", { a: f32([4], 0, 16), b: f32([2], 8, 16) }, 16),
    /tensors "a" and "b" overlap/,
  ],
  [
    "metadata not strings",
    () => fileWithHeader("meta.safetensors", { __metadata__: { n: 1 } }, 0),
    /"__metadata__" must be an object of strings/,
  ],
  [
    "missing file",
    () => Promise.resolve(`${dir}/absent.safetensors`),
    /absent.safetensors: file not found/,
  ],
];

for (const [what, make, problem] of CORRUPT) {
  Deno.test(`corrupt file rejected: ${what}`, async () => {
    const path = await make();
    for (const read of [readSafetensorsHeader, readSafetensors, readSafetensorsRaw]) {
      await assert.rejects(read(path), (e: Error) => {
        assert.ok(e instanceof AhaError, `${e}`);
        assert.ok(e.message.startsWith(`${path}: `), e.message);
        assert.match(e.message, problem);
        assert.ok(!e.message.includes("\n"), "one line");
        return true;
      });
    }
  });
}

Deno.test("empty tensors may share an offset with others", async () => {
  const path = await fileWithHeader("zero.safetensors", {
    a: f32([2], 0, 8),
    e: f32([0], 4, 4),
  }, 8);
  const tensors = await readSafetensors(path);
  assert.equal(tensors.get("e")!.data.length, 0);
});

Deno.test("values given by a function are written in their turn, and must be what was stated", async () => {
  const path = `${dir}/lazy.safetensors`;
  const a = Float32Array.of(1.5, -2, 3), b = Float32Array.of(0.25, 8);
  const asked: string[] = [];
  const lazy = (name: string, values: Float32Array) => () => (asked.push(name), values);
  await writeSafetensors(
    path,
    new Map([
      ["a", { shape: [3], data: lazy("a", a), dtype: "F32" as const }],
      ["b", { shape: [2], data: () => float32ToBfloat16(lazy("b", b)()), dtype: "BF16" as const }],
    ]),
  );
  assert.deepEqual(asked, ["a", "b"]);
  const read = await readSafetensors(path);
  assert.deepEqual(read.get("a")!.data, a);
  assert.deepEqual(read.get("b")!.data, b); // exact in bf16
  // Stated BF16, gave f32: refused, nothing left at the path.
  await assert.rejects(
    writeSafetensors(
      `${dir}/mismatch.safetensors`,
      new Map([["w", { shape: [2], data: () => b, dtype: "BF16" as const }]]),
    ),
    /tensor "w" gave F32 values, stated BF16/,
  );
  assert.equal(await Deno.stat(`${dir}/mismatch.safetensors`).then(() => true, () => false), false);
  // Parts that come one at a time are written in order as one tensor; parts that prove the
  // wrong length when they end are refused, and nothing is left at the path.
  const given: number[] = [];
  async function* stream(...parts: Float32Array[]) {
    for (const part of parts) given.push(part.length), yield part;
  }
  const streamed = `${dir}/streamed.safetensors`;
  await writeSafetensors(
    streamed,
    new Map([["a", { shape: [3], data: () => stream(a.slice(0, 1), a.slice(1)) }]]),
  );
  assert.deepEqual(given, [1, 2]);
  assert.deepEqual((await readSafetensors(streamed)).get("a")!.data, a);
  await assert.rejects(
    writeSafetensors(
      `${dir}/ends-short.safetensors`,
      new Map([["a", { shape: [3], data: () => stream(a.slice(0, 1), a.slice(1, 2)) }]]),
    ),
    /tensor "a" has 2 values for shape \[3\]/,
  );
  assert.equal(
    await Deno.stat(`${dir}/ends-short.safetensors`).then(() => true, () => false),
    false,
  );
});
