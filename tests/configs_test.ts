// The ready configs in configs/: each loads and validates, keeps the seed's hyperparameters, and
// names a model whose shape `aha plan` knows without the weights.

import assert from "node:assert/strict";
import { builtinShape } from "../core/plan.ts";
import { loadTrainConfig } from "../core/train_config.ts";

const dir = new URL("../configs/", import.meta.url).pathname;
const files = [...Deno.readDirSync(dir)].map((e) => e.name).filter((n) => n.endsWith(".yaml"))
  .sort();

Deno.test("the Qwen2.5 GSM8K configs are all there, with LoRA and without", () => {
  for (const size of ["0.5b", "1.5b", "3b", "7b"]) {
    for (const name of [`qwen2.5-${size}-gsm8k.yaml`, `qwen2.5-${size}-gsm8k-lora.yaml`]) {
      assert.ok(files.includes(name), `configs/${name}`);
    }
  }
});

for (const file of files) {
  Deno.test(`configs/${file} loads with the seed's hyperparameters`, () => {
    const cfg = loadTrainConfig(dir + file, []);
    assert.equal(cfg.beta, 0.04);
    assert.equal(cfg.epsilon, 0.2);
    assert.equal(cfg.num_generations, 8);
    // LoRA trains few parameters at a higher rate, on all seven projections (trl's r and alpha),
    // over a bf16 base with checkpointing; full fine-tuning keeps the seed's 1e-6.
    if (file.endsWith("-lora.yaml")) {
      assert.equal(cfg.learning_rate, 2e-5);
      assert.deepEqual(cfg.lora, {
        r: 16,
        alpha: 32,
        target_modules: [
          "q_proj",
          "k_proj",
          "v_proj",
          "o_proj",
          "gate_proj",
          "up_proj",
          "down_proj",
        ],
        use_rslora: false,
        dropout: 0,
      });
      assert.equal(cfg.frozen_dtype, "bf16");
      assert.equal(cfg.gradient_checkpointing, true);
    } else {
      assert.equal(cfg.learning_rate, 1e-6);
      assert.equal(cfg.lora, null);
    }
    assert.equal(cfg.temperature, 0.9);
    assert.equal(cfg.max_completion_length, 700);
    assert.deepEqual(cfg.reward_funcs, ["format", "correctness"]);
    assert.equal(cfg.dataset.answer_extractor, "gsm8k");
    assert.ok(
      cfg.model !== null && builtinShape(cfg.model) !== null,
      `${cfg.model}: a known shape`,
    );
  });
}
