// Offline tests for the CIFAR-10 download (issue 17): a trickling mirror, a cache folder that takes no file, a
// gzip-encoded reply, and the log when stdout is piped. The "mirror" is a loopback server; no network is used.
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { join } from "node:path";
import { CIFAR10_TEST_FILE, CIFAR10_TRAIN_FILES, DOWNLOAD_LIMITS, FILE_BYTES, resolveCifar10Dir } from "../main.ts";

const ALL_FILES = [...CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE];
const USE_DATA = "pass --data DIR pointing at an existing cifar-10-batches-bin folder";
const md5 = (b: Uint8Array) => createHash("md5").update(b).digest("hex");
const gzip = async (b: Uint8Array<ArrayBuffer>) =>
  await new Response(new Blob([b]).stream().pipeThrough(new CompressionStream("gzip"))).bytes();
const escape = (s: string) => s.replace(/[.*+?^${}()|[\]\\/]/g, "\\$&");

// A CIFAR-10-shaped tarball: the six .bin files of all-zero records (label 0) as ustar entries, gzipped.
let tarGzCache: Uint8Array<ArrayBuffer> | undefined;
async function fixtureTarGz() {
  if (tarGzCache) return tarGzCache;
  const enc = new TextEncoder(), parts: Uint8Array<ArrayBuffer>[] = [], data = new Uint8Array(FILE_BYTES);
  for (const file of ALL_FILES) {
    const h = new Uint8Array(512), put = (s: string, at: number) => h.set(enc.encode(s), at);
    put(`cifar-10-batches-bin/${file}`, 0);
    put("0000644\0", 100);
    put(data.length.toString(8).padStart(11, "0") + "\0", 124);
    put("0", 156);
    put("ustar\0" + "00", 257);
    put(" ".repeat(8), 148); // the checksum sums the header with its own field as spaces
    put(h.reduce((a, b) => a + b, 0).toString(8).padStart(6, "0") + "\0 ", 148);
    parts.push(h, data, new Uint8Array(-data.length & 511));
  }
  parts.push(new Uint8Array(1024)); // end of archive
  const tar = new Uint8Array(await new Blob(parts).arrayBuffer());
  return tarGzCache = await gzip(tar);
}

// Runs `fn` against a loopback server and an empty cache folder, always cleaning both up.
async function withServer(
  handler: (req: Request) => Response | Promise<Response>,
  fn: (base: string, cacheDir: string) => Promise<void>,
) {
  const server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, handler);
  const cacheDir = await Deno.makeTempDir();
  try {
    await fn(`http://127.0.0.1:${server.addr.port}`, cacheDir);
  } finally {
    await server.shutdown();
    await Deno.remove(cacheDir, { recursive: true });
  }
}
const listDir = async (dir: string) => (await Array.fromAsync(Deno.readDir(dir))).map((e) => e.name).sort();
const delay = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

Deno.test("download: a mirror that trickles (never silent for the stall limit) fails under the minimum rate", async () => {
  // 1 byte every 100 ms for at most 8 s: never silent for stallMs, far under minRate
  const limits = { ...DOWNLOAD_LIMITS, stallMs: 5_000, minRate: 1_000, windowMs: 500 };
  await withServer(() => {
    let sent = 0;
    const body = new ReadableStream({
      async pull(c) {
        await delay(100);
        if (sent++ >= 80) return c.close(); // (a client that gave up cancels the stream)
        c.enqueue(new Uint8Array(1));
      },
    });
    return new Response(body);
  }, async (base, cacheDir) => {
    const started = performance.now();
    await assert.rejects(
      resolveCifar10Dir({ cacheDir, url: `${base}/trickle.tar.gz`, log: () => {}, limits }),
      new RegExp(
        `^Error: could not download CIFAR-10 from ${escape(base)}/trickle\\.tar\\.gz \\(under 1 kB/s for 0\\.5 s\\): ` +
          `check your network, or ${USE_DATA}$`,
      ),
    );
    assert.ok(performance.now() - started < 4000, "gave up after about one window, not at the end of the trickle");
    assert.deepEqual(await listDir(cacheDir), [], "nothing left behind");
  });
});

// A folder that exists and refuses new files: permission bits for a user; root ignores those, but not /sys/kernel.
async function unwritableFolder(): Promise<{ dir: string; cleanup: () => Promise<void> } | undefined> {
  const dir = await Deno.makeTempDir();
  await Deno.chmod(dir, 0o555);
  try {
    await Deno.writeFile(join(dir, "probe"), new Uint8Array(0));
  } catch {
    return { dir, cleanup: () => Deno.chmod(dir, 0o755).then(() => Deno.remove(dir)) };
  }
  await Deno.remove(dir, { recursive: true });
  try {
    await Deno.writeFile("/sys/kernel/probe", new Uint8Array(0), { createNew: true });
    await Deno.remove("/sys/kernel/probe");
  } catch (e) {
    if (!(e instanceof Deno.errors.NotFound)) return { dir: "/sys/kernel", cleanup: () => Promise.resolve() };
  }
}
const unwritable = await unwritableFolder();

Deno.test({
  name: "download: a cache folder that takes no new file fails before any connection, naming the folder",
  ignore: !unwritable, // no such folder on this machine
  async fn() {
    const { dir, cleanup } = unwritable!;
    let requests = 0;
    try {
      await withServer(() => (requests++, new Response("not found", { status: 404 })), async (base) => {
        await assert.rejects(
          resolveCifar10Dir({ cacheDir: dir, url: `${base}/c.tar.gz`, log: () => {} }),
          new RegExp(
            `^Error: cannot write into the CIFAR-10 cache folder ${escape(dir)} \\([^\\n]+\\): ` +
              `make it writable, or ${USE_DATA}$`,
          ),
        );
      });
      assert.equal(requests, 0, "the mirror got no request");
    } finally {
      await cleanup();
    }
  },
});

Deno.test("download: a gzip-encoded reply, though identity was asked for, is unpacked whichever way it was meant", async () => {
  const tgz = await fixtureTarGz(), twice = await gzip(tgz);
  const asked: (string | null)[] = [];
  await withServer((req) => {
    asked.push(req.headers.get("accept-encoding"));
    // gzipped once more on the way (Content-Length the compressed size), or the tarball merely labelled gzip
    const body = new URL(req.url).pathname === "/twice.tar.gz" ? twice : tgz;
    return new Response(body, { headers: { "content-encoding": "gzip", "content-length": String(body.length) } });
  }, async (base, cacheDir) => {
    for (const name of ["twice", "labelled"]) {
      const dir = await resolveCifar10Dir({
        cacheDir: join(cacheDir, name),
        url: `${base}/${name}.tar.gz`,
        md5: md5(tgz),
        log: () => {},
      });
      assert.deepEqual(await listDir(dir), [...ALL_FILES].sort(), name);
      assert.equal((await Deno.stat(join(dir, ALL_FILES[0]))).size, FILE_BYTES, name);
      assert.deepEqual(await listDir(join(cacheDir, name)), ["cifar-10-batches-bin"], `${name}: no temp left`);
    }
  });
  assert.deepEqual(asked, ["identity", "identity"]);
});

Deno.test("download: piped output (live: false) gets a line at the start and one at the end, no \\r", async () => {
  const tgz = await fixtureTarGz();
  await withServer(() => new Response(tgz), async (base, cacheDir) => {
    const logs: string[] = [], piped = { live: false };
    await resolveCifar10Dir({ cacheDir, url: `${base}/c.tar.gz`, md5: md5(tgz), log: (s) => logs.push(s), ...piped });
    const out = logs.join("");
    assert.ok(!out.includes("\r"), JSON.stringify(out));
    assert.match(
      out,
      new RegExp(
        `^downloading c\\.tar\\.gz from ${escape(base)}/c\\.tar\\.gz \\.\\.\\.\\n` +
          `downloaded c\\.tar\\.gz: [\\d.]+ MB in \\d+ s\\n$`,
      ),
    );
  });
});
