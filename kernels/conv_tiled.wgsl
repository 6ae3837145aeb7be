// conv_tiled.wgsl: the three passes of conv.wgsl (same results up to summation order, same
// ConvShape uniform, same bindings, same layouts) as implicit GEMMs tiled in workgroup memory, the
// classic GPU schedule: C[m][n] = sum over k of A[m][k] * B[k][n], where A and B are never built,
// each element is gathered from the NHWC tensors when its tile is loaded.
//
//   pass             m (rows of C)             n        k (summed)              A[m][k]                   B[k][n]
//   forward          output pixel p            co       (ky, kx, ci)            x[p + t - pad][ci]        w[t][ci][co]
//   backward_data    input pixel p             ci       (ky, kx, co)            dy[p - t + pad][co]       w[t][ci][co]
//   backward_weight  (ky, kx, ci)              co       pixel p of split z      x[p + t - pad][ci]        dy[p][co]
//
// A workgroup owns a TILE_M x TILE_N tile of C; each step it stages a TILE_M x TILE_K slice of A
// and a TILE_K x TILE_N slice of B in workgroup memory (zeros outside the image, past M, N or K),
// then each of its WG threads accumulates THREAD_M x THREAD_N outputs in registers, in f32.
// Slices are stored as vec4s along m and n: a thread writes one vec4 of each slice per step and the
// product reads 2 vec4s per 16 FMAs. Each thread fetches its part of the next slice into registers
// before it multiplies the current one, so global-memory latency hides behind the FMAs. Every global load walks the contiguous NHWC/HWIO dimension
// across neighbouring threads (coalesced).
// backward_weight writes split z's partial sums to out[z][m][n]; reduce.wgsl sums the splits.
// forward_pool is the forward fused with the 2x2 max pool after it, as in conv.wgsl: rows m in
// 2x2-window order, so a thread's 4 rows are one window; it writes the pooled output and `argmax`.
// Grid: x = ceil(M / TILE_M), y = ceil(N / TILE_N), z = splits (backward_weight; else 1).
// Bindings: 0 uniform ConvShape; 1 `a_in` (x, or dy for backward_data); 2 `b_in` (w, or dy for
//   backward_weight); 3 `out` (y, dx or the partials); 4 `argmax` (forward_pool only, laid out as in
//   conv.wgsl). The aliases and the bindings repeat conv.wgsl's on purpose (the host binds both files
//   the same way); struct ConvShape is common.wgsl's, which main.ts appends to every kernel file.
// Barriers are costly on CPU devices (lavapipe), which run conv.wgsl's *_wide kernels instead.

const TILE_M: u32 = 64u;
const TILE_N: u32 = 64u;
const TILE_K: u32 = 16u;
const THREAD_M: u32 = 4u; // outputs per thread along m and n (the code below is written out for 4 x 4)
const THREAD_N: u32 = 4u;
const WG: u32 = 256u; // (TILE_M / THREAD_M) * (TILE_N / THREAD_N) = TILE_K * (TILE_M / 4) = TILE_K * (TILE_N / 4)
const M4: u32 = 16u; // TILE_M / 4: vec4s per k row of the A slice
const N4: u32 = 16u; // TILE_N / 4

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

var<workgroup> a_tile: array<vec4f, TILE_K * M4>; // [k][m / 4]
var<workgroup> b_tile: array<vec4f, TILE_K * N4>; // [k][n / 4]

var<private> acc0: vec4f;
var<private> acc1: vec4f;
var<private> acc2: vec4f;
var<private> acc3: vec4f;

// The staged slices' product: thread (tm, tn) = (li / N4, li % N4) owns rows 4 tm.. and columns 4 tn...
fn multiply_tiles(li: u32) {
  let tm = li / N4;
  let tn = li % N4;
  for (var k = 0u; k < TILE_K; k++) {
    let a = a_tile[k * M4 + tm];
    let b = b_tile[k * N4 + tn];
    acc0 = fma(vec4f(a.x), b, acc0);
    acc1 = fma(vec4f(a.y), b, acc1);
    acc2 = fma(vec4f(a.z), b, acc2);
    acc3 = fma(vec4f(a.w), b, acc3);
  }
}

// One row of this thread's outputs, columns n.. inside N only.
fn store_row(index: u32, n: u32, v: vec4f) {
  for (var j = 0u; j < THREAD_N; j++) {
    if (n + j < s.n) { out[index + j] = OUT_T(v[j]); }
  }
}

// Writes this thread's outputs of the tile at (m0, n0) into out[base + m * s.n + n], inside M x N only.
fn store_outputs(li: u32, base: u32, m0: u32, n0: u32) {
  let m = m0 + (li / N4) * THREAD_M;
  let n = n0 + (li % N4) * THREAD_N;
  if (m < s.m) { store_row(base + m * s.n + n, n, acc0); }
  if (m + 1u < s.m) { store_row(base + (m + 1u) * s.n + n, n, acc1); }
  if (m + 2u < s.m) { store_row(base + (m + 2u) * s.n + n, n, acc2); }
  if (m + 3u < s.m) { store_row(base + (m + 3u) * s.n + n, n, acc3); }
}

// Pixel p of a [batch][rows_h][rows_w] grid as (image, row, column); image -1 past the last pixel.
// `pooled` (forward_pool): p in 2x2-window order, rows 4 w .. 4 w + 3 the pixels of pool window w.
fn pixel(p: u32, pixels: u32, rows_h: u32, rows_w: u32, pooled: bool) -> vec3i {
  if (p >= pixels) { return vec3i(-1, 0, 0); }
  if (!pooled) { return vec3i(i32(p / (rows_w * rows_h)), i32((p / rows_w) % rows_h), i32(p % rows_w)); }
  let pool_h = rows_h / 2u;
  let pool_w = rows_w / 2u;
  let window = p / 4u;
  let q = p % 4u;
  return vec3i(i32(window / (pool_w * pool_h)), i32(2u * ((window / pool_w) % pool_h) + q / 2u),
               i32(2u * (window % pool_w) + q % 2u));
}

// Channel c of pixel (b, y, x) + (dy, dx) of a [batch][src_h][src_w][src_c] tensor, or 0 outside it.
fn gather_a(r: vec3i, dy: i32, dx: i32, c: u32, src_h: u32, src_w: u32, src_c: u32) -> f32 {
  let y = r.y + dy;
  let x = r.z + dx;
  if (r.x < 0 || y < 0 || x < 0 || y >= i32(src_h) || x >= i32(src_w)) { return 0.0; }
  return f32(a_in[u32(((r.x * i32(src_h) + y) * i32(src_w) + x) * i32(src_c)) + c]);
}

// b_in[index] if ok, else 0.
fn load_b(index: u32, ok: bool) -> f32 {
  if (ok) { return f32(b_in[index]); }
  return 0.0;
}

// This thread's part of one staged step: a vec4 of the A slice and one of the B slice.
struct Slice { a: vec4f, b: vec4f }

// Per-thread coordinates, set once at the start of a pass and read by its slice function.
var<private> r0: vec3i; // (image, row, column) of this thread's 4 A rows (forward, backward_data)
var<private> r1: vec3i;
var<private> r2: vec3i;
var<private> r3: vec3i;
var<private> ak: u32; // the k row of the A slice this thread loads
var<private> am: u32; // the first of its 4 m there
var<private> bk: u32; // the k row of the B slice this thread loads
var<private> bn: u32; // the first of its 4 n there (absolute)

// The passes differ only in how a slice is fetched (WGSL has no function pointers: `which` picks it).
const FORWARD: u32 = 0u;
const BACKWARD_DATA: u32 = 1u;
const BACKWARD_WEIGHT: u32 = 2u;

fn fetch_slice(which: u32, k0: u32, k_end: u32) -> Slice {
  switch which {
    case FORWARD: { return forward_slice(k0, k_end); }
    case BACKWARD_DATA: { return backward_data_slice(k0, k_end); }
    default: { return backward_weight_slice(k0, k_end); }
  }
}

// The main loop of every pass over k in [k_first, k_end): store the fetched slice, barrier, fetch the
// next one into registers, multiply, barrier. The barriers sit in uniform control flow: the bounds
// depend only on the shape and the workgroup id.
fn multiply_slices(li: u32, which: u32, k_first: u32, k_end: u32) {
  var next = fetch_slice(which, k_first, k_end);
  for (var k0 = k_first; k0 < k_end; k0 += TILE_K) {
    stage(next);
    workgroupBarrier();
    if (k0 + TILE_K < k_end) { next = fetch_slice(which, k0 + TILE_K, k_end); }
    multiply_tiles(li);
    workgroupBarrier();
  }
}

fn stage(sl: Slice) {
  a_tile[ak * M4 + am / 4u] = sl.a;
  b_tile[bk * N4 + (bn % TILE_N) / 4u] = sl.b;
}

// Rows m0 + am.. of A as output (or input) pixels of a [batch][rows_h][rows_w] grid.
fn set_pixel_rows(m0: u32, rows_h: u32, rows_w: u32, pooled: bool) {
  r0 = pixel(m0 + am, s.m, rows_h, rows_w, pooled);
  r1 = pixel(m0 + am + 1u, s.m, rows_h, rows_w, pooled);
  r2 = pixel(m0 + am + 2u, s.m, rows_h, rows_w, pooled);
  r3 = pixel(m0 + am + 3u, s.m, rows_h, rows_w, pooled);
}

// b_in[row + bn ..], the 4 columns of this thread, zero past N or if !ok.
fn load_b_cols(row: u32, ok: bool) -> vec4f {
  return vec4f(load_b(row + bn, ok && bn < s.n), load_b(row + bn + 1u, ok && bn + 1u < s.n),
               load_b(row + bn + 2u, ok && bn + 2u < s.n), load_b(row + bn + 3u, ok && bn + 3u < s.n));
}

// forward: A[m][k] = x[pixel m + tap - pad][ci], k = (tap, ci); B[k][n] = w[k][n]
fn forward_slice(k0: u32, k_total: u32) -> Slice {
  var sl = Slice(vec4f(0.0), vec4f(0.0));
  let k = k0 + ak;
  if (k < k_total) {
    let t = k / s.cin;
    let ci = k % s.cin;
    let dy = i32(t / s.kw) - i32(s.pad);
    let dx = i32(t % s.kw) - i32(s.pad);
    sl.a = vec4f(gather_a(r0, dy, dx, ci, s.h, s.w, s.cin), gather_a(r1, dy, dx, ci, s.h, s.w, s.cin),
                 gather_a(r2, dy, dx, ci, s.h, s.w, s.cin), gather_a(r3, dy, dx, ci, s.h, s.w, s.cin));
  }
  sl.b = load_b_cols((k0 + bk) * s.cout, k0 + bk < k_total);
  return sl;
}

fn forward_sums(li: u32, wg: vec3u, pooled: bool) {
  let k_total = s.kh * s.kw * s.cin;
  ak = li % TILE_K; // A: neighbouring threads read neighbouring ci of a pixel
  am = (li / TILE_K) * 4u;
  bk = li / N4; // B: neighbouring threads read neighbouring co
  bn = wg.y * TILE_N + (li % N4) * 4u;
  set_pixel_rows(wg.x * TILE_M, s.ho, s.wo, pooled);
  multiply_slices(li, FORWARD, 0u, k_total);
}

@compute @workgroup_size(WG)
fn forward(@builtin(local_invocation_index) li: u32, @builtin(workgroup_id) wg: vec3u) {
  forward_sums(li, wg, false);
  store_outputs(li, 0u, wg.x * TILE_M, wg.y * TILE_N);
}

@compute @workgroup_size(WG)
fn forward_pool(@builtin(local_invocation_index) li: u32, @builtin(workgroup_id) wg: vec3u) {
  forward_sums(li, wg, true);
  // this thread's rows (a multiple of 4 on) are one pool window, its columns 4 channels
  let window = (wg.x * TILE_M + (li / N4) * THREAD_M) / 4u;
  let n = wg.y * TILE_N + (li % N4) * THREAD_N;
  if (window * 4u >= s.m || n >= s.n) { return; }
  var best = acc0;
  var arg = vec4u(0u);
  var take = acc1 > best;
  best = select(best, acc1, take);
  arg = select(arg, vec4u(1u), take);
  take = acc2 > best;
  best = select(best, acc2, take);
  arg = select(arg, vec4u(2u), take);
  take = acc3 > best;
  best = select(best, acc3, take);
  arg = select(arg, vec4u(3u), take);
  store_row(window * s.n + n, n, best);
  argmax[window * ((s.n + 3u) / 4u) + n / 4u] = arg.x | (arg.y << 8u) | (arg.z << 16u) | (arg.w << 24u);
}

// backward_data: A[m][k] = dy[pixel m - tap + pad][co], k = (tap, co); B[k][n] = w[tap][n][co]
fn backward_data_slice(k0: u32, k_total: u32) -> Slice {
  var sl = Slice(vec4f(0.0), vec4f(0.0));
  let k = k0 + ak;
  if (k < k_total) {
    let t = k / s.cout;
    let co = k % s.cout;
    let dy = i32(s.pad) - i32(t / s.kw);
    let dx = i32(s.pad) - i32(t % s.kw);
    sl.a = vec4f(gather_a(r0, dy, dx, co, s.ho, s.wo, s.cout), gather_a(r1, dy, dx, co, s.ho, s.wo, s.cout),
                 gather_a(r2, dy, dx, co, s.ho, s.wo, s.cout), gather_a(r3, dy, dx, co, s.ho, s.wo, s.cout));
    // B row k for this thread's 4 input channels: strided in w, but neighbouring threads read neighbouring co
    let w_row = (t * s.cin + bn) * s.cout + co;
    sl.b = vec4f(load_b(w_row, bn < s.n), load_b(w_row + s.cout, bn + 1u < s.n),
                 load_b(w_row + 2u * s.cout, bn + 2u < s.n), load_b(w_row + 3u * s.cout, bn + 3u < s.n));
  }
  return sl;
}

@compute @workgroup_size(WG)
fn backward_data(@builtin(local_invocation_index) li: u32, @builtin(workgroup_id) wg: vec3u) {
  let m0 = wg.x * TILE_M;
  let k_total = s.kh * s.kw * s.cout;
  ak = li % TILE_K; // A and B: neighbouring threads read neighbouring co
  am = (li / TILE_K) * 4u;
  bk = ak;
  bn = wg.y * TILE_N + am;
  set_pixel_rows(m0, s.h, s.w, false);
  multiply_slices(li, BACKWARD_DATA, 0u, k_total);
  store_outputs(li, 0u, m0, wg.y * TILE_N);
}

// backward_weight: A[m][k] = x[pixel k + tap - pad][ci], m = (tap, ci), k = a pixel of this split;
// B[k][n] = dy[k][n]. The 4 rows m0 + am.. (tap, ci) of this thread are decoded once.
var<private> tap_dy: vec4i;
var<private> tap_dx: vec4i;
var<private> chan: vec4u;
var<private> row_ok: vec4<bool>;

fn backward_weight_slice(p0: u32, p_end: u32) -> Slice {
  let p = p0 + ak;
  let r = pixel(p, p_end, s.ho, s.wo, false); // image -1 past this split
  var a = vec4f(0.0);
  for (var i = 0u; i < 4u; i++) {
    if (row_ok[i]) { a[i] = gather_a(r, tap_dy[i], tap_dx[i], chan[i], s.h, s.w, s.cin); }
  }
  return Slice(a, load_b_cols(p * s.cout, p < p_end));
}

@compute @workgroup_size(WG)
fn backward_weight(@builtin(local_invocation_index) li: u32, @builtin(workgroup_id) wg: vec3u) {
  let m0 = wg.x * TILE_M;
  let pixels = s.batch * s.ho * s.wo;
  let p_first = wg.z * s.k_per_split;
  let p_end = min(p_first + s.k_per_split, pixels);
  ak = li / M4; // the pixel; A: neighbouring threads read neighbouring ci, B: neighbouring co
  am = (li % M4) * 4u;
  bk = ak;
  bn = wg.y * TILE_N + am;
  for (var i = 0u; i < 4u; i++) {
    let m = m0 + am + i;
    let t = m / s.cin;
    chan[i] = m % s.cin;
    tap_dy[i] = i32(t / s.kw) - i32(s.pad);
    tap_dx[i] = i32(t % s.kw) - i32(s.pad);
    row_ok[i] = m < s.m;
  }
  multiply_slices(li, BACKWARD_WEIGHT, p_first, p_end);
  store_outputs(li, wg.z * s.m * s.n, m0, wg.y * TILE_N);
}
