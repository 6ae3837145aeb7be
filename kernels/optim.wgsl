// optim.wgsl: SGD with Nesterov momentum and coupled weight decay (PyTorch's SGD), and the
// weight EMA, each over the flat parameter buffer in one dispatch.
//
// State layout (floats, see `layoutState` in main.ts):
//   [0, n_weights)            conv and linear weights   (group 1: lr_weights, wd_weights)
//   [n_weights, whiten_bias_end)  the whitening bias, where a recipe has one (lr_whiten_bias, wd_biases)
//   [whiten_bias_end, n_trainable)  batch-norm shifts    (group 2: lr_biases,  wd_biases)
//   [n_trainable, n_copy)     batch-norm running means and variances (not trained, EMA'd)
//   [n_copy, n_total)         frozen: batch-norm scales and the whitening conv
// sgd_nesterov, i < n_trainable:  g = grad + wd * p;  m = momentum * m + g;  p -= lr * (g + momentum * m)
// ema_update,   i < n_total:      e = d * e + (1 - d) * p;  and if i < n_copy: p = e  (copy back)
// A dispatch covers the indices [base, end) of the state (all of the range, or one slice of it when the
// buffer is larger than one binding); the bound arrays start at index base.
// Bindings: 0 uniform OptimShape, 1 frame uniform (lr per group, ema decay; common.wgsl), 2 params
//   (read_write), 3 grads, 4 momentum buffer, 5 ema. Grid: 1-D over the range, 2-D if large.

const WG: u32 = 256u;

struct OptimShape {
  n_weights: u32, n_trainable: u32, n_copy: u32, n_total: u32,
  wd_weights: f32, wd_biases: f32, momentum: f32, base: u32,
  end: u32, whiten_bias_end: u32, _p1: u32, _p2: u32,
}

@group(0) @binding(0) var<uniform> s: OptimShape;
@group(0) @binding(1) var<uniform> frame: Frame;
@group(0) @binding(2) var<storage, read_write> params: array<f32>;
@group(0) @binding(3) var<storage, read> grads: array<f32>;
@group(0) @binding(4) var<storage, read_write> momentum_buf: array<f32>;
@group(0) @binding(5) var<storage, read_write> ema: array<f32>;

@compute @workgroup_size(WG)
fn sgd_nesterov(@builtin(global_invocation_id) g: vec3u, @builtin(num_workgroups) nw: vec3u) {
  let j = g.x + g.y * nw.x * WG; // index into the bound slice
  let i = s.base + j; // index into the state
  if (i >= s.end) { return; }
  let is_weight = i < s.n_weights;
  let lr = select(select(frame.lr_biases, frame.lr_whiten_bias, i < s.whiten_bias_end), frame.lr_weights, is_weight);
  let wd = select(s.wd_biases, s.wd_weights, is_weight);
  let p = params[j];
  let grad = grads[j] + wd * p;
  let m = s.momentum * momentum_buf[j] + grad;
  momentum_buf[j] = m;
  params[j] = p - lr * (grad + s.momentum * m);
}

@compute @workgroup_size(WG)
fn ema_update(@builtin(global_invocation_id) g: vec3u, @builtin(num_workgroups) nw: vec3u) {
  let j = g.x + g.y * nw.x * WG;
  let i = s.base + j;
  if (i >= s.end) { return; }
  let e = frame.ema_decay * ema[j] + (1.0 - frame.ema_decay) * params[j];
  ema[j] = e;
  if (i < s.n_copy) { params[j] = e; }
}
