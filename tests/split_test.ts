// Weights larger than one storage binding, kept as row slices (gpu/model.ts). First the pieces
// against plain TypeScript: matmul on column blocks of wider matrices, and the embedding over row
// slices. Then, with the binding limit forced low so that the embedding, lm_head, MLP and query
// weights split into uneven slices, the model must compute what the same model kept whole
// computes: log-probs, every gradient, an AdamW step, greedy generation; and its weights and
// optimizer state must read back, and save, exactly as the whole model's.
//
// Tolerances: a sum over a split dimension adds each slice's terms onto the previous slices' sum;
// slices of a multiple of 4 rows keep the order of the matmul's 4-term steps, and on lavapipe the
// results come out bit for bit equal, but the gradient norm groups its partial sums per tensor
// and another compiler may contract differently per kernel variant. So: 2e-6 on log-probs, 1e-5
// of the largest entry on gradients and moments, 1e-6 on weights after a step.

import assert from "node:assert/strict";
import { initWeights } from "../core/init.ts";
import { type ModelConfig, parseModelConfig, toHfConfig } from "../core/model_config.ts";
import { Rng } from "../core/rng.ts";
import { defaultTrainConfig } from "../core/train_config.ts";
import { saveTrainingCheckpoint } from "../core/train_state.ts";

import { embedding, embeddingBackward } from "../gpu/kernels/embedding.ts";
import { generate } from "../gpu/generate.ts";
import { passTokens, PREFILL_BATCH_TOKENS, SCORE_BATCH_TOKENS } from "../core/plan.ts";
import { Tensor } from "../gpu/device.ts";
import { scoreSequences } from "../gpu/score.ts";
import { matmul, PAIRED_K_MIN } from "../gpu/kernels/matmul.ts";
import { GpuModel } from "../gpu/model.ts";
import { assertClose, gpuTest, openGpu, randoms } from "./helpers.ts";

const gpu = await openGpu();

Deno.test("matmul reads a and writes out as column blocks of wider matrices", gpuTest, async () => {
  // [M, N, K], the blocks' first columns (4: vec4 bindings where the shape allows; 3: scalar).
  // The last is long enough for the blocked kernel's blocks of 16 rows to pair their steps along
  // k (pairedSteps), here with a read one scalar at a time.
  const cases = [[7, 8, 12, 4], [5, 5, 9, 3], [33, 12, 1, 3], [20, 12, PAIRED_K_MIN + 8, 3]];
  for (const [M, N, K, first] of cases) {
    // NT as in linear(), NN and TN as in its backward: a is the block of columns
    // [first, first + width) of a matrix 7 columns wider; so is out. Both kernels.
    const layouts: [boolean, boolean][] = [[false, true], [false, false], [true, false]];
    for (const [transA, transB] of layouts) {
      for (const kernel of ["blocked", "tiled"] as const) {
        const aRows = transA ? K : M, aWidth = transA ? M : K, aStride = aWidth + 7;
        const outStride = N + 7, bias = transB ? randoms(outStride, 1) : undefined;
        const a = randoms(aRows * aStride, 2),
          b = randoms(K * N, 3),
          prior = randoms(M * outStride, 4);
        const out = gpu.upload(prior);
        matmul(gpu, gpu.upload(a), gpu.upload(b), out, { M, N, K }, {
          transA,
          transB,
          accumulate: !transB,
          bias: bias && gpu.upload(bias),
          aBlock: { stride: aStride, first },
          outBlock: { stride: outStride, first },
          kernel,
          block: kernel === "blocked" && K >= PAIRED_K_MIN
            ? { rowGroups: 4, colGroups: 2 }
            : undefined,
        });
        const want = Float64Array.from(prior);
        for (let m = 0; m < M; m++) {
          for (let n = 0; n < N; n++) {
            let s = transB ? bias![first + n] : prior[m * outStride + first + n];
            for (let k = 0; k < K; k++) {
              const av = transA ? a[k * aStride + first + m] : a[m * aStride + first + k];
              s += av * (transB ? b[n * K + k] : b[k * N + n]);
            }
            want[m * outStride + first + n] = s;
          }
        }
        // Terms below 1 in size: within 1e-5 for sums of at most 14, 1e-4 for the long ones.
        // Outside the block: untouched.
        assertClose(
          await gpu.read(out),
          want,
          K > 14 ? 1e-4 : 1e-5,
          0,
          `[${M},${N},${K}] ${transA} ${transB} ${kernel}`,
        );
      }
    }
  }
});

Deno.test("the embedding over row slices equals the whole table's", gpuTest, async () => {
  const V = 13, H = 6, T = 40, rows = [5, 5, 3];
  const ids = Int32Array.from(randoms(T, 5), (x) => Math.floor((x + 1) / 2 * V));
  ids[0] = V - 1;
  const table = randoms(V * H, 6), dOut = gpu.upload(randoms(T * H, 7));
  let first = 0;
  const slices = rows.map((n) => gpu.upload(table.slice(first * H, (first += n) * H), [n, H]));
  const out = gpu.zeros([T, H]);
  embedding(gpu, gpu.upload(ids), slices, out, T);
  const got = await gpu.read(out);
  ids.forEach((id, t) =>
    assert.deepEqual(got.subarray(t * H, t * H + H), table.subarray(id * H, id * H + H))
  );
  // The backward sums each id's positions in the same order either way: equal bit for bit.
  for (const accumulate of [false, true]) {
    const whole = gpu.upload(table, [V, H]);
    embeddingBackward(gpu, ids, dOut, whole, accumulate);
    first = 0;
    const parts = rows.map((n) => gpu.upload(table.slice(first * H, (first += n) * H), [n, H]));
    embeddingBackward(gpu, ids, dOut, parts, accumulate);
    const joined = (await gpu.readMany(parts)).flatMap((p) => [...p]);
    assert.deepEqual(joined, [...await gpu.read(whole)], `accumulate ${accumulate}`);
  }
});

// vocab 101 and a 2 KiB binding: the embedding and lm_head are kept as six slices of 16 rows
// and one of 5, gate and up as four of 16 and one of 8, down as eight of 4, q as two of 16.
const MAX_BYTES = 2048;

function config(tied: boolean): ModelConfig {
  return parseModelConfig({
    vocab_size: 101,
    hidden_size: 32,
    intermediate_size: 72,
    num_hidden_layers: 2,
    num_attention_heads: 4,
    num_key_value_heads: 2,
    tie_word_embeddings: tied,
  });
}

function randomWeights(c: ModelConfig, seed: number): Map<string, Float32Array> {
  const weights = initWeights(c, seed), rng = new Rng(seed);
  for (const [name, w] of weights) {
    for (let i = 0; i < w.length; i++) {
      w[i] = name.endsWith("norm.weight") ? 1 + 0.2 * rng.normal() : 0.2 * rng.normal();
    }
  }
  return weights;
}

/** The same weights on a model kept whole and on one split at MAX_BYTES. */
function models(c: ModelConfig, weights: Map<string, Float32Array>) {
  const logitChunkFloats = 64 * c.vocabSize; // 64-token chunks: the batch below takes two
  const whole = new GpuModel(gpu, c, weights, { logitChunkFloats });
  const split = new GpuModel(gpu, c, weights, { logitChunkFloats, maxBindingBytes: MAX_BYTES });
  const slices = (name: string) => split.params.get(name)!.map((t) => t.shape[0]);
  assert.deepEqual(slices("model.embed_tokens.weight"), [16, 16, 16, 16, 16, 16, 5]);
  if (!c.tieWordEmbeddings) {
    assert.deepEqual(slices("lm_head.weight"), slices("model.embed_tokens.weight"));
  }
  assert.deepEqual(slices("model.layers.1.mlp.gate_proj.weight"), [16, 16, 16, 16, 8]);
  assert.deepEqual(slices("model.layers.1.mlp.down_proj.weight"), new Array(8).fill(4));
  assert.deepEqual(slices("model.layers.0.self_attn.q_proj.weight"), [16, 16]);
  assert.deepEqual(slices("model.layers.0.self_attn.k_proj.weight"), [16]);
  return { whole, split };
}

/** |got − want| ≤ tol·max|want| for every weight's values. */
function assertMapsClose(
  got: Map<string, Float32Array>,
  want: Map<string, Float32Array>,
  tol: number,
  what: string,
) {
  assert.deepEqual([...got.keys()], [...want.keys()]);
  for (const [name, w] of want) {
    const scale = Math.max(...w.map(Math.abs));
    assertClose(got.get(name)!, w, tol * scale + 1e-12, 0, `${what} ${name}`);
  }
}

for (const tied of [true, false]) {
  const c = config(tied), label = tied ? "tied" : "untied";

  Deno.test(
    `split weights (${label}): log-probs, gradients and an AdamW step`,
    gpuTest,
    async () => {
      const { whole, split } = models(c, randomWeights(c, tied ? 1 : 2));
      const rng = new Rng(3), B = 2, L = 37;
      const ids = Int32Array.from({ length: B * L }, () => rng.int(c.vocabSize));
      ids[0] = c.vocabSize - 1; // the last row of the last slice
      const dLogp = Float32Array.from(
        { length: B * L },
        (_, t) => t % L < L - 1 ? rng.normal() : 0,
      );
      const run = async (model: GpuModel) => {
        const logp = await gpu.read(model.forward(ids, B, L));
        model.backward(dLogp);
        const grads = await model.readGrads();
        model.adamwStep({
          lr: 1e-2,
          beta1: 0.9,
          beta2: 0.999,
          eps: 1e-8,
          weightDecay: 0.1,
          step: 1,
          maxGradNorm: 1,
        });
        return {
          logp,
          grads,
          weights: await model.readWeights(),
          moments: await model.readOptimizerState(),
        };
      };
      const want = await run(whole), got = await run(split);
      assertClose(got.logp, want.logp, 2e-6, 0, "logp");
      assertMapsClose(got.grads, want.grads, 1e-5, "gradient");
      assertMapsClose(got.moments, want.moments, 1e-5, "moment");
      // The step moves each weight by about lr = 1e-2; 1e-6 of the weight's scale is far less.
      assertMapsClose(got.weights, want.weights, 1e-6, "weight after AdamW");
      whole.destroy();
      split.destroy();
    },
  );

  Deno.test(`split weights (${label}): greedy generation`, gpuTest, async () => {
    const { whole, split } = models(c, randomWeights(c, tied ? 4 : 5));
    const sampling = { temperature: 0, topP: 1, topK: 0, maxNewTokens: 8, eosIds: [], seed: 1 };
    const prompts = [[1, 100, 7], [99], [3, 4, 5, 6, 7, 8, 9]];
    const want = await generate(whole, prompts, 1, sampling);
    const got = await generate(split, prompts, 1, sampling);
    assert.deepEqual(got.tokens, want.tokens);
    got.logprobs.forEach((row, i) => assertClose(row, want.logprobs[i], 2e-6, 0, `row ${i}`));
    whole.destroy();
    split.destroy();
  });
}

Deno.test(
  "split weights read back, load optimizer state and save byte-identically",
  gpuTest,
  async () => {
    const c = config(false), weights = randomWeights(c, 6), rng = new Rng(7);
    const moments = new Map<string, Float32Array>();
    for (const [name, w] of weights) {
      moments.set(`${name}.exp_avg`, randoms(w.length, rng));
      moments.set(`${name}.exp_avg_sq`, randoms(w.length, rng).map(Math.abs));
    }
    const { whole, split } = models(c, weights);
    assert.deepEqual(await split.readWeights(), weights);
    const saved: Record<string, Uint8Array>[] = [];
    for (const model of [whole, split]) {
      model.loadOptimizerState(moments);
      const dir = await Deno.makeTempDir();
      const state = {
        step: 1,
        adam_step: 1,
        sampler: { epoch: 0, position: 0, rng: "0" },
        reference_model: "r",
      };
      await saveTrainingCheckpoint(
        dir,
        toHfConfig(c),
        await model.readWeights(),
        await model.readOptimizerState(),
        state,
        defaultTrainConfig(),
      );
      const files: Record<string, Uint8Array> = {};
      for (const entry of Deno.readDirSync(dir)) {
        files[entry.name] = Deno.readFileSync(
          `${dir}/${entry.name}`,
        );
      }
      saved.push(files);
      await Deno.remove(dir, { recursive: true });
      model.destroy();
    }
    assert.deepEqual(Object.keys(saved[1]).sort(), [
      "config.json",
      "model.safetensors",
      "optimizer.safetensors",
      "train_config.yaml",
      "trainer_state.json",
    ]);
    assert.deepEqual(saved[1], saved[0]);
  },
);

Deno.test(
  "scoring and prefill passes bind at most one binding's bytes, with the same results",
  gpuTest,
  async () => {
    // 64 KiB bindings: a pass over this model (the SwiGLU output's 72 floats a token are its
    // widest buffer bound whole) holds 227 tokens (core/plan.ts passTokens). So 8 sequences of
    // 60 tokens score in passes of three, and 8 prompts of 60 prefill three at a time. One pass
    // of 480 tokens would bind 123 KB of fused q/k/v here (the SwiGLU output, 138 KB, is read
    // through a texture copy on a software adapter, as storage elsewhere).
    const c = config(true), weights = randomWeights(c, 5), maxBindingBytes = 64 * 1024;
    assert.equal(passTokens(c, maxBindingBytes, SCORE_BATCH_TOKENS), 227);
    assert.equal(passTokens(c, maxBindingBytes, PREFILL_BATCH_TOKENS), 227);
    const logitChunkFloats = 64 * c.vocabSize; // 64-token logit chunks: 26 KB
    const whole = new GpuModel(gpu, c, weights, { logitChunkFloats });
    const bounded = new GpuModel(gpu, c, weights, { logitChunkFloats, maxBindingBytes });
    const rng = new Rng(6);
    const sequences = Array.from(
      { length: 8 },
      () => Array.from({ length: 60 }, () => rng.int(c.vocabSize)),
    );
    // The largest storage binding of any dispatch while `body` runs.
    const widestBinding = async <T>(body: () => Promise<T>): Promise<[T, number]> => {
      const dispatch = gpu.dispatch;
      let widest = 0;
      gpu.dispatch = (...args: Parameters<typeof dispatch>) => {
        for (const t of args[2]) if (t instanceof Tensor) widest = Math.max(widest, t.bytes);
        return dispatch.apply(gpu, args);
      };
      try {
        return [await body(), widest];
      } finally {
        gpu.dispatch = dispatch;
      }
    };
    const [scores, scoreBinding] = await widestBinding(() => scoreSequences(bounded, sequences));
    assert.ok(scoreBinding <= maxBindingBytes, `scoring bound ${scoreBinding} bytes`);
    const want = await scoreSequences(whole, sequences);
    scores.forEach((row, i) => assertClose(row, want[i], 1e-5, 1e-5, `sequence ${i}`));
    const opts = { temperature: 0, topP: 1, topK: 0, maxNewTokens: 3, eosIds: [], seed: 1 };
    const [sampled, prefillBinding] = await widestBinding(() =>
      generate(bounded, sequences, 2, opts)
    );
    assert.ok(prefillBinding <= maxBindingBytes, `generation bound ${prefillBinding} bytes`);
    assert.deepEqual(sampled.tokens, (await generate(whole, sequences, 2, opts)).tokens);
    whole.destroy();
    bounded.destroy();
  },
);
