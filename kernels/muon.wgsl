// muon.wgsl: the elementwise passes and norms of the Muon optimiser (main.ts muonStep, newtonSchulz), f32 with f32
// accumulation; its matrix products are matmul.wgsl's.
//
// nesterov:       buf = momentum * buf + g;  out = g + momentum * buf              (Muon's Nesterov momentum)
// sum_squares:    sums[at + w] = sum of x[i]^2 over i = w * WG + r * PARTS * WG + li (r = 0, 1, ...), for each of the
//                 PARTS workgroups w: partial sums of ||x||^2, always in the same order (the result is deterministic)
// finish_norm:    sums[at + PARTS] = sqrt(sum of sums[at .. at + PARTS)) = ||x||_F      one workgroup
// scale_by_norm:  out = x / (||x|| + eps)        the Newton-Schulz input: its largest singular value is then <= 1
// renorm_step:    p = p * (norm_to / ||p||) - frame.muon_lr * x     the weight renormalised to norm `norm_to`, then the
//                 update x (= NS(g')) taken with the step's learning rate; ||p|| is the norm before this pass
// Layouts: x, out, p, g and buf are flat arrays of `len` floats. sums: a small scratch buffer holding one slot of
// PARTS + 1 floats (partials, then the norm) per norm in use; `at` is the slot's first index. Nothing is read back:
// the norm stays on the GPU for the passes after it.
// Bindings: 0 uniform MuonShape, 1 frame uniform (struct Frame: common.wgsl), 2 x (g for nesterov), 3 out (p for
// renorm_step), 4 buf, 5 sums. Grid: 1-D over len, 2-D if large; [PARTS] for sum_squares; [1] for finish_norm.

const WG: u32 = 256u;
const PARTS: u32 = 64u; // workgroups of sum_squares: enough to spread a 256 x 2304 matrix over a GPU's cores

struct MuonShape { len: u32, at: u32, momentum: f32, eps: f32, norm_to: f32, _p0: u32, _p1: u32, _p2: u32 }

@group(0) @binding(0) var<uniform> s: MuonShape;
@group(0) @binding(1) var<uniform> frame: Frame;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(4) var<storage, read_write> buf: array<f32>;
@group(0) @binding(5) var<storage, read_write> sums: array<f32>;

@compute @workgroup_size(WG)
fn nesterov(@builtin(global_invocation_id) g: vec3u, @builtin(num_workgroups) nw: vec3u) {
  let i = g.x + g.y * nw.x * WG;
  if (i >= s.len) { return; }
  let m = s.momentum * buf[i] + x[i];
  buf[i] = m;
  out[i] = x[i] + s.momentum * m;
}

var<workgroup> partial: array<f32, WG>;

// Sums partial[0..WG) into partial[0] (a tree, in a fixed order); every thread of the workgroup must call it.
fn workgroup_sum(li: u32) {
  workgroupBarrier();
  for (var half = WG / 2u; half > 0u; half /= 2u) {
    if (li < half) { partial[li] += partial[li + half]; }
    workgroupBarrier();
  }
}

@compute @workgroup_size(WG)
fn sum_squares(@builtin(workgroup_id) w: vec3u, @builtin(local_invocation_index) li: u32) {
  var acc = 0.0;
  for (var i = w.x * WG + li; i < s.len; i += PARTS * WG) { acc = fma(x[i], x[i], acc); }
  partial[li] = acc;
  workgroup_sum(li);
  if (li == 0u) { sums[s.at + w.x] = partial[0]; }
}

@compute @workgroup_size(WG)
fn finish_norm(@builtin(local_invocation_index) li: u32) {
  var acc = 0.0;
  if (li < PARTS) { acc = sums[s.at + li]; }
  partial[li] = acc;
  workgroup_sum(li);
  if (li == 0u) { sums[s.at + PARTS] = sqrt(partial[0]); }
}

@compute @workgroup_size(WG)
fn scale_by_norm(@builtin(global_invocation_id) g: vec3u, @builtin(num_workgroups) nw: vec3u) {
  let i = g.x + g.y * nw.x * WG;
  if (i >= s.len) { return; }
  out[i] = x[i] / (sums[s.at + PARTS] + s.eps);
}

@compute @workgroup_size(WG)
fn renorm_step(@builtin(global_invocation_id) g: vec3u, @builtin(num_workgroups) nw: vec3u) {
  let i = g.x + g.y * nw.x * WG;
  if (i >= s.len) { return; }
  // no epsilon, as the original: a conv filter's norm is never 0 (dirac and uniform init, renormalised each step)
  out[i] = out[i] * (s.norm_to / sums[s.at + PARTS]) - frame.muon_lr * x[i];
}
