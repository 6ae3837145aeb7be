// Shared test helpers: a seeded PRNG, a closeness assertion, a fixture dataset and main.ts run as a child process.
// Nothing here reuses main.ts math.
import assert from "node:assert/strict";
import { join } from "node:path";
import { FILE_BYTES, RECORD_BYTES, stateSpec } from "../main.ts";

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

/**
 * A network of base depth 4 (hlb's layout, stateSpec) with random weights of std `std` (seeded), its BN scales and
 * running variances 1, biases and running means 0: what --save writes, without a training run.
 */
export function randomNetwork(seed: number, std: number): Map<string, { shape: number[]; data: Float32Array }> {
  const rng = new Prng(seed);
  return new Map(
    stateSpec(4).map(({ name, shape }) => {
      const n = shape.reduce((a, b) => a * b, 1);
      const data = /(norm\d\.weight|running_var)$/.test(name)
        ? new Float32Array(n).fill(1)
        : /(bias|running_mean)$/.test(name)
        ? new Float32Array(n)
        : rng.normals(n, std);
      return [name, { shape, data }];
    }),
  );
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

export const ROOT = new URL("..", import.meta.url).pathname;

/** Runs `fn` with a fresh temp folder holding the fixture dataset (at `data`), removed afterwards. */
export async function withFixture(fn: (dir: string, data: string) => Promise<void>) {
  const dir = await Deno.makeTempDir();
  try {
    await fn(dir, await writeFixtureDataset(dir));
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

/** The one run log in `dir`, parsed (asserting there is exactly one). */
export async function onlyLog(dir: string) {
  const names = (await Array.fromAsync(Deno.readDir(dir))).map((e) => e.name);
  if (names.length !== 1) throw new Error(`expected one run log in ${dir}, found: ${names}`);
  return JSON.parse(await Deno.readTextFile(`${dir}/${names[0]}`));
}

/** The environment of a child main.ts: ours, without CIFAR10_DIR (each test names its data), plus `extra`. */
export function childEnv(extra: Record<string, string> = {}) {
  const env = Deno.env.toObject();
  delete env.CIFAR10_DIR;
  return { ...env, ...extra };
}

/** Runs main.ts (or a fork of it) as a user would, in a child process; stderr without Vulkan loader noise. */
export async function runMain(
  args: string[],
  opts: { cwd?: string; env?: Record<string, string>; script?: string } = {},
) {
  const env = childEnv(opts.env);
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", opts.script ?? join(ROOT, "main.ts"), ...args],
    cwd: opts.cwd ?? ROOT,
    env,
    clearEnv: true,
    stdout: "piped",
    stderr: "piped",
  }).output();
  const text = (b: Uint8Array) => new TextDecoder().decode(b);
  // Vulkan loaders may warn about XDG_RUNTIME_DIR on machines without a session: not ours
  const stderr = text(out.stderr).split("\n").filter((l) => l && !l.includes("XDG_RUNTIME_DIR")).join("\n");
  return { code: out.code, stdout: text(out.stdout), stderr };
}

/** main.ts as a child whose stdout is read as it comes: `until(pattern)` waits for it, `finish()` for the exit. */
export function spawnMain(args: string[], opts: { script?: string; prefix?: string[] } = {}) {
  const deno = ["run", "-A", opts.script ?? join(ROOT, "main.ts"), ...args];
  const child = new Deno.Command(opts.prefix ? opts.prefix[0] : Deno.execPath(), {
    args: opts.prefix ? [...opts.prefix.slice(1), Deno.execPath(), ...deno] : deno,
    env: childEnv(),
    clearEnv: true,
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const reader = child.stdout.getReader(), decoder = new TextDecoder();
  let stdout = "";
  const until = async (pattern: RegExp) => {
    while (!pattern.test(stdout)) {
      const { value, done } = await reader.read();
      if (done) throw new Error(`main.ts ended before printing ${pattern}:\n${stdout}`);
      stdout += decoder.decode(value);
    }
  };
  const finish = async () => {
    const pump = (async () => {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return;
        stdout += decoder.decode(value);
      }
    })();
    const [status, stderr] = await Promise.all([child.status, new Response(child.stderr).text(), pump]);
    return { code: status.code, stdout, stderr };
  };
  return { child, until, finish, stdoutSoFar: () => Promise.resolve(stdout) };
}

/**
 * A test that needs `shader-f16`: on an adapter without it, it is reported as ignored, the reason in its name,
 * never silently passed.
 */
export function f16Test(hasF16: boolean, name: string, fn: () => void | Promise<void>) {
  Deno.test({ name: hasF16 ? name : `${name} (skipped: no shader-f16 on this adapter)`, ignore: !hasF16, fn });
}

/** The Chromium (or Chrome) binary on the PATH, if any: for the --web page test and the Dawn suite. */
export function findChromium(): string | undefined {
  return ["chromium", "chromium-browser", "google-chrome"].find((name) => {
    try {
      return new Deno.Command(name, { args: ["--version"], stdout: "null", stderr: "null" }).outputSync().success;
    } catch {
      return false;
    }
  });
}

/** Headless Chromium with WebGPU (SwiftShader) on `url`, in a fresh profile; `close` kills it and removes the profile. */
export async function launchChromium(chromium: string, url: string, args: string[] = []) {
  const profile = await Deno.makeTempDir();
  const browser = new Deno.Command(chromium, {
    args: ["--headless=new", "--no-sandbox", "--enable-unsafe-webgpu", ...args, `--user-data-dir=${profile}`, url],
    stdout: "null",
    stderr: "null",
  }).spawn();
  const close = async () => {
    browser.kill("SIGKILL");
    await browser.status;
    await Deno.remove(profile, { recursive: true }).catch(() => {});
  };
  return { status: browser.status, close };
}

/**
 * A page in headless Chromium, driven through the DevTools protocol (no npm dependency): `evaluate` runs an
 * expression in the page and returns its value, `screenshot` returns a PNG, `close` ends the browser. `initScript`
 * runs in the page before its own scripts (the page is then opened once it is in place); `inWorker` sends a DevTools
 * command to the page's first dedicated Worker.
 */
export async function chromiumPage(
  chromium: string,
  url: string,
  opts: { windowSize?: string; initScript?: string } = {},
) {
  const port = 9300 + Math.floor(Math.random() * 600);
  const { close } = await launchChromium(chromium, opts.initScript ? "about:blank" : url, [
    `--window-size=${opts.windowSize ?? "1100,1000"}`,
    `--remote-debugging-port=${port}`,
  ]);
  let target: { type: string; webSocketDebuggerUrl: string } | undefined;
  for (let i = 0; i < 100 && !target; i++) {
    await new Promise((r) => setTimeout(r, 100));
    const list = await fetch(`http://127.0.0.1:${port}/json`).then((r) => r.json()).catch(() => []);
    target = list.find((t: { type: string }) => t.type === "page");
  }
  if (!target) {
    await close();
    throw new Error("Chromium's DevTools endpoint did not answer");
  }
  const ws = new WebSocket(target.webSocketDebuggerUrl);
  await new Promise((r) => ws.addEventListener("open", r, { once: true }));
  let id = 0;
  // sessionId: a target attached through this page's connection (its Worker), else the page itself
  const call = (method: string, params = {}, sessionId?: string) =>
    new Promise<Record<string, unknown>>((resolve, reject) => {
      const mine = ++id;
      const on = (e: MessageEvent) => {
        const m = JSON.parse(e.data);
        if (m.id !== mine) return;
        ws.removeEventListener("message", on);
        if (m.error) reject(new Error(`DevTools ${method}: ${m.error.message}`));
        else resolve(m.result);
      };
      ws.addEventListener("message", on);
      ws.send(JSON.stringify({ id: mine, method, params, sessionId }));
    });
  if (opts.initScript) {
    await call("Page.enable");
    await call("Page.addScriptToEvaluateOnNewDocument", { source: opts.initScript });
    await call("Page.navigate", { url });
  }
  let worker: Promise<string> | undefined;
  const workerSession = () =>
    worker ??= new Promise<string>((resolve) => {
      const on = (e: MessageEvent) => {
        const m = JSON.parse(e.data);
        if (m.method !== "Target.attachedToTarget" || m.params.targetInfo.type !== "worker") return;
        ws.removeEventListener("message", on);
        resolve(m.params.sessionId);
      };
      ws.addEventListener("message", on);
      call("Target.setAutoAttach", { autoAttach: true, waitForDebuggerOnStart: false, flatten: true });
    });
  return {
    evaluate: async (expression: string) =>
      ((await call("Runtime.evaluate", { expression, returnByValue: true, awaitPromise: true })).result as {
        value?: unknown;
      })?.value,
    inWorker: async (method: string, params = {}) => await call(method, params, await workerSession()),
    /** Chooses `paths` in the page's file input `selector`, as a user would (the input's change event fires). */
    chooseFiles: async (selector: string, paths: string[]) => {
      const found = await call("Runtime.evaluate", {
        expression: `document.querySelector(${JSON.stringify(selector)})`,
      });
      const { objectId } = found.result as { objectId?: string };
      if (!objectId) throw new Error(`no ${selector} on the page`);
      await call("DOM.setFileInputFiles", { objectId, files: paths });
    },
    screenshot: async () => {
      const shot = await call("Page.captureScreenshot", { format: "png", captureBeyondViewport: true });
      return Uint8Array.from(atob(String(shot.data)), (c) => c.charCodeAt(0));
    },
    close: async () => {
      ws.close();
      await close();
    },
  };
}
