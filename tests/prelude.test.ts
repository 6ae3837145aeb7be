// kernels/common.wgsl: the structs the kernel files share are defined once, appended to every file at compile
// time, and packed on the host by field name; and a fork's kernel folder (KERNEL_DIR) is the one read and logged.
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { join } from "node:path";
import {
  defaultConvKernels,
  initGpu,
  KERNEL_DIR,
  packStruct,
  parseFlags,
  releaseGpu,
  wgslStruct,
  writeRunLog,
} from "../main.ts";

const KERNELS = new URL(`../${KERNEL_DIR}`, import.meta.url);

Deno.test("wgslStruct reads a struct's fields in order, skips comments, refuses what packStruct cannot write", () => {
  const src = `struct Other { a: u32 }\nstruct S {\n  x: u32, // a comment, with a comma\n  y: f32,\n  z: i32,\n}`;
  assert.deepEqual(wgslStruct(src, "S"), [
    { name: "x", type: "u32" },
    { name: "y", type: "f32" },
    { name: "z", type: "i32" },
  ]);
  assert.throws(
    () => wgslStruct("struct V { m: vec4f }", "V"),
    /struct V\.m: vec4f \(packStruct writes u32, i32 and f32/,
  );
  assert.throws(() => wgslStruct(src, "Missing"), /has no struct Missing/);
});

Deno.test("packStruct places each value at its field's offset in common.wgsl, by name", async () => {
  const gpu = await initGpu();
  try {
    const fields = gpu.structs.get("Frame")!, at = (name: string) => 4 * fields.findIndex((f) => f.name === name);
    const view = new DataView(
      packStruct(gpu, "Frame", { offset: 3, valid: 250, lrWeights: 0.5, emaDecay: 0.25, step: 7 }),
    );
    assert.equal(view.byteLength % 16, 0);
    assert.equal(view.getUint32(at("offset"), true), 3);
    assert.equal(view.getUint32(at("valid"), true), 250);
    assert.equal(view.getFloat32(at("lr_weights"), true), 0.5);
    assert.equal(view.getFloat32(at("lr_biases"), true), 0); // not given: zero
    assert.equal(view.getFloat32(at("ema_decay"), true), 0.25);
    assert.equal(view.getUint32(at("step"), true), 7);
    assert.throws(
      () => packStruct(gpu, "Frame", { lrWeight: 1 }),
      /struct Frame \(common\.wgsl\) has no field lr_weight/,
    );
    const conv = new DataView(packStruct(gpu, "ConvShape", { cin: 24, kPerSplit: 512 }));
    const convFields = gpu.structs.get("ConvShape")!.map((f) => f.name);
    assert.equal(conv.getUint32(4 * convFields.indexOf("cin"), true), 24);
    assert.equal(conv.getUint32(4 * convFields.indexOf("k_per_split"), true), 512);
  } finally {
    releaseGpu(gpu);
  }
});

Deno.test("no kernel file declares a struct of common.wgsl again", async () => {
  const prelude = await Deno.readTextFile(new URL("common.wgsl", KERNELS));
  const shared = [...prelude.matchAll(/^struct (\w+)/gm)].map((m) => m[1]);
  assert.ok(shared.includes("Frame") && shared.includes("ConvShape"));
  for await (const e of Deno.readDir(KERNELS)) {
    if (!e.name.endsWith(".wgsl") || e.name === "common.wgsl") continue;
    const src = await Deno.readTextFile(new URL(e.name, KERNELS));
    for (const name of shared) {
      assert.ok(!new RegExp(`^struct ${name}\\b`, "m").test(src), `${e.name} declares ${name}`);
    }
  }
});

Deno.test("a fork's kernel folder is the one compiled, and the run log names it and hashes its files", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const fork = join(dir, "kernels-idea");
    await Deno.mkdir(fork);
    for await (const e of Deno.readDir(KERNELS)) {
      if (e.name.endsWith(".wgsl")) await Deno.copyFile(new URL(e.name, KERNELS), join(fork, e.name));
    }
    const marker = "\n// kernel idea: a comment is enough to change the hash\n";
    await Deno.writeTextFile(join(fork, "norm.wgsl"), marker, { append: true });
    const gpu = await initGpu({ kernelDir: `file://${fork}/` });
    try {
      assert.equal(gpu.kernelDir, `${fork}/`);
      assert.ok(gpu.sources.get("norm")!.includes(marker));
      const log = JSON.parse(
        await Deno.readTextFile(await writeRunLog(join(dir, "logs"), gpu, parseFlags([]), [], new Date())),
      );
      const compiled = (await Deno.readTextFile(join(fork, "norm.wgsl"))) + "\n" +
        (await Deno.readTextFile(join(fork, "common.wgsl")));
      assert.equal(log.kernelDir, `${fork}/`);
      assert.equal(log.kernels["norm.wgsl"], createHash("sha256").update(compiled).digest("hex"));
    } finally {
      releaseGpu(gpu);
    }
    await assert.rejects(
      () => initGpu({ kernelDir: `file://${dir}/missing/` }),
      /^Error: cannot read common\.wgsl in file:\/\/.*\/missing\/ \(.+\): is the kernels\/ folder there\?$/,
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("the conv kernel set follows the device kind, not only its name (browsers may report none)", () => {
  assert.equal(
    defaultConvKernels({ description: "llvmpipe (LLVM 15.0.6, 256 bits)", isFallbackAdapter: false }),
    "wide",
  );
  assert.equal(defaultConvKernels({ description: "", vendor: "google", architecture: "swiftshader" }), "wide");
  assert.equal(defaultConvKernels({ description: "", vendor: "", isFallbackAdapter: true }), "wide");
  assert.equal(defaultConvKernels({ description: "", vendor: "nvidia", architecture: "hopper" }), "tiled");
  assert.equal(defaultConvKernels({ description: "NVIDIA H200", isFallbackAdapter: false }), "tiled");
});
