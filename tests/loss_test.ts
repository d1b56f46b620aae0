// `aha loss` on the GPU against an independent PyTorch GRPO computation
// (tests/fixtures/make_loss_golden.py): loss, advantages, gradient norm, gradients.

import assert from "node:assert/strict";
import { loadCheckpoint } from "../core/checkpoint.ts";
import { Gpu } from "../gpu/device.ts";
import { computeLoss } from "../gpu/cli_loss.ts";
import { GpuModel } from "../gpu/model.ts";
import { GpuPolicy } from "../gpu/policy.ts";

const gpu = await Gpu.open();
const ROOT = new URL("../", import.meta.url).pathname;
const CASES = `${ROOT}tests/fixtures/loss/`;

for (const entry of Deno.readDirSync(CASES)) {
  Deno.test(`aha loss matches PyTorch: ${entry.name}`, { sanitizeResources: false, sanitizeOps: false }, async () => {
    const batch = JSON.parse(Deno.readTextFileSync(`${CASES}${entry.name}/batch.json`));
    const expected = JSON.parse(Deno.readTextFileSync(`${CASES}${entry.name}/expected.json`));
    const checkpoint = await loadCheckpoint(ROOT + expected.model);
    const policy = new GpuPolicy(new GpuModel(gpu, checkpoint.config, checkpoint.weights));
    const got = await computeLoss(policy, batch);
    policy.model.destroy();
    // f32 GPU math against float64 PyTorch on the same weights.
    assert.ok(Math.abs(got.loss - expected.loss) < 1e-5, `loss ${got.loss} vs ${expected.loss}`);
    got.advantages.forEach((a, i) => assert.ok(Math.abs(a - expected.advantages[i]) < 1e-9));
    assert.ok(Math.abs(got.grad_norm - expected.grad_norm) < 1e-4 * Math.max(1, expected.grad_norm));
    assert.deepEqual(Object.keys(got.grads).sort(), Object.keys(expected.grads).sort());
    for (const [name, values] of Object.entries(expected.grads) as [string, number[]][]) {
      values.forEach((v, i) => {
        assert.ok(Math.abs(got.grads[name][i] - v) < 1e-5 + 1e-3 * Math.abs(v), `${name}[${i}]: ${got.grads[name][i]} vs ${v}`);
      });
    }
  });
}

Deno.test("aha loss rejects a malformed batch with one line naming the field", async () => {
  const dir = await Deno.makeTempDir();
  const path = `${dir}/batch.json`;
  const batch = JSON.parse(Deno.readTextFileSync(`${CASES}gqa_tied_ref/batch.json`));
  await Deno.writeTextFile(path, JSON.stringify({ ...batch, group_size: 5 }));
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", `${ROOT}main.ts`, "loss", "--model", `${ROOT}tests/fixtures/golden/gqa_tied`, "--batch", path],
    stdout: "piped",
    stderr: "piped",
  }).output();
  const stderr = new TextDecoder().decode(out.stderr).trim().split("\n").filter((l) => !l.includes("XDG"));
  assert.equal(out.code, 1);
  assert.equal(stderr.length, 1);
  assert.match(stderr[0], /batch\.json: field "group_size" must be/);
  await Deno.remove(dir, { recursive: true });
});
