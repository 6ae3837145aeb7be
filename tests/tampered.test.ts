// Tampered --eval files (issue 17): a saved network is read as strictly as the command line. Each case below was
// accepted, or described wrongly, before: now it is one line naming the file and what to do, and exit 1.
import assert from "node:assert/strict";
import { join } from "node:path";
import { decodeSafetensors, encodeSafetensors, readSavedNetwork, savedMetadata, stateSpec } from "../main.ts";
import { randomNetwork, runMain, withFixture } from "./util.ts";

/** A network of base depth 4 with small random weights (its BN scales and running variances 1). */
const tinyNetwork = () => randomNetwork(17, 0.1);

const NORM = { mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25] };
/** The metadata --save writes for the tiny network, `edits` applied. */
const metadata = (edits: Record<string, string> = {}): Record<string, string> => ({
  ...savedMetadata(NORM, 4, 64, "f32"),
  ...edits,
});

/** `bytes` (a safetensors file) with its header's JSON text edited, the data unchanged. */
function editHeader(bytes: Uint8Array, edit: (json: string) => string) {
  const n = Number(new DataView(bytes.buffer, bytes.byteOffset).getBigUint64(0, true));
  const head = new TextEncoder().encode(edit(new TextDecoder().decode(bytes.subarray(8, 8 + n))));
  const out = new Uint8Array(8 + head.length + bytes.length - 8 - n);
  new DataView(out.buffer).setBigUint64(0, BigInt(head.length), true);
  out.set(head, 8);
  out.set(bytes.subarray(8 + n), 8 + head.length);
  return out;
}

/** --eval of `file` fails with exit 1 and exactly one stderr line matching `message` (which names the file). */
async function evalRefuses(file: string, data: string, message: RegExp, extra: string[] = []) {
  const r = await runMain(["--eval", file, "--data", data, "--test-subset", "40", ...extra]);
  assert.equal(r.code, 1, `exit ${r.code}: ${r.stdout}${r.stderr}`);
  assert.equal(r.stderr.split("\n").length, 1, `one line: ${r.stderr}`);
  assert.match(r.stderr, /^error: /);
  assert.ok(r.stderr.includes(file), `names ${file}: ${r.stderr}`);
  assert.match(r.stderr, message);
}

const escape = (s: string) => s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");

/** readSavedNetwork refuses `file` in one line matching `message`, ending with the fix. */
async function readRefuses(file: string, message: RegExp) {
  await assert.rejects(() => readSavedNetwork(file), (e: Error) => {
    assert.match(e.message, message);
    assert.ok(e.message.startsWith(file) && !e.message.includes("\n"), e.message);
    assert.match(e.message, /: save (the network|it) again with --save$/);
    return true;
  });
}

Deno.test("tampered --eval: metadata integers must be canonical decimals (no 0x4, ' 4 ', 4.0, 1e1)", async () => {
  await withFixture(async (dir, data) => {
    const file = join(dir, "w.safetensors");
    for (const baseDepth of ["0x4", " 4 ", "4.0", "4e0", "+4", "04", "4\n", ""]) {
      await Deno.writeFile(file, encodeSafetensors(tinyNetwork(), metadata({ baseDepth })));
      await readRefuses(file, new RegExp(`has baseDepth ${escape(JSON.stringify(baseDepth))}, not a decimal integer`));
    }
    for (const evalBatchSize of ["0x40", "64.0", " 64", "6.4e1", "1e1"]) {
      await Deno.writeFile(file, encodeSafetensors(tinyNetwork(), metadata({ evalBatchSize })));
      await readRefuses(file, /has evalBatchSize ".*", not a decimal integer/);
    }
    // as a user meets it: the run stops before the GPU, and does not print an accuracy
    await Deno.writeFile(file, encodeSafetensors(tinyNetwork(), metadata({ baseDepth: "0x4" })));
    await evalRefuses(file, data, /has baseDepth "0x4", not a decimal integer: save the network again with --save$/);
    // the untampered file is read
    await Deno.writeFile(file, encodeSafetensors(tinyNetwork(), metadata()));
    assert.equal((await readSavedNetwork(file)).baseDepth, 4);
  });
});

Deno.test("tampered --eval: unknown tensors, duplicate keys and __proto__ are refused; tiling stays checked", async () => {
  await withFixture(async (dir, data) => {
    const file = join(dir, "w.safetensors");
    // a tensor the network does not have
    const extra = tinyNetwork().set("extra.weight", { shape: [2], data: Float32Array.from([1, 2]) });
    await Deno.writeFile(file, encodeSafetensors(extra, metadata()));
    await readRefuses(file, /holds "extra\.weight", a tensor not in the network of base depth 4/);
    await evalRefuses(file, data, /holds "extra\.weight", a tensor not in the network/);
    // a key given twice: JSON.parse would keep the last, silently (a tensor's entry, then a metadata value)
    const good = encodeSafetensors(tinyNetwork(), metadata());
    const twice = editHeader(good, (json) => {
      const entry = JSON.stringify(JSON.parse(json)["linear.weight"]);
      return json.replace(/^\{/, `{"linear.weight":${entry},`);
    });
    await Deno.writeFile(file, twice);
    await readRefuses(file, /not a valid safetensors file \(header has the key "linear\.weight" twice\)/);
    await evalRefuses(file, data, /header has the key "linear\.weight" twice/);
    await Deno.writeFile(file, editHeader(good, (json) => json.replace('"__metadata__":{', '$&"precision":"f16",')));
    await readRefuses(file, /\(header has the key "precision" twice\)/);
    // __proto__ (an object's prototype in JavaScript), as a tensor and as a metadata key
    const proto = tinyNetwork().set("__proto_x", { shape: [1], data: Float32Array.from([1]) });
    const withProto = editHeader(
      encodeSafetensors(proto, metadata()),
      (json) => json.replace('"__proto_x"', '"__proto__"'),
    );
    await Deno.writeFile(file, withProto);
    await readRefuses(file, /\(header has a "__proto__" key\)/);
    await evalRefuses(file, data, /header has a "__proto__" key/);
    await Deno.writeFile(
      file,
      editHeader(good, (json) => json.replace('"__metadata__":{', '$&"\\u005f_proto__":"x",')),
    );
    await readRefuses(file, /\(header has a "__proto__" key\)/);
    // overlapping tensors, a gap and trailing bytes were refused before: still so
    const enc = (header: unknown, bytes: number) => {
      const head = new TextEncoder().encode(JSON.stringify(header)), out = new Uint8Array(8 + head.length + bytes);
      new DataView(out.buffer).setBigUint64(0, BigInt(head.length), true);
      out.set(head, 8);
      return out;
    };
    const t = (begin: number) => ({ dtype: "F32", shape: [2], data_offsets: [begin, begin + 8] });
    for (
      const [bytes, why] of [
        [enc({ a: t(0), b: t(4) }, 12), /b overlaps another tensor/],
        [enc({ a: t(0), b: t(12) }, 20), /bytes 8\.\.12 belong to no tensor/],
        [enc({ a: t(0) }, 12), /4 bytes after the last tensor/],
      ] as const
    ) {
      assert.throws(() => decodeSafetensors(bytes, "w.safetensors"), why);
    }
    // the untampered file is read
    await Deno.writeFile(file, good);
    assert.equal((await readSavedNetwork(file)).weights.size, stateSpec(4).length);
  });
});

Deno.test("tampered --eval: weights that make the test loss non-finite are refused, not printed as NaN", async () => {
  await withFixture(async (dir, data) => {
    const file = join(dir, "w.safetensors"), weights = tinyNetwork();
    // finite, but the logits overflow: class 0's row +3e38, the others' -3e38
    weights.get("linear.weight")!.data.forEach((_, i, w) => (w[i] = i < w.length / 10 ? 3e38 : -3e38));
    await Deno.writeFile(file, encodeSafetensors(weights, metadata()));
    await evalRefuses(
      file,
      data,
      /gives a non-finite test loss \((NaN|Infinity)\): its weights are corrupt; save the network again with --save$/,
    );
    // a NaN or infinite weight is refused when the file is read, before the GPU
    for (const bad of [NaN, Infinity, -Infinity]) {
      weights.get("linear.weight")!.data[3] = bad;
      await Deno.writeFile(file, encodeSafetensors(weights, metadata()));
      await readRefuses(file, new RegExp(`\\(linear\\.weight\\[3\\] is ${bad}\\)`));
    }
  });
});

Deno.test("tampered --eval: corrupt normalisation statistics are not blamed on an older main.ts", async () => {
  await withFixture(async (dir, data) => {
    const file = join(dir, "w.safetensors");
    const cases = [
      '{"mean":[NaN,0.5,0.5],"std":[0.25,0.25,0.25]}', // what JSON.stringify never writes: not JSON
      '{"mean":["0.5",0.5,0.5],"std":[0.25,0.25,0.25]}', // a string, not a number
      '{"mean":[0.5,0.5,0.5],"std":[0.25,0.25,0.25],"mean":[9,9,9]}', // a key given twice
      '{"mean":[0.5,0.5,0.5]',
      "",
    ];
    for (const norm of cases) {
      await Deno.writeFile(file, encodeSafetensors(tinyNetwork(), metadata({ norm })));
      await readRefuses(file, /has corrupt normalisation statistics/);
      await assert.rejects(() => readSavedNetwork(file), (e: Error) => !/older main\.ts/.test(e.message));
    }
    await Deno.writeFile(file, encodeSafetensors(tinyNetwork(), metadata({ norm: cases[0] })));
    await evalRefuses(file, data, /has corrupt normalisation statistics .*: save the network again with --save$/);
    // only a file without them is an older main.ts's
    const { norm: _, ...older } = metadata();
    await Deno.writeFile(file, encodeSafetensors(tinyNetwork(), older));
    await readRefuses(file, /has no normalisation statistics \(saved by an older main\.ts\)/);
  });
});

Deno.test("tampered --eval: a batch size from the file blames the file, and --batch-size overrides it", async () => {
  await withFixture(async (dir, data) => {
    const file = join(dir, "w.safetensors");
    for (const evalBatchSize of ["100000000", "1", "0"]) {
      await Deno.writeFile(file, encodeSafetensors(tinyNetwork(), metadata({ evalBatchSize })));
      await evalRefuses(
        file,
        data,
        new RegExp(
          `has evalBatchSize ${evalBatchSize}, outside 2\\.\\.50000: pass --batch-size N \\(2\\.\\.50000\\) to override it$`,
        ),
      );
    }
    // in range, but more than this GPU can run (WebGPU's default limits: 256 MiB a buffer)
    await Deno.writeFile(file, encodeSafetensors(tinyNetwork(), metadata({ evalBatchSize: "50000" })));
    await evalRefuses(
      file,
      data,
      /has evalBatchSize 50000, too large for this GPU \(--batch-size overrides it\): a batch of 50000 needs .*: use --batch-size \d+ or less$/,
      ["--spec-limits"],
    );
    // the user's --batch-size is the user's: the file's value is not used, and its advice stays the flag's
    const ok = await runMain(["--eval", file, "--data", data, "--test-subset", "40", "--batch-size", "16"]);
    assert.equal(ok.code, 0, ok.stderr);
    assert.match(ok.stdout, /test accuracy [\d.]+% \| test loss [\d.]+ \| 40 images/);
    const flag = await runMain(["--eval", file, "--data", data, "--batch-size", "50000", "--spec-limits"]);
    assert.equal(flag.code, 1);
    assert.match(flag.stderr, /^error: a batch of 50000 needs .*: use --batch-size \d+ or less$/);
  });
});
