// Elementwise arithmetic on f32 vectors of n values: the residual add out = a + b. (The LoRA
// branch's factor s = alpha / r is applied by its product, `MatmulOptions.scale`.)

import { type Gpu, grid, type Tensor } from "../device.ts";

const WG = 256;

const ADD = /* wgsl */ `
struct Params { n: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> sum: array<f32>;

@compute @workgroup_size(${WG})
fn main(@builtin(global_invocation_id) gid: vec3u, @builtin(num_workgroups) nwg: vec3u) {
  let i = gid.x + gid.y * nwg.x * ${WG}u;
  if (i >= p.n) { return; }
  sum[i] = a[i] + b[i];
}`;

/** out = a + b over the first n values. */
export function add(gpu: Gpu, a: Tensor, b: Tensor, out: Tensor, n: number): void {
  gpu.dispatch(gpu.pipeline(ADD, "add"), grid(n, WG), [a, b, out], [n]);
}
