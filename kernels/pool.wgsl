// pool.wgsl: max pooling, NHWC f32.
//
// maxpool2_forward:   y[b,oy,ox,c] = max of x[b, 2oy+dy, 2ox+dx, c] over dy, dx in {0,1};
//                     Ho = floor(H/2), Wo = floor(W/2) (an odd last row/column is dropped).
// maxpool2_backward:  dx[b,iy,ix,c] = dy[b,iy/2,ix/2,c] if (iy,ix) is the first maximum of its
//                     window (row-major order), else 0 (also 0 for dropped rows/columns).
// maxpool2_unpool:    the backward of conv.wgsl's forward_pool (a conv fused with maxpool2_forward):
//                     dx[b,iy,ix,c] = dy[b,iy/2,ix/2,c] if argmax names (iy%2, ix%2) as the window's
//                     maximum, else 0 (also 0 for dropped rows/columns); the same values as
//                     maxpool2_backward, read from 1 byte per window instead of its 4 inputs.
// global_max_forward: y[b,c] = max over all (iy,ix) of x[b,iy,ix,c]   (Ho = Wo = 1)
// global_max_backward: dx[b,iy,ix,c] = dy[b,c] at the first maximum (row-major), else 0.
// Bindings: 0 uniform PoolShape, 1 x [B][H][W][C], 2 dy [B][Ho][Wo][C] (backward only),
//   3 out (y or dx), 4 argmax (unpool only): u32 [B][Ho][Wo][ceil(C/4)], byte c%4 of word c/4 =
//   2 * (row in the window) + column. Grid: 1-D over outputs (forward) or inputs (backward), 2-D if large.

const WG: u32 = 256u;

struct PoolShape { batch: u32, h: u32, w: u32, c: u32, ho: u32, wo: u32, count: u32, _p0: u32 }

// Storage element types: f32, or f16 for a binding that main.ts binds to an f16 tensor (--precision
// f16: it compiles this file with `enable f16;` and that alias set to f16). Loads convert to f32 and
// stores back, so all arithmetic and accumulation stays f32.
alias X_T = f32;
alias DY_T = f32;
alias OUT_T = f32;

@group(0) @binding(0) var<uniform> s: PoolShape;
@group(0) @binding(1) var<storage, read> x: array<X_T>;
@group(0) @binding(2) var<storage, read> dy: array<DY_T>;
@group(0) @binding(3) var<storage, read_write> out: array<OUT_T>;
@group(0) @binding(4) var<storage, read> argmax: array<u32>;

fn at(b: u32, iy: u32, ix: u32, c: u32) -> f32 { return f32(x[((b * s.h + iy) * s.w + ix) * s.c + c]); }

@compute @workgroup_size(WG)
fn maxpool2_forward(@builtin(global_invocation_id) g: vec3u, @builtin(num_workgroups) nw: vec3u) {
  let i = g.x + g.y * nw.x * WG;
  if (i >= s.count) { return; }
  let c = i % s.c;
  let ox = (i / s.c) % s.wo;
  let oy = (i / (s.c * s.wo)) % s.ho;
  let b = i / (s.c * s.wo * s.ho);
  let y0 = 2u * oy;
  let x0 = 2u * ox;
  out[i] = OUT_T(max(max(at(b, y0, x0, c), at(b, y0, x0 + 1u, c)), max(at(b, y0 + 1u, x0, c), at(b, y0 + 1u, x0 + 1u, c))));
}

@compute @workgroup_size(WG)
fn maxpool2_backward(@builtin(global_invocation_id) g: vec3u, @builtin(num_workgroups) nw: vec3u) {
  let i = g.x + g.y * nw.x * WG;
  if (i >= s.count) { return; }
  let c = i % s.c;
  let ix = (i / s.c) % s.w;
  let iy = (i / (s.c * s.w)) % s.h;
  let b = i / (s.c * s.w * s.h);
  let oy = iy / 2u;
  let ox = ix / 2u;
  var grad = 0.0;
  if (oy < s.ho && ox < s.wo) {
    // find the first maximum of the window, as the forward pass saw it
    var best = at(b, 2u * oy, 2u * ox, c);
    var best_y = 2u * oy;
    var best_x = 2u * ox;
    for (var k = 1u; k < 4u; k++) {
      let yy = 2u * oy + k / 2u;
      let xx = 2u * ox + k % 2u;
      let v = at(b, yy, xx, c);
      if (v > best) { best = v; best_y = yy; best_x = xx; }
    }
    if (best_y == iy && best_x == ix) { grad = f32(dy[((b * s.ho + oy) * s.wo + ox) * s.c + c]); }
  }
  out[i] = OUT_T(grad);
}

@compute @workgroup_size(WG)
fn maxpool2_unpool(@builtin(global_invocation_id) g: vec3u, @builtin(num_workgroups) nw: vec3u) {
  let i = g.x + g.y * nw.x * WG;
  if (i >= s.count) { return; }
  let c = i % s.c;
  let ix = (i / s.c) % s.w;
  let iy = (i / (s.c * s.w)) % s.h;
  let b = i / (s.c * s.w * s.h);
  let oy = iy / 2u;
  let ox = ix / 2u;
  var grad = 0.0;
  if (oy < s.ho && ox < s.wo) {
    let window = (b * s.ho + oy) * s.wo + ox;
    let q = (argmax[window * ((s.c + 3u) / 4u) + c / 4u] >> (8u * (c % 4u))) & 0xffu;
    if (q == 2u * (iy % 2u) + ix % 2u) { grad = f32(dy[window * s.c + c]); }
  }
  out[i] = OUT_T(grad);
}

@compute @workgroup_size(WG)
fn global_max_forward(@builtin(global_invocation_id) g: vec3u, @builtin(num_workgroups) nw: vec3u) {
  let i = g.x + g.y * nw.x * WG;
  if (i >= s.count) { return; }
  let c = i % s.c;
  let b = i / s.c;
  var best = at(b, 0u, 0u, c);
  for (var p = 1u; p < s.h * s.w; p++) { best = max(best, at(b, p / s.w, p % s.w, c)); }
  out[i] = OUT_T(best);
}

@compute @workgroup_size(WG)
fn global_max_backward(@builtin(global_invocation_id) g: vec3u, @builtin(num_workgroups) nw: vec3u) {
  let i = g.x + g.y * nw.x * WG;
  if (i >= s.count) { return; }
  let c = i % s.c;
  let p_self = (i / s.c) % (s.h * s.w);
  let b = i / (s.c * s.h * s.w);
  var best = at(b, 0u, 0u, c);
  var best_p = 0u;
  for (var p = 1u; p < s.h * s.w; p++) {
    let v = at(b, p / s.w, p % s.w, c);
    if (v > best) { best = v; best_p = p; }
  }
  var grad = 0.0;
  if (best_p == p_self) { grad = f32(dy[b * s.c + c]); }
  out[i] = OUT_T(grad);
}
