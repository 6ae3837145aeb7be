// End-to-end: a tiny training run on a synthetic, easily learnable dataset must lower the loss,
// beat chance clearly, and be reproducible from its seed. Small enough for lavapipe in CI.
import assert from "node:assert/strict";
import {
  airbench94,
  type Cifar10,
  cpuNote,
  durationText,
  freeSince,
  hyp,
  initGpu,
  makeActivations,
  stepText,
  timeLeft,
  train,
  type TrainState,
  uploadDataset,
} from "../main.ts";
import { f16Test } from "./util.ts";

const gpu = await initGpu();

/** Class k: a bright horizontal band at rows 3k..3k+2 in channel k % 3, on noise. Crops and flips keep it learnable. */
function synthetic(n: number, seed: number): { images: Uint8Array; labels: Uint8Array } {
  let s = seed >>> 0;
  const rand = () => ((s = (Math.imul(s, 1664525) + 1013904223) >>> 0) / 2 ** 32);
  const images = new Uint8Array(n * 3072), labels = new Uint8Array(n);
  for (let i = 0; i < n; i++) {
    const k = i % 10;
    labels[i] = k;
    for (let c = 0; c < 3; c++) {
      for (let y = 0; y < 32; y++) {
        for (let x = 0; x < 32; x++) {
          const band = c === k % 3 && y >= 3 * k && y < 3 * k + 3;
          images[i * 3072 + c * 1024 + y * 32 + x] = band ? 200 + rand() * 55 : rand() * 100;
        }
      }
    }
  }
  return { images, labels };
}

const trainSet = synthetic(512, 1), testSet = synthetic(128, 2);
const cifar: Cifar10 = {
  trainImages: trainSet.images,
  trainLabels: trainSet.labels,
  testImages: testSet.images,
  testLabels: testSet.labels,
};
const data = uploadDataset(gpu, cifar);

/**
 * What holds on any conforming device, whatever its float rounding: over seeds 1-4 of the tiny run, every run's
 * validation loss falls, and the mean accuracy (and EMA accuracy) beats chance (0.1) by a wide margin. A single tiny
 * run is chaotic (one of these four seeds ends at chance on lavapipe), so no threshold is put on any one run.
 */
async function assertLearnsOverSeeds(opts: Omit<Parameters<typeof train>[0], "seed">, ema = true) {
  const runs = [];
  for (const seed of [1, 2, 3, 4]) runs.push(await train({ ...opts, seed }));
  for (const r of runs) {
    const first = r.epochs[0], last = r.epochs[r.epochs.length - 1];
    assert.equal(r.epochs.length, 3);
    assert.ok(last.valLoss < first.valLoss, `seed ${r.seed}: val loss ${first.valLoss} -> ${last.valLoss}`);
    assert.ok(r.trainSeconds > 0 && last.totalTimeSeconds === r.trainSeconds);
    for (const e of r.epochs) {
      for (const v of [e.trainLoss, e.valLoss, e.trainAcc, e.valAcc]) assert.ok(Number.isFinite(v));
    }
  }
  const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / xs.length;
  const acc = mean(runs.map((r) => r.valAcc)), emaAcc = mean(runs.map((r) => r.emaValAcc ?? 0));
  assert.ok(acc > 0.3, `mean val accuracy over 4 seeds ${acc} (chance is 0.1)`);
  if (ema) assert.ok(emaAcc > 0.3, `mean EMA val accuracy over 4 seeds ${emaAcc} (chance is 0.1)`);
  return runs;
}

Deno.test("tiny training runs lower the loss and beat chance, over four seeds", async () => {
  await assertLearnsOverSeeds({ gpu, data, epochs: 3, baseDepth: 4, batchSize: 64 });
});

// airbench94 normalises with its own constants; its whitening bias learns for 3 epochs, so 4 cross the freeze
const airbenchData = uploadDataset(gpu, cifar, airbench94);
const airbenchOpts = { gpu, data: airbenchData, epochs: 4, baseDepth: 4, batchSize: 64, hyp: airbench94 };

Deno.test("airbench94: tiny training runs lower the loss and beat chance, over four seeds, and have no EMA", async () => {
  const runs = await assertLearnsOverSeeds({ ...airbenchOpts, epochs: 3 }, false);
  for (const r of runs) assert.ok(r.emaValAcc === null && r.epochs.every((e) => e.emaValAcc === null));
});

Deno.test("airbench94: a run resumed from its epoch-2 checkpoint ends with the same bits as the run left alone", async () => {
  const strip = (r: Awaited<ReturnType<typeof train>>) => r.epochs.map(({ totalTimeSeconds: _, ...m }) => m);
  let atEpoch2: TrainState | undefined;
  const alone = await train({
    ...airbenchOpts,
    seed: 4,
    returnWeights: true,
    onCheckpoint: (s) => {
      if (s.epoch === 2) atEpoch2 = s;
    },
  });
  // epochs 2 and 3 again: an even and an odd epoch's flips (from the first epoch's, redrawn), the whitening bias
  // learning in epoch 2 and frozen in epoch 3
  const resumed = await train({ ...airbenchOpts, seed: 4, returnWeights: true, resume: atEpoch2 });
  assert.deepEqual(strip(resumed), strip(alone));
  for (const [name, t] of alone.weights!) assert.deepEqual(resumed.weights!.get(name)!.data, t.data, name);
});

f16Test(gpu.hasF16, "--precision f16: the tiny runs learn, and the first forward pass matches f32's", async () => {
  const opts = { gpu, data, seed: 1, epochs: 3, baseDepth: 4, batchSize: 64 };
  const f32 = await train(opts), f16 = await train({ ...opts, precision: "f16" });
  await assertLearnsOverSeeds({ ...opts, precision: "f16" });
  // epoch 0's train loss is the first batch's, before any update: the two differ only by f16 rounding
  // (later values drift apart, as two precisions do in a chaotic few-step run)
  const e32 = f32.epochs[0], e16 = f16.epochs[0];
  assert.ok(Math.abs(e16.trainLoss - e32.trainLoss) < 0.01, `train loss f16 ${e16.trainLoss} vs f32 ${e32.trainLoss}`);
  assert.notDeepEqual(f16.epochs.map((e) => e.valLoss), f32.epochs.map((e) => e.valLoss)); // f16 really ran
});

Deno.test("the same seed gives the same run; another seed does not", async () => {
  const opts = { gpu, data, epochs: 1, baseDepth: 4, batchSize: 64 };
  const strip = (r: Awaited<ReturnType<typeof train>>) => r.epochs.map(({ totalTimeSeconds: _, ...m }) => m);
  const a = await train({ ...opts, seed: 7 }),
    b = await train({ ...opts, seed: 7 }),
    c = await train({ ...opts, seed: 8 });
  assert.deepEqual(strip(a), strip(b));
  assert.notDeepEqual(strip(a), strip(c));
});

Deno.test("an absurd learning rate is caught on the GPU and names the first non-finite step", async () => {
  const saved = { ...hyp.opt };
  hyp.opt.nonBiasLr = 1e8;
  hyp.opt.biasLr = 1e8;
  try {
    await assert.rejects(
      () => train({ gpu, data, seed: 1, epochs: 1, baseDepth: 4, batchSize: 64 }),
      /^Error: the training loss became NaN or infinite at step [1-7] \(epoch 0\): lower the learning rates in hyp\.opt/,
    );
  } finally {
    Object.assign(hyp.opt, saved);
  }
});

Deno.test("a lost GPU device ends the run with one clear line", async () => {
  const own = await initGpu(); // a device of its own, since this test loses it
  const ownData = uploadDataset(own, cifar);
  await assert.rejects(
    () =>
      train({
        gpu: own,
        data: ownData,
        seed: 1,
        epochs: 1,
        baseDepth: 4,
        batchSize: 64,
        onStep: (p) => p.step === 2 && own.device.destroy(), // as a driver reset would
      }),
    /^Error: the GPU device was lost \(.*\): restart the run; if it happens again, update the GPU driver or lower --batch-size$/,
  );
});

Deno.test("a batch whose buffers the GPU cannot hold is refused with one line naming the batch size that fits", async () => {
  // buffers of at most 8 MiB (a binding is sliced, a buffer is not): base depth 16's largest activation per image is
  // the whitening output [31,31,24] f32, 90 KiB
  const small = { ...gpu, limits: { ...gpu.limits, maxBuffer: 8 * 2 ** 20 } };
  let fits = 0;
  await assert.rejects(
    () => train({ gpu: small, data, seed: 1, epochs: 1, baseDepth: 16, batchSize: 256 }),
    (e: Error) => {
      assert.match(
        e.message,
        /^a batch of 256 needs 23 MiB for one \[256,31,31,24\] activation but this GPU's buffers hold at most 8 MiB: use --batch-size (\d+) or less$/,
      );
      fits = Number(e.message.match(/--batch-size (\d+) or less/)![1]);
      return true;
    },
  );
  // the batch it names fits (every activation buffer is allocated), one more does not
  const mark = small.allocated.length;
  makeActivations(small, fits, 16);
  freeSince(small, mark);
  assert.throws(() => makeActivations(small, fits + 1, 16), /use --batch-size/);
});

Deno.test("train({ hyp }) runs that recipe down to the kernels, and leaves the module's hyp alone", async () => {
  const opts = { gpu, data, seed: 3, epochs: 1, baseDepth: 4, batchSize: 64 };
  const strip = (r: Awaited<ReturnType<typeof train>>) => r.epochs.map(({ totalTimeSeconds: _, ...m }) => m);
  const base = await train(opts);
  // a number read by a kernel (loss.wgsl's label smoothing): epoch 0's train loss is the first batch's, before any
  // update, so it differs by the smoothing alone
  const noSmoothing = await train({ ...opts, hyp: { ...hyp, opt: { ...hyp.opt, labelSmoothing: 0 } } });
  assert.notEqual(noSmoothing.epochs[0].trainLoss, base.epochs[0].trainLoss);
  // the conv + max pool fusion switched off through the recipe: the same bits, epoch by epoch
  const separate = await train({ ...opts, hyp: { ...hyp, kernels: { ...hyp.kernels, fuseConvPool: false } } });
  assert.deepEqual(strip(separate), strip(base));
  await assert.rejects(
    () => train({ ...opts, hyp: { ...hyp, opt: { ...hyp.opt, nonBiasLr: 1e8, biasLr: 1e8 } } }),
    /^Error: the training loss became NaN or infinite at step \d+ \(epoch 0\)/,
  );
  assert.equal(hyp.opt.labelSmoothing, 0.2);
  assert.equal(hyp.opt.nonBiasLr, 1.525 / 512);
  assert.deepEqual(hyp.kernels, { fuseNormGelu: true, fuseConvPool: true });
});

Deno.test("timeLeft: the step time from the finished steps (the slower of the synced and the submitted pace), plus the evaluations", () => {
  const p = {
    epoch: 0,
    step: 3,
    steps: 10,
    stepsDone: 3, // steps 1 and 2 are finished: a submit waits for the GPU to take the step
    totalSteps: 20,
    trainSeconds: 4,
    synced: { steps: 0, seconds: 0 },
    evalSeconds: 0,
    evaluated: 0,
    numEpochs: 2,
    wallSeconds: 5,
  };
  assert.deepEqual(timeLeft({ ...p, stepsDone: 1 }), null);
  assert.deepEqual(timeLeft(p), { seconds: 2 * 18, run: 2 * 20, partial: true });
  assert.equal(
    stepText(p),
    "training epoch 0: 3/10 steps submitted | 5 s elapsed | over 36 s left (evaluation not timed yet)",
  );
  // after epoch 0: 10 steps took 30 s (3 s a step, slower than the submits' 2 s), its evaluation 6 s
  const later = { ...p, epoch: 1, stepsDone: 13, trainSeconds: 24, synced: { steps: 10, seconds: 30 } };
  assert.deepEqual(timeLeft({ ...later, evalSeconds: 6, evaluated: 1 }), {
    seconds: 3 * 8 + 6,
    run: 3 * 20 + 12,
    partial: false,
  });
  assert.equal(
    stepText({ ...later, evalSeconds: 6, evaluated: 1, wallSeconds: 4000 }, 2),
    "training epoch 1: 3/10 steps submitted | 1 h 7 min elapsed | about 30 s left, 2 min 54 s for all 3 runs",
  );
  assert.deepEqual([durationText(59.4), durationText(61), durationText(3 * 3600 + 600)], [
    "59 s",
    "1 min 1 s",
    "3 h 10 min",
  ]);
  // a CPU device says what a long run costs there, once its first step is timed; a GPU, or a short run, nothing
  const lavapipe = { cpu: true, adapterName: "llvmpipe" };
  assert.equal(
    cpuNote(lavapipe, 10 * 3600 + 1200),
    "note: llvmpipe runs on the CPU: at this pace the run takes about 10 h 20 min here (measured over its first step); " +
      "for a quick look, the README's reduced run (under Output) takes minutes",
  );
  assert.equal(cpuNote(lavapipe, 599), undefined);
  assert.equal(cpuNote({ cpu: false, adapterName: "NVIDIA H100" }, 10 * 3600), undefined);
});
