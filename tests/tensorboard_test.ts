// The TensorBoard event writer against the format's definition: CRC-32C known-answer vectors
// (RFC 3720 and the classic check value), the TFRecord framing read back byte by byte, and each
// record decoded by protobufjs with TensorFlow's own Event/Summary field numbers; then a tiny
// `aha train --dashboard` run whose event file must hold exactly its metrics.jsonl's numbers.

import assert from "node:assert/strict";
import protobuf from "protobufjs";
import { crc32c, maskedCrc32c, TensorBoardWriter } from "../core/tensorboard.ts";
import { loadTrainConfig } from "../core/train_config.ts";
import { gpuTest } from "./helpers.ts";

const MAIN = new URL("../main.ts", import.meta.url).pathname;

// tensorflow/core/util/event.proto and framework/summary.proto, the fields aha writes (and
// their neighbours, so a wrong field number decodes into the wrong field and fails).
const EVENT_PROTO = `
syntax = "proto3";
package tensorflow;
message Event {
  double wall_time = 1;
  int64 step = 2;
  oneof what {
    string file_version = 3;
    bytes graph_def = 4;
    Summary summary = 5;
  }
}
message Summary {
  message Value {
    string node_name = 7;
    string tag = 1;
    oneof value {
      float simple_value = 2;
      bytes obsolete_old_style_histogram = 3;
    }
  }
  repeated Value value = 1;
}`;

Deno.test("CRC-32C known-answer vectors", () => {
  const enc = new TextEncoder();
  assert.equal(crc32c(enc.encode("123456789")), 0xe3069283);
  assert.equal(crc32c(new Uint8Array(32)), 0x8a9136aa); // RFC 3720 B.4: 32 bytes of zeros
  assert.equal(crc32c(new Uint8Array(32).fill(0xff)), 0x62a8ab43); // 32 bytes of 0xFF
  assert.equal(crc32c(Uint8Array.from({ length: 32 }, (_, i) => i)), 0x46dd794e); // 0..31
  assert.equal(crc32c(new Uint8Array(0)), 0);
});

Deno.test("masked CRC is the rotation by 15 bits plus 0xa282ead8", () => {
  const data = new TextEncoder().encode("123456789");
  // 0xE3069283 rotated right by 15 = 0x2507C60D; + 0xA282EAD8 = 0xC78AB0E5 (mod 2^32).
  assert.equal(maskedCrc32c(data), 0xc78ab0e5);
});

interface DecodedEvent {
  wall_time: number;
  step: number;
  file_version?: string;
  summary?: { value: { tag: string; simple_value: number; node_name?: string }[] };
}

/** Every record of a TFRecord file, its two CRCs checked, decoded as a tensorflow.Event. */
function readEvents(bytes: Uint8Array): DecodedEvent[] {
  const Event = protobuf.parse(EVENT_PROTO, { keepCase: true }).root.lookupType("tensorflow.Event");
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const events: DecodedEvent[] = [];
  let at = 0;
  while (at < bytes.length) {
    assert.ok(at + 12 <= bytes.length, `truncated header at byte ${at}`);
    const length = Number(view.getBigUint64(at, true));
    assert.equal(view.getUint32(at + 8, true), maskedCrc32c(bytes.subarray(at, at + 8)));
    const data = bytes.subarray(at + 12, at + 12 + length);
    assert.equal(data.length, length, "record data truncated");
    assert.equal(view.getUint32(at + 12 + length, true), maskedCrc32c(data));
    const message = Event.decode(data);
    events.push(Event.toObject(message, { longs: Number, oneofs: false }) as DecodedEvent);
    at += 12 + length + 4;
  }
  return events;
}

Deno.test("event file: brain.Event:2 header, then one scalar event per metric per step", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const writer = await TensorBoardWriter.open(dir, 1700000000.25);
    await writer.scalars(
      1,
      { reward: 0.5, "rewards/format": 1, kl: 1e-3, note: "x" },
      "",
      1700000001.5,
    );
    await writer.scalars(2, { reward: 0.75, step_s: NaN }, "", 1700000002.5);
    await writer.scalars(5_000_000_000, { accuracy: 0.125 }, "eval/", 1700000003.5);
    writer.close();

    const names = [...Deno.readDirSync(dir)].map((e) => e.name);
    assert.equal(names.length, 1);
    assert.match(names[0], /^events\.out\.tfevents\.1700000000\./);
    const events = readEvents(await Deno.readFile(`${dir}/${names[0]}`));

    assert.equal(events[0].file_version, "brain.Event:2");
    assert.equal(events[0].wall_time, 1700000000.25);
    assert.equal(events[0].summary, undefined);
    const scalars = events.slice(1).map((e) => {
      assert.equal(e.summary!.value.length, 1);
      const v = e.summary!.value[0];
      assert.equal(v.node_name ?? "", "");
      return [e.wall_time, e.step, v.tag, v.simple_value];
    });
    assert.deepEqual(scalars, [
      [1700000001.5, 1, "reward", 0.5],
      [1700000001.5, 1, "rewards/format", 1],
      [1700000001.5, 1, "kl", Math.fround(1e-3)],
      [1700000002.5, 2, "reward", 0.75], // NaN and non-numbers are skipped
      [1700000003.5, 5_000_000_000, "eval/accuracy", 0.125], // a step past 2^32 survives int64
    ]);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test('report_to: a list of "tensorboard", or "none"; anything else is refused', () => {
  assert.deepEqual(loadTrainConfig(null, []).report_to, []);
  assert.deepEqual(loadTrainConfig(null, ["report_to=[tensorboard]"]).report_to, ["tensorboard"]);
  assert.deepEqual(loadTrainConfig(null, ["report_to=tensorboard"]).report_to, ["tensorboard"]);
  assert.deepEqual(loadTrainConfig(null, ["report_to=none"]).report_to, []);
  assert.throws(
    () => loadTrainConfig(null, ["report_to=[wandb]"]),
    /report_to" must be a list of "tensorboard", or "none", got \["wandb"\]/,
  );
});

Deno.test("aha train --dashboard with report_to: [tensorboard]", gpuTest, async () => {
  const out = await Deno.makeTempDir({ prefix: "aha-tensorboard-train-" });
  const settings = [
    `output_dir=${out}`,
    "report_to=[tensorboard]",
    "arithmetic.max_operand=19",
    "arithmetic.held_out=20",
    "eval_prompts=8",
    "prompts_per_step=2",
    "num_generations=4",
    "max_completion_length=6",
    "sft.steps=5",
    "sft.batch_size=16",
    "max_steps=3",
    "beta=0",
    "eval_steps=2",
    "sample_steps=1",
  ];
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", MAIN, "train", "--dashboard", ...settings.flatMap((s) => ["--set", s])],
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const stderr = new Response(child.stderr).text();
  let stdout = "", served: { runs: { dir: string }[] } | null = null;
  for await (const chunk of child.stdout.pipeThrough(new TextDecoderStream())) {
    stdout += chunk;
    const url = /dashboard: (http:\/\/127\.0\.0\.1:\d+\/)/.exec(stdout)?.[1];
    if (url && !served) {
      // The dashboard answers while the run is under way.
      const response = await fetch(`${url}api/update`, { method: "POST", body: "{}" });
      assert.equal(response.status, 200);
      served = await response.json();
    }
  }
  const { code } = await child.status;
  try {
    assert.equal(code, 0, await stderr);
    assert.deepEqual(served?.runs.map((r) => r.dir), [out]);

    // The event file holds exactly metrics.jsonl's and eval.jsonl's numbers, as float32.
    const readJsonl = (name: string) =>
      Deno.readTextFileSync(`${out}/${name}`).trim().split("\n").map((l) => JSON.parse(l));
    const expected: [number, string, number][] = [];
    for (const [log, prefix] of [["eval.jsonl", "eval/"], ["metrics.jsonl", ""]] as const) {
      for (const { step, time: _, ...values } of readJsonl(log)) {
        for (const [k, v] of Object.entries(values)) {
          expected.push([step, prefix + k, Math.fround(v as number)]);
        }
      }
    }
    const files = [...Deno.readDirSync(out)].filter((e) =>
      e.name.startsWith("events.out.tfevents.")
    );
    assert.equal(files.length, 1);
    const events = readEvents(await Deno.readFile(`${out}/${files[0].name}`));
    assert.equal(events[0].file_version, "brain.Event:2");
    const got = events.slice(1).map((
      e,
    ) => [e.step, e.summary!.value[0].tag, e.summary!.value[0].simple_value]);
    const order = (a: (string | number)[], b: (string | number)[]) =>
      String(a.slice(0, 2)).localeCompare(String(b.slice(0, 2)));
    assert.deepEqual(got.sort(order), expected.sort(order));
    assert.ok(expected.some(([s, tag]) => s === 3 && tag.startsWith("rewards/")));
    assert.ok(expected.some(([s, tag]) => s === 0 && tag === "eval/accuracy"));

    // The embedded default ends with its report.
    assert.match(stdout, new RegExp(`report: ${out}/report.html`));
    const html = await Deno.readTextFile(`${out}/report.html`);
    assert.match(html, /globalThis.AHA_DATA|window.AHA_DATA/);
    assert.doesNotMatch(html, /<script[^>]+src=/);
  } finally {
    await Deno.remove(out, { recursive: true });
  }
});
