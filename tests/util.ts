// Shared test helpers: a seeded PRNG and a closeness assertion. Nothing here reuses main.ts math.
import assert from "node:assert/strict";
import { join } from "node:path";
import { FILE_BYTES, RECORD_BYTES } from "../main.ts";

/** mulberry32: a tiny seeded PRNG, so a failure reproduces. */
export class Prng {
  #s: number;
  constructor(seed: number) {
    this.#s = seed >>> 0;
  }
  next(): number {
    let t = (this.#s = (this.#s + 0x6d2b79f5) >>> 0);
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 2 ** 32;
  }
  int(n: number): number {
    return Math.floor(this.next() * n);
  }
  normal(): number {
    const u = 1 - this.next(), v = this.next();
    return Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * v);
  }
  normals(n: number, scale = 1, shift = 0): Float32Array<ArrayBuffer> {
    const a = new Float32Array(n);
    for (let i = 0; i < n; i++) a[i] = shift + scale * this.normal();
    return a;
  }
}

const maxAbs = (a: ArrayLike<number>) => {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]));
  return m;
};

/** max |got - ref| <= tol * (1 + max |ref|), reporting the worst element. */
export function assertClose(name: string, got: ArrayLike<number>, ref: ArrayLike<number>, tol = 1e-4) {
  assert.equal(got.length, ref.length, `${name}: length`);
  const bound = tol * (1 + maxAbs(ref));
  let worst = -1, err = 0;
  for (let i = 0; i < ref.length; i++) {
    const e = Math.abs(got[i] - ref[i]);
    if (!(e <= err)) [worst, err] = [i, Number.isNaN(e) ? Infinity : e];
  }
  assert.ok(
    err <= bound,
    `${name}: max abs err ${err.toExponential(3)} > ${bound.toExponential(3)} at [${worst}]: ` +
      `got ${got[worst]}, want ${ref[worst]}`,
  );
}

/** A valid-looking dataset folder in `dir`: exact file sizes, labels 0..9, patterned pixels. */
export async function writeFixtureDataset(dir: string) {
  const bytes = new Uint8Array(FILE_BYTES).map((_, i) => (i * 37) % 251);
  for (let r = 0; r < FILE_BYTES / RECORD_BYTES; r++) bytes[r * RECORD_BYTES] = r % 10;
  const data = join(dir, "cifar-10-batches-bin");
  await Deno.mkdir(data);
  for (
    const f of ["data_batch_1.bin", "data_batch_2.bin", "data_batch_3.bin", "data_batch_4.bin", "data_batch_5.bin"]
  ) {
    await Deno.writeFile(join(data, f), bytes);
  }
  await Deno.writeFile(join(data, "test_batch.bin"), bytes);
  return data;
}
