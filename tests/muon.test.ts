// GPU tests of the Muon optimiser's ops (matmul, frobeniusNorm, newtonSchulz, muonStep): against PyTorch in float64
// (tests/golden/muon.json, written by tests/golden/muon_fixtures.py, which says how), and against independent float64
// CPU references written here, in PyTorch's layout, so that the test does not rest on the fixture alone.
// Shapes are small and odd: the CPU WebGPU device (lavapipe) is slow, and odd sizes cut matmul.wgsl's 32 x 32 tiles
// and 16-long slices at their edges.
import assert from "node:assert/strict";
import {
  checkGpu,
  createBuffer,
  type Dispatch,
  freeSince,
  frobeniusNorm,
  initGpu,
  kernelConst,
  matmul,
  muonScratch,
  muonStep,
  newtonSchulz,
  readBuffer,
  readTensor,
  setFrame,
  submit,
  type Tensor,
  upload,
  view,
} from "../main.ts";
import fixture from "./golden/muon.json" with { type: "json" };
import { Prng } from "./util.ts";

const gpu = await initGpu();

// =================================================================================================
// Helpers and CPU references (local on purpose: nothing below reuses main.ts math)
// =================================================================================================

/** Largest |got - want| over the arrays, asserted <= tol; returns it (the tests print what they measured). */
function assertMaxErr(name: string, got: ArrayLike<number>, want: ArrayLike<number>, tol: number) {
  assert.equal(got.length, want.length, `${name}: length`);
  let worst = 0, at = 0;
  for (let i = 0; i < want.length; i++) {
    const e = Math.abs(got[i] - want[i]);
    if (!(e <= worst)) [worst, at] = [Number.isNaN(e) ? Infinity : e, i];
  }
  assert.ok(worst <= tol, `${name}: max err ${worst.toExponential(3)} > ${tol} at [${at}]: ${got[at]} vs ${want[at]}`);
  return worst;
}

/** Runs `list`, reads `outs` back and frees every buffer allocated since `mark`. */
async function run(list: Dispatch[], outs: Tensor[], mark: number) {
  submit(gpu, list);
  const res: Float32Array[] = [];
  for (const t of outs) res.push(await readTensor(gpu, t));
  checkGpu(gpu);
  freeSince(gpu, mark);
  return res;
}

/** C = A B, row-major float64, A [m, k], B [k, n]. */
function mm(a: ArrayLike<number>, b: ArrayLike<number>, m: number, k: number, n: number) {
  const c = new Float64Array(m * n);
  for (let i = 0; i < m; i++) {
    for (let l = 0; l < k; l++) {
      const ail = a[i * k + l];
      for (let j = 0; j < n; j++) c[i * n + j] += ail * b[l * n + j];
    }
  }
  return c;
}

/** The transpose of a row-major [r, c] matrix. */
function transpose(a: ArrayLike<number>, r: number, c: number) {
  const t = new Float64Array(r * c);
  for (let i = 0; i < r; i++) for (let j = 0; j < c; j++) t[j * r + i] = a[i * c + j];
  return t;
}

const norm = (a: ArrayLike<number>) => Math.sqrt(Array.from(a).reduce((s, v) => s + v * v, 0));

/** airbench94's zeropower_via_newtonschulz5 in float64, as written there: transposes a tall G, runs, transposes back. */
function newtonSchulzRef(g: ArrayLike<number>, rows: number, cols: number, steps = 3) {
  const [a, b, c] = [3.4445, -4.775, 2.0315];
  const tall = rows > cols, s = norm(g) + 1e-7;
  let x = Float64Array.from(tall ? transpose(g, rows, cols) : g, (v) => v / s);
  const [n, k] = tall ? [cols, rows] : [rows, cols];
  for (let i = 0; i < steps; i++) {
    const gram = mm(x, transpose(x, n, k), n, k, n);
    const gg = mm(gram, gram, n, n, n);
    const B = gram.map((v, j) => b * v + c * gg[j]);
    const bx = mm(B, x, n, n, k);
    x = x.map((v, j) => a * v + bx[j]);
  }
  return tall ? transpose(x, n, k) : x;
}

/**
 * airbench94's Muon.step (nesterov) in float64 on a conv weight in main.ts's layout HWIO [kh][kw][cin][cout]: the
 * arrays are moved to PyTorch's [cout][cin][kh][kw], reshaped to [cout, cin kh kw] as the original does, and back.
 * Updates p and buf in place.
 */
function muonStepRef(
  p: Float64Array,
  grad: ArrayLike<number>,
  buf: Float64Array,
  shape: number[],
  lr: number,
  m: number,
) {
  const [kh, kw, cin, cout] = shape, cols = cin * kh * kw;
  const torchIndex = (i: number) => { // HWIO flat index -> [cout][cin][kh][kw] flat index
    const co = i % cout, ci = Math.floor(i / cout) % cin, x = Math.floor(i / (cout * cin)) % kw;
    const y = Math.floor(i / (cout * cin * kw));
    return ((co * cin + ci) * kh + y) * kw + x;
  };
  const gT = new Float64Array(p.length);
  for (let i = 0; i < p.length; i++) {
    buf[i] = m * buf[i] + grad[i];
    gT[torchIndex(i)] = grad[i] + m * buf[i];
  }
  const update = newtonSchulzRef(gT, cout, cols);
  const scale = Math.sqrt(cout) / norm(p);
  for (let i = 0; i < p.length; i++) p[i] = p[i] * scale - lr * update[torchIndex(i)];
  return { update: Float64Array.from(p, (_, i) => update[torchIndex(i)]) };
}

// =================================================================================================
// The ops
// =================================================================================================

Deno.test("matmul: the four transpose pairs and product_add, odd sizes across tile and slice edges", async () => {
  const rng = new Prng(1801);
  // m, k, n: partial tiles on both sides of c, k shorter and longer than one 16-long slice, a 1 x 1 output
  for (const [m, k, n] of [[33, 17, 70], [5, 40, 3], [1, 1, 1], [64, 16, 32]]) {
    for (const [ta, tb] of [[false, false], [true, false], [false, true], [true, true]]) {
      const mark = gpu.allocated.length;
      const a = rng.normals(m * k), b = rng.normals(k * n), d = rng.normals(m * n);
      const at = upload(gpu, a, ta ? [k, m] : [m, k]), bt = upload(gpu, b, tb ? [n, k] : [k, n]);
      const dt = upload(gpu, d, [m, n]), c1 = upload(gpu, new Float32Array(m * n).fill(-777), [m, n]);
      const c2 = upload(gpu, new Float32Array(m * n).fill(-777), [m, n]);
      const [got1, got2] = await run(
        [
          matmul(gpu, { t: at, transpose: ta }, { t: bt, transpose: tb }, c1, 0.75),
          matmul(gpu, { t: at, transpose: ta }, { t: bt, transpose: tb }, c2, -1.5, { beta: 2.5, d: dt }),
        ],
        [c1, c2],
        mark,
      );
      // the uploaded arrays hold op(a) transposed when ta: read them back as op(a) [m, k] and op(b) [k, n]
      const opA = ta ? transpose(a, k, m) : a, opB = tb ? transpose(b, n, k) : b, ab = mm(opA, opB, m, k, n);
      // f32 sums of k products of O(1) values: errors ~ sqrt(k) 2^-24 |terms|, far below 1e-5
      assertMaxErr(`product ${m}x${k}x${n} ${ta} ${tb}`, got1, ab.map((v) => 0.75 * v), 1e-5);
      assertMaxErr(`product_add ${m}x${k}x${n} ${ta} ${tb}`, got2, ab.map((v, i) => -1.5 * v + 2.5 * d[i]), 2e-5);
    }
  }
});

Deno.test("frobeniusNorm: one value per slot, lengths below one workgroup and past PARTS x WG (strided)", async () => {
  const rng = new Prng(1802), parts = kernelConst(gpu, "muon", "PARTS"), wg = kernelConst(gpu, "muon", "WG");
  const mark = gpu.allocated.length;
  const sums = createBuffer(gpu, 4 * 2 * (parts + 1));
  const small = rng.normals(37, 3), large = rng.normals(parts * wg + 3001, 0.01, 0.5); // an offset: no cancellation
  const st = upload(gpu, small, [37]), lt = upload(gpu, large, [large.length]);
  submit(gpu, [...frobeniusNorm(gpu, st, sums, 0), ...frobeniusNorm(gpu, lt, sums, 1)]);
  const got = await readBuffer(gpu, sums, 0, 4 * 2 * (parts + 1));
  checkGpu(gpu);
  freeSince(gpu, mark);
  // f32 partial sums of up to ~300 squares each, then 64 of those: relative error well under 1e-6
  const e0 = assertMaxErr("norm of 37", [got[parts]], [norm(small)], 1e-6 * norm(small));
  const e1 = assertMaxErr(`norm of ${large.length}`, [got[2 * parts + 1]], [norm(large)], 1e-6 * norm(large));
  console.log(`frobeniusNorm: abs err ${e0.toExponential(2)}, ${e1.toExponential(2)}`);
});

/**
 * newtonSchulz's and muonStep's tolerance, absolute: the outputs are O(1) (entries of a U Vᵀ-like matrix, weights of
 * norm sqrt(out)). The GPU rounds each operation to f32 (2^-24 relative) and sums at most k = 153 products per output
 * here, and a step carries an error forward scaled by at most the polynomial's slope on its iterates (|p'| <= 8 on
 * [0, 1.3]); measured on lavapipe: at most 4.1e-7 (the tests print it). 4e-6 leaves 10x for another device's
 * rounding (fused or separate multiply-adds) and is still ~1000x under the original's bf16 rounding (2^-8).
 */
const NS_TOL = 4e-6;

Deno.test("newtonSchulz: PyTorch float64 fixture, wide and tall (5x37, 37x5, 33x65, 130x21, 3x3)", async () => {
  assert.deepEqual(fixture.coefficients, [3.4445, -4.775, 2.0315]);
  const shapes = fixture.newton_schulz.map((c) => [c.rows, c.cols]);
  for (const c of fixture.newton_schulz) {
    const mark = gpu.allocated.length;
    const scratch = muonScratch(gpu, shapes);
    const g = upload(gpu, Float32Array.from(c.g), [c.rows, c.cols]);
    const out = upload(gpu, new Float32Array(c.rows * c.cols).fill(-777), [c.rows, c.cols]);
    const [got] = await run(newtonSchulz(gpu, g, out, scratch, fixture.steps), [out], mark);
    const err = assertMaxErr(`NS ${c.rows}x${c.cols} vs fixture`, got, c.out, NS_TOL);
    console.log(`newtonSchulz ${c.rows}x${c.cols}: max abs err ${err.toExponential(2)} vs PyTorch float64`);
  }
});

Deno.test("newtonSchulz: 1, 2 and 3 steps (both ping-pong parities), wide and tall, vs the CPU reference", async () => {
  const rng = new Prng(1803);
  for (const [rows, cols] of [[19, 70], [70, 19]]) {
    const g = rng.normals(rows * cols);
    for (const steps of [1, 2, 3]) {
      const mark = gpu.allocated.length;
      const scratch = muonScratch(gpu, [[rows, cols]]);
      const gt = upload(gpu, g, [rows, cols]), out = upload(gpu, new Float32Array(rows * cols), [rows, cols]);
      const [got] = await run(newtonSchulz(gpu, gt, out, scratch, steps), [out], mark);
      assertMaxErr(`NS ${rows}x${cols} ${steps} steps`, got, newtonSchulzRef(g, rows, cols, steps), NS_TOL);
    }
  }
});

/** Uploads a Muon test's weight, gradient and momentum buffer and records one step; returns them and the scratch. */
function recordStep(shape: number[], p: ArrayLike<number>, grad: ArrayLike<number>, buf: ArrayLike<number>, m: number) {
  const scratch = muonScratch(gpu, [shape]);
  const pt = upload(gpu, Float32Array.from(p), shape), gt = upload(gpu, Float32Array.from(grad), shape);
  const bt = upload(gpu, Float32Array.from(buf), shape);
  const update = view(scratch.update, 0, shape);
  return { pt, gt, bt, update, step: muonStep(gpu, pt, gt, bt, scratch, m) };
}

Deno.test("muonStep: PyTorch float64 fixture (conv [3,3,6,17], lr 0.24, momentum 0.6): p, buf, update", async () => {
  const f = fixture.muon_step, mark = gpu.allocated.length;
  const { pt, bt, update, step } = recordStep(f.shape, f.p, f.grad, f.buf, f.momentum);
  setFrame(gpu, { muonLr: f.lr });
  const [p, buf, u] = await run(step, [pt, bt, update], mark);
  // buf: one multiply-add in f32 of values ~0.1 (2^-24 relative)
  const eb = assertMaxErr("muonStep buf vs fixture", buf, f.buf_out, 1e-7);
  const eu = assertMaxErr("muonStep update vs fixture", u, f.update, NS_TOL);
  const ep = assertMaxErr("muonStep p vs fixture", p, f.p_out, NS_TOL);
  console.log(
    `muonStep vs PyTorch float64: max abs err p ${ep.toExponential(2)}, update ${eu.toExponential(2)}, ` +
      `buf ${eb.toExponential(2)}`,
  );
});

Deno.test("muonStep: two steps (lr from the frame) on conv [3,3,17,130] vs the CPU reference in PyTorch's layout", async () => {
  // our matrix [153, 130] is tall (NS runs on its transpose), PyTorch's [130, 153] is wide: the reference takes the
  // original's path, so the layout argument of muonStep is tested too; 19,890 floats also stride sum_squares
  const rng = new Prng(1804), shape = [3, 3, 17, 130], len = 3 * 3 * 17 * 130, m = 0.6, lrs = [0.24, 0.1];
  const p0 = rng.normals(len, 0.1), buf0 = rng.normals(len, 0.01), grads = [rng.normals(len, 0.01), rng.normals(len)];
  const mark = gpu.allocated.length;
  const { pt, gt, bt, step } = recordStep(shape, p0, grads[0], buf0, m);
  setFrame(gpu, { muonLr: lrs[0] });
  submit(gpu, step);
  gpu.device.queue.writeBuffer(gt.buffer, 0, grads[1]);
  setFrame(gpu, { muonLr: lrs[1] });
  const [p, buf] = await run(step, [pt, bt], mark);
  const pRef = Float64Array.from(p0), bufRef = Float64Array.from(buf0);
  grads.forEach((g, s) => muonStepRef(pRef, g, bufRef, shape, lrs[s], m));
  assertMaxErr("two Muon steps: buf", buf, bufRef, 1e-6);
  const ep = assertMaxErr("two Muon steps: p", p, pRef, NS_TOL);
  console.log(`muonStep [3,3,17,130] x 2 vs CPU float64: max abs err p ${ep.toExponential(2)}`);
});
