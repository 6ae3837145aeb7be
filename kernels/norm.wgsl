// norm.wgsl: batch normalisation over the rows of an NHWC tensor seen as x[rows][C]
// (rows = B*H*W), and the exact GELU that follows every batch norm of the network, alone or fused
// into the norm's elementwise passes. Arithmetic in f32. Scale `weight` is applied (fixed at 1 in
// the recipe), shift `bias` is trained.
//
// Training statistics, in two passes so that no sum of squares loses precision:
//   stats_partial:   per (row chunk z, channel c): count, mean, M2 = sum (x - mean)^2 -> part[z*C + c]
//                    Grid: x = ceil(C / WG_C), y = chunks (of the bound slice; z counts from chunk_base).
//   stats_finalize:  per channel: merge the chunks (Chan et al.), stats[c] = (mean, 1/sqrt(var + eps))
//                    with the biased variance; running_mean/var = (1 - momentum) * running +
//                    momentum * batch (unbiased variance for running_var, as PyTorch).
//   eval_stats:      per channel: stats[c] = (running_mean, 1/sqrt(running_var + eps)).
//   apply:           y = n = (x - mean) * invstd * weight[c] + bias[c]     (elementwise, 1-D grid)
//   apply_gelu:      y = gelu(n): batch norm then GELU in one pass; n is never stored
// Backward (xhat = (x - mean) * invstd; g = dL/dn):
//   backward_partial: per (z, c): sum g and sum g * xhat over the chunk -> part[z*C + c]
//   backward_finalize: per c: dbias[c] = sum g, dweight[c] = sum g * xhat
//   backward_apply:   dx = weight * invstd * (g - dbias/rows - xhat * dweight/rows)
//   *_gelu:           the same with dy = dL/dgelu(n) bound: g = dy * gelu'(n), n recomputed from x
// GELU alone (after the whitening conv): gelu_forward y = gelu(x); gelu_backward dx = dy * gelu'(x).
//   gelu(v) = v * Phi(v), Phi the standard normal CDF (erf form, as PyTorch's default nn.GELU), and
//   gelu'(v) = Phi(v) + v * phi(v). WGSL has no erf: erf_approx has absolute error < 1.5e-7
//   (Abramowitz & Stegun 7.1.26).
// Bindings: 0 uniform NormShape, 1 x, 2 dy, 3 stats (vec2 per channel), 4 weight, 5 bias,
//   6 running_mean, 7 running_var, 8 part (vec4 per chunk and channel), 9 out (y or dx),
//   10 dbias, 11 dweight. The GELU-alone kernels use count, x, dy and out.

const WG: u32 = 256u;  // elementwise kernels
const WG_C: u32 = 64u; // per-channel kernels: one thread per channel (and chunk)
const INV_SQRT2: f32 = 0.7071067811865476;
const INV_SQRT_2PI: f32 = 0.3989422804014327;

// rows, count: rows and elements of the bound x (one batch slice, or the whole batch); batch_rows: rows of
// the whole batch (backward_apply's mean); chunks: all chunks in part (the finalize kernels); chunk_base:
// the first chunk this slice's partial kernels write (a batch too large for one binding runs in slices).
struct NormShape {
  rows: u32, c: u32, rows_per_chunk: u32, chunks: u32,
  momentum: f32, eps: f32, count: u32, chunk_base: u32,
  batch_rows: u32, _p0: u32, _p1: u32, _p2: u32,
}

// Storage element types: f32, or f16 for a binding that main.ts binds to an f16 tensor (--precision
// f16: it compiles this file with `enable f16;` and that alias set to f16). Loads convert to f32 and
// stores back, so all arithmetic and accumulation stays f32.
alias X_T = f32;
alias DY_T = f32;
alias OUT_T = f32;

@group(0) @binding(0) var<uniform> s: NormShape;
@group(0) @binding(1) var<storage, read> x: array<X_T>;
@group(0) @binding(2) var<storage, read> dy: array<DY_T>;
@group(0) @binding(3) var<storage, read_write> stats: array<vec2f>;
@group(0) @binding(4) var<storage, read> weight: array<f32>;
@group(0) @binding(5) var<storage, read> bias: array<f32>;
@group(0) @binding(6) var<storage, read_write> running_mean: array<f32>;
@group(0) @binding(7) var<storage, read_write> running_var: array<f32>;
@group(0) @binding(8) var<storage, read_write> part: array<vec4f>;
@group(0) @binding(9) var<storage, read_write> out: array<OUT_T>;
@group(0) @binding(10) var<storage, read_write> dbias: array<f32>;
@group(0) @binding(11) var<storage, read_write> dweight: array<f32>;

@compute @workgroup_size(WG_C)
fn stats_partial(@builtin(global_invocation_id) g: vec3u) {
  let c = g.x;
  let z = g.y;
  if (c >= s.c) { return; }
  let r0 = z * s.rows_per_chunk;
  let r1 = min(r0 + s.rows_per_chunk, s.rows);
  var sum = 0.0;
  for (var r = r0; r < r1; r++) { sum += f32(x[r * s.c + c]); }
  let n = f32(r1 - r0);
  let mean = sum / max(n, 1.0);
  var m2 = 0.0;
  for (var r = r0; r < r1; r++) {
    let d = f32(x[r * s.c + c]) - mean;
    m2 += d * d;
  }
  part[(s.chunk_base + z) * s.c + c] = vec4f(n, mean, m2, 0.0);
}

@compute @workgroup_size(WG_C)
fn stats_finalize(@builtin(global_invocation_id) g: vec3u) {
  let c = g.x;
  if (c >= s.c) { return; }
  var n = 0.0;
  var mean = 0.0;
  var m2 = 0.0;
  for (var z = 0u; z < s.chunks; z++) {
    let p = part[z * s.c + c];
    if (p.x == 0.0) { continue; }
    let total = n + p.x;
    let delta = p.y - mean;
    mean += delta * p.x / total;
    m2 += p.z + delta * delta * n * p.x / total;
    n = total;
  }
  let var_biased = m2 / n;
  stats[c] = vec2f(mean, inverseSqrt(var_biased + s.eps));
  let var_unbiased = m2 / max(n - 1.0, 1.0);
  running_mean[c] = (1.0 - s.momentum) * running_mean[c] + s.momentum * mean;
  running_var[c] = (1.0 - s.momentum) * running_var[c] + s.momentum * var_unbiased;
}

@compute @workgroup_size(WG_C)
fn eval_stats(@builtin(global_invocation_id) g: vec3u) {
  let c = g.x;
  if (c >= s.c) { return; }
  stats[c] = vec2f(running_mean[c], inverseSqrt(running_var[c] + s.eps));
}

// erf(v / sqrt 2) given e = exp(-v^2 / 2), which gelu_grad also needs for phi(v): one exp for both.
fn erf_approx(v: f32, e: f32) -> f32 {
  let t = 1.0 / (1.0 + 0.3275911 * abs(v) * INV_SQRT2);
  let poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))));
  return sign(v) * (1.0 - poly * e);
}

fn gelu(v: f32) -> f32 { return v * 0.5 * (1.0 + erf_approx(v, exp(-0.5 * v * v))); }

fn gelu_grad(v: f32) -> f32 {
  let e = exp(-0.5 * v * v);
  return 0.5 * (1.0 + erf_approx(v, e)) + v * INV_SQRT_2PI * e;
}

// Element i's normalised value xhat, and dL/dn: dy itself, or through the fused GELU dy * gelu'(n).
fn xhat_at(i: u32, c: u32) -> f32 {
  let st = stats[c];
  return (f32(x[i]) - st.x) * st.y;
}

fn grad_at(i: u32, c: u32, xhat: f32, fused_gelu: bool) -> f32 {
  if (fused_gelu) { return f32(dy[i]) * gelu_grad(xhat * weight[c] + bias[c]); }
  return f32(dy[i]);
}

fn apply_at(i: u32, fused_gelu: bool) {
  if (i >= s.count) { return; }
  let c = i % s.c;
  let n = xhat_at(i, c) * weight[c] + bias[c];
  var y = n;
  if (fused_gelu) { y = gelu(n); }
  out[i] = OUT_T(y);
}

@compute @workgroup_size(WG)
fn apply(@builtin(global_invocation_id) g: vec3u, @builtin(num_workgroups) nw: vec3u) {
  apply_at(g.x + g.y * nw.x * WG, false);
}

@compute @workgroup_size(WG)
fn apply_gelu(@builtin(global_invocation_id) g: vec3u, @builtin(num_workgroups) nw: vec3u) {
  apply_at(g.x + g.y * nw.x * WG, true);
}

fn backward_partial_at(c: u32, z: u32, fused_gelu: bool) {
  if (c >= s.c) { return; }
  let r0 = z * s.rows_per_chunk;
  let r1 = min(r0 + s.rows_per_chunk, s.rows);
  var sum_g = 0.0;
  var sum_g_xhat = 0.0;
  for (var r = r0; r < r1; r++) {
    let i = r * s.c + c;
    let xhat = xhat_at(i, c);
    let gr = grad_at(i, c, xhat, fused_gelu);
    sum_g += gr;
    sum_g_xhat += gr * xhat;
  }
  part[(s.chunk_base + z) * s.c + c] = vec4f(sum_g, sum_g_xhat, 0.0, 0.0);
}

@compute @workgroup_size(WG_C)
fn backward_partial(@builtin(global_invocation_id) g: vec3u) {
  backward_partial_at(g.x, g.y, false);
}

@compute @workgroup_size(WG_C)
fn backward_partial_gelu(@builtin(global_invocation_id) g: vec3u) {
  backward_partial_at(g.x, g.y, true);
}

@compute @workgroup_size(WG_C)
fn backward_finalize(@builtin(global_invocation_id) g: vec3u) {
  let c = g.x;
  if (c >= s.c) { return; }
  var sum_g = 0.0;
  var sum_g_xhat = 0.0;
  for (var z = 0u; z < s.chunks; z++) {
    let p = part[z * s.c + c];
    sum_g += p.x;
    sum_g_xhat += p.y;
  }
  dbias[c] = sum_g;
  dweight[c] = sum_g_xhat;
}

fn backward_apply_at(i: u32, fused_gelu: bool) {
  if (i >= s.count) { return; }
  let c = i % s.c;
  let xhat = xhat_at(i, c);
  let n = f32(s.batch_rows);
  out[i] = OUT_T(weight[c] * stats[c].y * (grad_at(i, c, xhat, fused_gelu) - dbias[c] / n - xhat * dweight[c] / n));
}

@compute @workgroup_size(WG)
fn backward_apply(@builtin(global_invocation_id) g: vec3u, @builtin(num_workgroups) nw: vec3u) {
  backward_apply_at(g.x + g.y * nw.x * WG, false);
}

@compute @workgroup_size(WG)
fn backward_apply_gelu(@builtin(global_invocation_id) g: vec3u, @builtin(num_workgroups) nw: vec3u) {
  backward_apply_at(g.x + g.y * nw.x * WG, true);
}

@compute @workgroup_size(WG)
fn gelu_forward(@builtin(global_invocation_id) g: vec3u, @builtin(num_workgroups) nw: vec3u) {
  let i = g.x + g.y * nw.x * WG;
  if (i >= s.count) { return; }
  out[i] = OUT_T(gelu(f32(x[i])));
}

@compute @workgroup_size(WG)
fn gelu_backward(@builtin(global_invocation_id) g: vec3u, @builtin(num_workgroups) nw: vec3u) {
  let i = g.x + g.y * nw.x * WG;
  if (i >= s.count) { return; }
  out[i] = OUT_T(f32(dy[i]) * gelu_grad(f32(x[i])));
}
