// The GPU tests on a second WebGPU implementation: Chromium's Dawn (its own validation and its Tint shader compiler),
// headless, on SwiftShader. Bundles the GPU test files (FILES below) for the browser, with Deno.test and
// node:assert/strict stood in for, runs them file by file in one page, prints a line per test and the suite's count,
// and exits 1 if any failed. Tests that need what the adapter lacks (shader-f16) report
// themselves ignored, with the reason in their name.
//   deno run -A tests/dawn.ts [FILE.test.ts ...]
import { join } from "node:path";
import { bundleForBrowser } from "../main.ts";
import { findChromium, launchChromium, ROOT } from "./util.ts";

const FILES = ["kernels", "muon", "conv", "network", "weights", "train", "slicing", "airbench", "answers"].map((f) =>
  `${f}.test.ts`
);
const files = Deno.args.length ? Deno.args : FILES;
const TIMEOUT_MS = 15 * 60_000; // the whole suite took 2 min 45 s on SwiftShader (2 cores)

/** node:assert/strict, as much of it as these tests use (strict equality, deep equality, throws and rejects). */
const ASSERT = `(() => {
  const fail = (message, fallback) => { throw new Error(message ?? fallback); };
  const show = (x) => { try { return JSON.stringify(x)?.slice(0, 300); } catch { return String(x); } };
  const deep = (a, b) => {
    if (Object.is(a, b)) return true;
    if (a === null || b === null || typeof a !== "object" || typeof b !== "object") return false;
    if (Object.getPrototypeOf(a) !== Object.getPrototypeOf(b)) return false;
    if (ArrayBuffer.isView(a)) return a.length === b.length && Array.prototype.every.call(a, (x, i) => Object.is(x, b[i]));
    if (a instanceof Map) return a.size === b.size && [...a].every(([k, v]) => b.has(k) && deep(v, b.get(k)));
    const ka = Object.keys(a), kb = Object.keys(b);
    return ka.length === kb.length && ka.every((k) => Object.hasOwn(b, k) && deep(a[k], b[k]));
  };
  const check = (err, expected) => {
    if (expected === undefined) return;
    if (expected instanceof RegExp) {
      if (!expected.test(String(err))) fail(undefined, "the error did not match " + expected + ": " + String(err));
    } else if (typeof expected === "function" && expected(err) !== true) {
      fail(undefined, "the validation function rejected the error: " + String(err));
    }
  };
  return {
    ok: (v, m) => { if (!v) fail(m, "expected a truthy value, got " + show(v)); },
    equal: (a, b, m) => { if (!Object.is(a, b)) fail(m, show(a) + " !== " + show(b)); },
    notEqual: (a, b, m) => { if (Object.is(a, b)) fail(m, show(a) + " === " + show(b)); },
    deepEqual: (a, b, m) => { if (!deep(a, b)) fail(m, "not deep-equal: " + show(a) + " vs " + show(b)); },
    notDeepEqual: (a, b, m) => { if (deep(a, b)) fail(m, "deep-equal: " + show(a)); },
    match: (s, re, m) => { if (!re.test(s)) fail(m, show(s) + " does not match " + re); },
    doesNotMatch: (s, re, m) => { if (re.test(s)) fail(m, show(s) + " matches " + re); },
    throws: (fn, expected, m) => {
      try { fn(); } catch (e) { return check(e, expected); }
      fail(m, "Missing expected exception.");
    },
    rejects: async (p, expected, m) => {
      try { await (typeof p === "function" ? p() : p); } catch (e) { return check(e, expected); }
      fail(m, "Missing expected rejection.");
    },
  };
})();`;

/** The page: registers each file's Deno.test calls, runs them in order, posts every result. */
const PAGE = `<!doctype html><meta charset="utf-8"><title>Dawn suite</title><script type="module">
const post = (path, body) => fetch(path, { method: "POST", body: JSON.stringify(body) });
addEventListener("error", (e) => post("/result", { file: "?", name: "uncaught error", ok: false, error: String(e.message) }));
const a = await navigator.gpu?.requestAdapter();
await post("/adapter", a ? { vendor: a.info.vendor, architecture: a.info.architecture, f16: a.features.has("shader-f16") } : null);
for (const file of ${JSON.stringify(files)}) {
  const tests = [];
  // Deno.test stood in for; and Deno.build.os, which main.ts reads as it loads (HANGUP_IGNORED: only on linux)
  globalThis.Deno = { build: { os: "browser" }, test(def, fn) { tests.push(typeof def === "string" ? { name: def, fn } : { ...def, fn: fn ?? def.fn }); } };
  try {
    await import("/t/" + file.replace(/\\.ts$/, ".js"));
  } catch (e) {
    await post("/result", { file, name: "(loading the file)", ok: false, error: String(e?.stack ?? e) });
    continue;
  }
  for (const t of tests) {
    if (t.ignore) { await post("/result", { file, name: t.name, ignored: true }); continue; }
    const started = performance.now();
    try {
      await t.fn();
      await post("/result", { file, name: t.name, ok: true, ms: performance.now() - started });
    } catch (e) {
      await post("/result", { file, name: t.name, ok: false, ms: performance.now() - started, error: String(e?.stack ?? e) });
    }
  }
}
await post("/done", {});
</script>`;

const chromium = findChromium();
if (!chromium) {
  console.log("dawn: no chromium on the PATH (apt-get install chromium): the suite did not run");
  console.log("dawn: 0 passed | 0 failed | 0 ignored");
  Deno.exit(0);
}
const bundles = new Map<string, string>();
for (const file of files) {
  const code = (await bundleForBrowser(join(ROOT, "tests", file))).replace(
    /^import (\w+) from "node:assert\/strict";$/gm, // once per module that imports it (assert, assert2, ...)
    (_, name: string) => `const ${name} = ${ASSERT};`,
  );
  const left = code.match(/^import .* from "node:.*";$/m);
  if (left) throw new Error(`${file}: the browser bundle still imports ${left[0]}`);
  bundles.set(`/t/${file.replace(/\.ts$/, ".js")}`, code);
}

let passed = 0, failed = 0, ignored = 0;
const done = Promise.withResolvers<void>();
const server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, async (req) => {
  const path = new URL(req.url).pathname, js = { headers: { "content-type": "text/javascript" } };
  if (path === "/") return new Response(PAGE, { headers: { "content-type": "text/html" } });
  if (bundles.has(path)) return new Response(bundles.get(path), js);
  const kernel = path.match(/\/kernels\/(\w+\.wgsl)$/)?.[1];
  if (kernel) return new Response(await Deno.readTextFile(join(ROOT, "kernels", kernel)));
  if (req.method === "POST") {
    const body = await req.json();
    if (path === "/adapter") console.log(`dawn: adapter ${JSON.stringify(body)}`);
    if (path === "/result") {
      const where = `${body.file} | ${body.name}`;
      if (body.ignored) (ignored++, console.log(`${where} ... ignored`));
      else if (body.ok) (passed++, console.log(`${where} ... ok (${(body.ms / 1000).toFixed(1)}s)`));
      else (failed++, console.log(`${where} ... FAILED\n  ${String(body.error).split("\n").slice(0, 8).join("\n  ")}`));
    }
    if (path === "/done") done.resolve();
    return new Response("ok");
  }
  return new Response("not found", { status: 404 });
});
const browser = await launchChromium(chromium, `http://127.0.0.1:${server.addr.port}/`);
let finished = false;
browser.status.then((status) => {
  if (finished) return;
  console.log(`dawn: chromium exited (code ${status.code}) before the suite finished`);
  failed++;
  done.resolve();
});
const timer = setTimeout(() => {
  console.log(`dawn: the suite did not finish in ${TIMEOUT_MS / 60_000} min`);
  failed++;
  done.resolve();
}, TIMEOUT_MS);
await done.promise;
finished = true;
clearTimeout(timer);
await browser.close();
await server.shutdown();
console.log(`dawn: ${passed} passed | ${failed} failed | ${ignored} ignored`);
Deno.exit(failed ? 1 : 0);
