// conv.wgsl: 2-D convolution (stride 1, zero padding, no bias) and its two gradients, f32 storage
// and accumulation. Direct register-blocked kernels: each thread computes a BLOCK x BLOCK (4 x 4)
// block of outputs, reading its operands straight from storage; no workgroup memory, no barriers
// (barriers are very costly on CPU devices, and the reuse within a workgroup comes from the cache).
//
// Layouts: x [B][H][W][Cin], y and dy [B][Ho][Wo][Cout] (NHWC), w [KH][KW][Cin][Cout] (HWIO),
//   Ho = H + 2*pad - KH + 1, Wo = W + 2*pad - KW + 1. Taps outside the image read zero.
// forward:         y[p][co]  = sum over taps t = (ky, kx) and ci of x[p + t - pad][ci] * w[t][ci][co]
//                  thread = 4 output pixels (rows p) x 4 output channels.
// backward_data:   dx[p][ci] = sum over t and co of dy[p - t + pad][co] * w[t][ci][co]
//                  thread = 4 input pixels x 4 input channels.
// backward_weight: part[z][t][ci][co] = sum over the output pixels p of split z of x[p + t - pad][ci] * dy[p][co]
//                  thread = one tap, 4 input channels x 4 output channels, pixels k_per_split * z ..;
//                  reduce.wgsl sums the splits.
// Grid: x = ceil(row blocks / WG), y = ceil(columns / BLOCK), z = splits (backward_weight only), where
//   row blocks = ceil(pixels / BLOCK), or KH*KW*ceil(Cin / BLOCK) for backward_weight.
// Inner loops walk taps, then channels (or pixels) with running counters: no integer division there.
// Bindings: 0 uniform ConvShape; 1 `a_in` (x, or dy for backward_data); 2 `b_in` (w, or dy for
//   backward_weight); 3 `out` (y, dx or the partials).

const WG: u32 = 64u; // threads per workgroup, along the rows
const BLOCK: u32 = 4u; // rows and columns per thread (the code below is written out for 4)

struct ConvShape {
  batch: u32, h: u32, w: u32, cin: u32,
  ho: u32, wo: u32, cout: u32, kh: u32,
  kw: u32, pad: u32, m: u32, n: u32,
  k_per_split: u32, _p0: u32, _p1: u32, _p2: u32,
}

@group(0) @binding(0) var<uniform> s: ConvShape;
@group(0) @binding(1) var<storage, read> a_in: array<f32>;
@group(0) @binding(2) var<storage, read> b_in: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

// Output tile bookkeeping: 4 accumulators (one vec4 of columns per row), and masks for the edges.
var<private> acc0: vec4f;
var<private> acc1: vec4f;
var<private> acc2: vec4f;
var<private> acc3: vec4f;

fn fma_block(a: vec4f, b: vec4f) {
  acc0 = fma(vec4f(a.x), b, acc0);
  acc1 = fma(vec4f(a.y), b, acc1);
  acc2 = fma(vec4f(a.z), b, acc2);
  acc3 = fma(vec4f(a.w), b, acc3);
}

fn store_row(row_base: u32, n: u32, rows_ok: bool, v: vec4f) {
  if (!rows_ok) { return; }
  for (var j = 0u; j < BLOCK; j++) {
    if (n + j < s.n) { out[row_base + n + j] = v[j]; }
  }
}

// x (or dy) offsets of 4 pixel rows for one tap; -1 where the tap falls outside the image.
struct PixelRows { b: vec4u, y: vec4i, x: vec4i, ok: vec4<bool> }

fn pixel_rows(first: u32, rows_h: u32, rows_w: u32) -> PixelRows {
  var r: PixelRows;
  for (var i = 0u; i < BLOCK; i++) {
    let p = first + i;
    r.ok[i] = p < s.m;
    r.x[i] = i32(p % rows_w);
    r.y[i] = i32((p / rows_w) % rows_h);
    r.b[i] = p / (rows_w * rows_h);
  }
  return r;
}

fn tap_offsets(r: PixelRows, dy: i32, dx: i32, src_h: u32, src_w: u32, src_c: u32) -> vec4i {
  var o = vec4i(-1);
  for (var i = 0u; i < BLOCK; i++) {
    let sy = r.y[i] + dy;
    let sx = r.x[i] + dx;
    if (r.ok[i] && sy >= 0 && sx >= 0 && sy < i32(src_h) && sx < i32(src_w)) {
      o[i] = i32(((r.b[i] * src_h + u32(sy)) * src_w + u32(sx)) * src_c);
    }
  }
  return o;
}

// a_in at channel c of the 4 pixels; rows outside the image (offset -1) read index 0 and are masked.
fn load_a(o: vec4i, c: u32) -> vec4f {
  let safe = vec4u(max(o, vec4i(0))) + c;
  let v = vec4f(a_in[safe.x], a_in[safe.y], a_in[safe.z], a_in[safe.w]);
  return select(vec4f(0.0), v, o >= vec4i(0));
}

@compute @workgroup_size(WG)
fn forward(@builtin(global_invocation_id) g: vec3u) {
  let first = g.x * BLOCK;
  let n = g.y * BLOCK;
  if (first >= s.m || n >= s.n) { return; }
  let rows = pixel_rows(first, s.ho, s.wo);
  let last_col = s.n - 1u;
  for (var ky = 0u; ky < s.kh; ky++) {
    for (var kx = 0u; kx < s.kw; kx++) {
      let o = tap_offsets(rows, i32(ky) - i32(s.pad), i32(kx) - i32(s.pad), s.h, s.w, s.cin);
      var w_row = (ky * s.kw + kx) * s.cin * s.cout; // w[ky][kx][0][0]
      for (var ci = 0u; ci < s.cin; ci++) {
        let b = vec4f(
          b_in[w_row + n],
          b_in[w_row + min(n + 1u, last_col)],
          b_in[w_row + min(n + 2u, last_col)],
          b_in[w_row + min(n + 3u, last_col)],
        );
        fma_block(load_a(o, ci), b);
        w_row += s.cout;
      }
    }
  }
  store_row(first * s.n, n, rows.ok[0], acc0);
  store_row((first + 1u) * s.n, n, rows.ok[1], acc1);
  store_row((first + 2u) * s.n, n, rows.ok[2], acc2);
  store_row((first + 3u) * s.n, n, rows.ok[3], acc3);
}

@compute @workgroup_size(WG)
fn backward_data(@builtin(global_invocation_id) g: vec3u) {
  let first = g.x * BLOCK;
  let n = g.y * BLOCK; // input channel
  if (first >= s.m || n >= s.n) { return; }
  let rows = pixel_rows(first, s.h, s.w);
  let last_col = s.n - 1u;
  for (var ky = 0u; ky < s.kh; ky++) {
    for (var kx = 0u; kx < s.kw; kx++) {
      let o = tap_offsets(rows, i32(s.pad) - i32(ky), i32(s.pad) - i32(kx), s.ho, s.wo, s.cout);
      let w_tap = (ky * s.kw + kx) * s.cin * s.cout; // w[ky][kx][ci][co] = w_tap + ci * Cout + co
      let c0 = w_tap + n * s.cout;
      let c1 = w_tap + min(n + 1u, last_col) * s.cout;
      let c2 = w_tap + min(n + 2u, last_col) * s.cout;
      let c3 = w_tap + min(n + 3u, last_col) * s.cout;
      for (var co = 0u; co < s.cout; co++) {
        fma_block(load_a(o, co), vec4f(b_in[c0 + co], b_in[c1 + co], b_in[c2 + co], b_in[c3 + co]));
      }
    }
  }
  store_row(first * s.n, n, rows.ok[0], acc0);
  store_row((first + 1u) * s.n, n, rows.ok[1], acc1);
  store_row((first + 2u) * s.n, n, rows.ok[2], acc2);
  store_row((first + 3u) * s.n, n, rows.ok[3], acc3);
}

@compute @workgroup_size(WG)
fn backward_weight(@builtin(global_invocation_id) g: vec3u) {
  let blocks_per_tap = (s.cin + BLOCK - 1u) / BLOCK;
  let tap = g.x / blocks_per_tap;
  let ci = (g.x % blocks_per_tap) * BLOCK;
  let n = g.y * BLOCK; // output channel
  if (tap >= s.kh * s.kw || n >= s.cout) { return; }
  let ty = i32(tap / s.kw) - i32(s.pad);
  let tx = i32(tap % s.kw) - i32(s.pad);
  let last_ci = s.cin - 1u;
  let last_co = s.cout - 1u;
  let pixels = s.batch * s.ho * s.wo;
  let k_begin = g.z * s.k_per_split;
  let k_end = min(k_begin + s.k_per_split, pixels);
  var ox = k_begin % s.wo;
  var oy = (k_begin / s.wo) % s.ho;
  var ob = k_begin / (s.wo * s.ho);
  for (var p = k_begin; p < k_end; p++) {
    let sy = i32(oy) + ty;
    let sx = i32(ox) + tx;
    if (sy >= 0 && sx >= 0 && sy < i32(s.h) && sx < i32(s.w)) {
      let xo = ((ob * s.h + u32(sy)) * s.w + u32(sx)) * s.cin;
      let a = vec4f(a_in[xo + ci], a_in[xo + min(ci + 1u, last_ci)], a_in[xo + min(ci + 2u, last_ci)], a_in[xo + min(ci + 3u, last_ci)]);
      let d = p * s.cout;
      fma_block(a, vec4f(b_in[d + n], b_in[d + min(n + 1u, last_co)], b_in[d + min(n + 2u, last_co)], b_in[d + min(n + 3u, last_co)]));
    }
    ox += 1u;
    if (ox == s.wo) {
      ox = 0u;
      oy += 1u;
      if (oy == s.ho) {
        oy = 0u;
        ob += 1u;
      }
    }
  }
  // rows of the partial are (tap, ci): row = tap * Cin + ci
  let base = (g.z * s.m + tap * s.cin + ci) * s.n;
  store_row(base, n, ci < s.cin, acc0);
  store_row(base + s.n, n, ci + 1u < s.cin, acc1);
  store_row(base + 2u * s.n, n, ci + 2u < s.cin, acc2);
  store_row(base + 3u * s.n, n, ci + 3u < s.cin, acc3);
}
