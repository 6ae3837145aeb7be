// reduce.wgsl: sums for the conv weight gradient and for the per-epoch metrics.
//
// sum_splits:        out[i] = sum over z < splits of part[z * len + i]   (split-K partials of conv.wgsl),
//   or out[i] += that sum with `accumulate` (a batch run in slices adds each slice's partials in turn).
//   Bindings: 0 uniform ReduceShape, 1 part (read), 2 out. Grid: 1-D over len (2-D if large).
// accumulate_metrics: one workgroup adds sum(loss[0..rows)) and sum(correct[0..rows)) into
//   metrics[2*slot] and metrics[2*slot + 1]. Rows a kernel masked out hold zeros.
//   Bindings: 0 uniform ReduceShape, 3 loss, 4 correct, 5 metrics (read_write).
// flag_nonfinite: one workgroup; if any loss[0..rows) is NaN or infinite, flags[slot] =
//   min(flags[slot], frame.step): the first bad step, found without reading anything back.
//   Bindings: 0 uniform ReduceShape, 3 loss, 6 flags (the metrics buffer as atomics), 7 frame
//   (struct Frame: common.wgsl).

const WG: u32 = 256u;

struct ReduceShape { len: u32, splits: u32, rows: u32, slot: u32, accumulate: u32, _p0: u32, _p1: u32, _p2: u32 }

@group(0) @binding(0) var<uniform> s: ReduceShape;
@group(0) @binding(1) var<storage, read> part: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(3) var<storage, read> loss: array<f32>;
@group(0) @binding(4) var<storage, read> correct: array<f32>;
@group(0) @binding(5) var<storage, read_write> metrics: array<f32>;
@group(0) @binding(7) var<uniform> frame: Frame;
@group(0) @binding(6) var<storage, read_write> flags: array<atomic<u32>>;

@compute @workgroup_size(WG)
fn sum_splits(@builtin(global_invocation_id) g: vec3u, @builtin(num_workgroups) nw: vec3u) {
  let i = g.x + g.y * nw.x * WG;
  if (i >= s.len) { return; }
  var acc = 0.0;
  for (var z = 0u; z < s.splits; z++) { acc += part[z * s.len + i]; }
  if (s.accumulate == 1u) {
    out[i] += acc;
  } else {
    out[i] = acc;
  }
}

var<workgroup> sum_loss: array<f32, WG>;
var<workgroup> sum_correct: array<f32, WG>;

@compute @workgroup_size(WG)
fn accumulate_metrics(@builtin(local_invocation_index) li: u32) {
  var l = 0.0;
  var c = 0.0;
  for (var r = li; r < s.rows; r += WG) {
    l += loss[r];
    c += correct[r];
  }
  sum_loss[li] = l;
  sum_correct[li] = c;
  workgroupBarrier();
  for (var half = WG / 2u; half > 0u; half /= 2u) {
    if (li < half) {
      sum_loss[li] += sum_loss[li + half];
      sum_correct[li] += sum_correct[li + half];
    }
    workgroupBarrier();
  }
  if (li == 0u) {
    metrics[2u * s.slot] += sum_loss[0];
    metrics[2u * s.slot + 1u] += sum_correct[0];
  }
}

var<workgroup> any_bad: atomic<u32>;

@compute @workgroup_size(WG)
fn flag_nonfinite(@builtin(local_invocation_index) li: u32) {
  for (var r = li; r < s.rows; r += WG) {
    // exponent bits all ones: NaN or infinity (a bit test, which fast-math cannot fold away)
    if ((bitcast<u32>(loss[r]) & 0x7f800000u) == 0x7f800000u) { atomicStore(&any_bad, 1u); }
  }
  workgroupBarrier();
  if (li == 0u && atomicLoad(&any_bad) == 1u) { atomicMin(&flags[s.slot], frame.step); }
}
