// `aha ref-worker` (internal): parses the options the trainer starts the reference process with
// and hands them to reference/worker.ts, which owns the process's whole life.

import { intOption, parseCommandArgs, required } from "./args.ts";
import { UsageError } from "../core/errors.ts";
import { serveReference } from "../reference/worker.ts";
import type { FrozenDtype } from "../core/half.ts";

export const help =
  `usage: aha ref-worker --model DIR --channel DIR [--engine webgpu|onnx] [--onnx FILE]
                      [--weights FILE] [--threads N] [--frozen-dtype auto|bf16|f16|f32]

(internal) The reference model's process, started by "aha train": loads the checkpoint in DIR
(or its weights from --weights FILE), reports its adapter on stdout, then answers one JSON
request per line on stdin, exchanging tensors as files in the --channel directory. The webgpu
engine stores the weight matrices as --frozen-dtype says (auto: each tensor's checkpoint dtype).`;

export async function run(args: string[]): Promise<void> {
  const { values } = parseCommandArgs("ref-worker", args, {
    model: { type: "string" },
    channel: { type: "string" },
    engine: { type: "string", default: "webgpu" },
    onnx: { type: "string" },
    weights: { type: "string" },
    threads: { type: "string" },
    "frozen-dtype": { type: "string", default: "auto" },
  });
  const frozenDtype = values["frozen-dtype"];
  if (!["auto", "bf16", "f16", "f32"].includes(frozenDtype)) {
    throw new UsageError(
      `ref-worker: --frozen-dtype must be auto, bf16, f16 or f32, got "${frozenDtype}"`,
    );
  }
  const engine = values.engine;
  if (engine !== "webgpu" && engine !== "onnx") {
    throw new UsageError(`ref-worker: --engine must be webgpu or onnx, got "${engine}"`);
  }
  await serveReference({
    modelDir: required("ref-worker", "model", values.model),
    channelDir: required("ref-worker", "channel", values.channel),
    engine,
    onnxPath: values.onnx,
    weightsFile: values.weights,
    frozenDtype: frozenDtype as FrozenDtype,
    threads: values.threads === undefined
      ? undefined
      : intOption("ref-worker", "threads", values.threads, 1),
  });
}
