// Hugging Face checkpoint directories: config.json plus model.safetensors, or shards listed in
// model.safetensors.index.json. Loading checks every weight the config needs before reading
// any tensor data, then reads each weight only when it is asked for (WeightsOnDemand): a 7B
// model is 28 GiB as f32, and a model on the GPU needs each weight once, as it is uploaded.
// Saving writes a complete new directory beside the old one, a weight at a time, and renames it
// into place, so the previous checkpoint survives any failure.

import { AhaError } from "./errors.ts";
import { type ModelConfig, parseModelConfig, weightShapes } from "./model_config.ts";
import {
  float32ToBfloat16,
  float32ToFloat16,
  readSafetensorsHeader,
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

const exists = (path: string) => Deno.stat(path).then(() => true, () => false);
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
    const { entries, dataOffset } = await readSafetensorsHeader(file);
    const { size, mtime } = await Deno.stat(file);
    for (const name of names) {
      const expected = shapes.get(name)!;
      const entry = entries.get(name);
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
      if (entry.dtype !== "F32" && entry.dtype !== "F16" && entry.dtype !== "BF16") {
        throw new AhaError(
          `${file}: weight "${name}" has dtype ${entry.dtype}; expected F32, F16 or BF16`,
        );
      }
      dtypes.set(name, entry.dtype);
      stored.set(name, { file, dataOffset, entry, size, mtime: mtime?.getTime() ?? null });
    }
  }
  const weights = new WeightsOnDemand(
    [...shapes.keys()],
    (name) => readStored(name, stored.get(name)!),
  );
  return { config, hfConfig: hfConfig as Record<string, unknown>, weights, dtypes };
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
  const data = readTensorSync(at.file, at.dataOffset, at.entry);
  const bad = firstNonFinite(data);
  if (bad >= 0) {
    throw new AhaError(
      `${at.file}: weight "${name}" holds ${data[bad]} at index ${bad}: ` +
        `the checkpoint is corrupt (NaN or infinite weights)`,
    );
  }
  return data;
}

/**
 * Weights made when asked for (`read`, at every `get`) and never kept: a checkpoint's, read from
 * its files, or a merged adapter's. Code that reads a weight many times copies the map first
 * (`new Map(weights)`).
 */
export class WeightsOnDemand implements ReadonlyMap<string, Float32Array> {
  constructor(
    private readonly names: string[],
    private readonly read: (name: string) => Float32Array,
  ) {}

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

/** Writes config.json, model.safetensors (F32 unless `dtype` says BF16/F16, weightShapes order)
 * and `extraFiles` into a temporary sibling directory, then renames it to `dir`, replacing any
 * previous one. */
export async function saveCheckpoint(
  dir: string,
  hfConfig: Record<string, unknown>,
  weights: ReadonlyMap<string, Float32Array>,
  extraFiles: Record<string, Uint8Array | string> = {},
  dtype: "f32" | "bf16" | "f16" = "f32",
): Promise<void> {
  const shapes = weightShapes(parseModelConfig(hfConfig, `${dir}/config.json`));
  // Each weight is asked for, checked and converted when its turn to be written comes, so a save
  // holds one at a time (a merged 7B model is 28 GiB as f32). A failure leaves the old checkpoint.
  const tensors = new Map<
    string,
    { shape: number[]; data: () => Float32Array | Uint16Array; dtype: "F32" | "BF16" | "F16" }
  >();
  for (const [name, shape] of shapes) {
    const size = shape.reduce((a, b) => a * b, 1);
    const checked = () => {
      const data = weights.get(name);
      if (!data || data.length !== size) {
        throw new AhaError(
          `${dir}: cannot save weight "${name}": expected ${size} values (shape ` +
            `${shapeText(shape)}), got ${data ? data.length : "none"}`,
        );
      }
      const bad = firstNonFinite(data);
      if (bad >= 0) {
        throw new AhaError(
          `${dir}: not saved: weight "${name}" holds ${data[bad]} at index ${bad} ` +
            `(training diverged; the previous checkpoint is kept)`,
        );
      }
      return data;
    };
    if (!weights.has(name)) checked(); // missing: refused before anything is written
    tensors.set(
      name,
      dtype === "f32"
        ? { shape, data: checked, dtype: "F32" }
        : dtype === "bf16"
        ? { shape, data: () => float32ToBfloat16(checked()), dtype: "BF16" }
        : { shape, data: () => float32ToFloat16(checked()), dtype: "F16" },
    );
  }
  await writeDirectory(dir, async (temporary) => {
    await Deno.writeTextFile(`${temporary}/config.json`, JSON.stringify(hfConfig, null, 2) + "\n");
    await writeSafetensors(`${temporary}/${SINGLE_FILE}`, tensors, METADATA);
    await writeFiles(temporary, extraFiles);
  });
}

/** Writes small files (text or bytes) into a directory. */
export async function writeFiles(
  dir: string,
  files: Record<string, Uint8Array | string>,
): Promise<void> {
  for (const [name, content] of Object.entries(files)) {
    if (typeof content === "string") await Deno.writeTextFile(`${dir}/${name}`, content);
    else await Deno.writeFile(`${dir}/${name}`, content);
  }
}

/** Fills a temporary sibling directory with `write`, then renames it to `dir`, replacing any
 * previous one only once the new one is complete. */
export async function writeDirectory(
  dir: string,
  write: (temporary: string) => Promise<void>,
): Promise<void> {
  const path = dir.replace(/\/+$/, "");
  const slash = path.lastIndexOf("/");
  const parent = slash < 0 ? "." : path.slice(0, slash) || "/";
  const base = path.slice(slash + 1);
  const temporary = `${parent}/.${base}.${Deno.pid}.tmp`;
  const previous = `${parent}/.${base}.${Deno.pid}.old`;
  try {
    await Deno.remove(temporary, { recursive: true }).catch(() => {});
    await Deno.mkdir(temporary, { recursive: true });
    await write(temporary);
    // A directory cannot be renamed over a non-empty one: move the old one aside first, and
    // back again if the new one cannot take its place.
    const replacing = await exists(path);
    if (replacing) await Deno.rename(path, previous);
    try {
      await Deno.rename(temporary, path);
    } catch (e) {
      if (replacing) await Deno.rename(previous, path);
      throw e;
    }
    if (replacing) await Deno.remove(previous, { recursive: true });
  } catch (e) {
    await Deno.remove(temporary, { recursive: true }).catch(() => {});
    if (e instanceof AhaError) throw e;
    throw new AhaError(`${dir}: cannot save checkpoint (${(e as Error).message})`);
  }
}
