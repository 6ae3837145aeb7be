// The airbench94 recipe (main.ts `airbench94`) on the GPU against PyTorch in float64: tests/golden/airbench.json,
// written by tests/golden/airbench_fixtures.py (its docstring says what each case computes and how to rerun it). The
// network's training-mode forward, summed loss, every gradient and the running stats it updates (fused kernels and
// separate ones), eval-mode logits, the TTA views and levels 0, 1, 2 (and evaluateWeights' loss and accuracy on them),
// MaxPool2d(3) on the last 3x3 map, the three SGD groups with the whitening bias frozen, and the lr schedule.
// Every array of the fixture is {shape, data}, flat, in our layouts (NHWC, HWIO, linear [out][in]).
//
// Tolerances (the GPU computes in f32, the fixture in float64): errors are measured relative to the compared tensor's
// largest magnitude, max |got - want| / max |want|, and printed so that they can be recorded.
// - logits, pooled features, loss, running stats: 1e-4 (f32 sums of a few hundred products through 7 layers).
// - gradients: 3e-4. A backward pass adds another 7 layers of f32 sums, batch-norm backward subtracts means of
//   products (cancellation), and the smallest tensors (norm biases of width 2) sum over few terms; 3e-4 of the
//   tensor's largest entry still fails a gradient routed to the wrong tensor or a missed term by orders of magnitude.
// - SGD: 1e-5 (four steps of a few f32 multiply-adds on O(1) values; the lrs and decays are rounded to f32).
// - max pool: exact (a maximum and a routed gradient involve no arithmetic).
// - schedule: 1e-12 of the group's lr (the same float64 formula on both sides).
import assert from "node:assert/strict";
import {
  airbench94,
  backward,
  checkGpu,
  createBuffer,
  crossEntropy,
  evaluateWeights,
  forward,
  freeSince,
  gatherEval,
  globalMaxPool,
  globalMaxPoolBackward,
  type Hyp,
  initGpu,
  layoutState,
  makeActivations,
  type NetKernels,
  netKernels,
  readBuffer,
  readTensor,
  scheduledLr,
  setFrame,
  sgdNesterov,
  stateSpec,
  stateViews,
  submit,
  tensor,
  trainingPlan,
  ttaCombine,
  upload,
  uploadImages,
  whitenBiasLr,
} from "../main.ts";
import fixtureJson from "./golden/airbench.json" with { type: "json" };

const gpu = await initGpu();

// =================================================================================================
// The fixture, typed loosely (the JSON is large; these are the parts read here)
// =================================================================================================

type Arr = { shape: number[]; data: number[] };
type Named = Record<string, Arr>;
const fixture = fixtureJson as unknown as {
  network: {
    base_depth: number;
    bn_eps: number;
    bn_momentum: number;
    label_smoothing: number;
    inputs: { images: Arr; labels: number[]; state: Named };
    logits: Arr;
    loss: number;
    features: Arr;
    grads: Named;
    running_after: Named;
  };
  network_eval: { running_stats: Named; logits: Arr };
  tta2: {
    bytes: number[];
    labels: number[];
    mean: number[];
    std: number[];
    normalised_first_image: Arr;
    views: Arr[];
    level0: Arr;
    level1: Arr;
    level2: Arr;
    losses: Arr;
    predictions: number[];
  };
  maxpool3: Record<"3x3" | "4x4", { x: Arr; y: Arr; dy: Arr; dx: Arr }>;
  sgd_groups: {
    batch_size: number;
    momentum: number;
    T: number;
    Tw: number;
    groups: { params: string[]; initial_lr: number; weight_decay: number }[];
    initial_params: Named;
    steps: {
      s: number;
      frozen_whiten_bias: boolean;
      lrs: number[];
      grads: Record<string, Arr | null>;
      params: Named;
      momentum_buffers: Named;
    }[];
  };
  schedule: { T: number; Tw: number; lrs: Record<"whiten_bias" | "norm_biases" | "head" | "muon_filters", number[]> };
};

const WHITEN_BIAS = "initial_block.whiten.bias";
const numel = (shape: number[]) => shape.reduce((a, b) => a * b, 1);
const maxAbs = (a: ArrayLike<number>) => Array.from(a).reduce((m, v) => Math.max(m, Math.abs(v)), 0);

/**
 * Asserts max |got - want| <= tol * max |want| (tol relative to the tensor's largest magnitude), prints and returns
 * the measured relative error.
 */
function compare(name: string, got: ArrayLike<number>, want: ArrayLike<number>, tol: number) {
  assert.equal(got.length, want.length, `${name}: length`);
  const scale = maxAbs(want) || 1;
  let worst = 0, at = 0;
  for (let i = 0; i < want.length; i++) {
    const e = Math.abs(got[i] - want[i]);
    if (!(e <= worst)) [worst, at] = [Number.isNaN(e) ? Infinity : e, i];
  }
  const rel = worst / scale;
  console.log(`  ${name}: max abs err ${worst.toExponential(2)}, relative to max |want| ${rel.toExponential(2)}`);
  assert.ok(
    rel <= tol,
    `${name}: max err ${worst.toExponential(3)} = ${rel.toExponential(3)} x max |want| (${scale.toExponential(3)}) ` +
      `> ${tol} at [${at}]: got ${got[at]}, want ${want[at]}`,
  );
  return rel;
}

/** The flat state of `layout` holding the fixture's tensors (every state tensor must be there). */
function stateFrom(layout: ReturnType<typeof layoutState>, tensors: Named) {
  const values = new Float32Array(layout.nTotal);
  for (const [name, e] of layout.entries) {
    const t = tensors[name];
    assert.ok(t, `the fixture has no ${name}`);
    assert.deepEqual(t.shape, e.shape, `${name}: shape`);
    values.set(t.data, e.offset);
  }
  return values;
}

/** The network_eval state: network's inputs with the running stats replaced by network_eval's. */
const evalTensors = (): Named => ({ ...fixture.network.inputs.state, ...fixture.network_eval.running_stats });

/** One-hot targets [B][10]. */
const oneHot = (labels: number[]) => {
  const t = new Float32Array(labels.length * 10);
  labels.forEach((l, b) => (t[b * 10 + l] = 1));
  return t;
};

/** F.cross_entropy(logits, label, label_smoothing) of each row, float64. */
function smoothedLosses(logits: ArrayLike<number>, labels: number[], smoothing: number) {
  return labels.map((label, b) => {
    const row = Array.from(logits).slice(b * 10, b * 10 + 10), max = Math.max(...row);
    const logSum = Math.log(row.reduce((s, v) => s + Math.exp(v - max), 0)) + max;
    const nll = (k: number) => logSum - row[k];
    let uniform = 0;
    for (let k = 0; k < 10; k++) uniform += nll(k) / 10;
    return (1 - smoothing) * nll(label) + smoothing * uniform;
  });
}

/** argmax of each row of [n][10], and the gap between its two largest entries. */
const argmaxRows = (logits: ArrayLike<number>, n: number) =>
  Array.from({ length: n }, (_, b) => {
    const row = Array.from(logits).slice(b * 10, b * 10 + 10), k = row.indexOf(Math.max(...row));
    const second = Math.max(...row.filter((_, j) => j !== k));
    return { k, gap: row[k] - second };
  });

// =================================================================================================
// 1. The network: training-mode forward, summed loss, backward, running stats
// =================================================================================================

const D = fixture.network.base_depth;

/** Sanity: the recipe's numbers the fixture was computed with. */
Deno.test("airbench94: the recipe's network numbers are the fixture's", () => {
  assert.equal(airbench94.net.batchNormEps, fixture.network.bn_eps);
  assert.equal(airbench94.net.batchNormMomentum, fixture.network.bn_momentum);
  assert.equal(airbench94.opt.labelSmoothing, fixture.network.label_smoothing);
  assert.equal(airbench94.opt.lossScaleBatch, null); // reduction="sum": crossEntropy's grad scale 1
  assert.deepEqual(airbench94.net.imageStats, { mean: fixture.tta2.mean, std: fixture.tta2.std });
  const spec = stateSpec(D, airbench94);
  assert.deepEqual(
    spec.map((s) => s.name).sort(),
    Object.keys(fixture.network.inputs.state).sort(),
    "the state's tensors are the fixture's",
  );
  const trainable = spec.filter((s) => s.kind === "weight" || s.kind === "bias").map((s) => s.name);
  assert.deepEqual(trainable.sort(), Object.keys(fixture.network.grads).sort());
});

async function checkTrainingStep(kernels: NetKernels, what: string) {
  console.log(`network, training mode (${what}):`);
  const mark = gpu.allocated.length, net = fixture.network, B = net.inputs.labels.length;
  const layout = layoutState(stateSpec(D, airbench94));
  const state = createBuffer(gpu, layout.nTotal * 4), grads = createBuffer(gpu, layout.nTotal * 4);
  const P = stateViews(state, layout), G = stateViews(grads, layout);
  const A = makeActivations(gpu, B, D, "f32", kernels, airbench94);
  gpu.device.queue.writeBuffer(state, 0, stateFrom(layout, net.inputs.state));
  gpu.device.queue.writeBuffer(A.x.buffer, A.x.offset, Float32Array.from(net.inputs.images.data));
  gpu.device.queue.writeBuffer(A.targets.buffer, A.targets.offset, oneHot(net.inputs.labels));
  setFrame(gpu, { valid: B });
  submit(gpu, [
    ...forward(gpu, A, P, true, airbench94),
    crossEntropy(gpu, A.logits, A.targets, A.loss, A.correct, A.dlogits, 1, airbench94.opt.labelSmoothing),
    ...backward(gpu, A, P, G, airbench94),
  ]);
  const logits = await readTensor(gpu, A.logits), loss = await readTensor(gpu, A.loss);
  const feats = await readTensor(gpu, A.feats);
  const g = await readBuffer(gpu, grads, 0, layout.nTotal * 4), s = await readBuffer(gpu, state, 0, layout.nTotal * 4);
  checkGpu(gpu);
  freeSince(gpu, mark);
  const at = (flat: Float32Array, name: string) => {
    const e = layout.entries.get(name)!;
    return flat.subarray(e.offset, e.offset + numel(e.shape));
  };
  compare("logits", logits, net.logits.data, 1e-4);
  compare("summed loss", [loss.reduce((a, b) => a + b, 0)], [net.loss], 1e-4);
  compare("pooled features", feats, net.features.data, 1e-4);
  let worstGrad = 0;
  for (const [name, want] of Object.entries(net.grads)) {
    worstGrad = Math.max(worstGrad, compare(`grad ${name}`, at(g, name), want.data, 3e-4));
  }
  let worstRunning = 0;
  for (const [name, want] of Object.entries(net.running_after)) {
    worstRunning = Math.max(worstRunning, compare(`after: ${name}`, at(s, name), want.data, 1e-4));
  }
  console.log(`  worst gradient ${worstGrad.toExponential(2)}, worst running stat ${worstRunning.toExponential(2)}`);
}

Deno.test("airbench94 network: training forward, summed loss, 14 gradients, running stats vs PyTorch float64", async () => {
  await checkTrainingStep(netKernels(gpu, airbench94), "fused norm+GELU and conv+pool");
});

Deno.test("airbench94 network: the same with the fusions off (separate kernels)", async () => {
  await checkTrainingStep(
    { ...netKernels(gpu, airbench94), fuseNormGelu: false, fuseConvPool: false },
    "separate kernels",
  );
});

// =================================================================================================
// 2. Eval-mode logits
// =================================================================================================

Deno.test("airbench94 network: eval-mode logits on the fixture's running stats (network_eval)", async () => {
  console.log("network, eval mode:");
  const mark = gpu.allocated.length, net = fixture.network, B = net.inputs.labels.length;
  const layout = layoutState(stateSpec(D, airbench94));
  const state = createBuffer(gpu, layout.nTotal * 4), P = stateViews(state, layout);
  const A = makeActivations(gpu, B, D, "f32", netKernels(gpu, airbench94), airbench94);
  const values = stateFrom(layout, evalTensors());
  gpu.device.queue.writeBuffer(state, 0, values);
  gpu.device.queue.writeBuffer(A.x.buffer, A.x.offset, Float32Array.from(net.inputs.images.data));
  submit(gpu, forward(gpu, A, P, false, airbench94));
  const logits = await readTensor(gpu, A.logits), after = await readBuffer(gpu, state, 0, layout.nTotal * 4);
  checkGpu(gpu);
  freeSince(gpu, mark);
  compare("eval logits", logits, fixture.network_eval.logits.data, 1e-4);
  assert.deepEqual(after, values, "an eval-mode forward leaves the state (running stats included) as it was");
});

// =================================================================================================
// 3. Test-time augmentation: the 6 views, levels 0, 1, 2, and evaluateWeights' loss and accuracy
// =================================================================================================

const tta = fixture.tta2, nTta = tta.labels.length;
const ttaData = () => ({
  test: uploadImages(gpu, Uint8Array.from(tta.bytes), Uint8Array.from(tta.labels)),
  norm: airbench94.net.imageStats!,
});

Deno.test("airbench94 TTA: gatherEval's 6 views, their logits, and ttaCombine at levels 0, 1, 2", async () => {
  console.log("TTA views:");
  const mark = gpu.allocated.length, views = 6;
  const layout = layoutState(stateSpec(D, airbench94));
  const state = createBuffer(gpu, layout.nTotal * 4), P = stateViews(state, layout);
  gpu.device.queue.writeBuffer(state, 0, stateFrom(layout, evalTensors()));
  const data = ttaData();
  const A = makeActivations(gpu, views * nTta, D, "f32", netKernels(gpu, airbench94), airbench94);
  const out = [1, 2, 6].map((v) => ({ v, t: tensor(gpu, [nTta, 10]) }));
  setFrame(gpu, { offset: 0, valid: nTta });
  // level 2's batch: rows v * 5 + b hold view v of image b; levels 0 and 1 combine its first 1 and 2 views
  submit(gpu, [
    ...gatherEval(gpu, data.test, data.norm, A.x, A.targets, views),
    ...forward(gpu, A, P, false, airbench94),
    ...out.map(({ v, t }) => ttaCombine(gpu, { ...A.logits, shape: [v * nTta, 10] }, t, v)),
  ]);
  const x = await readTensor(gpu, A.x), logits = await readTensor(gpu, A.logits);
  const combined = await Promise.all(out.map(({ t }) => readTensor(gpu, t)));
  checkGpu(gpu);
  freeSince(gpu, mark);
  // the normalisation (v / 255 - mean) / std of the first image, view 0
  compare("normalised first image", x.subarray(0, 32 * 32 * 3), tta.normalised_first_image.data, 1e-6);
  tta.views.forEach((want, v) => {
    compare(`view ${v} logits`, logits.subarray(v * nTta * 10, (v + 1) * nTta * 10), want.data, 1e-4);
  });
  [tta.level0, tta.level1, tta.level2].forEach((want, level) => {
    compare(`level ${level} logits`, combined[level], want.data, 1e-4);
  });
});

Deno.test("airbench94 TTA: evaluateWeights' loss and accuracy at levels 0, 1, 2", async () => {
  console.log("evaluateWeights:");
  const mark = gpu.allocated.length, data = ttaData();
  const weights = new Map(
    Object.entries(evalTensors()).map(([name, t]) => [name, { shape: t.shape, data: Float32Array.from(t.data) }]),
  );
  const levels = [tta.level0, tta.level1, tta.level2];
  for (let level = 0; level < 3; level++) {
    const h: Hyp = { ...airbench94, misc: { ...airbench94.misc, finalTtaLevel: level } };
    const logits = levels[level].data, smoothing = airbench94.opt.labelSmoothing;
    const losses = smoothedLosses(logits, tta.labels, smoothing);
    if (level === 2) compare("level 2 per-image losses (fixture vs this test's)", losses, tta.losses.data, 1e-7);
    const wantLoss = losses.reduce((a, b) => a + b, 0) / nTta;
    const pred = argmaxRows(logits, nTta);
    if (level === 2) assert.deepEqual(pred.map((p) => p.k), tta.predictions);
    // an argmax decided by less than the logits' tolerance would test rounding, not the network
    const gap = Math.min(...pred.map((p) => p.gap));
    assert.ok(gap > 1e-3 * maxAbs(logits), `level ${level}: the fixture's top-2 logits are ${gap} apart`);
    const wantAcc = pred.filter((p, b) => p.k === tta.labels[b]).length / nTta;
    const batchSize = [1, 2, 6][level] * nTta; // every view of every image in one batch
    const got = await evaluateWeights(gpu, data, weights, batchSize, "fixture", "f32", h);
    compare(`level ${level} mean loss`, [got.valLoss], [wantLoss], 1e-4);
    console.log(`  level ${level} accuracy ${got.valAcc} (fixture ${wantAcc}), smallest top-2 gap ${gap.toFixed(4)}`);
    assert.equal(got.valAcc, wantAcc, `level ${level} accuracy`);
  }
  checkGpu(gpu);
  freeSince(gpu, mark);
});

// =================================================================================================
// 4. MaxPool2d(3) on the last map
// =================================================================================================

// The network's last map is 3x3 (32 -> 31 -> 15 -> 7 -> 3), where MaxPool2d(3) is a global max pool: globalMaxPool.
// The fixture's "4x4" case (MaxPool2d(3) reading only the top-left 3x3 window of a 4x4 map) does not arise in the
// network, and a global pool is not meant to match it: it is not tested here.
Deno.test("airbench94 MaxPool2d(3) on a 3x3 map: globalMaxPool and its backward, exact", async () => {
  const mark = gpu.allocated.length, c = fixture.maxpool3["3x3"];
  const [B, H, W, C] = c.x.shape;
  assert.deepEqual([H, W], [3, 3]);
  const x = upload(gpu, Float32Array.from(c.x.data), c.x.shape), dy = upload(gpu, Float32Array.from(c.dy.data), [B, C]);
  const y = tensor(gpu, [B, C]), dx = upload(gpu, new Float32Array(numel(c.x.shape)).fill(-777), c.x.shape);
  submit(gpu, [...globalMaxPool(gpu, x, y), ...globalMaxPoolBackward(gpu, x, dy, dx)]);
  const gotY = await readTensor(gpu, y), gotDx = await readTensor(gpu, dx);
  checkGpu(gpu);
  freeSince(gpu, mark);
  // exact: the fixture's values are f32-representable after rounding, the maximum and its routed gradient are copies
  assert.deepEqual(Array.from(gotY), c.y.data.map(Math.fround), "y");
  assert.deepEqual(Array.from(gotDx), c.dx.data.map(Math.fround), "dx");
  console.log(`maxpool 3x3: y and dx exact (${gotY.length} and ${gotDx.length} values)`);
});

// =================================================================================================
// 5. SGD: the three parameter groups, and a step with the whitening bias frozen
// =================================================================================================

Deno.test("airbench94 SGD groups: sgdNesterov from the head, 3 steps then a frozen-whitening-bias step", async () => {
  console.log("SGD groups:");
  const sgd = fixture.sgd_groups, B = sgd.batch_size;
  const h = airbench94.opt;
  assert.equal(h.momentum, sgd.momentum);
  // PyTorch's weight_decay per group (wd / lr0) is the coefficient our kernel couples into the gradient
  const wd = { weights: h.weightDecayPerSample * B, biases: h.weightDecayPerSample * B * h.biasDecayScaler };
  const [whitenGroup, normGroup, headGroup] = sgd.groups;
  assert.deepEqual(whitenGroup.params, [WHITEN_BIAS]);
  assert.deepEqual(headGroup.params, ["linear.weight"]);
  for (const [ours, theirs] of [[wd.weights, headGroup], [wd.biases, normGroup], [wd.biases, whitenGroup]] as const) {
    assert.ok(Math.abs(Math.fround(ours) - theirs.weight_decay) <= 1e-7 * theirs.weight_decay, `wd ${ours}`);
  }
  assert.deepEqual([whitenGroup.initial_lr, normGroup.initial_lr, headGroup.initial_lr], [
    h.biasLr,
    h.biasLr,
    h.nonBiasLr,
  ]);

  const mark = gpu.allocated.length, layout = layoutState(stateSpec(D, airbench94));
  const start = layout.entries.get("linear.weight")!.offset;
  // every tensor the fixture does not hold (conv filters, running stats, frozen) gets a sentinel: SGD must not touch it
  const init = new Float32Array(layout.nTotal).map((_, i) => 1 + (i % 97) / 97);
  for (const [name, t] of Object.entries(sgd.initial_params)) {
    const e = layout.entries.get(name)!;
    assert.deepEqual(t.shape, e.shape, name);
    init.set(t.data, e.offset);
  }
  const params = createBuffer(gpu, layout.nTotal * 4), grads = createBuffer(gpu, layout.nTotal * 4);
  const momentum = createBuffer(gpu, layout.nTotal * 4);
  gpu.device.queue.writeBuffer(params, 0, init);
  const step = sgdNesterov(gpu, layout, params, grads, momentum, wd, h.momentum, start);
  const gradValues = new Float32Array(layout.nTotal).fill(123); // never read outside [start, nTrainable)
  let whitenBefore: Float32Array | undefined;
  const at = (flat: Float32Array, name: string) => {
    const e = layout.entries.get(name)!;
    return flat.subarray(e.offset, e.offset + numel(e.shape));
  };
  for (const s of sgd.steps) {
    for (const [name, g] of Object.entries(s.grads)) {
      // frozen: torch's grad is None; our port stops computing the gradient and the buffer keeps the last one
      if (g) gradValues.set(g.data, layout.entries.get(name)!.offset);
      else assert.ok(s.frozen_whiten_bias && name === WHITEN_BIAS);
    }
    gpu.device.queue.writeBuffer(grads, 0, gradValues);
    const lrWhitenBias = s.frozen_whiten_bias ? whitenBiasLr(s.s, sgd.Tw, h) : s.lrs[0];
    if (s.frozen_whiten_bias) assert.equal(lrWhitenBias, 0, "the frozen whitening bias's lr");
    setFrame(gpu, { lrWhitenBias, lrBiases: s.lrs[1], lrWeights: s.lrs[2] });
    submit(gpu, step);
    const p = await readBuffer(gpu, params, 0, layout.nTotal * 4);
    const m = await readBuffer(gpu, momentum, 0, layout.nTotal * 4);
    checkGpu(gpu);
    for (const [name, want] of Object.entries(s.params)) {
      if (s.frozen_whiten_bias && name === WHITEN_BIAS) {
        // frozen: the parameter stays exactly as it was (lr 0); our momentum buffer for it goes on decaying with the
        // stale gradient where torch's skipped one is untouched, and is never read again: not compared
        assert.deepEqual(at(p, name), whitenBefore, "the frozen whitening bias is unchanged, bit for bit");
        compare(`step s=${s.s} ${name} (frozen)`, at(p, name), want.data, 1e-5); // torch's, unchanged too
        continue;
      }
      compare(`step s=${s.s} ${name}`, at(p, name), want.data, 1e-5);
      compare(`step s=${s.s} momentum ${name}`, at(m, name), s.momentum_buffers[name].data, 1e-5);
    }
    // nothing outside [linear.weight, nTrainable) moved: conv filters (Muon's), running stats, frozen tensors
    for (let i = 0; i < layout.nTotal; i++) {
      if (i >= start && i < layout.nTrainable) continue;
      if (p[i] !== init[i]) assert.fail(`state[${i}] changed from ${init[i]} to ${p[i]} (outside the SGD range)`);
    }
    whitenBefore = at(p, WHITEN_BIAS).slice();
  }
  freeSince(gpu, mark);
});

// =================================================================================================
// 6. The schedule
// =================================================================================================

Deno.test("airbench94 schedule: trainingPlan's T and Tw, scheduledLr and whitenBiasLr at every step", () => {
  const sc = fixture.schedule, o = airbench94.opt;
  // 10,000 images at batch 2,000: 5 steps an epoch, 8 epochs, the whitening bias learning for 3 of them
  const plan = trainingPlan(10_000, airbench94.misc.batchSize, airbench94.misc.trainEpochs, airbench94);
  assert.equal(plan.totalSteps, sc.T);
  assert.equal(plan.whitenBiasSteps, sc.Tw);
  const T = plan.totalSteps, Tw = plan.whitenBiasSteps;
  let worst = 0;
  const check = (name: string, got: number, want: number, lr0: number) => {
    const e = Math.abs(got - want) / lr0;
    worst = Math.max(worst, e);
    assert.ok(e <= 1e-12, `${name}: ${got} vs ${want}`);
  };
  for (let s = 0; s < T; s++) {
    check(`norm biases ${s}`, scheduledLr(s, T, o.biasLr, o), sc.lrs.norm_biases[s], o.biasLr);
    check(`head ${s}`, scheduledLr(s, T, o.nonBiasLr, o), sc.lrs.head[s], o.nonBiasLr);
    check(`muon ${s}`, scheduledLr(s, T, o.muon!.lr, o), sc.lrs.muon_filters[s], o.muon!.lr);
    if (s < Tw) check(`whitening bias ${s}`, whitenBiasLr(s, Tw, o), sc.lrs.whiten_bias[s], o.biasLr);
    else assert.equal(whitenBiasLr(s, Tw, o), 0, `whitening bias ${s}: frozen`);
  }
  assert.equal(sc.lrs.whiten_bias.length, Tw);
  console.log(`schedule: ${T} steps, max relative lr error ${worst.toExponential(2)}`);
});
