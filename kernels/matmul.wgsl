// matmul.wgsl: the matrix products of Muon's Newton-Schulz iteration (main.ts newtonSchulz), f32 with f32
// accumulation (the original runs them in bf16).
//
// product:      c = alpha * op(a) op(b)               op(a) [m x k], op(b) [k x n]
// product_add:  c = alpha * op(a) op(b) + beta * d    d [m x n], laid out as c
// op(a)[i][l] = a[i * a_row + l * a_col] and op(b)[l][j] = b[l * b_row + j * b_col]: the strides read a row-major
// matrix or its transpose, without a copy. c and d are row-major [m][n]. Newton-Schulz uses X Xᵀ or Xᵀ X (product),
// b A + c A A (product_add with d = a), a X + B X or a X + X Bᵀ (product_add with d = X).
// Each workgroup computes one TILE x TILE block of c: per pass it stages a TK-long slice of op(a)'s rows and op(b)'s
// columns in workgroup memory (zeros past the edges), and each thread accumulates PER x PER outputs, SIDE apart, so
// that neighbouring threads read neighbouring words of the staged slices.
// Bindings: 0 uniform ProductShape, 1 a, 2 b, 3 d (product_add only), 4 c. Grid: [ceil(n / TILE), ceil(m / TILE)].

const TILE: u32 = 32u; // outputs per workgroup along each side of c
const TK: u32 = 16u; // length of the slice of the sum staged per pass
const SIDE: u32 = 16u; // threads per side of the workgroup (SIDE x SIDE = 256)
const PER: u32 = 2u; // outputs per thread along each side: TILE / SIDE
const PAD: u32 = 33u; // TILE + 1 words per staged row: a slice stored along l spreads over the memory banks

struct ProductShape {
  m: u32, n: u32, k: u32, a_row: u32,
  a_col: u32, b_row: u32, b_col: u32, alpha: f32,
  beta: f32, _p0: u32, _p1: u32, _p2: u32,
}

@group(0) @binding(0) var<uniform> s: ProductShape;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read> d: array<f32>;
@group(0) @binding(4) var<storage, read_write> c: array<f32>;

var<workgroup> a_tile: array<array<f32, PAD>, TK>; // [l - l0][i - row0]
var<workgroup> b_tile: array<array<f32, PAD>, TK>; // [l - l0][j - col0]

// Where the e-th of a slice's TK x TILE values goes, as (l, i) within the slice: consecutive threads take
// consecutive words of the operand (along l if that is its stride-1 side, else along i), so loads coalesce.
fn slot(e: u32, l_contiguous: bool) -> vec2u {
  if (l_contiguous) { return vec2u(e % TK, e / TK); }
  return vec2u(e / TILE, e % TILE);
}

// The PER x PER sums of thread (tx, ty) for the block of c at (row0, col0): acc[p * PER + q] is the output at
// row row0 + ty + p * SIDE, column col0 + tx + q * SIDE.
fn block_product(row0: u32, col0: u32, tx: u32, ty: u32, li: u32) -> array<f32, PER * PER> {
  var acc: array<f32, PER * PER>;
  for (var l0 = 0u; l0 < s.k; l0 += TK) {
    for (var e = li; e < TK * TILE; e += SIDE * SIDE) {
      let ta = slot(e, s.a_col == 1u);
      let i = row0 + ta.y;
      let la = l0 + ta.x;
      var va = 0.0;
      if (i < s.m && la < s.k) { va = a[i * s.a_row + la * s.a_col]; }
      a_tile[ta.x][ta.y] = va;
      let tb = slot(e, s.b_row == 1u);
      let j = col0 + tb.y;
      let lb = l0 + tb.x;
      var vb = 0.0;
      if (j < s.n && lb < s.k) { vb = b[lb * s.b_row + j * s.b_col]; }
      b_tile[tb.x][tb.y] = vb;
    }
    workgroupBarrier();
    for (var l = 0u; l < TK; l++) {
      var av: array<f32, PER>;
      var bv: array<f32, PER>;
      for (var p = 0u; p < PER; p++) {
        av[p] = a_tile[l][ty + p * SIDE];
        bv[p] = b_tile[l][tx + p * SIDE];
      }
      for (var p = 0u; p < PER; p++) {
        for (var q = 0u; q < PER; q++) { acc[p * PER + q] = fma(av[p], bv[q], acc[p * PER + q]); }
      }
    }
    workgroupBarrier();
  }
  return acc;
}

@compute @workgroup_size(SIDE, SIDE)
fn product(
  @builtin(workgroup_id) wg: vec3u,
  @builtin(local_invocation_id) t: vec3u,
  @builtin(local_invocation_index) li: u32,
) {
  let acc = block_product(wg.y * TILE, wg.x * TILE, t.x, t.y, li);
  for (var p = 0u; p < PER; p++) {
    for (var q = 0u; q < PER; q++) {
      let i = wg.y * TILE + t.y + p * SIDE;
      let j = wg.x * TILE + t.x + q * SIDE;
      if (i < s.m && j < s.n) { c[i * s.n + j] = s.alpha * acc[p * PER + q]; }
    }
  }
}

@compute @workgroup_size(SIDE, SIDE)
fn product_add(
  @builtin(workgroup_id) wg: vec3u,
  @builtin(local_invocation_id) t: vec3u,
  @builtin(local_invocation_index) li: u32,
) {
  let acc = block_product(wg.y * TILE, wg.x * TILE, t.x, t.y, li);
  for (var p = 0u; p < PER; p++) {
    for (var q = 0u; q < PER; q++) {
      let i = wg.y * TILE + t.y + p * SIDE;
      let j = wg.x * TILE + t.x + q * SIDE;
      if (i < s.m && j < s.n) { c[i * s.n + j] = fma(s.alpha, acc[p * PER + q], s.beta * d[i * s.n + j]); }
    }
  }
}
