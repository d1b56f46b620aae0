// Hugging Face checkpoint directories: config.json plus model.safetensors, or shards listed in
// model.safetensors.index.json. Loading checks every weight the config needs before reading
// any tensor data, then reads each weight only when it is asked for (WeightsOnDemand): a 7B
// model is 28 GiB as f32, and a model on the GPU needs each weight once, as it is uploaded. A
// 16-bit weight can also be read as its file's own bits (`halves`), for a GPU that keeps it so.
// Saving writes a complete new directory beside the old one, a weight at a time, and renames it
// into place, so the previous checkpoint survives any failure.

import { AhaError } from "./errors.ts";
import { firstNonFiniteHalf, type HalfDType, halfValue } from "./half.ts";
import { type ModelConfig, parseModelConfig, weightShapes } from "./model_config.ts";
import { exists, type FileContent, writeDirectory, writeFiles } from "./save_dir.ts";
import {
  float32ToBfloat16,
  float32ToFloat16,
  readSafetensorsHeader,
  readTensorBytesSync,
  readTensorSync,
  type SafeDType,
  type TensorEntry,
  writeSafetensors,
} from "./safetensors.ts";

export interface Checkpoint {
  config: ModelConfig;
  hfConfig: Record<string, unknown>;
  weights: ReadonlyMap<string, Float32Array>; // in weightShapes order
  /** Each weight's dtype in the files (F32, F16 or BF16), e.g. for frozen_dtype "auto". */
  dtypes: Map<string, SafeDType>;
}

const SINGLE_FILE = "model.safetensors";
const INDEX_FILE = "model.safetensors.index.json";
// Written into every model.safetensors (as transformers does), so files are byte-for-byte stable.
const METADATA = { format: "pt" };

/** A JSON file, or an AhaError naming it (missing, unreadable, not JSON). */
export async function readJson(path: string): Promise<unknown> {
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) throw new AhaError(`${path}: file not found`);
    throw new AhaError(`${path}: cannot read (${(e as Error).message})`);
  }
  try {
    return JSON.parse(text);
  } catch (e) {
    throw new AhaError(`${path}: not valid JSON (${(e as Error).message.split("\n")[0]})`);
  }
}

/** The index of the first NaN or infinite value, or −1. */
export function firstNonFinite(data: ArrayLike<number>): number {
  for (let i = 0; i < data.length; i++) if (!Number.isFinite(data[i])) return i;
  return -1;
}

const shapeText = (shape: number[]) => `[${shape.join(", ")}]`;

/** Which file holds each weight: the index's weight_map, or model.safetensors for all. */
async function weightFiles(dir: string, names: string[]): Promise<Map<string, string>> {
  const files = new Map<string, string>();
  const indexPath = `${dir}/${INDEX_FILE}`;
  if (await exists(indexPath)) {
    const index = await readJson(indexPath) as { weight_map?: unknown };
    const map = index?.weight_map;
    if (typeof map !== "object" || map === null || Array.isArray(map)) {
      throw new AhaError(`${indexPath}: field "weight_map" must be an object`);
    }
    for (const name of names) {
      const file = (map as Record<string, unknown>)[name];
      if (typeof file !== "string") {
        throw new AhaError(`${indexPath}: weight_map has no file for weight "${name}"`);
      }
      files.set(name, `${dir}/${file}`);
    }
  } else if (await exists(`${dir}/${SINGLE_FILE}`)) {
    for (const name of names) files.set(name, `${dir}/${SINGLE_FILE}`);
  } else {
    throw new AhaError(`${dir}: no ${SINGLE_FILE} or ${INDEX_FILE}`);
  }
  return files;
}

/** Loads a checkpoint directory; every weight of weightShapes(config) must be present with its
 * shape (F32, F16 or BF16; converted to f32 as it is read). Other tensors, e.g. a tied lm_head,
 * are ignored. The weights are read from the files when asked for (WeightsOnDemand). */
export async function loadCheckpoint(dir: string): Promise<Checkpoint> {
  const configPath = `${dir}/config.json`;
  const hfConfig = await readJson(configPath);
  const config = parseModelConfig(hfConfig, configPath);
  const shapes = weightShapes(config);
  const files = await weightFiles(dir, [...shapes.keys()]);
  const byFile = Map.groupBy(files.keys(), (name) => files.get(name)!);
  // Check every header before reading any tensor data.
  const dtypes = new Map<string, SafeDType>();
  const stored = new Map<string, StoredWeight>();
  for (const [file, names] of byFile) {
    const inFile = await storedIn(file);
    for (const name of names) {
      const expected = shapes.get(name)!;
      const entry = inFile.get(name)?.entry;
      if (!entry) {
        throw new AhaError(
          `${file}: missing weight "${name}" (expected shape ${shapeText(expected)})`,
        );
      }
      if (shapeText(entry.shape) !== shapeText(expected)) {
        throw new AhaError(
          `${file}: weight "${name}" has shape ${shapeText(entry.shape)}, ` +
            `expected ${shapeText(expected)} from config.json`,
        );
      }
      checkFloat(file, `weight "${name}"`, entry);
      dtypes.set(name, entry.dtype);
      stored.set(name, inFile.get(name)!);
    }
  }
  const weights = new WeightsOnDemand(
    [...shapes.keys()],
    (name) => readStored(name, stored.get(name)!),
    (name, dtype) => readStoredHalves(name, stored.get(name)!, dtype),
  );
  return { config, hfConfig: hfConfig as Record<string, unknown>, weights, dtypes };
}

/**
 * Every tensor of one safetensors file (F32, F16 or BF16; widened to f32), read from it at each
 * `get` with loadCheckpoint's checks: e.g. a training checkpoint's AdamW moments.
 */
export async function tensorsOnDemand(file: string): Promise<WeightsOnDemand> {
  const stored = await storedIn(file);
  for (const [name, { entry }] of stored) checkFloat(file, `tensor "${name}"`, entry);
  return new WeightsOnDemand([...stored.keys()], (name) => readStored(name, stored.get(name)!));
}

/** Where each tensor of a file lies, and the file as its header was read. */
async function storedIn(file: string): Promise<Map<string, StoredWeight>> {
  const { entries, dataOffset } = await readSafetensorsHeader(file);
  const { size, mtime } = await Deno.stat(file);
  const at = (entry: TensorEntry) => ({
    file,
    dataOffset,
    entry,
    size,
    mtime: mtime?.getTime() ?? null,
  });
  return new Map([...entries].map(([name, entry]) => [name, at(entry)]));
}

/** Refuses a tensor that is not F32, F16 or BF16 (`what` names it). */
function checkFloat(file: string, what: string, entry: TensorEntry): void {
  if (entry.dtype !== "F32" && entry.dtype !== "F16" && entry.dtype !== "BF16") {
    throw new AhaError(`${file}: ${what} has dtype ${entry.dtype}; expected F32, F16 or BF16`);
  }
}

/** Where one weight lies in its file, and the file as its header was checked. */
interface StoredWeight {
  file: string;
  dataOffset: number;
  entry: TensorEntry;
  size: number;
  mtime: number | null;
}

/**
 * One weight of a checkpoint read from its file and widened to f32 (at every `get` of its
 * WeightsOnDemand: the model on the GPU holds the only lasting copy). The read checks that the
 * values are finite, and that the file is the one whose header was checked (same size and
 * modification time), so a checkpoint replaced while a run reads it is an error rather than
 * other weights.
 */
function readStored(name: string, at: StoredWeight): Float32Array {
  checkUnchanged(name, at);
  const data = readTensorSync(at.file, at.dataOffset, at.entry);
  const bad = firstNonFinite(data);
  if (bad >= 0) throw corrupt(name, at, data[bad], bad);
  return data;
}

/**
 * One weight's 16-bit values exactly as its file stores them, when it stores them as `dtype`
 * (null otherwise), with readStored's checks: a model that keeps a BF16 checkpoint's matrices in
 * bf16 uploads them without widening each to f32 and narrowing it back.
 */
function readStoredHalves(name: string, at: StoredWeight, dtype: HalfDType): Uint16Array | null {
  if (at.entry.dtype !== (dtype === "bf16" ? "BF16" : "F16")) return null;
  checkUnchanged(name, at);
  const bytes = readTensorBytesSync(at.file, at.dataOffset, at.entry);
  const halves = new Uint16Array(bytes.buffer, bytes.byteOffset, bytes.length / 2);
  const bad = firstNonFiniteHalf(halves, dtype);
  if (bad >= 0) throw corrupt(name, at, halfValue(halves[bad], dtype), bad);
  return halves;
}

/** Refuses a read from a file that is not the one whose header was checked. */
function checkUnchanged(name: string, at: StoredWeight): void {
  let now: Deno.FileInfo | null = null;
  try {
    now = Deno.statSync(at.file);
  } catch {
    now = null;
  }
  if (!now || now.size !== at.size || (now.mtime?.getTime() ?? null) !== at.mtime) {
    throw new AhaError(
      `${at.file}: ${now ? "changed" : "gone"} since its header was read; the run cannot ` +
        `read weight "${name}" from it (restore the checkpoint, or start again)`,
    );
  }
}

const corrupt = (name: string, at: StoredWeight, value: number, index: number) =>
  new AhaError(
    `${at.file}: tensor "${name}" holds ${value} at index ${index}: ` +
      `the checkpoint is corrupt (NaN or infinite values)`,
  );

/**
 * Weights made when asked for (`read`, at every `get`) and never kept: a checkpoint's, read from
 * its files, or a merged adapter's. Code that reads a weight many times copies the map first
 * (`new Map(weights)`). A checkpoint's also gives its 16-bit weights' own bits (`halves`).
 */
export class WeightsOnDemand implements ReadonlyMap<string, Float32Array> {
  constructor(
    private readonly names: string[],
    private readonly read: (name: string) => Float32Array,
    private readonly readHalves: (name: string, dtype: HalfDType) => Uint16Array | null = () =>
      null,
  ) {}

  /** A weight's values as stored in `dtype` (e.g. a BF16 file's bits), or null where its
   * source does not hold it so: then `get` gives its f32 values. */
  halves(name: string, dtype: HalfDType): Uint16Array | null {
    return this.has(name) ? this.readHalves(name, dtype) : null;
  }

  get size(): number {
    return this.names.length;
  }

  has(name: string): boolean {
    return this.names.includes(name);
  }

  get(name: string): Float32Array | undefined {
    return this.has(name) ? this.read(name) : undefined;
  }

  keys(): MapIterator<string> {
    return this.names.values();
  }

  *entries(): MapIterator<[string, Float32Array]> {
    for (const name of this.names) yield [name, this.read(name)];
  }

  *values(): MapIterator<Float32Array> {
    for (const name of this.names) yield this.read(name);
  }

  [Symbol.iterator](): MapIterator<[string, Float32Array]> {
    return this.entries();
  }

  forEach(
    callback: (value: Float32Array, key: string, map: ReadonlyMap<string, Float32Array>) => void,
  ): void {
    for (const [name, data] of this.entries()) callback(data, name, this);
  }
}

/**
 * Tensors read when a save asks for each, in its order, their sizes known before any is read: a
 * model's weights or moments on the GPU, read back a batch at a time, so that a save never holds
 * them all (a 0.5B model's weights and AdamW moments are 5.5 GiB as f32). A tensor comes in
 * consecutive parts, each read when the save reaches it and written as it is, never joined.
 */
export interface TensorReader {
  sizes: ReadonlyMap<string, number>;
  read(name: string): AsyncIterable<Float32Array>;
}

/** A map's tensor as a TensorReader gives one: its one part, or none when the map lacks it. */
export async function* partsOf(
  tensors: ReadonlyMap<string, Float32Array>,
  name: string,
): AsyncGenerator<Float32Array> {
  const data = tensors.get(name);
  if (data !== undefined) yield data;
}

/** Whether a save's tensors come from a TensorReader rather than a map. */
export const isReader = (
  tensors: ReadonlyMap<string, Float32Array> | TensorReader,
): tensors is TensorReader => "sizes" in tensors;

/** Writes config.json, model.safetensors (F32 unless `dtype` says BF16/F16, weightShapes order)
 * and `extraFiles` into a temporary sibling directory, then renames it to `dir`, replacing any
 * previous one. */
export async function saveCheckpoint(
  dir: string,
  hfConfig: Record<string, unknown>,
  weights: ReadonlyMap<string, Float32Array> | TensorReader,
  extraFiles: Record<string, FileContent> = {},
  dtype: "f32" | "bf16" | "f16" = "f32",
): Promise<void> {
  const shapes = weightShapes(parseModelConfig(hfConfig, `${dir}/config.json`));
  const [read, has] = isReader(weights)
    ? [(name: string) => weights.read(name), (name: string) => weights.sizes.has(name)]
    : [(name: string) => partsOf(weights, name), (name: string) => weights.has(name)];
  // Each weight is asked for, checked and converted when its turn to be written comes, a part at
  // a time, so a save holds one part at a time (a merged 7B model is 28 GiB as f32). A failure
  // leaves the old checkpoint.
  const tensors = new Map<
    string,
    {
      shape: number[];
      data: () => AsyncIterable<Float32Array | Uint16Array>;
      dtype: "F32" | "BF16" | "F16";
    }
  >();
  for (const [name, shape] of shapes) {
    const size = shape.reduce((a, b) => a * b, 1);
    const wrongSize = (got: number | string) =>
      new AhaError(
        `${dir}: cannot save weight "${name}": expected ${size} values (shape ` +
          `${shapeText(shape)}), got ${got}`,
      );
    if (!has(name)) throw wrongSize("none"); // refused before anything is written
    const checked = async function* () {
      let at = 0, parts = 0;
      for await (const part of read(name)) {
        const bad = firstNonFinite(part);
        if (bad >= 0) {
          throw new AhaError(
            `${dir}: not saved: weight "${name}" holds ${part[bad]} at index ${at + bad} ` +
              `(training diverged; the previous checkpoint is kept)`,
          );
        }
        at += part.length;
        parts++;
        yield part;
      }
      if (at !== size) throw wrongSize(parts ? at : "none");
    };
    const narrowed = async function* (narrow: (part: Float32Array) => Uint16Array) {
      for await (const part of checked()) yield narrow(part);
    };
    tensors.set(
      name,
      dtype === "f32"
        ? { shape, data: checked, dtype: "F32" }
        : dtype === "bf16"
        ? { shape, data: () => narrowed(float32ToBfloat16), dtype: "BF16" }
        : { shape, data: () => narrowed(float32ToFloat16), dtype: "F16" },
    );
  }
  await writeDirectory(dir, async (temporary) => {
    await Deno.writeTextFile(`${temporary}/config.json`, JSON.stringify(hfConfig, null, 2) + "\n");
    await writeSafetensors(`${temporary}/${SINGLE_FILE}`, tensors, METADATA);
    await writeFiles(temporary, extraFiles);
  });
}
