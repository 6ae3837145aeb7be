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
// Every tile load walks the contiguous NHWC/HWIO dimension across neighbouring threads (coalesced).
// backward_weight writes split z's partial sums to out[z][m][n]; reduce.wgsl sums the splits.
// Grid: x = ceil(M / TILE_M), y = ceil(N / TILE_N), z = splits (backward_weight; else 1).
// Bindings: 0 uniform ConvShape; 1 `a_in` (x, or dy for backward_data); 2 `b_in` (w, or dy for
//   backward_weight); 3 `out` (y, dx or the partials).
// Barriers are costly on CPU devices (lavapipe), which run conv.wgsl's *_wide kernels instead.

const TILE_M: u32 = 64u;
const TILE_N: u32 = 64u;
const TILE_K: u32 = 16u;
const THREAD_M: u32 = 4u; // outputs per thread along m and n (the code below is written out for 4 x 4)
const THREAD_N: u32 = 4u;
const WG: u32 = 256u; // (TILE_M / THREAD_M) * (TILE_N / THREAD_N)
const LOADS: u32 = 4u; // elements of each staged slice per thread: TILE_M * TILE_K / WG = TILE_K * TILE_N / WG

struct ConvShape {
  batch: u32, h: u32, w: u32, cin: u32,
  ho: u32, wo: u32, cout: u32, kh: u32,
  kw: u32, pad: u32, m: u32, n: u32,
  k_per_split: u32, _p0: u32, _p1: u32, _p2: u32,
}

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

var<workgroup> a_tile: array<f32, TILE_K * TILE_M>; // [k][m]
var<workgroup> b_tile: array<f32, TILE_K * TILE_N>; // [k][n]

var<private> acc0: vec4f;
var<private> acc1: vec4f;
var<private> acc2: vec4f;
var<private> acc3: vec4f;

// The staged slices' product: thread (tm, tn) = (li / 16, li % 16) owns rows 4 tm.. and columns 4 tn...
fn multiply_tiles(li: u32) {
  let am = (li / (TILE_N / THREAD_N)) * THREAD_M;
  let bn = (li % (TILE_N / THREAD_N)) * THREAD_N;
  for (var k = 0u; k < TILE_K; k++) {
    let ar = k * TILE_M + am;
    let br = k * TILE_N + bn;
    let a = vec4f(a_tile[ar], a_tile[ar + 1u], a_tile[ar + 2u], a_tile[ar + 3u]);
    let b = vec4f(b_tile[br], b_tile[br + 1u], b_tile[br + 2u], b_tile[br + 3u]);
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
  let m = m0 + (li / (TILE_N / THREAD_N)) * THREAD_M;
  let n = n0 + (li % (TILE_N / THREAD_N)) * THREAD_N;
  if (m < s.m) { store_row(base + m * s.n + n, n, acc0); }
  if (m + 1u < s.m) { store_row(base + (m + 1u) * s.n + n, n, acc1); }
  if (m + 2u < s.m) { store_row(base + (m + 2u) * s.n + n, n, acc2); }
  if (m + 3u < s.m) { store_row(base + (m + 3u) * s.n + n, n, acc3); }
}

// Pixel p of a [batch][rows_h][rows_w] grid as (image, row, column).
fn pixel(p: u32, rows_h: u32, rows_w: u32) -> vec3i {
  return vec3i(i32(p / (rows_w * rows_h)), i32((p / rows_w) % rows_h), i32(p % rows_w));
}

// Offset of channel 0 of pixel (b, y, x) in a [batch][src_h][src_w][src_c] tensor, or -1 outside it.
fn pixel_offset(b: i32, y: i32, x: i32, src_h: u32, src_w: u32, src_c: u32) -> i32 {
  if (y < 0 || x < 0 || y >= i32(src_h) || x >= i32(src_w)) { return -1; }
  return ((b * i32(src_h) + y) * i32(src_w) + x) * i32(src_c);
}

@compute @workgroup_size(WG)
fn forward(@builtin(local_invocation_index) li: u32, @builtin(workgroup_id) wg: vec3u) {
  let m0 = wg.x * TILE_M;
  let n0 = wg.y * TILE_N;
  let k_total = s.kh * s.kw * s.cin;
  // A slice: this thread loads column k0 + ak of rows am + j * (WG / TILE_K), neighbours along ci.
  let ak = li % TILE_K;
  let am = li / TILE_K;
  var rows: array<vec3i, LOADS>;
  for (var j = 0u; j < LOADS; j++) {
    let m = m0 + am + j * (WG / TILE_K);
    rows[j] = select(vec3i(-1, 0, 0), pixel(m, s.ho, s.wo), m < s.m);
  }
  // B slice: row k0 + bk + j * (WG / TILE_N), column bn, neighbours along co.
  let bn = li % TILE_N;
  let bk = li / TILE_N;
  for (var k0 = 0u; k0 < k_total; k0 += TILE_K) {
    let k = k0 + ak;
    let t = k / s.cin;
    let ci = k % s.cin;
    let dy = i32(t / s.kw) - i32(s.pad);
    let dx = i32(t % s.kw) - i32(s.pad);
    for (var j = 0u; j < LOADS; j++) {
      var v = 0.0;
      let r = rows[j];
      if (k < k_total && r.x >= 0) {
        let o = pixel_offset(r.x, r.y + dy, r.z + dx, s.h, s.w, s.cin);
        if (o >= 0) { v = f32(a_in[u32(o) + ci]); }
      }
      a_tile[ak * TILE_M + am + j * (WG / TILE_K)] = v;
    }
    for (var j = 0u; j < LOADS; j++) {
      let kr = bk + j * (WG / TILE_N);
      var v = 0.0;
      if (k0 + kr < k_total && n0 + bn < s.n) { v = f32(b_in[(k0 + kr) * s.cout + n0 + bn]); }
      b_tile[kr * TILE_N + bn] = v;
    }
    workgroupBarrier();
    multiply_tiles(li);
    workgroupBarrier();
  }
  store_outputs(li, 0u, m0, n0);
}

@compute @workgroup_size(WG)
fn backward_data(@builtin(local_invocation_index) li: u32, @builtin(workgroup_id) wg: vec3u) {
  let m0 = wg.x * TILE_M;
  let n0 = wg.y * TILE_N;
  let k_total = s.kh * s.kw * s.cout;
  // A slice: column k0 + ak = (tap, co) of input pixels am + j * (WG / TILE_K), neighbours along co.
  let ak = li % TILE_K;
  let am = li / TILE_K;
  var rows: array<vec3i, LOADS>;
  for (var j = 0u; j < LOADS; j++) {
    let m = m0 + am + j * (WG / TILE_K);
    rows[j] = select(vec3i(-1, 0, 0), pixel(m, s.h, s.w), m < s.m);
  }
  for (var k0 = 0u; k0 < k_total; k0 += TILE_K) {
    let k = k0 + ak;
    let t = k / s.cout;
    let co = k % s.cout;
    let dy = i32(s.pad) - i32(t / s.kw);
    let dx = i32(s.pad) - i32(t % s.kw);
    for (var j = 0u; j < LOADS; j++) {
      var v = 0.0;
      let r = rows[j];
      if (k < k_total && r.x >= 0) {
        let o = pixel_offset(r.x, r.y + dy, r.z + dx, s.ho, s.wo, s.cout);
        if (o >= 0) { v = f32(a_in[u32(o) + co]); }
      }
      a_tile[ak * TILE_M + am + j * (WG / TILE_K)] = v;
    }
    // B slice: B[k][n] = w[t][n][co]; this thread loads k0 + ak for channels n0 + am + j * (WG / TILE_K),
    // so neighbouring threads read neighbouring co.
    for (var j = 0u; j < LOADS; j++) {
      let nr = am + j * (WG / TILE_K);
      var v = 0.0;
      if (k < k_total && n0 + nr < s.n) { v = f32(b_in[(t * s.cin + n0 + nr) * s.cout + co]); }
      b_tile[ak * TILE_N + nr] = v;
    }
    workgroupBarrier();
    multiply_tiles(li);
    workgroupBarrier();
  }
  store_outputs(li, 0u, m0, n0);
}

@compute @workgroup_size(WG)
fn backward_weight(@builtin(local_invocation_index) li: u32, @builtin(workgroup_id) wg: vec3u) {
  let m0 = wg.x * TILE_M;
  let n0 = wg.y * TILE_N;
  let pixels = s.batch * s.ho * s.wo;
  let p_first = wg.z * s.k_per_split;
  let p_end = min(p_first + s.k_per_split, pixels);
  // A slice: row am = (tap, ci) (fixed for this thread), pixels ak + j * (WG / TILE_M); neighbours along ci.
  let am = li % TILE_M;
  let ak = li / TILE_M;
  let m = m0 + am;
  let t = m / s.cin;
  let ci = m % s.cin;
  let dy = i32(t / s.kw) - i32(s.pad);
  let dx = i32(t % s.kw) - i32(s.pad);
  // B slice: pixel rows ak + j * (WG / TILE_N), column bn = co.
  let bn = li % TILE_N;
  for (var p0 = p_first; p0 < p_end; p0 += TILE_K) {
    for (var j = 0u; j < LOADS; j++) {
      let kr = ak + j * (WG / TILE_M);
      let p = p0 + kr;
      var a = 0.0;
      var b = 0.0;
      if (p < p_end) {
        let r = pixel(p, s.ho, s.wo);
        if (m < s.m) {
          let o = pixel_offset(r.x, r.y + dy, r.z + dx, s.h, s.w, s.cin);
          if (o >= 0) { a = f32(a_in[u32(o) + ci]); }
        }
        if (n0 + bn < s.n) { b = f32(b_in[p * s.cout + n0 + bn]); }
      }
      a_tile[kr * TILE_M + am] = a;
      b_tile[kr * TILE_N + bn] = b;
    }
    workgroupBarrier();
    multiply_tiles(li);
    workgroupBarrier();
  }
  store_outputs(li, wg.z * s.m * s.n, m0, n0);
}
