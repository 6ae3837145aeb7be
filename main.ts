// main.ts: hlb-CIFAR10 (tysam-code, v0.7) ported to Deno + WebGPU, and its successor airbench94 (--recipe airbench94).
// Trains a small convnet on CIFAR-10 to ~94% test accuracy. This is the one file to fork: the recipe comes first and
// reads top to bottom, every GPU kernel lives in kernels/*.wgsl.  1. hyperparameters  2. network (state, init, forward, backward)  3. training (schedule,
// EMA, augmentation draws, the epoch loop)  4. evaluation.  Below a line of #s, the machinery a fork rarely touches:
// 5. GPU plumbing  6. ops (one function per kernel)  7. data  8. printing  9. run logs, saved weights  10. command line
// 11. the browser page (--web)
// Precision: f32 everywhere by default; --precision f16 stores images, activations and their gradients in f16
// (arithmetic, accumulation, weights and optimiser state stay f32). The original trains in fp16.

import { dirname, isAbsolute, join, resolve } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { parseArgs } from "node:util";

// =================================================================================================
// 1. Hyperparameters: hlb-CIFAR10 v0.7's (hyp, the default), then airbench94's (--recipe); flags override a few
// =================================================================================================

export const hyp = {
  name: "hlb",
  opt: {
    nonBiasLr: 1.525 / 512, // peak lr of conv and linear weights (the loss is a sum, hence /512)
    biasLr: 1.525 * 64 / 512, // BN shifts learn 64x faster ("bias_scaler")
    weightDecayPerSample: 6.687e-4, // x batch size: decay is coupled to the summed loss
    biasDecayScaler: 1 / 64, // BN shifts decay 64x less
    momentum: 0.85, // Nesterov SGD
    muon: null as MuonHyp | null, // hlb trains its conv filters with the SGD above (airbench94: Muon)
    schedule: "onecycle" as "onecycle" | "linear",
    percentStart: 0.23, // OneCycle: fraction of steps spent warming up
    initialDivFactor: 1e16, // OneCycle starts at max_lr / 1e16, i.e. ~0
    finalLrRatio: 0.07, // ... and ends at 0.07 x max_lr ("actually pretty important")
    scalingFactor: 1 / 9 as number | "1/width", // temperature of the linear head, applied in the forward pass
    labelSmoothing: 0.2,
    lossScaleBatch: 512 as number | null, // the differentiated loss is sum(loss) * 512 / batch size
  },
  net: {
    widths: [1, 4, 8], // of the three conv groups, in units of the base depth
    baseDepth: 64,
    whitening: { kernelSize: 2, eps: 1e-2, images: Infinity, centered: true }, // frozen 2x2 PCA-whitening conv
    whiteningBiasEpochs: 0, // the whitening conv has no bias
    convInit: "identity-added" as "identity-added" | "dirac", // each group's conv1 = identity + its random init
    headInit: "uniform" as "uniform" | "unit-std", // PyTorch's default init of the linear head
    batchNormMomentum: 0.4, // PyTorch convention: running = 0.6 running + 0.4 batch
    batchNormEps: 1e-12,
    imageStats: null as ChannelStats | null, // per-channel mean and std: measured on the training set
    flip: "random" as "random" | "alternating", // each image flipped with probability 1/2, drawn every epoch
    padAmount: 2, // reflect-pad 32 -> 36, then random 32x32 crops
    cropOffsets: 4, // ... at offsets 0..3 of 0..4: the original draws randint(0, 4), a quirk
    cutmixSize: 3, // 3x3 square pasted from another image
    cutmixEpochs: 6, // cutmix in the last 6 epochs
  },
  misc: {
    ema: { epochs: 10, decayBase: 0.95, decayPow: 3, everyNSteps: 5 } as EmaHyp | null, // EMA of the last ~10 epochs
    trainEpochs: 12.1,
    batchSize: 1024,
    numClasses: 10,
    ttaLevel: 1, // test-time augmentation of every evaluation: 1 = the image and its mirror
    finalTtaLevel: 1, // ... of the last epoch's evaluation
  },
  // How the GPU computes the network. Fusions change no number of the recipe (conv + pool gives the same bits,
  // norm + GELU the same up to f32 rounding; tests/network.test.ts checks both); false runs separate kernels.
  kernels: { fuseNormGelu: true, fuseConvPool: true },
};
type MuonHyp = { lr: number; momentum: number };
type EmaHyp = { epochs: number; decayBase: number; decayPow: number; everyNSteps: number };
export type Hyp = typeof hyp;

/**
 * airbench94 (KellerJordan/cifar10-airbench, airbench94_muon.py: 94.01% in 2.59 s on an A100), hlb-CIFAR10's
 * successor: the same network narrower at the end, Muon for the conv filters, 8 epochs at batch 2000, no EMA, no
 * cutmix. About half hlb's arithmetic for the same accuracy. `--recipe airbench94`.
 */
export const airbench94: Hyp = {
  name: "airbench94",
  opt: {
    nonBiasLr: 0.67, // the head's lr (the only weight SGD trains here: the conv filters take Muon)
    biasLr: 0.053, // BN shifts and the whitening bias
    // The original gives PyTorch's SGD weight_decay = wd / lr per group, wd = 2e-6 x batch: the decay coupled into
    // the gradient is wd / lr = (2e-6 / 0.67) x batch for the head, 0.67 / 0.053 times that for the shifts
    weightDecayPerSample: 2e-6 / 0.67,
    biasDecayScaler: 0.67 / 0.053,
    momentum: 0.85, // Nesterov SGD
    muon: { lr: 0.24, momentum: 0.6 }, // Muon (Nesterov) for every conv filter; Newton-Schulz: NEWTON_SCHULZ
    schedule: "linear", // every lr decays linearly to 0 over training, with no warm-up
    percentStart: 0, // (OneCycle's three numbers: unused)
    initialDivFactor: 1,
    finalLrRatio: 0,
    scalingFactor: "1/width", // the head's output is divided by its input width (256)
    labelSmoothing: 0.2,
    lossScaleBatch: null, // the summed loss, unscaled
  },
  net: {
    widths: [1, 4, 4], // 64, 256, 256
    baseDepth: 64,
    whitening: { kernelSize: 2, eps: 5e-4, images: 5000, centered: false }, // second moments of the first 5,000
    whiteningBiasEpochs: 3, // the whitening bias learns for 3 epochs (its own lr decaying to 0), then is frozen
    convInit: "dirac", // each conv's first in-channels filters are the identity, the others PyTorch's default
    headInit: "unit-std", // PyTorch's default init rescaled to unit std
    batchNormMomentum: 0.4, // airbench's "momentum 0.6" is 1 - PyTorch's: running = 0.6 running + 0.4 batch
    batchNormEps: 1e-12,
    imageStats: { mean: [0.4914, 0.4822, 0.4465], std: [0.247, 0.2435, 0.2616] }, // CIFAR_MEAN, CIFAR_STD
    flip: "alternating", // a random half flipped at epoch 0; then every image flips at every odd epoch
    padAmount: 2, // reflect-pad 32 -> 36, then a random translation of up to 2 pixels
    cropOffsets: 5, // ... offsets 0..4, all of them
    cutmixSize: 0, // no cutmix
    cutmixEpochs: 0,
  },
  misc: {
    ema: null, // no EMA
    trainEpochs: 8,
    batchSize: 2000,
    numClasses: 10,
    ttaLevel: 0, // each epoch's val accuracy without TTA
    finalTtaLevel: 2, // the last: 6 views, the mirror and 1-pixel translations (see evalPrograms)
  },
  kernels: { fuseNormGelu: true, fuseConvPool: true },
};

/** The recipes --recipe picks from. */
export const RECIPES: Record<string, Hyp> = { hlb: hyp, airbench94 };

/** The GPU kernels' folder, next to this file. To fork a kernel idea: `cp -r kernels kernels-idea`, point this at it. */
export const KERNEL_DIR = "./kernels/";

// =================================================================================================
// 2. Network: parameters, initialisation (whitening, dirac), forward and backward by hand
//
//   whiten (2x2 conv 3->12, frozen, + negation; airbench94: + a bias) -> GELU
//   3 x ConvGroup: conv3x3 -> maxpool2 -> BN -> GELU -> conv3x3 -> BN -> GELU
//   global max pool -> linear (x 1/9; airbench94: / width) -> logits
// Sizes: 32 -> 31 (the 2x2 whitening conv, no padding) -> 15 -> 7 -> 3 (each pool drops an odd last row): the last
// map is 3x3, so airbench94's MaxPool2d(3) is this global max pool.
// =================================================================================================

export const IMAGE_SIDE = 32; // CIFAR-10 images are 32 x 32 pixels, 3 channels
export const GROUPS = ["conv_group_1", "conv_group_2", "conv_group_3"];
/** The conv groups' widths: hlb D, 4D, 8D; airbench94 D, 4D, 4D. */
export const groupWidths = (baseDepth: number, h: Hyp = hyp) => h.net.widths.map((m) => m * baseDepth);
/** Output channels of the whitening conv: its 12 filters (3 channels x 2 x 2 patch) and their negations. */
const whitenOut = (h: Hyp) => 2 * 3 * h.net.whitening.kernelSize ** 2;

type ParamKind = "weight" | "bias" | "running" | "frozen";

/** Every tensor of the network state, named as in the PyTorch original (conv weights here are HWIO). */
export function stateSpec(baseDepth: number, h: Hyp = hyp): { name: string; shape: number[]; kind: ParamKind }[] {
  const k = h.net.whitening.kernelSize;
  const spec: { name: string; shape: number[]; kind: ParamKind }[] = [
    { name: "initial_block.whiten.weight", shape: [k, k, 3, whitenOut(h)], kind: "frozen" },
  ];
  // first of the biases: the optimiser gives it its own learning rate (sgdNesterov)
  if (h.net.whiteningBiasEpochs > 0) spec.push({ name: WHITEN_BIAS, shape: [whitenOut(h)], kind: "bias" });
  let cin = whitenOut(h);
  GROUPS.forEach((g, i) => {
    const c = groupWidths(baseDepth, h)[i];
    spec.push({ name: `${g}.conv1.weight`, shape: [3, 3, cin, c], kind: "weight" });
    spec.push({ name: `${g}.conv2.weight`, shape: [3, 3, c, c], kind: "weight" });
    for (const norm of ["norm1", "norm2"]) {
      spec.push({ name: `${g}.${norm}.weight`, shape: [c], kind: "frozen" }); // BN scale, fixed at 1
      spec.push({ name: `${g}.${norm}.bias`, shape: [c], kind: "bias" });
      spec.push({ name: `${g}.${norm}.running_mean`, shape: [c], kind: "running" });
      spec.push({ name: `${g}.${norm}.running_var`, shape: [c], kind: "running" });
    }
    cin = c;
  });
  spec.push({ name: "linear.weight", shape: [h.misc.numClasses, cin], kind: "weight" });
  return spec;
}

const WHITEN_BIAS = "initial_block.whiten.bias";
const STATE_ALIGN = 64; // floats: every tensor starts on a 256-byte boundary, so it can be bound alone

/** Lays the tensors out by kind (weights, shifts, running stats, frozen) so each range is contiguous. */
export function layoutState(spec: ReturnType<typeof stateSpec>): StateLayout {
  const entries = new Map<string, { offset: number; shape: number[] }>();
  const end: Record<string, number> = {};
  let offset = 0;
  for (const kind of ["weight", "bias", "running", "frozen"]) {
    for (const t of spec.filter((s) => s.kind === kind)) {
      entries.set(t.name, { offset, shape: t.shape });
      offset += Math.ceil(numel(t.shape) / STATE_ALIGN) * STATE_ALIGN;
    }
    end[kind] = offset;
  }
  const whitenBias = entries.get(WHITEN_BIAS), nWeights = end.weight;
  const whitenBiasEnd = whitenBias
    ? whitenBias.offset + Math.ceil(numel(whitenBias.shape) / STATE_ALIGN) * STATE_ALIGN
    : nWeights;
  return { entries, nWeights, whitenBiasEnd, nTrainable: end.bias, nCopy: end.running, nTotal: end.frozen };
}

export function stateViews(buffer: GPUBuffer, layout: StateLayout): Record<string, Tensor> {
  const views: Record<string, Tensor> = {};
  for (const [name, e] of layout.entries) views[name] = view(buffer, e.offset, e.shape);
  return views;
}

/**
 * Initial state on the CPU: PyTorch's default uniform init (+-1/sqrt(fan in), for weights and the whitening bias), then
 * dirac on each group's convs (hlb's, or airbench94's `convInit`) and airbench94's unit-std head.
 */
export function initState(
  layout: StateLayout,
  rng: Rng,
  whiten: Float32Array,
  h: Hyp = hyp,
): Float32Array<ArrayBuffer> {
  const state = new Float32Array(layout.nTotal);
  const at = (name: string) => {
    const e = layout.entries.get(name)!;
    return state.subarray(e.offset, e.offset + numel(e.shape));
  };
  const fanIns: Record<string, number> = { [WHITEN_BIAS]: 3 * h.net.whitening.kernelSize ** 2 }; // its conv's
  for (const [name, e] of layout.entries) {
    const t = at(name), conv = /conv[12]\.weight$/.test(name);
    if (conv || name === "linear.weight" || name === WHITEN_BIAS) {
      const fanIn = conv ? e.shape[0] * e.shape[1] * e.shape[2] : fanIns[name] ?? e.shape[1];
      const bound = 1 / Math.sqrt(fanIn);
      for (let i = 0; i < t.length; i++) t[i] = (2 * rng.next() - 1) * bound;
    } else if (name.endsWith("norm1.weight") || name.endsWith("norm2.weight") || name.endsWith("running_var")) {
      t.fill(1);
    }
  }
  at("initial_block.whiten.weight").set(whiten);
  if (h.net.headInit === "unit-std") {
    const w = at("linear.weight"), { std } = meanStd(w);
    for (let i = 0; i < w.length; i++) w[i] *= 1 / std;
  }
  if (h.net.convInit === "dirac") {
    // airbench94: in every conv, filter i < in-channels is the identity on channel i (torch.nn.init.dirac_)
    for (const [name, e] of layout.entries) {
      if (!/conv[12]\.weight$/.test(name)) continue;
      const w = at(name), [kh, kw, cin, cout] = e.shape, centre = (kh >> 1) * kw + (kw >> 1);
      for (let k = 0; k < kh * kw; k++) {
        for (let i = 0; i < cin; i++) {
          for (let o = 0; o < Math.min(cin, cout); o++) w[(k * cin + i) * cout + o] = k === centre && i === o ? 1 : 0;
        }
      }
    }
    return state;
  }
  for (const g of GROUPS) {
    // conv1 += identity, then restore its previous mean and std: a near-identity start that keeps the scale
    const w1 = at(`${g}.conv1.weight`), [, , cin, cout] = layout.entries.get(`${g}.conv1.weight`)!.shape;
    const before = meanStd(w1);
    for (let i = 0; i < Math.min(cin, cout); i++) w1[((1 * 3 + 1) * cin + i) * cout + i] += 1;
    const after = meanStd(w1);
    for (let i = 0; i < w1.length; i++) w1[i] = ((w1[i] - after.mean) / after.std) * before.std + before.mean;
    // conv2 is exactly the identity
    const w2 = at(`${g}.conv2.weight`);
    w2.fill(0);
    for (let i = 0; i < cout; i++) w2[((1 * 3 + 1) * cout + i) * cout + i] = 1;
  }
  return state;
}

function meanStd(x: Float32Array) {
  let mean = 0;
  for (const v of x) mean += v;
  mean /= x.length;
  let ss = 0;
  for (const v of x) ss += (v - mean) ** 2;
  return { mean, std: Math.sqrt(ss / (x.length - 1)) }; // unbiased, as torch.std_mean
}

/**
 * Covariance (n - 1) of all 2x2 patches of the normalised training images, as 12-vectors (c, ky, kx); or, not
 * `centered`, their second moments (/ n, airbench94). From the first `images` images.
 */
export async function patchCovariance(
  gpu: Gpu,
  imgs: GpuImages,
  norm: ChannelStats,
  w: Pick<Hyp["net"]["whitening"], "images" | "centered"> = hyp.net.whitening,
): Promise<number[][]> {
  const mark = gpu.allocated.length, count = Math.min(imgs.count, w.images);
  const out = tensor(gpu, [count, 90]);
  submit(gpu, patchMoments(gpu, imgs, norm, out));
  await gpu.profiler?.collect();
  const m = await readTensor(gpu, out);
  freeSince(gpu, mark);
  const sum = new Array(12).fill(0), prod = new Array(78).fill(0);
  for (let i = 0; i < count; i++) {
    for (let j = 0; j < 12; j++) sum[j] += m[i * 90 + j];
    for (let j = 0; j < 78; j++) prod[j] += m[i * 90 + 12 + j];
  }
  const n = count * (IMAGE_SIDE - 1) ** 2;
  const cov = Array.from({ length: 12 }, () => new Array(12).fill(0));
  for (let i = 0, k = 0; i < 12; i++) {
    for (let j = i; j < 12; j++, k++) {
      cov[i][j] = cov[j][i] = w.centered ? (prod[k] - (sum[i] * sum[j]) / n) / (n - 1) : prod[k] / n;
    }
  }
  return cov;
}

/** Whitening filters: eigenvector k / sqrt(eigenvalue k + eps), largest eigenvalue first. */
export function whiteningFilters(cov: number[][], eps = hyp.net.whitening.eps): number[][] {
  const { values, vectors } = jacobiEigen(cov);
  const order = values.map((_, i) => i).sort((i, j) => values[j] - values[i]);
  return order.map((i) => vectors[i].map((x) => x / Math.sqrt(values[i] + eps)));
}

/** The frozen whitening conv, HWIO [k][k][3][24]: the 12 filters (each 3 x k x k), then their negations. */
export function whiteningWeight(filters: number[][]): Float32Array {
  const k = Math.round(Math.sqrt(filters[0].length / 3)), nf = filters.length, w = new Float32Array(k * k * 3 * 2 * nf);
  for (let c = 0; c < 3; c++) {
    for (let ky = 0; ky < k; ky++) {
      for (let kx = 0; kx < k; kx++) {
        for (let f = 0; f < nf; f++) {
          const v = filters[f][(c * k + ky) * k + kx], at = ((ky * k + kx) * 3 + c) * 2 * nf;
          w[at + f] = v;
          w[at + nf + f] = -v;
        }
      }
    }
  }
  return w;
}

/**
 * How the network's passes run on the GPU: the conv kernel set (CONV_KERNELS) and hyp.kernels' fusions. Every
 * choice computes the same network; the activations are allocated for one of them and carry it.
 */
export interface NetKernels {
  conv: ConvKernels;
  fuseNormGelu: boolean; // batch norm + GELU in one pass; the norm's output is recomputed, never stored
  fuseConvPool: boolean; // each group's conv1 pools its own output; the full-size output is never stored
}
export const netKernels = (gpu: Gpu, h: Hyp = hyp): NetKernels => ({ conv: gpu.convKernels, ...h.kernels });

const normParams = (P: Record<string, Tensor>, prefix: string): NormParams => ({
  weight: P[`${prefix}.weight`],
  bias: P[`${prefix}.bias`],
  runningMean: P[`${prefix}.running_mean`],
  runningVar: P[`${prefix}.running_var`],
});
const batchNormHyp = (h: Hyp): BatchNormHyp => ({ momentum: h.net.batchNormMomentum, eps: h.net.batchNormEps });

/** conv1 -> 2x2 max pool of group G: fused, or the stored full-size conv output pooled by its own kernel. */
function convMaxPool(gpu: Gpu, x: Tensor, w: Tensor, G: GroupActs, k: NetKernels): Dispatch[] {
  if (k.fuseConvPool) return conv2dMaxPool(gpu, x, w, G.p1, G.argmax1!, 1, k.conv);
  return [...conv2d(gpu, x, w, G.c1!, 1, k.conv), ...maxPool2(gpu, G.c1!, G.p1)];
}

/** batch norm, then GELU: a = gelu(n), n = batchnorm(x) (n is not written when fused). */
function normGelu(
  gpu: Gpu,
  x: Tensor,
  p: NormParams,
  n: Tensor,
  a: Tensor,
  stats: Tensor,
  training: boolean,
  h: Hyp,
  k: NetKernels,
) {
  if (k.fuseNormGelu) return batchNorm(gpu, x, p, a, stats, training, "gelu", batchNormHyp(h));
  return [...batchNorm(gpu, x, p, n, stats, training, undefined, batchNormHyp(h)), ...gelu(gpu, n, a)];
}

/** x -> logits. `training`: batch-norm uses (and updates) batch statistics. */
export function forward(
  gpu: Gpu,
  A: Activations,
  P: Record<string, Tensor>,
  training: boolean,
  h: Hyp = hyp,
): Dispatch[] {
  const k = A.kernels, wb = A.whitenBias;
  const ops: Dispatch[] = [
    ...conv2d(gpu, A.x, P["initial_block.whiten.weight"], A.w0, 0, k.conv),
    ...(wb
      ? batchNorm(gpu, A.w0, { ...wb, bias: P[WHITEN_BIAS] }, A.a0, wb.stats, false, "gelu", WHITEN_BIAS_NORM)
      : gelu(gpu, A.w0, A.a0)),
  ];
  let input = A.a0;
  GROUPS.forEach((g, i) => {
    const G = A.groups[i];
    ops.push(
      ...convMaxPool(gpu, input, P[`${g}.conv1.weight`], G, k),
      ...normGelu(gpu, G.p1, normParams(P, `${g}.norm1`), G.n1, G.a1, G.stats1, training, h, k),
      ...conv2d(gpu, G.a1, P[`${g}.conv2.weight`], G.c2, 1, k.conv),
      ...normGelu(gpu, G.c2, normParams(P, `${g}.norm2`), G.n2, G.a2, G.stats2, training, h, k),
    );
    input = G.a2;
  });
  ops.push(
    ...globalMaxPool(gpu, input, A.feats),
    linear(gpu, A.feats, P["linear.weight"], A.logits, headScale(A.feats.shape[1], h)),
  );
  return ops;
}

/** The head's output scale: hlb's temperature 1/9, or airbench94's 1 / (its input width). */
const headScale = (width: number, h: Hyp) => (h.opt.scalingFactor === "1/width" ? 1 / width : h.opt.scalingFactor);

/**
 * dlogits -> gradients of every trainable tensor into G (same layout as the state). The whitening bias's (airbench94)
 * only with `whitenBiasGrad`: once it is frozen, its gradient is not computed (as the original detaches it).
 */
export function backward(
  gpu: Gpu,
  A: Activations,
  P: Record<string, Tensor>,
  G: Record<string, Tensor>,
  h: Hyp = hyp,
  whitenBiasGrad = true,
): Dispatch[] {
  const k = A.kernels, scale = headScale(A.feats.shape[1], h);
  const ops: Dispatch[] = [
    linearBackwardWeight(gpu, A.feats, A.dlogits, G["linear.weight"], scale),
    linearBackwardData(gpu, A.dlogits, P["linear.weight"], A.dfeats, scale),
  ];
  // Gradients alternate between two scratch buffers: each op reads one and writes the other.
  let cur = A.gradA, other = A.gradB;
  const next = (shape: number[]) => {
    [cur, other] = [other, cur];
    return view(cur, 0, shape, A.dtype);
  };
  const last = A.groups[2].a2;
  let d = view(cur, 0, last.shape, A.dtype);
  ops.push(...globalMaxPoolBackward(gpu, last, A.dfeats, d));
  // d(norm input) from d(GELU output) `da`: fused, or through the stored norm output n
  const normGeluBackward = (x: Tensor, n: Tensor, da: Tensor, stats: Tensor, norm: string) => {
    const p = normParams(P, norm), [dbias, dweight] = [G[`${norm}.bias`], G[`${norm}.weight`]];
    if (k.fuseNormGelu) {
      const dx = next(x.shape);
      ops.push(...batchNormBackward(gpu, x, da, stats, p, dx, dbias, dweight, "gelu"));
      return dx;
    }
    const dn = next(n.shape);
    ops.push(...geluBackward(gpu, n, da, dn));
    const dx = next(x.shape);
    ops.push(...batchNormBackward(gpu, x, dn, stats, p, dx, dbias, dweight));
    return dx;
  };
  for (let i = 2; i >= 0; i--) {
    const g = GROUPS[i], S = A.groups[i], input = i > 0 ? A.groups[i - 1].a2 : A.a0;
    d = normGeluBackward(S.c2, S.n2, d, S.stats2, `${g}.norm2`);
    ops.push(...conv2dBackwardWeight(gpu, S.a1, d, G[`${g}.conv2.weight`], 1, k.conv));
    const da1 = next(S.a1.shape);
    ops.push(...conv2dBackwardData(gpu, d, P[`${g}.conv2.weight`], da1, 1, k.conv));
    const dp = normGeluBackward(S.p1, S.n1, da1, S.stats1, `${g}.norm1`);
    const dc = next([...input.shape.slice(0, 3), S.p1.shape[3]]); // conv1 keeps the size (3x3, pad 1)
    ops.push(...(k.fuseConvPool ? maxPool2Unpool(gpu, S.argmax1!, dp, dc) : maxPool2Backward(gpu, S.c1!, dp, dc)));
    ops.push(...conv2dBackwardWeight(gpu, input, dc, G[`${g}.conv1.weight`], 1, k.conv));
    // the whitening conv is frozen and the data needs no gradient: group 1 stops here, unless the whitening bias learns
    const wb = i > 0 || !whitenBiasGrad ? undefined : A.whitenBias;
    if (i > 0 || wb) {
      const din = next(input.shape);
      ops.push(...conv2dBackwardData(gpu, dc, P[`${g}.conv1.weight`], din, 1, k.conv));
      d = din;
    }
    if (wb) { // through the GELU, summed per channel: the bias's gradient (see whitenBiasNorm)
      const p = { ...wb, bias: P[WHITEN_BIAS] };
      ops.push(...batchNormBackward(gpu, A.w0, d, wb.stats, p, null, G[WHITEN_BIAS], wb.dweight, "gelu"));
    }
  }
  return ops;
}

// =================================================================================================
// 3. Training: learning-rate schedule, EMA, augmentation draws, the epoch loop
// =================================================================================================

/**
 * The learning-rate schedule: PyTorch's OneCycleLR, linear, no momentum cycling. Rises from
 * maxLr / 1e16 to maxLr at step pct_start * T - 1, then falls to finalLrRatio * maxLr at step T - 1.
 */
export function oneCycleLr(step: number, totalSteps: number, maxLr: number, o: Hyp["opt"] = hyp.opt): number {
  const initial = maxLr / o.initialDivFactor, final = maxLr * o.finalLrRatio;
  const peakStep = o.percentStart * totalSteps - 1, lastStep = totalSteps - 1;
  if (step <= peakStep) return initial + (maxLr - initial) * (step / peakStep);
  return maxLr + (final - maxLr) * ((step - peakStep) / (lastStep - peakStep));
}

/** The recipe's lr at `step`: OneCycle (hlb), or a linear decay from maxLr to 0 (airbench94). */
export function scheduledLr(step: number, totalSteps: number, maxLr: number, o: Hyp["opt"] = hyp.opt): number {
  return o.schedule === "linear" ? maxLr * (1 - step / totalSteps) : oneCycleLr(step, totalSteps, maxLr, o);
}

/**
 * The whitening bias's lr (airbench94): biasLr decaying linearly to 0 over its own `steps`, then 0 (frozen: its
 * gradient is no longer computed, and a zero lr leaves it as it is).
 */
export function whitenBiasLr(step: number, steps: number, o: Hyp["opt"] = hyp.opt): number {
  return step < steps ? o.biasLr * (1 - step / steps) : 0;
}

/** EMA decay after optimiser step number `step` (1-based): 0.95^5 x (step / T)^3, i.e. ~0 early on. */
export function emaDecay(step: number, totalSteps: number, e: EmaHyp = hyp.misc.ema!): number {
  return e.decayBase ** e.everyNSteps * (step / totalSteps) ** e.decayPow;
}

/**
 * Steps and epochs for N images: S = floor(N/B) steps per epoch, T = ceil(S E) in all (E a hair over a whole
 * number, 1.0000000001, is that number: float noise adds no step), and as many epochs as those steps fill, so
 * that no epoch runs zero steps.
 */
export function trainingPlan(nTrain: number, batchSize: number, epochs: number, h: Hyp = hyp) {
  const stepsPerEpoch = Math.floor(nTrain / batchSize), steps = (e: number) => Math.ceil(stepsPerEpoch * e - 1e-9);
  const totalSteps = steps(epochs);
  return {
    stepsPerEpoch,
    totalSteps,
    numEpochs: stepsPerEpoch > 0 ? Math.ceil(totalSteps / stepsPerEpoch) : 0,
    /** steps run in epoch e: the last epoch runs whatever is left of T */
    stepsIn: (e: number) => Math.max(0, Math.min(stepsPerEpoch, totalSteps - e * stepsPerEpoch)),
    /** cutmix in epochs e >= E - 6, EMA from epoch floor(E) - 10 (both from epoch 0 if negative; never if none) */
    cutmixFrom: h.net.cutmixEpochs > 0 ? Math.max(0, epochs - h.net.cutmixEpochs) : Infinity,
    emaFrom: h.misc.ema ? Math.max(0, Math.floor(epochs) - h.misc.ema.epochs) : Infinity,
    /** the whitening bias learns in steps s < this (airbench94: ceil(3 S)) */
    whitenBiasSteps: steps(h.net.whiteningBiasEpochs),
  };
}

/**
 * The epoch's random draws for the augmentation kernel: the batch order, and per image its crop offsets (hlb: 0..3,
 * offset 4 is never drawn, a quirk of the original), flip, cutmix square and partner. Flips "alternating"
 * (airbench94): image i is flipped at epoch e if firstFlips[i] xor e is odd (firstFlips: firstEpochFlips).
 */
export function epochAugmentation(
  rng: Rng,
  n: number,
  cutmix: boolean,
  aug: AugmentHyp = hyp.net,
  alternating?: { epoch: number; firstFlips: Uint8Array },
) {
  const pad = aug.padAmount, size = aug.cutmixSize, offsets = aug.cropOffsets;
  if (!(pad >= 0 && pad <= 3 && offsets >= 1 && offsets <= 2 * pad + 1)) {
    throw new Error(
      `hyp.net.padAmount must be 0 to 3 and cropOffsets 1 to 2 padAmount + 1: the offsets are packed in 3 bits (data.wgsl)`,
    );
  }
  const perm = rng.permutation(n), partner = cutmix ? rng.permutation(n) : perm;
  const even = size % 2 === 0 ? 1 : 0, half = Math.floor(size / 2);
  const lowest = half - even, centres = IMAGE_SIDE - half - even - lowest; // centre in [lowest, lowest + centres)
  const params = new Uint32Array(2 * n);
  for (let i = 0; i < n; i++) {
    const dy = rng.int(offsets), dx = rng.int(offsets);
    const flip = alternating ? (alternating.firstFlips[i] ^ alternating.epoch) & 1 : rng.next() < 0.5 ? 1 : 0;
    let bits = dy | (dx << 3) | (flip << 6);
    if (cutmix && size > 0) bits |= (1 << 7) | ((lowest + rng.int(centres)) << 8) | ((lowest + rng.int(centres)) << 13);
    params[2 * i] = bits;
    params[2 * i + 1] = cutmix ? partner[i] : i;
  }
  return { perm, params };
}

/**
 * airbench94's first-epoch flips: a random half of the images (each with probability 1/2), from a generator of their
 * own (seed xor FLIP_STREAM), so that a run resumed from a checkpoint draws the same ones again.
 */
export function firstEpochFlips(seed: number, n: number): Uint8Array {
  const rng = new Rng((seed ^ FLIP_STREAM) >>> 0);
  return Uint8Array.from({ length: n }, () => (rng.next() < 0.5 ? 1 : 0));
}
const FLIP_STREAM = 0xf11b5eed;

export interface TrainOptions {
  gpu: Gpu;
  data: GpuData;
  seed: number;
  epochs?: number; // default hyp.misc.trainEpochs; the next two likewise from hyp
  baseDepth?: number;
  batchSize?: number;
  hyp?: Hyp; // the recipe (default: `hyp` above); an ablation passes its own
  kernels?: Partial<NetKernels>; // how the GPU computes it (default: this device's conv set, hyp.kernels' fusions)
  precision?: DType; // storage of images, activations and their gradients (default f32); arithmetic is f32
  onEpochStart?: (epoch: number) => void;
  onStep?: (p: Progress) => void; // after each step is submitted (no GPU wait): where the run is, and its times
  onEpoch?: (m: EpochMetrics) => void | Promise<void>; // awaited: a run log can be written before the next epoch
  returnWeights?: boolean; // read the final network back into RunResult.weights (for --save)
  stop?: () => boolean; // asked after every step (the event loop runs in between); true ends the run there
  resume?: TrainState; // continue the run from the end of an epoch (a checkpoint), instead of starting it
  onCheckpoint?: (s: TrainState) => void | Promise<void>; // awaited at the start and after every epoch's row
}

/**
 * Everything that continues a run from the end of an epoch, on the same device with the same bits: the network
 * (weights, shifts, running statistics), the momentum, the EMA, the generator, the step and the rows so far.
 */
export interface TrainState {
  epoch: number; // the next epoch to run
  step: number; // optimiser steps taken
  rng: number[]; // Rng.save() at the end of the epoch
  emaExists: boolean;
  trainSeconds: number;
  epochs: EpochMetrics[];
  state: Float32Array; // flat, laid out by layoutState (so are the next two)
  momentum: Float32Array;
  ema: Float32Array;
}

/** Where a run is after a step was submitted, and what it measured so far: enough to say how long it has left. */
export interface Progress {
  epoch: number;
  step: number; // steps submitted in this epoch (1-based), of
  steps: number;
  stepsDone: number; // steps submitted in the run, of
  totalSteps: number;
  trainSeconds: number; // the training clock now (steps only)
  synced: { steps: number; seconds: number }; // steps finished on the GPU at the last epoch end, and the clock then
  evalSeconds: number; // time spent evaluating so far (in this process), over
  evaluated: number; // the epochs it evaluated
  numEpochs: number; // the run's epochs (each evaluated at its end)
  wallSeconds: number; // since the run's first step (training, evaluation, everything)
}

export interface EpochMetrics {
  epoch: number;
  trainLoss: number; // mean loss of the epoch's first batch
  trainAcc: number; // accuracy of the epoch's first batch
  valLoss: number;
  valAcc: number;
  emaValAcc: number | null; // null until the EMA exists
  emaValLoss: number | null;
  totalTimeSeconds: number; // cumulative training time (steps only, no evaluation)
}

export interface RunResult {
  seed: number;
  emaValAcc: number | null;
  valAcc: number;
  trainSeconds: number;
  epochs: EpochMetrics[];
  weights?: Map<string, { shape: number[]; data: Float32Array }>; // the final EMA network (the net if no EMA)
  interrupted?: { epoch: number; steps: number }; // set when `stop` ended the run early
}

/** One training run: whitening from the data, then the epochs; the table's row after each. */
export async function train(o: TrainOptions): Promise<RunResult> {
  const { gpu, data } = o, h = o.hyp ?? hyp;
  const E = o.epochs ?? h.misc.trainEpochs, B = o.batchSize ?? h.misc.batchSize;
  const baseDepth = o.baseDepth ?? h.net.baseDepth, N = data.train.count;
  const plan = trainingPlan(N, B, E, h), T = plan.totalSteps;
  if (plan.stepsPerEpoch < 1) {
    throw new Error(`--batch-size ${B} is larger than the training set (${N} images): lower it`);
  }
  if (B < 2) throw new Error("--batch-size must be at least 2");
  const rng = new Rng(o.seed), mark = gpu.allocated.length;
  try {
    // the frozen whitening conv, from the training images' 2x2 patches (computed once per dataset and recipe)
    const whitening = JSON.stringify([h.net.whitening, data.norm]), cache = (data.whitening ??= new Map());
    if (!cache.has(whitening)) {
      const cov = await patchCovariance(gpu, data.train, data.norm, h.net.whitening);
      cache.set(whitening, whiteningWeight(whiteningFilters(cov, h.net.whitening.eps)));
    }
    const kernels = { ...netKernels(gpu, h), ...o.kernels }, precision = o.precision ?? "f32";
    const run = await withErrorScopes(
      gpu,
      "the network",
      () => buildRun(gpu, data, cache.get(whitening)!, B, baseDepth, rng, h, kernels, precision),
    );
    const firstFlips = h.net.flip === "alternating" ? firstEpochFlips(o.seed, N) : undefined;
    await compilePipelines(gpu, run.programs);

    // The epoch loop. The CPU waits for the GPU only at the end of each epoch's steps (for the clock), for the
    // metrics after evaluating, and while STEPS_IN_FLIGHT steps are queued; a step is one submit of recorded
    // programs, with this step's numbers in `frame`. A run resumed from a checkpoint goes on from the end of its
    // epoch, with its generator, buffers and rows.
    const at = o.resume
      ? resumeRun(gpu, run, rng, plan, o.resume)
      : { epoch: 0, step: 0, emaExists: false, trainSeconds: 0 };
    const first = at.epoch, epochs: EpochMetrics[] = [...(o.resume?.epochs ?? [])], started = performance.now();
    let { step, emaExists, trainSeconds } = at; // step: optimiser steps taken so far (the schedule's index)
    let evalSeconds = 0; // for the time left (Progress)
    const inFlight: Promise<void>[] = []; // the queued steps' completions, oldest first
    const checkpoint = async (epoch: number) =>
      o.onCheckpoint &&
      await o.onCheckpoint(await trainState(gpu, run, rng, { epoch, step, emaExists, trainSeconds, epochs }));
    if (!o.resume) await checkpoint(0);
    for (let epoch = first; epoch < plan.numEpochs; epoch++) {
      o.onEpochStart?.(epoch);
      const t0 = performance.now();
      const alternating = firstFlips && { epoch, firstFlips };
      startEpoch(gpu, run, epochAugmentation(rng, N, epoch >= plan.cutmixFrom, h.net, alternating));
      for (let s = 0; s < plan.stepsIn(epoch); s++, step++) {
        const ema = h.misc.ema, emaNow = ema !== null && epoch >= plan.emaFrom && (step + 1) % ema.everyNSteps === 0;
        const whitenBiasLearns = step < plan.whitenBiasSteps; // airbench94: its own linear decay, then frozen
        setFrame(gpu, {
          offset: s * B, // the batch: images perm[s B ..] of this epoch's order
          valid: B,
          lrWeights: scheduledLr(step, T, h.opt.nonBiasLr, h.opt),
          lrBiases: scheduledLr(step, T, h.opt.biasLr, h.opt),
          lrWhitenBias: whitenBiasLr(step, plan.whitenBiasSteps, h.opt),
          muonLr: h.opt.muon ? scheduledLr(step, T, h.opt.muon.lr, h.opt) : 0,
          emaDecay: ema ? emaDecay(step + 1, T, ema) : 0,
          step,
        });
        // augment, forward, loss; backward, Nesterov SGD (and Muon); every 5th step of the last epochs the EMA, whose
        // first update is a plain copy of the network
        const update = whitenBiasLearns ? run.update : run.updateFrozenWhitenBias;
        const list = [...run.trainForward, ...(s === 0 ? [run.firstBatchMetrics] : []), ...update];
        submit(
          gpu,
          emaNow && emaExists ? [...list, ...run.emaStep] : list,
          emaNow && !emaExists ? run.copyToEma : undefined,
        );
        if (emaNow) emaExists = true;
        inFlight.push(gpu.device.queue.onSubmittedWorkDone());
        if (inFlight.length > STEPS_IN_FLIGHT) await inFlight.shift();
        await gpu.profiler?.collect();
        const now = performance.now(), synced = { steps: step - s, seconds: trainSeconds }; // as of the epoch's start
        o.onStep?.({
          epoch,
          step: s + 1,
          steps: plan.stepsIn(epoch),
          stepsDone: step + 1,
          totalSteps: T,
          trainSeconds: trainSeconds + (now - t0) / 1000,
          synced,
          evalSeconds,
          evaluated: epoch - first,
          numEpochs: plan.numEpochs,
          wallSeconds: (now - started) / 1000,
        });
        await nextTask(); // lets a Ctrl-C (or a page's Stop button) be heard between steps; no GPU wait
        if (o.stop?.()) return await stoppedRun(gpu, o.seed, epochs, trainSeconds, { epoch, steps: step + 1 });
      }
      await gpu.device.queue.onSubmittedWorkDone(); // the clock counts the GPU's work, not its submission
      trainSeconds += (performance.now() - t0) / 1000;
      checkGpu(gpu);

      const e0 = performance.now();
      const last = epoch === plan.numEpochs - 1; // airbench94: TTA level 2 for the last epoch only
      const row = await evaluateEpoch(
        gpu,
        run,
        last ? run.finalEval : run.eval,
        epoch,
        emaExists,
        trainSeconds,
        precision,
        o.stop,
      );
      if (!row) return await stoppedRun(gpu, o.seed, epochs, trainSeconds, { epoch, steps: step });
      evalSeconds += (performance.now() - e0) / 1000;
      epochs.push(row);
      await o.onEpoch?.(row);
      await checkpoint(epoch + 1);
    }
    const last = epochs[epochs.length - 1];
    const weights = o.returnWeights ? await readWeights(gpu, run, emaExists ? run.ema : run.state) : undefined;
    return { seed: o.seed, emaValAcc: last.emaValAcc, valAcc: last.valAcc, trainSeconds, epochs, weights };
  } finally {
    freeSince(gpu, mark);
  }
}

/**
 * Steps queued on the GPU at most: enough to keep it busy, few enough that the progress shown is the GPU's (a browser
 * queues every submit, so the bars would reach the epoch's end at once and then stand still), that a Stop is heard
 * within as many steps, and that a page training on its own thread repaints while it waits.
 */
const STEPS_IN_FLIGHT = 3;

// The metrics buffer, read once per epoch: a (loss sum, correct count) f32 pair per slot (the epoch's first train
// batch, the network on the test set, the EMA on the test set), then one u32: the first step whose loss was not
// finite, flagged on the GPU so that no step waits for a readback.
const METRIC_SLOTS = { train: 0, val: 1, ema: 2 };
const METRICS_FLOATS = 8, NONFINITE_FLAG = 6, NO_BAD_STEP = 0xffffffff;
/** Loss sum and correct count of one slot of the metrics read back. */
const metricSlot = (m: Float32Array, slot: keyof typeof METRIC_SLOTS) => ({
  loss: m[2 * METRIC_SLOTS[slot]],
  correct: m[2 * METRIC_SLOTS[slot] + 1],
});

/** The run's GPU state (parameters, gradients, momentum, EMA, activations) and its recorded programs. */
function buildRun(
  gpu: Gpu,
  data: GpuData,
  whiten: Float32Array,
  B: number,
  baseDepth: number,
  rng: Rng,
  h: Hyp,
  kernels: NetKernels,
  precision: DType,
) {
  const N = data.train.count;
  const layout = layoutState(stateSpec(baseDepth, h)), stateBytes = layout.nTotal * 4;
  const state = createBuffer(gpu, stateBytes), grads = createBuffer(gpu, stateBytes);
  const momentum = createBuffer(gpu, stateBytes), ema = createBuffer(gpu, stateBytes);
  gpu.device.queue.writeBuffer(state, 0, initState(layout, rng, whiten, h));
  const P = stateViews(state, layout), G = stateViews(grads, layout), PE = stateViews(ema, layout);
  const A = makeActivations(gpu, B, baseDepth, precision, kernels, h);
  const perm = createBuffer(gpu, N * 4), augParams = createBuffer(gpu, N * 8);
  const metrics = createBuffer(gpu, METRICS_FLOATS * 4);

  const trainForward = [
    ...augmentTrain(gpu, data.train, data.norm, perm, augParams, A.x, A.targets, h.net),
    ...forward(gpu, A, P, true, h),
    crossEntropy(
      gpu,
      A.logits,
      A.targets,
      A.loss,
      A.correct,
      A.dlogits,
      h.opt.lossScaleBatch === null ? 1 : h.opt.lossScaleBatch / B,
      h.opt.labelSmoothing,
    ),
    flagNonFinite(gpu, A.loss, metrics, NONFINITE_FLAG),
  ];
  const firstBatchMetrics = accumulateMetrics(gpu, A.loss, A.correct, metrics, METRIC_SLOTS.train);
  const wd = {
    weights: h.opt.weightDecayPerSample * B,
    biases: h.opt.weightDecayPerSample * B * h.opt.biasDecayScaler,
  };
  // Muon (airbench94) trains the conv filters, one after another on one shared scratch; SGD the rest, from the head
  const convs = [...layout.entries.keys()].filter((name) => /conv[12]\.weight$/.test(name)), muon = h.opt.muon;
  const scratch = muon && muonScratch(gpu, convs.map((name) => P[name].shape));
  const MB = stateViews(momentum, layout), sgdFrom = muon ? layout.entries.get("linear.weight")!.offset : 0;
  const optimise = [
    ...(muon ? convs.flatMap((name) => muonStep(gpu, P[name], G[name], MB[name], scratch!, muon.momentum)) : []),
    ...sgdNesterov(gpu, layout, state, grads, momentum, wd, h.opt.momentum, sgdFrom),
  ];
  const update = [...backward(gpu, A, P, G, h), ...optimise];
  const updateFrozenWhitenBias = layout.whitenBiasEnd > layout.nWeights
    ? [...backward(gpu, A, P, G, h, false), ...optimise]
    : update;
  const emaStep = emaUpdate(gpu, layout, state, ema);
  const copyToEma = (enc: GPUCommandEncoder) => enc.copyBufferToBuffer(state, 0, ema, 0, stateBytes);

  // evaluation at the recipe's TTA level every epoch, and at its final level for the last
  const evalAt = (level: number) => {
    const { part, nTest, evalOf, gather } = evalPrograms(gpu, data, A, metrics, h, level);
    return { part, nTest, net: [...gather, ...evalOf(P, METRIC_SLOTS.val)], ema: evalOf(PE, METRIC_SLOTS.ema) };
  };
  const evalEvery = evalAt(h.misc.ttaLevel);
  const evalFinal = h.misc.finalTtaLevel === h.misc.ttaLevel ? evalEvery : evalAt(h.misc.finalTtaLevel);
  const programs = [
    ...trainForward,
    firstBatchMetrics,
    ...new Set([...update, ...updateFrozenWhitenBias]),
    ...emaStep,
    ...new Set([evalEvery, evalFinal].flatMap((e) => [...e.net, ...e.ema])),
  ];
  return {
    B,
    nTest: data.test.count,
    layout,
    state,
    momentum,
    ema,
    perm,
    augParams,
    metrics,
    trainForward,
    firstBatchMetrics,
    update,
    updateFrozenWhitenBias,
    emaStep,
    copyToEma,
    eval: evalEvery,
    finalEval: evalFinal,
    programs,
  };
}
type Run = ReturnType<typeof buildRun>;

/** Uploads the epoch's augmentation draws and zeroes its metrics (and marks no bad step yet). */
function startEpoch(gpu: Gpu, run: Run, aug: ReturnType<typeof epochAugmentation>) {
  gpu.device.queue.writeBuffer(run.perm, 0, aug.perm as Uint32Array<ArrayBuffer>);
  gpu.device.queue.writeBuffer(run.augParams, 0, aug.params as Uint32Array<ArrayBuffer>);
  const reset = new Uint32Array(METRICS_FLOATS); // 0.0f is all zero bits
  reset[NONFINITE_FLAG] = NO_BAD_STEP;
  gpu.device.queue.writeBuffer(run.metrics, 0, reset);
}

/** A run's state at the end of an epoch, read back: what a checkpoint keeps (see TrainState). */
async function trainState(
  gpu: Gpu,
  run: Run,
  rng: Rng,
  at: Pick<TrainState, "epoch" | "step" | "emaExists" | "trainSeconds" | "epochs">,
): Promise<TrainState> {
  const read = (buffer: GPUBuffer) => readBuffer(gpu, buffer, 0, run.layout.nTotal * 4);
  return {
    ...at,
    epochs: [...at.epochs],
    rng: rng.save(),
    state: await read(run.state),
    momentum: await read(run.momentum),
    ema: await read(run.ema),
  };
}

/** Puts a checkpoint's state back (buffers, generator) after checking it is a point of this run's plan. */
function resumeRun(gpu: Gpu, run: Run, rng: Rng, plan: ReturnType<typeof trainingPlan>, s: TrainState) {
  let steps = 0;
  for (let e = 0; e < s.epoch; e++) steps += plan.stepsIn(e);
  if (s.step !== steps || s.epoch > plan.numEpochs) {
    throw new Error(`the checkpoint is at step ${s.step} of epoch ${s.epoch}, not a point of this run`);
  }
  rng.restore(s.rng);
  for (const [buffer, values] of [[run.state, s.state], [run.momentum, s.momentum], [run.ema, s.ema]] as const) {
    gpu.device.queue.writeBuffer(buffer, 0, values as Float32Array<ArrayBuffer>);
  }
  return { epoch: s.epoch, step: s.step, emaExists: s.emaExists, trainSeconds: s.trainSeconds };
}

/** The result of a run that `stop` ended after `interrupted.steps` steps: the epochs it finished. */
async function stoppedRun(
  gpu: Gpu,
  seed: number,
  epochs: EpochMetrics[],
  trainSeconds: number,
  interrupted: { epoch: number; steps: number },
): Promise<RunResult> {
  await gpu.device.queue.onSubmittedWorkDone();
  const last = epochs[epochs.length - 1];
  return { seed, emaValAcc: last?.emaValAcc ?? null, valAcc: last?.valAcc ?? NaN, trainSeconds, epochs, interrupted };
}

/** The network in `buffer` (the state or the EMA), tensor by tensor, for --save. */
async function readWeights(gpu: Gpu, run: Run, buffer: GPUBuffer): Promise<Weights> {
  const values = await readBuffer(gpu, buffer, 0, run.layout.nTotal * 4);
  return new Map([...run.layout.entries].map(([name, e]) => [
    name,
    { shape: e.shape, data: values.slice(e.offset, e.offset + numel(e.shape)) },
  ]));
}

// =================================================================================================
// 4. Evaluation: flip test-time augmentation over the test set
// =================================================================================================

/** The training loss became NaN or infinite in `epoch`; `step` is the first such step when the GPU flagged one. */
export class TrainingDiverged extends Error {
  constructor(message: string, readonly epoch: number, readonly step?: number) {
    super(message);
  }
}

/** The epoch's row: the network (and the EMA once it exists) evaluated on the test set, and the first batch's
 * training loss and accuracy, all read back at once. A non-finite loss anywhere ends the run with one line. */
async function evaluateEpoch(
  gpu: Gpu,
  run: Run,
  ev: Run["eval"], // the programs of this epoch's TTA level
  epoch: number,
  emaExists: boolean,
  trainSeconds: number,
  precision: DType,
  stop?: () => boolean,
): Promise<EpochMetrics | null> {
  const nTest = run.nTest, list = emaExists ? [...ev.net, ...ev.ema] : ev.net;
  if (!(await evaluateTestSet(gpu, nTest, ev.part, list, stop))) return null; // stopped: no row
  const m = await readBuffer(gpu, run.metrics, 0, METRICS_FLOATS * 4);
  const badStep = new Uint32Array(m.buffer)[NONFINITE_FLAG];
  // f16 overflows (at 65504) where f32 does not: that is the first thing to rule out
  const fix = "lower the learning rates in hyp.opt, or undo the last change" +
    (precision === "f16" ? "; with --precision f16, try --precision f32 first (f16 overflows where f32 does not)" : "");
  if (badStep !== NO_BAD_STEP) {
    throw new TrainingDiverged(
      `the training loss became NaN or infinite at step ${badStep} (epoch ${epoch}): ${fix}`,
      epoch,
      badStep,
    );
  }
  const first = metricSlot(m, "train"), val = metricSlot(m, "val"), ema = metricSlot(m, "ema");
  const row: EpochMetrics = {
    epoch,
    trainLoss: first.loss / run.B,
    trainAcc: first.correct / run.B,
    valLoss: val.loss / nTest,
    valAcc: val.correct / nTest,
    emaValAcc: emaExists ? ema.correct / nTest : null,
    emaValLoss: emaExists ? ema.loss / nTest : null,
    totalTimeSeconds: trainSeconds,
  };
  if (!Number.isFinite(row.trainLoss) || !Number.isFinite(row.valLoss)) {
    const losses = `train loss ${row.trainLoss}, val loss ${row.valLoss}`;
    throw new TrainingDiverged(`training diverged in epoch ${epoch} (${losses}): ${fix}`, epoch);
  }
  return row;
}

/**
 * Evaluation programs over the training buffers, with test-time augmentation of `level` (TTA_VIEWS): a batch holds
 * `part` test images in each of the level's views; `evalOf(params, slot)` adds that network's loss and correct count,
 * on the views' weighted logits (ttaCombine), to metrics[slot].
 */
function evalPrograms(
  gpu: Gpu,
  data: Pick<GpuData, "test" | "norm">,
  A: Activations,
  metrics: GPUBuffer,
  h: Hyp,
  level: number,
) {
  const views = TTA_VIEWS[level], part = Math.floor(A.x.shape[0] / views), EV = activationsWithRows(A, views * part);
  const r = (t: Tensor) => withRows(t, part), tta = r(A.logitsTta);
  const evalOf = (params: Record<string, Tensor>, slot: number) => [
    ...forward(gpu, EV, params, false, h),
    ttaCombine(gpu, EV.logits, tta, views),
    crossEntropy(gpu, tta, r(A.targets), r(A.loss), r(A.correct), r(A.dlogits), 0, h.opt.labelSmoothing),
    accumulateMetrics(gpu, r(A.loss), r(A.correct), metrics, slot),
  ];
  const gather = gatherEval(gpu, data.test, data.norm, EV.x, EV.targets, views);
  return { part, nTest: data.test.count, evalOf, gather, tta };
}
/**
 * The views of each TTA level (airbench94's infer): 0 the image; 1 it and its mirror; 2 those and the two 1-pixel
 * translations (up-left, down-right, reflect-padded) with their mirrors, weighted 1/2 (plain pair) and 1/4 each.
 */
export const TTA_VIEWS = [1, 2, 6];

/**
 * Runs `list` over the test set, `part` images (in each TTA view) per submit; false if `stop` asked to stop. With a `stop`,
 * the GPU is waited for every EVAL_SYNC_IMAGES images and the event loop let run after every batch, so that a Ctrl-C
 * is heard within a few batches, not after the whole test set.
 */
async function evaluateTestSet(
  gpu: Gpu,
  nTest: number,
  part: number,
  list: Dispatch[],
  stop?: () => boolean,
  after?: (enc: GPUCommandEncoder, start: number, valid: number) => void, // a copy after each batch
) {
  const syncEvery = Math.max(1, Math.floor(EVAL_SYNC_IMAGES / part));
  for (let start = 0, batch = 1; start < nTest; start += part, batch++) {
    const valid = Math.min(part, nTest - start);
    setFrame(gpu, { offset: start, valid });
    submit(gpu, list, after && ((enc) => after(enc, start, valid)));
    await gpu.profiler?.collect();
    if (!stop) continue;
    if (batch % syncEvery === 0) await gpu.device.queue.onSubmittedWorkDone();
    await nextTask();
    if (stop()) return false;
  }
  return true;
}
const EVAL_SYNC_IMAGES = 1024;

/**
 * Test accuracy and loss (with the recipe's final TTA) of saved weights; the network's widths come from the weights.
 * With `answers`, also each test image's logits (those its accuracy is counted on, TTA views combined: copied on the
 * GPU batch after batch and read back once): what the page shows of a network.
 */
export async function evaluateWeights(
  gpu: Gpu,
  data: Pick<GpuData, "test" | "norm">,
  weights: Weights,
  batchSize: number,
  file: string,
  precision: DType = "f32",
  h: Hyp = hyp, // the recipe that trained them: its network, and its final TTA level
  answers = false,
): Promise<{ valLoss: number; valAcc: number; logits?: Float32Array }> {
  const first = weights.get("conv_group_1.conv1.weight"), depth = first?.shape[3] ?? 0;
  if (!first || first.shape.length !== 4) {
    throw new Error(`${file} has no conv_group_1.conv1.weight: not a network of ours`);
  }
  const depths = FLAG_RANGES["base-depth"];
  if (!(depth >= depths.min && depth <= depths.max)) {
    throw new Error(`${file} claims base depth ${depth}: not a network of ours`);
  }
  const layout = layoutState(stateSpec(depth, h));
  for (const [name, e] of layout.entries) { // every shape is checked before anything is allocated
    const t = weights.get(name);
    if (!t || t.shape.join() !== e.shape.join()) {
      throw new Error(
        `${file} does not match the network: ${name} is [${t?.shape ?? "missing"}], expected [${e.shape}]`,
      );
    }
  }
  const values = new Float32Array(layout.nTotal);
  for (const [name, e] of layout.entries) values.set(weights.get(name)!.data, e.offset);
  const mark = gpu.allocated.length;
  try {
    const state = createBuffer(gpu, layout.nTotal * 4), metrics = createBuffer(gpu, METRICS_FLOATS * 4);
    gpu.device.queue.writeBuffer(state, 0, values);
    const A = makeActivations(gpu, batchSize, depth, precision, netKernels(gpu, h), h);
    const { part, evalOf, gather, tta } = evalPrograms(gpu, data, A, metrics, h, h.misc.finalTtaLevel);
    const row = h.misc.numClasses * 4, logits = answers ? createBuffer(gpu, data.test.count * row) : undefined;
    await evaluateTestSet(
      gpu,
      data.test.count,
      part,
      [...gather, ...evalOf(stateViews(state, layout), METRIC_SLOTS.val)],
      undefined,
      logits &&
        ((enc, start, valid) => enc.copyBufferToBuffer(tta.buffer, tta.offset, logits, start * row, valid * row)),
    );
    const val = metricSlot(await readBuffer(gpu, metrics, 0, METRICS_FLOATS * 4), "val");
    const valLoss = val.loss / data.test.count;
    // finite weights can still overflow (a 3e38 in a weight): a NaN or infinite loss is no result to print
    if (!Number.isFinite(valLoss)) {
      throw new Error(
        `${file} gives a non-finite test loss (${valLoss}): ` +
          (precision === "f16"
            ? "try --precision f32; if the loss stays non-finite, save the network again with --save"
            : "its weights are corrupt; save the network again with --save"),
      );
    }
    const answered = logits && (await readBuffer(gpu, logits, 0, data.test.count * row));
    return { valLoss, valAcc: val.correct / data.test.count, logits: answered };
  } finally {
    freeSince(gpu, mark);
  }
}

// #################################################################################################
// Below: the machinery a fork rarely touches (GPU plumbing, one function per kernel, the dataset,
// printing, run logs, saved weights, the command line).
// #################################################################################################

// =================================================================================================
// 5. GPU plumbing: device, tensors, kernels, dispatch lists, readback
// =================================================================================================

/** An error's message, for the one-line errors every failure ends in. */
const errorText = (e: unknown) => (e instanceof Error ? e.message : String(e));

/**
 * Resolves after the event loop has run once more (signal listeners, a worker's messages), without waiting for the
 * GPU: one message through a MessageChannel, 13 us measured here, where setTimeout(0) took 2.1 ms.
 */
export function nextTask(): Promise<void> {
  const { port1, port2 } = new MessageChannel();
  return new Promise((resolve) => {
    port1.onmessage = () => {
      port1.close();
      resolve();
    };
    port2.postMessage(null);
  });
}

/** Element type of a tensor in GPU memory. Parameters and optimiser state are always f32. */
export type DType = "f32" | "f16";
/** What a tensor holds: values in a DType, or u32 words (the max pools' argmax bytes). */
export type Storage = DType | "u32";
export type Tensor = { buffer: GPUBuffer; offset: number; shape: number[]; dtype: Storage }; // offset in bytes

export interface Gpu {
  device: GPUDevice;
  adapterName: string;
  hasF16: boolean;
  limits: GpuLimits; // what this run may use: the device's, or less (--spec-limits, tests)
  kernelDir: string; // the folder the kernels were read from (KERNEL_DIR), for the run log
  sources: Map<string, string>; // kernel file -> WGSL text as compiled: the file, then common.wgsl
  structs: Map<string, StructField[]>; // common.wgsl's uniform structs, packed by field name (packStruct)
  pipelines: Map<string, GPUComputePipeline>;
  frame: GPUBuffer; // per-submit values (batch offset, valid rows, lr, EMA decay), see setFrame
  allocated: GPUBuffer[]; // every buffer we created, so a run can free its own
  memory: { bytes: number; peak: number }; // the bytes of those buffers now, and the most they ever held
  error?: string; // first uncaptured WebGPU error or device loss, raised at the next check
  released?: boolean; // set by releaseGpu: a loss after it is ours, not an error
  profiler?: Profiler; // set by initGpu({ profile: true }) when the adapter has timestamp queries
  convKernels: ConvKernels; // which conv kernel set this device runs (see CONV_KERNELS)
  cpu: boolean; // a software device running on the CPU (lavapipe, SwiftShader, WARP, or the fallback adapter)
  convChoice?: string; // how it was chosen, when a timed trial chose it (an adapter that names nothing)
}

/** The limits a run plans its buffers for (bytes): a larger batch tensor is bound in slices (batchSlices). */
export interface GpuLimits {
  maxBinding: number; // maxStorageBufferBindingSize: the most one storage binding may cover
  maxBuffer: number; // maxBufferSize: the largest buffer
  align: number; // minStorageBufferOffsetAlignment: where a binding may start
}
/** WebGPU's default limits, what every adapter grants (128 MiB per binding, 256 MiB per buffer): --spec-limits. */
export const SPEC_LIMITS: GpuLimits = { maxBinding: 2 ** 27, maxBuffer: 2 ** 28, align: 256 };

/**
 * The conv kernel sets, each computing the same three passes: "tiled" (kernels/conv_tiled.wgsl,
 * implicit GEMM with 64 x 64 tiles staged in workgroup memory, 4 x 4 outputs per thread) is the
 * classic GPU schedule and the default on GPUs; "block" (kernels/conv.wgsl, 4 x 4 outputs per thread
 * read straight from storage) is the port's first version; "wide" (conv.wgsl, 16 x 8 per thread, or
 * 32 x 16 for passes with 16 columns or more) is for CPU devices such as lavapipe, where a barrier costs
 * microseconds and each storage load is a per-lane gather that costs far more than the FMAs it feeds
 * (measured in bench/RESULTS.md).
 * `--conv-kernels` (or gpu.convKernels) overrides the choice initGpu makes from the adapter's name.
 */
export type ConvKernels = "tiled" | "block" | "wide";
/** WebGPU's adapter kinds: "core", or "compatibility" (OpenGL ES-class, e.g. a browser through ANGLE). */
export type FeatureLevel = "core" | "compatibility";
export const CONV_KERNEL_SETS: ConvKernels[] = ["tiled", "block", "wide"];
// per set: WGSL file, entry-point suffix, and the names of its constants (threads per workgroup
// along the rows, rows and columns of outputs per thread, or per workgroup for "tiled"); "wide2" is
// the wide set's bigger block, for passes with at least WIDE2_COLS columns (convPick)
const CONV_KERNELS = {
  tiled: { file: "conv_tiled", suffix: "", wg: "", rows: "TILE_M", cols: "TILE_N" },
  block: { file: "conv", suffix: "", wg: "WG", rows: "BLOCK", cols: "BLOCK" },
  wide: { file: "conv", suffix: "_wide", wg: "WG", rows: "WIDE_ROWS", cols: "WIDE_COLS" },
  wide2: { file: "conv", suffix: "_wide2", wg: "WG", rows: "WIDE2_ROWS", cols: "WIDE2_COLS" },
} as const;
const CPU_DEVICE = /llvmpipe|lavapipe|swiftshader|\bwarp\b/i; // software rasterisers running on the CPU

const KERNEL_FILES = [
  "conv",
  "conv_tiled",
  "reduce",
  "pool",
  "norm",
  "linear",
  "loss",
  "optim",
  "muon",
  "matmul",
  "data",
];
const KERNEL_PRELUDE = "common"; // appended to every kernel file (kernels/common.wgsl)
const MAX_GROUPS = 65535; // per grid dimension (WebGPU's default limit)
const WORKGROUP_THREADS = 256; // the largest @workgroup_size of any kernel (x only)

/** Kernel files already read (a page has no file system): their folder, for the run log, and each text by name. */
export type KernelTexts = { dir: string; files: Record<string, string> };

/** A browser without WebGPU, said to the page's visitor (the page says it on opening, initGpu in its worker). */
export const BROWSER_NO_WEBGPU = "this browser has no WebGPU: open the page in a recent Chrome or Edge, " +
  "or turn WebGPU on where it is still a setting (Firefox Nightly, Safari Technology Preview)";
/** A browser with WebGPU that offers no adapter (a blocklisted GPU or driver, hardware acceleration off). */
export const BROWSER_NO_ADAPTER = "this browser offers no WebGPU adapter (its GPU or driver may be blocked: see " +
  "chrome://gpu in Chrome): update the GPU driver, turn on hardware acceleration, or try a recent Chrome or Edge";

/**
 * The device, its limits and the kernel sources. `convKernels` overrides the conv kernel set chosen from the
 * adapter; `kernelDir` the kernel folder (default KERNEL_DIR, next to this file), or `kernels` their texts.
 * `limits`: "spec" asks for WebGPU's default limits only (SPEC_LIMITS), as a browser or small GPU grants; numbers
 * lower what the run plans for below the device's (tests force a few MiB per binding to exercise the slicing).
 */
export async function initGpu(
  opts: {
    profile?: boolean;
    convKernels?: ConvKernels;
    kernelDir?: string | URL;
    kernels?: KernelTexts;
    featureLevel?: FeatureLevel;
    limits?: "spec" | Partial<GpuLimits>;
  } = {},
): Promise<Gpu> {
  // a terminal's user fixes a missing adapter with a driver, a page's visitor with another browser or its settings
  const browser = !globalThis.Deno;
  const noAdapter = browser ? BROWSER_NO_ADAPTER : "no WebGPU adapter found: install or update your GPU driver " +
    "(Vulkan, Metal or D3D12); on Linux without a GPU, `apt-get install mesa-vulkan-drivers` gives a (slow) CPU device";
  if (!("gpu" in navigator)) throw new Error(browser ? BROWSER_NO_WEBGPU : noAdapter);
  // a core adapter, else (or if asked) a compatibility one: a browser on OpenGL ES, such as Chromium through ANGLE
  const compatibility = { featureLevel: "compatibility" } as GPURequestAdapterOptions;
  const adapter = opts.featureLevel === "compatibility"
    ? await navigator.gpu.requestAdapter(compatibility)
    : await navigator.gpu.requestAdapter({ powerPreference: "high-performance" }) ??
      await navigator.gpu.requestAdapter(compatibility);
  if (!adapter) throw new Error(noAdapter);
  const hasF16 = adapter.features.has("shader-f16");
  const profile = opts.profile && adapter.features.has("timestamp-query");
  const a = adapter.limits;
  // the kernels' largest workgroup is 256 threads along x (the WebGPU default, but compatibility-mode adapters,
  // such as browsers on OpenGL ES, default to 128); bindings and buffers: as large as the adapter allows
  if (a.maxComputeInvocationsPerWorkgroup < WORKGROUP_THREADS || a.maxComputeWorkgroupSizeX < WORKGROUP_THREADS) {
    throw new Error(
      `this GPU runs at most ${a.maxComputeInvocationsPerWorkgroup} threads per workgroup (x: ` +
        `${a.maxComputeWorkgroupSizeX}); the kernels need ${WORKGROUP_THREADS}: use another GPU or browser`,
    );
  }
  const spec = opts.limits === "spec", forced = typeof opts.limits === "object" ? opts.limits : {};
  const device = await adapter.requestDevice({
    requiredFeatures: [...(hasF16 ? ["shader-f16" as const] : []), ...(profile ? ["timestamp-query" as const] : [])],
    requiredLimits: {
      maxStorageBufferBindingSize: spec ? SPEC_LIMITS.maxBinding : a.maxStorageBufferBindingSize,
      maxBufferSize: spec ? SPEC_LIMITS.maxBuffer : a.maxBufferSize,
      maxStorageBuffersPerShaderStage: Math.min(a.maxStorageBuffersPerShaderStage, 10),
      maxComputeInvocationsPerWorkgroup: WORKGROUP_THREADS,
      maxComputeWorkgroupSizeX: WORKGROUP_THREADS,
    },
  });
  // a page's module is a blob: URL, against which no path resolves: it hands the texts over
  const texts = opts.kernels ?? await readKernelTexts(new URL(opts.kernelDir ?? KERNEL_DIR, import.meta.url));
  const read = (file: string) => {
    if (file in texts.files) return texts.files[file];
    throw new Error(`the page lacks ${file}.wgsl: write it again with --web`);
  };
  const prelude = read(KERNEL_PRELUDE), sources = new Map<string, string>();
  for (const file of KERNEL_FILES) sources.set(file, `${read(file)}\n${prelude}`);
  const structs = new Map(["Frame", "ConvShape"].map((name) => [name, wgslStruct(prelude, name)]));
  const info = adapter.info;
  const adapterName = info.description || `${info.vendor} ${info.architecture} ${info.device}`.trim() ||
    "an unnamed WebGPU adapter";
  const gpu: Gpu = {
    device,
    adapterName,
    hasF16,
    limits: {
      maxBinding: Math.min(device.limits.maxStorageBufferBindingSize, forced.maxBinding ?? Infinity),
      maxBuffer: Math.min(device.limits.maxBufferSize, forced.maxBuffer ?? Infinity),
      align: Math.max(device.limits.minStorageBufferOffsetAlignment, forced.align ?? 0),
    },
    kernelDir: texts.dir,
    sources,
    structs,
    pipelines: new Map(),
    frame: device.createBuffer({
      size: structBytes(structs.get("Frame")!),
      usage: GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST,
    }),
    allocated: [],
    memory: { bytes: 0, peak: 0 },
    profiler: profile ? new Profiler(device) : undefined,
    convKernels: opts.convKernels ?? defaultConvKernels(info),
    cpu: defaultConvKernels(info) === "wide",
  };
  device.addEventListener("uncapturederror", (e) => {
    gpu.error ??= `WebGPU error: ${(e as GPUUncapturedErrorEvent).error.message}`;
  });
  // Any loss we did not ask for is an error (a driver reset, a GPU timeout, or another program's destroy()).
  device.lost.then((info) => {
    if (!gpu.released) {
      gpu.error ??= `the GPU device was lost (${info.message || info.reason}): restart the run; ` +
        "if it happens again, update the GPU driver or lower --batch-size";
    }
  });
  // An adapter that names nothing and is no fallback (a browser through ANGLE, say) may still be a CPU: ask the clock.
  const anonymous = !info.isFallbackAdapter && !`${info.description}${info.vendor}${info.architecture}`.trim();
  if (!opts.convKernels && anonymous) [gpu.convKernels, gpu.convChoice] = await timeConvKernels(gpu);
  return gpu;
}

/** Every kernel file of a folder (a file: or http: URL), or an error that says which and why. */
export async function readKernelTexts(dir: URL): Promise<KernelTexts> {
  const files: Record<string, string> = {};
  for (const file of [KERNEL_PRELUDE, ...KERNEL_FILES]) {
    let why: string;
    try {
      const res = await fetch(new URL(`${file}.wgsl`, dir));
      if (res.ok) {
        files[file] = await res.text();
        continue;
      }
      why = `HTTP ${res.status}`;
    } catch (e) {
      why = errorText(e).split(": ").pop()!; // a local file that is not there: "No such file or directory (os error 2)"
    }
    throw new Error(`cannot read ${file}.wgsl in ${dir} (${why}): is the kernels/ folder there?`);
  }
  return { dir: dir.protocol === "file:" ? fileURLToPath(dir) : dir.href, files };
}

/** Times one mid-size conv forward (after a warm-up that compiles it) with the "wide" and the "tiled" set. */
async function timeConvKernels(gpu: Gpu): Promise<[ConvKernels, string]> {
  const mark = gpu.allocated.length, ms: Record<string, number> = {};
  try {
    // 0.6 GFLOP, 51 ms (wide) and 102 ms (tiled) through ANGLE on lavapipe: long enough that the kernels' own
    // time decides, not the submit
    const x = tensor(gpu, [32, 16, 16, 64]), w = tensor(gpu, [3, 3, 64, 64]), y = tensor(gpu, [32, 16, 16, 64]);
    for (const set of ["wide", "tiled"] as const) {
      const d = conv2d(gpu, x, w, y, 1, set);
      submit(gpu, d);
      await gpu.device.queue.onSubmittedWorkDone();
      const t0 = performance.now();
      for (let i = 0; i < 3; i++) submit(gpu, d);
      await gpu.device.queue.onSubmittedWorkDone();
      ms[set] = (performance.now() - t0) / 3;
    }
  } finally {
    freeSince(gpu, mark);
  }
  const why = `timed, the adapter names nothing: wide ${ms.wide.toFixed(1)} ms, tiled ${ms.tiled.toFixed(1)} ms a conv`;
  return [ms.wide < ms.tiled ? "wide" : "tiled", why];
}

/**
 * The conv kernel set for an adapter: "wide" on a CPU device (the fallback adapter, or a software renderer by name;
 * a browser may report no name at all, but flags its software adapter as the fallback), "tiled" on a GPU.
 */
export function defaultConvKernels(info: Partial<GPUAdapterInfo>): ConvKernels {
  const names = `${info.description ?? ""} ${info.vendor ?? ""} ${info.architecture ?? ""} ${info.device ?? ""}`;
  return info.isFallbackAdapter || CPU_DEVICE.test(names) ? "wide" : "tiled";
}

/** Ends our use of the device: its loss after this is expected, not reported. */
export function releaseGpu(gpu: Gpu) {
  gpu.released = true;
  gpu.device.destroy();
}

// Raises the first WebGPU error seen so far; called wherever we wait for the GPU anyway.
export function checkGpu(gpu: Gpu) {
  if (gpu.error) throw new Error(gpu.error);
}

const mib = (bytes: number) => `${(bytes / 2 ** 20).toFixed(bytes < 2 ** 20 ? 2 : 0)} MiB`;

/** A storage buffer. One larger than a binding is bound in slices (batchSlices), or not at all (kernel refuses it). */
export function createBuffer(gpu: Gpu, bytes: number, usage = 0): GPUBuffer {
  if (bytes > gpu.limits.maxBuffer) {
    throw new Error(
      `a ${mib(bytes)} buffer exceeds this GPU's limit of ${
        mib(gpu.limits.maxBuffer)
      }: lower --batch-size or --base-depth`,
    );
  }
  const buffer = gpu.device.createBuffer({
    size: Math.max(16, Math.ceil(bytes / 16) * 16),
    usage: usage | GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST,
  });
  track(gpu, buffer);
  return buffer;
}

export const numel = (shape: number[]) => shape.reduce((a, b) => a * b, 1);

const BYTES: Record<Storage, number> = { f32: 4, f16: 2, u32: 4 };
/** Bytes a tensor binds: WebGPU binds and copies whole 4-byte words, so an odd f16 count gets one more half. */
const tensorBytes = (shape: number[], dtype: Storage) => Math.ceil((numel(shape) * BYTES[dtype]) / 4) * 4;

export function tensor(gpu: Gpu, shape: number[], dtype: Storage = "f32"): Tensor {
  return { buffer: createBuffer(gpu, tensorBytes(shape, dtype)), offset: 0, shape, dtype };
}

/** A new tensor holding `data` (rounded to f16 if dtype is f16). */
export function upload(gpu: Gpu, data: Float32Array, shape: number[], dtype: DType = "f32"): Tensor {
  if (data.length !== numel(shape)) throw new Error(`upload: ${data.length} values for shape [${shape}]`);
  const t = tensor(gpu, shape, dtype);
  const bytes = new Uint8Array(tensorBytes(shape, dtype));
  if (dtype === "f16") new Float16Array(bytes.buffer, 0, data.length).set(data);
  else new Float32Array(bytes.buffer).set(data);
  gpu.device.queue.writeBuffer(t.buffer, 0, bytes);
  return t;
}

/** A view of `shape` at element offset `offset` of `buffer` (offsets must be multiples of 256 bytes). */
export const view = (buffer: GPUBuffer, offset: number, shape: number[], dtype: Storage = "f32"): Tensor => ({
  buffer,
  offset: offset * BYTES[dtype],
  shape,
  dtype,
});

/** The same tensor with another leading (batch) dimension. */
export const withRows = (t: Tensor, rows: number): Tensor => ({ ...t, shape: [rows, ...t.shape.slice(1)] });

// ---- batch slices: a pass whose tensors are larger than one binding runs in slices of the batch

/** Rows [start, start + rows) of a pass over the batch. */
export type Slice = { start: number; rows: number };
const rowBytes = (t: Tensor) => numel(t.shape.slice(1)) * BYTES[t.dtype];
/** Rows `s` of a batch tensor [B, ...], bound at their own offset. */
export const rowsOf = (t: Tensor, s: Slice): Tensor => ({
  ...t,
  offset: t.offset + s.start * rowBytes(t),
  shape: [s.rows, ...t.shape.slice(1)],
});
const gcd = (a: number, b: number): number => (b ? gcd(b, a % b) : a);
/** The fewest rows a slice of these tensors may start at a multiple of: then every binding starts aligned. */
const sliceGranule = (gpu: Gpu, tensors: Tensor[]) =>
  Math.max(1, ...tensors.map((t) => gpu.limits.align / gcd(rowBytes(t), gpu.limits.align)));
// Slices hold a multiple of 256 images where they can: each slice's batch-norm chunks (NORM_ROWS_PER_CHUNK pixel
// rows) are then the whole pass's, and its statistics come out bit for bit the same.
const SLICE_IMAGES = 256;

/**
 * The slices of a pass over the rows of `tensors` (all [B, ...]): the whole batch when each fits one binding (and B
 * <= maxRows), else as many rows as fit, slice after slice. Per-image work is the same, bit for bit, either way.
 */
export function batchSlices(gpu: Gpu, tensors: Tensor[], maxRows = Infinity): Slice[] {
  const B = tensors[0].shape[0], widest = Math.max(...tensors.map(rowBytes));
  if (B <= maxRows && tensors.every((t) => tensorBytes(t.shape, t.dtype) <= gpu.limits.maxBinding)) {
    return [{ start: 0, rows: B }];
  }
  const granule = sliceGranule(gpu, tensors), fit = Math.min(maxRows, Math.floor(gpu.limits.maxBinding / widest));
  const unit = fit >= Math.max(SLICE_IMAGES, granule) ? Math.max(SLICE_IMAGES, granule) : granule;
  const rows = fit - (fit % unit);
  if (rows < 1) {
    throw new Error(`${granule} rows of [${tensors[0].shape}] do not fit one ${mib(gpu.limits.maxBinding)} binding`);
  }
  const slices: Slice[] = [];
  for (let start = 0; start < B; start += rows) slices.push({ start, rows: Math.min(rows, B - start) });
  return slices;
}

export async function readBuffer(gpu: Gpu, buffer: GPUBuffer, offsetBytes: number, bytes: number) {
  const staging = gpu.device.createBuffer({ size: bytes, usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST });
  gpu.memory.peak = Math.max(gpu.memory.peak, gpu.memory.bytes + bytes); // a copy held while it is read
  const enc = gpu.device.createCommandEncoder();
  enc.copyBufferToBuffer(buffer, offsetBytes, staging, 0, bytes);
  gpu.device.queue.submit([enc.finish()]);
  try {
    await staging.mapAsync(GPUMapMode.READ);
  } catch (e) {
    checkGpu(gpu);
    throw e;
  }
  const out = new Float32Array(staging.getMappedRange().slice(0));
  staging.destroy();
  checkGpu(gpu);
  return out;
}

/** A tensor's values as f32 (f16 tensors are widened exactly). */
export async function readTensor(gpu: Gpu, t: Tensor): Promise<Float32Array> {
  if (t.dtype === "u32") throw new Error("readTensor: a u32 tensor holds words, not values: use readBuffer");
  const bytes = tensorBytes(t.shape, t.dtype);
  const raw = await readBuffer(gpu, t.buffer, t.offset, bytes);
  return t.dtype === "f16" ? Float32Array.from(new Float16Array(raw.buffer, 0, numel(t.shape))) : raw;
}

// A uniform struct: plain numbers are u32, f32(x) and i32(x) mark the other field types.
type Field = number | { f32: number } | { i32: number };
export const f32 = (v: number): Field => ({ f32: v });
export const i32 = (v: number): Field => ({ i32: v });

function uniform(gpu: Gpu, fields: Field[]): GPUBuffer {
  const data = new DataView(new ArrayBuffer(Math.ceil(fields.length / 4) * 16));
  fields.forEach((f, i) => {
    if (typeof f === "number") data.setUint32(i * 4, f, true);
    else if ("f32" in f) data.setFloat32(i * 4, f.f32, true);
    else data.setInt32(i * 4, f.i32, true);
  });
  return uniformBuffer(gpu, data.buffer);
}

/** A new uniform buffer holding `bytes` (freed with the run's other buffers). */
function uniformBuffer(gpu: Gpu, bytes: ArrayBuffer): GPUBuffer {
  const buffer = gpu.device.createBuffer({
    size: bytes.byteLength,
    usage: GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST,
  });
  gpu.device.queue.writeBuffer(buffer, 0, bytes);
  track(gpu, buffer);
  return buffer;
}

/** Counts a new buffer as ours: freed by freeSince, and in gpu.memory. */
function track(gpu: Gpu, buffer: GPUBuffer) {
  gpu.allocated.push(buffer);
  gpu.memory.bytes += buffer.size;
  gpu.memory.peak = Math.max(gpu.memory.peak, gpu.memory.bytes);
}

/** One field of a WGSL uniform struct: its name and its 4-byte scalar type. */
export type StructField = { name: string; type: "u32" | "i32" | "f32" };

/** The fields of `struct name { ... }` in WGSL `source`, in order (4-byte scalars only). */
export function wgslStruct(source: string, name: string): StructField[] {
  const body = source.replace(/\/\/.*$/gm, "").match(new RegExp(`struct ${name}\\s*\\{([^}]*)\\}`))?.[1];
  if (!body) throw new Error(`kernels/${KERNEL_PRELUDE}.wgsl has no struct ${name}`);
  return body.split(",").map((f) => f.trim()).filter(Boolean).map((f) => {
    const [field, type] = f.split(":").map((x) => x.trim());
    if (type !== "u32" && type !== "i32" && type !== "f32") {
      throw new Error(`struct ${name}.${field}: ${type} (packStruct writes u32, i32 and f32 fields only)`);
    }
    return { name: field, type };
  });
}

/** A uniform struct's size: 4 bytes a field, rounded up to 16. */
const structBytes = (fields: StructField[]) => Math.ceil(fields.length / 4) * 16;

/**
 * Packs `values` into common.wgsl's struct `name` by field name (camelCase here, snake_case there: lrWeights ->
 * lr_weights); fields not given are 0, a value with no field is an error.
 */
export function packStruct(gpu: Gpu, name: string, values: Record<string, number | undefined>): ArrayBuffer {
  const fields = gpu.structs.get(name)!, data = new DataView(new ArrayBuffer(structBytes(fields)));
  const byName = new Map(
    Object.entries(values).map(([k, v]) => [k.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`), v]),
  );
  for (const key of byName.keys()) {
    if (!fields.some((f) => f.name === key)) throw new Error(`struct ${name} (common.wgsl) has no field ${key}`);
  }
  fields.forEach((f, i) => {
    const v = byName.get(f.name) ?? 0;
    if (f.type === "f32") data.setFloat32(4 * i, v, true);
    else if (f.type === "i32") data.setInt32(4 * i, v, true);
    else data.setUint32(4 * i, v, true);
  });
  return data.buffer;
}

/** A new uniform buffer holding common.wgsl's struct `name` (see packStruct). */
function uniformStruct(gpu: Gpu, name: string, values: Record<string, number>): GPUBuffer {
  return uniformBuffer(gpu, packStruct(gpu, name, values));
}

/** Per-submit values, shared by every kernel that binds `frame` (struct Frame in kernels/common.wgsl). */
export interface Frame {
  offset?: number; // first index into the epoch's permutation (train) or the test set (eval)
  valid?: number; // rows of the batch that count in the loss and metrics
  lrWeights?: number;
  lrBiases?: number;
  emaDecay?: number;
  step?: number; // optimiser step number (0-based), for the non-finite-loss flag
  muonLr?: number; // learning rate of the conv filters Muon trains (muonStep)
  lrWhitenBias?: number; // ... of the whitening bias (airbench94; 0 once it is frozen)
}

export function setFrame(gpu: Gpu, f: Frame) {
  gpu.device.queue.writeBuffer(gpu.frame, 0, packStruct(gpu, "Frame", { ...f }));
}

/** One recorded kernel launch: built once (pipeline, bind group), replayed every step. */
export interface Dispatch {
  label: string; // kernel and shape, the row name of the --profile table
  flop?: number; // floating-point operations (2 x multiply-adds), for GFLOP/s in the profile
  pipeline: GPUComputePipeline;
  bindGroup: GPUBindGroup;
  grid: [number, number, number];
  slots: { binding: number; uniform: boolean }[]; // what the bind group holds, for compilePipelines' scratch copy
}

/**
 * The pipeline of `file`'s `entryPoint`, compiled with the storage-type aliases in `halves` (e.g. X_T)
 * set to f16: the kernel files declare every activation binding as `array<ALIAS>` with `alias ALIAS = f32;`.
 */
function pipeline(gpu: Gpu, file: string, entryPoint: string, halves: string[] = []) {
  const key = `${file}:${entryPoint}${halves.length ? `:f16=${halves.join(",")}` : ""}`;
  let p = gpu.pipelines.get(key);
  if (!p) {
    let code = gpu.sources.get(file)!;
    if (halves.length) {
      code = "enable f16;\n" + halves.reduce((c, a) => c.replace(`alias ${a} = f32;`, `alias ${a} = f16;`), code);
    }
    const module = gpu.device.createShaderModule({ label: file, code });
    p = gpu.device.createComputePipeline({ label: key, layout: "auto", compute: { module, entryPoint } });
    gpu.pipelines.set(key, p);
  }
  return p;
}

function kernel(
  gpu: Gpu,
  file: string,
  entryPoint: string,
  bindings: Record<number, GPUBuffer | Tensor>,
  grid: [number, number, number],
  info: { label?: string; flop?: number } = {},
): Dispatch {
  const halves = Object.entries(bindings).filter(([, b]) => "shape" in b && b.dtype === "f16").map(([binding]) => {
    const alias = storageAlias(gpu, file, Number(binding));
    if (!alias) throw new Error(`${file}.${entryPoint}: binding ${binding} holds f32 only, got an f16 tensor`);
    if (!gpu.hasF16) throw new Error("this GPU has no shader-f16: use --precision f32");
    return alias;
  });
  const p = pipeline(gpu, file, entryPoint, halves.sort());
  const entries = Object.entries(bindings).map(([binding, b]) => {
    const size = "shape" in b ? tensorBytes(b.shape, b.dtype) : b.size, offset = "shape" in b ? b.offset : 0;
    const uniform = !("shape" in b) && (b.usage & GPUBufferUsage.UNIFORM) !== 0;
    // the op should have sliced it (batchSlices), and checkFits refused what cannot be: a bug if either shows
    if (!uniform && size > gpu.limits.maxBinding) {
      throw new Error(
        `${file}.${entryPoint}: binding ${binding} is ${mib(size)}, over the ${mib(gpu.limits.maxBinding)} limit`,
      );
    }
    if (offset % gpu.limits.align) {
      throw new Error(`${file}.${entryPoint}: binding ${binding} starts at byte ${offset}`);
    }
    return { binding: Number(binding), resource: "shape" in b ? { buffer: b.buffer, offset, size } : { buffer: b } };
  });
  const bindGroup = gpu.device.createBindGroup({ layout: p.getBindGroupLayout(0), entries });
  if (grid[0] > MAX_GROUPS || grid[1] > MAX_GROUPS || grid[2] > MAX_GROUPS) {
    throw new Error(`${file}:${entryPoint} needs a grid of [${grid}] workgroups: lower --batch-size`);
  }
  const label = `${file}.${entryPoint}${info.label ? ` ${info.label}` : ""}`;
  const slots = Object.entries(bindings).map(([binding, b]) => ({
    binding: Number(binding),
    uniform: !("shape" in b) && (b.usage & GPUBufferUsage.UNIFORM) !== 0,
  }));
  return { label, pipeline: p, bindGroup, grid, flop: info.flop, slots };
}

/** The alias a storage binding of `file` is declared with (`var<storage, ...> name: array<ALIAS>`), if any. */
function storageAlias(gpu: Gpu, file: string, binding: number): string | undefined {
  const src = gpu.sources.get(file)!;
  const alias = src.match(new RegExp(`@binding\\(${binding}\\) var<storage[^>]*> \\w+: array<(\\w+)>`))?.[1];
  return alias && src.includes(`alias ${alias} = f32;`) ? alias : undefined;
}

/** Grid for a 1-D kernel of `file` over `count` items; the kernel folds y back: i = g.x + g.y * nw.x * WG. */
function grid1d(gpu: Gpu, file: string, count: number): [number, number, number] {
  const groups = Math.max(1, Math.ceil(count / kernelConst(gpu, file, "WG")));
  return groups <= MAX_GROUPS ? [groups, 1, 1] : [MAX_GROUPS, Math.ceil(groups / MAX_GROUPS), 1];
}

export function encode(pass: GPUComputePassEncoder, list: Dispatch[]) {
  for (const d of list) {
    pass.setPipeline(d.pipeline);
    pass.setBindGroup(0, d.bindGroup);
    pass.dispatchWorkgroups(...d.grid);
  }
}

/** Encodes `list` in one compute pass and submits it; nothing waits for the GPU. */
export function submit(gpu: Gpu, list: Dispatch[], after?: (enc: GPUCommandEncoder) => void) {
  const enc = gpu.device.createCommandEncoder();
  if (gpu.profiler) {
    gpu.profiler.encode(enc, list);
  } else {
    const pass = enc.beginComputePass();
    encode(pass, list);
    pass.end();
  }
  after?.(enc);
  gpu.device.queue.submit([enc.finish()]);
}

/**
 * Compiles every distinct pipeline of `list` before any clock starts: some drivers compile a pipeline only when it
 * first runs (lavapipe: ~5 s for a 32 x 16 conv kernel on a cold shader cache; Chromium through ANGLE likewise,
 * bench/RESULTS.md).
 * Each runs once, one workgroup, bound to scratch buffers of zeros: its uniforms say zero rows, so every kernel's
 * bounds checks end it at once, and nothing of the run is read or written. No zero-size dispatch (Dawn warns).
 */
export async function compilePipelines(gpu: Gpu, list: Dispatch[]) {
  const mark = gpu.allocated.length, scratch = new Map<string, GPUBuffer>();
  const zeros = (binding: number, uniform: boolean) => {
    const key = `${binding}:${uniform}`; // one buffer per binding: a bind group never aliases a writable one
    if (!scratch.has(key)) {
      const usage = uniform ? GPUBufferUsage.UNIFORM : GPUBufferUsage.STORAGE;
      const buffer = gpu.device.createBuffer({ size: 256, usage }); // new buffers hold zeros
      track(gpu, buffer);
      scratch.set(key, buffer);
    }
    return scratch.get(key)!;
  };
  const seen = new Set<GPUComputePipeline>();
  const enc = gpu.device.createCommandEncoder(), pass = enc.beginComputePass();
  for (const d of list) {
    if (seen.has(d.pipeline)) continue;
    seen.add(d.pipeline);
    const entries = d.slots.map(({ binding, uniform }) => ({ binding, resource: { buffer: zeros(binding, uniform) } }));
    pass.setPipeline(d.pipeline);
    pass.setBindGroup(0, gpu.device.createBindGroup({ layout: d.pipeline.getBindGroupLayout(0), entries }));
    pass.dispatchWorkgroups(1);
  }
  pass.end();
  gpu.device.queue.submit([enc.finish()]);
  await gpu.device.queue.onSubmittedWorkDone();
  checkGpu(gpu);
  freeSince(gpu, mark);
}

/**
 * --profile: every dispatch gets its own compute pass with timestamps; after each submit the
 * caller awaits `collect()` (one readback per submit: profiled runs are slower, their table is not).
 */
export class Profiler {
  private querySet: GPUQuerySet;
  private resolved: GPUBuffer;
  private staging: GPUBuffer;
  private pending: Dispatch[] = [];
  readonly totals = new Map<string, { ns: number; calls: number; flop: number }>();
  constructor(private device: GPUDevice, private capacity = 1024) {
    this.querySet = device.createQuerySet({ type: "timestamp", count: capacity });
    const usage = GPUBufferUsage.QUERY_RESOLVE | GPUBufferUsage.COPY_SRC;
    this.resolved = device.createBuffer({ size: capacity * 8, usage });
    this.staging = device.createBuffer({
      size: capacity * 8,
      usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST,
    });
  }
  encode(enc: GPUCommandEncoder, list: Dispatch[]) {
    if (this.pending.length) throw new Error("Profiler: collect() the previous submit first");
    if (2 * list.length > this.capacity) throw new Error(`Profiler: ${list.length} dispatches in one submit`);
    list.forEach((d, i) => {
      const pass = enc.beginComputePass({
        timestampWrites: { querySet: this.querySet, beginningOfPassWriteIndex: 2 * i, endOfPassWriteIndex: 2 * i + 1 },
      });
      encode(pass, [d]);
      pass.end();
    });
    if (list.length === 0) return;
    enc.resolveQuerySet(this.querySet, 0, 2 * list.length, this.resolved, 0);
    enc.copyBufferToBuffer(this.resolved, 0, this.staging, 0, 2 * list.length * 8);
    this.pending = list;
  }
  async collect() {
    if (!this.pending.length) return;
    await this.staging.mapAsync(GPUMapMode.READ);
    const t = new BigInt64Array(this.staging.getMappedRange().slice(0));
    this.staging.unmap();
    this.pending.forEach((d, i) => {
      const row = this.totals.get(d.label) ?? { ns: 0, calls: 0, flop: 0 };
      row.ns += Number(t[2 * i + 1] - t[2 * i]);
      row.calls += 1;
      row.flop += d.flop ?? 0;
      this.totals.set(d.label, row);
    });
    this.pending = [];
  }
  /** The table a speedrunner reads first: kernels by total GPU time. */
  report(): string {
    const rows = [...this.totals].sort((a, b) => b[1].ns - a[1].ns);
    const all = rows.reduce((a, [, r]) => a + r.ns, 0);
    const width = Math.max(6, ...rows.map(([l]) => l.length));
    const lines = [
      `${"kernel".padEnd(width)}  ${"calls".padStart(6)}  ${"total ms".padStart(10)}  ${"mean us".padStart(9)}  ` +
      `${"share".padStart(6)}  ${"GFLOP/s".padStart(8)}`,
    ];
    for (const [label, r] of rows) {
      const gflops = r.flop ? (r.flop / r.ns).toFixed(1) : "";
      lines.push(
        `${label.padEnd(width)}  ${String(r.calls).padStart(6)}  ${(r.ns / 1e6).toFixed(1).padStart(10)}  ` +
          `${(r.ns / r.calls / 1e3).toFixed(1).padStart(9)}  ${((100 * r.ns) / all).toFixed(1).padStart(5)}%  ${
            gflops.padStart(8)
          }`,
      );
    }
    lines.push(`${"all kernels".padEnd(width)}  ${"".padStart(6)}  ${(all / 1e6).toFixed(1).padStart(10)}`);
    return lines.join("\n");
  }
}

/** Frees every buffer allocated since `mark = gpu.allocated.length`. */
export function freeSince(gpu: Gpu, mark: number) {
  for (const b of gpu.allocated.splice(mark)) {
    gpu.memory.bytes -= b.size;
    b.destroy();
  }
}

// ---- the network's activation buffers: one set per batch size, reused by every step

/** Saved activations of one ConvGroup (inputs of every backward op), and BN statistics. */
interface GroupActs {
  c1?: Tensor; // conv1 output           [B][H][W][C] (only without fuseConvPool: never stored when fused)
  argmax1?: Tensor; // each pool window's winner, u32 [B][H/2][W/2][ceil(C/4)] (only with fuseConvPool)
  p1: Tensor; // maxpool output = BN1 in [B][H/2][W/2][C]
  n1: Tensor; // BN1 output = GELU in (the same tensor as a1 when fuseNormGelu: never stored)
  a1: Tensor; // GELU output = conv2 in
  c2: Tensor; // conv2 output = BN2 in
  n2: Tensor; // BN2 output = GELU in (likewise)
  a2: Tensor; // group output
  stats1: Tensor; // BN1 (mean, 1/std) [C][2]
  stats2: Tensor;
}

export interface Activations {
  x: Tensor; // input batch [B][32][32][3]
  targets: Tensor; // soft targets [B][10]
  w0: Tensor; // whitening conv output [B][31][31][24]
  a0: Tensor; // after GELU
  groups: GroupActs[];
  feats: Tensor; // global max pool [B][C3]
  logits: Tensor; // [B][10]
  logitsTta: Tensor; // flip-averaged eval logits [B/2][10] (rows used: half)
  loss: Tensor; // per-row loss [B]
  correct: Tensor; // per-row 0/1 [B]
  dlogits: Tensor;
  dfeats: Tensor;
  gradA: GPUBuffer; // two ping-pong buffers for the activation gradients of the backward pass
  gradB: GPUBuffer;
  dtype: DType; // of the images, activations and their gradients (--precision); features and logits are f32
  kernels: NetKernels; // what these buffers were allocated for; forward and backward follow it
  whitenBias?: ReturnType<typeof whitenBiasNorm>; // the recipe's whitening bias, as a batch norm (whitenBiasNorm)
}

export function makeActivations(
  gpu: Gpu,
  batch: number,
  baseDepth: number,
  dtype: DType = "f32",
  kernels: NetKernels = netKernels(gpu),
  h: Hyp = hyp,
): Activations {
  const classes = h.misc.numClasses, side = IMAGE_SIDE - h.net.whitening.kernelSize + 1;
  const { fuseConvPool, fuseNormGelu } = kernels;
  checkFits(gpu, batch, baseDepth, dtype, h); // first: the line names the size that fits, not a tensor that does not
  const groups: GroupActs[] = [];
  // hw: the group's input height and width; largest: the largest activation gradient's shape (the whitening output's
  // only where the whitening bias learns)
  let hw = side, largest = h.net.whiteningBiasEpochs > 0 ? [batch, side, side, whitenOut(h)] : [0];
  for (const c of groupWidths(baseDepth, h)) {
    const full = [batch, hw, hw, c], pooled = [batch, hw >> 1, hw >> 1, c];
    const t = (shape: number[]) => tensor(gpu, shape, dtype);
    const a1 = t(pooled), a2 = t(pooled);
    groups.push({
      c1: fuseConvPool ? undefined : t(full),
      argmax1: fuseConvPool ? tensor(gpu, [...pooled.slice(0, 3), Math.ceil(c / 4)], "u32") : undefined,
      p1: t(pooled),
      n1: fuseNormGelu ? a1 : t(pooled),
      a1,
      c2: t(pooled),
      n2: fuseNormGelu ? a2 : t(pooled),
      a2,
      stats1: tensor(gpu, [c, 2]),
      stats2: tensor(gpu, [c, 2]),
    });
    if (numel(full) > numel(largest)) largest = full; // a conv1 output
    hw >>= 1;
  }
  const c3 = groupWidths(baseDepth, h)[2];
  return {
    x: tensor(gpu, [batch, IMAGE_SIDE, IMAGE_SIDE, 3], dtype),
    targets: tensor(gpu, [batch, classes]),
    w0: tensor(gpu, [batch, side, side, whitenOut(h)], dtype),
    a0: tensor(gpu, [batch, side, side, whitenOut(h)], dtype),
    groups,
    feats: tensor(gpu, [batch, c3]),
    logits: tensor(gpu, [batch, classes]),
    logitsTta: tensor(gpu, [batch, classes]),
    loss: tensor(gpu, [batch]),
    correct: tensor(gpu, [batch]),
    dlogits: tensor(gpu, [batch, classes]),
    dfeats: tensor(gpu, [batch, c3]),
    gradA: tensor(gpu, largest, dtype).buffer,
    gradB: tensor(gpu, largest, dtype).buffer,
    dtype,
    kernels,
    whitenBias: h.net.whiteningBiasEpochs > 0 ? whitenBiasNorm(gpu, whitenOut(h)) : undefined,
  };
}

/**
 * The whitening bias (airbench94) as a batch norm in eval mode with running mean 0, variance 1, scale 1 and eps 0
 * (WHITEN_BIAS_NORM): its output is x + bias exactly, and the norm's GELU and its backward's sum of g give the bias's
 * forward and gradient with no kernel of their own. The scale's gradient lands in `dweight`, unused.
 */
const WHITEN_BIAS_NORM: BatchNormHyp = { momentum: 0, eps: 0 };
function whitenBiasNorm(gpu: Gpu, channels: number) {
  const t = (fill: number) => upload(gpu, new Float32Array(channels).fill(fill), [channels]);
  return { weight: t(1), runningMean: t(0), runningVar: t(1), stats: tensor(gpu, [channels, 2]), dweight: t(0) };
}

/**
 * The shapes of the network's batch tensors, per image: those bound in slices (images and targets, activations and
 * their gradients, the largest first), and those bound whole (the loss's rows: targets, logits, features).
 */
function perImageShapes(baseDepth: number, dtype: DType, h: Hyp) {
  const side = IMAGE_SIDE - h.net.whitening.kernelSize + 1, sliced: { shape: number[]; dtype: Storage }[] = [];
  sliced.push({ shape: [IMAGE_SIDE, IMAGE_SIDE, 3], dtype }, { shape: [side, side, whitenOut(h)], dtype });
  sliced.push({ shape: [h.misc.numClasses], dtype: "f32" }); // the data kernels write targets with the images
  let hw = side;
  for (const c of groupWidths(baseDepth, h)) {
    const pooled = [hw >> 1, hw >> 1];
    sliced.push({ shape: [hw, hw, c], dtype }, { shape: [...pooled, c], dtype });
    sliced.push({ shape: [...pooled, Math.ceil(c / 4)], dtype: "u32" });
    hw >>= 1;
  }
  const bytes = (t: { shape: number[]; dtype: Storage }) => numel(t.shape) * BYTES[t.dtype];
  sliced.sort((a, b) => bytes(b) - bytes(a));
  const whole = [h.misc.numClasses, groupWidths(baseDepth, h)[2]].map((c) => ({ shape: [c], dtype: "f32" as Storage }));
  return { sliced, whole, bytes };
}

/**
 * Refuses, in one line naming the flag and the largest value that fits, a network these limits cannot run. A batch
 * tensor larger than a binding is bound in slices (batchSlices), so any batch fits whose buffers do; what must fit one
 * binding is a slice of the fewest images, each weight, the loss's rows and the norm statistics' partials.
 */
export function checkFits(gpu: Gpu, batch: number, baseDepth: number, dtype: DType = "f32", h: Hyp = hyp) {
  const { maxBinding, maxBuffer, align } = gpu.limits, binds = `this GPU binds at most ${mib(maxBinding)}`;
  const depthFits = (d: number) => {
    const { sliced, bytes } = perImageShapes(d, dtype, h);
    const granule = Math.max(...sliced.map((t) => align / gcd(bytes(t), align)));
    const c3 = groupWidths(d, h)[2], weight = 9 * c3 * c3 * 4; // the largest weight: group 3's second conv
    return { ok: granule * bytes(sliced[0]) <= maxBinding && weight <= maxBinding, granule, weight, widest: sliced[0] };
  };
  const here = depthFits(baseDepth);
  if (!here.ok) {
    let d = baseDepth;
    while (d > 1 && !depthFits(d).ok) d--;
    const what = here.weight > maxBinding
      ? `its largest weight [3,3,${groupWidths(baseDepth, h)[2]},${groupWidths(baseDepth, h)[2]}] takes ${
        mib(here.weight)
      }`
      : `a slice of ${here.granule} image${here.granule > 1 ? "s" : ""} (the fewest a binding can start at) needs ` +
        `${mib(here.granule * numel(here.widest.shape) * BYTES[here.widest.dtype])} for one [${here.granule},` +
        `${here.widest.shape}] activation`;
    const fix = depthFits(d).ok ? `use --base-depth ${d} or less` : "use another GPU";
    throw new Error(`at base depth ${baseDepth}, ${what}, but ${binds}: ${fix}`);
  }
  // bound whole: the loss's rows (targets, logits, features: at most a few KiB an image), and the norm partials
  const { sliced, whole, bytes } = perImageShapes(baseDepth, dtype, h);
  const side = IMAGE_SIDE - h.net.whitening.kernelSize + 1;
  // a norm's partials: a (4 x f32) per chunk of NORM_ROWS_PER_CHUNK pixels and channel, and at most one more chunk
  // per slice, so per image at most
  const partsPerImage = Math.max(
    ...groupWidths(baseDepth, h).map((c, i) => ((side >> (i + 1)) ** 2 / NORM_ROWS_PER_CHUNK + 1) * c * 16),
    h.net.whiteningBiasEpochs > 0 ? (side ** 2 / NORM_ROWS_PER_CHUNK + 1) * whitenOut(h) * 16 : 0, // whitenBias's
  );
  const limits = [
    { bytes: Math.max(...whole.map(bytes)), cap: maxBinding, what: "its features (bound whole)", binds },
    { bytes: partsPerImage, cap: maxBinding, what: "its batch-norm partial sums", binds },
    {
      bytes: bytes(sliced[0]),
      cap: maxBuffer,
      what: `one [${batch},${sliced[0].shape}] activation`,
      binds: `this GPU's buffers hold at most ${mib(maxBuffer)}`,
    },
  ];
  for (const l of limits) {
    if (batch * l.bytes > l.cap) {
      throw new Error(
        `a batch of ${batch} needs ${mib(batch * l.bytes)} for ${l.what} but ${l.binds}: ` +
          `use --batch-size ${Math.floor(l.cap / l.bytes)} or less`,
      );
    }
  }
}

/** The same buffers seen with another batch size (<= the allocated one), e.g. for evaluation. */
export function activationsWithRows(a: Activations, rows: number): Activations {
  const r = (t: Tensor) => withRows(t, rows);
  const groups = a.groups.map((g) =>
    Object.fromEntries(
      Object.entries(g).map(([k, t]) => [k, t === undefined || k.startsWith("stats") ? t : r(t)]),
    ) as unknown as GroupActs
  );
  // every other tensor has the batch as its first dimension (buffers, dtype and kernels pass through)
  const rest = Object.entries(a).map(([k, v]) => [k, typeof v === "object" && "shape" in v ? r(v) : v]);
  return { ...Object.fromEntries(rest), groups } as Activations;
}

// ---- small numerics: the eigendecomposition behind the whitening init (torch.linalg.eigh in the original)

/** Eigen-decomposition of a symmetric matrix by cyclic Jacobi rotations; vectors[i] goes with values[i]. */
export function jacobiEigen(matrix: number[][]): { values: number[]; vectors: number[][] } {
  const n = matrix.length, a = matrix.map((r) => [...r]);
  const v: number[][] = Array.from({ length: n }, (_, i) => Array.from({ length: n }, (_, j) => (i === j ? 1 : 0)));
  const norm = Math.hypot(...a.flat());
  for (let sweep = 0; sweep < 100; sweep++) {
    let off = 0;
    for (let p = 0; p < n; p++) for (let q = p + 1; q < n; q++) off += a[p][q] ** 2;
    if (Math.sqrt(off) <= 1e-15 * norm) break;
    for (let p = 0; p < n; p++) {
      for (let q = p + 1; q < n; q++) {
        if (a[p][q] === 0) continue;
        const theta = (a[q][q] - a[p][p]) / (2 * a[p][q]);
        const t = (theta >= 0 ? 1 : -1) / (Math.abs(theta) + Math.sqrt(theta * theta + 1));
        const c = 1 / Math.sqrt(t * t + 1), s = t * c;
        for (let k = 0; k < n; k++) [a[k][p], a[k][q]] = [c * a[k][p] - s * a[k][q], s * a[k][p] + c * a[k][q]];
        for (let k = 0; k < n; k++) [a[p][k], a[q][k]] = [c * a[p][k] - s * a[q][k], s * a[p][k] + c * a[q][k]];
        for (let k = 0; k < n; k++) [v[k][p], v[k][q]] = [c * v[k][p] - s * v[k][q], s * v[k][p] + c * v[k][q]];
      }
    }
  }
  return { values: a.map((r, i) => r[i]), vectors: a.map((_, i) => v.map((r) => r[i])) };
}

/** Runs `build` inside WebGPU error scopes: out-of-memory and validation errors become one clear Error. */
async function withErrorScopes<T>(gpu: Gpu, what: string, build: () => T): Promise<T> {
  gpu.device.pushErrorScope("out-of-memory");
  gpu.device.pushErrorScope("validation");
  let result: T | undefined, thrown: unknown;
  try {
    result = build();
  } catch (e) {
    thrown = e;
  }
  const validation = await gpu.device.popErrorScope(), oom = await gpu.device.popErrorScope();
  if (thrown) throw thrown;
  if (oom) throw new Error(`out of GPU memory building ${what} (${oom.message}): lower --batch-size or --base-depth`);
  if (validation) throw new Error(`WebGPU rejected ${what}: ${validation.message}`);
  return result as T;
}

/** Seeded PRNG (sfc32, seeded through splitmix32): one per run, so a seed reproduces a run. */
export class Rng {
  private s: Uint32Array;
  constructor(seed: number) {
    let x = seed >>> 0;
    const splitmix = () => {
      x = (x + 0x9e3779b9) >>> 0;
      let z = x;
      z = Math.imul(z ^ (z >>> 16), 0x85ebca6b);
      z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35);
      return (z ^ (z >>> 16)) >>> 0;
    };
    this.s = Uint32Array.from([splitmix(), splitmix(), splitmix(), splitmix()]);
    for (let i = 0; i < 12; i++) this.nextU32();
  }
  nextU32(): number {
    const s = this.s, t = (((s[0] + s[1]) >>> 0) + s[3]) >>> 0;
    s[3] = (s[3] + 1) >>> 0;
    s[0] = s[1] ^ (s[1] >>> 9);
    s[1] = (s[2] + (s[2] << 3)) >>> 0;
    s[2] = ((s[2] << 21) | (s[2] >>> 11)) >>> 0;
    s[2] = (s[2] + t) >>> 0;
    return t;
  }
  /** The generator's state, to continue it elsewhere (a checkpoint) with `restore`. */
  save(): number[] {
    return [...this.s];
  }
  restore(state: number[]) {
    this.s.set(state);
  }
  /** Uniform in [0, 1). */
  next(): number {
    return this.nextU32() / 2 ** 32;
  }
  /** Uniform integer in [0, n). */
  int(n: number): number {
    return Math.floor(this.next() * n);
  }
  permutation(n: number): Uint32Array {
    const p = new Uint32Array(n);
    for (let i = 0; i < n; i++) p[i] = i;
    for (let i = n - 1; i > 0; i--) {
      const j = this.int(i + 1);
      [p[i], p[j]] = [p[j], p[i]];
    }
    return p;
  }
}

// =================================================================================================
// 6. Ops: one function per kernel. Each returns recorded dispatches and never waits for the GPU.
//    Activations are NHWC, conv weights HWIO [kh][kw][cin][cout]; shapes come from the tensors.
// =================================================================================================

/** A `const NAME: u32 = Nu;` of a kernel file: tile sizes live in the WGSL, the host reads them from there. */
export function kernelConst(gpu: Gpu, file: string, name: string): number {
  const m = gpu.sources.get(file)!.match(new RegExp(`const ${name}: u32 = (\\d+)u;`));
  if (!m) throw new Error(`kernels/${file}.wgsl has no \`const ${name}: u32\``);
  return Number(m[1]);
}

/** A conv kernel set's file, entry-point suffix, threads per workgroup along the rows, outputs per thread
 * (rows x cols); a "tiled" workgroup is one unit of TILE_M x TILE_N outputs. */
function convBlock(gpu: Gpu, set: keyof typeof CONV_KERNELS) {
  const k = CONV_KERNELS[set];
  return {
    file: k.file,
    suffix: k.suffix,
    wg: k.wg ? kernelConst(gpu, k.file, k.wg) : 1,
    rows: kernelConst(gpu, k.file, k.rows),
    cols: kernelConst(gpu, k.file, k.cols),
  };
}
// backward-weight split-K over the pixels. conv.wgsl (CPU devices): aim for `target` pixels per split and at most
// `max` splits. conv_tiled.wgsl (GPUs): the weight gradient has few 64 x 64 tiles (group 1's first conv at base
// depth 64: 4), so split until the grid has `tiledWorkgroups` workgroups, enough to fill a large GPU (an H100 holds
// 132 SMs x 8 of them), each split summing at least `tiledLeast` pixels. Either way never more than `longest` pixels
// per thread (lavapipe silently stops a shader after ~65,535 loop iterations).
const CONV_SPLIT_K = { target: 8192, max: 32, tiledWorkgroups: 1024, tiledLeast: 256, longest: 16384 };

function convShape(x: number[], w: number[], y: number[], pad: number) {
  const [batch, h, wd, cin] = x, [kh, kw, wcin, cout] = w, [yb, ho, wo, ycout] = y;
  if (wcin !== cin || ycout !== cout || yb !== batch || ho !== h + 2 * pad - kh + 1 || wo !== wd + 2 * pad - kw + 1) {
    throw new Error(`conv: shapes x [${x}] w [${w}] y [${y}] pad ${pad} do not match`);
  }
  return { batch, h, w: wd, cin, ho, wo, cout, kh, kw };
}

/** The ConvShape uniform (kernels/common.wgsl), packed by field name. */
function convUniform(gpu: Gpu, c: ReturnType<typeof convShape>, pad: number, m: number, n: number, kps = 0) {
  return uniformStruct(gpu, "ConvShape", { ...c, pad, m, n, k_per_split: kps });
}

/** Profile row name and FLOP count of a conv (the same for all three passes). */
const convInfo = (c: ReturnType<typeof convShape>) => ({
  label: `${c.h}x${c.w}x${c.cin} -> ${c.cout} (${c.kh}x${c.kw})`,
  flop: 2 * c.batch * c.ho * c.wo * c.cout * c.cin * c.kh * c.kw,
});

/** True if `n` rows or columns fill blocks of `block` with at most a fifth of them padding. */
const fills = (n: number, block: number) => Math.ceil(n / block) * block <= 1.25 * n;

/** The kernels of a pass with `n` columns: the set's own, except that "wide" runs its 32 x 16 block where the
 * columns fill it (on lavapipe 1.2-1.5x the 16 x 8 block's speed there, bench/RESULTS.md). */
function convPick(gpu: Gpu, n: number, set: ConvKernels): keyof typeof CONV_KERNELS {
  return set === "wide" && fills(n, kernelConst(gpu, "conv", "WIDE2_COLS")) ? "wide2" : set;
}

/** The kernel file, entry-point suffix and grid of a pass with `m` rows and `n` columns (not backward weight). */
function convPlan(gpu: Gpu, m: number, n: number, set: ConvKernels) {
  const pick = convPick(gpu, n, set), { file, rows, suffix } = convBlock(gpu, pick);
  return { file, suffix, grid: convGrid(gpu, Math.ceil(m / rows), n, 1, pick) };
}

/** Grid of a conv kernel: each thread owns `rows` x `cols` outputs; workgroups of WG threads run along rows. */
function convGrid(
  gpu: Gpu,
  rowBlocks: number,
  n: number,
  splits: number,
  set: keyof typeof CONV_KERNELS,
): [number, number, number] {
  const { wg, cols } = convBlock(gpu, set);
  return [Math.ceil(rowBlocks / wg), Math.ceil(n / cols), splits];
}

// Every conv op takes the kernel set last (default: the device's, gpu.convKernels); all sets give the same results.
// Each runs in batch slices when its tensors are larger than one binding (batchSlices): every output pixel is
// computed as in one pass, except the weight gradient's sum over the batch (conv2dBackwardWeight).

/** y = conv(x, w), stride 1, zero padding `pad`. */
export function conv2d(gpu: Gpu, x: Tensor, w: Tensor, y: Tensor, pad: number, set = gpu.convKernels): Dispatch[] {
  convShape(x.shape, w.shape, y.shape, pad);
  return batchSlices(gpu, [x, y]).map((r) => {
    const c = convShape(rowsOf(x, r).shape, w.shape, rowsOf(y, r).shape, pad);
    const m = c.batch * c.ho * c.wo, n = c.cout;
    const { file, suffix, grid } = convPlan(gpu, m, n, set);
    const bindings = { 0: convUniform(gpu, c, pad, m, n), 1: rowsOf(x, r), 2: w, 3: rowsOf(y, r) };
    return kernel(gpu, file, `forward${suffix}`, bindings, grid, convInfo(c));
  });
}

/**
 * conv2d then a 2x2 max pool (stride 2, floor) in one kernel: `y` is the pooled output [B][Ho/2][Wo/2][Cout]
 * and `argmax` (u32 [B][Ho/2][Wo/2][ceil(Cout/4)]) records which pixel of each window won, for
 * maxPool2Unpool. The full-size conv output is never written; the row and column the pool drops are not computed.
 */
export function conv2dMaxPool(
  gpu: Gpu,
  x: Tensor,
  w: Tensor,
  y: Tensor,
  argmax: Tensor,
  pad: number,
  set = gpu.convKernels,
): Dispatch[] {
  const [batch, h, wd] = x.shape, [kh, kw, , cout] = w.shape;
  const full = [batch, h + 2 * pad - kh + 1, wd + 2 * pad - kw + 1, cout];
  const pooled = [batch, full[1] >> 1, full[2] >> 1, cout];
  if (y.shape.join() !== pooled.join() || argmax.shape.join() !== [...pooled.slice(0, 3), Math.ceil(cout / 4)].join()) {
    throw new Error(`conv2dMaxPool: x [${x.shape}] w [${w.shape}] -> y [${y.shape}], argmax [${argmax.shape}]`);
  }
  if (argmax.dtype !== "u32") throw new Error("conv2dMaxPool: argmax must be a u32 tensor");
  return batchSlices(gpu, [x, y, argmax]).map((r) => {
    const c = convShape(rowsOf(x, r).shape, w.shape, [r.rows, ...full.slice(1)], pad);
    const m = 4 * r.rows * pooled[1] * pooled[2], n = cout; // rows: the 4 pixels of every pool window
    const { file, suffix, grid } = convPlan(gpu, m, n, set);
    const bindings = {
      0: convUniform(gpu, c, pad, m, n),
      1: rowsOf(x, r),
      2: w,
      3: rowsOf(y, r),
      4: rowsOf(argmax, r),
    };
    const info = { label: convInfo(c).label, flop: (convInfo(c).flop / (c.ho * c.wo)) * 4 * pooled[1] * pooled[2] };
    return kernel(gpu, file, `forward_pool${suffix}`, bindings, grid, info);
  });
}

/** dx = d conv / dx, given dy. */
export function conv2dBackwardData(
  gpu: Gpu,
  dy: Tensor,
  w: Tensor,
  dx: Tensor,
  pad: number,
  set = gpu.convKernels,
): Dispatch[] {
  convShape(dx.shape, w.shape, dy.shape, pad);
  return batchSlices(gpu, [dy, dx]).map((r) => {
    const c = convShape(rowsOf(dx, r).shape, w.shape, rowsOf(dy, r).shape, pad);
    const m = c.batch * c.h * c.w, n = c.cin;
    const { file, suffix, grid } = convPlan(gpu, m, n, set);
    const u = convUniform(gpu, c, pad, m, n);
    return kernel(
      gpu,
      file,
      `backward_data${suffix}`,
      { 0: u, 1: rowsOf(dy, r), 2: w, 3: rowsOf(dx, r) },
      grid,
      convInfo(c),
    );
  });
}

/** How many splits sum the `pixels` of a weight gradient m x n, and how many pixels each sums (kps). */
function weightSplits(gpu: Gpu, set: ConvKernels, m: number, n: number, pixels: number) {
  let splits = Math.min(CONV_SPLIT_K.max, Math.ceil(pixels / CONV_SPLIT_K.target));
  if (set === "tiled") {
    const { rows, cols } = convBlock(gpu, set), tiles = Math.ceil(m / rows) * Math.ceil(n / cols);
    splits = Math.min(Math.ceil(CONV_SPLIT_K.tiledWorkgroups / tiles), Math.floor(pixels / CONV_SPLIT_K.tiledLeast));
  }
  // the partials [splits][m][n] are bound whole: no more splits than one binding holds
  const fit = Math.floor(gpu.limits.maxBinding / (m * n * 4));
  splits = Math.min(fit, Math.max(1, splits, Math.ceil(pixels / CONV_SPLIT_K.longest)));
  const kps = Math.ceil(pixels / splits);
  return { splits: Math.ceil(pixels / kps), kps };
}

/**
 * dw = d conv / dw, given x and dy: split-K over the pixels into partials, then a sum over the splits. A batch in
 * slices sums each slice's splits into dw in turn (same terms, another order: equal within f32 rounding).
 */
export function conv2dBackwardWeight(
  gpu: Gpu,
  x: Tensor,
  dy: Tensor,
  dw: Tensor,
  pad: number,
  set = gpu.convKernels,
): Dispatch[] {
  const whole = convShape(x.shape, dw.shape, dy.shape, pad);
  const m = whole.kh * whole.kw * whole.cin, n = whole.cout, perImage = whole.ho * whole.wo;
  // as many images per slice as its splits can sum within lavapipe's loop limit
  const fit = Math.floor(gpu.limits.maxBinding / (m * n * 4));
  const slices = batchSlices(gpu, [x, dy], Math.max(1, Math.floor((fit * CONV_SPLIT_K.longest) / perImage)));
  const plans = slices.map((r) => weightSplits(gpu, set, m, n, r.rows * perImage));
  const partials = tensor(gpu, [Math.max(...plans.map((p) => p.splits)), m, n]);
  return slices.flatMap((r, i) => {
    const { splits, kps } = plans[i], [xs, dys] = [rowsOf(x, r), rowsOf(dy, r)];
    const c = convShape(xs.shape, dw.shape, dys.shape, pad), part = withRows(partials, splits);
    // The wide set runs its 32 x 16 block where the input channels fill 32 rows (of one tap) and the output channels
    // 16 columns; else its 16 x 8 block, whose 16 rows are two units of 8 channels, of one tap or two.
    const wide2 = set === "wide" && fills(c.cin, kernelConst(gpu, "conv", "WIDE2_ROWS"));
    const pick = wide2 && convPick(gpu, n, set) === "wide2" ? "wide2" : set;
    const { file, rows, suffix } = convBlock(gpu, pick);
    // rows of threads: a conv_tiled.wgsl workgroup owns TILE_M rows (tap, channel); a block or wide2 thread `rows`
    // channels of one tap; a wide thread two units of `rows` / 2 channels
    const taps = c.kh * c.kw, unit = rows / 2;
    const rowBlocks = pick === "tiled"
      ? Math.ceil(m / rows)
      : pick === "wide"
      ? Math.ceil((taps * Math.ceil(c.cin / unit)) / 2)
      : taps * Math.ceil(c.cin / rows);
    const grid = convGrid(gpu, rowBlocks, n, splits, pick);
    const bindings = { 0: convUniform(gpu, c, pad, m, n, kps), 1: xs, 2: dys, 3: part };
    const sum = uniform(gpu, [m * n, splits, 0, 0, i > 0 ? 1 : 0, 0, 0, 0]); // slices after the first add to dw
    return [
      kernel(gpu, file, `backward_weight${suffix}`, bindings, grid, convInfo(c)),
      kernel(gpu, "reduce", "sum_splits", { 0: sum, 1: part, 2: dw }, grid1d(gpu, "reduce", m * n), {
        label: convInfo(c).label,
      }),
    ];
  });
}

function poolUniform(gpu: Gpu, x: number[], y: number[], count: number) {
  return uniform(gpu, [x[0], x[1], x[2], x[3], y[1], y[2], count, 0]);
}

/** `build` once per batch slice of `tensors` (binding number -> tensor), each bound to its rows of the slice. */
function perSlice(gpu: Gpu, tensors: Record<number, Tensor>, build: (b: Record<number, Tensor>) => Dispatch) {
  return batchSlices(gpu, Object.values(tensors)).map((r) =>
    build(Object.fromEntries(Object.entries(tensors).map(([k, t]) => [k, rowsOf(t, r)])))
  );
}

/** 2x2 max pool, stride 2, floor (an odd last row/column is dropped). */
export function maxPool2(gpu: Gpu, x: Tensor, y: Tensor): Dispatch[] {
  const [b, h, w, c] = x.shape;
  if (y.shape.join() !== [b, h >> 1, w >> 1, c].join()) throw new Error(`maxPool2: [${x.shape}] -> [${y.shape}]`);
  return perSlice(gpu, { 1: x, 3: y }, (t) => {
    const u = poolUniform(gpu, t[1].shape, t[3].shape, numel(t[3].shape));
    return kernel(gpu, "pool", "maxpool2_forward", { 0: u, ...t }, grid1d(gpu, "pool", numel(t[3].shape)));
  });
}

export function maxPool2Backward(gpu: Gpu, x: Tensor, dy: Tensor, dx: Tensor): Dispatch[] {
  return perSlice(gpu, { 1: x, 2: dy, 3: dx }, (t) => {
    const u = poolUniform(gpu, t[1].shape, t[2].shape, numel(t[1].shape));
    return kernel(gpu, "pool", "maxpool2_backward", { 0: u, ...t }, grid1d(gpu, "pool", numel(t[1].shape)));
  });
}

/** The backward of conv2dMaxPool's pool: dx (full size) = dy at each window's argmax, else 0. */
export function maxPool2Unpool(gpu: Gpu, argmax: Tensor, dy: Tensor, dx: Tensor): Dispatch[] {
  const [b, h, w, c] = dx.shape;
  if (
    dy.shape.join() !== [b, h >> 1, w >> 1, c].join() ||
    argmax.shape.join() !== [b, h >> 1, w >> 1, Math.ceil(c / 4)].join()
  ) {
    throw new Error(`maxPool2Unpool: dy [${dy.shape}], argmax [${argmax.shape}] -> dx [${dx.shape}]`);
  }
  return perSlice(gpu, { 2: dy, 3: dx, 4: argmax }, (t) => {
    const u = poolUniform(gpu, t[3].shape, t[2].shape, numel(t[3].shape));
    return kernel(gpu, "pool", "maxpool2_unpool", { 0: u, ...t }, grid1d(gpu, "pool", numel(t[3].shape)));
  });
}

/** y[b][c] = max over the image of x[b][:][:][c]. */
export function globalMaxPool(gpu: Gpu, x: Tensor, y: Tensor): Dispatch[] {
  return perSlice(gpu, { 1: x, 3: y }, (t) => {
    const u = poolUniform(gpu, t[1].shape, [t[3].shape[0], 1, 1, t[3].shape[1]], numel(t[3].shape));
    return kernel(gpu, "pool", "global_max_forward", { 0: u, ...t }, grid1d(gpu, "pool", numel(t[3].shape)));
  });
}

export function globalMaxPoolBackward(gpu: Gpu, x: Tensor, dy: Tensor, dx: Tensor): Dispatch[] {
  return perSlice(gpu, { 1: x, 2: dy, 3: dx }, (t) => {
    const u = poolUniform(gpu, t[1].shape, [t[2].shape[0], 1, 1, t[2].shape[1]], numel(t[1].shape));
    return kernel(gpu, "pool", "global_max_backward", { 0: u, ...t }, grid1d(gpu, "pool", numel(t[1].shape)));
  });
}

/** y = gelu(x), exact (erf) GELU, elementwise. */
export function gelu(gpu: Gpu, x: Tensor, y: Tensor): Dispatch[] {
  return perSlice(gpu, { 1: x, 9: y }, (t) => {
    const u = normUniform(gpu, t[1], { momentum: 0, eps: 0 });
    return kernel(gpu, "norm", "gelu_forward", { 0: u, ...t }, grid1d(gpu, "norm", numel(t[1].shape)));
  });
}

export function geluBackward(gpu: Gpu, x: Tensor, dy: Tensor, dx: Tensor): Dispatch[] {
  return perSlice(gpu, { 1: x, 2: dy, 9: dx }, (t) => {
    const u = normUniform(gpu, t[1], { momentum: 0, eps: 0 });
    return kernel(gpu, "norm", "gelu_backward", { 0: u, ...t }, grid1d(gpu, "norm", numel(t[1].shape)));
  });
}

/** Batch-norm parameters of one layer: scale (frozen at 1), shift, running mean and variance. */
export interface NormParams {
  weight: Tensor;
  bias: Tensor;
  runningMean: Tensor;
  runningVar: Tensor;
}

const NORM_ROWS_PER_CHUNK = 256; // rows each thread of the statistics kernels sums

/** The recipe's batch-norm numbers (PyTorch conventions): running = (1 - momentum) running + momentum batch. */
export interface BatchNormHyp {
  momentum: number;
  eps: number;
}

/** Pixel rows ([B][H][W][C] seen as rows of C channels) of a tensor, per image. */
const pixelRows = (x: Tensor) => numel(x.shape.slice(1, -1));

/**
 * norm.wgsl's NormShape for the first `rows` images of x (all of it by default): its statistics chunks are written
 * from `base` on, of `chunks` in all (the finalize kernels merge every slice's).
 */
function normUniform(gpu: Gpu, x: Tensor, bn: BatchNormHyp, rows = x.shape[0], chunks = 0, base = 0) {
  const c = x.shape[x.shape.length - 1], n = rows * pixelRows(x);
  const fields = [n, c, NORM_ROWS_PER_CHUNK, chunks, f32(bn.momentum), f32(bn.eps), n * c, base];
  return uniform(gpu, [...fields, x.shape[0] * pixelRows(x)]);
}

/** A norm pass over `tensors` (x first) in batch slices: each slice's uniform and grids, and the partials' size. */
function normSlices(gpu: Gpu, tensors: Tensor[], bn: BatchNormHyp) {
  const x = tensors[0],
    c = x.shape[x.shape.length - 1],
    channelGroups = Math.ceil(c / kernelConst(gpu, "norm", "WG_C"));
  const slices = batchSlices(gpu, tensors),
    chunksOf = (r: Slice) => Math.ceil((r.rows * pixelRows(x)) / NORM_ROWS_PER_CHUNK);
  const chunks = slices.reduce((n, r) => n + chunksOf(r), 0);
  let base = 0;
  const parts = slices.map((r) => {
    const u = normUniform(gpu, x, bn, r.rows, chunks, base);
    base += chunksOf(r);
    const perChunk: [number, number, number] = [channelGroups, chunksOf(r), 1];
    return { r, u, perChunk, elementwise: grid1d(gpu, "norm", r.rows * numel(x.shape.slice(1))) };
  });
  // per-channel kernels: a thread per channel
  return { parts, chunks, c, perChannel: [channelGroups, 1, 1] as [number, number, number] };
}

/**
 * y = batchnorm(x), or gelu(batchnorm(x)) in the same pass with `then` = "gelu". Training: normalise
 * with the batch statistics and update the running ones; eval: normalise with the running statistics.
 * `stats` [C][2] keeps (mean, 1/std) for backward. Statistics are always over the whole batch: in slices, each
 * slice sums its chunks and one pass merges them all (the same bits where each slice holds a multiple of 256 images).
 */
export function batchNorm(
  gpu: Gpu,
  x: Tensor,
  p: NormParams,
  y: Tensor,
  stats: Tensor,
  training: boolean,
  then?: "gelu",
  bn: BatchNormHyp = batchNormHyp(hyp),
): Dispatch[] {
  const s = normSlices(gpu, [x, y], bn), { u } = s.parts[0], running = { 6: p.runningMean, 7: p.runningVar };
  const apply = s.parts.map(({ r, u, elementwise }) =>
    kernel(gpu, "norm", then === "gelu" ? "apply_gelu" : "apply", {
      0: u,
      1: rowsOf(x, r),
      3: stats,
      4: p.weight,
      5: p.bias,
      9: rowsOf(y, r),
    }, elementwise)
  );
  if (!training) return [kernel(gpu, "norm", "eval_stats", { 0: u, 3: stats, ...running }, s.perChannel), ...apply];
  const part = tensor(gpu, [s.chunks, s.c, 4]);
  return [
    ...s.parts.map(({ r, u, perChunk }) =>
      kernel(gpu, "norm", "stats_partial", { 0: u, 1: rowsOf(x, r), 8: part }, perChunk)
    ),
    kernel(gpu, "norm", "stats_finalize", { 0: u, 3: stats, ...running, 8: part }, s.perChannel),
    ...apply,
  ];
}

/**
 * dx, dbias (= sum g) and dweight (= sum g * xhat) of a training-mode batch norm with parameters p,
 * g = dL/d(its output). With `then` = "gelu", dy is the gradient of gelu(batchnorm(x)) (batchNorm's
 * "gelu"): g = dy * gelu'(n) with n recomputed from x, so the norm's output never had to be stored.
 * In slices as batchNorm: the sums over the batch are merged from every slice's chunks.
 */
export function batchNormBackward(
  gpu: Gpu,
  x: Tensor,
  dy: Tensor,
  stats: Tensor,
  p: Pick<NormParams, "weight" | "bias">,
  dx: Tensor | null, // null: dbias and dweight only
  dbias: Tensor,
  dweight: Tensor,
  then?: "gelu",
): Dispatch[] {
  const s = normSlices(gpu, dx ? [x, dy, dx] : [x, dy], { momentum: 0, eps: 0 }),
    fused = then === "gelu" ? "_gelu" : "";
  const part = tensor(gpu, [s.chunks, s.c, 4]);
  const inputs = ({ r, u }: (typeof s.parts)[number]) => ({
    0: u,
    1: rowsOf(x, r),
    2: rowsOf(dy, r),
    3: stats,
    4: p.weight,
    5: p.bias,
  });
  return [
    ...s.parts.map((q) => kernel(gpu, "norm", `backward_partial${fused}`, { ...inputs(q), 8: part }, q.perChunk)),
    kernel(gpu, "norm", "backward_finalize", { 0: s.parts[0].u, 8: part, 10: dbias, 11: dweight }, s.perChannel),
    ...(dx ? s.parts : []).map((q) => {
      const b = { ...inputs(q), 9: rowsOf(dx!, q.r), 10: dbias, 11: dweight };
      return kernel(gpu, "norm", `backward_apply${fused}`, b, q.elementwise);
    }),
  ];
}

function linearUniform(gpu: Gpu, x: number[], w: number[], scale: number) {
  return uniform(gpu, [x[0], w[1], w[0], f32(scale)]);
}

/** y = scale * x @ w^T, w [out][in]. */
export function linear(gpu: Gpu, x: Tensor, w: Tensor, y: Tensor, scale: number): Dispatch {
  return kernel(
    gpu,
    "linear",
    "forward",
    { 0: linearUniform(gpu, x.shape, w.shape, scale), 1: x, 2: w, 4: y },
    grid1d(gpu, "linear", numel(y.shape)),
  );
}

export function linearBackwardData(gpu: Gpu, dy: Tensor, w: Tensor, dx: Tensor, scale: number): Dispatch {
  const u = linearUniform(gpu, dx.shape, w.shape, scale);
  return kernel(gpu, "linear", "backward_data", { 0: u, 2: w, 3: dy, 4: dx }, grid1d(gpu, "linear", numel(dx.shape)));
}

export function linearBackwardWeight(gpu: Gpu, x: Tensor, dy: Tensor, dw: Tensor, scale: number): Dispatch {
  const u = linearUniform(gpu, x.shape, dw.shape, scale);
  return kernel(gpu, "linear", "backward_weight", { 0: u, 1: x, 3: dy, 4: dw }, grid1d(gpu, "linear", numel(dw.shape)));
}

/**
 * Label-smoothed soft-target cross-entropy per row, correctness per row, and the gradient of
 * gradScale * sum(loss). Rows >= frame.valid are zeroed (a partial eval batch).
 */
export function crossEntropy(
  gpu: Gpu,
  logits: Tensor,
  targets: Tensor,
  loss: Tensor,
  correct: Tensor,
  dlogits: Tensor,
  gradScale: number,
  labelSmoothing = hyp.opt.labelSmoothing,
): Dispatch {
  const [rows, classes] = logits.shape;
  const u = uniform(gpu, [rows, classes, f32(labelSmoothing), f32(gradScale), 0, 0, 0, 0]);
  const b = { 0: u, 1: gpu.frame, 2: logits, 3: targets, 4: loss, 5: correct, 6: dlogits };
  return kernel(gpu, "loss", "cross_entropy", b, [Math.ceil(rows / kernelConst(gpu, "loss", "WG")), 1, 1]);
}

/**
 * out[b] = the TTA views' logits combined (loss.wgsl tta_combine): `views` 1 a copy, 2 the flip average (logits[b] +
 * logits[rows + b]) / 2, 6 airbench94's level 2 (its 6 views in TTA_VIEWS's order).
 */
export function ttaCombine(gpu: Gpu, logits: Tensor, out: Tensor, views: number): Dispatch {
  const [rows, classes] = out.shape;
  const u = uniform(gpu, [rows, classes, 0, 0, views, 0, 0, 0]);
  return kernel(gpu, "loss", "tta_combine", { 0: u, 2: logits, 6: out }, [
    Math.ceil((rows * classes) / kernelConst(gpu, "loss", "WG")),
    1,
    1,
  ]);
}

/** flags[slot] = min(flags[slot], frame.step) if any loss[0..rows) is NaN or infinite (u32 view of the buffer). */
export function flagNonFinite(gpu: Gpu, loss: Tensor, flags: GPUBuffer, slot: number): Dispatch {
  const u = uniform(gpu, [0, 0, loss.shape[0], slot, 0, 0, 0, 0]);
  return kernel(gpu, "reduce", "flag_nonfinite", { 0: u, 3: loss, 6: flags, 7: gpu.frame }, [1, 1, 1]);
}

/** metrics[2 slot] += sum(loss), metrics[2 slot + 1] += sum(correct), over `rows` rows. */
export function accumulateMetrics(gpu: Gpu, loss: Tensor, correct: Tensor, metrics: GPUBuffer, slot: number) {
  const u = uniform(gpu, [0, 0, loss.shape[0], slot, 0, 0, 0, 0]);
  return kernel(gpu, "reduce", "accumulate_metrics", { 0: u, 3: loss, 4: correct, 5: metrics }, [1, 1, 1]);
}

/** The flat parameter state: where each tensor lives, and the ranges the optimiser and EMA touch. */
export interface StateLayout {
  entries: Map<string, { offset: number; shape: number[] }>;
  nWeights: number; // [0, nWeights): conv and linear weights
  whitenBiasEnd: number; // [nWeights, whitenBiasEnd): the whitening bias (airbench94), with its own lr
  nTrainable: number; // [nWeights, nTrainable): batch-norm shifts
  nCopy: number; // [nTrainable, nCopy): running statistics; the EMA copies [0, nCopy) back
  nTotal: number; // [nCopy, nTotal): frozen batch-norm scales and whitening conv
}

/**
 * One optim.wgsl pass over the floats [start, end) of the flat state (start: a tensor's, so aligned): one dispatch,
 * with `buffers` bound whole where a binding holds them, else one per aligned range of at most a binding (the kernel
 * adds the range's base).
 */
function optimPass(
  gpu: Gpu,
  entry: string,
  layout: StateLayout,
  [start, end]: [number, number],
  buffers: Record<number, GPUBuffer>,
  numbers: Field[], // the rest of OptimShape: weight decays and momentum
): Dispatch[] {
  const whole = start === 0 && end * 4 <= gpu.limits.maxBinding;
  const step = Math.floor(gpu.limits.maxBinding / gpu.limits.align);
  const span = whole ? end : step * (gpu.limits.align / 4), out: Dispatch[] = [];
  for (let base = start; base < end; base += span) {
    const last = Math.min(end, base + span), { nWeights, nTrainable, nCopy, nTotal, whitenBiasEnd } = layout;
    const u = uniform(gpu, [nWeights, nTrainable, nCopy, nTotal, ...numbers, base, last, whitenBiasEnd, 0, 0]);
    const bound = Object.entries(buffers).map(([k, b]) => [k, whole ? b : view(b, base, [last - base])]);
    const bindings = { 0: u, 1: gpu.frame, ...Object.fromEntries(bound) };
    out.push(kernel(gpu, "optim", entry, bindings, grid1d(gpu, "optim", last - base)));
  }
  return out;
}

/**
 * Nesterov SGD (momentum `mu`) with coupled weight decay over the trainable parameters from `start` (0: all of them;
 * airbench94: from the head, as Muon trains the conv filters). Three lr groups: weights, the whitening bias, the rest.
 */
export function sgdNesterov(
  gpu: Gpu,
  layout: StateLayout,
  params: GPUBuffer,
  grads: GPUBuffer,
  momentum: GPUBuffer,
  wd: { weights: number; biases: number },
  mu = hyp.opt.momentum,
  start = 0,
): Dispatch[] {
  const numbers = [f32(wd.weights), f32(wd.biases), f32(mu)], range: [number, number] = [start, layout.nTrainable];
  return optimPass(gpu, "sgd_nesterov", layout, range, { 2: params, 3: grads, 4: momentum }, numbers);
}

/** ema = d ema + (1 - d) params over the whole state (d = frame.emaDecay), then params = ema except frozen tensors. */
export function emaUpdate(gpu: Gpu, layout: StateLayout, params: GPUBuffer, ema: GPUBuffer): Dispatch[] {
  return optimPass(gpu, "ema_update", layout, [0, layout.nTotal], { 2: params, 5: ema }, [0, 0, 0]);
}

// ---- Muon: the optimiser airbench94 trains its conv filters with (airbench94_muon.py, KellerJordan/cifar10-airbench)

/**
 * Newton-Schulz as airbench94's zeropower_via_newtonschulz5: the quintic's coefficients (a, b, c), its steps, and the
 * epsilon of its input normalisation X / (||X||_F + eps).
 */
export const NEWTON_SCHULZ = { a: 3.4445, b: -4.775, c: 2.0315, steps: 3, eps: 1e-7 };

/** The matrix Muon sees in a tensor: [numel / out, out], out its last dimension (a conv weight HWIO: [kh kw in, out]). */
export const muonMatrix = (shape: number[]) => [numel(shape) / shape[shape.length - 1], shape[shape.length - 1]];

/**
 * Scratch for newtonSchulz and muonStep, sized for the largest matrix they are given and shared by all of them (their
 * passes run one after another): g' and the two iterates, the Gram matrix and polynomial (n x n, n the shorter side),
 * and the norms (muon.wgsl: a slot of PARTS + 1 floats each; newtonSchulz uses slot 0, muonStep slot 1 too).
 */
export interface MuonScratch {
  nesterov: GPUBuffer;
  x: GPUBuffer;
  update: GPUBuffer;
  gram: GPUBuffer;
  poly: GPUBuffer;
  sums: GPUBuffer;
}

/** A MuonScratch for tensors of these shapes (each seen as muonMatrix). */
export function muonScratch(gpu: Gpu, shapes: number[][]): MuonScratch {
  const matrices = shapes.map(muonMatrix);
  const big = 4 * Math.max(...matrices.map(([r, c]) => r * c));
  const small = 4 * Math.max(...matrices.map(([r, c]) => Math.min(r, c) ** 2));
  return {
    nesterov: createBuffer(gpu, big),
    x: createBuffer(gpu, big),
    update: createBuffer(gpu, big),
    gram: createBuffer(gpu, small),
    poly: createBuffer(gpu, small),
    sums: createBuffer(gpu, 4 * 2 * (kernelConst(gpu, "muon", "PARTS") + 1)),
  };
}

/** A matmul operand: the row-major matrix `t` or, with `transpose`, its transpose, read through strides (no copy). */
export type MatOperand = { t: Tensor; transpose?: boolean };

/** c = alpha op(a) op(b), plus beta d when `add` is given (matmul.wgsl product, product_add); c and d row-major. */
export function matmul(
  gpu: Gpu,
  a: MatOperand,
  b: MatOperand,
  c: Tensor,
  alpha = 1,
  add?: { beta: number; d: Tensor },
): Dispatch {
  const shape = (o: MatOperand) => (o.transpose ? [o.t.shape[1], o.t.shape[0]] : o.t.shape);
  const strides = (o: MatOperand) => (o.transpose ? [1, o.t.shape[1]] : [o.t.shape[1], 1]); // [row, column]
  const [m, k] = shape(a), [kb, n] = shape(b);
  if (kb !== k || c.shape[0] !== m || c.shape[1] !== n) {
    throw new Error(`matmul: [${m}, ${k}] x [${kb}, ${n}] -> [${c.shape}]`);
  }
  const u = uniform(gpu, [m, n, k, ...strides(a), ...strides(b), f32(alpha), f32(add?.beta ?? 0), 0, 0, 0]);
  const tile = kernelConst(gpu, "matmul", "TILE");
  const bindings: Record<number, GPUBuffer | Tensor> = { 0: u, 1: a.t, 2: b.t, 4: c };
  if (add) bindings[3] = add.d;
  return kernel(
    gpu,
    "matmul",
    add ? "product_add" : "product",
    bindings,
    [Math.ceil(n / tile), Math.ceil(m / tile), 1],
    { label: `${m}x${k}x${n}`, flop: 2 * m * n * k },
  );
}

function muonUniform(gpu: Gpu, len: number, o: { slot?: number; momentum?: number; eps?: number; normTo?: number }) {
  const at = (o.slot ?? 0) * (kernelConst(gpu, "muon", "PARTS") + 1); // the slot's first float in MuonScratch.sums
  return uniform(gpu, [len, at, f32(o.momentum ?? 0), f32(o.eps ?? 0), f32(o.normTo ?? 0), 0, 0, 0]);
}

/** ||x||_F into norm slot `slot` of `sums` (muon.wgsl sum_squares, finish_norm): it stays on the GPU, nothing waits. */
export function frobeniusNorm(gpu: Gpu, x: Tensor, sums: GPUBuffer, slot: number): Dispatch[] {
  const u = muonUniform(gpu, numel(x.shape), { slot });
  return [
    kernel(gpu, "muon", "sum_squares", { 0: u, 2: x, 5: sums }, [kernelConst(gpu, "muon", "PARTS"), 1, 1]),
    kernel(gpu, "muon", "finish_norm", { 0: u, 5: sums }, [1, 1, 1]),
  ];
}

/**
 * out = NS(g) (g and out [rows, cols], distinct from the scratch): `steps` steps of Newton-Schulz's quintic
 * X <- a X + (b A + c A A) X, A = X Xᵀ, from X = g / (||g||_F + eps). The result is near U Vᵀ of g = U S Vᵀ (its
 * singular values land in about [0.5, 1.5], as the original's docstring says). In f32 where the original runs bf16.
 */
export function newtonSchulz(
  gpu: Gpu,
  g: Tensor,
  out: Tensor,
  scratch: MuonScratch,
  steps = NEWTON_SCHULZ.steps,
  ns = NEWTON_SCHULZ,
): Dispatch[] {
  const [rows, cols] = g.shape, n = Math.min(rows, cols), len = rows * cols;
  // A step is an odd polynomial in X, so on Xᵀ it gives the transpose of its result. A tall X (every conv weight
  // here: [kh kw in, out]) runs as Xᵀ, read through strides: the Gram matrix A is then n x n with n the shorter
  // side: for [2304, 256] a step costs 2 (2 n² k + n³) = 0.64 GFLOP, where a 2304 x 2304 A would cost 30.
  const wide = rows <= cols;
  const gram = view(scratch.gram, 0, [n, n]), poly = view(scratch.poly, 0, [n, n]);
  // the iterates alternate between x and out, starting where the last one lands in out
  const x = view(scratch.x, 0, [rows, cols]);
  let [cur, next] = steps % 2 ? [x, out] : [out, x];
  const u = muonUniform(gpu, len, { slot: 0, eps: ns.eps });
  const list = [
    ...frobeniusNorm(gpu, g, scratch.sums, 0),
    kernel(gpu, "muon", "scale_by_norm", { 0: u, 2: g, 3: cur, 5: scratch.sums }, grid1d(gpu, "muon", len)),
  ];
  for (let step = 0; step < steps; step++) {
    list.push(
      matmul(gpu, { t: cur, transpose: !wide }, { t: cur, transpose: wide }, gram), // A = X Xᵀ (= curᵀ cur if tall)
      matmul(gpu, { t: gram }, { t: gram }, poly, ns.c, { beta: ns.b, d: gram }), // B = b A + c A A
      wide // a X + B X; tall: its transpose, a cur + cur Bᵀ
        ? matmul(gpu, { t: poly }, { t: cur }, next, 1, { beta: ns.a, d: cur })
        : matmul(gpu, { t: cur }, { t: poly, transpose: true }, next, 1, { beta: ns.a, d: cur }),
    );
    [cur, next] = [next, cur];
  }
  return list;
}

/**
 * One Muon step (airbench94's, Nesterov) of a conv weight p [kh, kw, in, out], its gradient and momentum buffer:
 * buf = momentum buf + grad, g' = grad + momentum buf; p renormalised to norm sqrt(out); p -= frame.muonLr NS(g').
 * The original orthogonalises g' as [out, in kh kw]; our layout gives [kh kw in, out]: its transpose with the columns
 * permuted. NS commutes with both (NS(Gᵀ) = NS(G)ᵀ, and NS(G P) = NS(G) P for a permutation P, as P Pᵀ = I), so it
 * runs on our matrix as it lies and gives the original's update in our layout. lr comes from the frame (setFrame),
 * so one recorded step serves the whole schedule; the momentum is the recipe's constant.
 */
export function muonStep(
  gpu: Gpu,
  p: Tensor,
  grad: Tensor,
  buf: Tensor,
  scratch: MuonScratch,
  momentum: number,
): Dispatch[] {
  const [rows, cols] = muonMatrix(p.shape), len = rows * cols;
  const nesterov = view(scratch.nesterov, 0, [rows, cols]), update = view(scratch.update, 0, [rows, cols]);
  const grid = grid1d(gpu, "muon", len);
  const renorm = muonUniform(gpu, len, { slot: 1, normTo: Math.sqrt(cols) });
  return [
    kernel(gpu, "muon", "nesterov", { 0: muonUniform(gpu, len, { momentum }), 2: grad, 3: nesterov, 4: buf }, grid),
    ...newtonSchulz(gpu, nesterov, update, scratch),
    ...frobeniusNorm(gpu, p, scratch.sums, 1),
    kernel(gpu, "muon", "renorm_step", { 0: renorm, 1: gpu.frame, 2: update, 3: p, 5: scratch.sums }, grid),
  ];
}

/** A split of raw images on the GPU (see data.wgsl): u8 CHW records packed in u32, labels as u32. */
export interface GpuImages {
  part0: GPUBuffer;
  part1: GPUBuffer;
  imagesPerPart: number;
  count: number;
  labels: GPUBuffer;
}

/** Per-channel mean and std of the training pixels in [0, 1] units (n - 1 denominator). */
export interface ChannelStats {
  mean: number[];
  std: number[];
}

/** The training augmentation's numbers (hyp.net); evaluation and the whitening statistics use neither. */
type AugmentHyp = Pick<Hyp["net"], "cutmixSize" | "padAmount" | "cropOffsets">;

/** data.wgsl's DataShape for rows `r` (of a batch of `batchRows`): the slice's own output rows start at r.start. */
function dataUniform(
  gpu: Gpu,
  r: Slice,
  batchRows: number,
  imgs: GpuImages,
  norm: ChannelStats,
  classes: number,
  aug: AugmentHyp = { cutmixSize: 0, padAmount: 0, cropOffsets: 1 },
  views = 1, // gather_eval's TTA views
) {
  const { cutmixSize } = aug, even = cutmixSize % 2 === 0 ? 1 : 0, half = Math.floor(cutmixSize / 2);
  const inv = norm.std.map((s) => 1 / s);
  return uniform(gpu, [
    r.rows,
    imgs.imagesPerPart,
    imgs.count,
    classes,
    f32((cutmixSize * cutmixSize) / (IMAGE_SIDE * IMAGE_SIDE)),
    i32(-half + even),
    i32(half),
    i32(aug.padAmount),
    ...norm.mean.map(f32),
    f32(0),
    ...inv.map(f32),
    f32(0),
    r.start,
    batchRows,
    views,
    0,
  ]);
}

/**
 * The training batch: image perm[frame.offset + r] cropped, flipped and cutmixed as `params`
 * says (see data.wgsl), normalised, into images [rows][32][32][3] and soft targets [rows][10].
 */
export function augmentTrain(
  gpu: Gpu,
  imgs: GpuImages,
  norm: ChannelStats,
  perm: GPUBuffer,
  params: GPUBuffer,
  images: Tensor,
  targets: Tensor,
  aug: AugmentHyp = hyp.net,
): Dispatch[] {
  return batchSlices(gpu, [images, targets]).map((r) => {
    const u = dataUniform(gpu, r, images.shape[0], imgs, norm, targets.shape[1], aug);
    const b = {
      0: u,
      1: gpu.frame,
      2: imgs.part0,
      3: imgs.part1,
      4: perm,
      5: params,
      6: imgs.labels,
      7: rowsOf(images, r),
      8: rowsOf(targets, r),
    };
    return kernel(gpu, "data", "augment_train", b, grid1d(gpu, "data", r.rows * IMAGE_SIDE * IMAGE_SIDE));
  });
}

/**
 * Eval batch in `views` TTA views (TTA_VIEWS, data.wgsl gather_eval): rows [v part, (v + 1) part) hold images
 * frame.offset.. in view v (part = rows / views); 2 views: the images, then their mirrors.
 */
export function gatherEval(
  gpu: Gpu,
  imgs: GpuImages,
  norm: ChannelStats,
  images: Tensor,
  targets: Tensor,
  views: number,
): Dispatch[] {
  return batchSlices(gpu, [images, targets]).map((r) => {
    const u = dataUniform(gpu, r, images.shape[0], imgs, norm, targets.shape[1], undefined, views);
    const [x, t] = [rowsOf(images, r), rowsOf(targets, r)];
    const b = { 0: u, 1: gpu.frame, 2: imgs.part0, 3: imgs.part1, 6: imgs.labels, 7: x, 8: t };
    return kernel(gpu, "data", "gather_eval", b, grid1d(gpu, "data", r.rows * IMAGE_SIDE * IMAGE_SIDE));
  });
}

/** Per image: sums and products of its normalised 2x2 patches (12-vectors) -> out [count][90]. */
export function patchMoments(gpu: Gpu, imgs: GpuImages, norm: ChannelStats, out: Tensor): Dispatch[] {
  return batchSlices(gpu, [out]).map((r) => {
    const u = dataUniform(gpu, r, imgs.count, imgs, norm, 0);
    const b = { 0: u, 2: imgs.part0, 3: imgs.part1, 7: rowsOf(out, r) };
    return kernel(gpu, "data", "patch_moments", b, grid1d(gpu, "data", r.rows * 90));
  });
}

// =================================================================================================
// 7. Data: find (or download) CIFAR-10, read and check it, normalise, upload once
// =================================================================================================

// CIFAR-10 "binary version": each .bin file is 10,000 records of 3073 bytes:
// 1 label byte (0-9) then 1024 R, 1024 G, 1024 B bytes (32x32, row-major).
// We keep images as raw CHW uint8 exactly as in the file (label byte dropped);
// normalization and augmentation happen on the GPU.

export const CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz";
export const CIFAR10_MD5 = "c32a1d4ab5d03f1284b67883e8d87530";
export const CIFAR10_TRAIN_FILES = [
  "data_batch_1.bin",
  "data_batch_2.bin",
  "data_batch_3.bin",
  "data_batch_4.bin",
  "data_batch_5.bin",
];
export const CIFAR10_TEST_FILE = "test_batch.bin";
export const RECORD_BYTES = 3073;
export const FILE_BYTES = 30_730_000;
export const IMAGE_BYTES = RECORD_BYTES - 1; // 3 * 32 * 32
/** The labels' names (the release's batches.meta.txt), label 0 first. */
export const CIFAR10_CLASSES = "airplane automobile bird cat deer dog frog horse ship truck".split(" ");
const RECORDS_PER_FILE = FILE_BYTES / RECORD_BYTES; // 10,000
const DATA_FOLDER = "cifar-10-batches-bin";
const USE_DATA = "pass --data DIR pointing at an existing cifar-10-batches-bin folder";

export interface Cifar10 {
  trainImages: Uint8Array; // N * 3072 bytes, each image CHW
  trainLabels: Uint8Array; // N bytes, 0..9
  testImages: Uint8Array;
  testLabels: Uint8Array;
}

/** Who named the dataset folder: each error line tells that one how to fix it. */
export type DataSource = "--data" | "CIFAR10_DIR" | "cache";
const fixData = (source: DataSource) =>
  source === "cache"
    ? `delete the folder to re-download it, or ${USE_DATA}`
    : source === "CIFAR10_DIR"
    ? "point CIFAR10_DIR at a valid cifar-10-batches-bin folder, or unset it to download CIFAR-10"
    : "point --data at a valid cifar-10-batches-bin folder, or leave --data out to download it";

export async function loadCifar10(
  dir: string,
  opts: { trainSubset?: number; testSubset?: number; source?: DataSource } = {},
): Promise<Cifar10> {
  const source = opts.source ?? "--data", named = source === "CIFAR10_DIR" ? `CIFAR10_DIR=${dir}` : dir;
  let info: Deno.FileInfo;
  try {
    info = await Deno.stat(dir);
  } catch {
    throw new Error(
      source === "CIFAR10_DIR"
        ? `${named} does not exist: ${fixData(source)}`
        : `CIFAR-10 folder ${dir} does not exist: pass --data DIR pointing at a cifar-10-batches-bin folder, or leave --data out to download it`,
    );
  }
  if (!info.isDirectory) throw new Error(`${named} is not a folder: ${fixData(source)}`);
  const fix = fixData(source);
  return await cifarRecords((file) => readCifarFile(join(dir, file), fix), opts, fix);
}

/**
 * The first trainSubset (testSubset) records of the training files (the test file), in file order, each file got
 * from `read` (a folder's, a tarball's) and checked; `fix` ends each error line (what the user can do about it).
 */
export async function cifarRecords(
  read: (file: string) => Promise<{ name: string; bytes: Uint8Array }>,
  opts: { trainSubset?: number; testSubset?: number },
  fix: string,
): Promise<Cifar10> {
  const train = await readRecords(read, CIFAR10_TRAIN_FILES, opts.trainSubset, "trainSubset", fix);
  const test = await readRecords(read, [CIFAR10_TEST_FILE], opts.testSubset, "testSubset", fix);
  return {
    trainImages: train.images,
    trainLabels: train.labels,
    testImages: test.images,
    testLabels: test.labels,
  };
}

// Reads the first n records of `files` (in order), opening only the files it needs.
async function readRecords(
  read: (file: string) => Promise<{ name: string; bytes: Uint8Array }>,
  files: string[],
  n: number | undefined,
  what: string,
  fix: string,
) {
  const max = files.length * RECORDS_PER_FILE;
  n ??= max;
  if (!Number.isInteger(n) || n < 0 || n > max) {
    throw new Error(`${what} must be an integer from 0 to ${max}, got ${n}`);
  }
  const images = new Uint8Array(n * IMAGE_BYTES), labels = new Uint8Array(n);
  for (let f = 0, i = 0; i < n; f++) {
    const { name, bytes } = await read(files[f]);
    checkCifarFile(name, bytes, fix);
    const count = Math.min(RECORDS_PER_FILE, n - i);
    for (let r = 0; r < count; r++, i++) {
      labels[i] = bytes[r * RECORD_BYTES];
      images.set(bytes.subarray(r * RECORD_BYTES + 1, (r + 1) * RECORD_BYTES), i * IMAGE_BYTES);
    }
  }
  return { images, labels };
}

// Reads one .bin file: only a regular file (a FIFO or device would be read forever, or block).
async function readCifarFile(path: string, fix: string): Promise<{ name: string; bytes: Uint8Array }> {
  let bytes: Uint8Array | undefined;
  try {
    if ((await Deno.stat(path)).isFile) bytes = await Deno.readFile(path);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) throw new Error(`CIFAR-10 file ${path} is missing: ${fix}`);
    throw new Error(`could not read CIFAR-10 file ${path} (${errorText(e)}): ${fix}`);
  }
  if (!bytes) throw new Error(`CIFAR-10 file ${path} is not a regular file (a folder, FIFO or device): ${fix}`);
  return { name: path, bytes };
}

// Checks one .bin file's size and every label, so that a corrupt or wrong file fails loudly here instead of
// silently training on garbage.
function checkCifarFile(name: string, bytes: Uint8Array, fix: string) {
  if (bytes.length !== FILE_BYTES) {
    throw new Error(
      `CIFAR-10 file ${name} has ${bytes.length} bytes, expected ${FILE_BYTES} (truncated, or not the binary version): ${fix}`,
    );
  }
  for (let r = 0; r < RECORDS_PER_FILE; r++) {
    const label = bytes[r * RECORD_BYTES];
    if (label > 9) {
      throw new Error(`CIFAR-10 file ${name} record ${r} has label ${label}, expected 0-9 (corrupt file): ${fix}`);
    }
  }
}

/**
 * The .bin files of the official tarball (a gzip stream): gunzipped (DecompressionStream, in a browser too), untarred,
 * and only the files directly inside cifar-10-batches-bin/ kept (this also rules out "../" tricks). `what` names the
 * tarball in the error lines, `fix` ends them.
 */
export async function unpackCifarTarball(gz: ReadableStream<Uint8Array<ArrayBuffer>>, what: string, fix: string) {
  let files: { name: string; data: Uint8Array }[];
  try {
    files = untar(await new Response(gz.pipeThrough(new DecompressionStream("gzip"))).bytes());
  } catch (e) {
    throw new Error(`could not unpack ${what} (${errorText(e)}): ${fix}`);
  }
  const wanted = new Map<string, Uint8Array>();
  for (const { name, data } of files) {
    const m = name.replace(/^\.\//, "").match(/^cifar-10-batches-bin\/([^/]+)$/);
    if (m && m[1] !== "." && m[1] !== "..") wanted.set(m[1], data);
  }
  for (const file of [...CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE]) {
    const size = wanted.get(file)?.length;
    if (size !== FILE_BYTES) {
      const has = size === undefined ? "lacks" : `has a ${size}-byte`;
      throw new Error(`${what} ${has} ${DATA_FOLDER}/${file} (expected ${FILE_BYTES} bytes): ${fix}`);
    }
  }
  return wanted;
}

/**
 * CIFAR-10 from the official tarball as a Blob (the page's file picker): its md5 checked against the published one,
 * then unpacked and read as loadCifar10 reads a folder. No file system: the browser's way in.
 */
export async function cifarFromTarball(
  tarball: Blob & { name?: string },
  opts: { trainSubset?: number; testSubset?: number; md5?: string },
): Promise<Cifar10> {
  const what = tarball.name || "the chosen file", expected = opts.md5 ?? CIFAR10_MD5;
  const fix = `choose the official ${CIFAR10_URL.split("/").pop()}, from ${CIFAR10_URL}`;
  const hash = new Md5(), reader = tarball.stream().getReader(); // (Safari's streams are not async-iterable)
  for (let r = await reader.read(); !r.done; r = await reader.read()) hash.update(r.value);
  const md5 = hash.hex();
  if (md5 !== expected) {
    throw new Error(`${what} has md5 ${md5}, expected ${expected} (not the CIFAR-10 tarball): ${fix}`);
  }
  const files = await unpackCifarTarball(tarball.stream(), what, fix);
  return await cifarRecords(
    (file) => Promise.resolve({ name: `${DATA_FOLDER}/${file} in ${what}`, bytes: files.get(file)! }),
    opts,
    fix,
  );
}

// Minimal tar reader (ustar + GNU), enough for the CIFAR-10 tarball. Returned
// data are views into `bytes` so the ~180 MB archive is not copied twice.
export function untar(bytes: Uint8Array): { name: string; data: Uint8Array }[] {
  const text = (h: Uint8Array, at: number, len: number) => {
    const field = h.subarray(at, at + len), end = field.indexOf(0);
    return new TextDecoder().decode(end < 0 ? field : field.subarray(0, end));
  };
  const octal = (h: Uint8Array, at: number, len: number) => parseInt(text(h, at, len).trim() || "0", 8);
  const files: { name: string; data: Uint8Array }[] = [];
  let longName: string | undefined; // GNU 'L' entries carry the next entry's long name
  for (let off = 0;;) {
    if (off + 512 > bytes.length) {
      throw new Error("tar archive is truncated (no end-of-archive marker)");
    }
    const h = bytes.subarray(off, off + 512);
    if (h.every((b) => b === 0)) return files; // end-of-archive (two zero blocks; the first suffices)
    // The checksum is the sum of all header bytes with the checksum field itself read as spaces.
    let sum = 0;
    for (let i = 0; i < 512; i++) sum += i >= 148 && i < 156 ? 32 : h[i];
    if (octal(h, 148, 8) !== sum) {
      throw new Error(
        `tar archive has a bad header checksum at byte ${off} (corrupt archive)`,
      );
    }
    const size = octal(h, 124, 12), type = String.fromCharCode(h[156]);
    if (!Number.isSafeInteger(size)) {
      throw new Error(
        `tar archive has a bad size field at byte ${off} (corrupt archive)`,
      );
    }
    let name = text(h, 0, 100);
    const prefix = text(h, 257, 6).startsWith("ustar") ? text(h, 345, 155) : "";
    if (prefix) name = `${prefix}/${name}`;
    off += 512;
    if (off + size > bytes.length) {
      throw new Error(`tar archive is truncated inside ${name}`);
    }
    const data = bytes.subarray(off, off + size);
    off += Math.ceil(size / 512) * 512;
    if (type === "L") {
      longName = text(data, 0, data.length);
      continue;
    }
    if (type === "0" || type === "\0" || type === "7") {
      files.push({ name: longName ?? name, data });
    }
    longName = undefined; // directories, links and pax headers ('x', 'g') are skipped
  }
}

/**
 * Download limits: a server silent for `stallMs` fails the download, so does a body over `maxBytes`, and so does one
 * that brings under `minRate` bytes/s over any `windowMs` of the body (a trickle that never stalls for `stallMs`).
 * 170 MB at 10 kB/s takes under 5 hours: no honest link is that slow.
 */
export const DOWNLOAD_LIMITS = {
  stallMs: 30_000,
  maxBytes: 200_000_000, // the official tarball: 170,498,071 bytes
  minRate: 10_000,
  windowMs: 60_000,
};
const TMP_PREFIXES = [`.${DATA_FOLDER}.tmp-`, ".cifar-10-binary.tar.gz.tmp-"]; // then <pid>-<random>

export async function resolveCifar10Dir(opts: {
  dir?: string;
  cacheDir: string;
  url?: string;
  md5?: string;
  log?: (s: string) => void;
  /** Redraw one progress line with "\r" (a terminal); else a line at the start and one at the end (a piped log). */
  live?: boolean;
  limits?: Partial<typeof DOWNLOAD_LIMITS>;
}): Promise<string> {
  if (opts.dir) return opts.dir; // validated by loadCifar10
  const { cacheDir, url = CIFAR10_URL, md5 = CIFAR10_MD5, live = Deno.stdout.isTerminal() } = opts;
  const limits = { ...DOWNLOAD_LIMITS, ...opts.limits };
  const log = opts.log ?? ((s: string) => Deno.stdout.writeSync(new TextEncoder().encode(s)));
  const finalDir = join(cacheDir, DATA_FOLDER);
  if (await exists(finalDir)) return finalDir;
  const created = !(await exists(cacheDir));
  try {
    await Deno.mkdir(cacheDir, { recursive: true });
  } catch (e) {
    throw new Error(`could not create ${cacheDir} (${errorText(e)}): check its permissions, or ${USE_DATA}`);
  }
  await removeAbandonedTemps(cacheDir);

  // The tarball streams to a temporary file (never whole in memory), checked, then unpacked into a temporary folder
  // that is renamed into place: a failure or a kill at any point leaves no cifar-10-batches-bin that looks valid.
  const unique = uniqueSuffix();
  const tarGz = join(cacheDir, `${TMP_PREFIXES[1]}${unique}`), tmp = join(cacheDir, `${TMP_PREFIXES[0]}${unique}`);
  try {
    // A cache folder that takes no new file fails here, before any connection, and not as a network error.
    try {
      await Deno.writeFile(tarGz, new Uint8Array(0), { createNew: true });
      await Deno.remove(tarGz);
    } catch (e) {
      throw new Error(
        `cannot write into the CIFAR-10 cache folder ${cacheDir} (${errorText(e)}): make it writable, or ${USE_DATA}`,
      );
    }
    const { md5: got, gzipped } = await download(url, tarGz, log, limits, live);
    // Asked for the bytes as stored, a server may still send "Content-Encoding: gzip": the tarball gzipped once more,
    // or the tarball itself labelled so (a static file's metadata). Whichever of the two has the md5 is the tarball.
    const twice = gzipped && got !== md5 && (await gunzipFile(tarGz).then(md5Of).catch(() => "")) === md5;
    if (got !== md5 && !twice) {
      throw new Error(
        `downloaded file has md5 ${got}, expected ${md5}: the download is corrupt or ${url} serves a different file; retry, or ${USE_DATA}`,
      );
    }
    const wanted = await unpackCifarTarball(
      twice ? await gunzipFile(tarGz) : (await Deno.open(tarGz)).readable,
      `the archive from ${url}`,
      `retry the download, or ${USE_DATA}`,
    );
    try {
      await Deno.mkdir(tmp, { mode: 0o777 }); // the umask applies: an ordinary folder, as `mkdir` makes
      for (const [file, data] of wanted) await Deno.writeFile(join(tmp, file), data);
      await Deno.rename(tmp, finalDir);
    } catch (e) {
      if (await exists(finalDir)) return finalDir; // another process finished the same download first
      throw new Error(
        DISK_FULL.test(errorText(e))
          ? `disk full writing CIFAR-10 into ${cacheDir}: free some space, or ${USE_DATA}`
          : `could not write CIFAR-10 into ${cacheDir} (${
            errorText(e)
          }): check disk space and permissions, or ${USE_DATA}`,
      );
    }
    return finalDir;
  } finally {
    await Deno.remove(tarGz).catch(() => {});
    await Deno.remove(tmp, { recursive: true }).catch(() => {});
    if (created) await Deno.remove(cacheDir).catch(() => {}); // only if still empty: a failed first download
  }
}

/**
 * Removes the temporary files and folders of downloads and unpacks that a killed process left in `cacheDir`:
 * those of a process no longer running (on Linux, where /proc tells), else those untouched for an hour.
 */
async function removeAbandonedTemps(cacheDir: string) {
  for await (const e of Deno.readDir(cacheDir)) {
    const prefix = TMP_PREFIXES.find((p) => e.name.startsWith(p));
    if (!prefix) continue;
    const path = join(cacheDir, e.name), pid = Number(e.name.slice(prefix.length).split("-")[0]);
    const running = Deno.build.os === "linux" ? pid === Deno.pid || (await exists(`/proc/${pid}`)) : undefined;
    const old = Date.now() - ((await Deno.stat(path)).mtime?.getTime() ?? 0) > 3_600_000;
    if (running === false || old) await Deno.remove(path, { recursive: true }).catch(() => {});
  }
}

/** The md5 of a stream, and a file's bytes gunzipped (a reply gzipped although asked for the bytes as stored). */
const md5Of = async (stream: ReadableStream<Uint8Array>) => {
  const hash = new Md5();
  for await (const chunk of stream) hash.update(chunk);
  return hash.hex();
};
const gunzipFile = async (path: string) =>
  (await Deno.open(path)).readable.pipeThrough(new DecompressionStream("gzip"));

/**
 * Streams `url` into a new file `path`, printing progress, and returns the md5 of what it wrote, and whether the
 * server sent it gzip-encoded. A server that sends nothing for `limits.stallMs` (before the headers or mid-body),
 * under `limits.minRate` bytes/s over a `limits.windowMs` of the body, or more than `limits.maxBytes`, fails it with
 * one line, which starts on a line of its own. `live`: a progress line redrawn with "\r" (a terminal), else one
 * line at the start and one at the end (a piped log gets no "\r").
 */
async function download(
  url: string,
  path: string,
  log: (s: string) => void,
  limits: typeof DOWNLOAD_LIMITS,
  live: boolean,
): Promise<{ md5: string; gzipped: boolean }> {
  const fail = (reason: string) =>
    new Error(`could not download CIFAR-10 from ${url} (${reason}): check your network, or ${USE_DATA}`);
  const name = url.split("/").pop(), label = `\rdownloading ${name}: `;
  const mb = (n: number) => (n / 1e6).toFixed(1);
  const giveUp = new AbortController();
  let why = ""; // the limit that aborted the fetch
  const abort = (reason: string) => (why = reason, giveUp.abort());
  let timer: ReturnType<typeof setTimeout> | undefined, got = 0, lastLog = 0, total = 0;
  let rateTimer: ReturnType<typeof setInterval> | undefined, windowStart = 0;
  const awake = () => {
    clearTimeout(timer);
    timer = setTimeout(() => abort(`no data for ${limits.stallMs / 1000} s`), limits.stallMs);
  };
  const progress = (end = "") => log(label + (total ? `${mb(got)} / ${mb(total)} MB` : `${mb(got)} MB`) + end);
  const hash = new Md5(), started = performance.now();
  let file: Deno.FsFile | undefined;
  try {
    if (!live) log(`downloading ${name} from ${url} ...\n`);
    awake();
    // "identity": the tarball as stored. Offered gzip, a server may gzip it once more, and fetch would undo that: more
    // bytes would arrive than Content-Length counts, and a sound download would fail as "connection closed".
    const res = await fetch(url, { signal: giveUp.signal, headers: { "accept-encoding": "identity" } });
    if (res.status !== 200 || !res.body) {
      await res.body?.cancel();
      throw fail(`HTTP ${res.status} ${res.statusText}`.trim());
    }
    total = Number(res.headers.get("content-length")) || 0;
    if (total > limits.maxBytes) {
      throw fail(`the server announces ${total} bytes, more than the ${limits.maxBytes} expected`);
    }
    // Content-Length counts the bytes as sent, not as a fetch that decodes them (despite "identity") hands them over:
    // then no count is compared, and the md5 still checks what was written.
    const encoding = res.headers.get("content-encoding")?.trim().toLowerCase() ?? "";
    if (encoding && encoding !== "identity") total = 0;
    rateTimer = setInterval(() => {
      if (got - windowStart < (limits.minRate * limits.windowMs) / 1000) {
        abort(`under ${limits.minRate / 1000} kB/s for ${limits.windowMs / 1000} s`);
      }
      windowStart = got;
    }, limits.windowMs);
    file = await Deno.open(path, { write: true, createNew: true });
    for await (const chunk of res.body) {
      awake();
      got += chunk.length;
      if (got > limits.maxBytes) throw fail(`more than ${limits.maxBytes} bytes: not the CIFAR-10 tarball`);
      hash.update(chunk);
      for (let at = 0; at < chunk.length;) at += await file.write(chunk.subarray(at));
      if (live && Date.now() - lastLog > 250) {
        lastLog = Date.now();
        progress();
      }
    }
    if (total && got !== total) throw fail(`connection closed after ${got} of ${total} bytes`);
    if (live) progress("\n");
    else log(`downloaded ${name}: ${mb(got)} MB in ${((performance.now() - started) / 1000).toFixed(0)} s\n`);
    return { md5: hash.hex(), gzipped: /^(x-)?gzip$/.test(encoding) };
  } catch (e) {
    if (lastLog) log("\n"); // the error line must not be glued to the progress line
    if (why) throw fail(why);
    if (errorText(e).startsWith("could not download")) throw e;
    throw DISK_FULL.test(errorText(e)) ? new Error(writeFailure(path, e)) : fail(errorText(e));
  } finally {
    clearTimeout(timer);
    clearInterval(rateTimer);
    file?.close();
  }
}

/**
 * MD5 (RFC 1321), fed chunk by chunk: the tarball's published checksum. Written out because browsers offer no MD5
 * (crypto.subtle has none), so the same check can run in a page.
 */
export class Md5 {
  private h = Uint32Array.from([0x67452301, 0xefcdab89, 0x98badcfe, 0x10325476]);
  private block = new Uint8Array(64);
  private filled = 0; // bytes waiting in `block`
  private length = 0; // bytes fed in all
  update(data: Uint8Array): this {
    this.length += data.length;
    let at = 0;
    while (at < data.length) {
      const n = Math.min(64 - this.filled, data.length - at);
      this.block.set(data.subarray(at, at + n), this.filled);
      this.filled += n;
      at += n;
      if (this.filled === 64) this.compress();
    }
    return this;
  }
  /** The digest in hex; the hash is used up. */
  hex(): string {
    const bits = this.length * 8;
    this.update(Uint8Array.of(0x80));
    while (this.filled !== 56) this.update(Uint8Array.of(0));
    const tail = new DataView(new ArrayBuffer(8));
    tail.setUint32(0, bits >>> 0, true);
    tail.setUint32(4, Math.floor(bits / 2 ** 32), true);
    this.update(new Uint8Array(tail.buffer));
    const out = new DataView(new ArrayBuffer(16));
    this.h.forEach((word, i) => out.setUint32(4 * i, word, true));
    return hex(new Uint8Array(out.buffer));
  }
  private compress() {
    const m = new DataView(this.block.buffer), h = this.h;
    let [a, b, c, d] = h;
    for (let i = 0; i < 64; i++) {
      const round = i >> 4;
      const f = round === 0
        ? (b & c) | (~b & d)
        : round === 1
        ? (d & b) | (~d & c)
        : round === 2
        ? b ^ c ^ d
        : c ^ (b | ~d);
      const g = round === 0 ? i : round === 1 ? (5 * i + 1) % 16 : round === 2 ? (3 * i + 5) % 16 : (7 * i) % 16;
      const x = (a + f + MD5_K[i] + m.getUint32(4 * g, true)) >>> 0, s = MD5_S[4 * round + (i % 4)];
      [a, d, c, b] = [d, c, b, (b + ((x << s) | (x >>> (32 - s)))) >>> 0];
    }
    [h[0], h[1], h[2], h[3]] = [h[0] + a, h[1] + b, h[2] + c, h[3] + d];
    this.filled = 0;
  }
}
/** Bytes as lowercase hex (digests). */
const hex = (bytes: Uint8Array) => Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
/** This process's id and a random number: a temp name no other run (or earlier run of ours) picks. */
const uniqueSuffix = () => `${Deno.pid}-${crypto.getRandomValues(new Uint32Array(1))[0].toString(16)}`;
const MD5_K = Uint32Array.from({ length: 64 }, (_, i) => Math.floor(Math.abs(Math.sin(i + 1)) * 2 ** 32));
const MD5_S = [7, 12, 17, 22, 5, 9, 14, 20, 4, 11, 16, 23, 6, 10, 15, 21];

async function exists(path: string): Promise<boolean> {
  try {
    await Deno.stat(path);
    return true;
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return false;
    throw e;
  }
}

export function channelStats(images: Uint8Array): ChannelStats {
  const pixels = IMAGE_SIDE * IMAGE_SIDE, n = (images.length / IMAGE_BYTES) * pixels;
  const mean: number[] = [], std: number[] = [];
  for (let c = 0; c < 3; c++) {
    let sum = 0, sumSq = 0; // exact integers: 50,000 images x 1024 x 255^2 < 2^53
    for (let i = c * pixels; i < images.length; i += IMAGE_BYTES) {
      for (let p = i; p < i + pixels; p++) {
        sum += images[p];
        sumSq += images[p] * images[p];
      }
    }
    if (sumSq * n === sum * sum) {
      throw new Error(
        `every training pixel of channel ${c} has the same value: the dataset is corrupt, delete it or pass another --data`,
      );
    }
    mean.push(sum / n / 255);
    std.push(Math.sqrt((sumSq - (sum * sum) / n) / (n - 1)) / 255);
  }
  return { mean, std };
}

export function uploadImages(gpu: Gpu, images: Uint8Array, labels: Uint8Array): GpuImages {
  const count = labels.length;
  const imagesPerPart = Math.max(1, Math.min(count, Math.floor(gpu.limits.maxBinding / IMAGE_BYTES)));
  if (count > 2 * imagesPerPart) throw new Error(`${count} images do not fit in two GPU bindings: use --train-subset`);
  const part = (from: number, to: number) => {
    const bytes = images.subarray(from * IMAGE_BYTES, to * IMAGE_BYTES) as Uint8Array<ArrayBuffer>;
    const buffer = createBuffer(gpu, bytes.length);
    if (bytes.length) gpu.device.queue.writeBuffer(buffer, 0, bytes);
    return buffer;
  };
  const labelBuffer = createBuffer(gpu, count * 4);
  gpu.device.queue.writeBuffer(labelBuffer, 0, Uint32Array.from(labels));
  return {
    part0: part(0, Math.min(count, imagesPerPart)),
    part1: part(Math.min(count, imagesPerPart), count),
    imagesPerPart,
    count,
    labels: labelBuffer,
  };
}

/** The dataset as training sees it: raw bytes on the GPU, normalised there with these statistics. */
export interface GpuData {
  train: GpuImages;
  test: GpuImages;
  norm: ChannelStats; // training-set statistics, used for both splits
  whitening?: Map<string, Float32Array>; // whitening conv weights, computed once per dataset and recipe (train)
}

/** The dataset on the GPU, normalised as the recipe says: its own statistics (airbench94), or the training set's. */
export function uploadDataset(gpu: Gpu, cifar: Cifar10, h: Hyp = hyp): GpuData {
  return {
    train: uploadImages(gpu, cifar.trainImages, cifar.trainLabels),
    test: uploadImages(gpu, cifar.testImages, cifar.testLabels),
    norm: h.net.imageStats ?? channelStats(cifar.trainImages),
  };
}

// =================================================================================================
// 8. Printing: the hlb-CIFAR10 table, updated in place on a terminal
// =================================================================================================

export const COLUMNS = ["epoch", "train_loss", "val_loss", "train_acc", "val_acc", "ema_val_acc", "total_time_seconds"];

/** One table row as the original prints it: integers as is, floats with 4 decimals, blanks for missing. */
export function formatRow(values: (number | null)[]): string {
  const cells = values.map((v, i) => {
    const text = v === null ? "" : Number.isInteger(v) && i === 0 ? String(v) : v.toFixed(4);
    return `|  ${text.padStart(COLUMNS[i].length)}  `;
  });
  return cells.join("") + "|";
}

export function tableHeader(): string {
  const head = COLUMNS.map((c) => `|  ${c}  `).join("") + "|", bar = "-".repeat(head.length);
  return `${bar}\n${head}\n${bar}`;
}

/** The line under a run's table, the title above it, and the live step line (the terminal's and the page's). */
export const tableRule = () => "-".repeat(tableHeader().indexOf("\n"));
export const runTitle = (run: number, runs: number, seed: number) => `run ${run}/${runs}, seed ${seed}`;
/**
 * How long a run has left, from what it measured: the time per step (over the steps finished at the last epoch end,
 * and over the steps submitted but the last: the larger of the two, as the GPU lags its submits by up to
 * STEPS_IN_FLIGHT steps) and the time per evaluation (the epochs evaluated so far). `run` is a
 * whole run's time at that pace; `partial` says no evaluation was timed yet, so `seconds` leaves it out. Null until a
 * step was timed.
 */
export function timeLeft(p: Progress): { seconds: number; run: number; partial: boolean } | null {
  const finished = p.stepsDone - 1, rates: number[] = [];
  if (p.synced.steps > 0) rates.push(p.synced.seconds / p.synced.steps);
  if (finished > 0) rates.push(p.trainSeconds / finished);
  if (!rates.length) return null;
  const perStep = Math.max(...rates), perEval = p.evaluated ? p.evalSeconds / p.evaluated : 0;
  return {
    seconds: perStep * (p.totalSteps - finished) + perEval * (p.numEpochs - p.epoch),
    run: perStep * p.totalSteps + perEval * p.numEpochs,
    partial: p.evaluated === 0,
  };
}

/** 42 s, 12 min 5 s, 3 h 10 min. */
export function durationText(seconds: number): string {
  const s = Math.round(seconds);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
}

/** The live line: the epoch's steps, the time so far and, once a step was timed, the time left (`runsAfter` more). */
export function stepText(p: Progress, runsAfter = 0): string {
  const head = `training epoch ${p.epoch}: ${p.step}/${p.steps} steps submitted | ${
    durationText(p.wallSeconds)
  } elapsed`;
  const left = timeLeftText(p, runsAfter);
  return left ? `${head} | ${left}` : head;
}

/** timeLeft in words (the terminal's live line, the page's run bar); "" until a step was timed. */
export function timeLeftText(p: Progress, runsAfter = 0): string {
  const left = timeLeft(p);
  if (!left) return "";
  const all = runsAfter > 0
    ? `, ${durationText(left.seconds + runsAfter * left.run)} for all ${runsAfter + 1} runs`
    : "";
  const run = left.partial
    ? `over ${durationText(left.seconds)} left (evaluation not timed yet)`
    : `about ${durationText(left.seconds)} left`;
  return run + all;
}

export const rowValues = (m: EpochMetrics) => [
  m.epoch,
  m.trainLoss,
  m.valLoss,
  m.trainAcc,
  m.valAcc,
  m.emaValAcc,
  m.totalTimeSeconds,
];

/**
 * Prints a line: a write that fails never throws (a run keeps its outputs whatever becomes of its terminal). After a
 * hangup (SIGHUP: a closed terminal, a dropped ssh) writes fail and are dropped; the first failure of any kind (stdout
 * on a full disk, a closed terminal) is kept in OUTPUT.failed: it stops a run as a signal does (see listenForStop).
 */
export function say(text: string, stream: "stdout" | "stderr" = "stdout") {
  try {
    if (stream === "stdout") console.log(text);
    else console.error(text);
  } catch (e) {
    OUTPUT.failed ??= `could not print to ${stream} (${errorText(e)})`;
  }
}
export const sayErr = (text: string) => say(text, "stderr");
export const OUTPUT: { failed?: string } = {};

/**
 * Prints rows; on a terminal a live "training epoch N: step k/K" line stands where the next row
 * will appear. It counts submitted steps, so it costs no GPU round trip; the GPU may lag behind it.
 */
class Table {
  private live = Deno.stdout.isTerminal();
  private lastDraw = 0;
  header() {
    say(tableHeader());
  }
  private status(text: string) {
    try {
      Deno.stdout.writeSync(new TextEncoder().encode(`\r\x1b[2K|  ${text}`));
    } catch (e) {
      OUTPUT.failed ??= `could not print to stdout (${errorText(e)})`;
    }
    this.lastDraw = performance.now();
  }
  epochStart(epoch: number) {
    if (this.live) this.status(`training epoch ${epoch} ...`);
  }
  step(p: Progress, runsAfter: number) {
    // at most ~10 redraws a second, and always the epoch's last step
    if (!this.live || (p.step < p.steps && performance.now() - this.lastDraw < 100)) return;
    this.status(stepText(p, runsAfter));
  }
  /** A line of its own above the live line (which is drawn again at the next step). */
  note(text: string) {
    say((this.live ? "\r\x1b[2K" : "") + text);
  }
  row(m: EpochMetrics) {
    say((this.live ? "\r\x1b[2K" : "") + formatRow(rowValues(m)));
  }
  end() {
    say(tableRule());
  }
}

export const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / xs.length;
export const sampleStd = (xs: number[]) => {
  const m = mean(xs);
  return xs.length < 2 ? 0 : Math.sqrt(xs.reduce((a, x) => a + (x - m) ** 2, 0) / (xs.length - 1));
};

// =================================================================================================
// 9. Run logs and saved weights
// =================================================================================================

/** Writes next to the target, then renames: an interrupted run never leaves a half-written file. */
export const writeFileAtomic = (path: string, text: string) => writeBytesAtomic(path, new TextEncoder().encode(text));

/**
 * Writes `bytes` to `path` through a temporary file beside the target and a rename, so that an interrupted run never
 * leaves a half-written file. A symlink is written through (the file it points to is replaced); a folder, device or
 * FIFO is refused with one line, never replaced by a file.
 */
export async function writeBytesAtomic(path: string, bytes: Uint8Array) {
  const target = await fileTarget(path);
  const tmp = `${target}.tmp-${uniqueSuffix()}`;
  WRITES_IN_FLIGHT.add(tmp);
  try {
    await Deno.writeFile(tmp, bytes);
    await Deno.rename(tmp, target);
  } catch (e) {
    await Deno.remove(tmp).catch(() => {});
    throw new Error(writeFailure(path, e));
  } finally {
    WRITES_IN_FLIGHT.delete(tmp);
  }
}
/** The temporary files of writeBytesAtomic now being written: a second Ctrl-C removes them as it quits. */
const WRITES_IN_FLIGHT = new Set<string>();

/** How the OS says a write failed for want of space (Linux and macOS message, errno 28). */
const DISK_FULL = /No space left on device|os error 28|ENOSPC/i;

/** The line for a failed write: disk full says so; anything else names the folder to check. */
export function writeFailure(path: string, e: unknown): string {
  const why = errorText(e);
  if (DISK_FULL.test(why)) return `disk full writing ${path}: free some space`;
  return `could not write ${path} (${why}): check the folder exists and is writable`;
}

/**
 * Where a write to `path` lands: `path` itself, or the file its symlinks lead to (which need not exist yet). A
 * folder, device, FIFO or socket there is refused with one line.
 */
export async function fileTarget(path: string): Promise<string> {
  let target = path;
  for (let hops = 0; hops < 40; hops++) {
    let info: Deno.FileInfo;
    try {
      info = await Deno.lstat(target);
    } catch (e) {
      if (e instanceof Deno.errors.NotFound) return target; // a new file (or a dangling link's target)
      throw new Error(`cannot use ${path} (${errorText(e)}): check the path`);
    }
    if (info.isSymlink) {
      const link = await Deno.readLink(target);
      target = isAbsolute(link) ? link : join(dirname(target), link);
      continue;
    }
    if (info.isDirectory) throw new Error(`${path} is a folder: name a file in it instead`);
    if (!info.isFile) throw new Error(`${path} is not a regular file (a device, FIFO or socket): name a file`);
    return target;
  }
  throw new Error(`${path} is a loop of symlinks: name a file`);
}

/**
 * Checks before training that `path` can be written (its folder exists and takes a new file, it is no folder,
 * device or FIFO), so that hours of training never end in an output that cannot be saved. `flag` names it.
 */
export async function checkWritableFile(flag: string, path: string) {
  let target: string;
  try {
    target = await fileTarget(path);
  } catch (e) {
    throw new Error(`${flag} ${errorText(e)}`);
  }
  await checkWritableFolder(flag, dirname(target), `${flag} ${path}: its folder`, false);
}

/**
 * Checks that `dir` takes a new file, by writing and removing one. With `create` a missing `dir` is fine if it can be
 * created (whatever this creates, it removes again); without, it must exist.
 */
export async function checkWritableFolder(flag: string, dir: string, what = `${flag} ${dir}`, create = true) {
  let missing: string | undefined; // the outermost folder of `dir` that does not exist yet
  try {
    for (let d = resolve(dir); !(await exists(d)); d = dirname(d)) missing = d;
  } catch (e) {
    if (e instanceof Deno.errors.FilesystemLoop) throw new Error(`${what} is a loop of symlinks: name another folder`);
    throw new Error(`${what} cannot be used (${errorText(e)}): name another folder`);
  }
  if (missing && !create) throw new Error(`${what} ${missing} does not exist`);
  try {
    await Deno.mkdir(dir, { recursive: true });
    await Deno.remove(await Deno.makeTempFile({ dir, prefix: ".write-check-" }));
  } catch (e) {
    const why = e instanceof Deno.errors.AlreadyExists || e instanceof Deno.errors.NotADirectory
      ? "not a folder"
      : errorText(e);
    throw new Error(`${what} cannot be written (${why}): name another, or fix its permissions`);
  } finally {
    if (missing) await Deno.remove(missing, { recursive: true }).catch(() => {});
  }
}

/** What the header line says about --precision. */
const precisionText = (p: DType) =>
  p === "f16" ? "f16 activations and gradients, f32 arithmetic and weights" : "f32 everywhere";

/** How a run ended: "running" while it trains (the log is rewritten after every epoch and every run). */
export type RunStatus = "running" | "completed" | "interrupted" | "diverged" | "failed";

/** The run in progress (status "running"), or the one that ended the log early ("diverged", "failed"). */
export interface PartialRun {
  run: number; // 1-based
  seed: number;
  epochs: EpochMetrics[]; // the rows it printed so far
  error?: string; // why it ended
  epoch?: number; // diverged: in which epoch, and the first step whose loss was not finite (if the GPU flagged it)
  step?: number;
}

/**
 * sha256 in hex, web-standard (the browser page computes its run log with it too). Remembered per text: a run log is
 * rewritten after every epoch with the same script and kernels.
 */
function sha256(text: string): Promise<string> {
  let digest = SHA256_SEEN.get(text);
  if (!digest) {
    digest = crypto.subtle.digest("SHA-256", new TextEncoder().encode(text))
      .then((d) => hex(new Uint8Array(d)));
    SHA256_SEEN.set(text, digest);
  }
  return digest;
}
const SHA256_SEEN = new Map<string, Promise<string>>();

/**
 * The run log's content: what a later comparison needs to trust a result (the exact script and kernels by sha256,
 * the script's text, hyperparameters, flags, device, runtime, every epoch's metrics). A kernel's sha256 is of its
 * text as compiled (the file from gpu.kernelDir, then common.wgsl). The same in a terminal and in a browser tab.
 */
export async function runLogContent(x: {
  gpu: Pick<Gpu, "kernelDir" | "sources" | "adapterName" | "convKernels" | "convChoice" | "limits" | "memory">;
  flags: CliOptions;
  runs: RunResult[];
  startedAt: Date;
  script: { path: string; source: string };
  runtime: unknown; // Deno.version, or the browser's user agent
  status: RunStatus;
  partial?: PartialRun;
  resumed?: unknown; // --resume: the checkpoint, and the run and epoch it continued from
}) {
  const kernels = Object.entries(await kernelHashes(x.gpu));
  return {
    status: x.status,
    startedAt: x.startedAt.toISOString(),
    finishedAt: x.status === "running" ? null : new Date().toISOString(),
    script: { path: x.script.path, sha256: await sha256(x.script.source), source: x.script.source },
    kernelDir: x.gpu.kernelDir,
    kernels: Object.fromEntries(kernels), // as compiled
    deno: x.runtime,
    device: x.gpu.adapterName,
    precision: x.flags.precision,
    convKernels: x.gpu.convKernels,
    convChoice: x.gpu.convChoice ?? null,
    // what the run planned for (a tensor over a binding runs in slices), and the most its buffers ever held
    limits: x.gpu.limits,
    peakGpuBytes: x.gpu.memory.peak,
    flags: { ...x.flags, help: undefined, explicit: undefined },
    hyp: RECIPES[x.flags.recipe],
    runs: x.runs.map(({ weights: _, ...r }) => r),
    partial: x.partial ?? null,
    resumed: x.resumed ?? null,
    ...emaStats(x.runs),
  };
}

/** The mean and std of the EMA val accuracies of `runs` (those that have one; null if none): run logs and --json. */
function emaStats(runs: RunResult[]) {
  const accs = runs.filter((r) => !r.interrupted).map((r) => r.emaValAcc).filter((a): a is number => a !== null);
  return { meanEmaValAcc: accs.length ? mean(accs) : null, stdEmaValAcc: accs.length ? sampleStd(accs) : null };
}

/**
 * Writes the run log of this script (see runLogContent). Without `at.path` it creates a new file
 * <date>-<time>-<first 8 hex of the script's sha256>[-k].json in `dir`, exclusively (two runs started in the same
 * second get two files); with it, it rewrites that file atomically.
 */
export async function writeRunLog(
  dir: string,
  gpu: Gpu,
  flags: CliOptions,
  runs: RunResult[],
  startedAt: Date,
  at: { path?: string; status?: RunStatus; partial?: PartialRun; resumed?: unknown } = {},
) {
  const status = at.status ?? (runs.some((r) => r.interrupted) ? "interrupted" : "completed");
  const script = { path: fileURLToPath(import.meta.url), source: await scriptSource() };
  const log = await runLogContent({ gpu, flags, runs, startedAt, script, runtime: Deno.version, status, ...at });
  return await writeLogFile(dir, log, startedAt, at.path);
}

/** This script's text as it was when first asked for (a run log describes the script that started the run). */
function scriptSource(): Promise<string> {
  return SCRIPT_SOURCE.text ??= Deno.readTextFile(fileURLToPath(import.meta.url));
}
const SCRIPT_SOURCE: { text?: Promise<string> } = {};

/**
 * Writes a run log object: to `path`, or to a new file in `dir` named after its start and script (see writeRunLog).
 * A running log ends in LOG_SLACK spaces (JSON allows them): on a full disk, where the atomic rewrite cannot make its
 * copy, the log is rewritten in place within its own size, so that its final state still reaches it.
 */
async function writeLogFile(
  dir: string,
  log: { script: { sha256: string }; status?: RunStatus },
  startedAt: Date,
  path?: string,
) {
  const text = JSON.stringify(log, null, 1) + "\n" + (log.status === "running" ? " ".repeat(LOG_SLACK) + "\n" : "");
  if (path) {
    try {
      await writeFileAtomic(path, text);
    } catch (e) {
      if (!errorText(e).startsWith("disk full")) throw e; // writeFailure's line for a full disk
      await rewriteInPlace(path, text.trimEnd() + "\n");
    }
    return path;
  }
  await Deno.mkdir(dir, { recursive: true }).catch((e) => {
    throw new Error(`could not create the log folder ${dir} (${errorText(e)}): pass --log-dir DIR or --no-log`);
  });
  const stamp = startedAt.toISOString().replace(/[-:]/g, "").replace("T", "-").slice(0, 15); // 20261127-184216
  for (let k = 1;; k++) {
    const file = join(dir, `${stamp}-${log.script.sha256.slice(0, 8)}${k > 1 ? `-${k}` : ""}.json`);
    try {
      (await Deno.open(file, { write: true, createNew: true })).close(); // ours alone from here on
    } catch (e) {
      if (e instanceof Deno.errors.AlreadyExists) continue;
      throw new Error(writeFailure(file, e));
    }
    await writeFileAtomic(file, text);
    return file;
  }
}

// Room for a run's final state in a running log (a row of JSON metrics is ~300 bytes; a run's result about as many).
const LOG_SLACK = 16384;

/**
 * Rewrites `path` in place with `text`, padded with spaces to the file's size: no new space is needed. A text longer
 * than the file is not written (half of it would leave no JSON at all): the file is then stale, and the error says so.
 */
async function rewriteInPlace(path: string, text: string) {
  const stale = (why: string) =>
    new Error(`disk full: the run log ${path} is stale (it still says "running"; ${why}): free some space`);
  const file = await Deno.open(path, { write: true });
  try {
    const size = (await file.stat()).size, bytes = new TextEncoder().encode(text);
    if (bytes.length > size) throw stale("its final state is larger than the room kept for it");
    const padded = new Uint8Array(size).fill(0x20);
    padded.set(bytes);
    padded[size - 1] = 0x0a;
    for (let at = 0; at < size;) at += await file.write(padded.subarray(at));
    await file.sync();
  } catch (e) {
    throw errorText(e).startsWith("disk full: the run log") ? e : stale(errorText(e));
  } finally {
    file.close();
  }
}

// ---- saved weights: the safetensors format (8-byte little-endian header length, JSON header, raw data)

type Weights = Map<string, { shape: number[]; data: Float32Array }>;

/**
 * What a saved network carries besides its tensors (safetensors metadata, strings), so that --eval needs nothing
 * else: the normalisation statistics of the images it trained on, its base depth, the recipe it came from, and the
 * batch size and precision of the run's own evaluation (the defaults of --eval, which then prints the same figures).
 */
export const SAVED_FORMAT = "hlb-cifar10-webgpu";
export const RECIPE_VERSION = "hlb-CIFAR10 v0.7";
export interface SavedMetadata {
  format: string;
  layout: string;
  recipe: string;
  baseDepth: string;
  norm: string; // JSON ChannelStats
  evalBatchSize: string;
  precision: string;
}

export function savedMetadata(
  norm: ChannelStats,
  baseDepth: number,
  batchSize: number,
  precision: DType,
  h: Hyp = hyp,
): SavedMetadata {
  return {
    format: SAVED_FORMAT,
    layout: "conv weights HWIO [kh][kw][cin][cout], linear [out][in]",
    recipe: h === hyp ? RECIPE_VERSION : h.name,
    baseDepth: String(baseDepth),
    norm: JSON.stringify(norm),
    evalBatchSize: String(batchSize),
    precision,
  };
}

/** The bytes --save writes: a run's final network, with what --eval needs (the page offers the same file). */
export const savedFile = (weights: Weights, norm: ChannelStats, o: CliOptions) =>
  encodeSafetensors(weights, { ...savedMetadata(norm, o.baseDepth, o.batchSize, o.precision, RECIPES[o.recipe]) });

export function encodeSafetensors(weights: Weights, metadata: Record<string, string>): Uint8Array {
  const header: Record<string, unknown> = { __metadata__: metadata };
  let offset = 0;
  for (const [name, t] of weights) {
    header[name] = { dtype: "F32", shape: t.shape, data_offsets: [offset, offset + t.data.length * 4] };
    offset += t.data.length * 4;
  }
  let json = JSON.stringify(header);
  json += " ".repeat((8 - ((8 + json.length) % 8)) % 8); // data starts 8-byte aligned
  const head = new TextEncoder().encode(json), out = new Uint8Array(8 + head.length + offset);
  new DataView(out.buffer).setBigUint64(0, BigInt(head.length), true);
  out.set(head, 8);
  let at = 8 + head.length;
  for (const t of weights.values()) {
    out.set(new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength), at);
    at += t.data.byteLength;
  }
  return out;
}

/**
 * The first key in `json` (valid JSON) that JSON.parse would hide: one given twice in an object (JSON.parse keeps the
 * last, silently) or a "__proto__" (a prototype to JavaScript, not a name); undefined if there is none.
 */
function hiddenKey(json: string): string | undefined {
  const open: (Set<string> | null)[] = []; // per open bracket: the keys of its object so far, or null for an array
  for (let i = 0; i < json.length; i++) {
    const c = json[i];
    if (c === "{" || c === "[") open.push(c === "{" ? new Set() : null);
    else if (c === "}" || c === "]") open.pop();
    else if (c === '"') {
      const start = i;
      for (i++; i < json.length && json[i] !== '"'; i++) if (json[i] === "\\") i++; // to the closing quote, over escapes
      let next = i + 1;
      while (" \t\n\r".includes(json[next])) next++;
      const keys = open.at(-1);
      if (!keys || json[next] !== ":") continue; // a value, not a key
      const key: string = JSON.parse(json.slice(start, i + 1)); // unescaped: "\u005f_proto__" is "__proto__"
      if (key === "__proto__" || keys.has(key)) return key;
      keys.add(key);
    }
  }
}

/**
 * Reads a safetensors file of F32 tensors; anything malformed (or a NaN or infinite weight, overlapping tensors,
 * bytes no tensor owns, a key given twice) is one line, ending in `fix`.
 */
export function decodeSafetensors(
  bytes: Uint8Array,
  file: string,
  fix = "save it again with --save",
): { weights: Weights; metadata: Record<string, string> } {
  const bad = (why: string) => new Error(`${file} is not a valid safetensors file (${why}): ${fix}`);
  if (bytes.length < 8) throw bad("shorter than its 8-byte header length");
  const n = Number(new DataView(bytes.buffer, bytes.byteOffset).getBigUint64(0, true));
  if (8 + n > bytes.length) throw bad(`header of ${n} bytes but the file has ${bytes.length}`);
  let header: unknown;
  const text = new TextDecoder().decode(bytes.subarray(8, 8 + n));
  try {
    header = JSON.parse(text);
  } catch {
    throw bad("header is not JSON");
  }
  const hidden = hiddenKey(text); // what JSON.parse dropped or turned into a prototype: the file is not what it says
  if (hidden === "__proto__") throw bad('header has a "__proto__" key');
  if (hidden !== undefined) throw bad(`header has the key ${JSON.stringify(hidden)} twice`);
  if (typeof header !== "object" || header === null || Array.isArray(header)) throw bad("header is not a JSON object");
  const { __metadata__: metadata = {}, ...tensors } = header as Record<string, unknown>;
  if (typeof metadata !== "object" || metadata === null) throw bad("__metadata__ is not an object");
  const data = bytes.subarray(8 + n), weights: Weights = new Map(), spans: [number, number, string][] = [];
  if (!Object.values(metadata).every((v) => typeof v === "string")) throw bad("__metadata__ holds a non-string");
  for (const [name, entry] of Object.entries(tensors)) {
    const t = entry as { dtype?: unknown; shape?: unknown; data_offsets?: unknown } | null;
    if (typeof t !== "object" || t === null) throw bad(`${name} is not a tensor entry`);
    if (t.dtype !== "F32") throw bad(`${name} has dtype ${t.dtype}, only F32 is read`);
    const shape = t.shape, offsets = t.data_offsets;
    if (!Array.isArray(shape) || !shape.every((d) => Number.isSafeInteger(d) && d >= 0)) {
      throw bad(`${name} has shape ${JSON.stringify(shape)}, not a list of sizes`);
    }
    if (!Array.isArray(offsets) || offsets.length !== 2 || !offsets.every(Number.isSafeInteger)) {
      throw bad(`${name} has data_offsets ${JSON.stringify(offsets)}, not two byte offsets`);
    }
    const [begin, end] = offsets as number[];
    if (!(begin >= 0 && end <= data.length && end - begin === numel(shape) * 4)) throw bad(`${name} is truncated`);
    if (begin % 4 !== 0) throw bad(`${name} starts at byte ${begin}, not on a 4-byte boundary`);
    spans.push([begin, end, name]);
    const values = new Float32Array(data.slice(begin, end).buffer);
    const at = values.findIndex((v) => !Number.isFinite(v));
    if (at >= 0) throw bad(`${name}[${at}] is ${values[at]}`);
    weights.set(name, { shape, data: values });
  }
  // as the format requires (and its reference reader checks): the tensors tile the data, in some order
  spans.sort((a, b) => a[0] - b[0]);
  let covered = 0;
  for (const [begin, end, name] of spans) {
    if (begin !== covered) {
      throw bad(begin < covered ? `${name} overlaps another tensor` : `bytes ${covered}..${begin} belong to no tensor`);
    }
    covered = end;
  }
  if (covered !== data.length) throw bad(`${data.length - covered} bytes after the last tensor`);
  return { weights, metadata: metadata as Record<string, string> };
}

// ---- checkpoints (--checkpoint, --resume): a run continued from the end of an epoch, as safetensors

export const CHECKPOINT_FORMAT = "hlb-cifar10-webgpu-checkpoint";
/** The flags that define a run: a checkpoint continues only the run they describe. */
const RUN_FLAGS = [
  "recipe",
  "runs",
  "epochs",
  "base-depth",
  "batch-size",
  "train-subset",
  "test-subset",
  "seed",
  "precision",
];

/** A checkpoint: the run it continues (flags, recipe, script, kernels, data, device) and where it stands. */
export interface Checkpoint {
  flags: Record<string, string>; // RUN_FLAGS as the command line spells them
  recipe: string; // JSON of the recipe (hyp, airbench94)
  script: string; // sha256 of main.ts
  kernels: Record<string, string>; // kernel file -> sha256, as compiled
  convKernels: ConvKernels;
  device: string;
  norm: ChannelStats;
  startedAt: string; // when the first run of the invocation started
  run: number; // the run `train` belongs to (1-based); `done` holds the runs before it
  done: RunResult[];
  train: TrainState;
  interrupted: { epoch: number; steps: number } | null; // a Ctrl-C after `train` was written: its epoch runs again
}

/** The checkpoint of run `run` at `train` (the terminal's and the page's). */
export const checkpointOf = (x: {
  o: CliOptions;
  gpu: Gpu;
  here: { script: string; kernels: Record<string, string> };
  norm: ChannelStats;
  startedAt: string;
  run: number;
  done: RunResult[];
  train: TrainState;
}): Checkpoint => ({
  flags: runFlags(x.o),
  recipe: JSON.stringify(RECIPES[x.o.recipe]),
  ...x.here,
  convKernels: x.gpu.convKernels,
  device: x.gpu.adapterName,
  norm: x.norm,
  startedAt: x.startedAt,
  run: x.run,
  done: [...x.done],
  train: x.train,
  interrupted: null,
});

/** The flags of a run that a checkpoint records (RUN_FLAGS), as strings. */
export const runFlags = (o: CliOptions): Record<string, string> => ({
  recipe: o.recipe,
  runs: String(o.runs),
  epochs: String(o.epochs),
  "base-depth": String(o.baseDepth),
  "batch-size": String(o.batchSize),
  "train-subset": String(o.trainSubset ?? 50_000),
  "test-subset": String(o.testSubset ?? 10_000),
  seed: String(o.seed),
  precision: o.precision,
});

/**
 * A checkpoint's guard against silent damage: sha256 of its metadata (as JSON, in order, less this sum) and then its
 * tensors' bytes (the file's data section). A changed digit in a row or in the generator state would be a different
 * run that looks fine.
 */
async function checkpointSum(metadata: Record<string, string>, data: Uint8Array) {
  const head = new TextEncoder().encode(JSON.stringify(metadata)), all = new Uint8Array(head.length + data.length);
  all.set(head);
  all.set(data, head.length);
  return hex(new Uint8Array(await crypto.subtle.digest("SHA-256", all)));
}

/**
 * The safetensors bytes of a checkpoint: net.*, momentum.* (trainable tensors) and ema.* (once it exists), and in the
 * metadata the rest, with the sha256 of the tensor bytes.
 */
export async function encodeCheckpoint(c: Checkpoint): Promise<Uint8Array> {
  const layout = layoutState(stateSpec(Number(c.flags["base-depth"]), RECIPES[c.flags.recipe]));
  const t = c.train, tensors: Weights = new Map();
  const add = (prefix: string, values: Float32Array, kinds: string[]) => {
    for (const { name, kind } of stateSpec(Number(c.flags["base-depth"]))) {
      if (!kinds.includes(kind)) continue;
      const e = layout.entries.get(name)!;
      tensors.set(`${prefix}.${name}`, { shape: e.shape, data: values.slice(e.offset, e.offset + numel(e.shape)) });
    }
  };
  const all = ["weight", "bias", "running", "frozen"];
  add("net", t.state, all);
  add("momentum", t.momentum, ["weight", "bias"]);
  if (t.emaExists) add("ema", t.ema, all);
  const { state: _s, momentum: _m, ema: _e, ...train } = t;
  const json = (v: unknown) => JSON.stringify(v);
  const data = new Uint8Array([...tensors.values()].reduce((n, x) => n + x.data.byteLength, 0));
  let at = 0;
  for (const x of tensors.values()) {
    data.set(new Uint8Array(x.data.buffer, x.data.byteOffset, x.data.byteLength), at);
    at += x.data.byteLength;
  }
  const metadata: Record<string, string> = {
    format: CHECKPOINT_FORMAT,
    layout: "net.*: the network (conv weights HWIO, linear [out][in]); momentum.*: SGD's; ema.*: the EMA's",
    flags: json(c.flags),
    recipe: c.recipe,
    script: c.script,
    kernels: json(c.kernels),
    convKernels: c.convKernels,
    device: c.device,
    norm: json(c.norm),
    startedAt: c.startedAt,
    run: String(c.run),
    done: json(c.done.map(({ weights: _, ...r }) => r)),
    train: json(train),
    interrupted: json(c.interrupted),
  };
  return encodeSafetensors(tensors, { ...metadata, sha256: await checkpointSum(metadata, data) });
}

/**
 * A checkpoint file, checked whole before anything runs: a truncated, corrupt or hand-made file is one line, and so is
 * one whose parts disagree (its step count and epoch, its rows, its tensors and its base depth).
 */
export async function decodeCheckpoint(bytes: Uint8Array, file: string): Promise<Checkpoint> {
  const fix = "it cannot be resumed (start the run again)";
  const { weights, metadata: m } = decodeSafetensors(bytes, file, fix);
  const bad = (why: string) => new Error(`${file} ${why}: ${fix}`);
  if (m.format !== CHECKPOINT_FORMAT) {
    throw bad(
      m.format === SAVED_FORMAT ? "is saved weights (--save), not a checkpoint" : "is not a checkpoint of main.ts",
    );
  }
  const header = Number(new DataView(bytes.buffer, bytes.byteOffset).getBigUint64(0, true));
  const { sha256: sum, ...rest } = m;
  if (sum !== await checkpointSum(rest, bytes.subarray(8 + header))) throw bad("is damaged (its sha256 differs)");
  const parse = (key: string) => {
    try {
      return JSON.parse(m[key]);
    } catch {
      throw bad(`has no valid ${key}`);
    }
  };
  const isObject = (v: unknown): v is Record<string, unknown> =>
    typeof v === "object" && v !== null && !Array.isArray(v);
  const hex64 = (v: unknown) => typeof v === "string" && /^[0-9a-f]{64}$/.test(v);
  const count = (v: unknown, min: number, max: number) =>
    Number.isSafeInteger(v) && v as number >= min && v as number <= max;
  const finite = (v: unknown) => typeof v === "number" && Number.isFinite(v);
  // the flags, as strictly as on the command line
  const flags = parse("flags");
  if (!isObject(flags) || Object.keys(flags).sort().join() !== [...RUN_FLAGS].sort().join()) {
    throw bad("has no valid flags");
  }
  let o: CliOptions;
  try {
    o = checkFlags(flags as Record<string, string>);
  } catch (e) {
    throw bad(`has bad flags (${errorText(e)})`);
  }
  const kernels = parse("kernels");
  if (!isObject(kernels) || !Object.values(kernels).every(hex64)) throw bad("has no valid kernel hashes");
  if (!hex64(m.script)) throw bad("has no valid script hash");
  if (!CONV_KERNEL_SETS.includes(m.convKernels as ConvKernels)) throw bad(`has an unknown conv kernel set`);
  const norm = parse("norm");
  const stat = (xs: unknown, positive: boolean) =>
    Array.isArray(xs) && xs.length === 3 && xs.every((x) => finite(x) && (!positive || x > 0));
  if (!isObject(norm) || !stat(norm.mean, false) || !stat(norm.std, true)) {
    throw bad("has bad normalisation statistics");
  }
  // where the run stands: its epoch and step agree with the plan of its flags, its rows with its epoch
  const plan = trainingPlan(Math.min(o.trainSubset ?? 50_000, 50_000), o.batchSize, o.epochs);
  const train = parse("train"), run = Number(m.run), done = parse("done"), interrupted = parse("interrupted");
  if (!isObject(train) || !count(train.epoch, 0, plan.numEpochs)) throw bad("has no valid epoch");
  const epoch = train.epoch as number;
  let steps = 0;
  for (let e = 0; e < epoch; e++) steps += plan.stepsIn(e);
  if (train.step !== steps) throw bad(`says step ${train.step} at epoch ${epoch}, where its run takes ${steps}`);
  if (!Array.isArray(train.rng) || train.rng.length !== 4 || !train.rng.every((x) => count(x, 0, 2 ** 32 - 1))) {
    throw bad("has no valid generator state");
  }
  if (typeof train.emaExists !== "boolean" || !finite(train.trainSeconds) || (train.trainSeconds as number) < 0) {
    throw bad("has no valid EMA flag or clock");
  }
  const row = (r: unknown, e: number) =>
    isObject(r) && r.epoch === e &&
    ["trainLoss", "trainAcc", "valLoss", "valAcc", "totalTimeSeconds"].every((k) => finite(r[k])) &&
    ["emaValAcc", "emaValLoss"].every((k) => r[k] === null || finite(r[k]));
  const rows = (xs: unknown, n?: number) =>
    Array.isArray(xs) && (n === undefined || xs.length === n) && xs.every((r, e) => row(r, e));
  if (!rows(train.epochs, epoch)) throw bad(`has no valid table rows for its ${epoch} epochs`);
  if (!count(run, 1, o.runs) || String(run) !== m.run) throw bad(`has no valid run number (${m.run})`);
  const result = (r: unknown) =>
    isObject(r) && count(r.seed, 0, 2 ** 32 - 1) && finite(r.valAcc) && finite(r.trainSeconds) &&
    (r.emaValAcc === null || finite(r.emaValAcc)) && rows(r.epochs, plan.numEpochs);
  if (!Array.isArray(done) || done.length !== run - 1 || !done.every(result)) throw bad("has no valid earlier runs");
  if (
    !(interrupted === null ||
      (isObject(interrupted) && count(interrupted.epoch, 0, 1000) && count(interrupted.steps, 0, 1e9)))
  ) {
    throw bad("has no valid interruption");
  }
  // the tensors: exactly those of its base depth, each of its shape
  const spec = stateSpec(o.baseDepth), layout = layoutState(spec), expected = new Map<string, number[]>();
  for (const { name, kind, shape } of spec) {
    expected.set(`net.${name}`, shape);
    if (kind === "weight" || kind === "bias") expected.set(`momentum.${name}`, shape);
    if (train.emaExists) expected.set(`ema.${name}`, shape);
  }
  for (const name of weights.keys()) if (!expected.has(name)) throw bad(`holds ${name}, which its network has not`);
  const flat = (prefix: string) => {
    const out = new Float32Array(layout.nTotal);
    for (const [name, e] of layout.entries) {
      const t = weights.get(`${prefix}.${name}`);
      if (!expected.has(`${prefix}.${name}`)) continue;
      if (!t) throw bad(`lacks ${prefix}.${name}`);
      if (t.shape.join() !== e.shape.join()) throw bad(`has ${prefix}.${name} of [${t.shape}], not [${e.shape}]`);
      out.set(t.data, e.offset);
    }
    return out;
  };
  return {
    flags: flags as Record<string, string>,
    recipe: m.recipe,
    script: m.script,
    kernels: kernels as Record<string, string>,
    convKernels: m.convKernels as ConvKernels,
    device: String(m.device),
    norm: norm as unknown as ChannelStats,
    startedAt: String(m.startedAt),
    run,
    done: done as RunResult[],
    train: { ...(train as unknown as TrainState), state: flat("net"), momentum: flat("momentum"), ema: flat("ema") },
    interrupted: interrupted as Checkpoint["interrupted"],
  };
}

/**
 * Why a checkpoint cannot continue this run: the first difference between what it recorded and what is here (the
 * script, the recipe, the kernels, the data), in one line; undefined when it can.
 */
export function checkpointMismatch(c: Checkpoint, here: { script: string; kernels: Record<string, string> }) {
  if (c.script !== here.script) {
    return `was written by another main.ts (sha256 ${c.script.slice(0, 12)}..., this one ${
      here.script.slice(0, 12)
    }...)`;
  }
  if (c.recipe !== JSON.stringify(RECIPES[c.flags.recipe])) {
    return `was written with another recipe (${c.flags.recipe})`;
  }
  for (const [file, sha] of Object.entries(here.kernels)) {
    if (c.kernels[file] !== sha) {
      return `was written with another ${file} (sha256 ${String(c.kernels[file]).slice(0, 12)}..., this one ${
        sha.slice(0, 12)
      }...)`;
    }
  }
  const extra = Object.keys(c.kernels).find((file) => !(file in here.kernels));
  if (extra) return `was written with a kernel file this one has not (${extra})`;
  return undefined;
}

// =================================================================================================
// 10. Command line
// =================================================================================================

export interface CliOptions {
  help: boolean;
  recipe: string; // a key of RECIPES
  data?: string;
  runs: number;
  epochs: number;
  baseDepth: number;
  batchSize: number;
  trainSubset?: number;
  testSubset?: number;
  seed: number;
  json?: string;
  profile: boolean;
  logDir?: string; // default: runs/ next to main.ts
  noLog: boolean;
  save?: string;
  eval?: string;
  checkpoint?: string; // written at the start and after every epoch (default with --resume: the file resumed)
  resume?: string;
  convKernels?: ConvKernels; // default: chosen from the adapter (initGpu)
  featureLevel: FeatureLevel; // which WebGPU adapter to ask for first (a core one by default)
  precision: DType;
  specLimits: boolean; // plan for WebGPU's default limits only (SPEC_LIMITS), as any device grants
  explicit: string[]; // the flags given on the command line (--eval's defaults come from the file otherwise)
  web: boolean; // serve the training page instead of training here (section 11)
  port?: number; // of the page's server (default: a free one)
  static?: string; // --web --static FILE.html: write the page, self-contained, instead of serving it
}

const FLAG_RANGES = {
  runs: { min: 1, max: 10_000, integer: true },
  epochs: { min: 0.01, max: 1000, integer: false },
  "base-depth": { min: 1, max: 1024, integer: true },
  "batch-size": { min: 2, max: 50_000, integer: true },
  "train-subset": { min: 1, max: 50_000, integer: true },
  "test-subset": { min: 1, max: 10_000, integer: true },
  seed: { min: 0, max: 2 ** 32 - 1, integer: true },
  port: { min: 0, max: 65535, integer: true },
};

export const HELP = `hlb-CIFAR10 on WebGPU: trains a small convnet on CIFAR-10 to ~94% test accuracy.

usage: deno run -A main.ts [flags]

  --recipe R          hlb (default: hlb-CIFAR10 v0.7) or airbench94 (airbench94_muon.py: Muon, 8 epochs at batch
                      2000, about half the arithmetic); the defaults below name both
  --data DIR          cifar-10-batches-bin folder (default: $CIFAR10_DIR, else data/cifar-10-batches-bin,
                      downloaded and verified on first use)
  --runs N            train N times with seeds seed, seed+1, ... and print mean and std (default 1)
  --epochs E          training epochs, fractions allowed (default ${hyp.misc.trainEpochs}, airbench94 ${airbench94.misc.trainEpochs});
                      hlb's cutmix runs from epoch E-${hyp.net.cutmixEpochs}, its EMA from epoch floor(E)-${
  hyp.misc.ema!.epochs
}
  --base-depth D      width of the first group; groups are D, 4D, 8D (airbench94: D, 4D, 4D; default ${hyp.net.baseDepth})
  --batch-size B      training batch size (default ${hyp.misc.batchSize}, airbench94 ${airbench94.misc.batchSize})
  --train-subset N    train on the first N training images in file order (default: all 50000)
  --test-subset N     evaluate on the first N test images (default: all 10000)
  --seed S            seed of the first run, 0..4294967295 (default: random, printed)
  --json FILE         write the results as JSON (accuracies as fractions)
  --log-dir DIR       where the run log goes (default: runs/ next to main.ts): script text and sha256,
                      hyperparameters, flags, device, every epoch's metrics
  --no-log            write no run log
  --save FILE         save the final EMA network of the last run as safetensors (NHWC, HWIO conv weights)
  --checkpoint FILE   write everything needed to continue the run to FILE (safetensors) when it starts, after
                      every epoch and on Ctrl-C
  --resume FILE       continue the run FILE holds, from the end of its last epoch, with the same bits on the same
                      device (its flags are the defaults; checkpoints go on to FILE unless --checkpoint says where)
  --eval FILE         no training: print the test accuracy and loss of a network saved with --save, with its
                      recipe's final TTA, normalised with its own statistics, at its run's batch size and precision
  --conv-kernels K    conv kernel set: tiled (workgroup-memory tiles, the GPU default), block (the
                      first version's), wide (the CPU-device default); default: chosen from the device
  --feature-level L   core (default; compatibility if none) or compatibility: the WebGPU adapter to ask for
                      (compatibility: an OpenGL ES-class one, such as Chromium's through ANGLE)
  --precision P       f32, or f16: images, activations and their gradients stored in f16 (needs
                      shader-f16), arithmetic, weights and optimiser state in f32 (default f32)
  --spec-limits       use only WebGPU's default limits (128 MiB a binding, 256 MiB a buffer), as every device
                      grants: shows that a configuration runs on any GPU or browser (tensors over a binding
                      are processed in batch slices, on any device)
  --profile           time every kernel with GPU timestamps and print the table after training
                      (one readback per submit: the run is slower, the table's times are not)
  --web               serve a page on localhost that trains in the browser, on its WebGPU, with the other
                      flags (its URL query); the page's run log is kept in --log-dir
  --port N            the page's port (default: a free one, printed)
  --static FILE.html  with --web: write the page as one self-contained file instead (no server: open it from
                      disk or any web host; it asks for the official tarball, checks and unpacks it in the tab)
  --help              show this help`;

const FLAG_OPTIONS = {
  help: { type: "boolean", short: "h" },
  profile: { type: "boolean" },
  "spec-limits": { type: "boolean" },
  web: { type: "boolean" },
  static: { type: "string" },
  "log-dir": { type: "string" },
  "no-log": { type: "boolean" },
  save: { type: "string" },
  eval: { type: "string" },
  checkpoint: { type: "string" },
  resume: { type: "string" },
  data: { type: "string" },
  json: { type: "string" },
  "conv-kernels": { type: "string" },
  "feature-level": { type: "string" },
  precision: { type: "string" },
  recipe: { type: "string" },
  ...Object.fromEntries(Object.keys(FLAG_RANGES).map((k) => [k, { type: "string" }])),
} as Record<string, { type: "boolean" | "string"; short?: string }>;

/** The flags a --web page takes from its URL query: those of training itself (the rest are the terminal's). */
export const PAGE_FLAGS = [...RUN_FLAGS, "conv-kernels", "feature-level"];

export function parseFlags(argv: string[]): CliOptions {
  let parsed;
  try {
    parsed = parseArgs({ args: argv, strict: true, allowPositionals: false, options: FLAG_OPTIONS });
  } catch (e) {
    // node's messages are long and multi-line: say the same in one line
    const msg = errorText(e), flag = msg.match(/'([^' ]+)[' ]/)?.[1] ?? "";
    const code = (e as { code?: string }).code;
    if (code === "ERR_PARSE_ARGS_UNKNOWN_OPTION") throw new Error(`unknown flag ${flag}: see --help`);
    if (code === "ERR_PARSE_ARGS_UNEXPECTED_POSITIONAL") {
      throw new Error(`unexpected argument ${flag || msg}: flags start with --, see --help`);
    }
    if (msg.includes("does not take an argument")) {
      const name = msg.match(/--[\w-]+/)?.[0] ?? flag;
      throw new Error(`${name} takes no value: write ${name} alone, see --help`);
    }
    if (msg.includes("ambiguous")) {
      throw new Error(`${flag} needs a value (for a negative one write ${flag}=-N): see --help`);
    }
    throw new Error(`${flag ? `${flag} needs a value` : msg.split("\n")[0]}: see --help`);
  }
  return checkFlags(parsed.values);
}

/**
 * A --web page's flags, from its URL query (?epochs=2&seed=1, the command line's names without the dashes), checked
 * as the command line's are. No node:util here: this runs in the browser.
 */
export function parseQuery(search: string): CliOptions {
  const v: Record<string, string | boolean> = {};
  for (const [name, raw] of new URLSearchParams(search)) {
    const spec = FLAG_OPTIONS[name];
    if (!spec) throw new Error(`unknown flag ${name} in the page's address: the page takes ${PAGE_FLAGS.join(", ")}`);
    if (!PAGE_FLAGS.includes(name)) {
      throw new Error(`--${name} is the terminal's, not the page's: the page takes ${PAGE_FLAGS.join(", ")}`);
    }
    v[name] = raw; // the page's flags all take a value
  }
  return checkFlags(v);
}

/** Flag values (strings, or true for the boolean ones) checked and turned into options: the command line's and the page's. */
function checkFlags(v: Record<string, string | boolean | undefined>): CliOptions {
  const num = (name: keyof typeof FLAG_RANGES): number | undefined => {
    const raw = v[name];
    if (raw === undefined) return undefined;
    const r = FLAG_RANGES[name], x = Number(raw);
    const kind = r.integer ? "an integer" : "a number";
    // decimal only: Number() would also take " 2 ", "0x10" and "1_0"
    const decimal = typeof raw === "string" && /^[+-]?(\d+\.?\d*|\.\d+)(e[+-]?\d+)?$/i.test(raw);
    if (!decimal || !Number.isFinite(x) || (r.integer && !Number.isInteger(x)) || x < r.min || x > r.max) {
      throw new Error(`--${name} must be ${kind} from ${r.min} to ${r.max}, got "${raw}"`);
    }
    return x;
  };
  for (const name of ["data", "json", "log-dir", "save", "eval", "static", "checkpoint", "resume"]) {
    if (v[name] === "") throw new Error(`--${name} needs a value: see --help`);
  }
  const precision = (v.precision as string | undefined) ?? "f32";
  if (precision !== "f32" && precision !== "f16") {
    throw new Error(`--precision must be f32 or f16, got "${precision}"`);
  }
  const convKernels = v["conv-kernels"] as string | undefined;
  if (convKernels !== undefined && !CONV_KERNEL_SETS.includes(convKernels as ConvKernels)) {
    throw new Error(`--conv-kernels must be one of ${CONV_KERNEL_SETS.join(", ")}, got "${convKernels}"`);
  }
  const featureLevel = (v["feature-level"] as string | undefined) ?? "core";
  if (featureLevel !== "core" && featureLevel !== "compatibility") {
    throw new Error(`--feature-level must be core or compatibility, got "${featureLevel}"`);
  }
  const recipe = (v.recipe as string | undefined) ?? "hlb", h = RECIPES[recipe];
  if (!Object.hasOwn(RECIPES, recipe)) {
    throw new Error(`--recipe must be one of ${Object.keys(RECIPES).join(", ")}, got "${recipe}"`);
  }
  const explicit = Object.keys(v).filter((k) => v[k] !== undefined);
  const trainingOnly = explicit.filter((k) => EVAL_IGNORES.includes(k));
  if (v.eval !== undefined && trainingOnly.length) {
    throw new Error(
      `--eval evaluates saved weights without training: --${trainingOnly[0]} does not apply, leave it out`,
    );
  }
  const notOnPage = explicit.filter((k) => ["json", "save", "eval", "profile", "checkpoint", "resume"].includes(k));
  if (v.web && notOnPage.length) {
    throw new Error(
      `--web trains in the browser, which keeps only the run log: --${notOnPage[0]} does not apply there`,
    );
  }
  if (v.port !== undefined && !v.web) throw new Error("--port is the --web page's: add --web, or leave --port out");
  if (v.static !== undefined) {
    if (!v.web) throw new Error("--static writes the --web page to a file: add --web, or leave --static out");
    const serverOnly = explicit.find((k) => ["port", "data", "log-dir", "no-log"].includes(k));
    if (serverOnly) {
      throw new Error(
        `--static writes a page that needs no server (its data: the tarball chosen on the page; its run log: a download): --${serverOnly} does not apply there`,
      );
    }
    // a name, then .html in any case (P.HTML is a page; ".html" alone would be a hidden file with no name)
    if (!/[^/\\]\.html$/i.test(String(v.static))) {
      throw new Error(`--static names the page's file: FILE.html, got "${v.static}"`);
    }
  }
  return {
    help: Boolean(v.help),
    recipe,
    profile: Boolean(v.profile),
    logDir: v["log-dir"] as string | undefined,
    noLog: Boolean(v["no-log"]),
    save: v.save as string | undefined,
    eval: v.eval as string | undefined,
    checkpoint: v.checkpoint as string | undefined,
    resume: v.resume as string | undefined,
    convKernels: convKernels as ConvKernels | undefined,
    featureLevel,
    precision,
    specLimits: Boolean(v["spec-limits"]),
    data: v.data as string | undefined,
    json: v.json as string | undefined,
    runs: num("runs") ?? 1,
    epochs: num("epochs") ?? h.misc.trainEpochs,
    baseDepth: num("base-depth") ?? h.net.baseDepth,
    batchSize: num("batch-size") ?? h.misc.batchSize,
    trainSubset: num("train-subset"),
    testSubset: num("test-subset"),
    seed: num("seed") ?? crypto.getRandomValues(new Uint32Array(1))[0],
    explicit,
    web: Boolean(v.web),
    port: num("port"),
    static: v.static as string | undefined,
  };
}

/** Flags of training that --eval would ignore: it refuses them rather than leave a user believing they applied. */
const EVAL_IGNORES = [
  "recipe", // the file's
  "checkpoint",
  "resume",
  "runs",
  "epochs",
  "base-depth",
  "train-subset",
  "seed",
  "save",
  "log-dir",
  "no-log",
  "profile",
  "web",
];

const defaultLogDir = () => fileURLToPath(new URL("./runs", import.meta.url));

export async function main(argv: string[]) {
  const flags = parseFlags(argv), startedAt = new Date();
  if (flags.help) return say(HELP);
  if (flags.eval) return await evalMain(flags);
  if (flags.web) return await webMain(flags);
  // --resume: the checkpoint is read and checked whole first (a bad file costs no GPU and no download), and its run's
  // flags become the defaults
  const resumed = flags.resume ? await readCheckpoint(flags.resume) : undefined;
  const o = resumed ? resumeFlags(flags, resumed) : flags, checkpointFile = o.checkpoint ?? o.resume;
  // Every output is checked before anything long starts: hours of training never end in a file that cannot be written.
  distinctOutputs({ "--json": o.json, "--save": o.save, [o.checkpoint ? "--checkpoint" : "--resume"]: checkpointFile });
  if (o.json) await checkWritableFile("--json", o.json);
  if (o.save) await checkWritableFile("--save", o.save);
  if (checkpointFile) await checkWritableFile("--checkpoint", checkpointFile);
  const logDir = o.logDir ?? defaultLogDir();
  if (!o.noLog) await checkWritableFolder("--log-dir", logDir);
  const gpu = await initGpu({ ...gpuOptions(o), profile: o.profile }); // first: no GPU, no download
  if (o.profile && !gpu.profiler) say("--profile: this adapter has no timestamp queries, no kernel table");
  checkPrecision(gpu, o.precision);
  const here = { script: await sha256(await scriptSource()), kernels: await kernelHashes(gpu) };
  if (resumed) {
    const why = checkpointMismatch(resumed, here);
    if (why) throw new Error(`--resume ${o.resume} ${why}: a checkpoint continues only the run that wrote it`);
  }
  checkFits(gpu, o.batchSize, o.baseDepth, o.precision, RECIPES[o.recipe]); // before any download, table or run log
  const { dir, source } = await datasetDir(o);
  const cifar = await loadCifar10(dir, { trainSubset: o.trainSubset, testSubset: o.testSubset, source });
  if (o.batchSize > cifar.trainLabels.length) {
    throw new Error(
      `--batch-size ${o.batchSize} is larger than the training set (${cifar.trainLabels.length} images): lower it`,
    );
  }
  const data = uploadDataset(gpu, cifar, RECIPES[o.recipe]);
  if (resumed && JSON.stringify(resumed.norm) !== JSON.stringify(data.norm)) {
    throw new Error(
      `--resume ${o.resume} was written for other training images (their statistics differ): pass its --data`,
    );
  }
  say(headerLine(gpu, o, data));
  if (resumed) say(resumeText(o.resume!, resumed, gpu));
  if (OUTPUT.failed) throw new Error(`${OUTPUT.failed}: redirect the output somewhere it can be written`);

  // The outputs, each written on its own: one that fails never keeps the others from being written. The run log is
  // created as the first run starts and rewritten after every epoch and every run, so whatever ends the process keeps
  // what was measured.
  const runs: RunResult[] = resumed ? [...resumed.done] : [], failed = new Set<string>();
  let logPath: string | undefined, logError: string | undefined, partial: PartialRun | undefined;
  const resumedAt = resumed && {
    checkpoint: o.resume!,
    run: resumed.run,
    epoch: resumed.train.epoch,
    interrupted: resumed.interrupted,
  };
  const writeLog = async (status: RunStatus) => {
    if (o.noLog) return;
    try {
      logPath = await writeRunLog(logDir, gpu, o, runs, startedAt, {
        path: logPath,
        status,
        partial,
        resumed: resumedAt,
      });
      logError = undefined;
    } catch (e) {
      logError = errorText(e);
    }
  };
  const output = async (write: () => Promise<void>) => {
    try {
      await write();
    } catch (e) {
      failed.add(errorText(e));
    }
  };
  const stop = listenForStop();
  let status: RunStatus = "completed", thrown: unknown, cpuNoted = false, last: Checkpoint | undefined;
  const writeCheckpoint = (c: Checkpoint) =>
    output(async () => writeBytesAtomic(checkpointFile!, await encodeCheckpoint(c)));
  for (let r = resumed ? resumed.run - 1 : 0; r < o.runs; r++) {
    const seed = (o.seed + r) >>> 0, table = new Table(), from = r === (resumed?.run ?? 0) - 1 ? resumed : undefined;
    partial = { run: r + 1, seed, epochs: from ? [...from.train.epochs] : [] };
    await writeLog("running");
    say(`\n${runTitle(r + 1, o.runs, seed)}`);
    table.header();
    for (const m of from?.train.epochs ?? []) table.row(m); // the rows of the epochs before the checkpoint
    let result: RunResult;
    try {
      result = await train({
        ...trainOptions(gpu, data, o, seed),
        resume: from?.train,
        onCheckpoint: checkpointFile
          ? async (train) => {
            const first = resumed?.startedAt ?? startedAt.toISOString();
            last = checkpointOf({ o, gpu, here, norm: data.norm, startedAt: first, run: r + 1, done: runs, train });
            await writeCheckpoint(last);
          }
          : undefined,
        onEpochStart: (e) => table.epochStart(e),
        onStep: (p) => {
          table.step(p, o.runs - r - 1);
          const left = timeLeft(p), note = left && !cpuNoted ? cpuNote(gpu, left.run) : undefined;
          if (left) cpuNoted = true;
          if (note) table.note(note);
        },
        onEpoch: async (m) => {
          table.row(m);
          partial!.epochs.push(m);
          await writeLog("running");
        },
        returnWeights: Boolean(o.save) && r === o.runs - 1,
        stop: stop.stopped,
      });
    } catch (e) {
      status = e instanceof TrainingDiverged ? "diverged" : "failed";
      partial.error = errorText(e);
      if (e instanceof TrainingDiverged) [partial.epoch, partial.step] = [e.epoch, e.step];
      thrown = e;
      break;
    } finally {
      table.end();
    }
    partial = undefined;
    runs.push(result);
    if (result.interrupted) {
      status = "interrupted";
      break;
    }
    say(runResultText(result, RECIPES[o.recipe]));
    await writeLog("running");
    if (o.json) await output(() => writeResultsJson(o.json!, gpu, o, runs, "running"));
  }
  // The outputs. The signal handlers stay: a Ctrl-C here is said and the writes finish; a second one quits at once.
  stop.finishing = true;
  if (status === "interrupted" && last) {
    // the checkpoint keeps the end of the last epoch, and says the next one was cut short: it runs again on --resume
    const { epoch, steps } = runs[runs.length - 1].interrupted!;
    await writeCheckpoint({ ...last, interrupted: { epoch, steps } });
    say(
      `checkpoint: ${checkpointFile} holds run ${last.run} at the end of epoch ${last.train.epoch - 1}: ` +
        `--resume ${checkpointFile} continues from there`,
    );
  }

  if (o.runs > 1 && status === "completed") say(`\n${summaryText(runs, RECIPES[o.recipe])}`);
  const saved = status === "completed" ? runs[runs.length - 1].weights : undefined;
  if (o.save && !saved) {
    say(`no weights written to ${o.save}: --save keeps the last run's network once it completes, and it did not`);
  }
  if (o.save && saved) {
    await output(async () => {
      await writeBytesAtomic(o.save!, savedFile(saved, data.norm, o));
      say(`weights written to ${o.save}`);
    });
  }
  await writeLog(status);
  if (logError) failed.add(logError);
  if (o.json) {
    await output(async () => {
      await writeResultsJson(o.json!, gpu, o, runs, status);
      say(`results written to ${o.json}`);
    });
  }
  if (gpu.profiler) say(`\nper-kernel GPU time, all runs (--profile)\n${gpu.profiler.report()}`);
  const log = o.noLog ? "no run log (--no-log)" : logPath && !logError ? `run log: ${logPath}` : "no run log";
  for (const line of failed) sayErr(`error: ${line}`);
  releaseGpu(gpu);
  stop.remove();
  if (status === "interrupted") {
    const { epoch, steps } = runs[runs.length - 1].interrupted!;
    const where = `run ${runs.length}, epoch ${epoch}, after ${steps} step${steps === 1 ? "" : "s"}; ${log}`;
    if (stop.requested) {
      sayErr(`interrupted in ${where}`);
      quit(130);
    }
    sayErr(`error: ${OUTPUT.failed}: the run stopped in ${where}`); // stdout failed, not a signal
    quit(1);
  }
  if (thrown) {
    if (logPath && !logError) sayErr(`run log: ${logPath} (status ${status}, what ran before is kept)`);
    throw thrown;
  }
  if (logPath && !logError) say(`run log: ${logPath}`);
  if (failed.size) Deno.exit(1);
}

/** The line above the tables: device, precision, kernels, sizes (the same in a terminal and on the page). */
function headerLine(gpu: Gpu, o: CliOptions, data: GpuData) {
  const conv = gpu.convKernels + (gpu.convChoice ? ` (${gpu.convChoice})` : "");
  const { sliced, bytes } = perImageShapes(o.baseDepth, o.precision, RECIPES[o.recipe]);
  const slices = o.batchSize * bytes(sliced[0]) > gpu.limits.maxBinding
    ? ` (in slices: a binding holds ${mib(gpu.limits.maxBinding)}${o.specLimits ? ", --spec-limits" : ""})`
    : "";
  return `recipe: ${o.recipe} | device: ${gpu.adapterName} | precision: ${
    precisionText(o.precision)
  } | conv kernels: ${conv} | ` +
    `train ${data.train.count} / test ${data.test.count} images | batch ${o.batchSize}${slices} | ` +
    `epochs ${o.epochs} | base depth ${o.baseDepth} | training ${
      flopText(trainingFlops(RECIPES[o.recipe], o.baseDepth, o.batchSize, data.train.count, o.epochs).total)
    }`;
}

/**
 * A run's training arithmetic, counted from the shapes (a multiply-add is 2 FLOP): the forward pass's convs and head;
 * the backward's weight and data gradients (none for the frozen whitening conv, and no data gradient into it unless
 * its bias learns); Muon's Newton-Schulz products. Elementwise work (norms, GELU, pools, SGD) and evaluation are not
 * counted: together a few percent.
 */
export function trainingFlops(h: Hyp, baseDepth: number, batch: number, nTrain: number, epochs: number) {
  const side = IMAGE_SIDE - h.net.whitening.kernelSize + 1, k = h.net.whitening.kernelSize;
  const widths = groupWidths(baseDepth, h), convs: { macs: number; shape: number[] }[] = [];
  let hw = side, cin = whitenOut(h);
  for (const c of widths) {
    convs.push({ macs: hw * hw * 9 * cin * c, shape: [3, 3, cin, c] }); // conv1 at the group's input size
    hw >>= 1;
    convs.push({ macs: hw * hw * 9 * c * c, shape: [3, 3, c, c] }); // conv2 after the pool
    cin = c;
  }
  const whiten = side * side * k * k * 3 * whitenOut(h), head = cin * h.misc.numClasses;
  const sum = (xs: number[]) => xs.reduce((a, b) => a + b, 0), conv = sum(convs.map((c) => c.macs));
  const forward = 2 * (whiten + conv + head);
  const backward = 2 * (2 * conv + 2 * head) - 2 * convs[0].macs; // no data gradient into the whitening output
  const whitenBackward = 2 * convs[0].macs; // ... except while its bias learns
  const newtonSchulz = h.opt.muon
    ? sum(convs.map(({ shape }) => {
      const [rows, cols] = muonMatrix(shape), n = Math.min(rows, cols), m = Math.max(rows, cols);
      return NEWTON_SCHULZ.steps * (4 * n * n * m + 2 * n ** 3);
    }))
    : 0;
  const plan = trainingPlan(nTrain, batch, epochs, h);
  const total = plan.totalSteps * (batch * (forward + backward) + newtonSchulz) +
    Math.min(plan.whitenBiasSteps, plan.totalSteps) * batch * whitenBackward;
  return { forward, backward, newtonSchulz, steps: plan.totalSteps, total };
}

/** FLOP as a short number with its unit: 0.57 PFLOP, 3.2 TFLOP. */
export function flopText(flop: number): string {
  const [unit, scale] = flop >= 1e14 ? ["PFLOP", 1e15] : flop >= 1e11 ? ["TFLOP", 1e12] : ["GFLOP", 1e9];
  return `${(flop / scale).toPrecision(2)} ${unit}`;
}

/**
 * On a CPU device, said once its first step is timed when the run will take more than CPU_NOTE_SECONDS: what it costs
 * here, and the quicker way to look. The user decides; nothing is refused.
 */
export function cpuNote(gpu: Pick<Gpu, "cpu" | "adapterName">, runSeconds: number): string | undefined {
  if (!gpu.cpu || runSeconds < CPU_NOTE_SECONDS) return undefined;
  return `note: ${gpu.adapterName} runs on the CPU: at this pace the run takes about ${durationText(runSeconds)} ` +
    "here (measured over its first step); for a quick look, the README's reduced run (under Output) takes minutes";
}
const CPU_NOTE_SECONDS = 600;

/** Refuses two outputs named by one path: the second written would silently replace the first. */
export function distinctOutputs(outputs: Record<string, string | undefined>) {
  const seen = new Map<string, string>();
  for (const [flag, path] of Object.entries(outputs)) {
    if (!path) continue;
    const other = seen.get(resolve(path));
    if (other) throw new Error(`${other} and ${flag} name the same file ${path}: give each its own`);
    seen.set(resolve(path), flag);
  }
}

/** A --resume file, read and checked whole. */
async function readCheckpoint(file: string): Promise<Checkpoint> {
  return await decodeCheckpoint(await readSafetensorsFile("--resume", file), file);
}

/**
 * A safetensors file named by `flag`, read no further than its header says it reaches: a folder, a device (such as
 * /dev/zero) or a FIFO is refused before it is opened, and so is a file whose size is not the header's.
 */
export async function readSafetensorsFile(flag: string, file: string): Promise<Uint8Array> {
  const fail = (why: string) => new Error(`cannot read ${flag} ${file} (${why}): check the path`);
  let f: Deno.FsFile | undefined;
  try {
    const info = await Deno.stat(file).catch((e) => {
      throw fail(errorText(e));
    });
    if (!info.isFile) throw fail("not a regular file");
    f = await Deno.open(file);
    const head = new Uint8Array(8);
    if (info.size < 8 || (await f.read(head)) !== 8) return new Uint8Array(0); // the decoder says what is wrong
    const n = Number(new DataView(head.buffer).getBigUint64(0, true));
    if (8 + n > info.size) return head; // likewise: a header longer than the file
    const header = new Uint8Array(n);
    for (let at = 0; at < n;) at += (await f.read(header.subarray(at))) ?? n;
    // the end of the data the header describes; a file longer than that is not what it says it is
    let end = 0;
    try {
      for (const [k, t] of Object.entries(JSON.parse(new TextDecoder().decode(header)))) {
        const offsets = (t as { data_offsets?: unknown })?.data_offsets;
        if (k !== "__metadata__" && Array.isArray(offsets) && Number.isSafeInteger(offsets[1])) {
          end = Math.max(end, offsets[1]);
        }
      }
    } catch {
      end = info.size - 8 - n; // not JSON: the decoder says so
    }
    if (info.size !== 8 + n + end) {
      throw new Error(
        `${file} is not a valid safetensors file (${info.size} bytes where its header describes ${8 + n + end}): ` +
          (flag === "--resume" ? "it cannot be resumed (start the run again)" : "save it again with --save"),
      );
    }
    const bytes = new Uint8Array(info.size);
    bytes.set(head);
    bytes.set(header, 8);
    for (let at = 8 + n; at < info.size;) at += (await f.read(bytes.subarray(at))) ?? info.size;
    return bytes;
  } finally {
    f?.close();
  }
}

/**
 * The flags of a resumed run: the checkpoint's run flags (RUN_FLAGS) and conv kernel set, unless given, and given ones
 * only where they agree (another batch, precision or seed would be another run).
 */
function resumeFlags(o: CliOptions, c: Checkpoint): CliOptions {
  const saved = checkFlags(c.flags), given = runFlags(o);
  for (const name of RUN_FLAGS) {
    if (o.explicit.includes(name) && given[name] !== c.flags[name]) {
      throw new Error(
        `--resume ${o.resume} continues a run with --${name} ${c.flags[name]}, not ${given[name]}: leave --${name} out`,
      );
    }
  }
  if (o.convKernels && o.convKernels !== c.convKernels) {
    throw new Error(
      `--resume ${o.resume} continues a run with --conv-kernels ${c.convKernels}, not ${o.convKernels}: leave --conv-kernels out`,
    );
  }
  const { recipe, runs, epochs, baseDepth, batchSize, trainSubset, testSubset, seed, precision } = saved;
  return {
    ...o,
    recipe,
    runs,
    epochs,
    baseDepth,
    batchSize,
    trainSubset,
    testSubset,
    seed,
    precision,
    convKernels: c.convKernels,
  };
}

/** The line a resumed run starts with: from where, and what runs again. */
function resumeText(file: string, c: Checkpoint, gpu: Gpu) {
  const at = `resuming ${file}: run ${c.run}, from the end of epoch ${c.train.epoch - 1}` +
    (c.train.epoch === 0 ? " (its start)" : "");
  const cut = c.interrupted
    ? `; it was interrupted in epoch ${c.interrupted.epoch} (after step ${c.interrupted.steps} of the run), which runs again from its start`
    : "";
  const device = c.device === gpu.adapterName
    ? ""
    : `; written on ${c.device}, so here the run goes on with other roundings, not the same bits`;
  return at + cut + device;
}

/** sha256 of each kernel file as compiled (for run logs and checkpoints). */
async function kernelHashes(gpu: Pick<Gpu, "sources">): Promise<Record<string, string>> {
  const pairs = await Promise.all([...gpu.sources].map(async ([file, text]) => [`${file}.wgsl`, await sha256(text)]));
  return Object.fromEntries(pairs);
}

/** What the flags tell initGpu. */
const gpuOptions = (o: CliOptions) => ({
  convKernels: o.convKernels,
  featureLevel: o.featureLevel,
  limits: o.specLimits ? "spec" as const : undefined,
});

/** What a run's flags tell train(). */
function trainOptions(gpu: Gpu, data: GpuData, o: CliOptions, seed: number): TrainOptions {
  const { epochs, baseDepth, batchSize, precision } = o;
  return { gpu, data, seed, epochs, baseDepth, batchSize, precision, hyp: RECIPES[o.recipe] };
}

/**
 * Ctrl-C, SIGTERM or SIGHUP (a closed terminal, a dropped ssh; not under nohup, which ignores it): the run stops
 * after the current step (or evaluation batch), writes its outputs (the run log marked interrupted) and exits with
 * code 130; a second signal quits at once, with the same code, wherever it lands. The handlers stay until the last
 * output is written (`finishing`: the step loop has ended). A stdout that cannot be written stops the run too.
 */
function listenForStop() {
  const state = {
    requested: false,
    finishing: false,
    stopped: () => state.requested || OUTPUT.failed !== undefined,
    remove: () => {},
  };
  const signals: Deno.Signal[] = Deno.build.os === "windows" ? ["SIGINT"] : ["SIGINT", "SIGTERM", "SIGHUP"];
  const listeners = signals.map((signal) => {
    const on = () => {
      if (signal === "SIGHUP" && HANGUP_IGNORED) return; // nohup: the run goes on
      if (state.requested) quit(130);
      state.requested = true;
      const name = signal === "SIGINT" ? "Ctrl-C" : signal, then = "(press Ctrl-C again to quit at once)";
      say(
        `\n${name}: ${
          state.finishing ? "writing the outputs, then exiting" : "stopping after the current step"
        } ${then}`,
      );
    };
    Deno.addSignalListener(signal, on);
    return () => Deno.removeSignalListener(signal, on);
  });
  state.remove = () => listeners.forEach((remove) => remove());
  return state;
}

/**
 * Whether this process started with SIGHUP ignored (nohup): Linux says so in /proc (SigIgn, bit 0). Read as the
 * script loads, because Deno's first signal listener clears it (a nohup run would then die on the hangup).
 */
function hangupIgnored(): boolean {
  try {
    const mask = Deno.readTextFileSync("/proc/self/status").match(/^SigIgn:\s*([0-9a-f]+)/m)?.[1];
    return mask !== undefined && (BigInt(`0x${mask}`) & 1n) === 1n;
  } catch {
    return false;
  }
}

// (read as the script loads, also in a browser, where there is no Deno, or in a test page with a stand-in for it)
const HANGUP_IGNORED = globalThis.Deno?.build?.os === "linux" && hangupIgnored();

/** Exits at once, removing the temporary files of atomic writes in flight (a target is never left half-written). */
function quit(code: number): never {
  for (const tmp of WRITES_IN_FLIGHT) {
    try {
      Deno.removeSync(tmp);
    } catch { /* already renamed or never created */ }
  }
  Deno.exit(code);
}

function checkPrecision(gpu: Gpu, precision: DType) {
  if (precision === "f16" && !gpu.hasF16) {
    throw new Error(
      `--precision f16 needs the shader-f16 feature, which ${gpu.adapterName} lacks: use --precision f32`,
    );
  }
}

/** The dataset folder, and which of --data, $CIFAR10_DIR or the managed cache named it (for the error lines). */
async function datasetDir(o: CliOptions) {
  const env = Deno.env.get("CIFAR10_DIR") || undefined;
  const source: DataSource = o.data ? "--data" : env ? "CIFAR10_DIR" : "cache";
  const dir = await resolveCifar10Dir({
    dir: o.data ?? env,
    cacheDir: fileURLToPath(new URL("./data", import.meta.url)),
    url: Deno.env.get("CIFAR10_URL") || undefined, // a mirror of the official tarball (same md5)
  });
  return { dir, source };
}

/** How a TTA level (TTA_VIEWS) reads in a line. */
const ttaText = (level: number) => ["no TTA", "flip TTA", "TTA level 2"][level];

/** A run's last line, in the terminal and on the page. */
export function runResultText(result: RunResult, h: Hyp = hyp): string {
  if (!h.misc.ema) {
    const tta = h.misc.finalTtaLevel === h.misc.ttaLevel ? "" : ` (${ttaText(h.misc.finalTtaLevel)})`;
    return `final val accuracy${tta}: ${(100 * result.valAcc).toFixed(2)}% | train time ${
      result.trainSeconds.toFixed(2)
    } s`;
  }
  const ema = result.emaValAcc === null ? "n/a (the EMA never started)" : `${(100 * result.emaValAcc).toFixed(2)}%`;
  return `final EMA val accuracy: ${ema} | val accuracy: ${(100 * result.valAcc).toFixed(2)}% | train time ${
    result.trainSeconds.toFixed(2)
  } s`;
}

/** After several runs: each run's seed and result, then the mean and std (in the terminal and on the page). */
export function summaryText(runs: RunResult[], h: Hyp = hyp): string {
  // the recipe's final accuracy: the EMA's (hlb), or the network's where there is no EMA (airbench94)
  const final = (r: RunResult) => (h.misc.ema ? r.emaValAcc : r.valAcc);
  const accs = runs.map(final).filter((a): a is number => a !== null);
  const lines = [`run  seed        ${h.misc.ema ? "ema_val_acc" : "val_acc    "}  train_seconds`];
  runs.forEach((r, i) =>
    lines.push(
      `${String(i + 1).padStart(3)}  ${String(r.seed).padEnd(10)}  ${
        final(r) === null ? "    n/a" : (100 * final(r)!).toFixed(2) + "%"
      }       ${r.trainSeconds.toFixed(2)}`,
    )
  );
  const times = runs.map((r) => r.trainSeconds);
  if (accs.length) {
    lines.push(
      `mean ${h.misc.ema ? "EMA " : ""}val accuracy over ${accs.length} runs: ${(100 * mean(accs)).toFixed(2)}% ± ${
        (100 * sampleStd(accs)).toFixed(2)
      }% (std) | ` +
        `train time ${mean(times).toFixed(2)} ± ${sampleStd(times).toFixed(2)} s`,
    );
  }
  return lines.join("\n");
}

/** --json: the runs finished so far (all of them once `status` is final) and their mean and std. */
async function writeResultsJson(path: string, gpu: Gpu, o: CliOptions, runs: RunResult[], status: RunStatus) {
  const out = {
    status,
    device: gpu.adapterName,
    precision: o.precision,
    convKernels: gpu.convKernels,
    flags: { ...o, help: undefined, profile: undefined, explicit: undefined },
    // as in the run log: an interrupted run is listed (with where it stopped) and left out of the mean
    runs: runs.map((r) => ({
      seed: r.seed,
      emaValAcc: r.emaValAcc,
      valAcc: r.valAcc,
      trainSeconds: r.trainSeconds,
      epochs: r.epochs,
      ...(r.interrupted ? { interrupted: r.interrupted } : {}),
    })),
    ...emaStats(runs),
  };
  await writeFileAtomic(path, JSON.stringify(out, null, 2) + "\n");
}

/** --eval: the saved network's test accuracy and loss, with the statistics and batch size it was saved with. */
async function evalMain(o: CliOptions) {
  const file = o.eval!;
  if (o.json) await checkWritableFile("--json", o.json);
  const saved = await readSavedNetwork(file); // before the GPU and the dataset: a bad file costs no download
  const batch = evalBatchSize(saved, o, file);
  const gpu = await initGpu(gpuOptions(o));
  const precision = evalPrecision(gpu, saved, o, file, batch);
  const batchSize = batch.size;
  const { dir, source } = await datasetDir(o);
  const cifar = await loadCifar10(dir, { trainSubset: 0, testSubset: o.testSubset, source });
  const test = uploadImages(gpu, cifar.testImages, cifar.testLabels);
  const r = await evaluateWeights(
    gpu,
    { test, norm: saved.norm },
    saved.weights,
    batchSize,
    file,
    precision,
    saved.recipe,
  );
  say(evalText(file, r, test.count, saved.recipe));
  if (o.json) {
    const out = {
      eval: file,
      device: gpu.adapterName,
      precision,
      convKernels: gpu.convKernels,
      batchSize,
      testImages: test.count,
      valAcc: r.valAcc,
      valLoss: r.valLoss,
    };
    await writeFileAtomic(o.json, JSON.stringify(out, null, 2) + "\n");
    say(`results written to ${o.json}`);
  }
  releaseGpu(gpu);
}

/**
 * --eval's batch size: without --batch-size, the file's. One the command line would refuse (or, in evalPrecision,
 * one this GPU cannot run) is then the file's fault, not a flag the user gave, and --batch-size overrides it.
 */
export function evalBatchSize(saved: SavedNetwork, o: CliOptions, file: string) {
  const fromFile = !o.explicit.includes("batch-size"), sizes = FLAG_RANGES["batch-size"];
  const size = fromFile ? saved.evalBatchSize : o.batchSize;
  if (fromFile && !(size >= sizes.min && size <= sizes.max)) {
    throw new Error(
      `${file} has evalBatchSize ${size}, outside ${sizes.min}..${sizes.max}: ` +
        `pass --batch-size N (${sizes.min}..${sizes.max}) to override it`,
    );
  }
  return { size, fromFile };
}

/** --eval's precision (the file's, unless --precision says), checked on `gpu`, with the batch size checked to fit. */
export function evalPrecision(
  gpu: Gpu,
  saved: SavedNetwork,
  o: CliOptions,
  file: string,
  batch: { size: number; fromFile: boolean },
): DType {
  const precision = o.explicit.includes("precision") ? o.precision : saved.precision;
  checkPrecision(gpu, precision);
  if (batch.fromFile) {
    try {
      checkFits(gpu, batch.size, saved.baseDepth, precision, saved.recipe);
    } catch (e) {
      // the network itself does not fit: said as it is
      checkFits(gpu, FLAG_RANGES["batch-size"].min, saved.baseDepth, precision, saved.recipe);
      throw new Error(
        `${file} has evalBatchSize ${batch.size}, too large for this GPU (--batch-size overrides it): ${errorText(e)}`,
      );
    }
  }
  return precision;
}

/** --eval's line (the page's too). */
export const evalText = (file: string, r: { valAcc: number; valLoss: number }, images: number, h: Hyp) =>
  `${file}: test accuracy ${(100 * r.valAcc).toFixed(2)}% | test loss ${r.valLoss.toFixed(4)} | ` +
  `${images} images, ${ttaText(h.misc.finalTtaLevel)}`;

/** A file written by --save, checked whole (tensors, values and metadata) before anything else runs. */
export async function readSavedNetwork(file: string): Promise<SavedNetwork> {
  return savedNetwork(await readSafetensorsFile("--eval", file), file);
}

export type SavedNetwork = ReturnType<typeof savedNetwork>;

/** A --save file's bytes (`file` names it in the messages), checked whole: what --eval and the page's drop read. */
export function savedNetwork(bytes: Uint8Array, file: string) {
  const { weights, metadata } = decodeSafetensors(bytes, file);
  const bad = (why: string) => new Error(`${file} ${why}: save the network again with --save`);
  // a metadata value as the line shows it: quoted (so " 4 " shows its spaces, and a newline stays in one line), short
  const shown = (v: string | undefined) =>
    v === undefined ? "none" : JSON.stringify(v.length > 80 ? `${v.slice(0, 80)}...` : v);
  if (metadata.format !== SAVED_FORMAT) {
    throw bad(`is not a network saved by main.ts (format ${shown(metadata.format)})`);
  }
  // only a file without them is an older main.ts's; statistics that do not parse (a NaN: JSON has none) are corrupt
  if (metadata.norm === undefined) throw bad("has no normalisation statistics (saved by an older main.ts)");
  let norm: ChannelStats | undefined;
  try {
    norm = JSON.parse(metadata.norm);
    if (hiddenKey(metadata.norm) !== undefined) norm = undefined; // a key twice: which one was meant?
  } catch {
    norm = undefined;
  }
  const stat = (xs: unknown, positive: boolean) =>
    Array.isArray(xs) && xs.length === 3 && xs.every((x) => Number.isFinite(x) && (!positive || x > 0));
  if (!norm || !stat(norm.mean, false) || !stat(norm.std, true)) {
    throw bad(`has corrupt normalisation statistics ${shown(metadata.norm)}`);
  }
  // as strictly as the command line: Number() would also take "0x4", " 4 ", "4.0" and "1e1"
  const integer = (key: "baseDepth" | "evalBatchSize") => {
    if (!/^(0|[1-9][0-9]*)$/.test(metadata[key] ?? "")) {
      throw bad(`has ${key} ${shown(metadata[key])}, not a decimal integer`);
    }
    return Number(metadata[key]);
  };
  // the batch size's range is evalMain's to check: --batch-size overrides it
  const baseDepth = integer("baseDepth"), evalBatchSize = integer("evalBatchSize");
  const width = weights.get("conv_group_1.conv1.weight")?.shape[3], depths = FLAG_RANGES["base-depth"];
  if (!(baseDepth >= depths.min && baseDepth <= depths.max)) {
    throw bad(`claims base depth ${metadata.baseDepth}, outside ${depths.min}..${depths.max}`);
  }
  if (baseDepth !== width) {
    throw bad(`says base depth ${metadata.baseDepth} but conv_group_1.conv1.weight is ${width} wide`);
  }
  // hlb's files name its version; the other recipes their name
  const recipe = metadata.recipe === RECIPE_VERSION ? hyp : RECIPES[metadata.recipe ?? ""];
  if (!recipe || metadata.recipe === "hlb") throw bad(`has an unknown recipe ${shown(metadata.recipe)}`);
  // nothing the network does not have (evaluateWeights checks that it has everything, at the right shapes)
  const names = layoutState(stateSpec(baseDepth, recipe)).entries;
  const unknown = [...weights.keys()].find((name) => !names.has(name));
  if (unknown !== undefined) {
    throw bad(`holds ${shown(unknown)}, a tensor not in the network of base depth ${baseDepth}`);
  }
  if (metadata.precision !== "f32" && metadata.precision !== "f16") {
    throw bad(`has a bad precision ${shown(metadata.precision)}`);
  }
  return { weights, norm, baseDepth, evalBatchSize, precision: metadata.precision as DType, recipe };
}

// =================================================================================================
// 11. The browser page (--web): the same script trains in a tab, on the browser's WebGPU
// =================================================================================================

/**
 * --web: a page that trains with this very script, bundled for the browser (so a fork serves itself): the same flags
 * (the page's URL query, checked by parseQuery), the same seeds, the table live, the curves, and the run log (offered
 * for download). The page is one self-contained HTML file (the bundle, the kernels and the script's text inside), the
 * WEB_PAGE string below: one copy of the training code, no second file at the top level. Served here, it gets its
 * data from this server and its run log is kept in --log-dir like a terminal run's; written with --static FILE.html,
 * it needs no server at all and asks for the official tarball.
 */
async function webMain(o: CliOptions) {
  const query = new URLSearchParams(
    o.explicit.filter((k) => PAGE_FLAGS.includes(k)).map((k) => {
      const v = (o as unknown as Record<string, unknown>)[k.replace(/-(\w)/g, (_, c) => c.toUpperCase())];
      return [k, String(v)];
    }),
  );
  const search = query.size ? `?${query}` : "";
  if (o.static) {
    await checkWritableFile("--static", o.static);
    const page = new TextEncoder().encode(await webPage({ server: false }));
    await writeBytesAtomic(o.static, page);
    say(`training page written to ${o.static} (${(page.length / 1e6).toFixed(1)} MB, needs no server)`);
    say(`open ${pathToFileURL(resolve(o.static))}${search}, or put the file on any web server;`);
    say(`it asks for the official ${CIFAR10_URL.split("/").pop()} (${CIFAR10_URL})`);
    return;
  }
  const logDir = o.logDir ?? defaultLogDir();
  if (!o.noLog) await checkWritableFolder("--log-dir", logDir); // before anything long starts, as in main
  // The port first (a busy one is said at once), then the dataset, checked (downloaded if need be) and loaded once
  // whole: the page's subsets are its first images, so every request is a slice of the same arrays.
  const secret = randomHex(16), ready = Promise.withResolvers<Served>();
  ready.promise.catch(() => {}); // a failure below is thrown from here; requests then only wait for the shutdown
  const handler = (req: Request) => serveRequest(req, port, secret, ready.promise);
  let server: Deno.HttpServer<Deno.NetAddr>, port: number;
  try {
    server = Deno.serve({ hostname: "127.0.0.1", port: o.port ?? 0, onListen() {} }, handler);
    port = server.addr.port;
  } catch (e) {
    if (!(e instanceof Deno.errors.AddrInUse)) throw e;
    throw new Error(`--port ${o.port} is in use (another server?): pick another, or leave --port out for a free one`);
  }
  try {
    const { dir, source } = await datasetDir(o);
    const cifar = await loadCifar10(dir, { source });
    const script = await scriptSource();
    ready.resolve({ page: await webPage({ server: true }), cifar, script, logDir: o.noLog ? undefined : logDir });
  } catch (e) {
    ready.reject(e);
    await server.shutdown();
    throw e;
  }
  say(`training page: http://127.0.0.1:${port}/${secret}/${search}`);
  say("(the page trains on this browser's WebGPU; Ctrl-C here stops the server)");
  await server.finished;
}

/** What the --web server holds once ready: the page, the whole dataset, this script's text, where logs go. */
interface Served {
  page: string;
  cifar: Cifar10;
  script: string;
  logDir?: string; // undefined with --no-log
}

// The server's limits: a run log is ~200 kB (the script's text is inside); tickets are one per page served.
const MAX_LOG_BYTES = 2 ** 21, MAX_TICKETS = 1000;
const SERVED_TICKETS = new Map<string, boolean>(); // ticket -> a log was kept for it
const FINAL_STATUSES: RunStatus[] = ["completed", "interrupted", "diverged", "failed"];
const SERVER_STARTED = Date.now();

/**
 * One request to the --web server. It serves one page, its data and the keeping of its run log, to the browser that
 * opened the printed address; every other request gets a plain refusal (the threat model is in the README):
 * - the Host must be this server's (no DNS rebinding), an Origin this server's, the path start with the secret;
 * - GET / (the page, with a fresh ticket inside), GET /data/<array>?subsets, POST /log (JSON, under MAX_LOG_BYTES);
 * - a log is kept only if it is a finished run log of this very script, from a page this server served, once.
 */
async function serveRequest(req: Request, port: number, secret: string, ready: Promise<Served>): Promise<Response> {
  const refuse = (status: number, error: string) => Response.json({ error }, { status });
  const url = new URL(req.url), ours = [`127.0.0.1:${port}`, `localhost:${port}`];
  if (!ours.includes(req.headers.get("host") ?? "")) return refuse(421, "this server answers only 127.0.0.1");
  const origin = req.headers.get("origin");
  if (origin !== null && !ours.some((h) => origin === `http://${h}`)) return refuse(403, "cross-origin request");
  const prefix = `/${secret}/`;
  if (!url.pathname.startsWith(prefix)) return refuse(404, "not found: open the address the server printed");
  const path = url.pathname.slice(prefix.length - 1);
  const served = await ready;
  try {
    if (path === "/" || path.startsWith("/data/")) {
      if (req.method !== "GET") return refuse(405, `${req.method} is not served here`);
    } else if (path === "/log") {
      if (req.method !== "POST") return refuse(405, `${req.method} is not served here`);
      if (req.headers.get("content-type") !== "application/json") return refuse(415, "a run log is application/json");
    } else return refuse(404, "not found");
    if (path === "/") {
      const ticket = randomHex(16);
      if (SERVED_TICKETS.size >= MAX_TICKETS) SERVED_TICKETS.delete(SERVED_TICKETS.keys().next().value!);
      SERVED_TICKETS.set(ticket, false);
      return new Response(served.page.replace(TICKET_PLACEHOLDER, ticket), {
        headers: { "content-type": "text/html; charset=utf-8", "cache-control": "no-store" },
      });
    }
    const part = path.match(/^\/data\/(trainImages|trainLabels|testImages|testLabels)$/)?.[1] as keyof Cifar10;
    if (part) {
      const f = parseQuery(url.search), train = part.startsWith("train");
      const n = (train ? f.trainSubset : f.testSubset) ?? (train ? served.cifar.trainLabels : served.cifar.testLabels)
        .length;
      const bytes = part.endsWith("Images") ? n * IMAGE_BYTES : n;
      return new Response(served.cifar[part].subarray(0, bytes) as Uint8Array<ArrayBuffer>);
    }
    const ticket = req.headers.get("x-page-ticket") ?? "";
    if (SERVED_TICKETS.get(ticket) !== false) return refuse(403, "no page of this server asked to keep this log");
    const log = checkPostedLog(await readBody(req, MAX_LOG_BYTES), served.script);
    SERVED_TICKETS.set(ticket, true); // one log per page served
    if (!served.logDir) return Response.json({ path: null });
    const file = await writeLogFile(served.logDir, log, new Date(log.startedAt));
    say(`run log from the page (status ${log.status}): ${file}`);
    return Response.json({ path: file });
  } catch (e) {
    return refuse(e instanceof TooLarge ? 413 : 400, errorText(e));
  }
}

class TooLarge extends Error {}

/** A request's body as text, refused past `max` bytes (read no further: a huge body never sits in memory). */
async function readBody(req: Request, max: number): Promise<string> {
  if (Number(req.headers.get("content-length")) > max) throw new TooLarge(`a run log is under ${max} bytes`);
  const chunks: Uint8Array[] = [];
  let total = 0;
  for await (const chunk of req.body ?? []) {
    total += chunk.length;
    if (total > max) throw new TooLarge(`a run log is under ${max} bytes`);
    chunks.push(chunk);
  }
  return new TextDecoder("utf-8", { fatal: true }).decode(concatBytes(chunks));
}

/**
 * A posted run log, kept only if it is one of this script's: the same text (so the same sha256), a final status,
 * a start within the server's lifetime, the fields runLogContent writes and no others.
 */
function checkPostedLog(text: string, script: string) {
  // deno-lint-ignore no-explicit-any
  const log: any = JSON.parse(text);
  const unknown = Object.keys(log ?? {}).find((k) => !RUN_LOG_KEYS.includes(k));
  if (typeof log !== "object" || log === null || Array.isArray(log) || unknown !== undefined) {
    throw new Error(`not a run log of main.ts${unknown ? ` (it has "${unknown.slice(0, 40)}")` : ""}`);
  }
  if (log.script?.source !== script) throw new Error("a run log of another script: not kept");
  if (!FINAL_STATUSES.includes(log.status)) throw new Error("a run log is posted once its run has ended");
  const started = Date.parse(log.startedAt);
  if (!(started >= SERVER_STARTED - 60_000 && started <= Date.now() + 60_000)) {
    throw new Error("a run log started while this server ran: not this one");
  }
  if (!Array.isArray(log.runs)) throw new Error("not a run log of main.ts");
  return log as { status: RunStatus; startedAt: string; script: { sha256: string } };
}

// in WEB_PAGE's <head>, the first of its kind in the page (the config below it holds this script's text)
/** The fields of a run log (runLogContent's). */
const RUN_LOG_KEYS = [
  "status",
  "startedAt",
  "finishedAt",
  "script",
  "kernelDir",
  "kernels",
  "deno",
  "device",
  "precision",
  "convKernels",
  "convChoice",
  "limits",
  "peakGpuBytes",
  "flags",
  "hyp",
  "runs",
  "partial",
  "resumed",
  "meanEmaValAcc",
  "stdEmaValAcc",
];
const TICKET_PLACEHOLDER = "@@page-ticket@@";
/** `bytes` random bytes in hex: the server's secret, a page's ticket. */
const randomHex = (bytes: number) => hex(crypto.getRandomValues(new Uint8Array(bytes)));
const concatBytes = (chunks: Uint8Array[]) => {
  const out = new Uint8Array(chunks.reduce((n, c) => n + c.length, 0));
  chunks.reduce((at, c) => (out.set(c, at), at + c.length), 0);
  return out;
};

/** What the page carries (WEB_PAGE's config): the bundles, the kernels, the script's text, and where data come from. */
export interface WebConfig {
  server: boolean; // data and the run log's keeping from the server that sent the page; else the tarball, a download
  md5: string; // the tarball's expected md5
  main: string; // this script, bundled for the browser
  plot: string | null; // bench/plot.ts, bundled (the curves), if this checkout has it
  kernels: KernelTexts;
  script: { path: string; source: string }; // for the run log
}

/** The page, self-contained: WEB_PAGE with its config (see WebConfig) inside. `md5` is for tests' own tarballs. */
export async function webPage(o: { server: boolean; md5?: string }): Promise<string> {
  const script = fileURLToPath(import.meta.url), plot = fileURLToPath(new URL("./bench/plot.ts", import.meta.url));
  const config: WebConfig = {
    server: o.server,
    md5: o.md5 ?? CIFAR10_MD5,
    main: await bundleForBrowser(script),
    plot: await exists(plot) ? await bundleForBrowser(plot) : null,
    kernels: await readKernelTexts(new URL(KERNEL_DIR, import.meta.url)),
    script: { path: script, source: await scriptSource() },
  };
  // JSON inside a <script> element: "<" escaped, so that no "</script>" in the texts ends it
  return WEB_PAGE.replace("{/*config*/}", () => JSON.stringify(config).replace(/</g, "\\u003c"));
}

/**
 * `path` bundled into one browser module (deno bundle). The node: imports (path, url, util) only serve the
 * terminal (files, flags); in the browser they stand for functions that say so if ever called.
 */
export async function bundleForBrowser(path: string): Promise<string> {
  const out = await Deno.makeTempFile({ suffix: ".js" });
  try {
    const r = await new Deno.Command(Deno.execPath(), {
      args: ["bundle", "--quiet", "--platform", "browser", "--format", "esm", "-o", out, path],
      stdout: "piped",
      stderr: "piped",
    }).output();
    if (!r.success) {
      const why = new TextDecoder().decode(r.stderr).trim().split("\n").pop();
      throw new Error(`could not bundle ${path} for the browser (${why}): check that it runs with deno run first`);
    }
    return (await Deno.readTextFile(out)).replace(
      /^import \{([^}]*)\} from "node:(\w+)";$/gm,
      (_, names: string, module: string) =>
        names.split(",").map((n) => n.trim().split(/\s+as\s+/)).filter(([n]) => n).map(([n, local = n]) =>
          `const ${local} = () => { throw new Error("node:${module} ${n} is not available in the browser"); };`
        ).join("\n"),
    );
  } finally {
    await Deno.remove(out).catch(() => {});
  }
}

/** The message a page's worker posts (see webWorker). */
export type WebMessage =
  | { type: "status"; text: string }
  | { type: "note"; text: string } // a line of its own above the table, as the terminal prints it
  | { type: "device"; name: string; header: string }
  | { type: "run"; run: number; runs: number; seed: number }
  | { type: "step"; progress: Progress; runsAfter: number }
  | { type: "row"; row: EpochMetrics }
  | { type: "result"; result: RunResult }
  | { type: "log"; log: unknown }
  | { type: "error"; message: string }
  | { type: "end"; status: RunStatus } // the last message of every start, whether or not a run log came
  | { type: "answers"; answers: Answers } // after a completed run, or a WebEvaluate
  | { type: "classified"; logits: Float32Array } // a WebClassify's answer
  | { type: "answerError"; message: string }; // a WebEvaluate or a WebClassify refused

/** A network's answers on the page's test set: --eval's line, each image's logits, the grid's images. */
export interface Answers {
  text: string;
  logits: Float32Array; // [test images][10], as evaluateWeights counts its accuracy on them
  labels: Uint8Array; // the test set's
  images: Uint8Array; // the first GRID_IMAGES test images, CHW bytes
  saved?: Uint8Array; // a trained network's --save file (savedFile), for the page to offer
}

/** What the page sends its worker to evaluate a dropped --save file: as WebStart, the file instead of a run. */
export type WebEvaluate = Omit<WebStart, "type" | "resume"> & { type: "evaluate"; file: File };
/** The visitor's image, 32 x 32 in the dataset's layout (imageFromRgba), for the network the page answers with. */
export type WebClassify = { type: "classify"; pixels: Uint8Array };

/**
 * What the page sends its worker to start: the flags, the page's config, and the tarball chosen (no server) or the
 * page's address (its server's; a worker made from a blob has no address of its own to resolve "data/" against).
 */
export type WebStart = {
  type: "start";
  flags: CliOptions;
  config: Omit<WebConfig, "main" | "plot">;
  tarball?: File;
  page: string;
  resume?: Uint8Array; // the checkpoint this browser kept (keptCheckpoint), to continue its run
};

// The page's checkpoint: one file in the origin's private file system (OPFS), rewritten at the start and after every
// epoch (createWritable commits on close: a reload mid-write keeps the previous one), removed when the runs are done.
const KEPT_CHECKPOINT = "hlb-cifar10-checkpoint.safetensors";
const KEPT = "the checkpoint kept in this browser";

/** The little of the File System API the page uses (Deno's types have none of it). */
interface OpfsDirectory {
  getFileHandle(name: string, o?: { create?: boolean }): Promise<{
    getFile(): Promise<Blob>;
    createWritable(): Promise<{ write(b: Uint8Array<ArrayBuffer>): Promise<void>; close(): Promise<void> }>;
  }>;
  removeEntry(name: string): Promise<void>;
}
/** The origin's private file system, where the browser has one for this page. */
function opfs(): Promise<OpfsDirectory> {
  const storage = (navigator as unknown as { storage?: { getDirectory?(): Promise<OpfsDirectory> } }).storage;
  if (!storage?.getDirectory) throw new Error("no origin private file system here");
  return storage.getDirectory();
}

/** The checkpoint this browser keeps for the page, if any (undefined where the page has no origin storage). */
export async function keptCheckpoint(): Promise<Uint8Array | undefined> {
  try {
    const dir = await opfs();
    return new Uint8Array(await (await (await dir.getFileHandle(KEPT_CHECKPOINT)).getFile()).arrayBuffer());
  } catch {
    return undefined;
  }
}

/** Keeps `bytes` as the page's checkpoint (or, with none, removes it). */
export async function keepCheckpoint(bytes?: Uint8Array) {
  const dir = await opfs();
  if (!bytes) return await dir.removeEntry(KEPT_CHECKPOINT).catch(() => {});
  const file = await (await dir.getFileHandle(KEPT_CHECKPOINT, { create: true })).createWritable();
  await file.write(bytes as Uint8Array<ArrayBuffer>);
  await file.close();
}

/**
 * Whether the page can offer to resume checkpoint `c` with the flags of its address: the run not finished, and every
 * flag the address gives the checkpoint's (those it leaves out come from the checkpoint, as with --resume).
 */
export function resumable(c: Checkpoint, flags: CliOptions): boolean {
  const o = checkFlags(c.flags), plan = trainingPlan(o.trainSubset ?? 50_000, o.batchSize, o.epochs);
  if (c.run === o.runs && c.train.epoch >= plan.numEpochs) return false;
  try {
    resumeFlags({ ...flags, resume: KEPT }, c);
    return true;
  } catch {
    return false;
  }
}

/**
 * The worker's side of the page: trains as `main` does, with the flags the page sends (a WebStart), on data from the
 * server or the tarball, and posts what the table needs; {type: "stop"} is the Ctrl-C of the page. After a run, and
 * for a --save file dropped on the page (a WebEvaluate, --eval's checks), it posts the network's answers on the test
 * set, then keeps that network, and a GPU, to classify the visitor's own images (a WebClassify). `scope` is the
 * Worker's global, or a MessagePort where the page has no Worker (opened from a file).
 */
export function webWorker(scope: {
  postMessage(message: WebMessage): void;
  addEventListener(type: "message", listener: (e: MessageEvent) => void): void;
}) {
  let stopRequested = false, answering: { gpu: Gpu; net: PageNetwork } | undefined;
  const forget = () => {
    if (answering && !answering.gpu.released) releaseGpu(answering.gpu);
    answering = undefined;
  };
  const pageGpu = (o: CliOptions, config: WebStart["config"]) =>
    initGpu({ convKernels: o.convKernels, featureLevel: o.featureLevel, kernels: config.kernels });
  /** `net` evaluated on `test` as --eval does, with each image's logits. */
  const evaluateNet = (gpu: Gpu, net: PageNetwork, test: GpuImages, batchSize = net.batchSize) =>
    evaluateWeights(gpu, { test, norm: net.norm }, net.weights, batchSize, net.source, net.precision, net.h, true);
  /** The answers of `net` on the test set of `cifar` (uploaded as `test`): posted, and `net` kept on `gpu`. */
  const answer = async (gpu: Gpu, net: PageNetwork, test: GpuImages, cifar: Cifar10, saved?: Uint8Array) => {
    const r = await evaluateNet(gpu, net, test);
    const images = cifar.testImages.slice(0, Math.min(test.count, GRID_IMAGES) * IMAGE_BYTES);
    const text = evalText(net.source, r, test.count, net.h);
    scope.postMessage({
      type: "answers",
      answers: { text, logits: r.logits!, labels: cifar.testLabels, images, saved },
    });
    answering = { gpu, net };
  };
  scope.addEventListener("message", async (e: MessageEvent) => {
    if (e.data?.type === "stop") stopRequested = true;
    if (e.data?.type === "classify") await classify((e.data as WebClassify).pixels);
    if (e.data?.type === "evaluate") {
      forget();
      await evaluate(e.data as WebEvaluate);
    }
    if (e.data?.type !== "start") return;
    forget();
    stopRequested = false; // a page without a server may train again, with the same worker
    const { flags, config, tarball, page, resume } = e.data as WebStart, startedAt = new Date(), runs: RunResult[] = [];
    let gpu: Gpu | undefined, partial: PartialRun | undefined, status: RunStatus = "completed", resumedAt, o = flags;
    try {
      const resumed = resume ? await decodeCheckpoint(resume, KEPT) : undefined;
      if (resumed) o = resumeFlags({ ...flags, resume: KEPT }, resumed);
      gpu = await pageGpu(o, config);
      checkPrecision(gpu, o.precision);
      checkFits(gpu, o.batchSize, o.baseDepth, o.precision, RECIPES[o.recipe]); // as main: before any data is read
      const here = { script: await sha256(config.script.source), kernels: await kernelHashes(gpu) };
      const why = resumed && checkpointMismatch(resumed, here);
      if (why) throw new Error(`${KEPT} ${why}: start over`);
      if (tarball) scope.postMessage({ type: "status", text: `checking and unpacking ${tarball.name}` });
      const cifar = tarball
        ? await cifarFromTarball(tarball, { trainSubset: o.trainSubset, testSubset: o.testSubset, md5: config.md5 })
        : await serverCifar(o, page);
      const dataMark = gpu.allocated.length, data = uploadDataset(gpu, cifar, RECIPES[o.recipe]);
      if (resumed && JSON.stringify(resumed.norm) !== JSON.stringify(data.norm)) {
        throw new Error(`${KEPT} was written for other training images: start over`);
      }
      scope.postMessage({ type: "device", name: gpu.adapterName, header: headerLine(gpu, o, data) });
      if (resumed) {
        scope.postMessage({ type: "note", text: resumeText(KEPT, resumed, gpu) });
        resumedAt = { checkpoint: KEPT, run: resumed.run, epoch: resumed.train.epoch, interrupted: null };
        runs.push(...resumed.done);
      }
      let keeping = true; // false once this browser refused to keep one (no origin storage, say): said once
      const keep = async (c: Checkpoint) => {
        if (!keeping) return;
        try {
          await keepCheckpoint(await encodeCheckpoint(c));
        } catch (err) {
          keeping = false;
          scope.postMessage({ type: "note", text: `this browser keeps no checkpoint of the run (${errorText(err)})` });
        }
      };
      for (let r = resumed ? resumed.run - 1 : 0; r < o.runs && !stopRequested; r++) {
        const seed = (o.seed + r) >>> 0, from = r === (resumed?.run ?? 0) - 1 ? resumed : undefined;
        partial = { run: r + 1, seed, epochs: from ? [...from.train.epochs] : [] };
        scope.postMessage({ type: "run", run: r + 1, runs: o.runs, seed });
        for (const row of from?.train.epochs ?? []) scope.postMessage({ type: "row", row });
        const first = resumed?.startedAt ?? startedAt.toISOString();
        const result = await train({
          ...trainOptions(gpu, data, o, seed),
          returnWeights: r === o.runs - 1, // the page's answers come from the last run's network
          resume: from?.train,
          onCheckpoint: (state) =>
            keep(
              checkpointOf({
                o,
                gpu: gpu!,
                here,
                norm: data.norm,
                startedAt: first,
                run: r + 1,
                done: runs,
                train: state,
              }),
            ),
          onStep: (p) => scope.postMessage({ type: "step", progress: p, runsAfter: o.runs - r - 1 }),
          onEpoch: (row) => (partial!.epochs.push(row), scope.postMessage({ type: "row", row })),
          stop: () => stopRequested,
        });
        partial = undefined;
        runs.push(result);
        scope.postMessage({ type: "result", result });
        if (result.interrupted) status = "interrupted";
      }
      if (status === "completed" && keeping) await keepCheckpoint().catch(() => {}); // nothing left to resume
      const last = runs.at(-1);
      if (status === "completed" && last?.weights) {
        scope.postMessage({ type: "status", text: "the trained network answers the test set" });
        const source = `the network of run ${runs.length} (seed ${last.seed})`, { batchSize, precision } = o;
        const net = { source, weights: last.weights, norm: data.norm, h: RECIPES[o.recipe], batchSize, precision };
        // a run that answered nothing (out of memory, say) is still a completed run: said apart, the run log kept
        await answer(gpu, net, data.test, cifar, savedFile(last.weights, data.norm, o)).catch((err) =>
          scope.postMessage({ type: "answerError", message: errorText(err) })
        );
        freeSince(gpu, dataMark); // the dataset: the network and the GPU stay, for the visitor's own images
      }
    } catch (err) {
      status = err instanceof TrainingDiverged ? "diverged" : "failed";
      if (partial) partial.error = errorText(err);
      if (partial && err instanceof TrainingDiverged) [partial.epoch, partial.step] = [err.epoch, err.step];
      scope.postMessage({ type: "error", message: errorText(err) });
    }
    if (gpu) {
      const runtime = { browser: navigator.userAgent };
      const log = await runLogContent({
        gpu,
        flags: o,
        runs,
        startedAt,
        script: config.script,
        runtime,
        status,
        partial,
        resumed: resumedAt,
      });
      scope.postMessage({ type: "log", log });
      if (answering?.gpu !== gpu) releaseGpu(gpu);
    }
    scope.postMessage({ type: "end", status });
  });

  /** --eval on the page: a dropped --save file, checked as --eval checks it, answers the page's test set. */
  async function evaluate({ file, flags, config, tarball, page }: WebEvaluate) {
    let gpu: Gpu | undefined;
    try {
      const saved = savedNetwork(new Uint8Array(await file.arrayBuffer()), file.name);
      const batch = evalBatchSize(saved, flags, file.name);
      gpu = await pageGpu(flags, config);
      const precision = evalPrecision(gpu, saved, flags, file.name, batch);
      scope.postMessage({ type: "status", text: `${file.name}: reading the test set` });
      const cifar = tarball
        ? await cifarFromTarball(tarball, { trainSubset: 0, testSubset: flags.testSubset, md5: config.md5 })
        : await serverCifar({ ...flags, trainSubset: 0 }, page);
      const test = uploadImages(gpu, cifar.testImages, cifar.testLabels);
      const net = { source: file.name, ...saved, batchSize: batch.size, precision, h: saved.recipe };
      await answer(gpu, net, test, cifar);
      scope.postMessage({ type: "status", text: "" });
    } catch (err) {
      if (gpu && answering?.gpu !== gpu) releaseGpu(gpu);
      scope.postMessage({ type: "answerError", message: errorText(err) });
    }
  }

  /** The visitor's image (32 x 32, the dataset's layout) through the kept network, as the test set went. */
  async function classify(pixels: Uint8Array) {
    if (!answering) {
      return scope.postMessage({ type: "answerError", message: "no network yet: train one, or drop a --save file" });
    }
    const { gpu, net } = answering, mark = gpu.allocated.length;
    try {
      // one image: a batch of its TTA views (2 at least, the smallest batch)
      const test = uploadImages(gpu, pixels, new Uint8Array(1));
      const r = await evaluateNet(gpu, net, test, Math.max(2, TTA_VIEWS[net.h.misc.finalTtaLevel]));
      scope.postMessage({ type: "classified", logits: r.logits! });
    } catch (err) {
      scope.postMessage({ type: "answerError", message: errorText(err) });
    } finally {
      if (!gpu.released) freeSince(gpu, mark);
    }
  }
}

/** A network the page answers with: the last run's, or a dropped --save file's; `source` names it. */
interface PageNetwork {
  source: string;
  weights: Weights;
  norm: ChannelStats;
  h: Hyp;
  batchSize: number;
  precision: DType;
}

/** The test images the page shows with the network's answers (the first ones of the test set). */
export const GRID_IMAGES = 48;

/** The page's two bars: where the epoch and the run are, in steps, and the terminal's estimate of the time left. */
export function progressBars(p: Progress, run: number, runs: number) {
  const left = timeLeftText(p, runs - run);
  return {
    epoch: p.step / p.steps,
    run: p.stepsDone / p.totalSteps,
    epochText: `epoch ${p.epoch} (${p.numEpochs} in all, from 0): step ${p.step} of ${p.steps}`,
    runText: `run ${run} of ${runs}: step ${p.stepsDone} of ${p.totalSteps} | ${durationText(p.wallSeconds)} elapsed` +
      (left ? ` | ${left}` : ""),
  };
}

/** The class of each row of `logits` ([images][classes]): its largest (the first of equals, as the GPU counts). */
export function predictedClasses(logits: Float32Array, classes: number): Uint8Array {
  const out = new Uint8Array(logits.length / classes);
  for (let i = 0; i < out.length; i++) {
    const row = logits.subarray(i * classes, (i + 1) * classes);
    out[i] = row.indexOf(Math.max(...row));
  }
  return out;
}

/** Each row of `logits` ([rows][classes]) as probabilities (softmax, its max subtracted first: no overflow). */
export function softmaxRows(logits: Float32Array, classes: number): Float32Array {
  const out = new Float32Array(logits.length);
  for (let at = 0; at < logits.length; at += classes) {
    const row = logits.subarray(at, at + classes), max = Math.max(...row);
    let sum = 0;
    for (let c = 0; c < classes; c++) sum += out[at + c] = Math.exp(row[c] - max);
    for (let c = 0; c < classes; c++) out[at + c] /= sum;
  }
  return out;
}

/** counts[true class][predicted class] over the test set: its rows sum to each class's images, the whole to all. */
export function confusionMatrix(predicted: Uint8Array, labels: Uint8Array, classes: number): number[][] {
  const counts = Array.from({ length: classes }, () => new Array(classes).fill(0));
  predicted.forEach((p, i) => counts[labels[i]][p]++);
  return counts;
}

/** The `k` most probable classes of one image's probabilities, most probable first. */
export const topClasses = (probabilities: Float32Array, k: number) =>
  [...probabilities].map((p, c) => ({ c, p })).sort((a, b) => b.p - a.p || a.c - b.c).slice(0, k);

/** A 32 x 32 RGBA picture (a canvas's pixels; alpha ignored) in the dataset's layout: CHW bytes. */
export function imageFromRgba(rgba: ArrayLike<number>): Uint8Array {
  const plane = IMAGE_SIDE * IMAGE_SIDE, out = new Uint8Array(3 * plane);
  for (let i = 0; i < plane; i++) for (let ch = 0; ch < 3; ch++) out[ch * plane + i] = rgba[4 * i + ch];
  return out;
}

/** One image in the dataset's layout (CHW bytes) as opaque RGBA, to draw on a canvas. */
export function rgbaFromImage(chw: Uint8Array): Uint8ClampedArray<ArrayBuffer> {
  const plane = IMAGE_SIDE * IMAGE_SIDE, out = new Uint8ClampedArray(4 * plane).fill(255);
  for (let i = 0; i < plane; i++) for (let ch = 0; ch < 3; ch++) out[4 * i + ch] = chw[ch * plane + i];
  return out;
}

/**
 * The four arrays of the page's subsets, from the server that sent the page (its /data/ answers); with a train subset
 * of 0, no training images are asked for (the page's --eval).
 */
async function serverCifar(o: CliOptions, page: string): Promise<Cifar10> {
  const subsets = new URLSearchParams();
  if (o.trainSubset) subsets.set("train-subset", String(o.trainSubset));
  if (o.testSubset) subsets.set("test-subset", String(o.testSubset));
  const part = async (name: keyof Cifar10) => {
    if (o.trainSubset === 0 && name.startsWith("train")) return new Uint8Array(0);
    const res = await fetch(new URL(`data/${name}?${subsets}`, page));
    if (!res.ok) throw new Error((await res.json()).error);
    return new Uint8Array(await res.arrayBuffer());
  };
  const [trainImages, trainLabels, testImages, testLabels] = await Promise.all(
    (["trainImages", "trainLabels", "testImages", "testLabels"] as const).map(part),
  );
  return { trainImages, trainLabels, testImages, testLabels };
}

/**
 * The page: the settings (a form: the page's flags, checked by parseQuery as the command line's), the device, the
 * table as the terminal prints it, the curves, Stop, and the run log; with no server, first a file picker (and drop)
 * for the tarball. Its config (WebConfig) replaces the {}-comment placeholder. It trains in a module Worker made from
 * the bundle; a page opened from a file gets none (browsers refuse module workers to file: pages), so there the run
 * shares the page's thread, yielding to it at every step.
 */
const WEB_PAGE = `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>hlb-CIFAR10 on WebGPU</title>
<meta name="page-ticket" content="@@page-ticket@@">
<style>
  body { font: 15px system-ui, sans-serif; margin: 2rem; max-width: 72rem; color: #222 }
  pre { font: 12px ui-monospace, monospace; background: #f6f6f6; padding: .8rem; overflow-x: auto }
  #status, #hint { color: #555 } .error { color: #b00020 } button { font-size: 1rem }
  #pick { border: 2px dashed #999; padding: 1rem } #pick.over { background: #eef }
  #fields { border: 0; padding: 0; margin: 0 } #fields div { margin: .25rem 0 }
  #settings { margin-top: 1rem } #fields label { display: inline-block; width: 7.5rem }
  #fields input, #fields select { width: 9rem; box-sizing: border-box }
  #fields .error { margin-left: .8rem }
  #progress div { margin: .2rem 0 } #progress progress { width: 18rem; vertical-align: middle }
  #progress label { display: inline-block; width: 3.5rem }
  #grid { display: flex; flex-wrap: wrap; gap: .4rem } #grid figure { margin: 0; width: 6.2rem; font-size: 12px }
  #grid canvas, #owncanvas { width: 96px; height: 96px; image-rendering: pixelated; display: block }
  #grid figure.wrong canvas { outline: 3px solid #b00020 } #grid figure.right canvas { outline: 1px solid #999 }
  #grid .said { color: #b00020 } #matrix { border-collapse: collapse; font: 12px ui-monospace, monospace }
  #matrix td, #matrix th { border: 1px solid #ddd; padding: .15rem .35rem; text-align: right }
  #own { display: flex; gap: 1rem; align-items: flex-start }
</style></head>
<body>
<h1>hlb-CIFAR10 on WebGPU</h1>
<p id="device">loading...</p>
<div id="pick" hidden>This page has no server: choose the official CIFAR-10 tarball, <code id="tarname"></code>
  (170 MB, from <a id="tarurl"></a>), or drop it here. It is checked (md5) and unpacked in this tab; nothing is uploaded.
  <p><input type="file" id="tarball" accept=".gz,.tgz,application/gzip"></p></div>
<form id="settings" hidden><fieldset id="fields"></fieldset>
  <p id="hint">Empty fields take the recipe's defaults (shown greyed). Start puts the settings in the address: a link
  to it opens this form filled, and a reload keeps them.</p>
  <p><button id="start" type="submit" disabled>Start</button> <span id="formerror" class="error"></span></p></form>
<p id="resume" hidden><span id="resumetext"></span> <button id="resumebtn">Resume</button> (Start starts over)</p>
<p id="netpick">Or evaluate a network saved with <code>--save</code>: choose (or drop) its .safetensors file
  <input type="file" id="netfile" accept=".safetensors" disabled> <span id="neterror" class="error"></span></p>
<p><button id="stop" disabled>Stop</button> <a id="download" hidden download="run-log.json">download the run log</a>
  <span id="status"></span></p>
<div id="progress" hidden>
  <div><label for="pepoch">epoch</label> <progress id="pepoch" max="1" value="0"></progress> <span id="tepoch"></span></div>
  <div><label for="prun">run</label> <progress id="prun" max="1" value="0"></progress> <span id="trun"></span></div>
</div>
<pre id="table"></pre>
<div id="plot"></div>
<section id="answers" hidden>
  <h2>The network's answers</h2>
  <p><span id="answertext"></span> <a id="savenet" hidden>download this network</a></p>
  <p>The first test images, each with its true class and, below it, the class the network gives it with its
  probability. ✓: right; ✗ and a red frame: wrong.</p>
  <div id="grid"></div>
  <h3>Per class: the confusion matrix</h3>
  <p>Each row is a true class, each column the class the network said; the last column is the class's accuracy.</p>
  <table id="matrix"></table>
  <h3>Try your own image</h3>
  <p>Choose (or drop) a picture: its centre square, at 32 x 32 as the network sees it, and the network's three most
  probable classes. <input type="file" id="ownfile" accept="image/*"> <span id="ownerror" class="error"></span></p>
  <div id="own" hidden><canvas id="owncanvas" width="32" height="32"></canvas><ol id="owntop"></ol></div>
</section>
<script type="application/json" id="config">{/*config*/}</script>
<script type="module">
const $ = (id) => document.getElementById(id);
const say = (id, text, error) => { $(id).textContent = text; $(id).className = error ? "error" : ""; };
const config = JSON.parse($("config").textContent);
const blobUrl = (text) => URL.createObjectURL(new Blob([text], { type: "text/javascript" }));
const mainUrl = blobUrl(config.main);
const main = await import(mainUrl);
const plot = config.plot ? await import(blobUrl(config.plot)) : null;
const lines = [], runs = [], results = [];
let live = "";
const show = () => ($("table").textContent = [...lines, live].join("\\n"));
const fail = (message) => { lines.push("error: " + message); $("table").className = "error"; show(); };
function drawCurves() {
  if (!plot || !runs.length || !runs[0].epochs.length) return;
  $("plot").innerHTML = plot.plotSvg([plot.meanCurve("this page", runs)]);
}

// The settings: one field per flag of the form, named as on the command line; the address's other page flags
// (conv-kernels, feature-level) are kept as they are. Every value is checked by parseQuery, the command line's
// checks and messages, and a message naming a field's flag is shown next to that field.
const FIELDS = ["recipe", "epochs", "base-depth", "batch-size", "train-subset", "test-subset", "seed", "precision", "runs"];
const CHOICES = { recipe: Object.keys(main.RECIPES), precision: ["f32", "f16"] };
const given = new URLSearchParams(location.search);
// the recipe's defaults, as parseQuery gives them (a recipe it refuses: the default recipe's)
const defaults = (recipe) => { try { return main.parseQuery(recipe ? "recipe=" + encodeURIComponent(recipe) : ""); } catch { return main.parseQuery(""); } };
for (const name of FIELDS) {
  const row = document.createElement("div"), label = document.createElement("label");
  const input = document.createElement(CHOICES[name] ? "select" : "input"), error = document.createElement("span");
  row.id = "row-" + name;
  label.textContent = name;
  label.htmlFor = input.id = "f-" + name;
  error.id = "e-" + name;
  error.className = "error";
  for (const choice of CHOICES[name] ?? []) input.add(new Option(choice));
  input.value = given.get(name) ?? (CHOICES[name] ? defaults()[name] : "");
  input.oninput = () => check(formValues());
  row.append(label, input, error);
  $("fields").append(row);
}
function placeholders() {
  const d = defaults($("f-recipe").value);
  const shown = { epochs: d.epochs, "base-depth": d.baseDepth, "batch-size": d.batchSize, "train-subset": "all",
    "test-subset": "all", seed: "random", runs: d.runs };
  for (const [name, text] of Object.entries(shown)) $("f-" + name).placeholder = text;
}
$("f-recipe").addEventListener("input", placeholders);
placeholders();
/** The form as the page's flags: empty fields, and the selects at their default, left out. */
function formValues() {
  const values = {}, d = defaults();
  for (const name of FIELDS) {
    const value = $("f-" + name).value.trim();
    if (value && !(CHOICES[name] && value === d[name])) values[name] = value;
  }
  for (const name of main.PAGE_FLAGS) if (!FIELDS.includes(name) && given.has(name)) values[name] = given.get(name);
  return values;
}
/** A message next to the field of the flag it names (the flag it says to change), else below the form. */
function showError(message) {
  const name = message.match(/(?:^|use )--([\\w-]+)/)?.[1];
  const at = FIELDS.includes(name) && !$("row-" + name).hidden ? "e-" + name : "formerror";
  $(at).textContent = message;
}
/** The flags of \`values\`, checked (each value alone, so that every bad field shows its message), or undefined. */
function check(values) {
  for (const span of document.querySelectorAll("#settings .error")) span.textContent = "";
  let ok = true;
  for (const [name, value] of Object.entries(values)) {
    try {
      main.parseQuery(new URLSearchParams({ [name]: value }).toString());
    } catch (e) {
      ok = false;
      showError(e.message);
    }
  }
  try {
    const flags = main.parseQuery(new URLSearchParams(values).toString());
    if (ok) return flags;
  } catch (e) {
    if (ok) showError(e.message);
  }
}

// WebGPU, asked for at once: a visitor without it learns so before choosing anything; the precision field is
// offered only where the adapter has shader-f16 (or where the address names a precision)
let gpuProblem = "", adapter;
if (!("gpu" in navigator)) gpuProblem = main.BROWSER_NO_WEBGPU;
else {
  adapter = await navigator.gpu.requestAdapter().catch(() => null) ??
    await navigator.gpu.requestAdapter({ featureLevel: "compatibility" }).catch(() => null);
  if (!adapter) gpuProblem = main.BROWSER_NO_ADAPTER;
}
$("row-precision").hidden = !adapter?.features.has("shader-f16") && !given.has("precision");
$("settings").hidden = false;
const flagsGiven = check(Object.fromEntries(given));
if (gpuProblem) say("device", "error: " + gpuProblem, true);
else say("device", config.server ? "Choose the settings and press Start: the run trains in this tab." : "");

const worker = location.protocol === "file:" ? inPage() : new Worker(blobUrl(
  'import { webWorker } from "' + mainUrl + '"; webWorker(self);'), { type: "module" });
function inPage() {
  const channel = new MessageChannel();
  main.webWorker(channel.port2);
  channel.port2.start();
  return channel.port1;
}
const { main: _, plot: __, ...shared } = config;
let flags, tarball, running = false, ran = false, posting; // posting: the run log on its way to the server
let evaluating = false, run = { run: 1, runs: 1 }; // evaluating: a dropped --save file; run: the run training
const startable = () => !gpuProblem && !running && (config.server || tarball);
function refresh() {
  $("start").disabled = !startable() || evaluating;
  $("start").textContent = ran ? "Start again" : "Start";
  $("fields").disabled = running;
  $("netfile").disabled = running || evaluating || gpuProblem !== "";
}
// A run: \`f\` checked flags, \`resume\` the checkpoint this browser kept of the address's run, to continue it
const start = (f, resume) => {
  flags = f;
  running = true;
  refresh();
  lines.length = runs.length = results.length = 0;
  live = "";
  show();
  $("table").className = "";
  $("plot").innerHTML = "";
  $("download").hidden = $("resume").hidden = $("pick").hidden = $("answers").hidden = $("progress").hidden = true;
  say("neterror", "");
  $("stop").disabled = false;
  document.title = "hlb-CIFAR10 on WebGPU";
  say("device", "asking for a WebGPU adapter...");
  // browsers give a page opened from a file no module Worker: the run shares this page's thread
  say("status", location.protocol === "file:" ? "opened from a file: training on the page's thread" : "");
  worker.postMessage({ type: "start", flags: f, config: shared, tarball, page: location.href, resume });
};
// the server keeps one run log per page it served: a served page trains again as a new page, started at once
const AGAIN = "hlb-cifar10-start";
$("settings").onsubmit = async (e) => {
  e.preventDefault();
  const values = formValues(), f = check(values);
  if (!f || !startable()) return;
  const query = new URLSearchParams(values).toString();
  history.replaceState(null, "", query ? "?" + query : location.pathname);
  if (ran && config.server) {
    await posting?.catch(() => {}); // the last run's log, kept (or refused) before the page goes
    sessionStorage.setItem(AGAIN, query);
    return location.reload();
  }
  await main.keepCheckpoint().catch(() => {}); // Start starts over: a checkpoint kept of another run is dropped
  start(f);
};
$("stop").onclick = () => { worker.postMessage({ type: "stop" }); say("status", "stopping after the current step"); };
worker.onmessage = async ({ data: m }) => {
  if (m.type === "status") say("status", m.text);
  if (m.type === "note") lines.push(m.text);
  if (m.type === "device") { say("device", m.header); say("status", ""); }
  if (m.type === "run") {
    lines.push("", main.runTitle(m.run, m.runs, m.seed), main.tableHeader());
    runs.push({ epochs: [] });
    run = m;
  }
  if (m.type === "step") {
    live = "|  " + main.stepText(m.progress, m.runsAfter);
    showProgress(main.progressBars(m.progress, run.run, run.runs));
  }
  if (m.type === "row") {
    live = "";
    lines.push(main.formatRow(main.rowValues(m.row)));
    runs.at(-1).epochs.push(m.row);
    drawCurves();
    $("tepoch").textContent = "epoch " + m.row.epoch + ": trained and evaluated";
  }
  if (m.type === "result") {
    lines.push(main.tableRule());
    const r = m.result;
    if (!r.interrupted) {
      $("pepoch").value = $("prun").value = 1;
      $("trun").textContent = "run " + run.run + " of " + run.runs + ": done, " + main.durationText(r.trainSeconds) +
        " of training";
    }
    results.push(r);
    lines.push(r.interrupted ? "stopped in epoch " + r.interrupted.epoch + ", after " + r.interrupted.steps + " steps"
      : main.runResultText(r, main.RECIPES[flags.recipe]));
  }
  if (m.type === "error") {
    fail(m.message);
    showError(m.message); // a batch too large for this adapter, say: also next to its field
    if ($("device").textContent.endsWith("...")) say("device", ""); // no device header came: not still asking
  }
  if (m.type === "end") {
    running = false;
    ran = true;
    $("stop").disabled = true;
    if (!config.server) $("pick").hidden = false; // another tarball may be chosen (the same one stays chosen)
    refresh();
    if (!document.title.startsWith("done: ")) document.title = "done: " + m.status; // no run log came
  }
  if (m.type === "answers") showAnswers(m.answers);
  if (m.type === "classified") showTop(m.logits);
  if (m.type === "answerError") {
    // a dropped file's error next to its input, your own image's next to its; a trained network's below its table
    if (evaluating || !$("answers").hidden) say(evaluating ? "neterror" : "ownerror", "error: " + m.message, true);
    else lines.push("", "error: the trained network gave no answers: " + m.message);
    if (evaluating) say("status", "");
  }
  if (m.type === "answers" || m.type === "answerError") {
    evaluating = false;
    refresh();
  }
  if (m.type === "log") {
    const blob = new Blob([JSON.stringify(m.log, null, 1) + "\\n"], { type: "application/json" });
    $("download").href = URL.createObjectURL(blob);
    $("download").hidden = false;
    let kept = "";
    if (config.server) {
      // the server keeps one run log per page it served: this page's ticket says which
      const ticket = document.querySelector("meta[name=page-ticket]").content;
      const headers = { "content-type": "application/json", "x-page-ticket": ticket };
      posting = fetch("log", { method: "POST", headers, body: JSON.stringify(m.log) }).then((r) => r.json());
      const saved = await posting;
      kept = saved.path ? "; run log also kept at " + saved.path : saved.error ? "; the server kept no run log: " + saved.error : "";
    }
    say("status", "status " + m.log.status + kept);
    if (results.length > 1 && m.log.status === "completed") lines.push("", main.summaryText(results, main.RECIPES[flags.recipe]));
    document.title = "done: " + m.log.status;
  }
  show();
};
worker.onerror = (e) => fail(e.message);

// Progress: the epoch's steps and the run's, with the terminal's estimate of the time left (main.progressBars)
function showProgress(bars) {
  $("progress").hidden = false;
  $("pepoch").value = bars.epoch;
  $("prun").value = bars.run;
  $("tepoch").textContent = bars.epochText;
  $("trun").textContent = bars.runText;
}

// The network's answers (after a run, or for a dropped --save file): --eval's line, the grid, the confusion matrix.
// Colour marks the mistakes and shades the matrix, but every one is also said in text (✗, the numbers).
const CLASSES = main.CIFAR10_CLASSES, SHORT = ["plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"];
const percent = (p) => (100 * p).toFixed(1) + "%";
function showAnswers(a) {
  const n = a.labels.length, k = CLASSES.length, predicted = main.predictedClasses(a.logits, k);
  const probabilities = main.softmaxRows(a.logits, k);
  $("answers").hidden = false;
  $("answertext").textContent = a.text;
  // a trained network: the file --save writes, to keep, to drop on this page again, or to give --eval
  $("savenet").hidden = !a.saved;
  if (a.saved) {
    $("savenet").href = URL.createObjectURL(new Blob([a.saved], { type: "application/octet-stream" }));
    $("savenet").download = "hlb-cifar10-" + flags.recipe + "-seed" + run.seed + ".safetensors";
  }
  $("grid").replaceChildren();
  for (let i = 0; i < a.images.length / main.IMAGE_BYTES; i++) {
    const figure = document.createElement("figure"), canvas = document.createElement("canvas");
    const caption = document.createElement("figcaption"), truth = a.labels[i], said = predicted[i];
    canvas.width = canvas.height = main.IMAGE_SIDE;
    const pixels = main.rgbaFromImage(a.images.subarray(i * main.IMAGE_BYTES, (i + 1) * main.IMAGE_BYTES));
    canvas.getContext("2d").putImageData(new ImageData(pixels, main.IMAGE_SIDE, main.IMAGE_SIDE), 0, 0);
    figure.className = said === truth ? "right" : "wrong";
    Object.assign(figure.dataset, { index: i, label: truth, predicted: said });
    const line = document.createElement("div");
    line.className = said === truth ? "" : "said";
    line.textContent = (said === truth ? "✓ " : "✗ ") + CLASSES[said] + " " + percent(probabilities[i * k + said]);
    caption.append(CLASSES[truth], line);
    figure.append(canvas, caption);
    $("grid").append(figure);
  }
  const counts = main.confusionMatrix(predicted, a.labels, k), rows = [];
  const cell = (tag, text, style) => "<" + tag + (style ? ' style="' + style + '"' : "") + ">" + text + "</" + tag + ">";
  rows.push("<tr>" + cell("th", "true ↓ said →") + SHORT.map((c) => cell("th", c)).join("") + cell("th", "accuracy") + "</tr>");
  counts.forEach((row, t) => {
    const total = row.reduce((x, y) => x + y, 0);
    const tds = row.map((c, p) => {
      const share = total ? c / total : 0, hue = p === t ? "0, 110, 200" : "200, 0, 30";
      return '<td class="count" data-true="' + t + '" data-said="' + p + '" style="background: rgba(' + hue + ", " +
        (0.6 * share).toFixed(3) + ')">' + c + "</td>";
    });
    rows.push("<tr>" + cell("th", CLASSES[t]) + tds.join("") + cell("td", total ? percent(row[t] / total) : "-") + "</tr>");
  });
  const right = counts.reduce((x, row, t) => x + row[t], 0);
  rows.push("<tr>" + cell("th", "all") + cell("td", n + " images", "text-align: left") + '<td colspan="' + (k - 1) + '"></td>' +
    cell("td", percent(right / n)) + "</tr>");
  $("matrix").innerHTML = rows.join("");
  $("own").hidden = true;
  say("ownerror", "");
  say("status", "");
}
// "Try your own image": the picture's centre square drawn at 32 x 32 (on white: a transparent picture shows its
// colours on white), read back as the network reads the dataset (main.imageFromRgba), and classified by the worker
async function ownImage(file) {
  let bitmap;
  try {
    bitmap = await createImageBitmap(file);
  } catch {
    return say("ownerror", "error: " + file.name + " is not a picture this browser can read: choose a PNG or a JPEG", true);
  }
  const side = Math.min(bitmap.width, bitmap.height), ctx = $("owncanvas").getContext("2d", { willReadFrequently: true });
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, main.IMAGE_SIDE, main.IMAGE_SIDE);
  ctx.imageSmoothingQuality = "high";
  ctx.drawImage(bitmap, (bitmap.width - side) / 2, (bitmap.height - side) / 2, side, side, 0, 0, main.IMAGE_SIDE, main.IMAGE_SIDE);
  say("ownerror", "");
  $("owntop").replaceChildren();
  $("own").hidden = false;
  worker.postMessage({ type: "classify", pixels: main.imageFromRgba(ctx.getImageData(0, 0, main.IMAGE_SIDE, main.IMAGE_SIDE).data) });
}
function showTop(logits) {
  $("owntop").replaceChildren(...main.topClasses(main.softmaxRows(logits, CLASSES.length), 3).map(({ c, p }) => {
    const li = document.createElement("li");
    Object.assign(li.dataset, { class: c, p });
    li.textContent = CLASSES[c] + " " + percent(p);
    return li;
  }));
}
$("ownfile").onchange = () => $("ownfile").files[0] && ownImage($("ownfile").files[0]);
// --eval on the page: the file is checked and evaluated by the worker, on the test set the form's flags give
function loadNetwork(file) {
  if (running || evaluating) return;
  if (!config.server && !tarball) {
    return say("neterror", "error: first choose the CIFAR-10 tarball above: the network is evaluated on its test set", true);
  }
  const f = check(formValues());
  if (!f) return;
  evaluating = true;
  refresh();
  say("neterror", "");
  $("answers").hidden = true;
  say("status", "checking " + file.name);
  worker.postMessage({ type: "evaluate", file, flags: f, config: shared, tarball, page: location.href });
}
$("netfile").onchange = () => $("netfile").files[0] && loadNetwork($("netfile").files[0]);
// A file dropped anywhere: a --save file is evaluated, a picture classified, anything else taken for the tarball
addEventListener("dragover", (e) => { e.preventDefault(); $("pick").classList.add("over"); });
addEventListener("dragleave", () => $("pick").classList.remove("over"));
addEventListener("drop", (e) => {
  e.preventDefault();
  $("pick").classList.remove("over");
  const file = e.dataTransfer.files[0];
  if (!file) return;
  if (file.name.endsWith(".safetensors")) loadNetwork(file);
  else if (file.type.startsWith("image/") && !$("answers").hidden) ownImage(file);
  else if (file.type.startsWith("image/")) say("status", "a picture is classified once a network has answered: train one, or drop a --save file", true);
  else if (!$("pick").hidden) chosen(file);
});

if (!config.server) pickTarball();
const again = sessionStorage.getItem(AGAIN);
sessionStorage.removeItem(AGAIN);
// a checkpoint this browser kept of this address's run (a reload, a closed tab): offered before anything starts
const kept = again === null && flagsGiven && !gpuProblem ? await main.keptCheckpoint() : undefined;
let offer;
try {
  offer = kept && (await main.decodeCheckpoint(kept, "the checkpoint kept in this browser"));
} catch (e) {
  say("status", e.message + " (it is removed)");
  await main.keepCheckpoint().catch(() => {});
}
if (again !== null && again === given.toString() && flagsGiven && startable()) {
  await main.keepCheckpoint().catch(() => {});
  start(flagsGiven);
} else if (offer && main.resumable(offer, flagsGiven)) {
  $("resumetext").textContent = "This browser keeps a checkpoint of this run: run " + offer.run + ", seed " +
    ((Number(offer.flags.seed) + offer.run - 1) >>> 0) + ", at the end of epoch " + (offer.train.epoch - 1) +
    " (started " + offer.startedAt + ").";
  $("resume").hidden = false;
  $("resumebtn").onclick = () => startable() && start(flagsGiven, kept);
}
refresh();
function pickTarball() {
  const name = main.CIFAR10_URL.split("/").pop();
  $("tarname").textContent = name;
  $("tarurl").textContent = $("tarurl").href = main.CIFAR10_URL;
  if (!gpuProblem) say("device", "first choose " + name + ", then press Start");
  $("pick").hidden = false;
  $("tarball").onchange = () => $("tarball").files[0] && chosen($("tarball").files[0]);
}
function chosen(file) {
  tarball = file;
  say("status", "chosen: " + file.name);
  refresh();
}
</script>
</body></html>
`;

if (import.meta.main) {
  try {
    await main(Deno.args);
  } catch (e) {
    sayErr(`error: ${errorText(e)}`);
    quit(1);
  }
  // what was printed did not all arrive (stdout on a full disk): said, and the exit code says it too
  if (OUTPUT.failed) {
    sayErr(`error: ${OUTPUT.failed}: redirect the output somewhere it can be written`);
    quit(1);
  }
}
