// Question/answer datasets from JSONL or Parquet files: the field mapping, answer extractors
// (GSM8K's "#### 42", the last number, MATH's \boxed{}), a held-out split for evaluation, and
// the seeded epoch-by-epoch order in which training draws prompts. Bad rows are counted and
// reported once, and are fatal only when no row is usable.

import { parquetReadObjects } from "hyparquet";
import { compressors } from "hyparquet-compressors";
import { AhaError } from "../core/errors.ts";
import { lastNumber } from "../core/rewards.ts";
import { Rng } from "../core/rng.ts";
import type { SamplerState } from "../core/task.ts";
import { type HubSettings, isHubId, resolveDatasetSplit } from "./hub.ts";

export interface Example {
  question: string;
  /** The ground truth, as the extractor found it. */
  answer: string;
  /** Every column of the row as the file has it (user reward functions receive them). */
  columns: Record<string, unknown>;
}

/** Where the rows are and how to read them: the config's `dataset` section. */
export interface DatasetSpec {
  path: string;
  /** By default from the file name's ending. */
  format?: "jsonl" | "parquet";
  question_field: string;
  answer_field: string;
  /** A key of ANSWER_EXTRACTORS. */
  answer_extractor: string;
  /** When `path` is a Hub dataset id: which config and split of its Parquet conversion. */
  hub?: { config: string; split: string; settings?: HubSettings };
}

/** Turn a raw answer field into the ground truth, or null when the row has none. */
export const ANSWER_EXTRACTORS: Record<string, (raw: string) => string | null> = {
  none: (raw) => raw.trim(),
  // GSM8K: the worked solution ends with a line "#### 42".
  gsm8k: (raw) => {
    const at = raw.lastIndexOf("####");
    const answer = at < 0 ? "" : raw.slice(at + 4).trim();
    return answer === "" ? null : answer;
  },
  last_number: (raw) => {
    const value = lastNumber(raw);
    return value === null ? null : String(value);
  },
  // MATH-style solutions: the content of the last \boxed{…}, braces balanced.
  boxed: (raw) => {
    const start = raw.lastIndexOf("\\boxed{");
    if (start < 0) return null;
    let depth = 0;
    for (let i = start + 6; i < raw.length; i++) {
      if (raw[i] === "{") depth++;
      else if (raw[i] === "}" && --depth === 0) return raw.slice(start + 7, i).trim() || null;
    }
    return null;
  },
};

/**
 * Every usable row of the dataset. Unusable rows (bad JSON, a missing or empty field, no
 * extractable answer) are skipped and summarised in one call to `warn`.
 */
export async function loadDataset(
  spec: DatasetSpec,
  warn: (message: string) => void = console.warn,
): Promise<Example[]> {
  if (await isHubId(spec.path)) {
    // A Hub id: the Parquet files of its config and split, read as one table.
    const { config = "default", split = "train", settings } = spec.hub ?? {};
    const files = await resolveDatasetSplit(spec.path, config, split, settings);
    const rows = (await Promise.all(files.map(readParquet))).flat();
    return usableRows({ ...spec, path: `${spec.path} (${config}/${split})` }, rows, warn);
  }
  const format = spec.format ?? spec.path.match(/\.(jsonl|parquet)$/)?.[1];
  if (format !== "jsonl" && format !== "parquet") {
    throw new AhaError(`${spec.path}: expected a .jsonl or .parquet file (or set dataset.format)`);
  }
  const rows = format === "parquet" ? await readParquet(spec.path) : await readJsonl(spec.path);
  return usableRows(spec, rows, warn);
}

/** The rows whose question and answer are usable; the others summarised in one warning. */
function usableRows(
  spec: DatasetSpec,
  rows: RawRow[],
  warn: (message: string) => void,
): Example[] {
  const extract = ANSWER_EXTRACTORS[spec.answer_extractor];
  if (!extract) {
    const known = Object.keys(ANSWER_EXTRACTORS).join(", ");
    throw new AhaError(`unknown answer_extractor "${spec.answer_extractor}" (known: ${known})`);
  }
  const examples: Example[] = [];
  const problems: string[] = [];
  for (const { where, row, error } of rows) {
    const question = row ? asText(row[spec.question_field]) : null;
    const raw = row ? asText(row[spec.answer_field]) : null;
    const answer = raw === null ? null : extract(raw);
    if (question !== null && answer !== null) {
      examples.push({ question, answer, columns: plainColumns(row!) });
      continue;
    }
    problems.push(
      `${where}: ${
        error ?? (question === null
          ? `field "${spec.question_field}" missing or empty`
          : raw === null
          ? `field "${spec.answer_field}" missing or empty`
          : `no answer found by the "${spec.answer_extractor}" extractor`)
      }`,
    );
  }
  const summary = `${spec.path}: skipped ${problems.length} of ${rows.length} rows (first: ${
    problems.slice(0, 3).join("; ")
  })`;
  if (examples.length === 0) {
    throw new AhaError(rows.length === 0 ? `${spec.path}: no rows` : `${summary}; none usable`);
  }
  if (problems.length > 0) warn(summary);
  return examples;
}

/** A row's columns, Parquet's BigInt integers as numbers. */
function plainColumns(row: Record<string, unknown>): Record<string, unknown> {
  return Object.fromEntries(
    Object.entries(row).map(([k, v]) => [k, typeof v === "bigint" ? Number(v) : v]),
  );
}

/** A field as text: strings (non-blank) and numbers (Parquet INT64 arrives as BigInt). */
function asText(value: unknown): string | null {
  if (typeof value === "string") return value.trim() === "" ? null : value;
  if (typeof value === "number" || typeof value === "bigint") return String(value);
  return null;
}

interface RawRow {
  where: string; // "file:line" or "file: row N", for messages
  row: Record<string, unknown> | null;
  error?: string;
}

async function readJsonl(path: string): Promise<RawRow[]> {
  const rows: RawRow[] = [];
  (await readFile(path, (p) => Deno.readTextFile(p))).split("\n").forEach((line, i) => {
    if (line.trim() === "") return;
    const where = `${path}:${i + 1}`;
    try {
      const row = JSON.parse(line);
      if (typeof row === "object" && row !== null && !Array.isArray(row)) rows.push({ where, row });
      else rows.push({ where, row: null, error: "expected a JSON object" });
    } catch {
      rows.push({ where, row: null, error: "invalid JSON" });
    }
  });
  return rows;
}

async function readParquet(path: string): Promise<RawRow[]> {
  const bytes = await readFile(path, (p) => Deno.readFile(p));
  let objects: Record<string, unknown>[];
  try {
    const file = bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength);
    objects = await parquetReadObjects({ file, compressors });
  } catch (e) {
    throw new AhaError(`${path}: not a readable Parquet file: ${(e as Error).message}`);
  }
  return objects.map((row, i) => ({ where: `${path}: row ${i + 1}`, row }));
}

async function readFile<T>(path: string, read: (path: string) => Promise<T>): Promise<T> {
  try {
    return await read(path);
  } catch (e) {
    throw new AhaError(`${path}: cannot read: ${(e as Error).message}`);
  }
}

/**
 * Split off `heldOut` examples for evaluation (a count, or a fraction when below 1), chosen by
 * a seeded shuffle; the rest train. The split depends only on the rows and the seed.
 */
export function splitHeldOut<T>(
  examples: T[],
  heldOut: number,
  seed: number,
): { train: T[]; heldOut: T[] } {
  const count = heldOut < 1 ? Math.round(heldOut * examples.length) : heldOut;
  if (!Number.isInteger(count) || count < 0 || count >= examples.length) {
    throw new AhaError(
      `cannot hold out ${heldOut} of ${examples.length} examples: leave at least one to train on`,
    );
  }
  const order = new Rng(seed).shuffle(examples.map((_, i) => i));
  const held = new Set(order.slice(0, count));
  return {
    train: examples.filter((_, i) => !held.has(i)),
    heldOut: order.slice(0, count).sort((a, b) => a - b).map((i) => examples[i]),
  };
}

/** Draws items in a fresh seeded shuffle each epoch, every item once per epoch. */
export class EpochSampler<T> {
  private state: SamplerState;
  private order: number[] = [];
  private nextEpochRng = "";

  /** Start at epoch 0 from a seed, or resume from a saved state. */
  constructor(private items: T[], start: number | SamplerState) {
    if (items.length === 0) throw new RangeError("EpochSampler: no items");
    this.state = typeof start === "number"
      ? { epoch: 0, position: 0, rng: new Rng(start).state() }
      : { ...start };
    if (this.state.position > items.length) {
      throw new AhaError(
        `saved dataset position ${this.state.position} is past its ${items.length} rows: ` +
          "the dataset changed since the checkpoint",
      );
    }
    this.shuffle();
  }

  /** This epoch's order, from the generator state saved at its start. */
  private shuffle() {
    const rng = Rng.restore(this.state.rng);
    this.order = rng.shuffle(this.items.map((_, i) => i));
    this.nextEpochRng = rng.state();
  }

  /** The next `n` items, crossing into the next epoch (and its new order) when needed. */
  take(n: number): T[] {
    const out: T[] = [];
    while (out.length < n) {
      if (this.state.position === this.order.length) {
        this.state = { epoch: this.state.epoch + 1, position: 0, rng: this.nextEpochRng };
        this.shuffle();
      }
      out.push(this.items[this.order[this.state.position++]]);
    }
    return out;
  }

  get epoch(): number {
    return this.state.epoch;
  }

  /** A copy of the position, to store in a checkpoint and pass back to the constructor. */
  save(): SamplerState {
    return { ...this.state };
  }
}
