// GPU tests of every non-conv kernel (pool, act, norm, linear, loss, reduce, optim, data) against
// independent float64 CPU references written here, finite-difference checks of the gradients, and
// tests of the host-side math (eigen-decomposition, whitening, schedules, plan, RNG).
// Shapes are small and odd: the CPU WebGPU device (lavapipe) is slow and odd sizes hit the edges.
import assert from "node:assert/strict";
import {
  accumulateMetrics,
  airbench94,
  augmentTrain,
  batchNorm,
  batchNormBackward,
  channelStats,
  checkGpu,
  createBuffer,
  crossEntropy,
  emaDecay,
  emaUpdate,
  epochAugmentation,
  firstEpochFlips,
  freeSince,
  gatherEval,
  gelu,
  geluBackward,
  globalMaxPool,
  globalMaxPoolBackward,
  hyp,
  initGpu,
  jacobiEigen,
  linear,
  linearBackwardData,
  linearBackwardWeight,
  maxPool2,
  maxPool2Backward,
  type NormParams,
  oneCycleLr,
  patchMoments,
  readBuffer,
  readTensor,
  Rng,
  setFrame,
  sgdNesterov,
  type StateLayout,
  submit,
  type Tensor,
  trainingPlan,
  ttaCombine,
  upload,
  uploadImages,
  whiteningFilters,
} from "../main.ts";

import { assertClose, f16Test, Prng } from "./util.ts";

const gpu = await initGpu();

// =================================================================================================
// Helpers (local on purpose: nothing below reuses main.ts math)
// =================================================================================================

/** |got - ref| <= atol + rtol |ref| for every element. */
function assertEach(name: string, got: ArrayLike<number>, ref: ArrayLike<number>, atol: number, rtol = atol) {
  assert.equal(got.length, ref.length, `${name}: length`);
  for (let i = 0; i < ref.length; i++) {
    const e = Math.abs(got[i] - ref[i]);
    assert.ok(e <= atol + rtol * Math.abs(ref[i]), `${name}[${i}]: got ${got[i]}, want ${ref[i]} (err ${e})`);
  }
}

/** Central difference of f at v[i] (float64). */
function centralDiff(v: ArrayLike<number>, i: number, f: (p: Float64Array) => number, h = 1e-5) {
  const p = Float64Array.from(v);
  p[i] = v[i] + h;
  const lp = f(p);
  p[i] = v[i] - h;
  return (lp - f(p)) / (2 * h);
}

/** Checks a few gradient entries: analytic CPU vs finite difference, and GPU vs finite difference. */
function checkFd(
  name: string,
  v: ArrayLike<number>,
  loss: (p: Float64Array) => number,
  analytic: ArrayLike<number>,
  gpuGrad: ArrayLike<number>,
  indices: number[],
  h = 1e-5,
) {
  for (const i of indices) {
    const fd = centralDiff(v, i, loss, h);
    const scale = 1 + Math.abs(fd);
    assert.ok(Math.abs(analytic[i] - fd) <= 1e-6 * scale, `${name}[${i}]: analytic ${analytic[i]} vs fd ${fd}`);
    assert.ok(Math.abs(gpuGrad[i] - fd) <= 1e-4 * scale, `${name}[${i}]: GPU ${gpuGrad[i]} vs fd ${fd}`);
  }
}

/** n indices of [0, len): both ends, then random ones. */
const someIndices = (
  rng: Prng,
  len: number,
  n: number,
) => [0, len - 1, ...Array.from({ length: n - 2 }, () => rng.int(len))];
const garbage = (n: number) => new Float32Array(n).fill(-777.5);
const dot = (a: ArrayLike<number>, b: ArrayLike<number>) => {
  let s = 0;
  for (let i = 0; i < a.length; i++) s += a[i] * b[i];
  return s;
};

/** Runs `list` and reads back `outs`, then frees every buffer the test allocated since `mark`. */
async function run(list: Parameters<typeof submit>[1], outs: Tensor[], mark: number) {
  submit(gpu, list);
  const res: Float32Array[] = [];
  for (const t of outs) res.push(await readTensor(gpu, t));
  checkGpu(gpu);
  freeSince(gpu, mark);
  return res;
}

/** erf in float64: erf x = 2/sqrt(pi) e^{-x^2} sum_n 2^n x^{2n+1} / (1*3*...*(2n+1)) (no cancellation). */
function erf(x: number): number {
  const a = Math.abs(x);
  if (a > 6.5) return Math.sign(x); // erfc(6.5) < 4e-20
  let term = a, sum = a;
  for (let n = 1; n < 500 && term > 1e-17 * sum; n++) {
    term *= (2 * a * a) / (2 * n + 1);
    sum += term;
  }
  return Math.sign(x) * (2 / Math.sqrt(Math.PI)) * Math.exp(-a * a) * sum;
}
const phiCdf = (x: number) => 0.5 * (1 + erf(x / Math.SQRT2));
const geluRef = (x: number) => x * phiCdf(x);
const geluGradRef = (x: number) => phiCdf(x) + (x * Math.exp(-0.5 * x * x)) / Math.sqrt(2 * Math.PI);

// =================================================================================================
// Pooling
// =================================================================================================

/** 2x2/2 max pool, floor; returns y and, per output, the flat index of the first maximum (row-major). */
function maxPool2Ref(x: ArrayLike<number>, [b, h, w, c]: number[]) {
  const ho = Math.floor(h / 2), wo = Math.floor(w / 2);
  const y = new Float64Array(b * ho * wo * c), arg = new Int32Array(y.length);
  for (let n = 0; n < b; n++) {
    for (let oy = 0; oy < ho; oy++) {
      for (let ox = 0; ox < wo; ox++) {
        for (let ch = 0; ch < c; ch++) {
          let best = -Infinity, at = -1;
          for (const [dy, dx] of [[0, 0], [0, 1], [1, 0], [1, 1]]) {
            const i = ((n * h + 2 * oy + dy) * w + 2 * ox + dx) * c + ch;
            if (x[i] > best) [best, at] = [x[i], i];
          }
          const o = ((n * ho + oy) * wo + ox) * c + ch;
          y[o] = best;
          arg[o] = at;
        }
      }
    }
  }
  return { y, arg };
}

function globalMaxRef(x: ArrayLike<number>, [b, h, w, c]: number[]) {
  const y = new Float64Array(b * c), arg = new Int32Array(b * c);
  for (let n = 0; n < b; n++) {
    for (let ch = 0; ch < c; ch++) {
      let best = -Infinity, at = -1;
      for (let p = 0; p < h * w; p++) {
        const i = (n * h * w + p) * c + ch;
        if (x[i] > best) [best, at] = [x[i], i];
      }
      y[n * c + ch] = best;
      arg[n * c + ch] = at;
    }
  }
  return { y, arg };
}

/** dx = scatter of dy to the argmax positions. */
function scatterRef(len: number, arg: Int32Array, dy: ArrayLike<number>) {
  const dx = new Float64Array(len);
  for (let o = 0; o < arg.length; o++) dx[arg[o]] += dy[o];
  return dx;
}

async function checkMaxPool2(shape: number[], x: Float32Array, dy: Float32Array) {
  const mark = gpu.allocated.length;
  const [b, h, w, c] = shape, ys = [b, h >> 1, w >> 1, c];
  const xt = upload(gpu, x, shape), yt = upload(gpu, garbage(dy.length), ys), dyt = upload(gpu, dy, ys);
  const dxt = upload(gpu, garbage(x.length), shape);
  const [y, dx] = await run([...maxPool2(gpu, xt, yt), ...maxPool2Backward(gpu, xt, dyt, dxt)], [yt, dxt], mark);
  const ref = maxPool2Ref(x, shape);
  assertEach(`maxPool2 [${shape}]`, y, ref.y, 0, 0);
  assertEach(`maxPool2Backward [${shape}]`, dx, scatterRef(x.length, ref.arg, dy), 0, 0);
  return { y, dx, ref };
}

Deno.test("maxPool2: odd sizes (7x9, 31x31, 3x3) forward and backward, dropped last row/col get 0", async () => {
  const rng = new Prng(101);
  for (const shape of [[2, 7, 9, 5], [1, 31, 31, 3], [3, 3, 3, 37]]) {
    const n = shape.reduce((a, b) => a * b), ys = [shape[0], shape[1] >> 1, shape[2] >> 1, shape[3]];
    const dy = rng.normals(ys.reduce((a, b) => a * b));
    const { dx } = await checkMaxPool2(shape, rng.normals(n), dy);
    // the dropped last row and column (odd H, W) must be exactly zero
    const [b, h, w, c] = shape;
    for (let i = 0; i < b * h * w * c; i++) {
      const ix = Math.floor(i / c) % w, iy = Math.floor(i / (c * w)) % h;
      if (iy === h - 1 || ix === w - 1) assert.equal(dx[i], 0, `dx[${i}] in a dropped row/col`);
    }
  }
});

Deno.test("maxPool2: ties send the gradient to the first maximum (row-major), negative values", async () => {
  const rng = new Prng(102);
  const shape = [2, 5, 7, 6], n = 2 * 5 * 7 * 6;
  const x = Float32Array.from({ length: n }, () => rng.int(3) - 5); // values in {-5,-4,-3}: many ties
  const dy = rng.normals(2 * 2 * 3 * 6);
  await checkMaxPool2(shape, x, dy);
});

Deno.test("maxPool2: backward matches finite differences", async () => {
  const rng = new Prng(103);
  const shape = [2, 5, 7, 3], x = rng.normals(2 * 5 * 7 * 3), r = rng.normals(2 * 2 * 3 * 3);
  const { dx, ref } = await checkMaxPool2(shape, x, r);
  const loss = (p: Float64Array) => dot(maxPool2Ref(p, shape).y, r);
  const analytic = scatterRef(x.length, ref.arg, r);
  // the argmax entries (non-zero gradient) and random ones
  const idx = [...Array.from(ref.arg.slice(0, 6)), ...someIndices(rng, x.length, 6)];
  checkFd("maxPool2 dx", x, loss, analytic, dx, idx, 1e-6);
});

async function checkGlobalMax(shape: number[], x: Float32Array, dy: Float32Array) {
  const mark = gpu.allocated.length;
  const [b, , , c] = shape;
  const xt = upload(gpu, x, shape), yt = upload(gpu, garbage(b * c), [b, c]), dyt = upload(gpu, dy, [b, c]);
  const dxt = upload(gpu, garbage(x.length), shape);
  const [y, dx] = await run(
    [...globalMaxPool(gpu, xt, yt), ...globalMaxPoolBackward(gpu, xt, dyt, dxt)],
    [yt, dxt],
    mark,
  );
  const ref = globalMaxRef(x, shape);
  assertEach(`globalMaxPool [${shape}]`, y, ref.y, 0, 0);
  assertEach(`globalMaxPoolBackward [${shape}]`, dx, scatterRef(x.length, ref.arg, dy), 0, 0);
  return { y, dx, ref };
}

Deno.test("globalMaxPool: forward, backward, ties to the first maximum, finite differences", async () => {
  const rng = new Prng(104);
  await checkGlobalMax([3, 5, 7, 37], rng.normals(3 * 5 * 7 * 37), rng.normals(3 * 37));
  await checkGlobalMax([2, 3, 3, 70], rng.normals(2 * 9 * 70, 1, -10), rng.normals(2 * 70)); // all negative
  const ties = Float32Array.from({ length: 2 * 4 * 3 * 5 }, () => rng.int(2));
  await checkGlobalMax([2, 4, 3, 5], ties, rng.normals(2 * 5));
  const shape = [2, 3, 5, 4], x = rng.normals(2 * 3 * 5 * 4), r = rng.normals(2 * 4);
  const { dx, ref } = await checkGlobalMax(shape, x, r);
  const loss = (p: Float64Array) => dot(globalMaxRef(p, shape).y, r);
  const idx = [...Array.from(ref.arg.slice(0, 4)), ...someIndices(rng, x.length, 6)];
  checkFd("globalMaxPool dx", x, loss, scatterRef(x.length, ref.arg, r), dx, idx, 1e-6);
});

// =================================================================================================
// GELU
// =================================================================================================

Deno.test("erf reference (test self-check): known values to ~1e-15", () => {
  const known = [[0.01, 0.011283415555849616], [0.5, 0.5204998778130465], [1, 0.8427007929497149]];
  known.push([-2, -0.9953222650189527], [3, 0.9999779095030014], [5, 0.9999999999984626], [7, 1]);
  for (const [x, v] of known) assert.ok(Math.abs(erf(x) - v) < 2e-15, `erf(${x}) = ${erf(x)}, want ${v}`);
});

Deno.test("gelu: exact-erf forward and backward vs float64, incl. tails and zero", async () => {
  const rng = new Prng(201);
  const special = [0, -0, 1e-3, -1e-3, 0.5, -0.5, 1, -1, 3, -3, 5, -5, 8, -8, 10, -10, 30, -30];
  const ramp = Array.from({ length: 161 }, (_, i) => -8 + i * 0.1);
  const x = Float32Array.from([...special, ...ramp, ...rng.normals(1000, 2)]); // 1179 values
  const dy = rng.normals(x.length);
  const mark = gpu.allocated.length;
  const xt = upload(gpu, x, [x.length]), dyt = upload(gpu, dy, [x.length]);
  const yt = upload(gpu, garbage(x.length), [x.length]), dxt = upload(gpu, garbage(x.length), [x.length]);
  const [y, dx] = await run([...gelu(gpu, xt, yt), ...geluBackward(gpu, xt, dyt, dxt)], [yt, dxt], mark);
  const yRef = Array.from(x, geluRef), dxRef = Array.from(x, (v, i) => dy[i] * geluGradRef(v));
  assertEach("gelu", y, yRef, 1e-6, 1e-6);
  assertEach("geluBackward", dx, dxRef, 1e-6, 1e-6);
  // gradient check on the float64 forward, with L = sum(gelu(x) * dy)
  const loss = (p: Float64Array) => p.reduce((s, v, i) => s + geluRef(v) * dy[i], 0);
  checkFd("gelu dx", x, loss, dxRef, dx, [0, 6, 14, 100, 500, x.length - 1, ...someIndices(rng, x.length, 6)]);
});

// =================================================================================================
// Batch norm
// =================================================================================================

interface BnCase {
  rows: number;
  c: number;
  x: Float32Array<ArrayBuffer>;
  weight: Float32Array;
  bias: Float32Array;
  rm: Float32Array;
  rv: Float32Array;
}

function bnStatsRef({ rows, c, x }: { rows: number; c: number; x: ArrayLike<number> }) {
  const mean = new Float64Array(c), varB = new Float64Array(c), varU = new Float64Array(c);
  for (let ch = 0; ch < c; ch++) {
    let s = 0;
    for (let r = 0; r < rows; r++) s += x[r * c + ch];
    const m = s / rows;
    let ss = 0;
    for (let r = 0; r < rows; r++) ss += (x[r * c + ch] - m) ** 2;
    mean[ch] = m;
    varB[ch] = ss / rows;
    varU[ch] = ss / (rows - 1);
  }
  return { mean, varB, varU };
}

function bnApplyRef(
  x: ArrayLike<number>,
  rows: number,
  c: number,
  mean: ArrayLike<number>,
  variance: ArrayLike<number>,
  w: ArrayLike<number>,
  b: ArrayLike<number>,
) {
  const y = new Float64Array(rows * c), eps = hyp.net.batchNormEps;
  for (let r = 0; r < rows; r++) {
    for (let ch = 0; ch < c; ch++) {
      y[r * c + ch] = ((x[r * c + ch] - mean[ch]) / Math.sqrt(variance[ch] + eps)) * w[ch] + b[ch];
    }
  }
  return y;
}

/** Training-mode forward in float64 (batch statistics), for finite differences. */
function bnTrainRef(x: ArrayLike<number>, rows: number, c: number, w: ArrayLike<number>, b: ArrayLike<number>) {
  const { mean, varB } = bnStatsRef({ rows, c, x });
  return bnApplyRef(x, rows, c, mean, varB, w, b);
}

function bnCase(rng: Prng, rows: number, c: number): BnCase {
  const shift = Array.from({ length: c }, () => 4 * rng.normal()),
    scale = Array.from({ length: c }, () => 0.2 + 3 * rng.next());
  return {
    rows,
    c,
    x: Float32Array.from({ length: rows * c }, (_, i) => shift[i % c] + scale[i % c] * rng.normal()),
    weight: rng.normals(c, 0.3, 1),
    bias: rng.normals(c),
    rm: rng.normals(c),
    rv: Float32Array.from({ length: c }, () => 0.5 + rng.next()),
  };
}

function bnTensors(k: BnCase, shape: number[]) {
  const p: NormParams = {
    weight: upload(gpu, k.weight, [k.c]),
    bias: upload(gpu, k.bias, [k.c]),
    runningMean: upload(gpu, k.rm, [k.c]),
    runningVar: upload(gpu, k.rv, [k.c]),
  };
  return {
    p,
    x: upload(gpu, k.x, shape),
    y: upload(gpu, garbage(k.x.length), shape),
    stats: upload(gpu, garbage(2 * k.c), [k.c, 2]),
  };
}

async function checkBnTraining(shape: number[], seed: number) {
  const rng = new Prng(seed);
  const c = shape[3], rows = shape[0] * shape[1] * shape[2];
  const k = bnCase(rng, rows, c);
  const mark = gpu.allocated.length;
  const t = bnTensors(k, shape);
  const [y, stats, rm, rv] = await run(batchNorm(gpu, t.x, t.p, t.y, t.stats, true), [
    t.y,
    t.stats,
    t.p.runningMean,
    t.p.runningVar,
  ], mark);
  const { mean, varB, varU } = bnStatsRef(k);
  const m = hyp.net.batchNormMomentum, eps = hyp.net.batchNormEps;
  const statsRef = Array.from({ length: 2 * c }, (_, i) => i % 2 ? 1 / Math.sqrt(varB[i >> 1] + eps) : mean[i >> 1]);
  const tag = `[${shape}]`;
  assertEach(`batchNorm train stats ${tag}`, stats, statsRef, 1e-5, 1e-5);
  assertEach(`batchNorm runningMean ${tag}`, rm, Array.from(k.rm, (v, i) => (1 - m) * v + m * mean[i]), 1e-5, 1e-5);
  assertEach(`batchNorm runningVar ${tag}`, rv, Array.from(k.rv, (v, i) => (1 - m) * v + m * varU[i]), 1e-5, 1e-5);
  assertClose(`batchNorm train y ${tag}`, y, bnApplyRef(k.x, rows, c, mean, varB, k.weight, k.bias), 1e-5);
  return k;
}

Deno.test("batchNorm training: 1125 rows (5x15x15, > 256 and not a multiple), C=37, offset data", async () => {
  await checkBnTraining([5, 15, 15, 37], 301);
});

Deno.test("batchNorm training: one partial chunk (30 rows), C=70 (two channel workgroups)", async () => {
  await checkBnTraining([2, 3, 5, 70], 302);
  await checkBnTraining([1, 16, 16, 3], 303); // exactly one full chunk of 256 rows
});

Deno.test("batchNorm eval: uses the running statistics and leaves them unchanged", async () => {
  const rng = new Prng(304);
  const shape = [3, 7, 7, 37], k = bnCase(rng, 147, 37);
  const mark = gpu.allocated.length;
  const t = bnTensors(k, shape);
  const [y, stats, rm, rv] = await run(batchNorm(gpu, t.x, t.p, t.y, t.stats, false), [
    t.y,
    t.stats,
    t.p.runningMean,
    t.p.runningVar,
  ], mark);
  assertEach("batchNorm eval runningMean", rm, k.rm, 0, 0);
  assertEach("batchNorm eval runningVar", rv, k.rv, 0, 0);
  const statsRef = Array.from({ length: 74 }, (_, i) => i % 2 ? 1 / Math.sqrt(k.rv[i >> 1]) : k.rm[i >> 1]);
  assertEach("batchNorm eval stats", stats, statsRef, 1e-6, 1e-6);
  assertClose("batchNorm eval y", y, bnApplyRef(k.x, 147, 37, k.rm, k.rv, k.weight, k.bias), 1e-5);
});

/** dx, dbias, dweight of training-mode batch norm, in float64. */
function bnBackwardRef(k: BnCase, dy: ArrayLike<number>) {
  const { rows, c, x, weight } = k, { mean, varB } = bnStatsRef(k);
  const inv = Array.from(varB, (v) => 1 / Math.sqrt(v + hyp.net.batchNormEps));
  const dbias = new Float64Array(c), dweight = new Float64Array(c), dx = new Float64Array(rows * c);
  for (let r = 0; r < rows; r++) {
    for (let ch = 0; ch < c; ch++) {
      const i = r * c + ch, xhat = (x[i] - mean[ch]) * inv[ch];
      dbias[ch] += dy[i];
      dweight[ch] += dy[i] * xhat;
    }
  }
  for (let r = 0; r < rows; r++) {
    for (let ch = 0; ch < c; ch++) {
      const i = r * c + ch, xhat = (x[i] - mean[ch]) * inv[ch];
      dx[i] = weight[ch] * inv[ch] * (dy[i] - dbias[ch] / rows - (xhat * dweight[ch]) / rows);
    }
  }
  return { dx, dbias, dweight };
}

async function checkBnBackward(shape: number[], seed: number) {
  const rng = new Prng(seed);
  const c = shape[3], rows = shape[0] * shape[1] * shape[2];
  const k = bnCase(rng, rows, c), r = rng.normals(rows * c); // L = sum(y * r)
  const mark = gpu.allocated.length;
  const t = bnTensors(k, shape);
  const dyt = upload(gpu, r, shape), dxt = upload(gpu, garbage(rows * c), shape);
  const dbt = upload(gpu, garbage(c), [c]), dwt = upload(gpu, garbage(c), [c]);
  const [dx, db, dw] = await run(
    [
      ...batchNorm(gpu, t.x, t.p, t.y, t.stats, true),
      ...batchNormBackward(gpu, t.x, dyt, t.stats, t.p, dxt, dbt, dwt),
    ],
    [dxt, dbt, dwt],
    mark,
  );
  const ref = bnBackwardRef(k, r), tag = `[${shape}]`;
  assertClose(`batchNormBackward dbias ${tag}`, db, ref.dbias, 1e-5);
  assertClose(`batchNormBackward dweight ${tag}`, dw, ref.dweight, 1e-5);
  assertClose(`batchNormBackward dx ${tag}`, dx, ref.dx, 1e-5);
  // finite differences of the float64 training forward (the batch statistics depend on x)
  const lossX = (p: Float64Array) => dot(bnTrainRef(p, rows, c, k.weight, k.bias), r);
  checkFd(`batchNorm dx ${tag}`, k.x, lossX, ref.dx, dx, someIndices(rng, rows * c, 8), 1e-4);
  const lossW = (p: Float64Array) => dot(bnTrainRef(k.x, rows, c, p, k.bias), r);
  checkFd(`batchNorm dweight ${tag}`, k.weight, lossW, ref.dweight, dw, someIndices(rng, c, 3), 1e-4);
  const lossB = (p: Float64Array) => dot(bnTrainRef(k.x, rows, c, k.weight, p), r);
  checkFd(`batchNorm dbias ${tag}`, k.bias, lossB, ref.dbias, db, someIndices(rng, c, 3), 1e-4);
}

Deno.test("batchNormBackward: dx, dbias, dweight vs float64 and finite differences (1125 rows, C=37)", async () => {
  await checkBnBackward([5, 15, 15, 37], 305);
});

Deno.test("batchNormBackward: one partial chunk (30 rows), C=70", async () => {
  await checkBnBackward([2, 3, 5, 70], 306);
});

Deno.test("batchNorm + GELU fused: y = gelu(batchnorm(x)), backward vs float64 and finite differences", async () => {
  const rng = new Prng(307), shape = [5, 15, 15, 37], rows = 1125, c = 37;
  const k = bnCase(rng, rows, c), r = rng.normals(rows * c); // L = sum(gelu(batchnorm(x)) * r)
  const mark = gpu.allocated.length;
  const t = bnTensors(k, shape);
  const dyt = upload(gpu, r, shape), dxt = upload(gpu, garbage(rows * c), shape);
  const dbt = upload(gpu, garbage(c), [c]), dwt = upload(gpu, garbage(c), [c]);
  const [y, dx, db, dw] = await run(
    [
      ...batchNorm(gpu, t.x, t.p, t.y, t.stats, true, "gelu"),
      ...batchNormBackward(gpu, t.x, dyt, t.stats, t.p, dxt, dbt, dwt, "gelu"),
    ],
    [t.y, dxt, dbt, dwt],
    mark,
  );
  const n = bnTrainRef(k.x, rows, c, k.weight, k.bias);
  assertClose("batchNorm+gelu y", y, Array.from(n, geluRef), 1e-5);
  // chain rule by hand: the norm's backward of g = r * gelu'(n)
  const ref = bnBackwardRef(k, Float32Array.from(n, (v, i) => r[i] * geluGradRef(v)));
  assertClose("batchNorm+gelu dbias", db, ref.dbias, 1e-5);
  assertClose("batchNorm+gelu dweight", dw, ref.dweight, 1e-5);
  assertClose("batchNorm+gelu dx", dx, ref.dx, 1e-5);
  const loss = (x: ArrayLike<number>, b: ArrayLike<number>) =>
    dot(Array.from(bnTrainRef(x, rows, c, k.weight, b), geluRef), r);
  checkFd("batchNorm+gelu dx", k.x, (p) => loss(p, k.bias), ref.dx, dx, someIndices(rng, rows * c, 8), 1e-4);
  checkFd("batchNorm+gelu dbias", k.bias, (p) => loss(k.x, p), ref.dbias, db, someIndices(rng, c, 3), 1e-4);
});

// =================================================================================================
// Linear head
// =================================================================================================

function linearRef(x: ArrayLike<number>, w: ArrayLike<number>, b: number, nIn: number, nOut: number, scale: number) {
  const y = new Float64Array(b * nOut);
  for (let n = 0; n < b; n++) {
    for (let o = 0; o < nOut; o++) {
      let s = 0;
      for (let i = 0; i < nIn; i++) s += x[n * nIn + i] * w[o * nIn + i];
      y[n * nOut + o] = scale * s;
    }
  }
  return y;
}

Deno.test("linear: forward, backward data and weight vs float64 and finite differences", async () => {
  const rng = new Prng(401);
  for (const [b, nIn, nOut, scale] of [[13, 70, 11, 1 / 9], [1, 37, 10, 1], [5, 3, 1, -0.5]]) {
    const x = rng.normals(b * nIn), w = rng.normals(nOut * nIn, 0.2), r = rng.normals(b * nOut);
    const mark = gpu.allocated.length;
    const xt = upload(gpu, x, [b, nIn]), wt = upload(gpu, w, [nOut, nIn]), dyt = upload(gpu, r, [b, nOut]);
    const yt = upload(gpu, garbage(b * nOut), [b, nOut]), dxt = upload(gpu, garbage(x.length), [b, nIn]);
    const dwt = upload(gpu, garbage(w.length), [nOut, nIn]);
    const [y, dx, dw] = await run(
      [
        linear(gpu, xt, wt, yt, scale),
        linearBackwardData(gpu, dyt, wt, dxt, scale),
        linearBackwardWeight(gpu, xt, dyt, dwt, scale),
      ],
      [yt, dxt, dwt],
      mark,
    );
    const dxRef = new Float64Array(b * nIn), dwRef = new Float64Array(nOut * nIn);
    for (let n = 0; n < b; n++) {
      for (let o = 0; o < nOut; o++) {
        for (let i = 0; i < nIn; i++) {
          dxRef[n * nIn + i] += scale * r[n * nOut + o] * w[o * nIn + i];
          dwRef[o * nIn + i] += scale * r[n * nOut + o] * x[n * nIn + i];
        }
      }
    }
    const tag = `[${b}x${nIn} -> ${nOut}, scale ${scale}]`;
    assertClose(`linear ${tag}`, y, linearRef(x, w, b, nIn, nOut, scale), 1e-5);
    assertClose(`linearBackwardData ${tag}`, dx, dxRef, 1e-5);
    assertClose(`linearBackwardWeight ${tag}`, dw, dwRef, 1e-5);
    const lossX = (p: Float64Array) => dot(linearRef(p, w, b, nIn, nOut, scale), r);
    const lossW = (p: Float64Array) => dot(linearRef(x, p, b, nIn, nOut, scale), r);
    checkFd(`linear dx ${tag}`, x, lossX, dxRef, dx, someIndices(rng, x.length, 5), 1e-3);
    checkFd(`linear dw ${tag}`, w, lossW, dwRef, dw, someIndices(rng, w.length, 5), 1e-3);
  }
});

// =================================================================================================
// Loss, TTA, metrics
// =================================================================================================

/** Per-row label-smoothed soft-target CE in float64: loss, correct, d(gradScale * sum loss)/dlogits. */
function crossEntropyRef(
  logits: ArrayLike<number>,
  targets: ArrayLike<number>,
  rows: number,
  k: number,
  scale: number,
  valid: number,
) {
  const s = hyp.opt.labelSmoothing;
  const loss = new Float64Array(rows), correct = new Float64Array(rows), dlogits = new Float64Array(rows * k);
  for (let b = 0; b < valid; b++) {
    const z = Array.from({ length: k }, (_, j) => logits[b * k + j]);
    const t = Array.from({ length: k }, (_, j) => (1 - s) * targets[b * k + j] + s / k);
    const m = Math.max(...z), lse = m + Math.log(z.reduce((a, v) => a + Math.exp(v - m), 0));
    const argmax = (v: number[]) => v.indexOf(Math.max(...v)); // first maximum
    loss[b] = -t.reduce((a, tj, j) => a + tj * (z[j] - lse), 0);
    correct[b] = argmax(z) === argmax(Array.from({ length: k }, (_, j) => targets[b * k + j])) ? 1 : 0;
    for (let j = 0; j < k; j++) dlogits[b * k + j] = scale * (Math.exp(z[j] - lse) - t[j]);
  }
  return { loss, correct, dlogits };
}

function ceCase(rng: Prng, rows: number, k: number) {
  const logits = rng.normals(rows * k, 3), targets = new Float32Array(rows * k);
  const mix = 9 / 1024;
  for (let b = 0; b < rows; b++) {
    const label = rng.int(k), other = (label + 1 + rng.int(k - 1)) % k;
    if (b % 3 === 1) {
      targets[b * k + label] = 1 - mix; // cutmix-style soft target
      targets[b * k + other] = mix;
    } else targets[b * k + label] = 1;
    if (b % 4 === 0) logits[b * k + label] += 6; // mostly right answers, some wrong
  }
  // row 2: huge logits (stability); row 3: tied logits; row 5: tied targets (first max wins)
  for (let j = 0; j < k; j++) logits[2 * k + j] = j % 2 ? 100 - j : -100 + j;
  logits.fill(1.5, 3 * k, 4 * k);
  targets.fill(0, 5 * k, 6 * k);
  targets[5 * k + 2] = targets[5 * k + 7] = 0.5;
  logits[5 * k + 2] = logits[5 * k + 7] = 9;
  return { logits, targets };
}

async function runCrossEntropy(
  logits: Float32Array,
  targets: Float32Array,
  rows: number,
  k: number,
  scale: number,
  valid: number,
) {
  const mark = gpu.allocated.length;
  const lt = upload(gpu, logits, [rows, k]), tt = upload(gpu, targets, [rows, k]);
  const loss = upload(gpu, garbage(rows), [rows]), correct = upload(gpu, garbage(rows), [rows]);
  const dl = upload(gpu, garbage(rows * k), [rows, k]);
  setFrame(gpu, { valid });
  const [l, c, d] = await run([crossEntropy(gpu, lt, tt, loss, correct, dl, scale)], [loss, correct, dl], mark);
  return { loss: l, correct: c, dlogits: d };
}

Deno.test("crossEntropy: loss, correct (first max, ties), dlogits vs float64 and finite differences", async () => {
  const rng = new Prng(501);
  const rows = 13, k = 10, scale = 0.75;
  const { logits, targets } = ceCase(rng, rows, k);
  const got = await runCrossEntropy(logits, targets, rows, k, scale, rows);
  const ref = crossEntropyRef(logits, targets, rows, k, scale, rows);
  assertEach("crossEntropy loss", got.loss, ref.loss, 1e-5, 1e-5);
  assertEach("crossEntropy correct", got.correct, ref.correct, 0, 0);
  assertEach("crossEntropy dlogits", got.dlogits, ref.dlogits, 1e-6, 1e-5);
  assert.equal(ref.correct[3], 0, "tied logits: first max (class 0) vs the label"); // sanity of the fixture
  assert.ok(ref.correct.some((v) => v === 1) && ref.correct.some((v) => v === 0));
  const lossOf = (p: Float64Array) =>
    scale * crossEntropyRef(p, targets, rows, k, 1, rows).loss.reduce((a, v) => a + v, 0);
  const idx = [0, 21, 22, 35, 52, 57, rows * k - 1, ...someIndices(rng, rows * k, 5)];
  checkFd("crossEntropy dlogits", logits, lossOf, ref.dlogits, got.dlogits, idx, 1e-5);
});

Deno.test("crossEntropy: rows >= frame.valid are zeroed (loss, correct, dlogits)", async () => {
  const rng = new Prng(502);
  const rows = 70, k = 10, valid = 67; // two workgroups of 64 rows, mask inside the second
  const { logits, targets } = ceCase(rng, rows, k);
  const got = await runCrossEntropy(logits, targets, rows, k, 2, valid);
  const ref = crossEntropyRef(logits, targets, rows, k, 2, valid);
  assertEach("masked loss", got.loss, ref.loss, 1e-5, 1e-5);
  assertEach("masked correct", got.correct, ref.correct, 0, 0);
  assertEach("masked dlogits", got.dlogits, ref.dlogits, 1e-6, 1e-5);
  for (let b = valid; b < rows; b++) assert.equal(got.loss[b], 0);
  const none = await runCrossEntropy(logits, targets, rows, k, 2, 0);
  assertEach(
    "valid 0: all zero",
    [...none.loss, ...none.correct, ...none.dlogits],
    new Array(rows * (k + 2)).fill(0),
    0,
    0,
  );
});

Deno.test("ttaCombine: 1 view copied, 2 averaged, 6 weighted 1/4, 1/4 and 1/8 each (airbench94's level 2)", async () => {
  const rng = new Prng(601);
  // view v of row b is logits[v h + b]; level 2: 0.5 mean(v0, v1) + 0.5 mean(mean(v2, v3), mean(v4, v5))
  const weights: Record<number, number[]> = { 1: [1], 2: [0.5, 0.5], 6: [0.25, 0.25, 0.125, 0.125, 0.125, 0.125] };
  for (const views of [1, 2, 6]) {
    for (const [h, k] of [[7, 10], [70, 3]]) {
      const logits = rng.normals(views * h * k, 5);
      const mark = gpu.allocated.length;
      const lt = upload(gpu, logits, [views * h, k]), out = upload(gpu, garbage(h * k), [h, k]);
      const [o] = await run([ttaCombine(gpu, lt, out, views)], [out], mark);
      const ref = Array.from(
        { length: h * k },
        (_, i) => weights[views].reduce((sum, w, v) => sum + w * logits[v * h * k + i], 0),
      );
      assertEach(`ttaCombine ${views} views ${h}x${k}`, o, ref, 1e-6, 1e-6);
    }
  }
});

Deno.test("accumulateMetrics: adds sum(loss), sum(correct) into its slot only", async () => {
  const rng = new Prng(701);
  const rows = 777;
  const loss = Float32Array.from({ length: rows }, () => 3 * rng.next());
  const correct = Float32Array.from({ length: rows }, () => rng.int(2));
  const mark = gpu.allocated.length;
  const lt = upload(gpu, loss, [rows]), ct = upload(gpu, correct, [rows]);
  const metrics = createBuffer(gpu, 24);
  gpu.device.queue.writeBuffer(metrics, 0, Float32Array.from([1, 2, 3, 4, 5, 6]));
  const part = { ...lt, shape: [300] }, partC = { ...ct, shape: [300] };
  submit(gpu, [accumulateMetrics(gpu, lt, ct, metrics, 1), accumulateMetrics(gpu, lt, ct, metrics, 1)]);
  submit(gpu, [accumulateMetrics(gpu, part, partC, metrics, 2)]);
  const m = await readBuffer(gpu, metrics, 0, 24);
  checkGpu(gpu);
  freeSince(gpu, mark);
  const sum = (a: Float32Array, n = a.length) => a.subarray(0, n).reduce((s, v) => s + v, 0);
  assertEach(
    "metrics",
    m,
    [1, 2, 3 + 2 * sum(loss), 4 + 2 * sum(correct), 5 + sum(loss, 300), 6 + sum(correct, 300)],
    1e-5,
    1e-6,
  );
  assert.equal(m[3], 4 + 2 * sum(correct)); // integer counts are exact
});

// =================================================================================================
// Optimiser and EMA
// =================================================================================================

// [300, 320): a whitening bias, with its own lr (airbench94)
const LAYOUT: StateLayout = {
  entries: new Map(),
  nWeights: 300,
  whitenBiasEnd: 320,
  nTrainable: 350,
  nCopy: 400,
  nTotal: 450,
};
const STATE_LEN = 470; // a tail past nTotal that nothing may touch

function stateBuffer(data: Float32Array<ArrayBuffer>) {
  const b = createBuffer(gpu, data.length * 4);
  gpu.device.queue.writeBuffer(b, 0, data);
  return b;
}

Deno.test("sgdNesterov: two steps, per-group lr and weight decay, nothing outside [start, nTrainable) changes", async () => {
  for (const start of [0, 128]) { // 128: from a later tensor (airbench94: from the head; Muon trains the convs)
    const rng = new Prng(801);
    const p0 = rng.normals(STATE_LEN), m0 = rng.normals(STATE_LEN, 0.1);
    const g1 = rng.normals(STATE_LEN), g2 = rng.normals(STATE_LEN);
    const wd = { weights: 0.05, biases: 0.003 }, mom = hyp.opt.momentum;
    const lrs = [
      { lrWeights: 0.1, lrBiases: 0.7, lrWhitenBias: 0.4 },
      { lrWeights: 0.02, lrBiases: 1.3, lrWhitenBias: 0 }, // 0: frozen, the parameter stays as it is
    ];
    const mark = gpu.allocated.length;
    const params = stateBuffer(p0), grads = stateBuffer(g1), momentum = stateBuffer(m0);
    const step = sgdNesterov(gpu, LAYOUT, params, grads, momentum, wd, mom, start);
    setFrame(gpu, lrs[0]);
    submit(gpu, step);
    gpu.device.queue.writeBuffer(grads, 0, g2);
    setFrame(gpu, lrs[1]);
    submit(gpu, step);
    const p = await readBuffer(gpu, params, 0, STATE_LEN * 4), m = await readBuffer(gpu, momentum, 0, STATE_LEN * 4);
    checkGpu(gpu);
    freeSince(gpu, mark);
    const pRef = Array.from(p0), mRef = Array.from(m0);
    [g1, g2].forEach((grad, s) => {
      for (let i = start; i < LAYOUT.nTrainable; i++) {
        const weight = i < LAYOUT.nWeights, whitenBias = !weight && i < LAYOUT.whitenBiasEnd;
        const lr = weight ? lrs[s].lrWeights : whitenBias ? lrs[s].lrWhitenBias : lrs[s].lrBiases;
        const decay = weight ? wd.weights : wd.biases, g = grad[i] + decay * pRef[i];
        mRef[i] = mom * mRef[i] + g;
        pRef[i] -= lr * (g + mom * mRef[i]);
      }
    });
    const at = `from ${start}`;
    assertEach(`sgd params ${at}`, p, pRef, 1e-6, 1e-5);
    assertEach(`sgd momentum ${at}`, m, mRef, 1e-6, 1e-5);
    for (const [what, got, was] of [["params", p, p0], ["momentum", m, m0]] as const) {
      assertEach(`sgd untouched ${what} before ${start}`, got.subarray(0, start), was.subarray(0, start), 0, 0);
      const tail = LAYOUT.nTrainable;
      assertEach(`sgd untouched ${what} past nTrainable`, got.subarray(tail), was.subarray(tail), 0, 0);
    }
  }
});

Deno.test("emaUpdate: two steps, copy back below nCopy only, nothing past nTotal changes", async () => {
  const rng = new Prng(802);
  const p0 = rng.normals(STATE_LEN), e0 = rng.normals(STATE_LEN);
  const decays = [0.3, 0.9];
  const mark = gpu.allocated.length;
  const params = stateBuffer(p0), ema = stateBuffer(e0);
  const upd = emaUpdate(gpu, LAYOUT, params, ema);
  for (const d of decays) {
    setFrame(gpu, { emaDecay: d });
    submit(gpu, upd);
  }
  const p = await readBuffer(gpu, params, 0, STATE_LEN * 4), e = await readBuffer(gpu, ema, 0, STATE_LEN * 4);
  checkGpu(gpu);
  freeSince(gpu, mark);
  const pRef = Array.from(p0), eRef = Array.from(e0);
  for (const d of decays) {
    for (let i = 0; i < LAYOUT.nTotal; i++) {
      eRef[i] = d * eRef[i] + (1 - d) * pRef[i];
      if (i < LAYOUT.nCopy) pRef[i] = eRef[i];
    }
  }
  assertEach("ema", e, eRef, 1e-6, 1e-6);
  assertEach("ema params", p, pRef, 1e-6, 1e-6);
  assertEach("ema: frozen params unchanged", p.subarray(LAYOUT.nCopy), p0.subarray(LAYOUT.nCopy), 0, 0);
  assertEach("ema: tail unchanged", e.subarray(LAYOUT.nTotal), e0.subarray(LAYOUT.nTotal), 0, 0);
});

// =================================================================================================
// Data kernels (raw CHW u8 images on the GPU)
// =================================================================================================

const NORM = { mean: [0.49, 0.48, 0.45], std: [0.25, 0.24, 0.26] };
const N_IMAGES = 6;
const LABELS = Uint8Array.from([3, 7, 0, 9, 3, 1]);

function randomImages(seed: number, n: number) {
  const rng = new Prng(seed);
  return Uint8Array.from({ length: n * 3072 }, () => rng.int(256));
}

/** Uploads with at most 4 images per binding, so images 4 and 5 live in the second part. */
function uploadSplit(images: Uint8Array, labels: Uint8Array) {
  const small = { ...gpu, limits: { ...gpu.limits, maxBinding: 4 * 3072 } };
  const imgs = uploadImages(small, images, labels);
  assert.equal(imgs.imagesPerPart, 4);
  return imgs;
}

const normalised = (raw: Uint8Array, img: number, c: number, y: number, x: number) =>
  (raw[img * 3072 + c * 1024 + y * 32 + x] / 255 - NORM.mean[c]) / NORM.std[c];

/** The augmented 32x32x3 (HWC) view of one image: reflect-pad 2, crop at (dy, dx), optional h-flip. */
function cropFlipRef(raw: Uint8Array, img: number, dy: number, dx: number, flip: boolean) {
  const src = (i: number) => (i < 0 ? -i : i > 31 ? 62 - i : i); // PyTorch 'reflect' of index i - 2
  const padded = (c: number, py: number, px: number) => normalised(raw, img, c, src(py - 2), src(px - 2));
  const out = new Float64Array(32 * 32 * 3);
  for (let y = 0; y < 32; y++) {
    for (let x = 0; x < 32; x++) {
      const cx = flip ? 31 - x : x; // flip the crop
      for (let c = 0; c < 3; c++) out[(y * 32 + x) * 3 + c] = padded(c, y + dy, cx + dx);
    }
  }
  return out;
}

Deno.test("reflect padding reference (test self-check): PyTorch 'reflect'", () => {
  const raw = new Uint8Array(3072);
  for (let x = 0; x < 32; x++) raw[x] = x; // row 0 of channel 0 holds 0..31
  const row = (dx: number) =>
    Array.from(
      { length: 32 },
      (_, x) => Math.round((cropFlipRef(raw, 0, 2, dx, false)[x * 3] * NORM.std[0] + NORM.mean[0]) * 255),
    );
  assert.deepEqual(row(0).slice(0, 4), [2, 1, 0, 1]); // padded index -2, -1 -> 2, 1
  assert.deepEqual(row(3).slice(-3), [30, 31, 30]); // padded index 32 -> 30
});

Deno.test("augmentTrain: crop offsets, reflect edges, flip, cutmix with partner params, soft targets", async () => {
  const raw = randomImages(901, N_IMAGES);
  // per image: dy, dx, flip, cutmix, cy, cx, partner
  const spec = [
    [0, 3, 0, 1, 0, 31, 5],
    [3, 0, 1, 0, 0, 0, 1],
    [1, 2, 1, 1, 15, 1, 4],
    [2, 1, 0, 1, 30, 16, 3], // its own partner: target stays one-hot
    [4, 3, 0, 0, 0, 0, 0], // offset 4: airbench94 draws it, hlb never does
    [0, 4, 1, 1, 7, 9, 2],
  ];
  const params = new Uint32Array(2 * N_IMAGES);
  spec.forEach(([dy, dx, flip, cut, cy, cx, partner], i) => {
    params[2 * i] = dy | (dx << 3) | (flip << 6) | (cut << 7) | (cy << 8) | (cx << 13);
    params[2 * i + 1] = partner;
  });
  const perm = Uint32Array.from([5, 2, 0, 4, 1, 3, 2, 5]), offset = 2, rows = 5; // images 0, 4, 1, 3, 2
  const mark = gpu.allocated.length;
  const imgs = uploadSplit(raw, LABELS);
  const permBuf = createBuffer(gpu, perm.byteLength), paramBuf = createBuffer(gpu, params.byteLength);
  gpu.device.queue.writeBuffer(permBuf, 0, perm);
  gpu.device.queue.writeBuffer(paramBuf, 0, params);
  const images = upload(gpu, garbage(rows * 3072), [rows, 32, 32, 3]),
    targets = upload(gpu, garbage(rows * 10), [rows, 10]);
  setFrame(gpu, { offset });
  const [got, tg] = await run(
    augmentTrain(gpu, imgs, NORM, permBuf, paramBuf, images, targets),
    [images, targets],
    mark,
  );
  const mix = 9 / 1024;
  for (let r = 0; r < rows; r++) {
    const img = perm[offset + r], [dy, dx, flip, cut, cy, cx, partner] = spec[img];
    const own = cropFlipRef(raw, img, dy, dx, flip === 1);
    const [pdy, pdx, pflip] = spec[partner];
    const other = cropFlipRef(raw, partner, pdy, pdx, pflip === 1);
    const ref = new Float64Array(3072);
    for (let y = 0; y < 32; y++) {
      for (let x = 0; x < 32; x++) {
        const inside = cut === 1 && Math.abs(y - cy) <= 1 && Math.abs(x - cx) <= 1;
        for (let c = 0; c < 3; c++) ref[(y * 32 + x) * 3 + c] = (inside ? other : own)[(y * 32 + x) * 3 + c];
      }
    }
    assertEach(`augmentTrain row ${r} (image ${img})`, got.subarray(r * 3072, (r + 1) * 3072), ref, 2e-6, 2e-6);
    const t = new Array(10).fill(0);
    t[LABELS[img]] += cut ? 1 - mix : 1;
    if (cut) t[LABELS[partner]] += mix;
    assertEach(`augmentTrain targets row ${r}`, tg.subarray(r * 10, (r + 1) * 10), t, 1e-7, 1e-6);
  }
});

Deno.test("gatherEval: each TTA view of images frame.offset.. (clamped): mirrored, translated 1 pixel with reflection", async () => {
  const raw = randomImages(902, N_IMAGES);
  const h = 3, offset = 4; // images 4, 5, 5 (clamped to the last)
  // view v: mirrored if odd; 2, 3 read pixel (y - 1, x - 1) and 4, 5 pixel (y + 1, x + 1) (of the mirror for 3, 5),
  // reflected at the edges (PyTorch's reflect padding: -1 -> 1, 32 -> 30)
  const reflect = (q: number) => (q < 0 ? -q : q > 31 ? 62 - q : q);
  for (const views of [1, 2, 6]) {
    const mark = gpu.allocated.length;
    const imgs = uploadSplit(raw, LABELS);
    const images = upload(gpu, garbage(views * h * 3072), [views * h, 32, 32, 3]),
      targets = upload(gpu, garbage(views * h * 10), [views * h, 10]);
    setFrame(gpu, { offset });
    const [got, tg] = await run(gatherEval(gpu, imgs, NORM, images, targets, views), [images, targets], mark);
    for (let r = 0; r < views * h; r++) {
      const img = Math.min(offset + (r % h), N_IMAGES - 1), v = Math.floor(r / h);
      const shift = v < 2 ? 0 : v < 4 ? -1 : 1, ref = new Float64Array(3072);
      for (let y = 0; y < 32; y++) {
        for (let x = 0; x < 32; x++) {
          const sx = reflect((v % 2 ? 31 - x : x) + shift), sy = reflect(y + shift);
          for (let c = 0; c < 3; c++) ref[(y * 32 + x) * 3 + c] = normalised(raw, img, c, sy, sx);
        }
      }
      assertEach(`gatherEval ${views} views row ${r}`, got.subarray(r * 3072, (r + 1) * 3072), ref, 2e-6, 2e-6);
      if (r < h) {
        const t = Array.from({ length: 10 }, (_, k) => (k === LABELS[img] ? 1 : 0));
        assertEach(`gatherEval targets row ${r}`, tg.subarray(r * 10, (r + 1) * 10), t, 0, 0);
      }
    }
  }
});

// Note: on Mesa lavapipe (llvmpipe) a shader invocation stops looping after ~65535 loop iterations in
// all (gallivm's loop limiter), silently. patch_moments runs ~961 x (1 + 3 + 12 + 78) iterations per thread,
// so on that device it returns partial sums and leaves most of its 90 outputs unwritten.
Deno.test("patchMoments: per image sums and upper-triangle products of 2x2 patches (c, ky, kx)", async () => {
  const raw = randomImages(903, N_IMAGES);
  const mark = gpu.allocated.length;
  const imgs = uploadSplit(raw, LABELS);
  const out = upload(gpu, garbage(N_IMAGES * 90), [N_IMAGES, 90]);
  const [got] = await run(patchMoments(gpu, imgs, NORM, out), [out], mark);
  for (let i = 0; i < N_IMAGES; i++) {
    const ref = new Float64Array(90), v = new Float64Array(12);
    for (let y = 0; y < 31; y++) {
      for (let x = 0; x < 31; x++) {
        for (let c = 0; c < 3; c++) {
          for (let ky = 0; ky < 2; ky++) {
            for (let kx = 0; kx < 2; kx++) v[c * 4 + ky * 2 + kx] = normalised(raw, i, c, y + ky, x + kx);
          }
        }
        let k = 12;
        for (let a = 0; a < 12; a++) {
          ref[a] += v[a];
          for (let b = a; b < 12; b++) ref[k++] += v[a] * v[b];
        }
      }
    }
    assertClose(`patchMoments image ${i}`, got.subarray(i * 90, (i + 1) * 90), ref, 1e-5);
  }
});

Deno.test("channelStats: per-channel mean and std (n - 1) in [0, 1] units", () => {
  const raw = randomImages(904, 3);
  const { mean, std } = channelStats(raw);
  for (let c = 0; c < 3; c++) {
    const v: number[] = [];
    for (let i = 0; i < 3; i++) for (let p = 0; p < 1024; p++) v.push(raw[i * 3072 + c * 1024 + p] / 255);
    const m = v.reduce((a, b) => a + b) / v.length;
    const s = Math.sqrt(v.reduce((a, b) => a + (b - m) ** 2, 0) / (v.length - 1));
    assert.ok(Math.abs(mean[c] - m) < 1e-12, `mean[${c}] ${mean[c]} vs ${m}`);
    assert.ok(Math.abs(std[c] - s) < 1e-12, `std[${c}] ${std[c]} vs ${s}`);
  }
});

// =================================================================================================
// Host math: eigen-decomposition, whitening, schedules, plan, RNG
// =================================================================================================

function randomSymmetric(rng: Prng, n: number) {
  const a = Array.from({ length: n }, () => new Array(n).fill(0));
  for (let i = 0; i < n; i++) for (let j = i; j < n; j++) a[i][j] = a[j][i] = rng.normal();
  return a;
}

function checkEigen(a: number[][]) {
  const n = a.length, { values, vectors } = jacobiEigen(a);
  assert.equal(values.length, n);
  assert.equal(vectors.length, n);
  const scale = 1 + Math.max(...a.flat().map(Math.abs));
  for (let k = 0; k < n; k++) {
    for (let i = 0; i < n; i++) {
      const av = a[i].reduce((s, aij, j) => s + aij * vectors[k][j], 0);
      assert.ok(Math.abs(av - values[k] * vectors[k][i]) < 1e-10 * scale, `A v != lambda v (k ${k}, i ${i})`);
    }
    for (let l = 0; l < n; l++) {
      const d = dot(vectors[k], vectors[l]);
      assert.ok(Math.abs(d - (k === l ? 1 : 0)) < 1e-10, `v${k} . v${l} = ${d}`);
    }
  }
  const trace = a.reduce((s, r, i) => s + r[i], 0);
  assert.ok(Math.abs(values.reduce((s, v) => s + v, 0) - trace) < 1e-10 * scale);
}

Deno.test("jacobiEigen: A v = lambda v, orthonormal vectors (random, repeated eigenvalues, diagonal)", () => {
  const rng = new Prng(1001);
  checkEigen(randomSymmetric(rng, 12));
  checkEigen(randomSymmetric(rng, 5));
  checkEigen([[2, 0, 0], [0, 2, 0], [0, 0, 2]]);
  checkEigen([[3, 0, 0], [0, -1, 0], [0, 0, 7]]);
  checkEigen([[4, 1, 0], [1, 4, 0], [0, 0, 5]]); // eigenvalues 3, 5, 5
  assert.deepEqual(jacobiEigen([[3, 0], [0, -1]]).values, [3, -1]);
});

Deno.test("whiteningFilters: correlated 12-dim patches get ~identity covariance, largest eigenvalue first", () => {
  const rng = new Prng(1002);
  const d = 12, n = 20000;
  const mix = Array.from(
    { length: d },
    (_, i) => Array.from({ length: d }, (_, j) => rng.normal() + (i === j ? 1 : 0)),
  );
  const scales = Array.from({ length: d }, (_, i) => 0.1 + i); // very different variances
  const samples = Array.from({ length: n }, () => {
    const z = scales.map((s) => s * rng.normal());
    return mix.map((row) => dot(row, z));
  });
  const cov = (xs: number[][]) => {
    const m = Array.from({ length: d }, (_, j) => xs.reduce((s, x) => s + x[j], 0) / xs.length);
    const c = Array.from({ length: d }, () => new Array(d).fill(0));
    for (const x of xs) {
      for (let i = 0; i < d; i++) for (let j = 0; j < d; j++) c[i][j] += (x[i] - m[i]) * (x[j] - m[j]);
    }
    return c.map((r) => r.map((v) => v / (xs.length - 1)));
  };
  const c = cov(samples);
  const minEig = Math.min(...jacobiEigen(c).values);
  assert.ok(minEig > 1e-3, `test fixture: smallest eigenvalue ${minEig} must dwarf eps`);
  const filters = whiteningFilters(c, 1e-6);
  assert.equal(filters.length, d);
  const white = cov(samples.map((x) => filters.map((f) => dot(f, x))));
  for (let i = 0; i < d; i++) {
    for (let j = 0; j < d; j++) {
      assert.ok(Math.abs(white[i][j] - (i === j ? 1 : 0)) < 0.02, `C_white[${i}][${j}] = ${white[i][j]}`);
    }
  }
  // filter k = v_k / sqrt(lambda_k + eps): norms grow as the eigenvalues shrink
  const norms = filters.map((f) => Math.hypot(...f));
  for (let k = 1; k < d; k++) assert.ok(norms[k] >= norms[k - 1] * (1 - 1e-9), `filter norms not ascending at ${k}`);
});

Deno.test("oneCycleLr: PyTorch OneCycleLR (linear, pct_start 0.23, div 1e16, final 0.07 max), T = 581", () => {
  const max = 2.5, T = 581;
  const initial = max / 1e16, final = 0.07 * max;
  const peak = 0.23 * 581 - 1; // 132.63: end of phase 1
  const near = (a: number, b: number, what: string) =>
    assert.ok(Math.abs(a - b) <= 1e-12 * (1 + Math.abs(b)), `${what}: ${a} vs ${b}`);
  near(peak, 132.63, "phase 1 end");
  near(oneCycleLr(0, T, max), initial, "step 0");
  near(oneCycleLr(132, T, max), initial + (max - initial) * (132 / 132.63), "step 132");
  near(oneCycleLr(133, T, max), max + (final - max) * ((133 - 132.63) / (580 - 132.63)), "step 133");
  near(oneCycleLr(580, T, max), final, "step 580");
  near(oneCycleLr(356, T, max), max + (final - max) * ((356 - 132.63) / 447.37), "step 356");
  // the same numbers by hand: 132 / 132.63 = 0.99524994..., 1 - 0.93 * 0.37 / 447.37 = 0.99923084...
  assert.ok(Math.abs(oneCycleLr(132, T, max) / max - 0.99524994) < 1e-8);
  assert.ok(Math.abs(oneCycleLr(133, T, max) / max - 0.99923084) < 1e-8);
  assert.ok(oneCycleLr(132, T, max) < max && oneCycleLr(133, T, max) < max);
});

Deno.test("emaDecay: 0.95^5 * (step / T)^3", () => {
  assert.ok(Math.abs(emaDecay(581, 581) - 0.7737809375) < 1e-15);
  assert.ok(Math.abs(emaDecay(100, 581) - 0.7737809375 * (100 / 581) ** 3) < 1e-15);
  assert.equal(emaDecay(0, 581), 0);
});

Deno.test("epochAugmentation: hlb's offsets 0..3 and random flips; airbench94's 0..4 and alternating flips", () => {
  const n = 4000, count = (xs: number[]) => xs.reduce((a, b) => a + b, 0);
  const draws = (params: Uint32Array) =>
    Array.from(
      { length: n },
      (_, i) => ({ dy: params[2 * i] & 7, dx: (params[2 * i] >> 3) & 7, flip: (params[2 * i] >> 6) & 1 }),
    );
  const hlb = draws(epochAugmentation(new Rng(5), n, false, hyp.net).params);
  assert.deepEqual([...new Set(hlb.map((d) => d.dy))].sort(), [0, 1, 2, 3]); // the original's quirk: never 4
  assert.ok(Math.abs(count(hlb.map((d) => d.flip)) / n - 0.5) < 0.05);
  const first = firstEpochFlips(7, n);
  assert.deepEqual(firstEpochFlips(7, n), first); // a resumed run draws the same ones
  assert.ok(Math.abs(count([...first]) / n - 0.5) < 0.05, "a random half");
  for (const epoch of [0, 1, 2, 3]) {
    const a = draws(epochAugmentation(new Rng(5), n, false, airbench94.net, { epoch, firstFlips: first }).params);
    assert.deepEqual([...new Set(a.map((d) => d.dx))].sort(), [0, 1, 2, 3, 4]);
    a.forEach((d, i) => assert.equal(d.flip, first[i] ^ (epoch % 2), `epoch ${epoch}, image ${i}`));
  }
});

Deno.test("trainingPlan(50000, 1024, 12.1): 48 steps/epoch, 581 steps, 13 epochs", () => {
  const p = trainingPlan(50000, 1024, 12.1);
  assert.equal(p.stepsPerEpoch, 48);
  assert.equal(p.totalSteps, 581);
  assert.equal(p.numEpochs, 13);
  assert.equal(p.stepsIn(0), 48);
  assert.equal(p.stepsIn(11), 48);
  assert.equal(p.stepsIn(12), 5);
  assert.equal(p.stepsIn(13), 0);
  assert.ok(Math.abs(p.cutmixFrom - 6.1) < 1e-12);
  assert.equal(p.emaFrom, 2);
  const total = Array.from({ length: p.numEpochs }, (_, e) => p.stepsIn(e)).reduce((a, b) => a + b);
  assert.equal(total, 581);
});

Deno.test("trainingPlan: no epoch runs zero steps, whatever float noise the epoch count carries", () => {
  for (const [n, b, e] of [[512, 64, 1.0000000001], [512, 64, 2.0000000001], [512, 64, 0.9999999999], [512, 64, 3]]) {
    const p = trainingPlan(n, b, e);
    assert.equal(p.totalSteps, Math.round(8 * e), `${e} epochs of 8 steps`);
    assert.equal(p.numEpochs, Math.round(e), `${e} epochs`);
    for (let k = 0; k < p.numEpochs; k++) assert.ok(p.stepsIn(k) > 0, `epoch ${k} of ${e} has no step`);
  }
  // a real fraction still gets its partial last epoch: 4.1 epochs of 39 steps are 160 steps in 5 epochs
  const p = trainingPlan(10000, 256, 4.1);
  assert.deepEqual([p.totalSteps, p.numEpochs, p.stepsIn(4)], [160, 5, 4]);
});

Deno.test("Rng: deterministic per seed, uniform ranges, permutations are permutations", () => {
  const seq = (seed: number) => {
    const r = new Rng(seed);
    return Array.from({ length: 20 }, () => r.nextU32());
  };
  assert.deepEqual(seq(42), seq(42));
  assert.notDeepEqual(seq(42), seq(43));
  const r = new Rng(7);
  for (let i = 0; i < 1000; i++) {
    const u = r.next(), k = r.int(10);
    assert.ok(u >= 0 && u < 1);
    assert.ok(Number.isInteger(k) && k >= 0 && k < 10);
  }
  for (const n of [1, 2, 10, 1001]) {
    const p = new Rng(n).permutation(n);
    assert.deepEqual(Array.from(p).sort((a, b) => a - b), Array.from({ length: n }, (_, i) => i));
  }
  assert.deepEqual(new Rng(5).permutation(50), new Rng(5).permutation(50));
  assert.notDeepEqual(new Rng(5).permutation(50), new Rng(6).permutation(50));
});

// =================================================================================================
// f16 storage (--precision f16): the same kernels compiled with f16 activation bindings
// =================================================================================================

/** Rounds to the nearest f16 (what the GPU stores), back in f32. */
const toF16 = (a: ArrayLike<number>) => Float32Array.from(Float16Array.from(a));

f16Test(gpu.hasF16, "f16 storage: gelu forward and backward read f16, compute f32, store rounded f16", async () => {
  const rng = new Prng(1201);
  const x = toF16([0, 1e-3, -0.5, 3, -3, -8, 8, ...rng.normals(1000, 2)]), dy = toF16(rng.normals(x.length));
  const mark = gpu.allocated.length, n = [x.length];
  const xt = upload(gpu, x, n, "f16"), dyt = upload(gpu, dy, n, "f16");
  const yt = upload(gpu, garbage(x.length), n, "f16"), dxt = upload(gpu, garbage(x.length), n, "f16");
  const [y, dx] = await run([...gelu(gpu, xt, yt), ...geluBackward(gpu, xt, dyt, dxt)], [yt, dxt], mark);
  // one f16 rounding of the float64 result: relative error <= 2^-11, plus f16's subnormal spacing near 0
  assertEach("gelu f16", y, Array.from(x, geluRef), 1e-7, 2 ** -11);
  assertEach("geluBackward f16", dx, Array.from(x, (v, i) => dy[i] * geluGradRef(v)), 1e-7, 2 ** -11);
  const notF16 = y.findIndex((v) => v !== toF16([v])[0] || !Number.isFinite(v));
  assert.equal(notF16, -1, `gelu f16: y[${notF16}] = ${y[notF16]} is not a finite f16 value`);
});

f16Test(
  gpu.hasF16,
  "f16 storage: maxPool2 and globalMaxPool are exact on f16 values (31x31 and 7x9 edges)",
  async () => {
    const rng = new Prng(1202);
    for (const shape of [[2, 7, 9, 5], [1, 31, 31, 3]]) {
      const [b, h, w, c] = shape, ys = [b, h >> 1, w >> 1, c];
      const x = toF16(rng.normals(b * h * w * c)), dy = toF16(rng.normals(b * (h >> 1) * (w >> 1) * c));
      const gdy = rng.normals(b * c);
      const mark = gpu.allocated.length;
      const xt = upload(gpu, x, shape, "f16"), yt = upload(gpu, garbage(dy.length), ys, "f16");
      const dyt = upload(gpu, dy, ys, "f16"), dxt = upload(gpu, garbage(x.length), shape, "f16");
      const gt = upload(gpu, garbage(b * c), [b, c]), gdyt = upload(gpu, gdy, [b, c]); // features stay f32
      const gdxt = upload(gpu, garbage(x.length), shape, "f16");
      const [y, dx, g, gdx] = await run(
        [
          ...maxPool2(gpu, xt, yt),
          ...maxPool2Backward(gpu, xt, dyt, dxt),
          ...globalMaxPool(gpu, xt, gt),
          ...globalMaxPoolBackward(gpu, xt, gdyt, gdxt),
        ],
        [yt, dxt, gt, gdxt],
        mark,
      );
      const ref = maxPool2Ref(x, shape), gref = globalMaxRef(x, shape);
      assertEach(`maxPool2 f16 [${shape}]`, y, ref.y, 0, 0);
      assertEach(`maxPool2Backward f16 [${shape}]`, dx, scatterRef(x.length, ref.arg, dy), 0, 0);
      assertEach(`globalMaxPool f16 -> f32 [${shape}]`, g, gref.y, 0, 0);
      assertEach(`globalMaxPoolBackward f32 -> f16 [${shape}]`, gdx, toF16(scatterRef(x.length, gref.arg, gdy)), 0, 0);
    }
  },
);

f16Test(
  gpu.hasF16,
  "f16 storage: batch norm statistics in f32 from f16 inputs, forward and backward (1125 rows, C=37)",
  async () => {
    const rng = new Prng(1203), shape = [5, 15, 15, 37], rows = 1125, c = 37;
    const k = bnCase(rng, rows, c);
    k.x = toF16(k.x);
    const r = toF16(rng.normals(rows * c));
    const mark = gpu.allocated.length;
    const t = bnTensors(k, shape);
    const x16 = upload(gpu, k.x, shape, "f16"), y16 = upload(gpu, garbage(rows * c), shape, "f16");
    const dyt = upload(gpu, r, shape, "f16"), dxt = upload(gpu, garbage(rows * c), shape, "f16");
    const dbt = upload(gpu, garbage(c), [c]), dwt = upload(gpu, garbage(c), [c]);
    const [y, stats, dx, db, dw] = await run(
      [
        ...batchNorm(gpu, x16, t.p, y16, t.stats, true),
        ...batchNormBackward(gpu, x16, dyt, t.stats, t.p, dxt, dbt, dwt),
      ],
      [y16, t.stats, dxt, dbt, dwt],
      mark,
    );
    const { mean, varB } = bnStatsRef(k), eps = hyp.net.batchNormEps;
    const statsRef = Array.from({ length: 2 * c }, (_, i) => i % 2 ? 1 / Math.sqrt(varB[i >> 1] + eps) : mean[i >> 1]);
    assertEach("batchNorm f16 stats (f32)", stats, statsRef, 1e-5, 1e-5);
    assertEach("batchNorm f16 y", y, bnApplyRef(k.x, rows, c, mean, varB, k.weight, k.bias), 1e-5, 2 ** -11 + 1e-5);
    const ref = bnBackwardRef(k, r);
    assertClose("batchNormBackward f16 dbias (f32)", db, ref.dbias, 1e-5);
    assertClose("batchNormBackward f16 dweight (f32)", dw, ref.dweight, 1e-5);
    assertEach("batchNormBackward f16 dx", dx, ref.dx, 1e-5, 2 ** -11 + 1e-4);
  },
);

f16Test(
  gpu.hasF16,
  "f16 storage: gatherEval writes the f32 images rounded to f16 (the store augmentTrain shares)",
  async () => {
    const raw = randomImages(1204, N_IMAGES);
    const mark = gpu.allocated.length;
    const imgs = uploadSplit(raw, LABELS);
    const shape = [4, 32, 32, 3];
    const i32 = upload(gpu, garbage(4 * 3072), shape), i16 = upload(gpu, garbage(4 * 3072), shape, "f16");
    const targets = upload(gpu, garbage(40), [4, 10]);
    setFrame(gpu, { offset: 1 });
    const [a, b] = await run(
      [...gatherEval(gpu, imgs, NORM, i32, targets, 2), ...gatherEval(gpu, imgs, NORM, i16, targets, 2)],
      [i32, i16],
      mark,
    );
    assertEach("gatherEval f16 = f32 rounded", b, toF16(a), 0, 0);
  },
);

Deno.test("f16 storage: an f16 tensor on an f32-only binding is refused with one line", () => {
  const mark = gpu.allocated.length;
  const logits = upload(gpu, garbage(20), [2, 10], "f16"), t = upload(gpu, garbage(20), [2, 10]);
  const rows = upload(gpu, garbage(2), [2]);
  assert.throws(
    () => crossEntropy(gpu, logits, t, rows, rows, t, 1),
    /^Error: loss\.cross_entropy: binding 2 holds f32 only, got an f16 tensor$/,
  );
  freeSince(gpu, mark);
});
