// The network's answers, as the --web page shows them (issue 19): evaluateWeights' logits (the same pass that counts
// the accuracy), the class of each image, the confusion matrix, the top 3 of one image, the pixel layout of a picture,
// and the page's progress bars. The CPU references here are written out, not main.ts's.
import assert from "node:assert/strict";
import {
  CIFAR10_CLASSES,
  confusionMatrix,
  evaluateWeights,
  freeSince,
  imageFromRgba,
  initGpu,
  predictedClasses,
  type Progress,
  progressBars,
  rgbaFromImage,
  softmaxRows,
  timeLeftText,
  topClasses,
  uploadImages,
} from "../main.ts";
import { Prng, randomNetwork } from "./util.ts";

const gpu = await initGpu();
const NORM = { mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25] };

/** `n` images (CHW bytes), each a random gradient of its own colours, and random labels. */
function images(n: number, seed: number) {
  const rng = new Prng(seed), pixels = new Uint8Array(n * 3072);
  for (let i = 0; i < n; i++) {
    for (let c = 0; c < 3; c++) {
      const [base, dx, dy] = [rng.int(256), rng.next() * 16 - 8, rng.next() * 16 - 8];
      for (let y = 0; y < 32; y++) {
        for (let x = 0; x < 32; x++) pixels[i * 3072 + c * 1024 + y * 32 + x] = (base + dx * x + dy * y) & 255;
      }
    }
  }
  return { pixels, labels: Uint8Array.from({ length: n }, () => rng.int(10)) };
}

Deno.test("evaluateWeights' answers: the logits its accuracy is counted on, one image's the same alone", async () => {
  // 37 images at batch 16 (flip TTA: 8 a batch): 4 full batches and a partial one; a random network of base depth 4
  // with weights of std 0.3 (seed 1) gives these images several classes, not one for all
  const weights = randomNetwork(1, 0.3), { pixels, labels } = images(37, 3), mark = gpu.allocated.length;
  try {
    const test = uploadImages(gpu, pixels, labels);
    const r = await evaluateWeights(gpu, { test, norm: NORM }, weights, 16, "net", "f32", undefined, true);
    assert.equal(r.logits?.length, 37 * 10);
    const predicted = predictedClasses(r.logits!, 10);
    assert.ok(new Set(predicted).size >= 3, `a network that answers one class: ${predicted}`);
    // the accuracy the GPU counted is the share of images whose largest logit is their label's
    const right = predicted.filter((p, i) => p === labels[i]).length;
    assert.equal(r.valAcc, right / 37);
    // and the loss is the cross-entropy of those logits (label smoothing 0.2, hlb's: 0.8 on the label, 0.02 elsewhere)
    let loss = 0;
    for (let i = 0; i < 37; i++) {
      const row = [...r.logits!.subarray(i * 10, i * 10 + 10)], max = Math.max(...row);
      const logSum = max + Math.log(row.reduce((s, x) => s + Math.exp(x - max), 0));
      row.forEach((x, c) => (loss -= (c === labels[i] ? 0.8 + 0.02 : 0.02) * (x - logSum)));
    }
    assert.ok(Math.abs(r.valLoss - loss / 37) < 1e-5, `loss ${r.valLoss} vs ${loss / 37}`);
    // without answers, nothing is copied and the figures are the same
    const plain = await evaluateWeights(gpu, { test, norm: NORM }, weights, 16, "net");
    assert.deepEqual({ ...plain, logits: r.logits }, r);
    // one image alone (the page's "your own image", batch 2): its row of the whole set's logits
    for (const i of [0, 20, 36]) {
      const one = uploadImages(gpu, pixels.slice(i * 3072, (i + 1) * 3072), labels.slice(i, i + 1));
      const alone = await evaluateWeights(gpu, { test: one, norm: NORM }, weights, 2, "net", "f32", undefined, true);
      const row = r.logits!.subarray(i * 10, i * 10 + 10);
      alone.logits!.forEach((x, c) =>
        assert.ok(Math.abs(x - row[c]) < 1e-5, `image ${i} class ${c}: ${x} vs ${row[c]}`)
      );
    }
  } finally {
    freeSince(gpu, mark);
  }
});

Deno.test("the page's figures: classes (first of equals), confusion matrix, softmax, top 3", () => {
  // three images: a tie between classes 2 and 5 (the first wins, as the GPU's argmax), a clear 9, a clear 0
  const logits = new Float32Array(30);
  logits.set([0, 0, 3, 0, 0, 3, 0, 0, 0, 0], 0);
  logits.set([1, 0, 0, 0, 0, 0, 0, 0, 2, 4], 10);
  logits.set([5, 0, 0, 0, 0, 0, 0, 0, 0, -1], 20);
  assert.deepEqual([...predictedClasses(logits, 10)], [2, 9, 0]);
  const m = confusionMatrix(predictedClasses(logits, 10), Uint8Array.from([2, 8, 3]), 10);
  assert.equal(m.flat().reduce((a, b) => a + b, 0), 3);
  assert.deepEqual([m[2][2], m[8][9], m[3][0]], [1, 1, 1]);
  const p = softmaxRows(logits, 10), z = 1 + Math.exp(-2) + Math.exp(-3) + 7 * Math.exp(-4);
  assert.ok(Math.abs(p[19] - 1 / z) < 1e-7 && Math.abs(p[18] - Math.exp(-2) / z) < 1e-7);
  for (let i = 0; i < 3; i++) assert.ok(Math.abs(p.subarray(10 * i, 10 * i + 10).reduce((a, b) => a + b) - 1) < 1e-6);
  assert.equal(logits[0], 0); // the logits themselves are left as they are
  // softmax of huge logits: no overflow
  assert.deepEqual([...softmaxRows(Float32Array.from([1000, 0]), 2)], [1, 0]);
  const top = topClasses(p.subarray(10, 20), 3);
  assert.deepEqual(top.map((t) => t.c), [9, 8, 0]);
  assert.equal(CIFAR10_CLASSES[top[0].c], "truck");
});

Deno.test("a picture's RGBA pixels in the dataset's layout (CHW), and back", () => {
  const rgba = new Uint8ClampedArray(32 * 32 * 4);
  for (let i = 0; i < rgba.length; i++) rgba[i] = (i * 7) % 256;
  const chw = imageFromRgba(rgba);
  assert.equal(chw.length, 3072);
  // pixel (x, y), channel c: CHW index c 1024 + y 32 + x; RGBA index 4 (y 32 + x) + c
  for (const [x, y, c] of [[0, 0, 0], [31, 0, 1], [5, 17, 2], [31, 31, 2]]) {
    assert.equal(chw[c * 1024 + y * 32 + x], rgba[4 * (y * 32 + x) + c]);
  }
  const back = rgbaFromImage(chw);
  for (let i = 0; i < back.length; i++) assert.equal(back[i], i % 4 === 3 ? 255 : rgba[i]);
});

Deno.test("the page's progress bars: steps of the epoch and of the run, and the terminal's estimate of the time left", () => {
  const p: Progress = {
    epoch: 1,
    step: 5,
    steps: 20,
    stepsDone: 25,
    totalSteps: 60,
    trainSeconds: 12,
    synced: { steps: 20, seconds: 10 },
    evalSeconds: 2,
    evaluated: 1,
    numEpochs: 3,
    wallSeconds: 14.2,
  };
  const bars = progressBars(p, 1, 2);
  assert.equal(bars.epoch, 5 / 20);
  assert.equal(bars.run, 25 / 60);
  assert.equal(bars.epochText, "epoch 1 (3 in all, from 0): step 5 of 20");
  // 0.5 s a step (12 s over the 24 finished, 10 s over the 20 synced), 2 s an evaluation: 36 steps and 2 evaluations
  // left, 22 s; a whole run 60 steps and 3 evaluations, 36 s; the run after this one, 58 s from now
  assert.equal(timeLeftText(p, 1), "about 22 s left, 58 s for all 2 runs");
  assert.equal(bars.runText, "run 1 of 2: step 25 of 60 | 14 s elapsed | about 22 s left, 58 s for all 2 runs");
});
