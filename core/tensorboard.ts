// TensorBoard event files (`report_to: [tensorboard]`), written without TensorFlow: a run's
// scalars as `events.out.tfevents.*`, so `tensorboard --logdir runs/` shows aha's curves.
//
// An event file is a TFRecord stream: each record is
//   uint64 length (little-endian) · uint32 masked CRC-32C of those 8 bytes · data ·
//   uint32 masked CRC-32C of data,
// where the data is one serialized `tensorflow.Event` protobuf. The first event carries only
// `file_version: "brain.Event:2"`; each later one a `wall_time`, a `step` and a `Summary` with
// one scalar `Value{tag, simple_value}` (one event per metric per step, as PyTorch's
// SummaryWriter.add_scalar writes them). The few protobuf fields needed are encoded by hand:
//
//   message Event   { double wall_time = 1; int64 step = 2; string file_version = 3;
//                     Summary summary = 5; }
//   message Summary { repeated Value value = 1;
//                     message Value { string tag = 1; float simple_value = 2; } }

// --- CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), as TFRecord uses it.

const CRC32C_TABLE = (() => {
  const table = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ 0x82f63b78 : c >>> 1;
    table[n] = c >>> 0;
  }
  return table;
})();

export function crc32c(bytes: Uint8Array): number {
  let crc = 0xffffffff;
  for (const b of bytes) crc = CRC32C_TABLE[(crc ^ b) & 0xff] ^ (crc >>> 8);
  return (crc ^ 0xffffffff) >>> 0;
}

/** TFRecord's masked CRC: rotate right by 15 bits and add a constant (mod 2^32). */
export function maskedCrc32c(bytes: Uint8Array): number {
  const crc = crc32c(bytes);
  return ((((crc >>> 15) | (crc << 17)) >>> 0) + 0xa282ead8) >>> 0;
}

/** One TFRecord: length, its masked CRC, the data, the data's masked CRC. */
export function tfRecord(data: Uint8Array): Uint8Array {
  const out = new Uint8Array(8 + 4 + data.length + 4);
  const view = new DataView(out.buffer);
  view.setBigUint64(0, BigInt(data.length), true);
  view.setUint32(8, maskedCrc32c(out.subarray(0, 8)), true);
  out.set(data, 12);
  view.setUint32(12 + data.length, maskedCrc32c(data), true);
  return out;
}

// --- The protobuf wire format, only what Event and Summary need.

class ProtoWriter {
  private readonly bytes: number[] = [];

  private varint(value: bigint): void {
    let v = BigInt.asUintN(64, value);
    while (v >= 0x80n) {
      this.bytes.push(Number(v & 0x7fn) | 0x80);
      v >>= 7n;
    }
    this.bytes.push(Number(v));
  }

  private tag(field: number, wireType: number): void {
    this.varint(BigInt((field << 3) | wireType));
  }

  int64(field: number, value: number): this {
    this.tag(field, 0);
    this.varint(BigInt(value));
    return this;
  }

  double(field: number, value: number): this {
    this.tag(field, 1);
    const b = new Uint8Array(8);
    new DataView(b.buffer).setFloat64(0, value, true);
    this.bytes.push(...b);
    return this;
  }

  float(field: number, value: number): this {
    this.tag(field, 5);
    const b = new Uint8Array(4);
    new DataView(b.buffer).setFloat32(0, value, true);
    this.bytes.push(...b);
    return this;
  }

  message(field: number, body: Uint8Array): this {
    this.tag(field, 2);
    this.varint(BigInt(body.length));
    this.bytes.push(...body);
    return this;
  }

  string(field: number, text: string): this {
    return this.message(field, new TextEncoder().encode(text));
  }

  finish(): Uint8Array {
    return Uint8Array.from(this.bytes);
  }
}

/** The serialized Event that opens every event file. */
export function fileVersionEvent(wallTime: number): Uint8Array {
  return new ProtoWriter().double(1, wallTime).string(3, "brain.Event:2").finish();
}

/** The serialized Event of one scalar: Event{wall_time, step, summary{value{tag, simple_value}}}. */
export function scalarEvent(
  wallTime: number,
  step: number,
  tag: string,
  value: number,
): Uint8Array {
  const summaryValue = new ProtoWriter().string(1, tag).float(2, value).finish();
  const summary = new ProtoWriter().message(1, summaryValue).finish();
  return new ProtoWriter().double(1, wallTime).int64(2, step).message(5, summary).finish();
}

/** Appends scalar events to one `events.out.tfevents.*` file of a run directory. */
export class TensorBoardWriter {
  private constructor(readonly path: string, private readonly file: Deno.FsFile) {}

  /** A new event file in `dir` (named as TensorFlow names them), opened with its header. */
  static async open(dir: string, now = Date.now() / 1000): Promise<TensorBoardWriter> {
    await Deno.mkdir(dir, { recursive: true });
    const host = Deno.hostname().replace(/[^A-Za-z0-9.-]/g, "_");
    const path = `${dir}/events.out.tfevents.${Math.floor(now)}.${host}.${Deno.pid}.0`;
    const file = await Deno.open(path, { create: true, append: true });
    const writer = new TensorBoardWriter(path, file);
    await writer.write([fileVersionEvent(now)]);
    return writer;
  }

  /** One scalar event per finite value, tagged `prefix` + its key (`eval/accuracy`). */
  async scalars(
    step: number,
    values: object,
    prefix = "",
    wallTime = Date.now() / 1000,
  ): Promise<void> {
    const events: Uint8Array[] = [];
    for (const [tag, value] of Object.entries(values)) {
      if (typeof value === "number" && Number.isFinite(value)) {
        events.push(scalarEvent(wallTime, step, prefix + tag, value));
      }
    }
    await this.write(events);
  }

  private async write(events: Uint8Array[]): Promise<void> {
    const records = events.map(tfRecord);
    const all = new Uint8Array(records.reduce((n, r) => n + r.length, 0));
    let at = 0;
    for (const r of records) {
      all.set(r, at);
      at += r.length;
    }
    let written = 0;
    while (written < all.length) written += await this.file.write(all.subarray(written));
  }

  close(): void {
    this.file.close();
  }
}
