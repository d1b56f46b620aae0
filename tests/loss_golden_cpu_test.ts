// `aha loss` on the CPU: core/grpo.ts with the float64 CPU twin's forward and backward must
// reproduce the golden cases that tests/fixtures/make_loss_golden.py computed independently in
// PyTorch (loss, advantages, global gradient norm, the first values of every weight's gradient).

import assert from "node:assert/strict";
import { loadCheckpoint } from "../core/checkpoint.ts";
import { cpuForwardBackward, cpuLogprobs } from "../core/cpu_model.ts";
import { type LossBatch, lossBatchObjective } from "../core/grpo.ts";

const ROOT = new URL("../", import.meta.url).pathname;
const CASES = `${ROOT}tests/fixtures/loss/`;
const TOLERANCE = 1e-9; // both sides are float64 from the same stored weights

interface Expected {
  model: string;
  loss: number;
  advantages: number[];
  grad_norm: number;
  grads: Record<string, number[]>;
}

function assertClose(actual: number, expected: number, what: string) {
  const ok = Math.abs(actual - expected) <= TOLERANCE * Math.max(1, Math.abs(expected));
  assert.ok(ok, `${what}: ${actual} vs ${expected}`);
}

const caseNames = [...Deno.readDirSync(CASES)].filter((e) => e.isDirectory).map((e) => e.name);

Deno.test("loss golden cases exist", () => assert.ok(caseNames.length >= 3));

for (const name of caseNames.sort()) {
  Deno.test(`aha loss on the CPU twin matches PyTorch: ${name}`, async () => {
    const batch: LossBatch = JSON.parse(await Deno.readTextFile(`${CASES}${name}/batch.json`));
    const expected: Expected = JSON.parse(await Deno.readTextFile(`${CASES}${name}/expected.json`));
    const { config, weights } = await loadCheckpoint(ROOT + expected.model);
    const P = batch.prompt_len;
    // The completion token at position P + t is predicted by the logits at position P − 1 + t.
    const logp = cpuLogprobs(config, weights, batch.sequences).map((row) => row.slice(P - 1));
    const { loss, dLogp, advantages } = lossBatchObjective(batch, logp);
    const dLogprobs = dLogp.map((row) => [...new Array(P - 1).fill(0), ...row]);
    const { grads } = cpuForwardBackward(config, weights, batch.sequences, dLogprobs);

    assertClose(loss, expected.loss, "loss");
    expected.advantages.forEach((a, i) => assertClose(advantages[i], a, `advantage ${i}`));
    let squares = 0;
    for (const g of grads.values()) for (const v of g) squares += v * v;
    assertClose(Math.sqrt(squares), expected.grad_norm, "grad_norm");
    assert.deepEqual([...grads.keys()].sort(), Object.keys(expected.grads).sort());
    for (const [weight, values] of Object.entries(expected.grads)) {
      values.forEach((v, k) => assertClose(grads.get(weight)![k], v, `${weight}[${k}]`));
    }
  });
}
