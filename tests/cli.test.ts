// The command line: flag parsing and validation, and main.ts run as a user runs it (a child process).
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { join } from "node:path";
import { encodeSafetensors, PAGE_FLAGS, parseFlags, parseQuery } from "../main.ts";
import { childEnv, ROOT, runMain, spawnMain, writeFixtureDataset } from "./util.ts";

Deno.test("flags: defaults follow hyp, values parse", () => {
  const d = parseFlags([]);
  assert.equal(d.runs, 1);
  assert.equal(d.epochs, 12.1);
  assert.equal(d.baseDepth, 64);
  assert.equal(d.batchSize, 1024);
  assert.equal(d.trainSubset, undefined);
  assert.ok(Number.isInteger(d.seed) && d.seed >= 0 && d.seed < 2 ** 32);
  const o = parseFlags(["--runs", "3", "--epochs", "4.1", "--base-depth", "8", "--batch-size", "256", "--seed", "1"]);
  assert.deepEqual([o.runs, o.epochs, o.baseDepth, o.batchSize, o.seed], [3, 4.1, 8, 256, 1]);
  const p = parseFlags(["--train-subset", "10000", "--test-subset", "2000", "--data", "/x", "--json", "r.json"]);
  assert.deepEqual([p.trainSubset, p.testSubset, p.data, p.json], [10000, 2000, "/x", "r.json"]);
  assert.equal(parseFlags(["--help"]).help, true);
  assert.equal(d.noLog, false);
  assert.equal(d.logDir, undefined);
  const l = parseFlags(["--log-dir", "/tmp/logs", "--no-log", "--profile"]);
  assert.deepEqual([l.logDir, l.noLog, l.profile], ["/tmp/logs", true, true]);
  assert.equal(d.convKernels, undefined); // chosen from the device
  assert.equal(parseFlags(["--conv-kernels", "block"]).convKernels, "block");
  assert.equal(d.precision, "f32");
  assert.equal(parseFlags(["--precision", "f16"]).precision, "f16");
  // --recipe: hlb by default; airbench94's own defaults where no flag says otherwise
  assert.equal(d.recipe, "hlb");
  const a = parseFlags(["--recipe", "airbench94"]);
  assert.deepEqual([a.recipe, a.epochs, a.batchSize, a.baseDepth], ["airbench94", 8, 2000, 64]);
  assert.equal(parseFlags(["--recipe", "airbench94", "--epochs", "2"]).epochs, 2);
});

Deno.test("flags: a bad value names the flag and its range", () => {
  const cases: [string[], RegExp][] = [
    [["--epochs", "0"], /^--epochs must be a number from 0.01 to 1000, got "0"$/],
    [["--epochs", "abc"], /^--epochs must be a number/],
    [["--runs", "1.5"], /^--runs must be an integer from 1 to 10000/],
    [["--batch-size", "1"], /^--batch-size must be an integer from 2 to 50000/],
    [["--base-depth=-4"], /^--base-depth must be an integer from 1 to 1024/],
    [["--base-depth", "-4"], /^--base-depth needs a value \(for a negative one write --base-depth=-N\): see --help$/],
    [["--train-subset", "50001"], /^--train-subset must be an integer from 1 to 50000/],
    [["--test-subset", "0"], /^--test-subset must be an integer from 1 to 10000/],
    [["--seed=-1"], /^--seed must be an integer from 0 to 4294967295/],
    [["--frobnicate"], /^unknown flag --frobnicate: see --help$/],
    [["--data"], /^--data needs a value: see --help$/],
    [["--precision", "bf16"], /^--precision must be f32 or f16, got "bf16"$/],
    [["--conv-kernels", "fast"], /^--conv-kernels must be one of tiled, block, wide, got "fast"$/],
    [["--recipe", "airbench"], /^--recipe must be one of hlb, airbench94, got "airbench"$/],
    [["--recipe", "toString"], /^--recipe must be one of hlb, airbench94, got "toString"$/],
    [["stray"], /^unexpected argument stray: flags start with --, see --help$/],
  ];
  for (const [args, message] of cases) {
    assert.throws(
      () => parseFlags(args),
      (e: Error) => message.test(e.message) && !e.message.includes("\n"),
      args.join(" "),
    );
  }
});

Deno.test("flags: a --web page's address query parses as the command line does, and takes only training flags", () => {
  const argv = ["--runs", "2", "--epochs", "2.5", "--base-depth", "4", "--batch-size", "32", "--train-subset", "256"]
    .concat(["--test-subset", "32", "--seed", "7", "--conv-kernels", "wide", "--feature-level", "compatibility"])
    .concat(["--precision", "f16", "--recipe", "airbench94"]);
  const query = new URLSearchParams();
  for (let i = 0; i < argv.length; i += 2) query.set(argv[i].slice(2), argv[i + 1]);
  assert.deepEqual([...query.keys()].sort(), [...PAGE_FLAGS].sort()); // every page flag is exercised
  assert.deepEqual(parseQuery(`?${query}`), parseFlags(argv));
  assert.equal(parseQuery("").epochs, 12.1);
  const cases: [string, RegExp][] = [
    ["?epochs=0x10", /^--epochs must be a number from 0.01 to 1000, got "0x10"$/],
    ["?epochs=", /^--epochs must be a number from 0.01 to 1000, got ""$/],
    ["?frobnicate=1", /^unknown flag frobnicate in the page's address: the page takes recipe, runs, epochs, /],
    ["?json=r.json", /^--json is the terminal's, not the page's: the page takes recipe, runs, /],
    ["?web", /^--web is the terminal's, not the page's/],
    ["?precision=bf16", /^--precision must be f32 or f16, got "bf16"$/],
  ];
  for (const [search, message] of cases) {
    assert.throws(() => parseQuery(search), (e: Error) => message.test(e.message), search);
  }
});

Deno.test("flags: --static is --web's and takes a FILE.html, with no server flags", () => {
  assert.equal(parseFlags(["--web", "--static", "p.html", "--epochs", "2"]).static, "p.html");
  const cases: [string[], RegExp][] = [
    [["--static", "p.html"], /^--static writes the --web page to a file: add --web, or leave --static out$/],
    [["--web", "--static", "p.htm"], /^--static names the page's file: FILE\.html, got "p\.htm"$/],
    [["--web", "--static", "p.html", "--data", "d"], /^--static writes a page that needs no server .*--data does not/],
    [["--web", "--static", "p.html", "--port", "80"], /--port does not apply there$/],
    [["--web", "--static", "p.html", "--no-log"], /--no-log does not apply there$/],
    [["--web", "--static", "p.html", "--log-dir", "l"], /--log-dir does not apply there$/],
    [["--web", "--static"], /^--static needs a value: see --help$/],
  ];
  for (const [args, message] of cases) {
    assert.throws(() => parseFlags(args), (e: Error) => message.test(e.message), args.join(" "));
  }
});

Deno.test("main: a bad flag prints one line and exits 1", async () => {
  const r = await runMain(["--batch-size", "0"]);
  assert.equal(r.code, 1);
  assert.equal(r.stderr, 'error: --batch-size must be an integer from 2 to 50000, got "0"');
});

Deno.test("main: no WebGPU adapter -> one line saying how to get one", async () => {
  // ask Deno's WebGPU for a backend this OS does not have
  const missing = Deno.build.os === "windows" ? "metal" : "dx12";
  const r = await runMain(["--data", join(ROOT, "data"), "--epochs", "1"], { env: { DENO_WEBGPU_BACKEND: missing } });
  assert.equal(r.code, 1);
  assert.match(r.stderr, /^error: no WebGPU adapter found: install or update your GPU driver .*mesa-vulkan-drivers/);
  assert.equal(r.stderr.split("\n").length, 1, r.stderr);
});

Deno.test("main: no dataset and no network -> one clear line, nothing left behind", async () => {
  // a copy of the script in an empty folder, so its default cache data/ starts empty
  const dir = await Deno.makeTempDir();
  try {
    await Deno.copyFile(join(ROOT, "main.ts"), join(dir, "main.ts"));
    await Deno.mkdir(join(dir, "kernels"));
    for await (const f of Deno.readDir(join(ROOT, "kernels"))) {
      await Deno.copyFile(join(ROOT, "kernels", f.name), join(dir, "kernels", f.name));
    }
    const r = await runMain([], {
      cwd: dir,
      script: join(dir, "main.ts"),
      env: { CIFAR10_URL: "http://127.0.0.1:9/cifar-10-binary.tar.gz" },
    });
    assert.equal(r.code, 1);
    const lines = r.stderr.split("\n");
    assert.equal(lines.length, 1, r.stderr);
    assert.match(lines[0], /^error: could not download CIFAR-10 from http:\/\/127\.0\.0\.1:9\/.*--data DIR/);
    const left = [];
    for await (const e of Deno.readDir(dir)) left.push(e.name);
    assert.deepEqual(left.sort(), ["kernels", "main.ts"]);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("main: --precision f16 and --conv-kernels reach the run (header line, JSON)", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const data = await writeFixtureDataset(dir), json = join(dir, "r.json");
    const r = await runMain([
      ...["--data", data, "--train-subset", "128", "--test-subset", "20", "--base-depth", "4", "--batch-size", "64"],
      ...["--epochs", "1", "--seed", "3", "--no-log", "--json", json, "--precision", "f16", "--conv-kernels", "block"],
    ]);
    assert.equal(r.code, 0, r.stderr);
    assert.match(
      r.stdout,
      /precision: f16 activations and gradients, f32 arithmetic and weights \| conv kernels: block \|/,
    );
    const out = JSON.parse(await Deno.readTextFile(json));
    assert.deepEqual([out.precision, out.convKernels], ["f16", "block"]);
    assert.ok(out.runs[0].valAcc >= 0 && out.runs[0].valAcc <= 1);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("main: --recipe airbench94 trains, saves, and --eval of the file gives its final accuracy (TTA level 2)", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const data = await writeFixtureDataset(dir), json = join(dir, "r.json"), saved = join(dir, "net.safetensors");
    const r = await runMain([
      ...["--recipe", "airbench94", "--data", data, "--train-subset", "128", "--test-subset", "20"],
      ...["--base-depth", "4", "--batch-size", "64", "--epochs", "2", "--seed", "3", "--no-log"],
      ...["--json", json, "--save", saved],
    ]);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /^recipe: airbench94 \| device: .* \| base depth 4 \| training [\d.]+ GFLOP$/m);
    const final = r.stdout.match(/^final val accuracy \(TTA level 2\): ([\d.]+)% \| train time [\d.]+ s$/m);
    assert.ok(final, r.stdout);
    const out = JSON.parse(await Deno.readTextFile(json));
    assert.equal(out.flags.recipe, "airbench94");
    assert.equal((100 * out.runs[0].valAcc).toFixed(2), final[1]);
    assert.equal(out.runs[0].emaValAcc, null);
    // the saved file names its recipe: --eval takes the network and the TTA from it, at the run's batch size
    const e = await runMain(["--eval", saved, "--data", data, "--test-subset", "20"]);
    assert.equal(e.code, 0, e.stderr);
    assert.match(
      e.stdout,
      new RegExp(`test accuracy ${final[1]}% \\| test loss [\\d.]+ \\| 20 images, TTA level 2$`, "m"),
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("main: --spec-limits trains a batch whose activations exceed a 128 MiB binding, in slices", async () => {
  // base depth 4, batch 1536: the whitening output is [1536,31,31,24] f32, 135 MiB (7.7 s on lavapipe)
  const dir = await Deno.makeTempDir();
  try {
    const data = await writeFixtureDataset(dir), json = join(dir, "r.json");
    const r = await runMain([
      ...["--data", data, "--train-subset", "1536", "--test-subset", "256", "--base-depth", "4"],
      ...["--batch-size", "1536", "--epochs", "1", "--seed", "1", "--no-log", "--json", json, "--spec-limits"],
    ]);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /\| batch 1536 \(in slices: a binding holds 128 MiB, --spec-limits\) \|/);
    const out = JSON.parse(await Deno.readTextFile(json));
    const [epoch] = out.runs[0].epochs;
    assert.ok(Number.isFinite(epoch.trainLoss) && Number.isFinite(epoch.valLoss), JSON.stringify(epoch));
    assert.equal(out.flags.specLimits, true);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("main: two outputs at one path, and --eval or --resume of what is no regular file, are refused at once", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const same = join(dir, "out.file");
    const two = await runMain(["--data", "/nonexistent", "--save", same, "--json", same, "--no-log"]);
    assert.equal(two.code, 1);
    assert.equal(two.stderr, `error: --json and --save name the same file ${same}: give each its own`);
    const ck = await runMain(["--data", "/nonexistent", "--checkpoint", same, "--json", same, "--no-log"]);
    assert.equal(ck.stderr, `error: --json and --checkpoint name the same file ${same}: give each its own`);
    // a device and a FIFO are refused before they are opened (a FIFO would block, /dev/zero never ends)
    const fifo = join(dir, "fifo");
    assert.ok((await new Deno.Command("mkfifo", { args: [fifo] }).output()).success);
    for (const [flag, file] of [["--eval", "/dev/zero"], ["--eval", fifo], ["--resume", fifo], ["--eval", dir]]) {
      const r = await runMain([flag, file]);
      assert.equal(r.code, 1);
      assert.equal(r.stderr, `error: cannot read ${flag} ${file} (not a regular file): check the path`);
    }
    // a file longer than its header says
    const w = join(dir, "w.safetensors");
    await Deno.writeFile(w, encodeSafetensors(new Map([["a", { shape: [2], data: Float32Array.of(1, 2) }]]), {}));
    await Deno.writeFile(w, new Uint8Array(4), { append: true });
    const long = await runMain(["--eval", w]);
    assert.match(
      long.stderr,
      /^error: .*w\.safetensors is not a valid safetensors file \(\d+ bytes where its header describes \d+\): save it again with --save$/,
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("main: trains on a dataset folder, prints the table, writes JSON atomically", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const data = await writeFixtureDataset(dir);
    const json = join(dir, "results.json");
    const r = await runMain([
      "--data",
      data,
      "--train-subset",
      "256",
      "--test-subset",
      "50",
      "--base-depth",
      "4",
      "--batch-size",
      "64",
      "--epochs",
      "1.5",
      "--runs",
      "2",
      "--seed",
      "11",
      "--json",
      json,
      "--log-dir",
      join(dir, "logs"),
      "--save",
      join(dir, "final.safetensors"),
    ]);
    assert.equal(r.code, 0, r.stderr);
    assert.ok(!r.stdout.includes("\r"), "piped output has no in-place updates");
    assert.match(
      r.stdout,
      /\| {2}epoch {2}\| {2}train_loss {2}\| {2}val_loss {2}\| {2}train_acc {2}\| {2}val_acc {2}\| {2}ema_val_acc {2}\| {2}total_time_seconds {2}\|/,
    );
    assert.match(r.stdout, /run 1\/2, seed 11/);
    assert.match(r.stdout, /run 2\/2, seed 12/);
    assert.match(r.stdout, /final EMA val accuracy: \d+\.\d\d%/);
    // a run of seconds gets no note that it runs on the CPU (cpuNote: only past 10 minutes)
    assert.doesNotMatch(r.stdout, /runs on the CPU/);
    assert.match(r.stdout, /mean EMA val accuracy over 2 runs: \d+\.\d\d% ± \d+\.\d\d% \(std\)/);
    const out = JSON.parse(await Deno.readTextFile(json));
    assert.equal(out.runs.length, 2);
    assert.deepEqual(out.runs.map((x: { seed: number }) => x.seed), [11, 12]);
    for (const run of out.runs) {
      assert.equal(run.epochs.length, 2); // 4 steps per epoch, 1.5 epochs = 6 steps: 4 + 2
      assert.ok(run.emaValAcc >= 0 && run.emaValAcc <= 1 && run.valAcc >= 0 && run.valAcc <= 1);
      assert.ok(run.trainSeconds > 0);
    }
    assert.ok(Math.abs(out.meanEmaValAcc - (out.runs[0].emaValAcc + out.runs[1].emaValAcc) / 2) < 1e-12);
    assert.equal(typeof out.stdEmaValAcc, "number");
    const names = [];
    for await (const e of Deno.readDir(dir)) names.push(e.name);
    assert.deepEqual(names.sort(), ["cifar-10-batches-bin", "final.safetensors", "logs", "results.json"]); // no temp file
    // --eval of the saved EMA network reproduces the last run's final EMA accuracy
    const evaluated = await runMain([
      "--data",
      data,
      "--test-subset",
      "50",
      "--batch-size",
      "64",
      "--eval",
      join(dir, "final.safetensors"),
    ]);
    assert.equal(evaluated.code, 0, evaluated.stderr);
    const acc = (100 * out.runs[1].emaValAcc).toFixed(2);
    assert.match(
      evaluated.stdout,
      new RegExp(`final\\.safetensors: test accuracy ${acc.replace(".", "\\.")}% \\| test loss`),
    );
    await Deno.writeFile(
      join(dir, "cut.safetensors"),
      (await Deno.readFile(join(dir, "final.safetensors"))).slice(0, 1000),
    );
    const cut = await runMain(["--data", data, "--eval", join(dir, "cut.safetensors")]);
    assert.equal(cut.code, 1);
    assert.match(
      cut.stderr,
      /^error: .*cut\.safetensors is not a valid safetensors file \(.*\): save it again with --save$/,
    );
    // the run log: the exact script (text and sha256), flags, hyp, device, every epoch
    const logs = [];
    for await (const e of Deno.readDir(join(dir, "logs"))) logs.push(e.name);
    assert.equal(logs.length, 1);
    const source = await Deno.readTextFile(join(ROOT, "main.ts"));
    const sha = createHash("sha256").update(source).digest("hex");
    assert.match(logs[0], new RegExp(`^\\d{8}-\\d{6}-${sha.slice(0, 8)}\\.json$`));
    assert.ok(r.stdout.includes(`run log: ${join(dir, "logs", logs[0])}`));
    const log = JSON.parse(await Deno.readTextFile(join(dir, "logs", logs[0])));
    assert.equal(log.script.sha256, sha);
    assert.equal(log.script.source, source);
    assert.equal(Object.keys(log.kernels).length, 11); // kernels/*.wgsl but common.wgsl
    assert.equal(log.flags.seed, 11);
    assert.equal(log.flags.baseDepth, 4);
    assert.equal(log.hyp.opt.momentum, 0.85);
    assert.equal(log.deno.deno, Deno.version.deno);
    assert.equal(typeof log.device, "string");
    assert.deepEqual(log.runs, out.runs);
    assert.equal(log.meanEmaValAcc, out.meanEmaValAcc);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("main: Ctrl-C stops after the current step, writes the run log as interrupted, exits 130", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const data = await writeFixtureDataset(dir);
    const run = spawnMain(["--data", data, "--train-subset", "640", "--test-subset", "64"]
      .concat(["--base-depth", "4", "--batch-size", "64", "--epochs", "30", "--log-dir", join(dir, "logs")]));
    await run.until(/\|\s+0\s+\|/); // the first epoch's row, then interrupt
    run.child.kill("SIGINT");
    const { code, stdout, stderr } = await run.finish();
    assert.equal(code, 130, stderr);
    assert.match(stdout, /Ctrl-C: stopping after the current step/);
    assert.match(stderr, /interrupted in run 1, epoch \d+, after \d+ steps; run log: /);
    const logs = [];
    for await (const e of Deno.readDir(join(dir, "logs"))) logs.push(e.name);
    assert.equal(logs.length, 1);
    const log = JSON.parse(await Deno.readTextFile(join(dir, "logs", logs[0])));
    assert.equal(log.status, "interrupted");
    assert.ok(log.runs[0].interrupted.steps >= 10 && log.runs[0].interrupted.steps < 300);
    assert.ok(log.runs[0].epochs.length >= 1);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("main: on a terminal a live step counter stands where the next row appears, then the row replaces it", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const data = await writeFixtureDataset(dir);
    const cmd = [Deno.execPath(), "run", "-A", join(ROOT, "main.ts"), "--data", data, "--no-log", "--seed", "1"]
      .concat([
        "--train-subset",
        "96",
        "--test-subset",
        "16",
        "--base-depth",
        "4",
        "--batch-size",
        "16",
        "--epochs",
        "2",
      ]);
    // util-linux `script` gives the child a pseudo-terminal, so stdout.isTerminal() is true there
    const out = await new Deno.Command("script", {
      args: ["-q", "-e", "-c", cmd.map((a) => `'${a}'`).join(" "), "/dev/null"],
      env: childEnv(),
      clearEnv: true,
      stdout: "piped",
      stderr: "piped",
    }).output();
    const tty = new TextDecoder().decode(out.stdout);
    assert.equal(out.code, 0, tty);
    for (const epoch of [0, 1]) {
      // the epoch's last step always shows, and the row then clears the line and takes its place
      const row = new RegExp(
        `\\r\\x1b\\[2K\\|  training epoch ${epoch}: 6/6 steps submitted \\| [^\\r\\n]*\\r\\x1b\\[2K\\|\\s+${epoch}  \\|`,
      );
      assert.match(tty, row);
    }
    // the time so far, and once a step was timed the time left: a lower bound until an evaluation was timed
    assert.match(
      tty,
      /training epoch 0: 6\/6 steps submitted \| \d+ s elapsed \| over \d+ s left \(evaluation not timed yet\)/,
    );
    assert.match(tty, /training epoch 1: 6\/6 steps submitted \| \d+ s elapsed \| about \d+ s left/);
    assert.doesNotMatch(tty, /steps submitted[^\r\n]*\r?\n/, "the counter never stays behind on its own line");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
