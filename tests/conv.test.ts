// GPU tests of the convolution kernels (conv.wgsl + the split-K sum in reduce.wgsl) against
// independent float64 CPU references written here, plus central finite differences of the CPU
// forward for the gradients. Shapes are small and odd on purpose: the CPU device (lavapipe) is slow,
// and odd sizes exercise the block edges of both kernel sets (4 x 4 and 16 x 8 outputs per thread).
import assert from "node:assert/strict";
import {
  checkGpu,
  conv2d,
  conv2dBackwardData,
  conv2dBackwardWeight,
  conv2dMaxPool,
  CONV_KERNEL_SETS,
  type ConvKernels,
  type DType,
  freeSince,
  initGpu,
  maxPool2,
  maxPool2Backward,
  maxPool2Unpool,
  readBuffer,
  readTensor,
  submit,
  tensor,
  upload,
} from "../main.ts";

import { assertClose, f16Test, Prng } from "./util.ts";

const gpu = await initGpu();

// ---- test helpers (kept local: every reference below is independent of main.ts) ----

// ---- float64 CPU references (NHWC activations, HWIO weights) ----

interface ConvCase {
  b: number;
  h: number;
  w: number;
  cin: number;
  cout: number;
  kh: number;
  kw: number;
  pad: number;
}
const outSize = (c: ConvCase) => ({ ho: c.h + 2 * c.pad - c.kh + 1, wo: c.w + 2 * c.pad - c.kw + 1 });

/** y[b][oy][ox][co] = sum_{ky,kx,ci} x[b][oy+ky-pad][ox+kx-pad][ci] w[ky][kx][ci][co] */
function convRef(c: ConvCase, x: ArrayLike<number>, w: ArrayLike<number>): Float64Array {
  const { ho, wo } = outSize(c);
  const y = new Float64Array(c.b * ho * wo * c.cout);
  for (let b = 0; b < c.b; b++) {
    for (let oy = 0; oy < ho; oy++) {
      for (let ox = 0; ox < wo; ox++) {
        for (let co = 0; co < c.cout; co++) {
          let s = 0;
          for (let ky = 0; ky < c.kh; ky++) {
            const iy = oy + ky - c.pad;
            if (iy < 0 || iy >= c.h) continue;
            for (let kx = 0; kx < c.kw; kx++) {
              const ix = ox + kx - c.pad;
              if (ix < 0 || ix >= c.w) continue;
              for (let ci = 0; ci < c.cin; ci++) {
                s += x[((b * c.h + iy) * c.w + ix) * c.cin + ci] * w[((ky * c.kw + kx) * c.cin + ci) * c.cout + co];
              }
            }
          }
          y[((b * ho + oy) * wo + ox) * c.cout + co] = s;
        }
      }
    }
  }
  return y;
}

/** dx[b][iy][ix][ci] = sum over the outputs that read x[b][iy][ix][ci] of dy * w. */
function convDataRef(c: ConvCase, dy: ArrayLike<number>, w: ArrayLike<number>): Float64Array {
  const { ho, wo } = outSize(c);
  const dx = new Float64Array(c.b * c.h * c.w * c.cin);
  for (let b = 0; b < c.b; b++) {
    for (let iy = 0; iy < c.h; iy++) {
      for (let ix = 0; ix < c.w; ix++) {
        for (let ci = 0; ci < c.cin; ci++) {
          let s = 0;
          for (let ky = 0; ky < c.kh; ky++) {
            const oy = iy - ky + c.pad;
            if (oy < 0 || oy >= ho) continue;
            for (let kx = 0; kx < c.kw; kx++) {
              const ox = ix - kx + c.pad;
              if (ox < 0 || ox >= wo) continue;
              for (let co = 0; co < c.cout; co++) {
                s += dy[((b * ho + oy) * wo + ox) * c.cout + co] * w[((ky * c.kw + kx) * c.cin + ci) * c.cout + co];
              }
            }
          }
          dx[((b * c.h + iy) * c.w + ix) * c.cin + ci] = s;
        }
      }
    }
  }
  return dx;
}

/** dw[ky][kx][ci][co] = sum_{b,oy,ox} x[b][oy+ky-pad][ox+kx-pad][ci] dy[b][oy][ox][co] */
function convWeightRef(c: ConvCase, x: ArrayLike<number>, dy: ArrayLike<number>): Float64Array {
  const { ho, wo } = outSize(c);
  const dw = new Float64Array(c.kh * c.kw * c.cin * c.cout);
  for (let ky = 0; ky < c.kh; ky++) {
    for (let kx = 0; kx < c.kw; kx++) {
      for (let b = 0; b < c.b; b++) {
        for (let oy = 0; oy < ho; oy++) {
          const iy = oy + ky - c.pad;
          if (iy < 0 || iy >= c.h) continue;
          for (let ox = 0; ox < wo; ox++) {
            const ix = ox + kx - c.pad;
            if (ix < 0 || ix >= c.w) continue;
            const xo = ((b * c.h + iy) * c.w + ix) * c.cin, yo = ((b * ho + oy) * wo + ox) * c.cout;
            for (let ci = 0; ci < c.cin; ci++) {
              const xv = x[xo + ci], wo0 = ((ky * c.kw + kx) * c.cin + ci) * c.cout;
              for (let co = 0; co < c.cout; co++) dw[wo0 + co] += xv * dy[yo + co];
            }
          }
        }
      }
    }
  }
  return dw;
}

/**
 * Runs forward, backward-data and backward-weight on the GPU (outputs pre-filled with garbage) with
 * one of the conv kernel sets: "tiled" (64 x 64 tiles in workgroup memory), "block" (4 x 4 outputs per
 * thread) or "wide" (16 x 8).
 */
async function runConv(
  c: ConvCase,
  x: Float32Array,
  w: Float32Array,
  dy: Float32Array,
  kernels: ConvKernels,
  act: DType = "f32", // storage of x, y, dy and dx (--precision); w and dw are f32
) {
  const { ho, wo } = outSize(c);
  const devices = gpu.convKernels;
  gpu.convKernels = kernels;
  const mark = gpu.allocated.length;
  const garbage = (n: number) => new Float32Array(n).fill(-777.5);
  const xs = [c.b, c.h, c.w, c.cin], ws = [c.kh, c.kw, c.cin, c.cout], ys = [c.b, ho, wo, c.cout];
  const xt = upload(gpu, x, xs, act), wt = upload(gpu, w, ws), dyt = upload(gpu, dy, ys, act);
  const yt = upload(gpu, garbage(dy.length), ys, act);
  const dxt = upload(gpu, garbage(x.length), xs, act), dwt = upload(gpu, garbage(w.length), ws);
  const dwList = conv2dBackwardWeight(gpu, xt, dyt, dwt, c.pad);
  submit(gpu, [...conv2d(gpu, xt, wt, yt, c.pad), ...conv2dBackwardData(gpu, dyt, wt, dxt, c.pad), ...dwList]);
  const y = await readTensor(gpu, yt), dx = await readTensor(gpu, dxt), dw = await readTensor(gpu, dwt);
  checkGpu(gpu);
  freeSince(gpu, mark);
  gpu.convKernels = devices;
  return { y, dx, dw, splits: dwList[0].grid[2] };
}

const KERNEL_SETS: ConvKernels[] = CONV_KERNEL_SETS;

async function checkConv(c: ConvCase, seed: number) {
  const rng = new Prng(seed);
  const { ho, wo } = outSize(c);
  const x = rng.normals(c.b * c.h * c.w * c.cin);
  const w = rng.normals(c.kh * c.kw * c.cin * c.cout, 1 / Math.sqrt(c.kh * c.kw * c.cin));
  const dy = rng.normals(c.b * ho * wo * c.cout);
  const ref = { y: convRef(c, x, w), dx: convDataRef(c, dy, w), dw: convWeightRef(c, x, dy) };
  const splits: Record<string, number> = {};
  for (const kernels of KERNEL_SETS) {
    const got = await runConv(c, x, w, dy, kernels);
    const tag = `${JSON.stringify(c)} (${kernels} kernels)`;
    assertClose(`conv2d ${tag}`, got.y, ref.y);
    assertClose(`conv2dBackwardData ${tag}`, got.dx, ref.dx);
    assertClose(`conv2dBackwardWeight ${tag}`, got.dw, ref.dw);
    splits[kernels] = got.splits;
  }
  return splits;
}

/** Rounds to the nearest f16, back in f32. */
const toF16 = (a: ArrayLike<number>) => Float32Array.from(Float16Array.from(a));

/** --precision f16: x and dy stored in f16, f32 accumulation, y and dx rounded once to f16, dw in f32. */
async function checkConvF16(c: ConvCase, seed: number) {
  const rng = new Prng(seed);
  const { ho, wo } = outSize(c);
  const x = toF16(rng.normals(c.b * c.h * c.w * c.cin)), dy = toF16(rng.normals(c.b * ho * wo * c.cout));
  const w = rng.normals(c.kh * c.kw * c.cin * c.cout, 1 / Math.sqrt(c.kh * c.kw * c.cin));
  const ref = { y: convRef(c, x, w), dx: convDataRef(c, dy, w), dw: convWeightRef(c, x, dy) };
  for (const kernels of KERNEL_SETS) {
    const got = await runConv(c, x, w, dy, kernels, "f16"), tag = `${JSON.stringify(c)} (${kernels} kernels, f16)`;
    // relative 2^-11 for the f16 rounding of the output, on top of the f32 accumulation's error
    const halfUlp = (name: string, g: Float32Array, r: ArrayLike<number>) =>
      g.forEach((v, i) => {
        assert.ok(Math.abs(v - r[i]) <= 2 ** -11 * Math.abs(r[i]) + 1e-4, `${name} ${tag}[${i}]: ${v} vs ${r[i]}`);
      });
    halfUlp("conv2d", got.y, ref.y);
    halfUlp("conv2dBackwardData", got.dx, ref.dx);
    assertClose(`conv2dBackwardWeight ${tag}`, got.dw, ref.dw);
  }
}

// ---- tests ----

Deno.test("conv: 3x3 pad 1, odd spatial size and channels (Cin 3, Cout 5)", async () => {
  await checkConv({ b: 2, h: 7, w: 9, cin: 3, cout: 5, kh: 3, kw: 3, pad: 1 }, 1);
});

Deno.test("conv: 3x3 pad 1, Cin 37 Cout 70 (not multiples of 4/8/32) and Cin 28 (the wide set's 32 x 16 blocks)", async () => {
  await checkConv({ b: 1, h: 5, w: 7, cin: 37, cout: 70, kh: 3, kw: 3, pad: 1 }, 2);
  await checkConv({ b: 3, h: 3, w: 3, cin: 70, cout: 37, kh: 3, kw: 3, pad: 1 }, 3);
  // 28 input and 70 output channels fill 32 x 16 blocks but for their last rows and columns: all three passes
  // take the wide set's big block there, and partial blocks on every edge (M = 60 pixels, not a multiple of 32)
  const c = { b: 2, h: 5, w: 6, cin: 28, cout: 70, kh: 3, kw: 3, pad: 1 };
  await checkConv(c, 22);
  const devices = gpu.convKernels, mark = gpu.allocated.length;
  gpu.convKernels = "wide";
  const x = tensor(gpu, [2, 5, 6, 28]), w = tensor(gpu, [3, 3, 28, 70]), y = tensor(gpu, [2, 5, 6, 70]);
  const labels = [
    ...conv2d(gpu, x, w, y, 1),
    ...conv2dBackwardData(gpu, y, w, x, 1),
    ...conv2dBackwardWeight(gpu, x, y, w, 1),
  ]
    .map((d) => d.label.split(" ")[0]);
  freeSince(gpu, mark);
  gpu.convKernels = devices;
  assert.deepEqual(labels.slice(0, 3), [
    "conv.forward_wide2",
    "conv.backward_data_wide2",
    "conv.backward_weight_wide2",
  ]);
});

Deno.test("conv: partial 64 x 64 x 16 tiles on every edge of M, N and K in all three passes", async () => {
  // forward M = 126 pixels (2 row tiles), N = 67 (2 column tiles), K = 9 x 21 = 189 (12 slices, the last partial);
  // backward data N = 21, K = 9 x 67; backward weight M = 189 (3 row tiles), K = 126 pixels
  await checkConv({ b: 3, h: 7, w: 6, cin: 21, cout: 67, kh: 3, kw: 3, pad: 1 }, 15);
});

Deno.test("conv: wide backward weight in units of 8 channels: Cin 8 and 6 (two taps a thread, the last tap alone), Cin 12 and 24", async () => {
  await checkConv({ b: 2, h: 15, w: 15, cin: 8, cout: 32, kh: 3, kw: 3, pad: 1 }, 19);
  await checkConv({ b: 1, h: 5, w: 4, cin: 6, cout: 13, kh: 3, kw: 3, pad: 1 }, 20);
  await checkConv({ b: 1, h: 5, w: 4, cin: 12, cout: 9, kh: 3, kw: 3, pad: 1 }, 21); // a half-used unit per tap
  await checkConv({ b: 2, h: 6, w: 5, cin: 24, cout: 13, kh: 3, kw: 3, pad: 1 }, 23); // 3 units a tap: threads span 2 taps
});

f16Test(gpu.hasF16, "conv, f16 storage: partial tiles, the whitening 2x2 and split-K, every kernel set", async () => {
  await checkConvF16({ b: 3, h: 7, w: 6, cin: 21, cout: 67, kh: 3, kw: 3, pad: 1 }, 16);
  await checkConvF16({ b: 2, h: 32, w: 32, cin: 3, cout: 24, kh: 2, kw: 2, pad: 0 }, 17);
  await checkConvF16({ b: 9, h: 31, w: 31, cin: 5, cout: 37, kh: 3, kw: 3, pad: 1 }, 18);
});

Deno.test("conv: 3x3 valid (pad 0) and pad 2 (output larger than input)", async () => {
  await checkConv({ b: 2, h: 6, w: 5, cin: 5, cout: 24, kh: 3, kw: 3, pad: 0 }, 4);
  await checkConv({ b: 1, h: 4, w: 5, cin: 3, cout: 6, kh: 3, kw: 3, pad: 2 }, 5);
});

Deno.test("conv: 7x7 pad 3 and 15x15 (pad 7 and valid), non-square 1x3 and 1x1", async () => {
  await checkConv({ b: 2, h: 9, w: 11, cin: 5, cout: 24, kh: 7, kw: 7, pad: 3 }, 6);
  await checkConv({ b: 1, h: 15, w: 15, cin: 3, cout: 5, kh: 15, kw: 15, pad: 7 }, 7);
  await checkConv({ b: 2, h: 17, w: 16, cin: 3, cout: 5, kh: 15, kw: 15, pad: 0 }, 8);
  await checkConv({ b: 2, h: 5, w: 6, cin: 5, cout: 3, kh: 1, kw: 3, pad: 1 }, 9);
  await checkConv({ b: 3, h: 5, w: 3, cin: 7, cout: 9, kh: 1, kw: 1, pad: 0 }, 10);
});

Deno.test("conv: whitening conv, 2x2 valid, Cin 3 -> Cout 24, B=2 32x32", async () => {
  await checkConv({ b: 2, h: 32, w: 32, cin: 3, cout: 24, kh: 2, kw: 2, pad: 0 }, 11);
});

Deno.test("conv: split-K backward weight (> 8192 output pixels, uneven last split)", async () => {
  // 9 x 31 x 31 = 8649 pixels -> conv.wgsl: 2 splits of 4325 and 4324
  const a = await checkConv({ b: 9, h: 31, w: 31, cin: 5, cout: 37, kh: 3, kw: 3, pad: 1 }, 12);
  // whitening shape, 19 x 31 x 31 = 18259 pixels -> conv.wgsl: 3 splits
  const b = await checkConv({ b: 19, h: 32, w: 32, cin: 3, cout: 24, kh: 2, kw: 2, pad: 0 }, 13);
  // conv.wgsl (CONV_SPLIT_K.target = 8192): 2 and 3 splits; conv_tiled.wgsl (one 64 x 64 tile, >= 256 pixels per
  // split): 33 and 71. If the policy changes, enlarge the cases so that every set still splits
  for (const set of KERNEL_SETS) {
    assert.ok(a[set] >= 2 && b[set] >= 2, `${set}: no split-K exercised (splits ${a[set]}, ${b[set]})`);
  }
});

Deno.test("conv: gradients match central finite differences of the float64 forward", async () => {
  const c: ConvCase = { b: 2, h: 5, w: 6, cin: 3, cout: 5, kh: 3, kw: 3, pad: 1 };
  const rng = new Prng(14);
  const { ho, wo } = outSize(c);
  const x = rng.normals(c.b * c.h * c.w * c.cin), w = rng.normals(c.kh * c.kw * c.cin * c.cout, 0.3);
  const r = rng.normals(c.b * ho * wo * c.cout); // L = sum(y * r), so dL/dy = r
  const sets = [];
  for (const k of KERNEL_SETS) sets.push(await runConv(c, x, w, r, k));
  const loss = (xv: ArrayLike<number>, wv: ArrayLike<number>) =>
    convRef(c, xv, wv).reduce((s, y, i) => s + y * r[i], 0);
  const fd = (v: Float32Array, i: number, f: (p: Float64Array) => number) => {
    const h = 1e-3, p = Float64Array.from(v);
    p[i] = v[i] + h;
    const lp = f(p);
    p[i] = v[i] - h;
    return (lp - f(p)) / (2 * h);
  };
  const dxRef = convDataRef(c, r, w), dwRef = convWeightRef(c, x, r);
  for (let k = 0; k < 12; k++) {
    // corners, edges and random interior entries
    const i = k < 2 ? [0, x.length - 1][k] : Math.floor(rng.next() * x.length);
    const j = k < 2 ? [0, w.length - 1][k] : Math.floor(rng.next() * w.length);
    const gx = fd(x, i, (p) => loss(p, w)), gw = fd(w, j, (p) => loss(x, p));
    assert.ok(Math.abs(gx - dxRef[i]) <= 1e-7 * (1 + Math.abs(gx)), `dx[${i}] fd ${gx} vs analytic ${dxRef[i]}`);
    assert.ok(Math.abs(gw - dwRef[j]) <= 1e-7 * (1 + Math.abs(gw)), `dw[${j}] fd ${gw} vs analytic ${dwRef[j]}`);
    sets.forEach((got, s) => {
      const tag = `(${KERNEL_SETS[s]} kernels)`;
      assert.ok(Math.abs(got.dx[i] - gx) <= 1e-4 * (1 + Math.abs(gx)), `GPU dx[${i}] ${got.dx[i]} vs fd ${gx} ${tag}`);
      assert.ok(Math.abs(got.dw[j] - gw) <= 1e-4 * (1 + Math.abs(gw)), `GPU dw[${j}] ${got.dw[j]} vs fd ${gw} ${tag}`);
    });
  }
});

// ---- conv fused with the 2x2 max pool (conv2dMaxPool) and its backward (maxPool2Unpool) ----

/**
 * 2x2 max pool (stride 2, floor) of a float64 conv output: pooled values, the first maximum of each
 * window (0..3, row-major) and the gap between the best and the runner-up (a tie within f32 rounding
 * may go either way on the GPU).
 */
function maxPoolRef(y: ArrayLike<number>, [b, h, w, c]: number[]) {
  const ph = h >> 1, pw = w >> 1, n = b * ph * pw * c;
  const out = { y: new Float64Array(n), arg: new Uint8Array(n), gap: new Float64Array(n) };
  for (let i = 0; i < n; i++) {
    const ch = i % c,
      px = Math.floor(i / c) % pw,
      py = Math.floor(i / (c * pw)) % ph,
      img = Math.floor(i / (c * pw * ph));
    const v = [0, 1, 2, 3].map((q) => y[((img * h + 2 * py + (q >> 1)) * w + 2 * px + (q & 1)) * c + ch]);
    let arg = 0;
    for (let q = 1; q < 4; q++) if (v[q] > v[arg]) arg = q;
    out.y[i] = v[arg];
    out.arg[i] = arg;
    out.gap[i] = v[arg] - Math.max(...v.filter((_, q) => q !== arg));
  }
  return out;
}

/** The fused pair (conv2dMaxPool, maxPool2Unpool) and the separate kernels (conv2d, maxPool2, maxPool2Backward). */
async function runConvPool(
  c: ConvCase,
  x: Float32Array,
  w: Float32Array,
  dp: Float32Array,
  kernels: ConvKernels,
  act: DType,
) {
  const { ho, wo } = outSize(c);
  const devices = gpu.convKernels;
  gpu.convKernels = kernels;
  const mark = gpu.allocated.length;
  const garbage = (n: number) => new Float32Array(n).fill(-777.5);
  const xs = [c.b, c.h, c.w, c.cin], ys = [c.b, ho, wo, c.cout], ps = [c.b, ho >> 1, wo >> 1, c.cout];
  const words = c.b * (ho >> 1) * (wo >> 1) * Math.ceil(c.cout / 4);
  const xt = upload(gpu, x, xs, act), wt = upload(gpu, w, [c.kh, c.kw, c.cin, c.cout]), dpt = upload(gpu, dp, ps, act);
  const pooled = upload(gpu, garbage(dp.length), ps, act),
    argmax = tensor(gpu, [...ps.slice(0, 3), Math.ceil(c.cout / 4)], "u32");
  gpu.device.queue.writeBuffer(argmax.buffer, 0, new Uint32Array(words).fill(0xdeadbeef)); // every word must be written
  const dx = upload(gpu, garbage(c.b * ho * wo * c.cout), ys, act);
  const full = upload(gpu, garbage(c.b * ho * wo * c.cout), ys, act),
    sepPooled = upload(gpu, garbage(dp.length), ps, act);
  const sepDx = upload(gpu, garbage(c.b * ho * wo * c.cout), ys, act);
  submit(gpu, [
    ...conv2dMaxPool(gpu, xt, wt, pooled, argmax, c.pad),
    ...maxPool2Unpool(gpu, argmax, dpt, dx),
    ...conv2d(gpu, xt, wt, full, c.pad),
    ...maxPool2(gpu, full, sepPooled),
    ...maxPool2Backward(gpu, full, dpt, sepDx),
  ]);
  const got = {
    pooled: await readTensor(gpu, pooled),
    argmax: new Uint32Array((await readBuffer(gpu, argmax.buffer, 0, words * 4)).buffer),
    dx: await readTensor(gpu, dx),
    sepPooled: await readTensor(gpu, sepPooled),
    sepDx: await readTensor(gpu, sepDx),
  };
  checkGpu(gpu);
  freeSince(gpu, mark);
  gpu.convKernels = devices;
  return got;
}

async function checkConvPool(c: ConvCase, seed: number, act: DType = "f32") {
  const rng = new Prng(seed);
  const { ho, wo } = outSize(c);
  const round = (a: Float32Array) => act === "f16" ? toF16(a) : a;
  const x = round(rng.normals(c.b * c.h * c.w * c.cin)), dp = round(rng.normals(c.b * (ho >> 1) * (wo >> 1) * c.cout));
  const w = rng.normals(c.kh * c.kw * c.cin * c.cout, 1 / Math.sqrt(c.kh * c.kw * c.cin));
  const ref = maxPoolRef(convRef(c, x, w), [c.b, ho, wo, c.cout]);
  const words = Math.ceil(c.cout / 4);
  for (const kernels of KERNEL_SETS) {
    const got = await runConvPool(c, x, w, dp, kernels, act), tag = `${JSON.stringify(c)} (${kernels} kernels, ${act})`;
    // the fused kernels compute every sum in the same order as the separate ones: the same bits
    assert.deepEqual(got.pooled, got.sepPooled, `conv2dMaxPool vs conv2d + maxPool2 ${tag}`);
    assert.deepEqual(got.dx, got.sepDx, `maxPool2Unpool vs maxPool2Backward ${tag}`);
    // and against the float64 reference: pooled values, and each window's winner unless it is a near-tie
    if (act === "f32") assertClose(`conv2dMaxPool ${tag}`, got.pooled, ref.y);
    else {
      got.pooled.forEach((v, i) => {
        assert.ok(Math.abs(v - ref.y[i]) <= 2 ** -11 * Math.abs(ref.y[i]) + 1e-4, `${tag}[${i}]: ${v} vs ${ref.y[i]}`);
      });
    }
    let decided = 0;
    for (let i = 0; i < ref.arg.length; i++) {
      const ch = i % c.cout, byte = (got.argmax[Math.floor(i / c.cout) * words + (ch >> 2)] >>> (8 * (ch % 4))) & 0xff;
      assert.ok(byte < 4, `argmax ${tag}[${i}] = ${byte}: not written`);
      if (ref.gap[i] > (act === "f16" ? 1e-2 : 1e-4)) {
        assert.equal(byte, ref.arg[i], `argmax ${tag}[${i}] (gap ${ref.gap[i]})`);
        decided++;
      }
    }
    assert.ok(decided > 0.9 * ref.arg.length, `only ${decided} of ${ref.arg.length} windows have a clear winner`);
    // the unpool's gradient sits at the winner of each window, zero elsewhere and on the dropped row/column
    for (let i = 0; i < got.dx.length; i++) {
      const ch = i % c.cout, ix = Math.floor(i / c.cout) % wo, iy = Math.floor(i / (c.cout * wo)) % ho;
      const img = Math.floor(i / (c.cout * wo * ho)), px = ix >> 1, py = iy >> 1;
      let want = 0;
      if (py < ho >> 1 && px < wo >> 1) {
        const o = ((img * (ho >> 1) + py) * (wo >> 1) + px) * c.cout + ch;
        const byte = (got.argmax[Math.floor(o / c.cout) * words + (ch >> 2)] >>> (8 * (ch % 4))) & 0xff;
        if (byte === 2 * (iy & 1) + (ix & 1)) want = dp[o];
      }
      assert.equal(got.dx[i], want, `maxPool2Unpool ${tag}[${i}]`);
    }
  }
}

Deno.test("conv + max pool fused: odd output sizes (dropped row/column), Cout 6 and 67 (partial words and tiles)", async () => {
  // output 7x9 -> pooled 3x4: 96 rows in window order (a partial 64-row tile), Cout 6: a half-used argmax word
  await checkConvPool({ b: 2, h: 7, w: 9, cin: 3, cout: 6, kh: 3, kw: 3, pad: 1 }, 31);
  // 15x15 -> 7x7, Cout 67: partial column tiles and blocks everywhere, 588 rows
  await checkConvPool({ b: 3, h: 15, w: 15, cin: 8, cout: 67, kh: 3, kw: 3, pad: 1 }, 32);
});

Deno.test("conv + max pool fused: group 1's shape (31x31, Cin 24 -> 8)", async () => {
  await checkConvPool({ b: 2, h: 31, w: 31, cin: 24, cout: 8, kh: 3, kw: 3, pad: 1 }, 33);
});

f16Test(gpu.hasF16, "conv + max pool fused: f16 storage", async () => {
  await checkConvPool({ b: 2, h: 7, w: 9, cin: 5, cout: 13, kh: 3, kw: 3, pad: 1 }, 34, "f16");
});
