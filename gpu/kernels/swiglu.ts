// SwiGLU, the activation of Qwen2's MLP: out = silu(gate)·up elementwise, and its backward.
// silu(g) = g·σ(g); d silu/dg = σ(g)·(1 + g·(1 − σ(g))).
//
// gate and up arrive as one [T, 2·I] matrix, the fused gate/up product's output: row t holds
// token t's I gate values, then its I up values. The backward writes dGate and dUp in the same
// layout, which the fused backward product reads. out is [T, I].
//
// When I is a multiple of 4 (every real intermediate size) the buffers are bound as vec4s: on
// llvmpipe each load is a loop over the SIMD lanes, so four values per load cost about a
// quarter as much as four scalar loads; and the inputs are read through `Gpu.input`, from
// texture copies on software adapters.

import { type Gpu, grid, Tensor, vec4Input } from "../device.ts";

const WG = 256;

/**
 * The kernels over f32 values (`vec` false) or vec4s of them, whose inputs are read from
 * textures where `textures` says (vec4s only: [gateUp, dOut]).
 */
function kernels(vec: boolean, textures = [false, false]) {
  const type = vec ? "vec4f" : "f32";
  // An input's declaration at `binding` and its load of element `i`.
  const input = (binding: number, name: string, texture: boolean) =>
    vec ? { decl: vec4Input(binding, name, texture), at: (i: string) => `${name}_at(${i})` } : {
      decl: `@group(0) @binding(${binding}) var<storage, read> ${name}: array<f32>;`,
      at: (i: string) => `${name}[${i}]`,
    };
  const gateUp = input(1, "gateUp", textures[0]), dOut = input(2, "dOut", textures[1]);
  // σ(g) from exp(−|g|), which never overflows.
  const sigmoid = `
fn sigmoid(g: ${type}) -> ${type} {
  let e = exp(-abs(g));
  return select(e / (1.0 + e), 1.0 / (1.0 + e), g >= ${type}(0.0));
}`;
  // Element i of [T, I] (in vec4s when vec: I then counts vec4s), and where its gate and up are.
  const index = `
  let i = gid.x + gid.y * nwg.x * ${WG}u;
  if (i >= p.T * p.I) { return; }
  let t = i / p.I;
  let g_at = i + t * p.I;
  let u_at = g_at + p.I;`;
  const forward = `
struct Params { T: u32, I: u32 }
@group(0) @binding(0) var<uniform> p: Params;
${gateUp.decl}
@group(0) @binding(2) var<storage, read_write> result: array<${type}>;
${sigmoid}

@compute @workgroup_size(${WG})
fn main(@builtin(global_invocation_id) gid: vec3u, @builtin(num_workgroups) nwg: vec3u) {${index}
  let g = ${gateUp.at("g_at")};
  result[i] = g * sigmoid(g) * ${gateUp.at("u_at")};
}`;
  const backward = `
struct Params { T: u32, I: u32 }
@group(0) @binding(0) var<uniform> p: Params;
${gateUp.decl}
${dOut.decl}
@group(0) @binding(3) var<storage, read_write> dGateUp: array<${type}>;
${sigmoid}

@compute @workgroup_size(${WG})
fn main(@builtin(global_invocation_id) gid: vec3u, @builtin(num_workgroups) nwg: vec3u) {${index}
  let g = ${gateUp.at("g_at")};
  let u = ${gateUp.at("u_at")};
  let s = sigmoid(g);
  let d = ${dOut.at("i")};
  dGateUp[u_at] = d * g * s;
  dGateUp[g_at] = d * u * s * (1.0 + g * (1.0 - s));
}`;
  return { forward, backward };
}

const SCALAR = kernels(false);
/** The vec4 kernels by which inputs come from textures: index 2·gateUp + dOut. */
const VEC4 = [false, true].flatMap((g) => [false, true].map((d) => kernels(true, [g, d])));

/**
 * How read-only input `t` is bound: the tensor, or in the vec4 kernels its first `size` values
 * through `Gpu.input` (a texture copy on software adapters).
 */
function bound(gpu: Gpu, vec: boolean, role: string, t: Tensor, size: number) {
  const binding = vec ? gpu.input(role, t.view(0, [size])) : t;
  return { binding, texture: !(binding instanceof Tensor) };
}

/** out [T, I] = silu(gate)·up, gate and up the two halves of gateUp's rows [T, 2·I]. */
export function swiglu(gpu: Gpu, gateUp: Tensor, out: Tensor, T: number, I: number): void {
  const vec = I % 4 === 0, width = vec ? I / 4 : I;
  const g = bound(gpu, vec, "input 0", gateUp, T * 2 * I);
  const pipeline = gpu.pipeline((vec ? VEC4[2 * Number(g.texture)] : SCALAR).forward, "swiglu");
  gpu.dispatch(pipeline, grid(T * width, WG), [g.binding, out], [T, width]);
}

/** dGateUp [T, 2·I] = (dOut·up·silu'(gate), dOut·silu(gate)) row by row (overwritten). */
export function swigluBackward(
  gpu: Gpu,
  gateUp: Tensor,
  dOut: Tensor,
  dGateUp: Tensor,
  T: number,
  I: number,
): void {
  const vec = I % 4 === 0, width = vec ? I / 4 : I;
  const g = bound(gpu, vec, "input 0", gateUp, T * 2 * I);
  const d = bound(gpu, vec, "input 1", dOut, T * I);
  const k = vec ? VEC4[2 * Number(g.texture) + Number(d.texture)] : SCALAR;
  gpu.dispatch(
    gpu.pipeline(k.backward, "swigluBackward"),
    grid(T * width, WG),
    [g.binding, d.binding, dGateUp],
    [T, width],
  );
}
