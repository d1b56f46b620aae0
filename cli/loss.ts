// `aha loss`: one GRPO objective and its gradients on a given batch, without updating — for
// checking aha's loss against other implementations (tests compare it with PyTorch).

import { checkOutputPath, parseCommandArgs, required, writeOutput } from "./args.ts";
import { loadCheckpoint } from "../core/checkpoint.ts";
import { AhaError } from "../core/errors.ts";
import { loadAdapter } from "../core/lora.ts";
import { type LossBatch, lossBatchInputs } from "../core/grpo.ts";
import { Gpu, modelNeeds } from "../gpu/device.ts";
import { GpuModel } from "../gpu/model.ts";
import { resolveModel } from "../data/hub.ts";
import { GpuPolicy } from "../gpu/policy.ts";

export const help =
  `usage: aha loss --model DIR [--adapter DIR] --batch BATCH.json [--output OUT.json]

Computes one GRPO step's objective and gradients without updating the model.
BATCH.json: {"prompt_len": P, "sequences": [[ids]] (prompt + completion, all the same length,
completions right-padded with pad_id), "pad_id": N, "rewards": [..], "group_size": G,
"beta": b, "epsilon": e, "epsilon_high"?: e2, "loss_type"?: "grpo"|"bnpo"|"dr_grpo"|"dapo",
"ref_logprobs"?: [[..]], "old_logprobs"?: [[..]]} — log-prob rows hold one value per completion
token; without ref the reference is the model itself, without old logp_old = logp (detached).
Completion tokens up to and including the first pad_id (the end token) are trained on.

With --adapter DIR (a PEFT LoRA adapter of the model) only the adapter is trained: the
gradients are those of its lora_A / lora_B matrices, keyed by their PEFT tensor names.

Output: {"loss", "advantages", "grad_norm", "grads": {"<weight>": [first 8 values], ...}}`;

export async function run(args: string[]): Promise<void> {
  const { values } = parseCommandArgs("loss", args, {
    model: { type: "string" },
    adapter: { type: "string" },
    batch: { type: "string" },
    output: { type: "string" },
  });
  const modelDir = await resolveModel(required("loss", "model", values.model));
  const batchPath = required("loss", "batch", values.batch);
  if (values.output) await checkOutputPath(values.output as string);
  const checkpoint = await loadCheckpoint(modelDir);
  const lora = values.adapter === undefined
    ? undefined
    : await loadAdapter(values.adapter as string, checkpoint.config);
  const batch = readBatch(batchPath, checkpoint.config.vocabSize);
  const gpu = await Gpu.open(modelNeeds(checkpoint.config));
  const policy = new GpuPolicy(
    new GpuModel(gpu, checkpoint.config, checkpoint.weights, { lora }),
  );
  const result = await computeLoss(policy, batch);
  policy.model.destroy();
  gpu.destroy();
  checkFiniteResult(batchPath, result);
  const text = JSON.stringify(result);
  if (values.output) await writeOutput(values.output as string, text + "\n");
  else console.log(text);
}

/** The objective, advantages, gradient norm and the first 8 values of every trained tensor's
 * gradient (every weight, or a LoRA adapter's matrices). */
export async function computeLoss(policy: GpuPolicy, batch: LossBatch) {
  const { config, advantages, rows, normalizer } = lossBatchInputs(batch);
  // The loss runs on the GPU, as in training (gpu/kernels/grpo_loss.ts).
  const { sums } = await policy.accumulateGrpoGradients(
    { rows: batch.sequences, promptLens: batch.sequences.map(() => batch.prompt_len) },
    1,
    {
      rows,
      refLogp: () => Promise.resolve(batch.ref_logprobs ?? null),
      config,
      normalizer,
    },
  );
  await policy.readLossSums();
  const { loss } = await sums;
  const [gradNorm] = await policy.model.gpu.read(policy.model.gradNorm());
  const grads: Record<string, number[]> = {};
  for (const [name, g] of await policy.model.readGrads()) {
    grads[name] = Array.from(g.subarray(0, 8));
  }
  return { loss, advantages, grad_norm: gradNorm, grads };
}

/** NaN or infinity anywhere in the result is an error naming where, never a silent output. */
function checkFiniteResult(path: string, result: Awaited<ReturnType<typeof computeLoss>>): void {
  const bad = (what: string, value: number) => {
    throw new AhaError(`${path}: ${what} is ${value} (non-finite): nothing written`);
  };
  if (!Number.isFinite(result.loss)) bad("the loss", result.loss);
  if (!Number.isFinite(result.grad_norm)) bad("the gradient norm", result.grad_norm);
  result.advantages.forEach((a, i) => Number.isFinite(a) || bad(`advantages[${i}]`, a));
  for (const [name, values] of Object.entries(result.grads)) {
    values.forEach((v, i) => Number.isFinite(v) || bad(`the gradient of "${name}"[${i}]`, v));
  }
}

/** Read and check a batch file; every problem is one line naming the file and field. */
function readBatch(path: string, vocabSize: number): LossBatch {
  let json: Record<string, unknown>;
  try {
    json = JSON.parse(Deno.readTextFileSync(path));
  } catch (e) {
    throw new AhaError(
      `${path}: ${e instanceof SyntaxError ? "not valid JSON" : (e as Error).message}`,
    );
  }
  if (typeof json !== "object" || json === null || Array.isArray(json)) {
    throw new AhaError(`${path}: expected a JSON object {"prompt_len", "sequences", ...}`);
  }
  const fail = (field: string, expect: string): never => {
    throw new AhaError(`${path}: field "${field}" must be ${expect}`);
  };
  const isInt = (v: unknown) => Number.isInteger(v);
  const isNum = (v: unknown) => typeof v === "number" && Number.isFinite(v);
  const sequences = json.sequences as number[][];
  if (!Array.isArray(sequences) || sequences.length === 0) {
    fail("sequences", "a non-empty array of token-id arrays");
  }
  const S = Array.isArray(sequences[0]) ? sequences[0].length : 0;
  for (const s of sequences) {
    if (
      !Array.isArray(s) || s.length !== S || !s.every((t) => isInt(t) && t >= 0 && t < vocabSize)
    ) {
      fail("sequences", `arrays of the same length with token ids in [0, ${vocabSize})`);
    }
  }
  if (S < 2) fail("sequences", "arrays of at least 2 tokens (a prompt and a completion)");
  const P = json.prompt_len as number;
  if (!isInt(P) || P < 1 || P >= S) fail("prompt_len", `an integer in [1, ${S - 1}]`);
  if (!isInt(json.pad_id)) fail("pad_id", "an integer token id");
  const B = sequences.length;
  const G = json.group_size as number;
  if (!isInt(G) || G < 1 || B % G !== 0) {
    fail("group_size", `a positive integer dividing the ${B} sequences`);
  }
  const rewards = json.rewards as number[];
  if (!Array.isArray(rewards) || rewards.length !== B || !rewards.every(isNum)) {
    fail("rewards", `${B} numbers`);
  }
  if (!isNum(json.beta) || (json.beta as number) < 0) fail("beta", "a number ≥ 0");
  if (!isNum(json.epsilon) || (json.epsilon as number) < 0) fail("epsilon", "a number ≥ 0");
  if (json.epsilon_high !== undefined && !isNum(json.epsilon_high)) {
    fail("epsilon_high", "a number");
  }
  const lossTypes = ["grpo", "bnpo", "dr_grpo", "dapo"];
  if (json.loss_type !== undefined && !lossTypes.includes(json.loss_type as string)) {
    fail("loss_type", `one of ${lossTypes.join(", ")}`);
  }
  for (const field of ["ref_logprobs", "old_logprobs"]) {
    const rows = json[field] as number[][] | undefined;
    if (rows === undefined) continue;
    if (
      !Array.isArray(rows) || rows.length !== B ||
      !rows.every((r) => Array.isArray(r) && r.length === S - P && r.every(isNum))
    ) {
      fail(field, `${B} rows of ${S - P} numbers (one per completion token)`);
    }
  }
  return json as unknown as LossBatch;
}
