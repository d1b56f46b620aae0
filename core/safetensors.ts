// The safetensors file format: an 8-byte little-endian header length, a JSON header naming each
// tensor's dtype, shape and byte range, then the raw little-endian tensor bytes.
//
// Reading validates the whole header before allocating anything large: the header length
// against the file size (and a 100 MB cap), the JSON, every dtype, that each shape × dtype size
// equals its byte range, that ranges lie inside the file and do not overlap. Any violation is an
// AhaError "<file>: <problem>". Tensors are then read one at a time straight into their output
// arrays, and F16 / BF16 are widened to Float32Array. Writing is deterministic (tensors in the
// given order, compact JSON padded with spaces to 8 bytes) and goes through a temporary name.

import { AhaError } from "./errors.ts";
import { bf16Bits, f16Bits } from "./half.ts";

export type SafeDType =
  | "F64"
  | "F32"
  | "F16"
  | "BF16"
  | "I64"
  | "I32"
  | "I16"
  | "I8"
  | "U8"
  | "BOOL";

const DTYPE_BYTES: Record<SafeDType, number> = {
  F64: 8,
  F32: 4,
  F16: 2,
  BF16: 2,
  I64: 8,
  I32: 4,
  I16: 2,
  I8: 1,
  U8: 1,
  BOOL: 1,
};

export interface TensorEntry {
  dtype: SafeDType;
  shape: number[];
  begin: number; // byte offsets into the data section (after the header)
  end: number;
}

export interface SafetensorsHeader {
  entries: Map<string, TensorEntry>;
  metadata: Record<string, string>;
  dataOffset: number; // where the data section starts in the file
}

const MAX_HEADER_BYTES = 100 * 1024 * 1024;

const isCount = (v: unknown): v is number => Number.isSafeInteger(v) && (v as number) >= 0;

/** Reads the header of a safetensors file and checks it against the file (see the top). */
export async function readSafetensorsHeader(path: string): Promise<SafetensorsHeader> {
  const file = await openForReading(path);
  try {
    return await readHeader(path, file);
  } finally {
    file.close();
  }
}

async function openForReading(path: string): Promise<Deno.FsFile> {
  try {
    return await Deno.open(path, { read: true });
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) throw new AhaError(`${path}: file not found`);
    throw new AhaError(`${path}: cannot open (${(e as Error).message})`);
  }
}

async function readHeader(path: string, file: Deno.FsFile): Promise<SafetensorsHeader> {
  const fail = (problem: string): never => {
    throw new AhaError(`${path}: ${problem}`);
  };
  const fileSize = (await file.stat()).size;
  if (fileSize < 8) fail(`truncated file (${fileSize} bytes; a safetensors file starts with 8)`);
  const lengthBytes = new Uint8Array(8);
  await readFully(path, file, 0, lengthBytes);
  const headerLength = new DataView(lengthBytes.buffer).getBigUint64(0, true);
  if (headerLength > BigInt(MAX_HEADER_BYTES)) {
    fail(`header length ${headerLength} bytes is over the 100 MB limit (not a safetensors file?)`);
  }
  const n = Number(headerLength);
  if (8 + n > fileSize) {
    fail(`header length ${n} bytes goes beyond the end of the file (${fileSize} bytes)`);
  }
  const headerBytes = new Uint8Array(n);
  await readFully(path, file, 8, headerBytes);
  let json: unknown;
  try {
    json = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(headerBytes));
  } catch (e) {
    fail(`header is not valid JSON (${(e as Error).message.split("\n")[0]})`);
  }
  if (typeof json !== "object" || json === null || Array.isArray(json)) {
    fail("header is not a JSON object");
  }
  const dataOffset = 8 + n;
  const dataSize = fileSize - dataOffset;
  const entries = new Map<string, TensorEntry>();
  let metadata: Record<string, string> = {};
  for (const [name, value] of Object.entries(json as Record<string, unknown>)) {
    if (name === "__metadata__") {
      const ok = typeof value === "object" && value !== null && !Array.isArray(value) &&
        Object.values(value).every((v) => typeof v === "string");
      if (!ok) fail(`"__metadata__" must be an object of strings`);
      metadata = value as Record<string, string>;
      continue;
    }
    const e = value as { dtype?: unknown; shape?: unknown; data_offsets?: unknown };
    if (typeof e !== "object" || e === null) fail(`tensor "${name}" is not an object`);
    const dtype = e.dtype as SafeDType;
    if (typeof dtype !== "string" || !Object.hasOwn(DTYPE_BYTES, dtype)) {
      fail(`tensor "${name}" has unknown dtype ${JSON.stringify(e.dtype)}`);
    }
    const shape = e.shape;
    if (!Array.isArray(shape) || !shape.every(isCount)) {
      fail(`tensor "${name}" has an invalid shape ${JSON.stringify(shape)}`);
    }
    const offsets = e.data_offsets;
    if (
      !Array.isArray(offsets) || offsets.length !== 2 || !offsets.every(isCount) ||
      offsets[0] > offsets[1]
    ) {
      fail(`tensor "${name}" has invalid data_offsets ${JSON.stringify(offsets)}`);
    }
    const [begin, end] = offsets as number[];
    const bytes = (shape as number[]).reduce((a, b) => a * b, 1) * DTYPE_BYTES[dtype];
    if (bytes !== end - begin) {
      fail(
        `tensor "${name}": shape [${
          (shape as number[]).join(", ")
        }] of ${dtype} needs ${bytes} bytes ` +
          `but data_offsets [${begin}, ${end}] cover ${end - begin}`,
      );
    }
    if (end > dataSize) {
      fail(
        `tensor "${name}": data_offsets [${begin}, ${end}] go beyond the end of the data ` +
          `(${dataSize} bytes; truncated file?)`,
      );
    }
    entries.set(name, { dtype, shape: shape as number[], begin, end });
  }
  // No two non-empty byte ranges may overlap.
  const ranges = [...entries].filter(([, e]) => e.end > e.begin).sort((a, b) =>
    a[1].begin - b[1].begin
  );
  for (let i = 1; i < ranges.length; i++) {
    if (ranges[i][1].begin < ranges[i - 1][1].end) {
      fail(`tensors "${ranges[i - 1][0]}" and "${ranges[i][0]}" overlap`);
    }
  }
  return { entries, metadata, dataOffset };
}

async function readFully(path: string, file: Deno.FsFile, position: number, into: Uint8Array) {
  await file.seek(position, Deno.SeekMode.Start);
  let done = 0;
  while (done < into.length) {
    const n = await file.read(into.subarray(done));
    if (n === null) throw new AhaError(`${path}: truncated file (ended while reading)`);
    done += n;
  }
}

/** Reads all (or the named) tensors as Float32Array; F32, F16 and BF16 only. */
export async function readSafetensors(
  path: string,
  names?: string[],
): Promise<Map<string, { shape: number[]; data: Float32Array }>> {
  const out = new Map<string, { shape: number[]; data: Float32Array }>();
  await readTensors(path, names, ["F32", "F16", "BF16"], async (name, entry, read) => {
    const bytes = new Uint8Array(entry.end - entry.begin);
    await read(bytes);
    out.set(name, { shape: entry.shape, data: widened(entry, bytes) });
  });
  return out;
}

/**
 * One F32, F16 or BF16 tensor of a file whose header was read before (readSafetensorsHeader),
 * as Float32Array, read synchronously: for weights read one at a time as a model is built.
 */
export function readTensorSync(path: string, dataOffset: number, entry: TensorEntry): Float32Array {
  return widened(entry, readTensorBytesSync(path, dataOffset, entry));
}

/** One tensor's bytes as the file stores them (header read before), read synchronously. */
export function readTensorBytesSync(
  path: string,
  dataOffset: number,
  entry: TensorEntry,
): Uint8Array {
  const bytes = new Uint8Array(entry.end - entry.begin);
  let file: Deno.FsFile;
  try {
    file = Deno.openSync(path, { read: true });
  } catch (e) {
    throw new AhaError(`${path}: cannot open (${(e as Error).message})`);
  }
  try {
    file.seekSync(dataOffset + entry.begin, Deno.SeekMode.Start);
    for (let done = 0; done < bytes.length;) {
      const n = file.readSync(bytes.subarray(done));
      if (n === null) throw new AhaError(`${path}: truncated file (ended while reading)`);
      done += n;
    }
  } finally {
    file.close();
  }
  return bytes;
}

/** A tensor's F32, F16 or BF16 bytes as Float32Array (F32's own buffer, no copy). */
function widened(entry: TensorEntry, bytes: Uint8Array): Float32Array {
  if (entry.dtype === "F32") {
    return new Float32Array(bytes.buffer, bytes.byteOffset, bytes.length / 4);
  }
  if (entry.dtype !== "F16" && entry.dtype !== "BF16") {
    throw new Error(`widened: ${entry.dtype} is not a float dtype`);
  }
  const halves = new Uint16Array(bytes.buffer, bytes.byteOffset, bytes.length / 2);
  const data = new Float32Array(halves.length);
  if (entry.dtype === "F16") halfToFloat32(halves, data);
  else bfloat16ToFloat32(halves, data);
  return data;
}

/** Reads all (or the named) tensors as their raw bytes, whatever the dtype (e.g. I32 token ids:
 * `new Int32Array(t.bytes.buffer)`; each `bytes` is its own buffer). */
export async function readSafetensorsRaw(
  path: string,
  names?: string[],
): Promise<Map<string, { dtype: SafeDType; shape: number[]; bytes: Uint8Array }>> {
  const out = new Map<string, { dtype: SafeDType; shape: number[]; bytes: Uint8Array }>();
  await readTensors(path, names, null, async (name, entry, read) => {
    const bytes = new Uint8Array(entry.end - entry.begin);
    await read(bytes);
    out.set(name, { dtype: entry.dtype, shape: entry.shape, bytes });
  });
  return out;
}

/** Validates the header, that the named tensors exist and have one of `dtypes` (null: any),
 * then calls `take` for each wanted tensor in file order with a function that reads that
 * tensor's bytes into a buffer. */
async function readTensors(
  path: string,
  names: string[] | undefined,
  dtypes: SafeDType[] | null,
  take: (
    name: string,
    entry: TensorEntry,
    read: (into: Uint8Array) => Promise<void>,
  ) => Promise<void>,
): Promise<void> {
  const file = await openForReading(path);
  try {
    const { entries, dataOffset } = await readHeader(path, file);
    const wanted = names ?? [...entries.keys()];
    for (const name of wanted) {
      const entry = entries.get(name);
      if (!entry) throw new AhaError(`${path}: no tensor named "${name}"`);
      if (dtypes && !dtypes.includes(entry.dtype)) {
        throw new AhaError(
          `${path}: tensor "${name}" has dtype ${entry.dtype}; expected ${dtypes.join(", ")}`,
        );
      }
    }
    const ordered = wanted.map((name) => [name, entries.get(name)!] as const)
      .sort((a, b) => a[1].begin - b[1].begin);
    for (const [name, entry] of ordered) {
      await take(name, entry, (into) => readFully(path, file, dataOffset + entry.begin, into));
    }
  } finally {
    file.close();
  }
}

// IEEE half precision → float32, through a table of all 65536 values (built on first use).
let halfTable: Float32Array | null = null;

function halfToFloat32(src: Uint16Array, dst: Float32Array) {
  if (!halfTable) {
    halfTable = new Float32Array(65536);
    for (let bits = 0; bits < 65536; bits++) {
      const sign = bits & 0x8000 ? -1 : 1;
      const exponent = (bits >> 10) & 0x1f;
      const mantissa = bits & 0x3ff;
      halfTable[bits] = exponent === 0
        ? sign * mantissa * 2 ** -24 // zero and subnormals
        : exponent === 31
        ? (mantissa ? NaN : sign * Infinity)
        : sign * (1 + mantissa / 1024) * 2 ** (exponent - 15);
    }
  }
  for (let i = 0; i < src.length; i++) dst[i] = halfTable[src[i]];
}

// bfloat16 is the top half of a float32.
function bfloat16ToFloat32(src: Uint16Array, dst: Float32Array) {
  const bits = new Uint32Array(dst.buffer, dst.byteOffset, dst.length);
  for (let i = 0; i < src.length; i++) bits[i] = src[i] << 16;
}

type TensorValues = Float32Array | Int32Array | Uint16Array;
type TensorParts = TensorValues | TensorValues[] | AsyncIterable<TensorValues>;
type TensorData = TensorValues | (() => TensorParts | Promise<TensorParts>);

/**
 * Tensors to write: Float32Array as F32, Int32Array as I32, Uint16Array as the 16-bit `dtype`.
 * `data` may instead be a function giving the values when the tensor's turn comes (its `dtype`
 * then stated), so that writing a file holds one tensor's values at a time; writeSafetensors
 * also waits for values it gives as a promise (read back from a GPU), and takes them in
 * consecutive parts, never joined into one array: an array of them, or parts that come one at a
 * time (an async iterable: a weight read back from a GPU 64 MiB at a time).
 */
type WritableTensors = ReadonlyMap<
  string,
  { shape: number[]; data: TensorData; dtype?: "F32" | "BF16" | "F16" }
>;

/** How values are stored: Float32Array as F32, Int32Array as I32, Uint16Array as `half`. */
function storedAs(values: TensorValues, half: "BF16" | "F16" = "BF16"): SafeDType {
  return values instanceof Uint16Array ? half : values instanceof Float32Array ? "F32" : "I32";
}

/**
 * A tensor's values, asked for now when they are given by a function, checked against its shape
 * and, when the header was written from a stated dtype, against that. Values given as a promise
 * or in parts are refused here (a file in memory is made at once): writeSafetensors takes them.
 */
function valuesOf(
  path: string,
  name: string,
  tensor: { shape: number[]; data: TensorData; dtype?: "F32" | "BF16" | "F16" },
): TensorValues {
  const values = typeof tensor.data === "function" ? tensor.data() : tensor.data;
  if (!ArrayBuffer.isView(values)) {
    throw new Error(`${path}: tensor "${name}" gave a promise or parts; only a file written takes`);
  }
  checkPart(path, name, tensor, values);
  checkLength(path, name, tensor.shape, values.length);
  return values;
}

/** One part of a tensor's values checked against its stated dtype (a function's values). */
function checkPart(
  path: string,
  name: string,
  { data, dtype }: { data: TensorData; dtype?: "F32" | "BF16" | "F16" },
  part: TensorValues,
) {
  if (
    typeof data === "function" &&
    storedAs(part, dtype === "F16" ? "F16" : "BF16") !== (dtype ?? "F32")
  ) {
    throw new Error(`${path}: tensor "${name}" gave ${storedAs(part)} values, stated ${dtype}`);
  }
}

/** The number of values a tensor's parts held, checked against its shape. */
function checkLength(path: string, name: string, shape: number[], length: number) {
  if (shape.reduce((a, b) => a * b, 1) !== length) {
    throw new AhaError(`${path}: tensor "${name}" has ${length} values for shape [${shape}]`);
  }
}

/** float32 values rounded to bfloat16 bits (nearest, ties to even; NaN stays NaN). */
export function float32ToBfloat16(src: Float32Array): Uint16Array {
  return narrowed(src, bf16Bits);
}

/** float32 values rounded to IEEE half-precision bits (nearest, ties to even). */
export function float32ToFloat16(src: Float32Array): Uint16Array {
  return narrowed(src, f16Bits);
}

// A loop rather than Uint16Array.from(src, bits), which builds a JS array of every value first:
// for a 7B model's embedding (545M values) V8 ran out of memory ("invalid array length").
function narrowed(src: Float32Array, bits: (value: number) => number): Uint16Array {
  const out = new Uint16Array(src.length);
  for (let i = 0; i < src.length; i++) out[i] = bits(src[i]);
  return out;
}

/** The header bytes (length prefix + JSON padded to 8 bytes) for tensors laid out in order. */
function encodeHeader(path: string, tensors: WritableTensors, metadata?: Record<string, string>) {
  const header: Record<string, unknown> = {};
  if (metadata) header.__metadata__ = metadata;
  let offset = 0;
  for (const [name, tensor] of tensors) {
    const { shape, data, dtype: stated } = tensor;
    if (typeof data !== "function") valuesOf(path, name, tensor);
    const dtype = typeof data === "function"
      ? stated ?? "F32"
      : storedAs(data, stated === "F16" ? "F16" : "BF16");
    const bytes = shape.reduce((a, b) => a * b, 1) * DTYPE_BYTES[dtype];
    header[name] = { dtype, shape, data_offsets: [offset, offset + bytes] };
    offset += bytes;
  }
  let json = JSON.stringify(header);
  json += " ".repeat((8 - json.length % 8) % 8); // the JSON is ASCII when names are
  const jsonBytes = new TextEncoder().encode(json);
  const out = new Uint8Array(8 + jsonBytes.length);
  new DataView(out.buffer).setBigUint64(0, BigInt(jsonBytes.length), true);
  out.set(jsonBytes, 8);
  return out;
}

const bytesOf = (a: Float32Array | Int32Array | Uint16Array) =>
  new Uint8Array(a.buffer, a.byteOffset, a.byteLength);

/** The whole file's bytes, for small files kept in memory (e.g. `saveCheckpoint` extra files). */
export function encodeSafetensors(
  tensors: WritableTensors,
  metadata?: Record<string, string>,
): Uint8Array {
  const header = encodeHeader("safetensors", tensors, metadata);
  const values = [...tensors].map(([name, t]) => bytesOf(valuesOf("safetensors", name, t)));
  const out = new Uint8Array(header.length + values.reduce((a, v) => a + v.length, 0));
  out.set(header);
  let offset = header.length;
  for (const bytes of values) {
    out.set(bytes, offset);
    offset += bytes.length;
  }
  return out;
}

/** Writes F32 / I32 tensors in the given order to `path`, through a temporary sibling file. */
export async function writeSafetensors(
  path: string,
  tensors: WritableTensors,
  metadata?: Record<string, string>,
): Promise<void> {
  const header = encodeHeader(path, tensors, metadata);
  const temporary = `${path}.${Deno.pid}.tmp`;
  try {
    const file = await Deno.open(temporary, { write: true, create: true, truncate: true });
    try {
      await writeAll(file, header);
      for (const [name, tensor] of tensors) {
        const { data } = tensor;
        const given = typeof data === "function" ? await data() : data;
        // Parts are written as they come; a tensor that then proves the wrong length leaves only
        // the temporary file, removed below.
        let length = 0;
        for await (const part of ArrayBuffer.isView(given) ? [given] : given) {
          checkPart(path, name, tensor, part);
          length += part.length;
          await writeAll(file, bytesOf(part));
        }
        checkLength(path, name, tensor.shape, length);
      }
    } finally {
      file.close();
    }
    await Deno.rename(temporary, path);
  } catch (e) {
    await Deno.remove(temporary).catch(() => {});
    if (e instanceof AhaError) throw e;
    throw new AhaError(`${path}: cannot write (${(e as Error).message})`);
  }
}

async function writeAll(file: Deno.FsFile, bytes: Uint8Array) {
  for (let done = 0; done < bytes.length;) done += await file.write(bytes.subarray(done));
}
