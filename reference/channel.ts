// The channel between the trainer and its reference worker (reference/worker.ts).
//
// Tensors travel as safetensors files in a private directory: under /dev/shm (memory, no disk)
// or the OS temp dir where there is none, mode 0700, one per run. A file is written under a
// temporary name and renamed, so a reader never sees half of one, and read straight into arrays
// sized from its header (Deno.open + read; ~4× faster than Deno.readFile). Control travels as
// one JSON line per message on the worker's stdin (requests) and stdout (replies).
//
// A log-probs request's file holds, for B rows right-padded to L tokens:
//   input_ids        I32 [B, L]   prompt then completion tokens, padded with 0
//   prompt_lens      I32 [B]      P_b ≥ 1
//   completion_lens  I32 [B]      C_b ≥ 0, P_b + C_b ≤ L
// and its reply file holds
//   logprobs         F32 [B, C]   C = max C_b; [b, t] = log p(completion token t of row b), 0 past C_b

import type { TokenBatch } from "../core/engine.ts";
import { AhaError } from "../core/errors.ts";
import {
  readSafetensors,
  readSafetensorsRaw,
  type SafeDType,
  writeSafetensors,
} from "../core/safetensors.ts";

/** A request's token batch, as the worker reads it. */
export interface PackedBatch {
  ids: Int32Array; // [B, L]
  B: number;
  L: number;
  promptLens: Int32Array;
  completionLens: Int32Array;
}

type Tensors = Map<string, { shape: number[]; data: Float32Array | Int32Array }>;

export class Channel {
  private constructor(readonly dir: string) {}

  /** A fresh private directory (the trainer's side). */
  static async create(): Promise<Channel> {
    const parent = await Deno.stat("/dev/shm").then((s) => s.isDirectory, () => false)
      ? "/dev/shm"
      : undefined;
    const dir = await Deno.makeTempDir({ dir: parent, prefix: `aha-ref-${Deno.pid}-` });
    await Deno.chmod(dir, 0o700);
    return new Channel(await Deno.realPath(dir));
  }

  /** The directory the trainer made (the worker's side). */
  static async open(dir: string): Promise<Channel> {
    const real = await Deno.realPath(dir).catch(() => {
      throw new AhaError(`${dir}: the channel directory does not exist`);
    });
    return new Channel(real);
  }

  path(name: string): string {
    return `${this.dir}/${name}`;
  }

  /** The path of a file named in a request, refused unless it is a file directly inside. */
  async resolve(name: unknown): Promise<string> {
    if (typeof name !== "string" || name === "") {
      throw new AhaError(`"file" must name a file in the channel directory`);
    }
    const real = await Deno.realPath(name.startsWith("/") ? name : this.path(name)).catch(() => {
      throw new AhaError(`${name}: no such file in the channel directory ${this.dir}`);
    });
    if (real.slice(0, real.lastIndexOf("/")) !== this.dir || !(await Deno.stat(real)).isFile) {
      throw new AhaError(`${name}: outside the channel directory ${this.dir}`);
    }
    return real;
  }

  /** Writes tensors as `name` (through a temporary name); returns its path. */
  async write(name: string, tensors: Tensors): Promise<string> {
    await writeSafetensors(this.path(name), tensors);
    return this.path(name);
  }

  async writeBatch(name: string, batch: TokenBatch): Promise<string> {
    const B = batch.rows.length, L = Math.max(...batch.rows.map((r) => r.length));
    const ids = new Int32Array(B * L);
    batch.rows.forEach((row, b) => ids.set(row, b * L));
    const promptLens = Int32Array.from(batch.promptLens);
    const completionLens = Int32Array.from(batch.rows, (row, b) => row.length - promptLens[b]);
    return await this.write(
      name,
      new Map([
        ["input_ids", { shape: [B, L], data: ids }],
        ["prompt_lens", { shape: [B], data: promptLens }],
        ["completion_lens", { shape: [B], data: completionLens }],
      ]),
    );
  }

  /** Reads and checks a log-probs request's tensors (see the top). */
  async readBatch(path: string): Promise<PackedBatch> {
    const t = await readSafetensorsRaw(path, ["input_ids", "prompt_lens", "completion_lens"]);
    const int32 = (name: string, rank: number) => {
      const { dtype, shape, bytes } = t.get(name)!;
      expect(path, name, dtype, shape, "I32", rank);
      return { shape, data: new Int32Array(bytes.buffer) };
    };
    const ids = int32("input_ids", 2), prompts = int32("prompt_lens", 1);
    const completions = int32("completion_lens", 1);
    const [B, L] = ids.shape;
    if (prompts.shape[0] !== B || completions.shape[0] !== B) {
      throw new AhaError(
        `${path}: input_ids has ${B} rows but prompt_lens has ${prompts.shape[0]} and ` +
          `completion_lens ${completions.shape[0]}`,
      );
    }
    for (let b = 0; b < B; b++) {
      const P = prompts.data[b], C = completions.data[b];
      if (P < 1 || C < 0 || P + C > L) {
        throw new AhaError(
          `${path}: row ${b} has prompt length ${P} and completion length ${C}; expected ` +
            `prompt ≥ 1, completion ≥ 0 and their sum ≤ ${L} (the row length)`,
        );
      }
    }
    return {
      ids: ids.data,
      B,
      L,
      promptLens: prompts.data,
      completionLens: completions.data,
    };
  }

  /** The F32 tensor `name` of a file, checked to have `rank` dimensions. */
  async readF32(path: string, name: string, rank: number) {
    const { shape, data } = (await readSafetensors(path, [name])).get(name)!;
    expect(path, name, "F32", shape, "F32", rank);
    return { shape, data };
  }

  /** Removes one file; a missing one is fine. */
  async remove(path: string): Promise<void> {
    await Deno.remove(path).catch(() => {});
  }

  /**
   * Removes the whole directory (synchronous, so it also runs in an unload handler). The worker
   * and the trainer may both be removing it at once, and a recursive removal gives up when an
   * entry vanishes under it: try again until the directory is gone.
   */
  removeAll(): void {
    for (let attempt = 0; attempt < 5; attempt++) {
      try {
        Deno.removeSync(this.dir, { recursive: true });
      } catch {
        // raced with the other side, or already gone: look again
      }
      try {
        Deno.statSync(this.dir);
      } catch {
        return;
      }
    }
  }
}

function expect(
  path: string,
  name: string,
  dtype: SafeDType,
  shape: number[],
  wantDtype: SafeDType,
  rank: number,
) {
  if (dtype !== wantDtype || shape.length !== rank) {
    throw new AhaError(
      `${path}: tensor "${name}" is ${dtype} [${shape}]; expected ${wantDtype} of rank ${rank}`,
    );
  }
}

/** Lines of a byte stream (a child's stdout, our stdin); null at its end. */
export class LineReader {
  private buffered = "";
  private readonly decoder = new TextDecoder();
  private readonly reader: ReadableStreamDefaultReader<Uint8Array>;

  constructor(stream: ReadableStream<Uint8Array>) {
    this.reader = stream.getReader();
  }

  async next(): Promise<string | null> {
    for (;;) {
      const end = this.buffered.indexOf("\n");
      if (end >= 0) {
        const line = this.buffered.slice(0, end);
        this.buffered = this.buffered.slice(end + 1);
        return line;
      }
      const { value, done } = await this.reader.read();
      if (done) {
        const rest = this.buffered;
        this.buffered = "";
        return rest === "" ? null : rest;
      }
      this.buffered += this.decoder.decode(value, { stream: true });
    }
  }

  async cancel(): Promise<void> {
    await this.reader.cancel().catch(() => {});
  }
}

/** Writes one JSON message as a line. */
export async function writeMessage(
  writer: WritableStreamDefaultWriter<Uint8Array>,
  message: unknown,
): Promise<void> {
  await writer.write(new TextEncoder().encode(JSON.stringify(message) + "\n"));
}
