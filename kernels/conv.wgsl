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
// forward_pool:    the forward fused with the 2x2 max pool that follows it (stride 2, floor): rows are
//                  output pixels in 2x2-window order (window-major, then the window's 4 pixels row-major,
//                  M = 4 x windows), so a thread's 4 rows are one window; it writes the window's max per
//                  channel to out [B][Ho/2][Wo/2][Cout] and which pixel held it (0..3, the first on ties)
//                  to `argmax`. The full-size output is never written; the rows and columns the pool
//                  drops are not computed. pool.wgsl's maxpool2_unpool is its backward.
// Bindings: 0 uniform ConvShape (common.wgsl); 1 `a_in` (x, or dy for backward_data); 2 `b_in` (w, or
//   dy for backward_weight); 3 `out` (y, dx or the partials); 4 `argmax` (forward_pool only): u32
//   [B][Ho/2][Wo/2][ceil(Cout / 4)], byte j of a word for channel 4 * word + j.
// Three sizes of entry points compute the same results: forward/backward_data/backward_weight (4 x 4
// outputs per thread, the "block" set), then for CPU devices the *_wide ones (16 x 8) and the *_wide2
// ones (32 x 16, where the channels fill it); main.ts picks per device (Gpu.convKernels) and per pass.

const WG: u32 = 64u; // threads per workgroup, along the rows
const BLOCK: u32 = 4u; // rows and columns per thread (the code below is written out for 4)

// Storage element types: f32, or f16 for a binding that main.ts binds to an f16 tensor (--precision
// f16: it compiles this file with `enable f16;` and that alias set to f16). Loads convert to f32 and
// stores back, so all arithmetic and accumulation stays f32.
alias A_T = f32;
alias B_T = f32;
alias OUT_T = f32;

@group(0) @binding(0) var<uniform> s: ConvShape;
@group(0) @binding(1) var<storage, read> a_in: array<A_T>;
@group(0) @binding(2) var<storage, read> b_in: array<B_T>;
@group(0) @binding(3) var<storage, read_write> out: array<OUT_T>;
@group(0) @binding(4) var<storage, read_write> argmax: array<u32>;

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
    if (n + j < s.n) { out[row_base + n + j] = OUT_T(v[j]); }
  }
}

// A 4 x 4 block of accumulators (4 rows of vec4 columns), the unit every kernel stores.
struct Tile { r0: vec4f, r1: vec4f, r2: vec4f, r3: vec4f } // 4 rows x 4 columns of accumulators

fn tile_fma(t: Tile, a: vec4f, b: vec4f) -> Tile {
  return Tile(fma(vec4f(a.x), b, t.r0), fma(vec4f(a.y), b, t.r1), fma(vec4f(a.z), b, t.r2), fma(vec4f(a.w), b, t.r3));
}

// Stores the 4 x 4 tile whose first row is `row` and first column `n`, skipping rows >= `rows`.
fn store_tile(t: Tile, row: u32, rows: u32, n: u32) {
  store_row(row * s.n, n, row < rows, t.r0);
  store_row((row + 1u) * s.n, n, row + 1u < rows, t.r1);
  store_row((row + 2u) * s.n, n, row + 2u < rows, t.r2);
  store_row((row + 3u) * s.n, n, row + 3u < rows, t.r3);
}

// forward_pool's epilogue: the 4 rows of tile t are the 4 pixels of pool window `window` (row-major),
// its columns the channels n..n+3 (n a multiple of 4). Writes each channel's max to out[window][..]
// and the pixel that held it (the first on ties, as maxpool2_forward then maxpool2_backward) to argmax.
fn store_pooled(t: Tile, window: u32, n: u32) {
  if (window * 4u >= s.m || n >= s.n) { return; }
  var best = t.r0;
  var arg = vec4u(0u);
  var take = t.r1 > best;
  best = select(best, t.r1, take);
  arg = select(arg, vec4u(1u), take);
  take = t.r2 > best;
  best = select(best, t.r2, take);
  arg = select(arg, vec4u(2u), take);
  take = t.r3 > best;
  best = select(best, t.r3, take);
  arg = select(arg, vec4u(3u), take);
  store_row(window * s.n, n, true, best);
  argmax[window * ((s.n + 3u) / 4u) + n / 4u] = arg.x | (arg.y << 8u) | (arg.z << 16u) | (arg.w << 24u);
}

// Row p of a [batch][rows_h][rows_w] grid as (image, y, x): row-major, or in 2x2-window order if
// `pooled` (forward_pool), where rows 4 w .. 4 w + 3 are the pixels of pool window w.
fn grid_pixel(p: u32, rows_h: u32, rows_w: u32, pooled: bool) -> vec3u {
  if (!pooled) { return vec3u(p / (rows_w * rows_h), (p / rows_w) % rows_h, p % rows_w); }
  let pool_h = rows_h / 2u;
  let pool_w = rows_w / 2u;
  let window = p / 4u;
  let q = p % 4u;
  return vec3u(window / (pool_w * pool_h), 2u * ((window / pool_w) % pool_h) + q / 2u, 2u * (window % pool_w) + q % 2u);
}

// x (or dy) offsets of 4 pixel rows for one tap; -1 where the tap falls outside the image.
struct PixelRows { b: vec4u, y: vec4i, x: vec4i, ok: vec4<bool> }

fn pixel_rows(first: u32, rows_h: u32, rows_w: u32, pooled: bool) -> PixelRows {
  var r: PixelRows;
  for (var i = 0u; i < BLOCK; i++) {
    let p = grid_pixel(first + i, rows_h, rows_w, pooled);
    r.ok[i] = first + i < s.m;
    r.b[i] = p.x;
    r.y[i] = i32(p.y);
    r.x[i] = i32(p.z);
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
  let v = vec4f(f32(a_in[safe.x]), f32(a_in[safe.y]), f32(a_in[safe.z]), f32(a_in[safe.w]));
  return select(vec4f(0.0), v, o >= vec4i(0));
}

// 4 consecutive columns n.. of one b_in row, clamped at the last column (those results are not stored).
fn load_b_cols(row: u32, n: u32, last_col: u32) -> vec4f {
  return vec4f(f32(b_in[row + n]), f32(b_in[row + min(n + 1u, last_col)]), f32(b_in[row + min(n + 2u, last_col)]),
               f32(b_in[row + min(n + 3u, last_col)]));
}

// x at channels ci.. of one pixel (offset xo), clamped at the last channel (those rows are not stored).
fn load_a_channels(xo: u32, ci: u32, last_ci: u32) -> vec4f {
  return vec4f(f32(a_in[xo + min(ci, last_ci)]), f32(a_in[xo + min(ci + 1u, last_ci)]), f32(a_in[xo + min(ci + 2u, last_ci)]),
               f32(a_in[xo + min(ci + 3u, last_ci)]));
}

// The output pixels of a backward-weight split, walked in row-major order as (x, y, image) with
// running counters (no division in the inner loop).
fn first_pixel(p: u32) -> vec3u { return vec3u(p % s.wo, (p / s.wo) % s.ho, p / (s.wo * s.ho)); }

fn next_pixel(q: vec3u) -> vec3u {
  var r = vec3u(q.x + 1u, q.y, q.z);
  if (r.x == s.wo) {
    r.x = 0u;
    r.y += 1u;
    if (r.y == s.ho) {
      r.y = 0u;
      r.z += 1u;
    }
  }
  return r;
}

// x offset of channel 0 of output pixel q shifted by a tap (dy, dx), or -1 outside the image.
fn shifted_offset(q: vec3u, dy: i32, dx: i32) -> i32 {
  let sy = i32(q.y) + dy;
  let sx = i32(q.x) + dx;
  if (sy < 0 || sx < 0 || sy >= i32(s.h) || sx >= i32(s.w)) { return -1; }
  return i32(((q.z * s.h + u32(sy)) * s.w + u32(sx)) * s.cin);
}

// The sums of a forward thread (rows g.x * BLOCK.., columns g.y * BLOCK..) into acc0..acc3.
fn forward_sums(g: vec3u, pooled: bool) {
  let first = g.x * BLOCK;
  let n = g.y * BLOCK;
  let rows = pixel_rows(first, s.ho, s.wo, pooled);
  let last_col = s.n - 1u;
  for (var ky = 0u; ky < s.kh; ky++) {
    for (var kx = 0u; kx < s.kw; kx++) {
      let o = tap_offsets(rows, i32(ky) - i32(s.pad), i32(kx) - i32(s.pad), s.h, s.w, s.cin);
      var w_row = (ky * s.kw + kx) * s.cin * s.cout; // w[ky][kx][0][0]
      for (var ci = 0u; ci < s.cin; ci++) {
        let b = load_b_cols(w_row, n, last_col);
        fma_block(load_a(o, ci), b);
        w_row += s.cout;
      }
    }
  }
}

@compute @workgroup_size(WG)
fn forward(@builtin(global_invocation_id) g: vec3u) {
  let first = g.x * BLOCK;
  let n = g.y * BLOCK;
  if (first >= s.m || n >= s.n) { return; }
  forward_sums(g, false);
  store_tile(Tile(acc0, acc1, acc2, acc3), first, s.m, n);
}

@compute @workgroup_size(WG)
fn forward_pool(@builtin(global_invocation_id) g: vec3u) {
  if (g.x * BLOCK >= s.m || g.y * BLOCK >= s.n) { return; }
  forward_sums(g, true);
  store_pooled(Tile(acc0, acc1, acc2, acc3), g.x, g.y * BLOCK);
}

@compute @workgroup_size(WG)
fn backward_data(@builtin(global_invocation_id) g: vec3u) {
  let first = g.x * BLOCK;
  let n = g.y * BLOCK; // input channel
  if (first >= s.m || n >= s.n) { return; }
  let rows = pixel_rows(first, s.h, s.w, false);
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
        fma_block(load_a(o, co), vec4f(f32(b_in[c0 + co]), f32(b_in[c1 + co]), f32(b_in[c2 + co]), f32(b_in[c3 + co])));
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
  let k_begin = g.z * s.k_per_split;
  let k_end = min(k_begin + s.k_per_split, s.batch * s.ho * s.wo);
  var q = first_pixel(k_begin);
  for (var p = k_begin; p < k_end; p++) {
    let xo = shifted_offset(q, ty, tx);
    if (xo >= 0) { fma_block(load_a_channels(u32(xo), ci, last_ci), load_b_cols(p * s.cout, n, last_co)); }
    q = next_pixel(q);
  }
  // rows of the partial are (tap, ci): row = tap * Cin + ci
  let base = (g.z * s.m + tap * s.cin + ci) * s.n;
  store_row(base, n, ci < s.cin, acc0);
  store_row(base + s.n, n, ci + 1u < s.cin, acc1);
  store_row(base + 2u * s.n, n, ci + 2u < s.cin, acc2);
  store_row(base + 3u * s.n, n, ci + 3u < s.cin, acc3);
}

// ---- Wide variants, for CPU devices (lavapipe): each thread owns WIDE_ROWS x WIDE_COLS = 16 x 8
// outputs, held as 4 x 2 tiles of 4 x 4. On a CPU every storage load is a per-lane gather that costs
// far more than an FMA, so the bigger block pays: 24 loads feed 128 FMAs (4 x 4: 8 loads, 16 FMAs).
// Same layouts, bindings and results as the kernels above; main.ts picks one set per device.
// Grid: x = ceil(ceil(rows / WIDE_ROWS) / WG), y = ceil(columns / WIDE_COLS), z = splits.

const WIDE_ROWS: u32 = 16u; // 4 row groups of 4 (the code below is written out for 16 x 8)
const WIDE_COLS: u32 = 8u; // 2 column groups of 4

// A wide thread's 16 x 8 accumulators: tile tRC holds rows 4R.. and columns 4C...
struct WideTiles { t00: Tile, t01: Tile, t10: Tile, t11: Tile, t20: Tile, t21: Tile, t30: Tile, t31: Tile }

// t += (16 rows a0..a3) x (8 columns b0, b1)
fn wide_fma(t: WideTiles, a0: vec4f, a1: vec4f, a2: vec4f, a3: vec4f, b0: vec4f, b1: vec4f) -> WideTiles {
  return WideTiles(tile_fma(t.t00, a0, b0), tile_fma(t.t01, a0, b1), tile_fma(t.t10, a1, b0), tile_fma(t.t11, a1, b1),
                   tile_fma(t.t20, a2, b0), tile_fma(t.t21, a2, b1), tile_fma(t.t30, a3, b0), tile_fma(t.t31, a3, b1));
}

// Stores the 16 x 8 block whose first row is `row` and first column `n`, skipping rows >= `rows`.
fn store_wide(t: WideTiles, row: u32, rows: u32, n: u32) {
  store_tile(t.t00, row, rows, n); store_tile(t.t01, row, rows, n + 4u);
  store_tile(t.t10, row + 4u, rows, n); store_tile(t.t11, row + 4u, rows, n + 4u);
  store_tile(t.t20, row + 8u, rows, n); store_tile(t.t21, row + 8u, rows, n + 4u);
  store_tile(t.t30, row + 12u, rows, n); store_tile(t.t31, row + 12u, rows, n + 4u);
}

// forward_pool's store of a 16 x 8 block whose rows are the pool windows `window`.. window + 3.
fn pool_wide(t: WideTiles, window: u32, n: u32) {
  store_pooled(t.t00, window, n); store_pooled(t.t01, window, n + 4u);
  store_pooled(t.t10, window + 1u, n); store_pooled(t.t11, window + 1u, n + 4u);
  store_pooled(t.t20, window + 2u, n); store_pooled(t.t21, window + 2u, n + 4u);
  store_pooled(t.t30, window + 3u, n); store_pooled(t.t31, window + 3u, n + 4u);
}

// The sums of a wide forward thread: rows `first`.., columns n...
fn forward_wide_sums(first: u32, n: u32, pooled: bool) -> WideTiles {
  let rows0 = pixel_rows(first, s.ho, s.wo, pooled);
  let rows1 = pixel_rows(first + 4u, s.ho, s.wo, pooled);
  let rows2 = pixel_rows(first + 8u, s.ho, s.wo, pooled);
  let rows3 = pixel_rows(first + 12u, s.ho, s.wo, pooled);
  let last_col = s.n - 1u;
  var t: WideTiles;
  for (var ky = 0u; ky < s.kh; ky++) {
    for (var kx = 0u; kx < s.kw; kx++) {
      let dy = i32(ky) - i32(s.pad);
      let dx = i32(kx) - i32(s.pad);
      let o0 = tap_offsets(rows0, dy, dx, s.h, s.w, s.cin);
      let o1 = tap_offsets(rows1, dy, dx, s.h, s.w, s.cin);
      let o2 = tap_offsets(rows2, dy, dx, s.h, s.w, s.cin);
      let o3 = tap_offsets(rows3, dy, dx, s.h, s.w, s.cin);
      var w_row = (ky * s.kw + kx) * s.cin * s.cout; // w[ky][kx][0][0]
      for (var ci = 0u; ci < s.cin; ci++) {
        let b0 = load_b_cols(w_row, n, last_col);
        let b1 = load_b_cols(w_row, n + 4u, last_col);
        let a0 = load_a(o0, ci); let a1 = load_a(o1, ci); let a2 = load_a(o2, ci); let a3 = load_a(o3, ci);
        t = wide_fma(t, a0, a1, a2, a3, b0, b1);
        w_row += s.cout;
      }
    }
  }
  return t;
}

@compute @workgroup_size(WG)
fn forward_wide(@builtin(global_invocation_id) g: vec3u) {
  let first = g.x * WIDE_ROWS;
  let n = g.y * WIDE_COLS;
  if (first >= s.m || n >= s.n) { return; }
  store_wide(forward_wide_sums(first, n, false), first, s.m, n);
}

// forward_pool for CPU devices: a thread's 16 rows are 4 pool windows.
@compute @workgroup_size(WG)
fn forward_pool_wide(@builtin(global_invocation_id) g: vec3u) {
  let first = g.x * WIDE_ROWS;
  let n = g.y * WIDE_COLS;
  if (first >= s.m || n >= s.n) { return; }
  pool_wide(forward_wide_sums(first, n, true), first / 4u, n);
}

@compute @workgroup_size(WG)
fn backward_data_wide(@builtin(global_invocation_id) g: vec3u) {
  let first = g.x * WIDE_ROWS;
  let n = g.y * WIDE_COLS; // input channel
  if (first >= s.m || n >= s.n) { return; }
  let rows0 = pixel_rows(first, s.h, s.w, false);
  let rows1 = pixel_rows(first + 4u, s.h, s.w, false);
  let rows2 = pixel_rows(first + 8u, s.h, s.w, false);
  let rows3 = pixel_rows(first + 12u, s.h, s.w, false);
  let last_col = s.n - 1u;
  var t: WideTiles;
  for (var ky = 0u; ky < s.kh; ky++) {
    for (var kx = 0u; kx < s.kw; kx++) {
      let dy = i32(s.pad) - i32(ky);
      let dx = i32(s.pad) - i32(kx);
      let o0 = tap_offsets(rows0, dy, dx, s.ho, s.wo, s.cout);
      let o1 = tap_offsets(rows1, dy, dx, s.ho, s.wo, s.cout);
      let o2 = tap_offsets(rows2, dy, dx, s.ho, s.wo, s.cout);
      let o3 = tap_offsets(rows3, dy, dx, s.ho, s.wo, s.cout);
      // w[ky][kx][ci][co] = w_tap + ci * Cout + co: the 8 columns (input channels) are Cout apart
      let w_tap = (ky * s.kw + kx) * s.cin * s.cout;
      let c0 = w_tap + n * s.cout;
      let c1 = w_tap + min(n + 1u, last_col) * s.cout;
      let c2 = w_tap + min(n + 2u, last_col) * s.cout;
      let c3 = w_tap + min(n + 3u, last_col) * s.cout;
      let c4 = w_tap + min(n + 4u, last_col) * s.cout;
      let c5 = w_tap + min(n + 5u, last_col) * s.cout;
      let c6 = w_tap + min(n + 6u, last_col) * s.cout;
      let c7 = w_tap + min(n + 7u, last_col) * s.cout;
      for (var co = 0u; co < s.cout; co++) {
        let b0 = vec4f(f32(b_in[c0 + co]), f32(b_in[c1 + co]), f32(b_in[c2 + co]), f32(b_in[c3 + co]));
        let b1 = vec4f(f32(b_in[c4 + co]), f32(b_in[c5 + co]), f32(b_in[c6 + co]), f32(b_in[c7 + co]));
        let a0 = load_a(o0, co); let a1 = load_a(o1, co); let a2 = load_a(o2, co); let a3 = load_a(o3, co);
        t = wide_fma(t, a0, a1, a2, a3, b0, b1);
      }
    }
  }
  store_wide(t, first, s.m, n);
}

// The wide backward weight: a thread owns 16 rows (tap, ci) of the partial x WIDE_COLS output
// channels, as two halves of 8 channels, (tap_lo, ci_lo..) and (tap_hi, ci_hi..), each one UNIT of 8
// channels of its tap. The units run tap by tap (ceil(Cin / 8) per tap) and a thread takes two
// consecutive ones, whatever their taps, so no thread pads a tap's channels to 16: Cin = 24 is 3 units
// per tap, Cin <= 8 one unit, so two taps per thread. 24 loads feed 128 FMAs per pixel; rows past a
// tap's channels are not stored. Grid x = ceil(ceil(taps * units per tap / 2) / WG).
fn wide_weight_grad(g: vec3u, tap_lo: u32, ci_lo: u32, tap_hi: u32, ci_hi: u32) {
  let taps = s.kh * s.kw;
  let n = g.y * WIDE_COLS; // output channel
  if (tap_lo >= taps || n >= s.n) { return; }
  let has_hi = tap_hi < taps;
  let lo_y = i32(tap_lo / s.kw) - i32(s.pad);
  let lo_x = i32(tap_lo % s.kw) - i32(s.pad);
  let hi_y = i32(tap_hi / s.kw) - i32(s.pad);
  let hi_x = i32(tap_hi % s.kw) - i32(s.pad);
  let last_ci = s.cin - 1u;
  let last_col = s.n - 1u;
  let k_begin = g.z * s.k_per_split;
  let k_end = min(k_begin + s.k_per_split, s.batch * s.ho * s.wo);
  var q = first_pixel(k_begin);
  var t00: Tile; var t01: Tile; var t10: Tile; var t11: Tile;
  var t20: Tile; var t21: Tile; var t30: Tile; var t31: Tile;
  for (var p = k_begin; p < k_end; p++) {
    let xo_lo = shifted_offset(q, lo_y, lo_x);
    let xo_hi = select(-1, shifted_offset(q, hi_y, hi_x), has_hi);
    if (xo_lo >= 0 || xo_hi >= 0) {
      let d = p * s.cout;
      let b0 = load_b_cols(d, n, last_col);
      let b1 = load_b_cols(d, n + 4u, last_col);
      if (xo_lo >= 0) {
        let a0 = load_a_channels(u32(xo_lo), ci_lo, last_ci);
        let a1 = load_a_channels(u32(xo_lo), ci_lo + 4u, last_ci);
        t00 = tile_fma(t00, a0, b0); t01 = tile_fma(t01, a0, b1);
        t10 = tile_fma(t10, a1, b0); t11 = tile_fma(t11, a1, b1);
      }
      if (xo_hi >= 0) {
        let a2 = load_a_channels(u32(xo_hi), ci_hi, last_ci);
        let a3 = load_a_channels(u32(xo_hi), ci_hi + 4u, last_ci);
        t20 = tile_fma(t20, a2, b0); t21 = tile_fma(t21, a2, b1);
        t30 = tile_fma(t30, a3, b0); t31 = tile_fma(t31, a3, b1);
      }
    }
    q = next_pixel(q);
  }
  // rows of the partial are (tap, ci): row = tap * Cin + ci
  let row_lo = g.z * s.m + tap_lo * s.cin;
  store_tile(t00, row_lo + ci_lo, row_lo + s.cin, n); store_tile(t01, row_lo + ci_lo, row_lo + s.cin, n + 4u);
  store_tile(t10, row_lo + ci_lo + 4u, row_lo + s.cin, n); store_tile(t11, row_lo + ci_lo + 4u, row_lo + s.cin, n + 4u);
  if (has_hi) {
    let row_hi = g.z * s.m + tap_hi * s.cin;
    store_tile(t20, row_hi + ci_hi, row_hi + s.cin, n); store_tile(t21, row_hi + ci_hi, row_hi + s.cin, n + 4u);
    store_tile(t30, row_hi + ci_hi + 4u, row_hi + s.cin, n);
    store_tile(t31, row_hi + ci_hi + 4u, row_hi + s.cin, n + 4u);
  }
}

const UNIT: u32 = 8u; // WIDE_ROWS / 2 channels

@compute @workgroup_size(WG)
fn backward_weight_wide(@builtin(global_invocation_id) g: vec3u) {
  let units_per_tap = (s.cin + UNIT - 1u) / UNIT;
  let lo = 2u * g.x;
  let hi = lo + 1u;
  wide_weight_grad(g, lo / units_per_tap, (lo % units_per_tap) * UNIT, hi / units_per_tap, (hi % units_per_tap) * UNIT);
}


// ---- Wide2 variants, for CPU devices, of the passes with 16 columns or more (output channels for
// forward and backward weight, input channels for backward data; backward weight also needs 32 input
// channels): each thread owns WIDE2_ROWS x WIDE2_COLS = 32 x 16 outputs, held as 2 x 2 wide blocks
// (qRC: rows 16R.., columns 8C..). 48 loads feed 512 FMAs (16 x 8: 24 loads, 128 FMAs): 1.2-1.5x the
// 16 x 8 kernels' speed on lavapipe where the columns fill the block (a 32 x 32 block measured a little
// faster still, but took ~18 s to compile per kernel against ~5 s; bench/RESULTS.md).
// Same layouts, bindings and results as the kernels above (each output's sum in the same order).
// Grid: x = ceil(ceil(rows / WIDE2_ROWS) / WG), y = ceil(columns / WIDE2_COLS), z = splits.

const WIDE2_ROWS: u32 = 32u; // the code below is written out for 32 x 16
const WIDE2_COLS: u32 = 16u;

struct Wide2 { q00: WideTiles, q01: WideTiles, q10: WideTiles, q11: WideTiles }

fn store_wide2(q: Wide2, row: u32, rows: u32, n: u32) {
  store_wide(q.q00, row, rows, n); store_wide(q.q01, row, rows, n + 8u);
  store_wide(q.q10, row + 16u, rows, n); store_wide(q.q11, row + 16u, rows, n + 8u);
}

fn forward_wide2_sums(first: u32, n: u32, pooled: bool) -> Wide2 {
  let rows0 = pixel_rows(first, s.ho, s.wo, pooled);
  let rows1 = pixel_rows(first + 4u, s.ho, s.wo, pooled);
  let rows2 = pixel_rows(first + 8u, s.ho, s.wo, pooled);
  let rows3 = pixel_rows(first + 12u, s.ho, s.wo, pooled);
  let rows4 = pixel_rows(first + 16u, s.ho, s.wo, pooled);
  let rows5 = pixel_rows(first + 20u, s.ho, s.wo, pooled);
  let rows6 = pixel_rows(first + 24u, s.ho, s.wo, pooled);
  let rows7 = pixel_rows(first + 28u, s.ho, s.wo, pooled);
  let last_col = s.n - 1u;
  var q00: WideTiles; var q01: WideTiles; var q10: WideTiles; var q11: WideTiles;
  for (var ky = 0u; ky < s.kh; ky++) {
    for (var kx = 0u; kx < s.kw; kx++) {
      let dy = i32(ky) - i32(s.pad);
      let dx = i32(kx) - i32(s.pad);
      let o0 = tap_offsets(rows0, dy, dx, s.h, s.w, s.cin); let o1 = tap_offsets(rows1, dy, dx, s.h, s.w, s.cin);
      let o2 = tap_offsets(rows2, dy, dx, s.h, s.w, s.cin); let o3 = tap_offsets(rows3, dy, dx, s.h, s.w, s.cin);
      let o4 = tap_offsets(rows4, dy, dx, s.h, s.w, s.cin); let o5 = tap_offsets(rows5, dy, dx, s.h, s.w, s.cin);
      let o6 = tap_offsets(rows6, dy, dx, s.h, s.w, s.cin); let o7 = tap_offsets(rows7, dy, dx, s.h, s.w, s.cin);
      var w_row = (ky * s.kw + kx) * s.cin * s.cout; // w[ky][kx][0][0]
      for (var ci = 0u; ci < s.cin; ci++) {
        let b0 = load_b_cols(w_row, n, last_col); let b1 = load_b_cols(w_row, n + 4u, last_col);
        let b2 = load_b_cols(w_row, n + 8u, last_col); let b3 = load_b_cols(w_row, n + 12u, last_col);
        let a0 = load_a(o0, ci); let a1 = load_a(o1, ci); let a2 = load_a(o2, ci); let a3 = load_a(o3, ci);
        let a4 = load_a(o4, ci); let a5 = load_a(o5, ci); let a6 = load_a(o6, ci); let a7 = load_a(o7, ci);
        q00 = wide_fma(q00, a0, a1, a2, a3, b0, b1); q01 = wide_fma(q01, a0, a1, a2, a3, b2, b3);
        q10 = wide_fma(q10, a4, a5, a6, a7, b0, b1); q11 = wide_fma(q11, a4, a5, a6, a7, b2, b3);
        w_row += s.cout;
      }
    }
  }
  return Wide2(q00, q01, q10, q11);
}

@compute @workgroup_size(WG)
fn forward_wide2(@builtin(global_invocation_id) g: vec3u) {
  let first = g.x * WIDE2_ROWS;
  let n = g.y * WIDE2_COLS;
  if (first >= s.m || n >= s.n) { return; }
  store_wide2(forward_wide2_sums(first, n, false), first, s.m, n);
}

// forward_pool for CPU devices, 32 x 16: a thread's 32 rows are 8 pool windows.
@compute @workgroup_size(WG)
fn forward_pool_wide2(@builtin(global_invocation_id) g: vec3u) {
  let first = g.x * WIDE2_ROWS;
  let n = g.y * WIDE2_COLS;
  if (first >= s.m || n >= s.n) { return; }
  let q = forward_wide2_sums(first, n, true);
  let window = first / 4u;
  pool_wide(q.q00, window, n); pool_wide(q.q01, window, n + 8u);
  pool_wide(q.q10, window + 4u, n); pool_wide(q.q11, window + 4u, n + 8u);
}

// w[tap][ci][co] for the 4 input channels (columns) c.. of backward data, clamped at the last one.
fn load_w_rows(w_tap: u32, c: u32, co: u32, last_col: u32) -> vec4f {
  return vec4f(f32(b_in[w_tap + c * s.cout + co]), f32(b_in[w_tap + min(c + 1u, last_col) * s.cout + co]),
               f32(b_in[w_tap + min(c + 2u, last_col) * s.cout + co]), f32(b_in[w_tap + min(c + 3u, last_col) * s.cout + co]));
}

@compute @workgroup_size(WG)
fn backward_data_wide2(@builtin(global_invocation_id) g: vec3u) {
  let first = g.x * WIDE2_ROWS;
  let n = g.y * WIDE2_COLS; // input channel
  if (first >= s.m || n >= s.n) { return; }
  let rows0 = pixel_rows(first, s.h, s.w, false);
  let rows1 = pixel_rows(first + 4u, s.h, s.w, false);
  let rows2 = pixel_rows(first + 8u, s.h, s.w, false);
  let rows3 = pixel_rows(first + 12u, s.h, s.w, false);
  let rows4 = pixel_rows(first + 16u, s.h, s.w, false);
  let rows5 = pixel_rows(first + 20u, s.h, s.w, false);
  let rows6 = pixel_rows(first + 24u, s.h, s.w, false);
  let rows7 = pixel_rows(first + 28u, s.h, s.w, false);
  let last_col = s.n - 1u;
  var q00: WideTiles; var q01: WideTiles; var q10: WideTiles; var q11: WideTiles;
  for (var ky = 0u; ky < s.kh; ky++) {
    for (var kx = 0u; kx < s.kw; kx++) {
      let dy = i32(s.pad) - i32(ky);
      let dx = i32(s.pad) - i32(kx);
      let o0 = tap_offsets(rows0, dy, dx, s.ho, s.wo, s.cout); let o1 = tap_offsets(rows1, dy, dx, s.ho, s.wo, s.cout);
      let o2 = tap_offsets(rows2, dy, dx, s.ho, s.wo, s.cout); let o3 = tap_offsets(rows3, dy, dx, s.ho, s.wo, s.cout);
      let o4 = tap_offsets(rows4, dy, dx, s.ho, s.wo, s.cout); let o5 = tap_offsets(rows5, dy, dx, s.ho, s.wo, s.cout);
      let o6 = tap_offsets(rows6, dy, dx, s.ho, s.wo, s.cout); let o7 = tap_offsets(rows7, dy, dx, s.ho, s.wo, s.cout);
      let w_tap = (ky * s.kw + kx) * s.cin * s.cout; // w[ky][kx][ci][co] = w_tap + ci * Cout + co
      for (var co = 0u; co < s.cout; co++) {
        let b0 = load_w_rows(w_tap, n, co, last_col); let b1 = load_w_rows(w_tap, n + 4u, co, last_col);
        let b2 = load_w_rows(w_tap, n + 8u, co, last_col); let b3 = load_w_rows(w_tap, n + 12u, co, last_col);
        let a0 = load_a(o0, co); let a1 = load_a(o1, co); let a2 = load_a(o2, co); let a3 = load_a(o3, co);
        let a4 = load_a(o4, co); let a5 = load_a(o5, co); let a6 = load_a(o6, co); let a7 = load_a(o7, co);
        q00 = wide_fma(q00, a0, a1, a2, a3, b0, b1); q01 = wide_fma(q01, a0, a1, a2, a3, b2, b3);
        q10 = wide_fma(q10, a4, a5, a6, a7, b0, b1); q11 = wide_fma(q11, a4, a5, a6, a7, b2, b3);
      }
    }
  }
  store_wide2(Wide2(q00, q01, q10, q11), first, s.m, n);
}

// backward weight, 32 x 16: a thread owns 32 input channels ci.. of one tap (rows tap * Cin + ci..) and
// 16 output channels; Cin >= 32.
@compute @workgroup_size(WG)
fn backward_weight_wide2(@builtin(global_invocation_id) g: vec3u) {
  let blocks_per_tap = (s.cin + WIDE2_ROWS - 1u) / WIDE2_ROWS;
  let tap = g.x / blocks_per_tap;
  let ci = (g.x % blocks_per_tap) * WIDE2_ROWS;
  let n = g.y * WIDE2_COLS; // output channel
  if (tap >= s.kh * s.kw || n >= s.n) { return; }
  let ty = i32(tap / s.kw) - i32(s.pad);
  let tx = i32(tap % s.kw) - i32(s.pad);
  let last_ci = s.cin - 1u;
  let last_col = s.n - 1u;
  let k_begin = g.z * s.k_per_split;
  let k_end = min(k_begin + s.k_per_split, s.batch * s.ho * s.wo);
  var q = first_pixel(k_begin);
  var q00: WideTiles; var q01: WideTiles; var q10: WideTiles; var q11: WideTiles;
  for (var p = k_begin; p < k_end; p++) {
    let xo = shifted_offset(q, ty, tx);
    if (xo >= 0) {
      let d = p * s.cout;
      let b0 = load_b_cols(d, n, last_col); let b1 = load_b_cols(d, n + 4u, last_col);
      let b2 = load_b_cols(d, n + 8u, last_col); let b3 = load_b_cols(d, n + 12u, last_col);
      let x = u32(xo);
      let a0 = load_a_channels(x, ci, last_ci); let a1 = load_a_channels(x, ci + 4u, last_ci);
      let a2 = load_a_channels(x, ci + 8u, last_ci); let a3 = load_a_channels(x, ci + 12u, last_ci);
      let a4 = load_a_channels(x, ci + 16u, last_ci); let a5 = load_a_channels(x, ci + 20u, last_ci);
      let a6 = load_a_channels(x, ci + 24u, last_ci); let a7 = load_a_channels(x, ci + 28u, last_ci);
      q00 = wide_fma(q00, a0, a1, a2, a3, b0, b1); q01 = wide_fma(q01, a0, a1, a2, a3, b2, b3);
      q10 = wide_fma(q10, a4, a5, a6, a7, b0, b1); q11 = wide_fma(q11, a4, a5, a6, a7, b2, b3);
    }
    q = next_pixel(q);
  }
  // rows of the partial are (tap, ci): row = tap * Cin + ci
  let row = g.z * s.m + tap * s.cin;
  store_wide2(Wide2(q00, q01, q10, q11), row + ci, row + s.cin, n);
}
