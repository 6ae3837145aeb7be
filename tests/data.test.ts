// Offline tests for the data section: fixtures are written to temp folders and
// "downloads" come from a loopback server, so neither the network nor the real
// CIFAR-10 copy is needed.
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { join } from "node:path";
import {
  CIFAR10_MD5,
  CIFAR10_TEST_FILE,
  CIFAR10_TRAIN_FILES,
  cifarFromTarball,
  FILE_BYTES,
  loadCifar10,
  Md5,
  RECORD_BYTES,
  resolveCifar10Dir,
  untar,
} from "../main.ts";

const ALL_FILES = [...CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE];
const enc = new TextEncoder();

// File f (0-based, test_batch is 5) record r: label (r + f) % 10, first pixel
// byte f + 1, last pixel byte r % 251. Everything else is zero.
function fixtureFile(f: number): Uint8Array<ArrayBuffer> {
  const bytes = new Uint8Array(FILE_BYTES);
  for (let r = 0; r < 10_000; r++) {
    bytes[r * RECORD_BYTES] = (r + f) % 10;
    bytes[r * RECORD_BYTES + 1] = f + 1;
    bytes[r * RECORD_BYTES + 3072] = r % 251;
  }
  return bytes;
}

async function writeFixtureDir(files = ALL_FILES): Promise<string> {
  const dir = await Deno.makeTempDir();
  for (const file of files) {
    await Deno.writeFile(join(dir, file), fixtureFile(ALL_FILES.indexOf(file)));
  }
  return dir;
}

// Tiny ustar writer: header fields, padded data, two zero blocks at the end.
type Entry = {
  name: string;
  data?: Uint8Array;
  type?: string;
  prefix?: string;
};
function tarHeader({ name, data, type = "0", prefix = "" }: Entry) {
  const h = new Uint8Array(512);
  const put = (s: string, at: number) => h.set(enc.encode(s), at);
  const oct = (n: number, len: number) => n.toString(8).padStart(len - 1, "0") + "\0";
  put(name, 0);
  put(oct(0o644, 8), 100);
  put(oct(0, 8), 108);
  put(oct(0, 8), 116);
  put(oct(data?.length ?? 0, 12), 124);
  put(oct(0, 12), 136);
  put("        ", 148);
  put(type, 156);
  put("ustar\0" + "00", 257);
  put(prefix, 345);
  const sum = h.reduce((a, b) => a + b, 0);
  put(sum.toString(8).padStart(6, "0") + "\0 ", 148);
  return h;
}
function tar(entries: Entry[]): Uint8Array<ArrayBuffer> {
  const parts: Uint8Array[] = [];
  for (const e of entries) {
    parts.push(tarHeader(e));
    const size = e.data?.length ?? 0;
    if (e.data) {
      parts.push(e.data, new Uint8Array(Math.ceil(size / 512) * 512 - size));
    }
  }
  parts.push(new Uint8Array(1024));
  const out = new Uint8Array(parts.reduce((a, p) => a + p.length, 0));
  let at = 0;
  for (const p of parts) out.set(p, at), at += p.length;
  return out;
}

Deno.test("loadCifar10 reads train/test records, labels and subsets", async () => {
  const dir = await writeFixtureDir();
  try {
    const d = await loadCifar10(dir);
    assert.equal(d.trainImages.length, 50_000 * 3072);
    assert.equal(d.trainLabels.length, 50_000);
    assert.equal(d.testImages.length, 10_000 * 3072);
    assert.equal(d.testLabels.length, 10_000);
    // Record 12_345 is data_batch_2 (f=1) record 2345.
    assert.equal(d.trainLabels[12_345], (2345 + 1) % 10);
    assert.equal(d.trainImages[12_345 * 3072], 2);
    assert.equal(d.trainImages[12_345 * 3072 + 3071], 2345 % 251);
    assert.equal(d.trainImages[12_345 * 3072 + 1], 0);
    assert.equal(d.trainImages[49_999 * 3072], 5);
    assert.equal(d.testLabels[7], (7 + 5) % 10);
    assert.equal(d.testImages[7 * 3072], 6);

    const s = await loadCifar10(dir, { trainSubset: 10_005, testSubset: 3 });
    assert.equal(s.trainLabels.length, 10_005);
    assert.equal(s.trainImages.length, 10_005 * 3072);
    assert.deepEqual(
      s.trainImages.subarray(0, 3072 * 10_005),
      d.trainImages.subarray(0, 3072 * 10_005),
    );
    assert.equal(s.trainImages[10_004 * 3072], 2); // spans into data_batch_2
    assert.deepEqual([...s.testLabels], [5, 6, 7]);
    await assert.rejects(
      loadCifar10(dir, { trainSubset: 50_001 }),
      /trainSubset/,
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("loadCifar10 only reads the files a subset needs", async () => {
  const dir = await writeFixtureDir(["data_batch_1.bin", CIFAR10_TEST_FILE]);
  try {
    const s = await loadCifar10(dir, { trainSubset: 10_000 });
    assert.equal(s.trainLabels.length, 10_000);
    await assert.rejects(
      loadCifar10(dir, { trainSubset: 10_001 }),
      /data_batch_2\.bin is missing/,
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("loadCifar10 rejects missing folder, bad size and bad labels naming the file", async () => {
  await assert.rejects(
    loadCifar10("/nonexistent/cifar"),
    /\/nonexistent\/cifar does not exist.*--data/,
  );
  const dir = await Deno.makeTempDir();
  try {
    const file = join(dir, "data_batch_1.bin");
    await Deno.writeFile(file, new Uint8Array(FILE_BYTES - 1));
    await assert.rejects(loadCifar10(dir, { trainSubset: 1, source: "cache" }), (e: Error) => {
      assert.match(
        e.message,
        /data_batch_1\.bin has 30729999 bytes, expected 30730000/,
      );
      assert.match(e.message, /delete the folder.*--data/);
      assert.doesNotMatch(e.message, /\n/);
      return true;
    });
    // only the managed cache is to be deleted: a folder the user named is the user's
    await assert.rejects(loadCifar10(dir, { trainSubset: 1 }), (e: Error) => {
      assert.match(e.message, /expected 30730000 .*: point --data at a valid cifar-10-batches-bin folder/);
      assert.doesNotMatch(e.message, /delete/);
      return true;
    });
    await assert.rejects(
      loadCifar10(dir, { trainSubset: 1, source: "CIFAR10_DIR" }),
      /: point CIFAR10_DIR at a valid cifar-10-batches-bin folder, or unset it to download CIFAR-10$/,
    );
    const bytes = fixtureFile(0);
    bytes[1234 * RECORD_BYTES] = 10;
    await Deno.writeFile(file, bytes);
    // Labels are checked for the whole file, not only the records in the subset.
    await assert.rejects(
      loadCifar10(dir, { trainSubset: 1 }),
      /data_batch_1\.bin record 1234 has label 10/,
    );
    await Deno.remove(file);
    await assert.rejects(loadCifar10(dir), /data_batch_1\.bin is missing/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("untar reads ustar files, prefixes, skips dirs/pax, rejects truncation and bad checksums", () => {
  const big = new Uint8Array(1300).map((_, i) => i % 256);
  const bytes = tar([
    { name: "cifar-10-batches-bin/", type: "5" },
    {
      name: "pax",
      type: "x",
      data: enc.encode("30 mtime=1234567890.123456789\n"),
    },
    { name: "cifar-10-batches-bin/big.bin", data: big },
    {
      name: "small.txt",
      prefix: "cifar-10-batches-bin",
      data: enc.encode("hi"),
    },
    { name: "empty", data: new Uint8Array(0) },
  ]);
  const files = untar(bytes);
  assert.deepEqual(files.map((f) => f.name), [
    "cifar-10-batches-bin/big.bin",
    "cifar-10-batches-bin/small.txt",
    "empty",
  ]);
  assert.deepEqual(files[0].data, big);
  assert.equal(new TextDecoder().decode(files[1].data), "hi");
  assert.equal(files[2].data.length, 0);

  assert.throws(() => untar(bytes.subarray(0, 512 * 4 + 100)), /truncated/); // inside big.bin
  assert.throws(() => untar(bytes.subarray(0, 512 * 7)), /truncated/); // no end marker
  const bad = bytes.slice();
  bad[5] ^= 1;
  assert.throws(() => untar(bad), /checksum/);
});

// The fake CIFAR-10 tarball (six valid-size files of mostly zeros) compresses to
// a few hundred KB; build it once for all download tests.
let tarGzCache: Uint8Array<ArrayBuffer> | undefined;
async function fixtureTarGz() {
  if (!tarGzCache) {
    const entries: Entry[] = [{ name: "cifar-10-batches-bin/", type: "5" }];
    ALL_FILES.forEach((file, f) =>
      entries.push({
        name: `cifar-10-batches-bin/${file}`,
        data: fixtureFile(f),
      })
    );
    entries.push({
      name: "cifar-10-batches-bin/batches.meta.txt",
      data: enc.encode("airplane\n"),
    });
    const gz = new Blob([tar(entries)]).stream().pipeThrough(
      new CompressionStream("gzip"),
    );
    tarGzCache = await new Response(gz).bytes();
  }
  return tarGzCache;
}
const md5 = (b: Uint8Array) => createHash("md5").update(b).digest("hex");

Deno.test("cifarFromTarball (the page's way in): md5 checked, then the same records as loadCifar10 of the folder", async () => {
  const tgz = await fixtureTarGz(), dir = await writeFixtureDir();
  try {
    const tarball = new File([tgz], "cifar-10-binary.tar.gz");
    for (const subsets of [{ trainSubset: 10_005, testSubset: 3 }, {}]) {
      assert.deepEqual(await cifarFromTarball(tarball, { ...subsets, md5: md5(tgz) }), await loadCifar10(dir, subsets));
    }
    // the published md5 by default: any other file is refused before it is unpacked, with what to choose instead
    await assert.rejects(
      cifarFromTarball(tarball, {}),
      new RegExp(
        `^Error: cifar-10-binary.tar.gz has md5 ${md5(tgz)}, expected ${CIFAR10_MD5} \\(not the CIFAR-10 tarball\\): ` +
          "choose the official cifar-10-binary.tar.gz, from https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz$",
      ),
    );
    const gz = async (entries: Entry[]) =>
      await new Response(new Blob([tar(entries)]).stream().pipeThrough(new CompressionStream("gzip"))).bytes();
    const cases: [Entry[], RegExp][] = [
      [[], /x\.tar\.gz lacks cifar-10-batches-bin\/data_batch_1\.bin \(expected 30730000 bytes\)/],
      [
        ALL_FILES.map((f, i) => ({
          name: `cifar-10-batches-bin/${f}`,
          data: i === 5 ? fixtureFile(i).slice(1) : fixtureFile(i),
        })),
        /x\.tar\.gz has a 30729999-byte cifar-10-batches-bin\/test_batch\.bin/,
      ],
      [
        ALL_FILES.map((f, i) => ({
          name: `cifar-10-batches-bin/${f}`,
          data: i === 1 ? fixtureFile(i).fill(12, 0, 1) : fixtureFile(i),
        })),
        /cifar-10-batches-bin\/data_batch_2\.bin in x\.tar\.gz record 0 has label 12, expected 0-9/,
      ],
    ];
    for (const [entries, error] of cases) {
      const bytes = await gz(entries);
      await assert.rejects(cifarFromTarball(new File([bytes], "x.tar.gz"), { md5: md5(bytes) }), error);
    }
    const half = tgz.slice(0, tgz.length >> 1);
    await assert.rejects(
      cifarFromTarball(new File([half], "half.tar.gz"), { md5: md5(half) }),
      /^Error: could not unpack half\.tar\.gz \(.+\): choose the official cifar-10-binary\.tar\.gz/,
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

// Runs `fn` against a loopback server and an empty cache folder, always cleaning both up.
async function withServer(
  handler: (req: Request) => Response | Promise<Response>, // may wait for the client to give up (req.signal)
  fn: (base: string, cacheDir: string) => Promise<void>,
) {
  const server = Deno.serve(
    { hostname: "127.0.0.1", port: 0, onListen() {} },
    handler,
  );
  const cacheDir = await Deno.makeTempDir();
  try {
    await fn(`http://127.0.0.1:${server.addr.port}`, cacheDir);
  } finally {
    await server.shutdown();
    await Deno.remove(cacheDir, { recursive: true });
  }
}
async function listDir(dir: string) {
  return (await Array.fromAsync(Deno.readDir(dir))).map((e) => e.name).sort();
}

Deno.test("resolveCifar10Dir downloads, verifies, unpacks and caches", async () => {
  const tgz = await fixtureTarGz();
  let requests = 0;
  await withServer(
    () => (requests++, new Response(tgz)),
    async (base, cacheDir) => {
      const logs: string[] = [];
      const url = `${base}/cifar-10-binary.tar.gz`;
      const dir = await resolveCifar10Dir({
        cacheDir,
        url,
        md5: md5(tgz),
        log: (s) => logs.push(s),
        live: true, // the terminal's progress line
      });
      assert.equal(dir, join(cacheDir, "cifar-10-batches-bin"));
      assert.deepEqual(await listDir(cacheDir), ["cifar-10-batches-bin"]);
      assert.deepEqual(
        await listDir(dir),
        [...ALL_FILES, "batches.meta.txt"].sort(),
      );
      assert.match(
        logs.at(-1)!,
        /^\rdownloading cifar-10-binary\.tar\.gz: [\d.]+ \/ [\d.]+ MB\n$/,
      );
      const d = await loadCifar10(dir, { trainSubset: 20_000 });
      assert.equal(d.trainImages[15_000 * 3072], 2);
      assert.equal(d.testLabels[3], (3 + 5) % 10);
      // Second call finds the cache and does not download again.
      assert.equal(
        await resolveCifar10Dir({ cacheDir, url, md5: "x", log: () => {} }),
        dir,
      );
      assert.equal(requests, 1);
    },
  );
});

Deno.test("resolveCifar10Dir works without content-length (chunked response)", async () => {
  const tgz = await fixtureTarGz();
  const handler = () => new Response(new Blob([tgz]).stream()); // streamed body -> no content-length
  await withServer(handler, async (base, cacheDir) => {
    const logs: string[] = [];
    const dir = await resolveCifar10Dir({
      cacheDir,
      url: `${base}/c.tar.gz`,
      md5: md5(tgz),
      log: (s) => logs.push(s),
      live: true, // the terminal's progress line
    });
    assert.match(logs.at(-1)!, /^\rdownloading c\.tar\.gz: [\d.]+ MB\n$/);
    assert.equal(
      (await loadCifar10(dir, { trainSubset: 1, testSubset: 1 }))
        .trainLabels[0],
      0,
    );
  });
});

Deno.test("resolveCifar10Dir leaves nothing behind on bad md5, truncated archive or HTTP 404", async () => {
  const tgz = await fixtureTarGz();
  const half = tgz.slice(0, tgz.length >> 1);
  const handler = (req: Request) => {
    const path = new URL(req.url).pathname;
    if (path === "/full.tar.gz") return new Response(tgz);
    if (path === "/half.tar.gz") return new Response(half);
    return new Response("not found", { status: 404 });
  };
  await withServer(handler, async (base, cacheDir) => {
    const log = () => {};
    const wrongMd5 = "0".repeat(32);
    await assert.rejects(
      resolveCifar10Dir({
        cacheDir,
        url: `${base}/full.tar.gz`,
        md5: wrongMd5,
        log,
      }),
      new RegExp(`downloaded file has md5 ${md5(tgz)}, expected ${wrongMd5}`),
    );
    assert.deepEqual(await listDir(cacheDir), []);
    // md5 of the half file matches, so the truncation is caught while unpacking.
    await assert.rejects(
      resolveCifar10Dir({
        cacheDir,
        url: `${base}/half.tar.gz`,
        md5: md5(half),
        log,
      }),
      /could not unpack .*half\.tar\.gz/,
    );
    assert.deepEqual(await listDir(cacheDir), []);
    await assert.rejects(
      resolveCifar10Dir({
        cacheDir,
        url: `${base}/nope.tar.gz`,
        md5: md5(tgz),
        log,
      }),
      /could not download CIFAR-10 from .*nope\.tar\.gz \(HTTP 404.*--data DIR/,
    );
    assert.deepEqual(await listDir(cacheDir), []);
    // A missing cacheDir is not created when the download fails.
    const fresh = join(cacheDir, "sub");
    await assert.rejects(
      resolveCifar10Dir({ cacheDir: fresh, url: `${base}/nope`, log }),
      /HTTP 404/,
    );
    assert.deepEqual(await listDir(cacheDir), []);
  });
});

Deno.test("resolveCifar10Dir reports an unreachable server clearly", async () => {
  // Grab a free port, then close it so the connection is refused.
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (listener.addr as Deno.NetAddr).port;
  listener.close();
  const cacheDir = await Deno.makeTempDir();
  try {
    await assert.rejects(
      resolveCifar10Dir({
        cacheDir,
        url: `http://127.0.0.1:${port}/x.tar.gz`,
        log: () => {},
      }),
      /could not download CIFAR-10 from http:\/\/127\.0\.0\.1:\d+\/x\.tar\.gz \(.+\): check your network/,
    );
    assert.deepEqual(await listDir(cacheDir), []);
  } finally {
    await Deno.remove(cacheDir, { recursive: true });
  }
});

Deno.test("resolveCifar10Dir returns an explicit dir unchanged without network", async () => {
  const opts = {
    cacheDir: "/nonexistent/cache",
    url: "http://127.0.0.1:1/never.tar.gz",
  };
  assert.equal(
    await resolveCifar10Dir({ ...opts, dir: "/some/where/cifar" }),
    "/some/where/cifar",
  );
  assert.equal(
    await resolveCifar10Dir({ ...opts, dir: "relative/dir" }),
    "relative/dir",
  );
});

// ---- bounded downloads: a silent server, a stalled body, an endless body; what a killed run left behind

const untilAborted = (req: Request) => new Promise<never>((_, reject) => req.signal.addEventListener("abort", reject));

Deno.test("downloads: a server that never answers, or stalls mid-body, fails with one line after the stall limit", async () => {
  const limits = { stallMs: 400, maxBytes: 200_000_000 };
  await withServer(async (req) => {
    const path = new URL(req.url).pathname;
    if (path === "/silent.tar.gz") return await untilAborted(req); // no headers, ever
    // 3 bytes, then nothing: the body stalls
    const body = new ReadableStream({
      start(c) {
        c.enqueue(new Uint8Array(3));
        req.signal.addEventListener("abort", () => c.close());
      },
    });
    return new Response(body, { headers: { "content-length": "1000" } });
  }, async (base, cacheDir) => {
    for (const name of ["silent", "stalled"]) {
      const logs: string[] = [], started = performance.now();
      await assert.rejects(
        resolveCifar10Dir({ cacheDir, url: `${base}/${name}.tar.gz`, log: (s) => logs.push(s), live: true, limits }),
        new RegExp(`^Error: could not download CIFAR-10 from .*${name}\\.tar\\.gz \\(no data for 0\\.4 s\\): check`),
      );
      assert.ok(performance.now() - started < 5000, `${name}: gave up in time`);
      assert.deepEqual(await listDir(cacheDir), [], `${name}: nothing left behind`);
      // the progress line (if any) is ended before the error line
      if (logs.length) assert.equal(logs.at(-1), "\n", `${name}: ${JSON.stringify(logs)}`);
    }
  });
});

Deno.test("downloads: a body larger than the cap is cut off, streamed (not held in memory), nothing left", async () => {
  const limits = { stallMs: 5000, maxBytes: 1_000_000 };
  let sent = 0;
  await withServer((req) => {
    const chunk = new Uint8Array(64 * 1024);
    const body = new ReadableStream({ // endless, no content-length
      pull(c) {
        if (req.signal.aborted) return c.close();
        sent += chunk.length;
        c.enqueue(chunk);
      },
    });
    return new Response(body);
  }, async (base, cacheDir) => {
    await assert.rejects(
      resolveCifar10Dir({ cacheDir, url: `${base}/endless.tar.gz`, log: () => {}, limits }),
      /\(more than 1000000 bytes: not the CIFAR-10 tarball\)/,
    );
    assert.ok(sent < 20_000_000, `stopped reading after ${sent} bytes`);
    assert.deepEqual(await listDir(cacheDir), []);
  });
});

Deno.test("downloads: a killed unpack's temp folder is removed by the next run; the cache folder is ordinary", async () => {
  const tgz = await fixtureTarGz();
  await withServer(() => new Response(tgz), async (base, cacheDir) => {
    // left by a process that no longer runs (pid 2^22 + 1 is above Linux's pid limit), and by a live one (ours)
    const dead = join(cacheDir, ".cifar-10-batches-bin.tmp-4194305-abc");
    const live = join(cacheDir, `.cifar-10-batches-bin.tmp-${Deno.pid}-def`);
    await Deno.mkdir(dead);
    await Deno.writeTextFile(join(dead, "data_batch_1.bin"), "half");
    await Deno.mkdir(live);
    const dir = await resolveCifar10Dir({ cacheDir, url: `${base}/c.tar.gz`, md5: md5(tgz), log: () => {} });
    assert.deepEqual(await listDir(cacheDir), [
      ".cifar-10-batches-bin.tmp-" + `${Deno.pid}-def`,
      "cifar-10-batches-bin",
    ]);
    const ordinary = join(cacheDir, "ordinary");
    await Deno.mkdir(ordinary);
    assert.equal((await Deno.stat(dir)).mode! & 0o777, (await Deno.stat(ordinary)).mode! & 0o777);
  });
});

Deno.test("loadCifar10 refuses a FIFO in the data folder instead of reading it forever", async () => {
  const dir = await Deno.makeTempDir();
  try {
    assert.equal((await new Deno.Command("mkfifo", { args: [join(dir, "data_batch_1.bin")] }).output()).code, 0);
    await assert.rejects(
      loadCifar10(dir, { trainSubset: 1 }),
      /data_batch_1\.bin is not a regular file \(a folder, FIFO or device\): point --data at a valid/,
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("Md5 (the tarball's check, written out for browsers) agrees with node:crypto, whole or in odd chunks", () => {
  let x = 12345;
  const bytes = new Uint8Array(1_000_003).map(() => (x = (Math.imul(x, 1103515245) + 12345) >>> 0) >>> 24);
  for (const n of [0, 1, 55, 56, 57, 63, 64, 65, 119, 120, 128, 1000, bytes.length]) {
    const data = bytes.subarray(0, n);
    assert.equal(new Md5().update(data).hex(), md5(data), `${n} bytes`);
  }
  const chunked = new Md5();
  for (let at = 0, size = 1; at < bytes.length; at += size, size = 1 + ((size * 7 + 3) % 9973)) {
    chunked.update(bytes.subarray(at, at + size));
  }
  assert.equal(chunked.hex(), md5(bytes));
  assert.equal(new Md5().update(new TextEncoder().encode("abc")).hex(), "900150983cd24fb0d6963f7d28e17f72"); // RFC 1321
});
