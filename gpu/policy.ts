// The WebGPU engines the trainer uses: the policy (sampling, log-probs, gradients, AdamW) and
// the in-process reference model (frozen log-probs), both over GpuModel. A LoRA run's reference
// can be the policy's own model with its adapter switched off (GpuBaseReference).

import type {
  Completions,
  OptimizerHyper,
  PolicyEngine,
  ReferenceEngine,
  SamplingOptions,
  TokenBatch,
} from "../core/engine.ts";
import { AhaError } from "../core/errors.ts";
import { generate } from "./generate.ts";
import type { GpuModel } from "./model.ts";
import { scoreSequences } from "./score.ts";

/** Right-pad the rows into one [B, L] id array. */
function pack(batch: TokenBatch): { ids: Int32Array; B: number; L: number } {
  const B = batch.rows.length, L = Math.max(...batch.rows.map((r) => r.length));
  const ids = new Int32Array(B * L);
  batch.rows.forEach((row, b) => ids.set(row, b * L));
  return { ids, B, L };
}

/** Index in forward()'s output of the log-prob of completion token t of row b. */
function at(batch: TokenBatch, L: number, b: number, t: number): number {
  return b * L + batch.promptLens[b] - 1 + t;
}

async function completionLogprobs(model: GpuModel, batch: TokenBatch, invTemperature: number) {
  const { ids, B, L } = pack(batch);
  const logp = await model.gpu.read(model.forward(ids, B, L, invTemperature));
  return batch.rows.map((row, b) =>
    Array.from({ length: row.length - batch.promptLens[b] }, (_, t) => logp[at(batch, L, b, t)])
  );
}

export class GpuPolicy implements PolicyEngine {
  private adamStep = 0;

  constructor(readonly model: GpuModel) {}

  get description(): string {
    return this.model.gpu.description;
  }

  generate(prompts: number[][], groupSize: number, opts: SamplingOptions): Promise<Completions> {
    return generate(this.model, prompts, groupSize, opts);
  }

  completionLogprobs(batch: TokenBatch, invTemperature: number): Promise<number[][]> {
    return completionLogprobs(this.model, batch, invTemperature);
  }

  async accumulateGradients(
    batch: TokenBatch,
    invTemperature: number,
    loss: (logprobs: number[][]) => Promise<number[][]>,
  ): Promise<void> {
    const { B, L } = pack(batch);
    const dLogp = await loss(await completionLogprobs(this.model, batch, invTemperature));
    const upstream = new Float32Array(B * L);
    dLogp.forEach((row, b) => row.forEach((d, t) => upstream[at(batch, L, b, t)] = d));
    this.model.backward(upstream, invTemperature);
  }

  optimizerStep(hp: OptimizerHyper): PromiseLike<number> {
    this.adamStep++;
    const norm = this.model.adamwStep({ ...hp, step: this.adamStep });
    // The read is recorded now and the gradients cleared after it; whoever wants the norm
    // waits for it, a caller that does not (SFT) goes on recording the next step.
    const value = this.model.gpu.readLater([norm]).map(([data]) => data[0]);
    this.model.zeroGrads();
    return value;
  }

  weights(): Promise<Map<string, Float32Array>> {
    return this.model.readWeights();
  }

  async optimizerState() {
    return { step: this.adamStep, moments: await this.model.readOptimizerState() };
  }

  loadOptimizerState(state: { step: number; moments: Map<string, Float32Array> }): void {
    this.adamStep = state.step;
    this.model.loadOptimizerState(state.moments);
  }
}

/** Completion log-probs of a frozen model, scored in token-bounded batches (scoreSequences): no
 * backward buffers, bounded memory. */
async function frozenLogprobs(
  model: GpuModel,
  batch: TokenBatch,
  invTemperature: number,
  adapter: boolean,
): Promise<number[][]> {
  const logprobs = await scoreSequences(model, batch.rows, invTemperature, adapter);
  return logprobs.map((row, b) => row.slice(batch.promptLens[b] - 1));
}

/**
 * The reference of a LoRA run when it would share the policy's adapter: the base model is the
 * policy's own frozen weights with the adapter switched off, so no second copy exists. Its
 * scoring uses buffers of its own, so it may run between the policy's forward and backward.
 */
export class GpuBaseReference implements ReferenceEngine {
  constructor(readonly model: GpuModel) {}

  get description(): string {
    return `the base model in this process on "${this.model.gpu.description}", sharing the ` +
      "policy's frozen weights with the adapter switched off";
  }

  completionLogprobs(batch: TokenBatch, invTemperature: number): Promise<number[][]> {
    return frozenLogprobs(this.model, batch, invTemperature, false);
  }

  mixIn(): Promise<void> {
    throw new AhaError("sync_ref_model: the reference of a LoRA run is the frozen base model");
  }

  /** The weights belong to the policy: nothing to free. */
  close(): Promise<void> {
    return Promise.resolve();
  }
}

/** The frozen reference model in the trainer's own process, on the policy's device. */
export class GpuReference implements ReferenceEngine {
  constructor(readonly model: GpuModel) {}

  get description(): string {
    return `${this.model.gpu.description} (in-process)`;
  }

  completionLogprobs(batch: TokenBatch, invTemperature: number): Promise<number[][]> {
    return frozenLogprobs(this.model, batch, invTemperature, true);
  }

  async mixIn(policy: Map<string, Float32Array>, alpha: number): Promise<void> {
    const current = await this.model.readWeights();
    const mixed = new Map<string, Float32Array>();
    for (const [name, ref] of current) {
      const pol = policy.get(name)!;
      mixed.set(name, ref.map((r, i) => alpha * pol[i] + (1 - alpha) * r));
    }
    this.model.setWeights(mixed);
  }

  close(): Promise<void> {
    this.model.destroy();
    return Promise.resolve();
  }
}
