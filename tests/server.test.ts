// The --web server answers only its own page (issue 17): each refusal as a hostile page or a careless user meets it,
// against a real server (a child main.ts) with the fixture dataset. No browser: requests are made here, as a page
// (or another site) would make them.
import assert from "node:assert/strict";
import { join } from "node:path";
import { parseFlags } from "../main.ts";
import { runMain, spawnMain, writeFixtureDataset } from "./util.ts";

const TINY = ["--train-subset", "64", "--test-subset", "8", "--base-depth", "4", "--batch-size", "16", "--epochs", "1"];

/** Kilobytes the process has at most held (VmHWM), from /proc. */
async function peakKb(pid: number) {
  return Number((await Deno.readTextFile(`/proc/${pid}/status`)).match(/VmHWM:\s*(\d+)/)![1]);
}

Deno.test("server: only its own page is answered, and only its own run log is kept", async (t) => {
  const dir = await Deno.makeTempDir();
  const data = await writeFixtureDataset(dir), logs = join(dir, "logs"), cliLogs = join(dir, "cli");
  // a genuine run log of this script, as the page would post it (its start moved to now: it ran before the server)
  const cli = await runMain(["--data", data, "--log-dir", cliLogs, ...TINY]);
  assert.equal(cli.code, 0, cli.stderr);
  const [name] = (await Array.fromAsync(Deno.readDir(cliLogs))).map((e) => e.name);
  const realLog = JSON.parse(await Deno.readTextFile(join(cliLogs, name)));
  const server = spawnMain(["--web", "--data", data, "--log-dir", logs, "--train-subset", "100"]);
  try {
    await server.until(/training page: \S+\n/);
    const url = new URL((await server.stdoutSoFar()).match(/training page: (\S+)/)![1]);
    assert.match(url.pathname, /^\/[0-9a-f]{32}\/$/, "the address holds the server's secret");
    const base = `${url.origin}${url.pathname}`; // http://127.0.0.1:PORT/<secret>/
    const ticketOf = async () => {
      const page = await (await fetch(url)).text();
      return page.match(/<meta name="page-ticket" content="([0-9a-f]{32})">/)![1];
    };
    const post = async (log: unknown, o: { ticket?: string; headers?: Record<string, string>; body?: string } = {}) => {
      const headers = { "content-type": "application/json", "x-page-ticket": o.ticket ?? await ticketOf() };
      const res = await fetch(`${base}log`, {
        method: "POST",
        headers: { ...headers, ...o.headers },
        body: o.body ?? JSON.stringify(log),
      });
      return { status: res.status, body: await res.json() };
    };
    const now = () => ({ ...realLog, startedAt: new Date().toISOString() });
    const kept = async () => (await Array.fromAsync(Deno.readDir(logs)).catch(() => [])).length;

    await t.step("the page is served only under the printed address's secret", async () => {
      const page = await fetch(url);
      assert.equal(page.status, 200);
      assert.match(await page.text(), /hlb-CIFAR10 on WebGPU/);
      for (const path of ["/", "/data/testLabels", "/log", `/${"0".repeat(32)}/`]) {
        const res = await fetch(`${url.origin}${path}`);
        assert.equal(res.status, 404, path);
        await res.body?.cancel();
      }
    });

    await t.step("another Host (DNS rebinding) or another Origin is refused", async () => {
      // fetch() will not forge Host: a raw request on the socket does it, as a rebound name would arrive
      const conn = await Deno.connect({ hostname: "127.0.0.1", port: Number(url.port) });
      await conn.write(
        new TextEncoder().encode(`GET ${url.pathname} HTTP/1.1\r\nHost: evil.example:${url.port}\r\n\r\n`),
      );
      const reply = new Uint8Array(4096), n = await conn.read(reply);
      conn.close();
      assert.match(new TextDecoder().decode(reply.subarray(0, n!)), /^HTTP\/1\.1 421/);
      const other = await post(now(), { headers: { origin: "http://evil.example" } });
      assert.equal(other.status, 403);
    });

    await t.step("only GET of the page and data, and POST of JSON to /log", async () => {
      for (const [method, path] of [["PUT", ""], ["DELETE", "data/testLabels"], ["GET", "log"]]) {
        const res = await fetch(`${base}${path}`, { method });
        assert.equal(res.status, 405, `${method} ${path}`);
        await res.body?.cancel();
      }
      // a cross-site form's "simple" request: text/plain, no preflight
      const plain = await post(now(), { headers: { "content-type": "text/plain" } });
      assert.equal(plain.status, 415);
    });

    await t.step("a body over the cap is refused, not read whole", async () => {
      const big = await post(null, { body: `{"pad":"${"x".repeat(3_000_000)}"}` });
      assert.equal(big.status, 413);
      assert.equal(await kept(), 0);
    });

    await t.step("a log needs a ticket of a page this server served, used once", async () => {
      assert.equal((await post(now(), { ticket: "f".repeat(32) })).status, 403);
      assert.equal((await post(now(), { ticket: "" })).status, 403);
      const ticket = await ticketOf();
      const first = await post(now(), { ticket });
      assert.equal(first.status, 200, JSON.stringify(first.body));
      assert.equal(await kept(), 1);
      assert.equal((await post(now(), { ticket })).status, 403, "a ticket keeps one log");
      await server.until(/run log from the page \(status completed\): .*\.json/);
    });

    await t.step("a log that is not this script's, not final, or not from this server's time is refused", async () => {
      const cases: [string, unknown][] = [
        ["another script", { ...now(), script: { ...realLog.script, source: "console.log('hi')" } }],
        ["a fake sha256 alone", { ...now(), script: { path: "x", sha256: "a".repeat(64), source: "x" } }],
        ["a running log", { ...now(), status: "running" }],
        ["an unknown status", { ...now(), status: "\x1b[2J\x1b[Herror: forged" }],
        ["a date long ago", { ...realLog, startedAt: "2001-01-01T00:00:00.000Z" }],
        ["a date out of range", { ...realLog, startedAt: "+275760-09-13T00:00:00.000Z" }],
        ["an unknown field", { ...now(), planted: true }],
        ["not an object", [1, 2, 3]],
      ];
      for (const [what, log] of cases) {
        const res = await post(log);
        assert.equal(res.status, 400, `${what}: ${JSON.stringify(res.body)}`);
      }
      assert.equal(await kept(), 1);
    });

    await t.step("the terminal never prints what a request sent: no escape codes, no forged lines", async () => {
      const printed = await server.stdoutSoFar();
      assert.ok(!printed.includes("\x1b"), "no escape code printed");
      assert.doesNotMatch(printed, /forged/);
      assert.equal(printed.match(/run log from the page/g)?.length, 1);
    });

    await t.step("parallel requests for distinct subsets are slices of one load", async () => {
      const before = await peakKb(server.child.pid);
      const subsets = [100, 2000, 30000, 50000];
      const got = await Promise.all(
        subsets.map(async (n) =>
          new Uint8Array(await (await fetch(`${base}data/trainImages?train-subset=${n}`)).arrayBuffer())
        ),
      );
      got.forEach((bytes, i) => assert.equal(bytes.length, subsets[i] * 3072));
      assert.deepEqual(got[0], got[3].subarray(0, 100 * 3072));
      const grew = (await peakKb(server.child.pid)) - before;
      assert.ok(grew < 400_000, `the server's peak memory grew by ${grew} kB for 4 requests`);
    });
  } finally {
    server.child.kill("SIGTERM");
    await server.finish();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("server: the dataset is checked before the address is printed", async () => {
  const r = await runMain(["--web", "--data", "/nonexistent/cifar", "--no-log"]);
  assert.equal(r.code, 1);
  assert.doesNotMatch(r.stdout, /training page/);
  assert.match(r.stderr, /^error: CIFAR-10 folder \/nonexistent\/cifar does not exist: .*$/);
  assert.equal(r.stderr.split("\n").length, 1, r.stderr);
});

Deno.test("server: a --port in use is named at once, before the page is built", async () => {
  const taken = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  try {
    const port = (taken.addr as Deno.NetAddr).port, started = performance.now();
    const r = await runMain(["--web", "--data", "/nonexistent/cifar", "--no-log", "--port", String(port)]);
    assert.equal(r.code, 1);
    assert.match(r.stderr, new RegExp(`^error: --port ${port} is in use .*: pick another, or leave --port out.*$`));
    assert.ok(performance.now() - started < 20_000);
  } finally {
    taken.close();
  }
});

Deno.test("server: --static takes FILE.html in any case, and refuses a name that is only .html", () => {
  assert.equal(parseFlags(["--web", "--static", "P.HTML"]).static, "P.HTML");
  assert.equal(parseFlags(["--web", "--static", "dir/page.Html"]).static, "dir/page.Html");
  for (const bad of [".html", "dir/.html", "page.htm"]) {
    assert.throws(() => parseFlags(["--web", "--static", bad]), /^Error: --static names the page's file: FILE\.html/);
  }
});
