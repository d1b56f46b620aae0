// The WebGPU engines the trainer uses: the policy (sampling, log-probs, gradients, AdamW) and
// the in-process reference model (frozen log-probs), both over GpuModel. A LoRA run's reference
// can be the policy's own model with its adapter switched off (GpuBaseReference).

import {
  type Completions,
  type GrpoLossInputs,
  onCpu,
  type OptimizerHyper,
  type PolicyEngine,
  type ReferenceEngine,
  type SamplingOptions,
  type TokenBatch,
} from "../core/engine.ts";
import { AhaError } from "../core/errors.ts";
import { type LossSums, tokenWeight } from "../core/grpo.ts";
import type { Tensor } from "./device.ts";
import { generate } from "./generate.ts";
import {
  grpoLoss,
  placeReference,
  ROW_FLOATS,
  SUM_FLOATS,
  TOKEN_FLOATS,
} from "./kernels/grpo_loss.ts";
import { type GpuModel, packedPositions, tailPositions, worthSharing } from "./model.ts";
import { GpuHeldLogprobs, heldScores } from "./score.ts";

/**
 * A batch's training forward, in whichever layout costs fewer tokens: each group's prompt shared
 * (GpuModel.forwardShared; a GRPO batch's samples of one prompt), the rows packed end to end
 * (GpuModel.forwardPacked; rows of unequal lengths, as a supervised batch's), or the rows joined,
 * right-padded to [B, L] (log-probs from the shortest prompt's last token on). `at(b, t)` is
 * where the log-prob of completion token t of row b lies in `logp`, whose first T positions the
 * layout uses; backward() takes dLoss/dlogp in the same layout.
 */
function trainingForward(
  model: GpuModel,
  batch: TokenBatch,
  invTemperature: number,
  share: boolean,
  pack: boolean,
): { logp: Tensor; T: number; at: (b: number, t: number) => number } {
  const B = batch.rows.length;
  const shared = share ? worthSharing(batch.rows, batch.promptLens) : null;
  if (shared) {
    const L = tailPositions(shared.tails);
    const logp = model.forwardShared(shared, invTemperature);
    return { logp, T: B * L, at: (b, t) => b * L + t };
  }
  const L = Math.max(...batch.rows.map((r) => r.length));
  // The vocabulary projection of the joined layout starts at the shortest prompt's last token;
  // the packed layout runs it everywhere.
  const first = Math.min(...batch.promptLens) - 1;
  const packedL = packedLength(batch.rows);
  const { layer, head } = tokenCost(model);
  if (pack && packedL * (layer + head) < B * L * layer + B * (L - first) * head) {
    const starts: number[] = [];
    batch.rows.reduce((start, row) => (starts.push(start), start + packedPositions(row)), 0);
    const logp = model.forwardPacked(batch.rows, packedL, invTemperature);
    return { logp, T: packedL, at: (b, t) => starts[b] + batch.promptLens[b] - 1 + t };
  }
  const ids = new Int32Array(B * L);
  batch.rows.forEach((row, b) => ids.set(row, b * L));
  const logp = model.forward(ids, B, L, invTemperature, true, true, first);
  return { logp, T: B * L, at: (b, t) => b * L + batch.promptLens[b] - 1 + t };
}

/**
 * Positions a packed batch takes: its rows' positions (packedPositions: each row's tokens but its
 * last) rounded up to an eighth of their power of two (the default's 128 rows of 1,098 tokens:
 * 970 → 1,024), so that batches of about the same size share one set of buffers (GpuModel keeps
 * the last shape's), for at most 1/8 padding.
 */
function packedLength(rows: number[][]): number {
  const total = Math.max(1, rows.reduce((n, row) => n + packedPositions(row), 0));
  const step = 2 ** Math.max(0, Math.floor(Math.log2(total)) - 3);
  return Math.ceil(total / step) * step;
}

/**
 * A position's multiply-adds through the layers' products and through the vocabulary projection
 * (at Qwen2.5-0.5B's shapes, about 2.6:1), to weigh the layouts.
 */
function tokenCost(model: GpuModel): { layer: number; head: number } {
  const c = model.config, q = c.numHeads * c.headDim, kv = c.numKvHeads * c.headDim;
  const H = c.hiddenSize, perLayer = H * (q + 2 * kv) + q * H + 3 * H * c.intermediateSize;
  return { layer: c.numLayers * perLayer, head: H * c.vocabSize };
}

/** Each row's completion log-probs, from a trainingForward's values read back. */
function completionValues(
  batch: TokenBatch,
  values: Float32Array,
  at: (b: number, t: number) => number,
): number[][] {
  return batch.rows.map((row, b) =>
    Array.from({ length: row.length - batch.promptLens[b] }, (_, t) => values[at(b, t)])
  );
}

export class GpuPolicy implements PolicyEngine {
  private adamStep = 0;
  /** This step's GRPO loss sums on the GPU, read with the optimizer step's gradient norm. */
  private stepSums: { sums: Tensor; rows: number; arrive: (sums: LossSums) => void }[] = [];

  /** `sharePrompts` or `packRows` false: never that layout (tests compare the layouts). */
  constructor(
    readonly model: GpuModel,
    readonly sharePrompts = true,
    readonly packRows = true,
  ) {}

  get description(): string {
    return this.model.gpu.description;
  }

  generate(prompts: number[][], groupSize: number, opts: SamplingOptions): Promise<Completions> {
    return generate(this.model, prompts, groupSize, opts);
  }

  async completionLogprobs(batch: TokenBatch, invTemperature: number): Promise<number[][]> {
    const { logp, at } = this.forward(batch, invTemperature);
    return completionValues(batch, await this.model.gpu.read(logp), at);
  }

  private forward(batch: TokenBatch, invTemperature: number) {
    return trainingForward(this.model, batch, invTemperature, this.sharePrompts, this.packRows);
  }

  async accumulateGradients(
    batch: TokenBatch,
    invTemperature: number,
    loss: (logprobs: number[][]) => Promise<number[][]>,
  ): Promise<void> {
    const { logp, T, at } = this.forward(batch, invTemperature);
    const dLogp = await loss(completionValues(batch, await this.model.gpu.read(logp), at));
    const upstream = new Float32Array(T);
    dLogp.forEach((row, b) => row.forEach((d, t) => upstream[at(b, t)] = d));
    this.model.backward(upstream, invTemperature);
  }

  /**
   * The GRPO loss on the GPU (gpu/kernels/grpo_loss.ts): the forward's log-probs never come
   * back to the CPU, and the sums arrive with the next optimizerStep's read.
   */
  async accumulateGrpoGradients(
    batch: TokenBatch,
    invTemperature: number,
    loss: GrpoLossInputs,
  ): Promise<{ sums: PromiseLike<LossSums> }> {
    const gpu = this.model.gpu, B = batch.rows.length;
    const { logp, T, at } = this.forward(batch, invTemperature);
    gpu.flush(); // the forward runs while the reference's log-probs are awaited
    const held = await loss.refLogp();
    // Log-probs an in-process reference left on this GPU stay there; others come to the CPU.
    const onGpu = held instanceof GpuHeldLogprobs && held.gpu === gpu ? held : null;
    const ref = held && !onGpu ? await onCpu(held) : null;
    const refFrom = onGpu ? new Int32Array(T).fill(-1) : null;
    const tokens = new Float32Array(T * TOKEN_FLOATS);
    const rows = new Float32Array(B * ROW_FLOATS);
    loss.rows.forEach((row, b) => {
      const rowTokens = row.mask.reduce((n, m) => n + m, 0);
      rows.set(
        [row.advantage, tokenWeight(loss.normalizer, rowTokens), at(b, 0), row.mask.length],
        b * ROW_FLOATS,
      );
      row.mask.forEach((m, t) => {
        const i = at(b, t) * TOKEN_FLOATS;
        tokens[i] = ref ? ref[b][t] : 0;
        if (refFrom) refFrom[at(b, t)] = onGpu!.rows[b].at + t;
        tokens[i + 1] = row.oldLogp ? row.oldLogp[t] : 0;
        tokens[i + 2] = m;
      });
    });
    // Kept across calls: a write is ordered after the work already recorded (the last loss).
    const tokensT = gpu.scratch("grpo loss tokens", tokens.length);
    const rowsT = gpu.scratch("grpo loss rows", rows.length);
    gpu.write(tokensT, tokens);
    gpu.write(rowsT, rows);
    if (onGpu && refFrom) {
      const fromT = gpu.scratch("grpo loss reference positions", refFrom.length);
      gpu.write(fromT, refFrom);
      placeReference(gpu, onGpu.values, fromT, tokensT, T);
    }
    // Each micro-batch's sums have a buffer of their own until the next read records its copy.
    const sums = gpu.scratch(`grpo loss sums ${this.stepSums.length}`, B * SUM_FLOATS);
    grpoLoss(gpu, logp, tokensT, rowsT, this.model.lossGradient(), sums, B, {
      beta: loss.config.beta,
      epsilon: loss.config.epsilon,
      epsilonHigh: loss.config.epsilonHigh,
      hasOld: loss.rows.some((r) => r.oldLogp !== null),
      hasRef: held !== null,
    });
    this.model.backward("written", invTemperature);
    gpu.flush(); // the backward runs while the caller records what comes next
    return { sums: new Promise((arrive) => this.stepSums.push({ sums, rows: B, arrive })) };
  }

  optimizerStep(hp: OptimizerHyper): PromiseLike<number> {
    this.adamStep++;
    const norm = this.model.adamwStep({ ...hp, step: this.adamStep });
    // The read is recorded now and the gradients cleared after it; whoever wants the norm
    // waits for it, a caller that does not (SFT) goes on recording the next step. The step's
    // GRPO loss sums come with it.
    const value = this.readWithSums([norm]).map(([data]) => data[0]);
    this.model.zeroGrads();
    return value;
  }

  optimizerStepUnread(hp: OptimizerHyper): void {
    this.adamStep++;
    this.model.adamwStep({ ...hp, step: this.adamStep });
    this.model.zeroGrads();
  }

  /** Read the GRPO loss sums not yet read (`aha loss`, which takes no optimizer step). */
  async readLossSums(): Promise<void> {
    await this.readWithSums([]);
  }

  /** Read `tensors` and every pending loss sum in one go; each sum adds up its rows in order. */
  private readWithSums(tensors: Tensor[]) {
    const stepSums = this.stepSums;
    this.stepSums = [];
    return this.model.gpu.readLater([...tensors, ...stepSums.map((s) => s.sums)]).map(
      (values) => {
        stepSums.forEach(({ rows, arrive }, i) => {
          const data = values[tensors.length + i];
          const total: LossSums = { loss: 0, klSum: 0, clippedTokens: 0, tokens: 0, logpSum: 0 };
          for (let at = 0; at < rows * SUM_FLOATS; at += SUM_FLOATS) {
            total.loss += data[at];
            total.klSum += data[at + 1];
            total.clippedTokens += data[at + 2];
            total.tokens += data[at + 3];
            total.logpSum += data[at + 4];
          }
          arrive(total);
        });
        return values.slice(0, tensors.length);
      },
    );
  }

  weights(): Promise<Map<string, Float32Array>> {
    return this.model.readWeights();
  }

  /** What a save writes, read back from the GPU a batch at a time as it asks for each tensor:
   * the trained weights, and the optimizer's step count and moments. */
  forSaving() {
    return {
      weights: this.model.reader("weights"),
      optimizer: { step: this.adamStep, moments: this.model.reader("moments") },
    };
  }

  loadOptimizerState(state: { step: number; moments: ReadonlyMap<string, Float32Array> }): void {
    this.adamStep = state.step;
    this.model.loadOptimizerState(state.moments);
  }
}

/**
 * Completion log-probs of a frozen model, scored in token-bounded batches (scoreSequences): no
 * backward buffers, bounded memory. Left on the GPU (`heldScores`) for the policy's loss.
 */
function frozenLogprobs(
  model: GpuModel,
  batch: TokenBatch,
  invTemperature: number,
  adapter: boolean,
): GpuHeldLogprobs {
  const from = batch.promptLens.map((n) => n - 1);
  return heldScores(model, batch.rows, invTemperature, adapter, from);
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
    return frozenLogprobs(this.model, batch, invTemperature, false).read();
  }

  heldLogprobs(batch: TokenBatch, invTemperature: number): Promise<GpuHeldLogprobs> {
    return Promise.resolve(frozenLogprobs(this.model, batch, invTemperature, false));
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
    return frozenLogprobs(this.model, batch, invTemperature, true).read();
  }

  heldLogprobs(batch: TokenBatch, invTemperature: number): Promise<GpuHeldLogprobs> {
    return Promise.resolve(frozenLogprobs(this.model, batch, invTemperature, true));
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
