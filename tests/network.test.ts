// The whole network's backward pass (as `backward` wires the kernels) against central finite
// differences of its own forward pass: catches a gradient routed to the wrong tensor or layer,
// which per-kernel tests cannot see. f32 and max-pool kinks limit the agreement to a few percent.
import assert from "node:assert/strict";
import {
  backward,
  createBuffer,
  crossEntropy,
  forward,
  initGpu,
  initState,
  layoutState,
  makeActivations,
  netKernels,
  readBuffer,
  readTensor,
  Rng,
  setFrame,
  stateSpec,
  stateViews,
  submit,
} from "../main.ts";

const gpu = await initGpu();

/**
 * The network's gradients at a fixed random point, and (if `fd`) a central finite difference for 3 entries of
 * each tensor.
 */
async function checkNetworkGradients(fuseNormGelu: boolean, fuseConvPool = true, fd = true) {
  const B = 4, baseDepth = 2, rng = new Rng(3);
  const layout = layoutState(stateSpec(baseDepth));
  const whiten = new Float32Array(2 * 2 * 3 * 24).map(() => rng.next() - 0.5);
  const init = initState(layout, rng, whiten);
  for (let i = 0; i < layout.nTrainable; i++) init[i] += 0.3 * (rng.next() - 0.5); // leave the exact dirac start
  const state = createBuffer(gpu, layout.nTotal * 4), grads = createBuffer(gpu, layout.nTotal * 4);
  const P = stateViews(state, layout),
    G = stateViews(grads, layout),
    A = makeActivations(gpu, B, baseDepth, "f32", {
      ...netKernels(gpu),
      fuseNormGelu,
      fuseConvPool,
    });
  gpu.device.queue.writeBuffer(A.x.buffer, 0, new Float32Array(B * 32 * 32 * 3).map(() => 2 * rng.next() - 1));
  const targets = new Float32Array(B * 10);
  for (let b = 0; b < B; b++) [targets[b * 10 + (3 * b) % 10], targets[b * 10 + (7 * b + 1) % 10]] = [0.7, 0.3];
  gpu.device.queue.writeBuffer(A.targets.buffer, 0, targets);
  setFrame(gpu, { valid: B });
  // L = sum of the per-row losses, so dlogits = softmax - smoothed target (grad scale 1)
  const fwd = [...forward(gpu, A, P, true), crossEntropy(gpu, A.logits, A.targets, A.loss, A.correct, A.dlogits, 1)];
  const lossAt = async (values: Float32Array<ArrayBuffer>) => {
    gpu.device.queue.writeBuffer(state, 0, values);
    submit(gpu, fwd);
    return (await readTensor(gpu, A.loss)).reduce((a, b) => a + b, 0);
  };
  gpu.device.queue.writeBuffer(state, 0, init);
  submit(gpu, [...fwd, ...backward(gpu, A, P, G)]);
  const g = await readBuffer(gpu, grads, 0, layout.nTotal * 4);
  const loss = await readTensor(gpu, A.loss);
  if (!fd) return { g: g.slice(0, layout.nTrainable), loss };
  const eps = 2e-3;
  let checked = 0;
  for (const [name, e] of layout.entries) {
    if (!/conv\d\.weight$|norm\d\.bias$|^linear\.weight$/.test(name)) continue;
    const size = e.shape.reduce((a, b) => a * b, 1);
    for (let k = 0; k < 3; k++) {
      const i = e.offset + Math.floor(rng.next() * size);
      const plus = init.slice(), minus = init.slice();
      plus[i] += eps;
      minus[i] -= eps;
      const fd = ((await lossAt(plus)) - (await lossAt(minus))) / (2 * eps);
      const err = Math.abs(g[i] - fd);
      assert.ok(
        err <= 2e-3 + 0.15 * Math.abs(fd),
        `${name}[${i - e.offset}] (fused norm+GELU ${fuseNormGelu}): backward ${g[i]}, finite difference ${fd}`,
      );
      checked++;
    }
  }
  assert.equal(checked, 3 * 13); // 6 convs, 6 BN shifts, the linear head
  return { g: g.slice(0, layout.nTrainable), loss };
}

Deno.test("network gradients match finite differences of the forward pass (every trainable tensor)", async () => {
  const fused = (await checkNetworkGradients(true)).g, separate = (await checkNetworkGradients(false)).g;
  // the fused batch norm + GELU computes the same gradients as the separate kernels, up to f32 rounding
  let worst = 0, scale = 0;
  fused.forEach((v, i) => [worst, scale] = [Math.max(worst, Math.abs(v - separate[i])), Math.max(scale, Math.abs(v))]);
  assert.ok(worst <= 1e-4 * scale, `fused vs separate norm+GELU gradients differ by ${worst} (scale ${scale})`);
});

Deno.test("network: conv + max pool fused gives the same loss and gradients, bit for bit, as separate kernels", async () => {
  const fused = await checkNetworkGradients(true, true, false),
    separate = await checkNetworkGradients(true, false, false);
  assert.deepEqual(fused.loss, separate.loss);
  assert.deepEqual(fused.g, separate.g);
});
