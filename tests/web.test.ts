// --web: headless Chromium (Dawn, its own WebGPU implementation and shader compiler, on SwiftShader) opens the page
// for a tiny run; its run log must match the same run in Deno. Needs the `chromium` package (.ci/run installs it);
// without it the test reports itself skipped, with the reason.
import assert from "node:assert/strict";
import { join } from "node:path";
import {
  BROWSER_NO_ADAPTER,
  BROWSER_NO_WEBGPU,
  checkFits,
  CIFAR10_MD5,
  confusionMatrix,
  encodeSafetensors,
  evaluateWeights,
  freeSince,
  type Gpu,
  imageFromRgba,
  initGpu,
  loadCifar10,
  Md5,
  parseFlags,
  predictedClasses,
  readSavedNetwork,
  RECIPES,
  rgbaFromImage,
  savedMetadata,
  softmaxRows,
  topClasses,
  uploadImages,
  webPage,
} from "../main.ts";
import {
  chromiumPage,
  findChromium,
  randomNetwork,
  runMain,
  spawnMain,
  withFixture,
  writeFixtureDataset,
} from "./util.ts";

const chromium = findChromium();

/** A test that needs Chromium: without it, reported as ignored with the reason, never silently passed. */
function chromiumTest(name: string, fn: () => Promise<void>) {
  Deno.test({ name: chromium ? name : `${name} (skipped: no chromium installed)`, ignore: !chromium, fn });
}

type Page = Awaited<ReturnType<typeof chromiumPage>>;

/** Waits until `expression` is true in the page; after `ms`, fails with `what` and the page's text. */
async function waitFor(page: Page, expression: string, what: string, ms = 240_000) {
  for (const started = performance.now(); !(await page.evaluate(expression));) {
    if (performance.now() - started > ms) {
      throw new Error(`${what} in ${ms / 1000} s: ${await page.evaluate("document.body.innerText")}`);
    }
    await new Promise((r) => setTimeout(r, 250));
  }
}

/** The text of the page's element `id`. */
const textOf = async (page: Page, id: string) =>
  String(await page.evaluate(`document.getElementById("${id}").textContent`));

/** Presses the page's Start once the page has enabled it (its bundle loaded, WebGPU asked for, a tarball chosen). */
async function pressStart(page: Page) {
  await waitFor(page, "!document.getElementById('start').disabled", "Start stayed disabled", 60_000);
  await page.evaluate("document.getElementById('start').click()");
}

/** Types `values` into the page's form (field by flag name), as a visitor would: each field's input event fires. */
async function fillForm(page: Page, values: Record<string, string>) {
  await waitFor(page, "!document.getElementById('settings').hidden", "no settings form", 60_000);
  await page.evaluate(
    `for (const [name, value] of ${JSON.stringify(Object.entries(values))}) {
      const field = document.getElementById("f-" + name);
      field.value = value;
      field.dispatchEvent(new Event("input"));
    }`,
  );
}

/** A query's flags, in a fixed order: the address the form writes orders them as the form does. */
const flagsOf = (search: string) => [...new URLSearchParams(search)].sort(([a], [b]) => a.localeCompare(b));

/** The command line's message for `args` (parseFlags: what a terminal user reads). */
function cliMessage(args: string[]) {
  try {
    parseFlags(args);
  } catch (e) {
    return (e as Error).message;
  }
  throw new Error(`the command line takes ${args.join(" ")}`);
}

/** `promise`, or a failure saying `what` after `ms`. */
function within<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const late = new Promise<never>((_, reject) =>
    timer = setTimeout(() => reject(new Error(`${what} in ${ms / 1000} s`)), ms)
  );
  return Promise.race([promise, late]).finally(() => clearTimeout(timer));
}

/** main.ts --web with `args`, once it has printed its page's address: the server and that address. */
async function serveWeb(args: string[]) {
  const server = spawnMain(["--web", ...args]);
  try {
    await server.until(/training page: \S+/);
  } catch (e) {
    await stopServer(server);
    throw e;
  }
  return { server, url: (await server.stdoutSoFar()).match(/training page: (\S+)/)![1] };
}

/** Ends a --web server as Ctrl-C would, and waits for it. */
async function stopServer(server: ReturnType<typeof spawnMain>) {
  server.child.kill("SIGTERM");
  await server.finish();
}

/** The one run log in `dir`. */
async function onlyLog(dir: string) {
  const names = (await Array.fromAsync(Deno.readDir(dir))).map((e) => e.name);
  assert.equal(names.length, 1);
  return JSON.parse(await Deno.readTextFile(join(dir, names[0])));
}

/** A page's run log against Deno's for the same flags and `seed`: the same script, kernels and run. */
// deno-lint-ignore no-explicit-any
function assertSameRun(page: any, deno: any, seed: number, laterEpochs = true) {
  // the same script, kernels, flags and seed; a browser and a WebGPU implementation of its own
  assert.equal(page.status, "completed");
  assert.equal(page.script.sha256, deno.script.sha256);
  assert.deepEqual(page.kernels, deno.kernels);
  assert.equal(page.runs[0].seed, seed);
  assert.match(page.deno.browser, /Chrome/);
  // the same run: as many epochs; epoch 0's train loss is the first batch's, before any update, so it differs by
  // float rounding only; later values may drift as two shader compilers round differently (stated: 0.05 in loss)
  const [p, d] = [page.runs[0].epochs, deno.runs[0].epochs];
  assert.equal(p.length, d.length);
  assert.ok(
    Math.abs(p[0].trainLoss - d[0].trainLoss) < 1e-3,
    `first batch loss ${p[0].trainLoss} vs ${d[0].trainLoss}`,
  );
  for (let e = 0; e < p.length; e++) {
    assert.ok(Number.isFinite(p[e].valLoss) && p[e].totalTimeSeconds > 0);
    if (!laterEpochs) continue;
    assert.ok(Math.abs(p[e].valLoss - d[e].valLoss) < 0.05, `epoch ${e} val loss ${p[e].valLoss} vs ${d[e].valLoss}`);
  }
}

/** A tiny run on the page (served by --web with `recipe` flags) and the same in Deno: the same run. */
async function pageMatchesDeno(recipe: string[]) {
  const dir = await Deno.makeTempDir();
  try {
    const data = await writeFixtureDataset(dir), pageLogs = join(dir, "page"), denoLogs = join(dir, "deno");
    const flags = ["--train-subset", "256", "--test-subset", "32", "--base-depth", "4", "--batch-size", "32"]
      .concat(["--epochs", "2", "--seed", "1", ...recipe]);
    const { server, url } = await serveWeb(["--data", data, "--log-dir", pageLogs, ...flags]);
    let page: Page | undefined;
    try {
      assert.match(url, /^http:\/\/127\.0\.0\.1:\d+\//);
      const query = "?train-subset=256&test-subset=32&base-depth=4&batch-size=32&epochs=2&seed=1";
      assert.ok(url.endsWith(query + recipe.map((f, i) => (i % 2 ? `=${f}` : `&${f.slice(2)}`)).join("")), url);
      // hlb: the page opened without a query, the flags typed into its form; airbench94: the page opened with the
      // query, its form filled from it. Either way Start trains with the form's values and puts them in the address.
      const search = new URL(url).search;
      page = await chromiumPage(chromium!, recipe.length ? url : url.replace(/\?.*$/, ""));
      if (!recipe.length) await fillForm(page, Object.fromEntries(new URLSearchParams(search)));
      else {
        await waitFor(page, "!document.getElementById('settings').hidden", "no settings form", 60_000);
        assert.equal(await page.evaluate("document.getElementById('f-recipe').value"), recipe[1]);
        assert.equal(await page.evaluate("document.getElementById('f-batch-size').value"), "32");
      }
      await pressStart(page);
      assert.deepEqual(flagsOf(String(await page.evaluate("location.search"))), flagsOf(search));
      await within(server.until(/run log from the page \(status completed\): /), 240_000, "no run log from the page");
      // the bars at their end, the run's time said; then the trained network's answers, whose accuracy is the run's
      // last (the same network, test set and TTA: the EMA for hlb, the network for airbench94)
      await waitFor(page, "!document.getElementById('answers').hidden", "no answers after the run", 60_000);
      assert.deepEqual(await page.evaluate("['pepoch', 'prun'].map((id) => document.getElementById(id).value)"), [
        1,
        1,
      ]);
      assert.match(await textOf(page, "trun"), /^run 1 of 1: done, \d+ s of training$/);
      const table = await textOf(page, "table"), answer = await textOf(page, "answertext");
      const last = table.match(
        recipe.length ? /final val accuracy \(TTA level 2\): ([\d.]+%)/ : /final EMA val accuracy: ([\d.]+%)/,
      );
      assert.ok(last, table);
      assert.match(
        answer,
        new RegExp(
          `^the network of run 1 \\(seed 1\\): test accuracy ${last[1]} \\| test loss [\\d.]+ \\| 32 images, `,
        ),
      );
      assert.equal(await page.evaluate("document.querySelectorAll('#grid figure').length"), 32);
      // the network offered for download is a --save file of this run: --eval reads it, and finds the page's accuracy
      // (to one image of the 32: Deno's lavapipe and the page's SwiftShader round apart, as above)
      assert.equal(
        await page.evaluate("document.getElementById('savenet').download"),
        `hlb-cifar10-${recipe[1] ?? "hlb"}-seed1.safetensors`,
      );
      const saved = join(dir, "page.safetensors"),
        base64 = await page.evaluate(
          `fetch(document.getElementById("savenet").href).then((r) => r.arrayBuffer()).then((b) => {
          const bytes = new Uint8Array(b);
          let text = "";
          for (let i = 0; i < bytes.length; i++) text += String.fromCharCode(bytes[i]);
          return btoa(text);
        })`,
        ) as string;
      await Deno.writeFile(saved, Uint8Array.from(atob(base64), (c) => c.charCodeAt(0)));
      const evaluated = await runMain(["--eval", saved, "--data", data, "--test-subset", "32"]);
      assert.equal(evaluated.code, 0, evaluated.stderr);
      const accuracy = (line: string) => Number(line.match(/test accuracy ([\d.]+)%/)![1]);
      assert.ok(
        Math.abs(accuracy(evaluated.stdout) - accuracy(answer)) <= 100 / 32 + 1e-9,
        `${evaluated.stdout} vs ${answer}`,
      );
      assert.match(evaluated.stdout, / \| 32 images, /);
    } finally {
      await page?.close();
      await stopServer(server);
    }
    const cli = await runMain(["--data", data, "--log-dir", denoLogs, ...flags]);
    assert.equal(cli.code, 0, cli.stderr);
    const pageLog = await onlyLog(pageLogs);
    // airbench94's later epochs are not compared: Muon's Newton-Schulz brings every singular value of a step to ~1, so
    // rounding-sized differences in a gradient's weakest directions become full-size differences in the step. At this
    // size a 1e-4 relative change of the whitening eps moved epoch 0's val loss by 0.09 in Deno (hlb's: 0.04), and the
    // page (Dawn) and Deno (lavapipe) ended epoch 0 at 2.49 and 2.37. The first batch, before any step, is compared.
    assertSameRun(pageLog, await onlyLog(denoLogs), 1, recipe.length === 0);
    assert.equal(pageLog.flags.recipe, recipe[1] ?? "hlb");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

chromiumTest(
  "--web: flags typed in the page's form, Start trains, the address carries them, the run matches Deno's",
  async () => {
    await pageMatchesDeno([]);
  },
);

chromiumTest("--web: the page opened with recipe=airbench94 fills its form, Start trains as Deno does", async () => {
  await pageMatchesDeno(["--recipe", "airbench94"]);
});

chromiumTest("--web: the Stop button stops the page's run after the current step, like Ctrl-C", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const data = await writeFixtureDataset(dir), logs = join(dir, "logs");
    // 160 steps of batch 16 per epoch, 3 epochs: Stop is pressed once the first row is on the page
    const flags = ["--train-subset", "2560", "--test-subset", "32", "--base-depth", "4", "--batch-size", "16"]
      .concat(["--epochs", "3", "--seed", "2"]);
    const { server, url } = await serveWeb(["--data", data, "--log-dir", logs, ...flags]);
    const page = await chromiumPage(chromium!, url);
    try {
      await pressStart(page);
      await waitFor(
        page,
        "/\\|\\s+0\\s+\\|/.test(document.body.textContent)",
        "the page printed no first row",
        180_000,
      );
      await page.evaluate("document.getElementById('stop').click()");
      await within(server.until(/run log from the page \(status interrupted\): /), 60_000, "no interrupted run log");
      assert.match(String(await page.evaluate("document.body.textContent")), /stopped in epoch \d+, after \d+ steps/);
    } finally {
      await page.close();
      await stopServer(server);
    }
    const log = await onlyLog(logs);
    assert.equal(log.status, "interrupted");
    const { epoch, steps } = log.runs[0].interrupted;
    assert.ok(epoch >= 1 && steps < 480, `stopped in epoch ${epoch} after ${steps} steps, not at the end of the run`);
    assert.ok(log.runs[0].epochs.length >= 1 && log.runs[0].epochs.length < 3);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

chromiumTest(
  "--web: a reloaded tab resumes from the checkpoint the browser kept, and ends with the same table",
  async () => {
    const dir = await Deno.makeTempDir();
    try {
      const data = await writeFixtureDataset(dir), logs = join(dir, "logs");
      // 8 steps of batch 32 per epoch, 3 epochs
      const flags = ["--train-subset", "256", "--test-subset", "32", "--base-depth", "4", "--batch-size", "32"]
        .concat(["--epochs", "3", "--seed", "4"]);
      const { server, url } = await serveWeb(["--data", data, "--log-dir", logs, ...flags]);
      const done = "document.title.startsWith('done: ')";
      // the rows of a finished page, less their clock (the last cell)
      const rows = async (page: Page) =>
        String(await page.evaluate("document.getElementById('table').textContent")).split("\n")
          .filter((l) => /^\|\s+\d+\s+\|/.test(l)).map((l) => l.replace(/\|[^|]*\|$/, "|"));
      let alone: string[] = [], resumed: string[] = [], text = "";
      const first = await chromiumPage(chromium!, url); // a profile of its own: nothing kept
      try {
        await pressStart(first);
        await waitFor(first, done, "the page did not finish");
        alone = await rows(first);
      } finally {
        await first.close();
      }
      const page = await chromiumPage(chromium!, url);
      try {
        await pressStart(page);
        await waitFor(
          page,
          "/\\|\\s+1\\s+\\|/.test(document.body.textContent)",
          "the page printed no epoch 1",
          180_000,
        );
        await page.evaluate("location.reload()");
        await waitFor(page, "!document.getElementById('resume').hidden", "the reloaded page offered no resume", 60_000);
        assert.match(
          String(await page.evaluate("document.getElementById('resumetext').textContent")),
          /^This browser keeps a checkpoint of this run: run 1, seed 4, at the end of epoch (1|2) \(started /,
        );
        await page.evaluate("document.getElementById('resumebtn').click()");
        await waitFor(page, done, "the resumed page did not finish");
        resumed = await rows(page);
        text = String(await page.evaluate("document.getElementById('table').textContent"));
        // done: the checkpoint is gone, a reload starts afresh
        assert.equal(
          await page.evaluate(
            "(async () => { try { await (await navigator.storage.getDirectory()).getFileHandle('hlb-cifar10-checkpoint.safetensors'); return true; } catch { return false; } })()",
          ),
          false,
        );
      } finally {
        await page.close();
        await stopServer(server);
      }
      assert.match(text, /resuming the checkpoint kept in this browser: run 1, from the end of epoch (1|2)/);
      assert.equal(alone.length, 3);
      assert.deepEqual(resumed, alone);
      const resumedLog = [...Deno.readDirSync(logs)].map((e) => JSON.parse(Deno.readTextFileSync(join(logs, e.name))))
        .find((l) => l.resumed);
      assert.equal(resumedLog?.status, "completed");
      assert.equal(resumedLog.runs[0].epochs.length, 3);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
);

chromiumTest(
  "--web --static: the page needs no server: it checks the tarball chosen on it, unpacks it, trains",
  async () => {
    const dir = await Deno.makeTempDir();
    try {
      const data = await writeFixtureDataset(dir), tarball = join(dir, "cifar-10-binary.tar.gz");
      const tar = await new Deno.Command("tar", { args: ["czf", tarball, "-C", dir, "cifar-10-batches-bin"] }).output();
      assert.ok(tar.success, "tar czf failed");
      const flags = ["--train-subset", "256", "--test-subset", "32", "--base-depth", "4", "--batch-size", "32"]
        .concat(["--epochs", "2", "--seed", "3", "--runs", "2"]);
      // 1. as written by the command line, on a static web host (a module Worker trains): the fixture is not the
      //    official tarball, and the page says so, naming the md5 expected
      const written = join(dir, "page.html");
      const cli = await runMain(["--web", "--static", written, ...flags]);
      assert.equal(cli.code, 0, cli.stderr);
      const fileUrl = cli.stdout.match(/^open (file:\S+), or put/m)?.[1];
      assert.equal(
        fileUrl,
        `file://${written}?train-subset=256&test-subset=32&base-depth=4&batch-size=32&epochs=2&seed=3&runs=2`,
      );
      const host = Deno.serve(
        { hostname: "127.0.0.1", port: 0, onListen() {} },
        async () => new Response(await Deno.readFile(written), { headers: { "content-type": "text/html" } }),
      );
      let page = await chromiumPage(
        chromium!,
        `http://127.0.0.1:${host.addr.port}/page.html${new URL(fileUrl!).search}`,
      );
      try {
        await waitFor(page, "!document.getElementById('pick').hidden", "no file picker");
        await page.chooseFiles("#tarball", [tarball]);
        await pressStart(page);
        await waitFor(page, "document.title.startsWith('done:')", "no end of the run");
        const text = String(await page.evaluate("document.body.innerText"));
        assert.match(text, new RegExp(`error: cifar-10-binary.tar.gz has md5 [0-9a-f]{32}, expected ${CIFAR10_MD5} `));
        assert.equal(await page.evaluate("document.title"), "done: failed");
      } finally {
        await page.close();
        await host.shutdown();
      }
      // 2. the same page expecting the fixture's md5, opened from the disk (no Worker there: the page's own thread);
      //    every frame the page paints records the run bar, to show that it moves between steps there too
      const md5 = new Md5().update(await Deno.readFile(tarball)).hex();
      await Deno.writeTextFile(written, await webPage({ server: false, md5 }));
      page = await chromiumPage(chromium!, fileUrl!, { initScript: PAINTED_BARS });
      let log;
      try {
        await waitFor(page, "!document.getElementById('pick').hidden", "no file picker");
        await page.chooseFiles("#tarball", [tarball]);
        await pressStart(page);
        await waitFor(page, "document.title.startsWith('done:')", "no end of the run");
        const text = String(await page.evaluate("document.body.innerText"));
        assert.match(text, /run 2\/2, seed 4\n/);
        assert.match(
          text,
          /\n +2 +4 +[\d.]+% +[\d.]+\nmean EMA val accuracy over 2 runs: [\d.]+% ± [\d.]+% \(std\)/,
        );
        log = JSON.parse(
          String(await page.evaluate("fetch(document.getElementById('download').href).then((r) => r.text())")),
        );
        // 8 steps an epoch, 2 epochs, 2 runs: the bar was painted part-way, at several steps of each run
        const painted = new Set(await page.evaluate("window.paintedBars") as number[]);
        const between = [...painted].filter((v) => v > 0 && v < 1);
        assert.ok(between.length >= 4, `the run bar was painted at ${[...painted]} only`);
      } finally {
        await page.close();
      }
      const deno = await runMain(["--data", data, "--log-dir", join(dir, "deno"), ...flags]);
      assert.equal(deno.code, 0, deno.stderr);
      assertSameRun(log, await onlyLog(join(dir, "deno")), 3);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
);

/** Run before the page's scripts: each frame painted records the run bar's value (window.paintedBars). */
const PAINTED_BARS = `window.paintedBars = [];
const paint = () => {
  const bar = document.getElementById("prun");
  if (bar && !document.getElementById("progress").hidden) window.paintedBars.push(bar.value);
  requestAnimationFrame(paint);
};
requestAnimationFrame(paint);`;

/** The --static page, written to a temp folder for `fn`: for the tests that need no data (the form, early errors). */
async function withStaticPage(fn: (file: string) => Promise<void>) {
  const dir = await Deno.makeTempDir();
  try {
    const file = join(dir, "page.html");
    await Deno.writeTextFile(file, await webPage({ server: false }));
    await fn(file);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

chromiumTest(
  "--web page: the form shows a bad value's command-line message next to its field; Start refuses it",
  async () => {
    await withStaticPage(async (file) => {
      const page = await chromiumPage(chromium!, `file://${file}?recipe=airbench94&batch-size=1`);
      try {
        await waitFor(page, "!document.getElementById('settings').hidden", "no settings form", 60_000);
        // the address's bad value: next to its field, in the command line's words
        assert.equal(await textOf(page, "e-batch-size"), cliMessage(["--batch-size", "1"]));
        // empty fields are the recipe's defaults, shown as placeholders
        const placeholder = async (name: string) =>
          String(await page.evaluate(`document.getElementById("f-${name}").placeholder`));
        assert.equal(await placeholder("epochs"), String(RECIPES.airbench94.misc.trainEpochs));
        assert.equal(await placeholder("batch-size"), String(RECIPES.airbench94.misc.batchSize));
        await fillForm(page, { recipe: "hlb" });
        assert.equal(await placeholder("batch-size"), String(RECIPES.hlb.misc.batchSize));
        // precision is offered only where the adapter has shader-f16 (SwiftShader has not)
        const f16 = await page.evaluate("navigator.gpu.requestAdapter().then((a) => a.features.has('shader-f16'))");
        assert.equal(await page.evaluate("document.getElementById('row-precision').hidden"), !f16);
        // typed: every bad field its own message, a corrected one none
        await fillForm(page, { epochs: "0", "batch-size": "32", seed: "-1" });
        assert.equal(await textOf(page, "e-epochs"), cliMessage(["--epochs", "0"]));
        assert.equal(await textOf(page, "e-seed"), cliMessage(["--seed=-1"]));
        assert.equal(await textOf(page, "e-batch-size"), "");
        assert.match(String(await page.evaluate("document.body.innerText")), /--epochs must be a number from/);
        // Start (enabled once a file is chosen) refuses: nothing starts, the address stays as it was
        await waitFor(page, "!document.getElementById('pick').hidden", "no file picker");
        await page.chooseFiles("#tarball", [file]);
        await pressStart(page);
        assert.equal(await page.evaluate("location.search"), "?recipe=airbench94&batch-size=1");
        assert.equal(await textOf(page, "table"), "");
        assert.equal(await page.evaluate("document.getElementById('stop').disabled"), true);
      } finally {
        await page.close();
      }
    });
  },
);

chromiumTest(
  "--web page: a browser without WebGPU, or without an adapter, is told so, and what to try, in a sentence on the page",
  async () => {
    await withStaticPage(async (file) => {
      // a browser without WebGPU: navigator.gpu removed before the page's scripts run
      const page = await chromiumPage(chromium!, `file://${file}`, { initScript: "delete Navigator.prototype.gpu;" });
      try {
        await waitFor(page, "!document.getElementById('settings').hidden", "no settings form", 60_000);
        assert.equal(await page.evaluate("'gpu' in navigator"), false);
        assert.equal(await textOf(page, "device"), `error: ${BROWSER_NO_WEBGPU}`);
        assert.ok(String(await page.evaluate("document.body.innerText")).includes(BROWSER_NO_WEBGPU));
        assert.match(BROWSER_NO_WEBGPU, /Chrome or Edge/);
        await page.chooseFiles("#tarball", [file]);
        assert.equal(await page.evaluate("document.getElementById('start').disabled"), true);
      } finally {
        await page.close();
      }
      // WebGPU, but no adapter (a blocklisted GPU, hardware acceleration off): said too
      const none = await chromiumPage(chromium!, `file://${file}`, {
        initScript: "GPU.prototype.requestAdapter = async () => null;",
      });
      try {
        await waitFor(none, "!document.getElementById('settings').hidden", "no settings form", 60_000);
        assert.equal(await textOf(none, "device"), `error: ${BROWSER_NO_ADAPTER}`);
      } finally {
        await none.close();
      }
    });
  },
);

chromiumTest(
  "--web page: a batch too large for the adapter is refused, naming the largest that fits; corrected, Start again checks the tarball's md5",
  async () => {
    await withStaticPage(async (file) => {
      // base depth 64 (the default) at batch 50000: 12 GiB for the widest activation, over any adapter's buffers
      const page = await chromiumPage(chromium!, `file://${file}?batch-size=50000`);
      try {
        await waitFor(page, "!document.getElementById('pick').hidden", "no file picker");
        await page.chooseFiles("#tarball", [file]); // never read: the check comes first
        await pressStart(page);
        await waitFor(page, "document.title.startsWith('done:')", "no end of the run", 60_000);
        // the terminal's words for this adapter's limits (a device gets the default alignment, 256)
        const [maxBinding, maxBuffer] = await page.evaluate(
          "navigator.gpu.requestAdapter().then((a) => [a.limits.maxStorageBufferBindingSize, a.limits.maxBufferSize])",
        ) as number[];
        const gpu = { limits: { maxBinding, maxBuffer, align: 256 } } as unknown as Gpu;
        let expected = "";
        assert.throws(() => checkFits(gpu, 50000, 64), (e: Error) => (expected = e.message, true));
        assert.match(expected, /: use --batch-size \d+ or less$/);
        assert.ok(String(await page.evaluate("document.body.innerText")).includes(`error: ${expected}`));
        assert.equal(await textOf(page, "e-batch-size"), expected);
        // corrected, Start again trains in place (no server: the file chosen stays chosen), and reads it: not the
        // official tarball, which the page says with both md5s
        await fillForm(page, { "base-depth": "4", "batch-size": "32" });
        await pressStart(page);
        await waitFor(page, "document.title.startsWith('done:')", "no end of the second run", 60_000);
        const text = String(await page.evaluate("document.body.innerText"));
        assert.match(text, new RegExp(`\nerror: page.html has md5 [0-9a-f]{32}, expected ${CIFAR10_MD5} \\(not the`));
        assert.ok(!text.includes(expected), "the first run's error is still shown");
        assert.equal(await page.evaluate("location.search"), "?base-depth=4&batch-size=32");
      } finally {
        await page.close();
      }
    });
  },
);

chromiumTest("--web page: a lost device ends the run with a sentence on the page", async () => {
  await withFixture(async (dir, data) => {
    const logs = join(dir, "logs");
    // 40 steps of batch 16: the device is lost while the first epoch trains
    const flags = ["--train-subset", "640", "--test-subset", "32", "--base-depth", "4", "--batch-size", "16"]
      .concat(["--epochs", "1", "--seed", "5"]);
    const { server, url } = await serveWeb(["--data", data, "--log-dir", logs, ...flags]);
    const page = await chromiumPage(chromium!, url);
    try {
      await pressStart(page);
      await waitFor(page, "document.body.textContent.includes('training epoch 0')", "no training step", 180_000);
      // what a driver reset does: the device is destroyed from outside the run, through DevTools, in the Worker
      // that trains (every GPUDevice there: the run has one)
      const proto = await page.inWorker("Runtime.evaluate", { expression: "GPUDevice.prototype" });
      const devices = await page.inWorker("Runtime.queryObjects", {
        prototypeObjectId: (proto.result as { objectId: string }).objectId,
      });
      const destroyed = await page.inWorker("Runtime.callFunctionOn", {
        objectId: (devices.objects as { objectId: string }).objectId,
        functionDeclaration: "function () { this.forEach((d) => d.destroy()); return this.length; }",
        returnByValue: true,
      });
      assert.ok((destroyed.result as { value: number }).value >= 1, "no GPUDevice in the page's Worker");
      await within(server.until(/run log from the page \(status failed\): /), 120_000, "no failed run log");
      await waitFor(page, "document.title.startsWith('done:')", "no end of the run", 60_000);
      assert.match(
        String(await page.evaluate("document.body.innerText")),
        /\nerror: the GPU device was lost \([^\n]*\): restart the run; if it happens again, update the GPU driver/,
      );
    } finally {
      await page.close();
      await stopServer(server);
    }
  });
});

chromiumTest("--web page: after a failed run, the form takes a corrected value and Start again trains", async () => {
  await withFixture(async (dir, data) => {
    const logs = join(dir, "logs");
    // base depth 64 at batch 50000 does not fit (as above); base depth 4 at batch 32: 2 steps
    const flags = ["--train-subset", "64", "--test-subset", "16", "--epochs", "1", "--seed", "6"]
      .concat(["--batch-size", "50000"]);
    const { server, url } = await serveWeb(["--data", data, "--log-dir", logs, ...flags]);
    const page = await chromiumPage(chromium!, url);
    try {
      await pressStart(page);
      await within(server.until(/run log from the page \(status failed\): /), 120_000, "no failed run log");
      await waitFor(page, "document.getElementById('start').textContent === 'Start again'", "no Start again", 30_000);
      assert.match(await textOf(page, "e-batch-size"), /^a batch of 50000 needs .*: use --batch-size \d+ or less$/);
      // the server keeps one run log a page: Start again reloads the page with the new address, and it starts at once
      await fillForm(page, { "base-depth": "4", "batch-size": "32" });
      await pressStart(page);
      await within(server.until(/run log from the page \(status completed\): /), 240_000, "no completed run log");
      assert.deepEqual(
        flagsOf(String(await page.evaluate("location.search"))),
        flagsOf("?epochs=1&base-depth=4&batch-size=32&train-subset=64&test-subset=16&seed=6"),
      );
      await waitFor(page, "document.title === 'done: completed'", "the new page did not finish", 30_000);
      assert.match(String(await page.evaluate("document.body.innerText")), /run 1\/1, seed 6\n/);
    } finally {
      await page.close();
      await stopServer(server);
    }
    const names = [...Deno.readDirSync(logs)].map((e) => JSON.parse(Deno.readTextFileSync(join(logs, e.name))));
    assert.deepEqual(names.map((l) => `${l.status} ${l.flags.batchSize}`).sort(), ["completed 32", "failed 50000"]);
  });
});

/** A 24-bit BMP picture (the simplest format a browser reads) of `width` x `height` with pixel(x, y) = [r, g, b]. */
function bmp(width: number, height: number, pixel: (x: number, y: number) => number[]) {
  const row = Math.ceil((width * 3) / 4) * 4, size = 54 + row * height, out = new Uint8Array(size);
  const v = new DataView(out.buffer);
  out.set([0x42, 0x4d]);
  [[2, size], [10, 54], [14, 40], [18, width], [22, height], [34, row * height]].forEach(([at, x]) =>
    v.setUint32(at, x, true)
  );
  v.setUint16(26, 1, true);
  v.setUint16(28, 24, true);
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const [r, g, b] = pixel(x, y), at = 54 + (height - 1 - y) * row + 3 * x; // rows bottom-up, BGR
      out.set([b, g, r], at);
    }
  }
  return out;
}

chromiumTest(
  "--web page: a dropped --save file gets --eval's accuracy, and its grid and matrix are Deno's answers; so is your own image's top 3",
  async () => {
    await withFixture(async (dir, data) => {
      // a network of random weights (several classes on these images; on each, the top four logits 0.018 apart at least,
      // measured in Deno, so that two devices' rounding cannot reorder them): what --save writes, and another program's
      const file = join(dir, "net.safetensors"), bad = join(dir, "other.safetensors"), picture = join(dir, "me.bmp");
      const norm = { mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25] }, weights = randomNetwork(1, 0.3);
      await Deno.writeFile(file, encodeSafetensors(weights, { ...savedMetadata(norm, 4, 16, "f32") }));
      await Deno.writeFile(bad, encodeSafetensors(weights, { ...savedMetadata(norm, 4, 16, "f32"), format: "other" }));
      await Deno.writeFile(picture, bmp(48, 40, (x, y) => [5 * x, 6 * y, (x * y) % 256]));
      const cli = await runMain(["--eval", file, "--data", data, "--test-subset", "100"]);
      assert.equal(cli.code, 0, cli.stderr);
      const cliBad = await runMain(["--eval", bad, "--data", data, "--test-subset", "100"]);
      assert.equal(cliBad.code, 1);
      // Deno's answers from the same file and test images
      const saved = await readSavedNetwork(file), cifar = await loadCifar10(data, { trainSubset: 0, testSubset: 100 });
      const gpu = await initGpu(), test = uploadImages(gpu, cifar.testImages, cifar.testLabels);
      const classify = async (images: Uint8Array, labels: Uint8Array, batch: number) =>
        (await evaluateWeights(
          gpu,
          { test: uploadImages(gpu, images, labels), norm },
          saved.weights,
          batch,
          file,
          "f32",
          saved.recipe,
          true,
        )).logits!;
      const deno = await evaluateWeights(gpu, { test, norm }, saved.weights, 16, file, "f32", saved.recipe, true);
      const denoClasses = predictedClasses(deno.logits!, 10);
      assert.ok(new Set(denoClasses.subarray(0, 48)).size >= 2, "one class for every image: a weak comparison");

      const { server, url } = await serveWeb(["--data", data, "--no-log", "--test-subset", "100"]);
      const page = await chromiumPage(chromium!, url);
      try {
        await waitFor(page, "!document.getElementById('netfile').disabled", "no network input", 60_000);
        // another program's file: --eval's line, the file named as the page knows it (its name, no folder)
        await page.chooseFiles("#netfile", [bad]);
        await waitFor(page, "document.getElementById('neterror').textContent !== ''", "no error for the file");
        assert.equal(await textOf(page, "neterror"), cliBad.stderr.trim().replace(bad, "other.safetensors"));
        assert.equal(await page.evaluate("document.getElementById('answers').hidden"), true);
        // ours, dropped on the page (a drop event carrying the file, as a drag from the desktop sends): --eval's line
        // (its loss as two devices round it), the test set's first 48 images with Deno's classes
        const base64 = btoa(Array.from(await Deno.readFile(file), (b) => String.fromCharCode(b)).join(""));
        await page.evaluate(`{
          const bytes = Uint8Array.from(atob("${base64}"), (c) => c.charCodeAt(0)), dropped = new DataTransfer();
          dropped.items.add(new File([bytes], "net.safetensors"));
          document.body.dispatchEvent(new DragEvent("drop", { dataTransfer: dropped, bubbles: true, cancelable: true }));
        }`);
        await waitFor(page, "!document.getElementById('answers').hidden", "no answers for the file");
        const [line, cliLine] = [await textOf(page, "answertext"), cli.stdout.trim().replace(file, "net.safetensors")];
        const [accuracy, loss, images] = line.split(" | "), [cliAccuracy, cliLoss, cliImages] = cliLine.split(" | ");
        assert.deepEqual([accuracy, images], [cliAccuracy, cliImages]);
        assert.ok(
          Math.abs(Number(loss.split(" ").pop()) - Number(cliLoss.split(" ").pop())) < 1e-3,
          `${line} vs ${cliLine}`,
        );
        const grid = await page.evaluate(`[...document.querySelectorAll("#grid figure")].map((f) => ({
          label: Number(f.dataset.label), predicted: Number(f.dataset.predicted), text: f.innerText,
          pixels: Array.from(f.querySelector("canvas").getContext("2d").getImageData(0, 0, 32, 32).data) }))`) as {
          label: number;
          predicted: number;
          text: string;
          pixels: number[];
        }[];
        assert.equal(grid.length, 48);
        grid.forEach((g, i) => {
          const image = cifar.testImages.subarray(i * 3072, (i + 1) * 3072);
          assert.deepEqual(g.pixels, [...rgbaFromImage(image)], `image ${i} is not the test set's`);
          assert.equal(g.label, cifar.testLabels[i]);
          assert.equal(g.predicted, denoClasses[i], `image ${i}: the page says ${g.predicted}, Deno ${denoClasses[i]}`);
          assert.equal(g.text.includes("✗"), g.predicted !== g.label, `image ${i}: ${g.text}`);
        });
        // the confusion matrix: Deno's, cell by cell; it sums to the test set's size
        const cells = await page.evaluate(`[...document.querySelectorAll("#matrix td.count")]
          .map((td) => [Number(td.dataset.true), Number(td.dataset.said), Number(td.textContent)])`) as number[][];
        const expected = confusionMatrix(denoClasses, cifar.testLabels, 10);
        assert.equal(cells.length, 100);
        assert.equal(cells.reduce((n, [, , count]) => n + count, 0), 100);
        for (const [t, said, count] of cells) assert.equal(count, expected[t][said], `matrix[${t}][${said}]`);
        // your own image: the 32 x 32 pixels the page shows, through Deno, give the page's top 3
        await page.chooseFiles("#ownfile", [picture]);
        await waitFor(page, "document.querySelectorAll('#owntop li').length === 3", "no top 3 for the picture");
        const shown = await page.evaluate(
          "Array.from(document.getElementById('owncanvas').getContext('2d').getImageData(0, 0, 32, 32).data)",
        ) as number[];
        const top = await page.evaluate(
          "[...document.querySelectorAll('#owntop li')].map((li) => [Number(li.dataset.class), Number(li.dataset.p)])",
        ) as number[][];
        const own = topClasses(softmaxRows(await classify(imageFromRgba(shown), new Uint8Array(1), 2), 10), 3);
        assert.deepEqual(top.map(([c]) => c), own.map((t) => t.c));
        top.forEach(([, p], i) => assert.ok(Math.abs(p - own[i].p) < 1e-3, `top ${i}: ${p} vs ${own[i].p}`));
        // a file that is no picture, chosen as one: said, in a sentence
        await page.chooseFiles("#ownfile", [bad]);
        await waitFor(page, "document.getElementById('ownerror').textContent !== ''", "no error for a non-picture");
        assert.match(
          await textOf(page, "ownerror"),
          /^error: other\.safetensors is not a picture this browser can read/,
        );
      } finally {
        await page.close();
        await stopServer(server);
        freeSince(gpu, 0);
      }
    });
  },
);
