// linear.wgsl: the classifier head, logits = scale * x @ w^T (no bias), f32.
// `scale` is the 1/9 temperature of the recipe, applied in the forward pass only
// (the stored weight is unscaled, so the optimiser sees the unscaled weight).
//
// forward:         y[b][o]  = scale * sum_i x[b][i] * w[o][i]        one thread per (b, o)
// backward_data:   dx[b][i] = scale * sum_o dy[b][o] * w[o][i]       one thread per (b, i)
// backward_weight: dw[o][i] = scale * sum_b dy[b][o] * x[b][i]       one thread per (o, i)
// Layouts: x [B][IN], w [OUT][IN], y and dy [B][OUT].
// Bindings: 0 uniform LinearShape, 1 x, 2 w, 3 dy, 4 out (y, dx or dw). Grid: 1-D, 2-D if large.

const WG: u32 = 256u;

struct LinearShape { batch: u32, n_in: u32, n_out: u32, scale: f32 }

@group(0) @binding(0) var<uniform> s: LinearShape;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read> dy: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(WG)
fn forward(@builtin(global_invocation_id) g: vec3u, @builtin(num_workgroups) nw: vec3u) {
  let t = g.x + g.y * nw.x * WG;
  if (t >= s.batch * s.n_out) { return; }
  let b = t / s.n_out;
  let o = t % s.n_out;
  var acc = 0.0;
  for (var i = 0u; i < s.n_in; i++) { acc = fma(x[b * s.n_in + i], w[o * s.n_in + i], acc); }
  out[t] = s.scale * acc;
}

@compute @workgroup_size(WG)
fn backward_data(@builtin(global_invocation_id) g: vec3u, @builtin(num_workgroups) nw: vec3u) {
  let t = g.x + g.y * nw.x * WG;
  if (t >= s.batch * s.n_in) { return; }
  let b = t / s.n_in;
  let i = t % s.n_in;
  var acc = 0.0;
  for (var o = 0u; o < s.n_out; o++) { acc = fma(dy[b * s.n_out + o], w[o * s.n_in + i], acc); }
  out[t] = s.scale * acc;
}

@compute @workgroup_size(WG)
fn backward_weight(@builtin(global_invocation_id) g: vec3u, @builtin(num_workgroups) nw: vec3u) {
  let t = g.x + g.y * nw.x * WG;
  if (t >= s.n_out * s.n_in) { return; }
  let o = t / s.n_in;
  let i = t % s.n_in;
  var acc = 0.0;
  for (var b = 0u; b < s.batch; b++) { acc = fma(dy[b * s.n_out + o], x[b * s.n_in + i], acc); }
  out[t] = s.scale * acc;
}
