// What batch slices cost: the same training steps in one pass, in 256-image slices and in 32-image slices (a forced
// binding limit, as on a device with small bindings; the same run, see tests/slicing.test.ts). Batch 512, base depth 8
// on lavapipe by default; BENCH_BATCH and BENCH_BASE_DEPTH scale it up on a real GPU.
import { type Gpu, initGpu, train, uploadDataset } from "../main.ts";

const gpu = await initGpu();
const batch = Number(Deno.env.get("BENCH_BATCH") ?? 512), baseDepth = Number(Deno.env.get("BENCH_BASE_DEPTH") ?? 8);
const steps = 2, n = batch * steps;
const images = new Uint8Array(n * 3072).map((_, i) => (i * 2654435761) >>> 24);
const labels = Uint8Array.from({ length: n }, (_, i) => i % 10);
const data = uploadDataset(gpu, { trainImages: images, trainLabels: labels, testImages: images, testLabels: labels });

// the whitening output is the widest activation: 31 x 31 x 24 f32 per image
const rowBytes = 31 * 31 * 24 * 4, MiB = 2 ** 20;
const limits = [
  { name: "one pass", maxBinding: gpu.limits.maxBinding },
  { name: "256-image slices", maxBinding: Math.ceil((256 * rowBytes) / MiB) * MiB },
  { name: "32-image slices", maxBinding: Math.ceil((32 * rowBytes) / MiB) * MiB },
];
const seconds: Record<string, number> = {};
for (const l of limits) {
  const g: Gpu = { ...gpu, limits: { ...gpu.limits, maxBinding: l.maxBinding } };
  Deno.bench({
    name: `train, ${l.name}: ${steps} steps of batch ${batch}, base depth ${baseDepth}, + eval of ${n}`,
    group: "slices",
    baseline: l === limits[0],
    n: 2,
    warmup: 1,
    async fn() {
      const r = await train({ gpu: g, data, seed: 1, epochs: 1, baseDepth, batchSize: batch });
      seconds[l.name] = Math.min(seconds[l.name] ?? Infinity, r.trainSeconds);
    },
  });
}

addEventListener("unload", () => {
  for (const [name, s] of Object.entries(seconds)) {
    console.log(`training steps [${name}]: ${((steps * batch) / s).toFixed(1)} images/s (the steps' clock, best run)`);
  }
});
