// End-to-end training on a small synthetic dataset (lavapipe-sized; BENCH_BATCH, BENCH_BASE_DEPTH and
// BENCH_STEPS scale it up on a real GPU). Measures train() as a user runs it: whitening, the epoch's
// steps, evaluation. The training images per second of the steps alone (the table's clock) are
// printed at the end: the best of each variant's iterations (warmup included), the least disturbed.
import {
  type Cifar10,
  CONV_KERNEL_SETS,
  type ConvKernels,
  initGpu,
  loadCifar10,
  RECIPES,
  train,
  uploadDataset,
} from "../main.ts";

const gpu = await initGpu();
const defaultKernels = gpu.convKernels; // the set this device would train with
const batch = Number(Deno.env.get("BENCH_BATCH") ?? 64);
const baseDepth = Number(Deno.env.get("BENCH_BASE_DEPTH") ?? 8);
const steps = Number(Deno.env.get("BENCH_STEPS") ?? 4);

function synthetic(n: number): { images: Uint8Array; labels: Uint8Array } {
  const images = new Uint8Array(n * 3072).map((_, i) => (i * 2654435761) >>> 24);
  return { images, labels: Uint8Array.from({ length: n }, (_, i) => i % 10) };
}
const tr = synthetic(batch * steps), te = synthetic(batch);
const cifar: Cifar10 = { trainImages: tr.images, trainLabels: tr.labels, testImages: te.images, testLabels: te.labels };
const data = uploadDataset(gpu, cifar);
const imagesPerSecond: Record<string, number> = {};

// The baseline is the port's first version: "block" conv kernels, no fusion (batch norm, GELU and max pool each
// their own kernel). Then every conv kernel set with today's fusions (norm + GELU, conv + max pool), except
// "tiled" on CPU devices (it is a GPU set that costs seconds per barrier-heavy step on lavapipe; see
// bench/conv.bench.ts); and this device's set without the conv + max pool fusion, its latest change.
type Variant = { name: string; set: ConvKernels; fuseNormGelu: boolean; fuseConvPool: boolean };
const variants: Variant[] = [
  { name: "first version: block conv kernels, no fusion", set: "block", fuseNormGelu: false, fuseConvPool: false },
  ...CONV_KERNEL_SETS.filter((set) => set !== "tiled" || defaultKernels !== "wide").map((set) => ({
    name: `${set} conv kernels, fused norm + GELU and conv + pool${
      set === defaultKernels ? " (this device's default)" : ""
    }`,
    set,
    fuseNormGelu: true,
    fuseConvPool: true,
  })),
  {
    name: `${defaultKernels} conv kernels, fused norm + GELU, separate conv and max pool`,
    set: defaultKernels,
    fuseNormGelu: true,
    fuseConvPool: false,
  },
];
for (const v of variants) {
  Deno.bench({
    name: `train [${v.name}]: ${steps} steps of batch ${batch}, base depth ${baseDepth}, + eval of ${batch}`,
    group: "train",
    baseline: v === variants[0],
    n: 2,
    warmup: 1,
    async fn() {
      const kernels = { conv: v.set, fuseNormGelu: v.fuseNormGelu, fuseConvPool: v.fuseConvPool };
      const r = await train({ gpu, data, seed: 1, epochs: 1, baseDepth, batchSize: batch, kernels });
      imagesPerSecond[v.name] = Math.max(imagesPerSecond[v.name] ?? 0, (steps * batch) / r.trainSeconds);
    },
  });
}

// A training step of each recipe (issue 18) at the same batch and base depth, on this device's kernels. airbench94's
// whitening bias learns in the first 3 epochs, so these steps (of a 1-epoch run) are its dearest: one more backward
// conv (into the whitening output) than its later steps.
for (const [name, h] of Object.entries(RECIPES)) {
  Deno.bench({
    name: `train [recipe ${name}]: ${steps} steps of batch ${batch}, base depth ${baseDepth}, + eval of ${batch}`,
    group: "recipe",
    baseline: name === "hlb",
    n: 2,
    warmup: 1,
    async fn() {
      const r = await train({ gpu, data, seed: 1, epochs: 1, baseDepth, batchSize: batch, hyp: h });
      const key = `recipe ${name}`;
      imagesPerSecond[key] = Math.max(imagesPerSecond[key] ?? 0, (steps * batch) / r.trainSeconds);
    },
  });
}

addEventListener("unload", () => {
  for (const [set, v] of Object.entries(imagesPerSecond)) {
    console.log(`training steps [${set}]: ${v.toFixed(1)} images/s (batch ${batch}, base depth ${baseDepth})`);
  }
});

// The reduced real training of issue 3 (--base-depth 16 --train-subset 10000 --epochs 2, batch 1024, the full
// test set). Long on lavapipe (its steps alone took 571 s on 2 cores, see bench/RESULTS.md), so it runs only when
// asked, e.g.
//   BENCH_REDUCED=1 CIFAR10_DIR=../shared/data/cifar-10-batches-bin deno bench -A bench/train.bench.ts --filter reduced
const reducedDir = Deno.env.get("CIFAR10_DIR");
const reduced = Deno.env.get("BENCH_REDUCED") === "1" && reducedDir;
Deno.bench({
  name: "reduced training: real CIFAR-10, base depth 16, 10000 train images, 2 epochs, batch 1024",
  ignore: !reduced,
  n: 1,
  warmup: 0,
  async fn() {
    const cifar10 = await loadCifar10(reducedDir!, { trainSubset: 10000 });
    const real = uploadDataset(gpu, cifar10);
    const r = await train({ gpu, data: real, seed: 1, epochs: 2, baseDepth: 16, batchSize: 1024 });
    console.log(
      `reduced training [${gpu.convKernels}]: EMA val acc ${(100 * (r.emaValAcc ?? NaN)).toFixed(2)}%, ` +
        `val acc ${(100 * r.valAcc).toFixed(2)}%, train ${r.trainSeconds.toFixed(1)} s`,
    );
  },
});
