// The GRPO loss on the GPU: from the policy's per-position log-probs (the forward's output), it
// writes d(loss)/d(logp) where backward() starts, and per-row sums of the loss, the KL, the
// clipped and the counted tokens, and of the log-probs themselves (supervised fine-tuning's
// loss is the GRPO loss's gradient with A = 1 and no KL; its value is −Σ logp / tokens). A training step then needs no GPU→CPU round trip between its
// forward and its backward; the sums are read whenever the caller next waits.
//
// core/grpo.ts `grpoLoss` is the definition and the CPU twin (tests/grpo_loss_test.ts compares
// them). Its f64 arithmetic becomes f32 here; the per-row token weight (which depends on the
// whole batch's masks) is computed on the CPU by the same `tokenWeight` and passed in.
//
// One invocation per row walks the row's completion positions, wherever the forward's layout put
// them (rows joined, prompts shared, or packed): a few rows of a few hundred tokens, so the
// kernel is tiny next to the forward; its point is the round trip it removes. Positions no row
// claims keep the zero gradient `grpoLoss` clears them to. The
// reference's log-probs come in `tokens` from the CPU, or, when an in-process reference left
// them on the GPU, `placeReference` copies them into `tokens` there (no round trip either).

import { type Gpu, grid, type Tensor } from "../device.ts";

const WG = 64;

/** Per position j of a row: 4 floats (reference log-prob, sampler's log-prob, mask, unused). */
export const TOKEN_FLOATS = 4;
/** Per row: advantage, token weight, its first completion log-prob's position, completion length. */
export const ROW_FLOATS = 4;
/** Per row out: loss, KL sum, clipped tokens, tokens; Σ logp over the counted tokens, 3 unused. */
export const SUM_FLOATS = 8;

const GRPO_LOSS = /* wgsl */ `
struct Params { B: u32, hasOld: u32, hasRef: u32, beta: f32, epsilon: f32, epsilonHigh: f32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> logp: array<f32>;
@group(0) @binding(2) var<storage, read> tokens: array<vec4f>;
@group(0) @binding(3) var<storage, read> rows: array<vec4f>;
@group(0) @binding(4) var<storage, read_write> dLogp: array<f32>;
@group(0) @binding(5) var<storage, read_write> sums: array<vec4f>;

@compute @workgroup_size(${WG})
fn main(@builtin(global_invocation_id) gid: vec3u, @builtin(num_workgroups) nwg: vec3u) {
  let b = gid.x + gid.y * nwg.x * ${WG}u;
  if (b >= p.B) { return; }
  let row = rows[b];
  let A = row.x;
  let weight = row.y;
  let first = u32(row.z);
  let count = u32(row.w);
  var loss = 0.0;
  var kl = 0.0;
  var clipped = 0.0;
  var counted = 0.0;
  var logpSum = 0.0;
  for (var i = first; i < first + count; i++) {
    let token = tokens[i];
    // Masked positions (after the end token) get no gradient.
    if (token.z == 0.0) { continue; }
    counted += 1.0;
    let lp = logp[i];
    logpSum += lp;
    // Surrogate: ρA while unclipped (dρ/dlogp = ρ), the constant clip(ρ)A once clipped.
    var ratio = 1.0;
    if (p.hasOld == 1u) { ratio = exp(lp - token.y); }
    let isClipped = (ratio < 1.0 - p.epsilon && A < 0.0) || (ratio > 1.0 + p.epsilonHigh && A > 0.0);
    if (isClipped) { clipped += 1.0; }
    let clippedRatio = clamp(ratio, 1.0 - p.epsilon, 1.0 + p.epsilonHigh);
    var tokenLoss = -min(ratio * A, clippedRatio * A);
    var grad = select(-ratio * A, 0.0, isClipped);
    // KL penalty: d/dlogp [exp(ref − logp) − (ref − logp) − 1] = 1 − exp(ref − logp).
    if (p.hasRef == 1u) {
      let diff = token.x - lp;
      let k = exp(diff) - diff - 1.0;
      kl += k;
      tokenLoss += p.beta * k;
      grad += p.beta * (1.0 - exp(diff));
    }
    loss += weight * tokenLoss;
    dLogp[i] = weight * grad;
  }
  sums[2u * b] = vec4f(loss, kl, clipped, counted);
  sums[2u * b + 1u] = vec4f(logpSum, 0.0, 0.0, 0.0);
}`;

export interface GrpoLossHyper {
  beta: number;
  epsilon: number;
  epsilonHigh: number;
  /** Whether `tokens` carries the sampler's log-probs (else ρ = 1) and the reference's (else no KL). */
  hasOld: boolean;
  hasRef: boolean;
}

/**
 * dLogp and sums [B·SUM_FLOATS] for B rows from logp, tokens [·TOKEN_FLOATS] (both by position,
 * as dLogp) and rows [B·ROW_FLOATS] (see the constants above); dLogp is zero wherever no row's
 * completion is.
 */
export function grpoLoss(
  gpu: Gpu,
  logp: Tensor,
  tokens: Tensor,
  rows: Tensor,
  dLogp: Tensor,
  sums: Tensor,
  B: number,
  hp: GrpoLossHyper,
): void {
  gpu.clear(dLogp);
  gpu.dispatch(
    gpu.pipeline(GRPO_LOSS, "grpo loss"),
    grid(B, WG),
    [logp, tokens, rows, dLogp, sums],
    [B, hp.hasOld ? 1 : 0, hp.hasRef ? 1 : 0],
    [hp.beta, hp.epsilon, hp.epsilonHigh],
  );
}

// tokens[i].x = values[source[i]] wherever source[i] ≥ 0 (one invocation per position).
const PLACE_REFERENCE = /* wgsl */ `
struct Params { n: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> values: array<f32>;
@group(0) @binding(2) var<storage, read> source: array<i32>;
@group(0) @binding(3) var<storage, read_write> tokens: array<vec4f>;

@compute @workgroup_size(${WG})
fn main(@builtin(global_invocation_id) gid: vec3u, @builtin(num_workgroups) nwg: vec3u) {
  let i = gid.x + gid.y * nwg.x * ${WG}u;
  if (i >= p.n) { return; }
  let at = source[i];
  if (at >= 0) { tokens[i].x = values[at]; }
}`;

/**
 * The reference's log-prob of each of n positions into `tokens` (its TOKEN_FLOATS slot 0) from
 * `values` on the GPU: position i takes values[source[i]], or keeps its own where source[i] < 0.
 */
export function placeReference(
  gpu: Gpu,
  values: Tensor,
  source: Tensor,
  tokens: Tensor,
  n: number,
): void {
  gpu.dispatch(gpu.pipeline(PLACE_REFERENCE, "place reference"), grid(n, WG), [
    values,
    source,
    tokens,
  ], [n]);
}
