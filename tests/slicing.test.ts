// Batch slices: a pass whose tensors are larger than one binding runs in slices of the batch (batchSlices). Under a
// forced small binding limit, each op, the whole network, training and evaluation are compared with the unsliced
// pass on the same inputs. "The same" means:
// - bit for bit: every per-image computation (convs forward and backward-data, the fused conv + pool and its unpool,
//   the pools, GELU, the norm's elementwise passes given the same statistics, the data kernels) and SGD and the EMA
//   over a state bound in slices; evaluation (batch norm then uses the running statistics: nothing sums over the batch);
// - bit for bit when each slice holds a multiple of 256 images, else within f32 rounding: batch-norm statistics and
//   the sums of its backward (each slice sums its own chunks of 256 pixel rows; with 256-image slices those are the
//   whole pass's chunks, merged in the same order);
// - within f32 rounding: conv weight gradients (each slice's split-K partials are summed into the gradient in turn:
//   the same terms in another order), and so everything downstream of them in training.
// Browser-safe (no Deno.* calls): tests/dawn.ts runs this file on Dawn too.
import assert from "node:assert/strict";
import {
  backward,
  batchNorm,
  batchNormBackward,
  batchSlices,
  checkFits,
  conv2d,
  conv2dBackwardData,
  conv2dBackwardWeight,
  conv2dMaxPool,
  createBuffer,
  crossEntropy,
  type Dispatch,
  emaUpdate,
  evaluateWeights,
  forward,
  freeSince,
  gatherEval,
  type Gpu,
  hyp,
  initGpu,
  initState,
  layoutState,
  makeActivations,
  maxPool2Unpool,
  readBuffer,
  readTensor,
  Rng,
  setFrame,
  sgdNesterov,
  stateSpec,
  stateViews,
  submit,
  type Tensor,
  tensor,
  train,
  upload,
  uploadDataset,
  uploadImages,
} from "../main.ts";
import { assertClose, Prng } from "./util.ts";

const gpu = await initGpu();
/** The same device, planning for at most `maxBinding` bytes per binding. */
const limited = (maxBinding: number): Gpu => ({ ...gpu, limits: { ...gpu.limits, maxBinding } });
const KiB = 1024, MiB = 2 ** 20;

/** Bit-for-bit equality of two f32 (or u32) arrays, naming the first difference. */
function sameBits(name: string, got: Float32Array, want: Float32Array) {
  assert.equal(got.length, want.length, `${name}: length`);
  const a = new Uint32Array(got.buffer, got.byteOffset, got.length),
    b = new Uint32Array(want.buffer, want.byteOffset, want.length);
  for (let i = 0; i < a.length; i++) {
    if (a[i] !== b[i]) assert.fail(`${name}: differs at [${i}]: ${got[i]} (sliced) vs ${want[i]} (one pass)`);
  }
}

/** Reads `outs` after running `build`'s dispatches on `g`; frees what was allocated since. */
async function runOn(g: Gpu, build: (g: Gpu) => { list: Dispatch[]; outs: Tensor[] }) {
  const mark = gpu.allocated.length;
  try {
    const { list, outs } = build(g);
    submit(gpu, list);
    return {
      n: list.length,
      values: await Promise.all(outs.map((t) => readBuffer(gpu, t.buffer, t.offset, bytes(t)))),
    };
  } finally {
    freeSince(gpu, mark);
  }
}
const bytes = (t: Tensor) => Math.ceil((t.shape.reduce((a, b) => a * b, 1) * (t.dtype === "f16" ? 2 : 4)) / 4) * 4;

Deno.test("batchSlices: whole when it fits, else aligned slices of 256 images where they fit, covering the batch", () => {
  const t = (shape: number[]): Tensor => ({
    buffer: undefined as unknown as GPUBuffer,
    offset: 0,
    shape,
    dtype: "f32",
  });
  const x = t([1000, 31, 31, 24]); // 92,256 bytes an image: a multiple of 32 bytes, so 8 images start a binding
  assert.deepEqual(batchSlices(limited(100 * MiB), [x]), [{ start: 0, rows: 1000 }]);
  assert.deepEqual(batchSlices(limited(48 * MiB), [x]), [
    { start: 0, rows: 512 },
    { start: 512, rows: 488 },
  ]);
  const small = batchSlices(limited(3 * MiB), [x, t([1000, 10])]); // 34 images fit; targets' 40-byte rows: 32
  assert.equal(small[0].rows, 32);
  assert.equal(small.reduce((n, s) => n + s.rows, 0), 1000);
  small.forEach((s, i) => assert.equal(s.start, 32 * i));
  assert.throws(() => batchSlices(limited(64 * KiB), [x]), /do not fit one 0.06 MiB binding/);
});

Deno.test("sliced ops, one pass each, same inputs: per-image ops bit for bit, sums over the batch within f32 rounding", async () => {
  const rng = new Prng(7), B = 37, small = limited(64 * KiB); // [37, 9, 9, 16] f32: 5 KiB an image, 12 a slice
  const mark = gpu.allocated.length;
  const x = upload(gpu, rng.normals(B * 9 * 9 * 16), [B, 9, 9, 16]),
    w = upload(gpu, rng.normals(9 * 16 * 8), [3, 3, 16, 8]);
  const dy = upload(gpu, rng.normals(B * 9 * 9 * 8), [B, 9, 9, 8]),
    dp = upload(gpu, rng.normals(B * 4 * 4 * 8), [B, 4, 4, 8]);
  const bnX = upload(gpu, rng.normals(B * 9 * 9 * 16, 2, 0.5), [B, 9, 9, 16]);
  const ones = upload(gpu, new Float32Array(16).fill(1), [16]), shift = upload(gpu, rng.normals(16, 0.1), [16]);
  try {
    const convs = (g: Gpu) => {
      const y = tensor(gpu, [B, 9, 9, 8]),
        pooled = tensor(gpu, [B, 4, 4, 8]),
        argmax = tensor(gpu, [B, 4, 4, 2], "u32");
      const dx = tensor(gpu, [B, 9, 9, 16]), dw = tensor(gpu, [3, 3, 16, 8]), unpooled = tensor(gpu, [B, 9, 9, 8]);
      return {
        list: [
          ...conv2d(g, x, w, y, 1),
          ...conv2dMaxPool(g, x, w, pooled, argmax, 1),
          ...maxPool2Unpool(g, argmax, dp, unpooled),
          ...conv2dBackwardData(g, dy, w, dx, 1),
          ...conv2dBackwardWeight(g, x, dy, dw, 1),
        ],
        outs: [y, pooled, argmax, unpooled, dx, dw],
      };
    };
    const one = await runOn(gpu, convs), sliced = await runOn(small, convs);
    assert.ok(sliced.n > one.n + 10, `${sliced.n} dispatches sliced, ${one.n} in one pass`);
    ["conv", "conv + pool", "argmax", "unpool", "backward data"].forEach((name, i) =>
      sameBits(name, sliced.values[i], one.values[i])
    );
    assertClose("weight gradient", sliced.values[5], one.values[5], 1e-5);

    // batch norm (+ GELU) training forward and backward: 2997 pixel rows, slices of 12 images (972 rows)
    const dyNorm = upload(gpu, rng.normals(B * 9 * 9 * 16), [B, 9, 9, 16]);
    const norm = (g: Gpu) => {
      const y = tensor(gpu, [B, 9, 9, 16]), stats = tensor(gpu, [16, 2]), dx = tensor(gpu, [B, 9, 9, 16]);
      // running mean at byte 0, running variance at byte 256 (a binding starts aligned)
      const running = tensor(gpu, [128]), dbias = tensor(gpu, [16]), dweight = tensor(gpu, [16]);
      gpu.device.queue.writeBuffer(running.buffer, 256, new Float32Array(16).fill(1));
      const p = {
        weight: ones,
        bias: shift,
        runningMean: { ...running, shape: [16] },
        runningVar: { ...running, offset: 256, shape: [16] },
      };
      return {
        list: [
          ...batchNorm(g, bnX, p, y, stats, true, "gelu"),
          ...batchNormBackward(g, bnX, dyNorm, stats, p, dx, dbias, dweight, "gelu"),
        ],
        outs: [y, stats, running, dx, dbias, dweight],
      };
    };
    const n1 = await runOn(gpu, norm), n2 = await runOn(small, norm);
    assert.ok(n2.n > n1.n, `${n2.n} dispatches sliced, ${n1.n} in one pass`);
    ["y", "stats", "running statistics", "dx", "dbias", "dweight"].forEach((name, i) =>
      assertClose(`batch norm ${name}`, n2.values[i], n1.values[i], 2e-6)
    );
  } finally {
    freeSince(gpu, mark);
  }
});

Deno.test("SGD and the EMA over a state bound in slices: bit for bit", async () => {
  const layout = layoutState(stateSpec(6)), rng = new Prng(3), n = layout.nTotal; // 75 KiB of floats a buffer
  const small = limited(16 * KiB);
  const init = [rng.normals(n), rng.normals(n), rng.normals(n), rng.normals(n)];
  const step = (g: Gpu) => {
    const [p, gr, m, e] = init.map((v) => {
      const b = createBuffer(gpu, n * 4);
      gpu.device.queue.writeBuffer(b, 0, v);
      return b;
    });
    const list = [...sgdNesterov(g, layout, p, gr, m, { weights: 0.01, biases: 0.001 }), ...emaUpdate(g, layout, p, e)];
    const t = (buffer: GPUBuffer): Tensor => ({ buffer, offset: 0, shape: [n], dtype: "f32" });
    return { list, outs: [t(p), t(m), t(e)] };
  };
  setFrame(gpu, { lrWeights: 0.1, lrBiases: 0.2, emaDecay: 0.7 });
  const one = await runOn(gpu, step), sliced = await runOn(small, step);
  assert.equal(one.n, 2);
  assert.ok(sliced.n >= 10, `${sliced.n} dispatches`);
  ["params", "momentum", "ema"].forEach((name, i) => sameBits(name, sliced.values[i], one.values[i]));
});

Deno.test("gatherEval in slices writes the same images and targets, bit for bit", async () => {
  const rng = new Prng(5), n = 9, images = Uint8Array.from({ length: n * 3072 }, () => rng.int(256));
  const mark = gpu.allocated.length;
  try {
    const imgs = uploadImages(gpu, images, Uint8Array.from({ length: n }, (_, i) => i % 10));
    const norm = { mean: [0.49, 0.48, 0.45], std: [0.25, 0.24, 0.26] };
    const gather = (g: Gpu) => {
      const x = tensor(gpu, [74, 32, 32, 3]), t = tensor(gpu, [74, 10]); // 37 images and their mirrors
      return { list: gatherEval(g, imgs, norm, x, t, 2), outs: [x, t] };
    };
    setFrame(gpu, { offset: 2 });
    // 33 rows fit 400 KiB; the targets' 40-byte rows start a binding every 32 rows: slices of 32, 32 and 10
    const one = await runOn(gpu, gather), sliced = await runOn(limited(400 * KiB), gather);
    assert.equal(sliced.n, 3);
    sameBits("images", sliced.values[0], one.values[0]);
    sameBits("targets", sliced.values[1], one.values[1]);
  } finally {
    freeSince(gpu, mark);
  }
});

/** Forward (training), loss and backward of a small network at batch B on `g`: every tensor read back. */
async function networkPass(g: Gpu, B: number, baseDepth: number) {
  const mark = gpu.allocated.length, rng = new Rng(11);
  try {
    const layout = layoutState(stateSpec(baseDepth));
    const init = initState(layout, rng, Float32Array.from({ length: 2 * 2 * 3 * 24 }, () => rng.next() - 0.5));
    for (let i = 0; i < layout.nTrainable; i++) init[i] += 0.3 * (rng.next() - 0.5);
    const state = createBuffer(gpu, layout.nTotal * 4), grads = createBuffer(gpu, layout.nTotal * 4);
    gpu.device.queue.writeBuffer(state, 0, init);
    const P = stateViews(state, layout), G = stateViews(grads, layout), A = makeActivations(g, B, baseDepth);
    gpu.device.queue.writeBuffer(A.x.buffer, 0, Float32Array.from({ length: B * 3072 }, () => 2 * rng.next() - 1));
    const targets = new Float32Array(B * 10);
    for (let b = 0; b < B; b++) targets[b * 10 + (b % 10)] = 1;
    gpu.device.queue.writeBuffer(A.targets.buffer, 0, targets);
    setFrame(gpu, { valid: B });
    const list = [
      ...forward(g, A, P, true),
      crossEntropy(g, A.logits, A.targets, A.loss, A.correct, A.dlogits, 1),
      ...backward(g, A, P, G),
    ];
    submit(gpu, list);
    const acts: Record<string, Float32Array> = { a0: await readTensor(gpu, A.a0) };
    for (const [i, S] of A.groups.entries()) {
      acts[`group ${i + 1} a1`] = await readTensor(gpu, S.a1);
      acts[`group ${i + 1} a2`] = await readTensor(gpu, S.a2);
      acts[`group ${i + 1} argmax`] = await readBuffer(gpu, S.argmax1!.buffer, 0, bytes(S.argmax1!));
    }
    acts.logits = await readTensor(gpu, A.logits);
    acts.loss = await readTensor(gpu, A.loss);
    const g2 = await readBuffer(gpu, grads, 0, layout.nTotal * 4),
      s2 = await readBuffer(gpu, state, 0, layout.nTotal * 4);
    const part = (from: number, to: number, v: Float32Array) => v.slice(from, to);
    return {
      n: list.length,
      acts,
      weightGrads: part(0, layout.nWeights, g2), // conv weights, then the linear head's
      biasGrads: part(layout.nWeights, layout.nTrainable, g2), // batch-norm shifts
      running: part(layout.nTrainable, layout.nCopy, s2), // batch-norm running statistics
    };
  } finally {
    freeSince(gpu, mark);
  }
}

Deno.test("network in 256-image slices: forward, batch norm, backward bit for bit; conv weight gradients within f32 rounding", async () => {
  // batch 512 at base depth 4: the whitening output and group 1's gradients (92 KiB and 15 KiB an image) exceed a
  // 24 MiB binding, 256 images fit
  const one = await networkPass(gpu, 512, 4), sliced = await networkPass(limited(24 * MiB), 512, 4);
  assert.ok(sliced.n > one.n, `${sliced.n} dispatches sliced, ${one.n} in one pass`);
  for (const name of Object.keys(one.acts)) sameBits(name, sliced.acts[name], one.acts[name]);
  sameBits("running statistics", sliced.running, one.running);
  sameBits("batch-norm shift gradients", sliced.biasGrads, one.biasGrads);
  assertClose("weight gradients", sliced.weightGrads, one.weightGrads, 1e-5);
});

Deno.test("network in slices of a few MiB (32 images, the last shorter): the same within f32 rounding", async () => {
  // base depth 8: group 1's argmax (1800 bytes an image) and the targets (40) start a binding every 32 images
  const one = await networkPass(gpu, 200, 8), sliced = await networkPass(limited(3 * MiB), 200, 8);
  assert.ok(sliced.n > one.n, `${sliced.n} dispatches sliced, ${one.n} in one pass`);
  sameBits("a0 (before any batch norm)", sliced.acts.a0, one.acts.a0);
  for (const name of Object.keys(one.acts).filter((n) => !n.includes("argmax") && n !== "a0")) {
    assertClose(name, sliced.acts[name], one.acts[name], 1e-5);
  }
  assertClose("running statistics", sliced.running, one.running, 1e-6);
  assertClose("batch-norm shift gradients", sliced.biasGrads, one.biasGrads, 1e-5);
  assertClose("weight gradients", sliced.weightGrads, one.weightGrads, 1e-5);
});

Deno.test("training (3 steps, the EMA every step) in slices of 32 images, then evaluation in slices", async () => {
  // Later steps amplify the weight gradients' rounding (16 steps on random labels: 2% in a batch-norm shift), so the
  // comparison is over 3 steps, with a recipe whose EMA starts at once and updates every step (copy, then 2 updates).
  const rng = new Prng(1), n = 128, images = Uint8Array.from({ length: n * 3072 }, () => rng.int(256));
  const labels = Uint8Array.from({ length: n }, () => rng.int(10));
  const h = { ...hyp, misc: { ...hyp.misc, ema: { ...hyp.misc.ema!, everyNSteps: 1 } } };
  const mark = gpu.allocated.length;
  try {
    const data = uploadDataset(gpu, {
      trainImages: images,
      trainLabels: labels,
      testImages: images,
      testLabels: labels,
    });
    const opts = { data, seed: 2, epochs: 1.5, baseDepth: 8, batchSize: 64, returnWeights: true, hyp: h };
    const one = await train({ gpu, ...opts }), small = limited(3 * MiB); // 64 images: 5.6 MiB of whitening output
    const sliced = await train({ gpu: small, ...opts });
    assert.equal(one.epochs.length, 2);
    one.epochs.forEach((m, e) => {
      const s = sliced.epochs[e];
      for (const k of ["trainLoss", "valLoss", "emaValLoss"] as const) {
        assert.ok(Math.abs(s[k]! - m[k]!) <= 1e-5 * (1 + Math.abs(m[k]!)), `epoch ${e} ${k}: ${s[k]} vs ${m[k]}`);
      }
      assert.equal(s.trainAcc, m.trainAcc);
    });
    // the final EMA network: 3.5e-5 apart at most, measured
    for (const [name, t] of one.weights!) assertClose(name, sliced.weights!.get(name)!.data, t.data, 2e-4);
    // evaluation of one network: nothing sums over the batch, so slices change no bit
    const evalOne = await evaluateWeights(gpu, data, one.weights!, 64, "net"),
      evalSliced = await evaluateWeights(small, data, one.weights!, 64, "net");
    assert.deepEqual(evalSliced, evalOne);
  } finally {
    freeSince(gpu, mark);
  }
});

Deno.test("checkFits names the largest base depth or batch that fits, and that one does", () => {
  const small = limited(3 * MiB), limit = (e: unknown) => String((e as Error).message);
  let depth = 0;
  assert.throws(() => checkFits(small, 64, 48), (e) => {
    assert.match(
      limit(e),
      /^at base depth 48, its largest weight \[3,3,384,384\] takes 5 MiB, but this GPU binds at most 3 MiB: use --base-depth (\d+) or less$/,
    );
    depth = Number(limit(e).match(/--base-depth (\d+)/)![1]);
    return true;
  });
  checkFits(small, 64, depth);
  assert.throws(() => checkFits(small, 64, depth + 1), /use --base-depth/);
  // one image's activations: a slice of the fewest images that start a binding must fit one (at base depth 4: 64,
  // for group 1's argmax rows of 900 bytes)
  assert.throws(
    () => checkFits(limited(2 * MiB), 8, 4),
    /^Error: at base depth 4, a slice of 64 images \(the fewest a binding can start at\) needs 6 MiB for one \[64,31,31,24\] activation, but this GPU binds at most 2 MiB: use another GPU$/,
  );
  // a buffer: the largest activation of the whole batch must fit one (it is bound in slices, but allocated whole)
  const buffers = { ...gpu, limits: { ...gpu.limits, maxBuffer: 256 * MiB } };
  let batch = 0;
  assert.throws(() => checkFits(buffers, 2048, 64), (e) => {
    assert.match(
      limit(e),
      /^a batch of 2048 needs 481 MiB for one \[2048,31,31,64\] activation but this GPU's buffers hold at most 256 MiB: use --batch-size (\d+) or less$/,
    );
    batch = Number(limit(e).match(/--batch-size (\d+)/)![1]);
    return true;
  });
  checkFits(buffers, batch, 64);
  assert.throws(() => checkFits(buffers, batch + 1, 64), /use --batch-size/);
});
