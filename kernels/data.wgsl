// data.wgsl: every kernel that reads the raw CIFAR-10 bytes kept on the GPU.
//
// Raw images: the file's records without label bytes, 3072 bytes each, channel-major
// [3][32][32] (CHW) u8, packed 4 per u32. The training set is split in two bindings `part0` and
// `part1` of `images_per_part` images each (a binding may hold at most 128 MiB on some devices).
// Pixels are normalised on the fly: (v / 255 - mean[c]) * inv_std[c].
//
// augment_train, one thread per output pixel (row r, y, x) of the batch, image = perm[offset + r]:
//   random crop of the image reflect-padded by `pad` (offsets dy, dx in 0..2 pad), then horizontal flip,
//   then cutmix: inside the square rows cy+cut_lo..cy+cut_hi (same for columns) the pixel comes
//   from the partner image, itself cropped and flipped with its own parameters.
//   targets[r] = (1 - mix) * onehot(label) + mix * onehot(partner label) when cutmix is on.
//   params[image] = (bits: dy 0-2, dx 3-5, flip 6, cutmix 7, cy 8-12, cx 13-17; partner index).
// Each kernel writes the rows of one batch slice (first_row, rows), or of the whole batch.
// gather_eval, one thread per output pixel of rows r < views * part (part = batch_rows / views): image =
//   offset + (r mod part) in view v = r / part of the test-time augmentation (main.ts TTA_VIEWS): v odd is
//   mirrored; views 6 (airbench94's level 2) also translate v = 2, 3 by (+1, +1) and v = 4, 5 by (-1, -1)
//   pixels (the reflect-padded image cropped at (0, 0) and (2, 2)); one-hot targets for r < part.
//   Images past the end repeat the last one; the loss kernel masks them out (frame.valid).
// patch_moments, one thread per (image i = first_row + t / 90, moment q < 90): over the image's 31*31 2x2 patches taken
//   as 12-vectors (channel, row, column order), the sum of component q (q < 12) or of the product
//   pair q - 12 (upper triangle, row-major) -> moments[t] (the bound slice); the whitening covariance is
//   summed from these on the CPU. (One thread per moment keeps every thread's loop short: lavapipe
//   silently stops a shader after about 65,535 loop iterations.)
// Layouts: images out [rows][32][32][3] (NHWC), targets [rows][classes].
// Bindings: 0 uniform DataShape, 1 frame uniform (struct Frame: common.wgsl), 2 part0, 3 part1, 4
//   perm, 5 params, 6 labels, 7 images out (or moments), 8 targets out.

const WG: u32 = 256u;
const SIDE: u32 = 32u;
const IMAGE_BYTES: u32 = 3072u;

// rows: rows of the bound output (a batch slice, or the whole batch); first_row: the slice's first row
// in the batch; batch_rows: rows of the whole batch; views: gather_eval's TTA views. patch_moments: images
// first_row .. first_row + rows.
struct DataShape {
  rows: u32, images_per_part: u32, n_images: u32, classes: u32,
  mix: f32, cut_lo: i32, cut_hi: i32, pad: i32,
  mean: vec4f,
  inv_std: vec4f,
  first_row: u32, batch_rows: u32, views: u32, _p1: u32,
}

// Storage element types: f32, or f16 for a binding that main.ts binds to an f16 tensor (--precision
// f16: it compiles this file with `enable f16;` and that alias set to f16). Loads convert to f32 and
// stores back, so all arithmetic and accumulation stays f32.
alias IMAGES_T = f32;

@group(0) @binding(0) var<uniform> s: DataShape;
@group(0) @binding(1) var<uniform> frame: Frame;
@group(0) @binding(2) var<storage, read> part0: array<u32>;
@group(0) @binding(3) var<storage, read> part1: array<u32>;
@group(0) @binding(4) var<storage, read> perm: array<u32>;
@group(0) @binding(5) var<storage, read> params: array<vec2u>;
@group(0) @binding(6) var<storage, read> labels: array<u32>;
@group(0) @binding(7) var<storage, read_write> images: array<IMAGES_T>;
@group(0) @binding(8) var<storage, read_write> targets: array<f32>;

fn pixel(image: u32, c: u32, y: u32, x: u32) -> f32 {
  var local = image;
  var byte = 0u;
  var word = 0u;
  if (image < s.images_per_part) {
    byte = local * IMAGE_BYTES + (c * SIDE + y) * SIDE + x;
    word = part0[byte / 4u];
  } else {
    local = image - s.images_per_part;
    byte = local * IMAGE_BYTES + (c * SIDE + y) * SIDE + x;
    word = part1[byte / 4u];
  }
  let v = f32((word >> (8u * (byte % 4u))) & 0xffu);
  return (v / 255.0 - s.mean[c]) * s.inv_std[c];
}

// index into the image reflect-padded by s.pad (PyTorch 'reflect': -1 -> 1, 32 -> 30)
fn reflect(p: i32) -> u32 { return mirror(p - s.pad); }

// a row or column index up to 31 past either edge, reflected into the image
fn mirror(p: i32) -> u32 {
  var q = p;
  if (q < 0) { q = -q; }
  if (q > i32(SIDE) - 1) { q = 2 * (i32(SIDE) - 1) - q; }
  return u32(q);
}

fn grid_index(g: vec3u, nw: vec3u) -> u32 { return g.x + g.y * nw.x * WG; }

@compute @workgroup_size(WG)
fn augment_train(@builtin(global_invocation_id) g: vec3u, @builtin(num_workgroups) nw: vec3u) {
  let t = grid_index(g, nw);
  if (t >= s.rows * SIDE * SIDE) { return; }
  let x = t % SIDE;
  let y = (t / SIDE) % SIDE;
  let r = t / (SIDE * SIDE); // row of the bound slice
  let own = perm[frame.offset + s.first_row + r];
  let p = params[own];
  var src = own;
  var bits = p.x;
  let cutmix = ((p.x >> 7u) & 1u) == 1u;
  let dy = i32(y) - i32((p.x >> 8u) & 31u);
  let dx = i32(x) - i32((p.x >> 13u) & 31u);
  if (cutmix && dy >= s.cut_lo && dy <= s.cut_hi && dx >= s.cut_lo && dx <= s.cut_hi) {
    src = p.y;
    bits = params[src].x;
  }
  var xx = x;
  if (((bits >> 6u) & 1u) == 1u) { xx = SIDE - 1u - x; }
  let py = reflect(i32(y + (bits & 7u)));
  let px = reflect(i32(xx + ((bits >> 3u) & 7u)));
  for (var c = 0u; c < 3u; c++) { images[t * 3u + c] = IMAGES_T(pixel(src, c, py, px)); }
  if (x == 0u && y == 0u) {
    let mix = select(0.0, s.mix, cutmix);
    for (var k = 0u; k < s.classes; k++) {
      targets[r * s.classes + k] = (1.0 - mix) * select(0.0, 1.0, labels[own] == k) + mix * select(0.0, 1.0, labels[p.y] == k);
    }
  }
}

@compute @workgroup_size(WG)
fn gather_eval(@builtin(global_invocation_id) g: vec3u, @builtin(num_workgroups) nw: vec3u) {
  let t = grid_index(g, nw);
  let part = s.batch_rows / s.views;
  let local = t / (SIDE * SIDE); // row of the bound slice
  let r = s.first_row + local; // row of the batch
  if (local >= s.rows || r >= s.views * part) { return; }
  let x = t % SIDE;
  let y = (t / SIDE) % SIDE;
  let image = min(frame.offset + r % part, s.n_images - 1u);
  let v = r / part;
  var xx = x;
  if (v % 2u == 1u) { xx = SIDE - 1u - x; }
  var shift = 0; // views 2, 3: the crop at (0, 0) of the image padded by 1, i.e. pixel (y - 1, x - 1); 4, 5: (y + 1, x + 1)
  if (v >= 2u) { shift = select(1, -1, v < 4u); }
  let py = mirror(i32(y) + shift);
  let px = mirror(i32(xx) + shift);
  for (var c = 0u; c < 3u; c++) { images[t * 3u + c] = IMAGES_T(pixel(image, c, py, px)); }
  if (x == 0u && y == 0u && r < part) {
    for (var k = 0u; k < s.classes; k++) { targets[local * s.classes + k] = select(0.0, 1.0, labels[image] == k); }
  }
}

// 2x2 patch component i (order c, ky, kx) of the patch at (y, x)
fn patch_component(image: u32, i: u32, y: u32, x: u32) -> f32 {
  return pixel(image, i / 4u, y + (i / 2u) % 2u, x + i % 2u);
}

@compute @workgroup_size(WG)
fn patch_moments(@builtin(global_invocation_id) g: vec3u, @builtin(num_workgroups) nw: vec3u) {
  // one thread per (image, moment q): q < 12 is a sum, q >= 12 the product pair number q - 12
  let t = grid_index(g, nw);
  if (t >= s.rows * 90u) { return; }
  let image = s.first_row + t / 90u;
  let q = t % 90u;
  var i = q;
  var j = 12u; // 12 = no second factor
  if (q >= 12u) {
    // pair number q - 12 in row-major upper-triangle order: (0,0), (0,1), ..., (0,11), (1,1), ...
    var rest = q - 12u;
    i = 0u;
    while (rest >= 12u - i) {
      rest -= 12u - i;
      i++;
    }
    j = i + rest;
  }
  var acc = 0.0;
  for (var y = 0u; y < SIDE - 1u; y++) {
    for (var x = 0u; x < SIDE - 1u; x++) {
      var v = patch_component(image, i, y, x);
      if (j < 12u) { v *= patch_component(image, j, y, x); }
      acc += v;
    }
  }
  images[t] = IMAGES_T(acc);
}
