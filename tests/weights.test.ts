// Saved weights: the safetensors encoding round-trips, and bad files get one clear line.
import assert from "node:assert/strict";
import {
  decodeSafetensors,
  encodeSafetensors,
  evaluateWeights,
  initGpu,
  layoutState,
  releaseGpu,
  stateSpec,
  uploadDataset,
} from "../main.ts";

const sample = () =>
  new Map([
    ["a.weight", { shape: [2, 3], data: Float32Array.from([1, 2, 3, 4, 5, -6.5]) }],
    ["b.bias", { shape: [3], data: Float32Array.from([0.25, 1e-30, -1e30]) }],
  ]);

Deno.test("safetensors: round trip, 8-byte aligned data, standard header", () => {
  const bytes = encodeSafetensors(sample(), { format: "test" });
  const n = Number(new DataView(bytes.buffer).getBigUint64(0, true));
  assert.equal((8 + n) % 8, 0);
  const header = JSON.parse(new TextDecoder().decode(bytes.subarray(8, 8 + n)));
  assert.deepEqual(header["a.weight"], { dtype: "F32", shape: [2, 3], data_offsets: [0, 24] });
  assert.deepEqual(header["b.bias"], { dtype: "F32", shape: [3], data_offsets: [24, 36] });
  assert.equal(bytes.length, 8 + n + 36);
  const { weights, metadata } = decodeSafetensors(bytes, "x.safetensors");
  assert.deepEqual(metadata, { format: "test" });
  for (const [name, t] of sample()) {
    assert.deepEqual(weights.get(name)!.shape, t.shape);
    assert.deepEqual([...weights.get(name)!.data], [...t.data]);
  }
});

Deno.test("safetensors: truncated, garbage and wrong dtype files get one-line errors", () => {
  const good = encodeSafetensors(sample(), {});
  const cases: [Uint8Array, RegExp][] = [
    [good.subarray(0, 5), /shorter than its 8-byte header length/],
    [good.subarray(0, 20), /header of \d+ bytes but the file has 20/],
    [good.subarray(0, good.length - 4), /b\.bias is truncated/],
    [new Uint8Array([4, 0, 0, 0, 0, 0, 0, 0, 123, 120, 120, 120]), /header is not JSON/],
  ];
  const f16 = new TextEncoder().encode(JSON.stringify({ w: { dtype: "F16", shape: [1], data_offsets: [0, 2] } }));
  const withF16 = new Uint8Array(8 + f16.length + 2);
  new DataView(withF16.buffer).setBigUint64(0, BigInt(f16.length), true);
  withF16.set(f16, 8);
  cases.push([withF16, /w has dtype F16, only F32 is read/]);
  for (const [bytes, message] of cases) {
    assert.throws(
      () => decodeSafetensors(bytes, "w.safetensors"),
      (e: Error) =>
        message.test(e.message) && e.message.startsWith("w.safetensors is not a valid safetensors file") &&
        !e.message.includes("\n"),
    );
  }
});

Deno.test("evaluateWeights: a file for another network is rejected by name and shape", async () => {
  const gpu = await initGpu();
  const images = new Uint8Array(4 * 3072).map((_, i) => i % 251), labels = Uint8Array.from([0, 1, 2, 3]);
  const data = uploadDataset(gpu, { trainImages: images, trainLabels: labels, testImages: images, testLabels: labels });
  const layout = layoutState(stateSpec(4));
  const full = new Map(
    [...layout.entries].map(([n, e]) => [n, {
      shape: e.shape,
      data: new Float32Array(e.shape.reduce((a, b) => a * b, 1)),
    }]),
  );
  full.get("conv_group_2.conv2.weight")!.shape = [3, 3, 16, 17];
  await assert.rejects(
    () => evaluateWeights(gpu, data, full, 4, "w.safetensors"),
    /^Error: w.safetensors does not match the network: conv_group_2.conv2.weight is \[3,3,16,17\], expected \[3,3,16,16\]$/,
  );
  full.delete("conv_group_1.conv1.weight");
  await assert.rejects(() => evaluateWeights(gpu, data, full, 4, "w.safetensors"), /has no conv_group_1.conv1.weight/);
  releaseGpu(gpu);
});
