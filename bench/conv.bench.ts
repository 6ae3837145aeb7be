// Convolution kernels of the network at a small batch (lavapipe-sized; pass BENCH_BATCH and
// BENCH_BASE_DEPTH to measure real GPU shapes, e.g. 1024 and 64). Each iteration submits the
// kernel and waits for the GPU, so the time includes one queue round trip (~11 ms on lavapipe:
// compare ratios measured in the same run, and the GFLOP/s printed once per shape at the end).
import {
  conv2d,
  conv2dBackwardData,
  conv2dBackwardWeight,
  conv2dMaxPool,
  CONV_KERNEL_SETS,
  type ConvKernels,
  type Dispatch,
  initGpu,
  maxPool2,
  maxPool2Backward,
  maxPool2Unpool,
  submit,
  tensor,
} from "../main.ts";

const gpu = await initGpu();
const batch = Number(Deno.env.get("BENCH_BATCH") ?? 32), base = Number(Deno.env.get("BENCH_BASE_DEPTH") ?? 8);
// the device's fp32 peak in TFLOP/s, if given (e.g. 67 for an H100 SXM): each line then also says the % of it
const peak = Number(Deno.env.get("BENCH_PEAK_TFLOPS") ?? NaN);
const widths = [base, 4 * base, 8 * base];

// [name, H (=W), Cin, Cout, kernel, pad]: every conv of the network, with its input size
const shapes: [string, number, number, number, number, number][] = [
  ["whiten 2x2", 32, 3, 24, 2, 0],
  ["group1 conv1", 31, 24, widths[0], 3, 1],
  ["group1 conv2", 15, widths[0], widths[0], 3, 1],
  ["group2 conv1", 15, widths[0], widths[1], 3, 1],
  ["group2 conv2", 7, widths[1], widths[1], 3, 1],
  ["group3 conv1", 7, widths[1], widths[2], 3, 1],
  ["group3 conv2", 3, widths[2], widths[2], 3, 1],
];

// Each (conv, pass) is a group with every kernel set: "block" (4 x 4 outputs per thread straight from
// storage, the port's first version) as the baseline, "tiled" (64 x 64 tiles in workgroup memory, the
// GPU set) and "wide" (16 x 8, the CPU-device set).
// BENCH_SETS=tiled,block limits the sets (bench/gpu.sh leaves out "wide", a CPU-device set whose 32 x 16 blocks
// would spill registers on a GPU and eat the bench's time limit)
const sets = (Deno.env.get("BENCH_SETS")?.split(",") ?? CONV_KERNEL_SETS) as ConvKernels[];
for (const set of sets) if (!CONV_KERNEL_SETS.includes(set)) throw new Error(`BENCH_SETS: unknown set "${set}"`);

/** One submit of `list` and a wait for the GPU per iteration; the best time is printed at exit. */
function bench(name: string, group: string, baseline: boolean, list: Dispatch[], flop?: number) {
  let best = Infinity;
  Deno.bench({
    name,
    group,
    baseline,
    n: 3,
    warmup: 1,
    async fn(b) {
      b.start();
      const t = performance.now();
      submit(gpu, list);
      await gpu.device.queue.onSubmittedWorkDone();
      best = Math.min(best, performance.now() - t);
      b.end();
    },
  });
  addEventListener("unload", () => {
    if (best === Infinity) return;
    const rate = flop
      ? `${(flop / best / 1e6).toFixed(2)} GFLOP/s (best ${best.toFixed(1)} ms, batch ${batch})${
        peak > 0 ? `, ${((flop / best / 1e9 / peak) * 100).toFixed(1)}% of peak` : ""
      }`
      : `best ${best.toFixed(1)} ms (batch ${batch})`;
    console.log(`${name.padEnd(40)} ${rate}`);
  });
}

for (const [name, h, cin, cout, k, pad] of shapes) {
  const ho = h + 2 * pad - k + 1;
  const x = tensor(gpu, [batch, h, h, cin]), w = tensor(gpu, [k, k, cin, cout]), y = tensor(gpu, [batch, ho, ho, cout]);
  const flop = 2 * batch * ho * ho * cout * cin * k * k;
  for (const set of sets) {
    const passes: [string, Dispatch[]][] = [
      ["forward", conv2d(gpu, x, w, y, pad, set)],
      ["backward data", conv2dBackwardData(gpu, y, w, x, pad, set)],
      ["backward weight", conv2dBackwardWeight(gpu, x, y, w, pad, set)],
    ];
    for (const [pass, list] of passes) {
      bench(`${name} ${pass} [${set}]`, `${name} ${pass}`, set === "block", list, flop);
    }
  }
  // Each group's first conv is followed by the 2x2 max pool: separate kernels (the baseline) against the conv
  // that pools its own output (main.ts hyp.kernels.fuseConvPool), per set; and the pool's backward against the unpool.
  if (!name.endsWith("conv1")) continue;
  const pooled = [batch, ho >> 1, ho >> 1, cout], p = tensor(gpu, pooled);
  const argmax = tensor(gpu, [...pooled.slice(0, 3), Math.ceil(cout / 4)], "u32");
  for (const set of sets) {
    const group = `${name} + max pool forward [${set}]`;
    bench(`${name} + max pool [${set}, separate]`, group, true, [
      ...conv2d(gpu, x, w, y, pad, set),
      ...maxPool2(gpu, y, p),
    ]);
    bench(`${name} + max pool [${set}, fused]`, group, false, conv2dMaxPool(gpu, x, w, p, argmax, pad, set));
  }
  const group = `${name} max pool backward`, dy = tensor(gpu, y.shape);
  bench(`${name} max pool backward [separate]`, group, true, maxPool2Backward(gpu, y, p, dy));
  bench(`${name} max pool backward [unpool]`, group, false, maxPool2Unpool(gpu, argmax, p, dy));
}
