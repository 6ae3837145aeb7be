// loss.wgsl: label-smoothed soft-target cross-entropy, its gradient, and the test-time augmentation views combined.
//
// cross_entropy, one thread per row b < rows:
//   t'      = (1 - smoothing) * target[b] + smoothing / classes        (smoothing 0.2: 0.8 t + 0.02)
//   loss[b] = -sum_k t'_k * log_softmax(logits[b])_k
//   correct[b] = 1 if argmax logits[b] == argmax target[b] (first maximum), else 0
//   dlogits[b] = grad_scale * (softmax(logits[b]) - t')   (d(grad_scale * sum_b loss[b]) / dlogits)
//   Rows b >= valid (a partial eval batch) get loss = correct = dlogits = 0.
// tta_combine, one thread per (b, k) with b < rows: out[b][k] = the logits of the test-time augmentation's
//   views combined; view v of row b is logits[v * rows + b] (gather_eval's order, data.wgsl):
//   views 1: out = l0                                   (no TTA)
//   views 2: out = 0.5 * (l0 + l1)                      (the image and its mirror)
//   views 6: out = 0.5 * m(l0, l1) + 0.5 * 0.5 * (m(l2, l3) + m(l4, l5)),  m(a, b) = 0.5 * (a + b)
//            (airbench94's level 2: plain, then the two 1-pixel translations, each with its mirror)
// Layouts: logits, target, dlogits [rows][classes]; loss, correct [rows].
// Bindings: 0 uniform LossShape, 1 frame uniform (valid rows; struct Frame: common.wgsl), 2 logits, 3
//   target, 4 loss, 5 correct, 6 dlogits / out.

const WG: u32 = 64u;

struct LossShape { rows: u32, classes: u32, smoothing: f32, grad_scale: f32, views: u32, _p0: u32, _p1: u32, _p2: u32 }

@group(0) @binding(0) var<uniform> s: LossShape;
@group(0) @binding(1) var<uniform> frame: Frame;
@group(0) @binding(2) var<storage, read> logits: array<f32>;
@group(0) @binding(3) var<storage, read> soft_target: array<f32>;
@group(0) @binding(4) var<storage, read_write> loss: array<f32>;
@group(0) @binding(5) var<storage, read_write> correct: array<f32>;
@group(0) @binding(6) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(WG)
fn cross_entropy(@builtin(global_invocation_id) g: vec3u) {
  let b = g.x;
  if (b >= s.rows) { return; }
  let base = b * s.classes;
  if (b >= frame.valid) {
    loss[b] = 0.0;
    correct[b] = 0.0;
    for (var k = 0u; k < s.classes; k++) { out[base + k] = 0.0; }
    return;
  }
  var max_logit = logits[base];
  var arg_logit = 0u;
  var max_target = soft_target[base];
  var arg_target = 0u;
  for (var k = 1u; k < s.classes; k++) {
    if (logits[base + k] > max_logit) { max_logit = logits[base + k]; arg_logit = k; }
    if (soft_target[base + k] > max_target) { max_target = soft_target[base + k]; arg_target = k; }
  }
  var sum_exp = 0.0;
  for (var k = 0u; k < s.classes; k++) { sum_exp += exp(logits[base + k] - max_logit); }
  let log_sum = log(sum_exp);
  let uniform_part = s.smoothing / f32(s.classes);
  var l = 0.0;
  for (var k = 0u; k < s.classes; k++) {
    let t = (1.0 - s.smoothing) * soft_target[base + k] + uniform_part;
    let log_p = logits[base + k] - max_logit - log_sum;
    l -= t * log_p;
    out[base + k] = s.grad_scale * (exp(log_p) - t);
  }
  loss[b] = l;
  correct[b] = select(0.0, 1.0, arg_logit == arg_target);
}

@compute @workgroup_size(WG)
fn tta_combine(@builtin(global_invocation_id) g: vec3u) {
  let t = g.x;
  let n = s.rows * s.classes; // one view's logits
  if (t >= n) { return; }
  if (s.views == 1u) {
    out[t] = logits[t];
  } else if (s.views == 2u) {
    out[t] = 0.5 * (logits[t] + logits[n + t]);
  } else {
    let plain = 0.5 * (logits[t] + logits[n + t]);
    let up_left = 0.5 * (logits[2u * n + t] + logits[3u * n + t]);
    let down_right = 0.5 * (logits[4u * n + t] + logits[5u * n + t]);
    out[t] = 0.5 * plain + 0.5 * (0.5 * (up_left + down_right));
  }
}
