// Nothing lost, nothing hangs: what an interrupted, failed or careless run keeps, as a user meets it (child
// processes for signals, forks of main.ts for failures, temp folders for outputs). Numbered as in the issue.
import assert from "node:assert/strict";
import { join } from "node:path";
import {
  decodeSafetensors,
  encodeSafetensors,
  evaluateWeights,
  initGpu,
  parseFlags,
  readSavedNetwork,
  savedMetadata,
  train,
  uploadDataset,
  writeBytesAtomic,
  writeFailure,
  writeRunLog,
} from "../main.ts";
import { f16Test, onlyLog, ROOT, runMain, spawnMain, withFixture } from "./util.ts";

const gpu = await initGpu();

/** A fork of main.ts in `dir` with `edit` applied to its text, reading the checkout's kernels. */
async function fork(dir: string, edit: (source: string) => string) {
  const source = await Deno.readTextFile(join(ROOT, "main.ts"));
  const kernels = new URL("../kernels/", import.meta.url).href;
  const edited = edit(source).replace(
    'export const KERNEL_DIR = "./kernels/";',
    `export const KERNEL_DIR = "${kernels}";`,
  );
  assert.notEqual(edited, source);
  const path = join(dir, "fork.ts");
  await Deno.writeTextFile(path, edited);
  return path;
}

// 640 steps of batch 16 per epoch (~15 s on lavapipe): a signal sent seconds into it lands mid-epoch
const LONG_EPOCH = ["--train-subset", "10240", "--test-subset", "32", "--base-depth", "4", "--batch-size", "16"];

// ---- 1. Ctrl-C

Deno.test("1. Ctrl-C in the first (and last) epoch stops within a few steps: exit 130, log interrupted", async () => {
  await withFixture(async (dir, data) => {
    const logs = join(dir, "logs");
    const run = spawnMain(["--data", data, ...LONG_EPOCH, "--epochs", "1", "--seed", "1", "--log-dir", logs]);
    await run.until(/total_time_seconds/);
    await new Promise((r) => setTimeout(r, 4000)); // into the steps (whitening and compiling come first)
    run.child.kill("SIGINT");
    const r = await run.finish();
    assert.equal(r.code, 130, r.stderr);
    assert.match(r.stderr, /interrupted in run 1, epoch 0, after \d+ steps?; run log: /);
    const log = await onlyLog(logs);
    assert.equal(log.status, "interrupted");
    assert.equal(log.runs[0].interrupted.epoch, 0);
    assert.ok(log.runs[0].interrupted.steps < 640, `stopped mid-epoch, after ${log.runs[0].interrupted.steps} steps`);
    assert.deepEqual(log.runs[0].epochs, []);
  });
});

Deno.test("1. Ctrl-C in the last of several epochs stops there too, and keeps the finished epochs", async () => {
  await withFixture(async (dir, data) => {
    const logs = join(dir, "logs");
    const args = ["--data", data, "--train-subset", "2560", "--test-subset", "32", "--base-depth", "4"];
    const run = spawnMain([...args, "--batch-size", "16", "--epochs", "2", "--seed", "1", "--log-dir", logs]);
    await run.until(/\|\s+0\s+\|/); // epoch 0's row: epoch 1, the last, is running
    await new Promise((r) => setTimeout(r, 300));
    run.child.kill("SIGINT");
    const r = await run.finish();
    assert.equal(r.code, 130, r.stderr);
    const log = await onlyLog(logs);
    assert.equal(log.status, "interrupted");
    const { epoch, steps } = log.runs[0].interrupted;
    assert.equal(epoch, 1);
    assert.ok(steps > 160 && steps < 320, `stopped inside the last epoch, after ${steps} steps`);
    assert.equal(log.runs[0].epochs.length, 1);
  });
});

Deno.test("1. SIGTERM stops like Ctrl-C; a second signal quits at once; an unwritable log still exits 130", async () => {
  await withFixture(async (dir, data) => {
    const logs = join(dir, "logs");
    const term = spawnMain(["--data", data, ...LONG_EPOCH, "--epochs", "1", "--seed", "2", "--log-dir", logs]);
    await term.until(/total_time_seconds/);
    await new Promise((r) => setTimeout(r, 3000));
    term.child.kill("SIGTERM");
    const t = await term.finish();
    assert.equal(t.code, 130, t.stderr);
    assert.match(t.stdout, /SIGTERM: stopping after the current step/);
    assert.equal((await onlyLog(logs)).status, "interrupted");

    const twice = spawnMain(["--data", data, ...LONG_EPOCH, "--epochs", "1", "--seed", "3", "--no-log"]);
    await twice.until(/total_time_seconds/);
    twice.child.kill("SIGINT");
    await twice.until(/Ctrl-C: stopping after the current step/); // two signals sent at once may arrive as one
    twice.child.kill("SIGINT");
    const started = performance.now(), w = await twice.finish();
    assert.equal(w.code, 130, w.stderr);
    assert.ok(performance.now() - started < 3000, "the second Ctrl-C does not wait for a step");

    // the log folder turns into a file mid-run: the run log cannot be written, the exit code is still 130
    const gone = join(dir, "gone");
    const broken = spawnMain(["--data", data, ...LONG_EPOCH, "--epochs", "1", "--seed", "4", "--log-dir", gone]);
    await broken.until(/total_time_seconds/);
    await Deno.remove(gone, { recursive: true });
    await Deno.writeTextFile(gone, "not a folder");
    await new Promise((r) => setTimeout(r, 2000));
    broken.child.kill("SIGINT");
    const b = await broken.finish();
    assert.equal(b.code, 130, b.stderr);
    assert.match(b.stderr, /^error: (could not write|cannot use) .*gone.*$/m);
    assert.match(b.stderr, /interrupted in run 1, epoch 0, after \d+ steps?; no run log$/m);
  });
});

// ---- 2. every output kept

Deno.test("2. outputs are checked before training, one line naming the bad one", async () => {
  await withFixture(async (dir, data) => {
    const base = ["--data", data, "--train-subset", "64", "--test-subset", "8", "--base-depth", "4"];
    await Deno.writeTextFile(join(dir, "file"), "");
    const cases: [string[], RegExp][] = [
      [
        ["--json", join(dir, "missing", "r.json")],
        /^error: --json .*missing\/r\.json: its folder .*missing does not exist$/,
      ],
      [["--save", dir], /^error: --save .* is a folder: name a file in it instead$/],
      [["--log-dir", join(dir, "file")], /^error: --log-dir .*file cannot be written \(not a folder\)/],
      [["--json", "/dev/null"], /^error: --json \/dev\/null is not a regular file/],
    ];
    for (const [flags, line] of cases) {
      const started = performance.now(), r = await runMain([...base, "--batch-size", "16", ...flags]);
      assert.equal(r.code, 1, r.stderr);
      assert.equal(r.stderr.split("\n").length, 1, r.stderr);
      assert.match(r.stderr, line);
      assert.doesNotMatch(r.stdout, /epoch/, "no training started");
      assert.ok(performance.now() - started < 20_000);
    }
    assert.ok((await Deno.stat("/dev/null")).isCharDevice, "/dev/null is still a device");
  });
});

Deno.test("2. an error in run k of --runs N keeps runs 1..k-1 in the log and --json; the log says diverged", async () => {
  await withFixture(async (dir, data) => {
    // a fork whose even seeds get an absurd learning rate: run 1 (seed 11) trains, run 2 (seed 12) diverges
    const script = await fork(dir, (s) =>
      s.replace(
        "const { gpu, data } = o, h = o.hyp ?? hyp;",
        "const { gpu, data } = o, h = o.seed % 2 ? hyp : { ...hyp, opt: { ...hyp.opt, nonBiasLr: 1e8, biasLr: 1e8 } };",
      ));
    const logs = join(dir, "logs"), json = join(dir, "r.json");
    const r = await runMain([
      ...["--data", data, "--train-subset", "128", "--test-subset", "16", "--base-depth", "4", "--batch-size", "32"],
      ...["--epochs", "2", "--runs", "3", "--seed", "11", "--log-dir", logs, "--json", json],
    ], { script });
    assert.equal(r.code, 1, r.stderr);
    assert.match(r.stderr, /^error: the training loss became NaN or infinite at step \d+ \(epoch 0\)/m);
    assert.match(r.stderr, /run log: .* \(status diverged, what ran before is kept\)/);
    const log = await onlyLog(logs);
    assert.equal(log.status, "diverged");
    assert.equal(log.runs.length, 1);
    assert.equal(log.runs[0].seed, 11);
    assert.equal(log.runs[0].epochs.length, 2);
    assert.deepEqual([log.partial.run, log.partial.seed, log.partial.epoch], [2, 12, 0]);
    assert.ok(Number.isInteger(log.partial.step), "the first non-finite step is named");
    const out = JSON.parse(await Deno.readTextFile(json));
    assert.equal(out.status, "diverged");
    assert.deepEqual(out.runs.map((x: { seed: number }) => x.seed), [11]);
  });
});

Deno.test("2. the run log exists from the start and grows epoch by epoch", async () => {
  await withFixture(async (dir, data) => {
    const logs = join(dir, "logs");
    const args = ["--data", data, "--train-subset", "2560", "--test-subset", "32", "--base-depth", "4"];
    const run = spawnMain([...args, "--batch-size", "16", "--epochs", "3", "--seed", "5", "--log-dir", logs]);
    await run.until(/total_time_seconds/);
    const running = await onlyLog(logs);
    assert.deepEqual([running.status, running.finishedAt, running.runs, running.partial.epochs], [
      "running",
      null,
      [],
      [],
    ]);
    await run.until(/\|\s+0\s+\|/);
    await new Promise((r) => setTimeout(r, 200));
    assert.equal((await onlyLog(logs)).partial.epochs.length, 1);
    run.child.kill("SIGINT");
    assert.equal((await run.finish()).code, 130);
  });
});

Deno.test("2. an output that cannot be written does not keep the others from being written", async () => {
  await withFixture(async (dir, data) => {
    const out = join(dir, "out"), json = join(dir, "r.json"), logs = join(dir, "logs");
    await Deno.mkdir(out);
    const run = spawnMain([
      ...["--data", data, "--train-subset", "640", "--test-subset", "16", "--base-depth", "4", "--batch-size", "16"],
      ...["--epochs", "1", "--seed", "6", "--save", join(out, "w.safetensors"), "--json", json, "--log-dir", logs],
    ]);
    await run.until(/total_time_seconds/);
    await Deno.remove(out, { recursive: true }); // --save's folder disappears while the run trains
    const r = await run.finish();
    assert.equal(r.code, 1, r.stderr);
    assert.match(r.stderr, /^error: could not write .*out\/w\.safetensors/m);
    assert.equal(JSON.parse(await Deno.readTextFile(json)).runs.length, 1);
    assert.equal((await onlyLog(logs)).status, "completed");
  });
});

// ---- 3. atomic writes

Deno.test("3. atomic writes refuse folders, devices and FIFOs, and write through symlinks", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const bytes = new TextEncoder().encode("x");
    await assert.rejects(() => writeBytesAtomic(dir, bytes), /is a folder: name a file in it instead$/);
    await assert.rejects(() => writeBytesAtomic("/dev/null", bytes), /\/dev\/null is not a regular file/);
    assert.ok((await Deno.stat("/dev/null")).isCharDevice);
    const fifo = join(dir, "fifo");
    assert.equal((await new Deno.Command("mkfifo", { args: [fifo] }).output()).code, 0);
    await assert.rejects(() => writeBytesAtomic(fifo, bytes), /fifo is not a regular file/);
    assert.ok((await Deno.lstat(fifo)).isFifo);
    // a symlink (and a dangling one) is written through: the link stays, its target gets the bytes
    const target = join(dir, "target.json"), link = join(dir, "link.json");
    await Deno.writeTextFile(target, "old");
    await Deno.symlink("target.json", link);
    await writeBytesAtomic(link, bytes);
    assert.ok((await Deno.lstat(link)).isSymlink);
    assert.equal(await Deno.readTextFile(target), "x");
    const dangling = join(dir, "dangling.json");
    await Deno.symlink(join(dir, "new.json"), dangling);
    await writeBytesAtomic(dangling, bytes);
    assert.ok((await Deno.lstat(dangling)).isSymlink);
    assert.equal(await Deno.readTextFile(join(dir, "new.json")), "x");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

// ---- 4. run-log names

Deno.test("4. two run logs started in the same second get two files", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const at = new Date(), flags = parseFlags([]);
    const paths = await Promise.all([1, 2, 3].map(() => writeRunLog(dir, gpu, flags, [], at)));
    assert.equal(new Set(paths).size, 3, `${paths}`);
    assert.equal((await Array.fromAsync(Deno.readDir(dir))).length, 3);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

// ---- 5. saved weights

Deno.test("5. --eval of a saved network prints exactly the run's final EMA accuracy and loss", async () => {
  await withFixture(async (dir, data) => {
    const save = join(dir, "w.safetensors"), json = join(dir, "r.json"), evalJson = join(dir, "e.json");
    const r = await runMain([
      ...["--data", data, "--train-subset", "300", "--test-subset", "40", "--base-depth", "4", "--batch-size", "32"],
      ...["--epochs", "2", "--seed", "3", "--no-log", "--save", save, "--json", json],
    ]);
    assert.equal(r.code, 0, r.stderr);
    const last = JSON.parse(await Deno.readTextFile(json)).runs[0].epochs.at(-1);
    assert.ok(last.emaValAcc !== null && last.emaValLoss !== null);
    // no --train-subset, no --batch-size: the statistics and the batch come from the file
    const e = await runMain(["--data", data, "--test-subset", "40", "--eval", save, "--json", evalJson]);
    assert.equal(e.code, 0, e.stderr);
    const got = JSON.parse(await Deno.readTextFile(evalJson));
    assert.deepEqual([got.valAcc, got.valLoss], [last.emaValAcc, last.emaValLoss]);
    assert.match(
      e.stdout,
      new RegExp(`test accuracy ${(100 * last.emaValAcc).toFixed(2)}% \\| test loss ${last.emaValLoss.toFixed(4)} `),
    );
  });
});

Deno.test("5. --eval checks the file before the dataset, and refuses the flags it would ignore", async () => {
  const dir = await Deno.makeTempDir();
  try {
    await Deno.writeFile(join(dir, "bad.safetensors"), new Uint8Array(4));
    const unreachable = { CIFAR10_URL: "http://127.0.0.1:9/never.tar.gz" };
    const r = await runMain(["--eval", join(dir, "bad.safetensors")], { cwd: dir, env: unreachable });
    assert.equal(r.code, 1);
    assert.match(r.stderr, /^error: .*bad\.safetensors is not a valid safetensors file \(shorter than/);
    assert.doesNotMatch(r.stdout + r.stderr, /download/);
    for (const flag of [["--epochs", "2"], ["--save", "x"], ["--runs", "2"], ["--no-log"]]) {
      const x = await runMain(["--eval", "w.safetensors", ...flag], { cwd: dir });
      assert.match(
        x.stderr,
        new RegExp(`^error: --eval evaluates saved weights without training: ${flag[0]} does not`),
      );
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("5. malformed weights files get one line each", () => {
  const enc = (header: unknown, data = new Uint8Array(0)) => {
    const head = new TextEncoder().encode(JSON.stringify(header));
    const out = new Uint8Array(8 + head.length + data.length);
    new DataView(out.buffer).setBigUint64(0, BigInt(head.length), true);
    out.set(head, 8);
    out.set(data, 8 + head.length);
    return out;
  };
  const f32 = (xs: number[]) => new Uint8Array(Float32Array.from(xs).buffer);
  const cases: [Uint8Array, RegExp][] = [
    [enc(null), /header is not a JSON object/],
    [enc({ t: { dtype: "F32", shape: 4, data_offsets: [0, 16] } }, f32([1, 2, 3, 4])), /t has shape 4, not a list/],
    [enc({ t: { dtype: "F32", shape: [2], data_offsets: [0, 8] } }, f32([1, NaN])), /t\[1\] is NaN/],
    [enc({ t: { dtype: "F32", shape: [1], data_offsets: [0, 4] } }, f32([Infinity])), /t\[0\] is Infinity/],
    [enc({ t: { dtype: "F32", shape: [1], data_offsets: [2, 6] } }, new Uint8Array(8)), /not on a 4-byte boundary/],
    [enc({ t: null }), /t is not a tensor entry/],
  ];
  for (const [bytes, why] of cases) {
    assert.throws(() => decodeSafetensors(bytes, "w.safetensors"), (e: Error) => {
      assert.match(e.message, why);
      assert.match(e.message, /^w\.safetensors is not a valid safetensors file \(.*\): save it again with --save$/);
      return true;
    });
  }
});

Deno.test("5. a saved network carries its statistics; absurd or foreign files are refused before allocating", async () => {
  const dir = await Deno.makeTempDir();
  try {
    // a conv1 weight of no elements claiming a width of 10^9 (its data consistent): one line, no allocation
    const zero = { shape: [0, 3, 24, 1e9], data: new Float32Array(0) };
    const file = join(dir, "wide.safetensors");
    const norm = { mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25] };
    await Deno.writeFile(
      file,
      encodeSafetensors(new Map([["conv_group_1.conv1.weight", zero]]), { ...savedMetadata(norm, 1e9, 64, "f32") }),
    );
    await assert.rejects(() => readSavedNetwork(file), /claims base depth 1000000000, outside 1\.\.1024/);
    const images = new Uint8Array(3072 * 4).map((_, i) => i % 256), labels = Uint8Array.from([0, 1, 2, 3]);
    const data = uploadDataset(gpu, {
      trainImages: images,
      trainLabels: labels,
      testImages: images,
      testLabels: labels,
    });
    const weights = new Map([["conv_group_1.conv1.weight", zero]]);
    await assert.rejects(() => evaluateWeights(gpu, data, weights, 4, file), /claims base depth 1000000000/);
    // a file without the statistics (as saved before they were stored) is refused with the fix
    await Deno.writeFile(
      join(dir, "old.safetensors"),
      encodeSafetensors(new Map(), { format: "hlb-cifar10-webgpu", layout: "x" }),
    );
    await assert.rejects(() => readSavedNetwork(join(dir, "old.safetensors")), /has no normalisation statistics/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

// ---- 8. hints that point the right way

f16Test(gpu.hasF16, "8. a NaN with --precision f16 says to try --precision f32", async () => {
  const images = new Uint8Array(3072 * 128).map((_, i) => (i * 37) % 251),
    labels = new Uint8Array(128).map((_, i) => i % 10);
  const data = uploadDataset(gpu, { trainImages: images, trainLabels: labels, testImages: images, testLabels: labels });
  const hyp16 = (await import("../main.ts")).hyp;
  await assert.rejects(
    () =>
      train({
        gpu,
        data,
        seed: 1,
        epochs: 1,
        baseDepth: 4,
        batchSize: 32,
        precision: "f16",
        hyp: { ...hyp16, opt: { ...hyp16.opt, nonBiasLr: 1e8, biasLr: 1e8 } },
      }),
    /NaN or infinite .*; with --precision f16, try --precision f32 first/,
  );
});

Deno.test("8. numbers parse strictly; boolean flags take no value", () => {
  for (const bad of ["0x10", " 2 ", "1_0", "2e", ""]) {
    assert.throws(
      () => parseFlags(["--epochs", bad]),
      /^Error: --epochs must be a number from 0\.01 to 1000, got ".*"$/,
    );
  }
  assert.equal(parseFlags(["--epochs", "1e1"]).epochs, 10);
  assert.equal(parseFlags(["--runs", "+3"]).runs, 3);
  assert.throws(
    () => parseFlags(["--no-log=yes"]),
    /^Error: --no-log takes no value: write --no-log alone, see --help$/,
  );
  assert.throws(() => parseFlags(["--help=1"]), /^Error: --help takes no value: write --help alone, see --help$/);
});

Deno.test("8. CIFAR10_DIR pointing nowhere names the variable; a fork without kernels/ says so", async () => {
  const r = await runMain(["--epochs", "1"], { env: { CIFAR10_DIR: "/nowhere/cifar" } });
  assert.equal(r.code, 1);
  // childEnv drops CIFAR10_DIR from our own environment, but not from `extra`
  assert.match(r.stderr, /^error: CIFAR10_DIR=\/nowhere\/cifar does not exist: point CIFAR10_DIR at a valid/);
  const dir = await Deno.makeTempDir();
  try {
    await Deno.copyFile(join(ROOT, "main.ts"), join(dir, "idea.ts"));
    const f = await runMain(["--epochs", "1"], { script: join(dir, "idea.ts"), cwd: dir });
    assert.equal(f.code, 1);
    assert.match(
      f.stderr,
      /^error: cannot read common\.wgsl in file:\/\/.*\/kernels\/ \(.*\): is the kernels\/ folder there\?$/,
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("8. a network no binding can hold gets the flag line before the table, the download or the run log", async () => {
  // --spec-limits: 128 MiB a binding, as browsers and many GPUs grant. Base depth 250's largest weight
  // [3,3,2000,2000] takes 137 MiB; 241 is the largest that fits (its weight: 128 MiB)
  const logDir = await Deno.makeTempDir();
  try {
    const r = await runMain(["--spec-limits", "--base-depth", "250", "--data", "/nonexistent", "--log-dir", logDir]);
    assert.equal(r.code, 1);
    assert.equal(
      r.stderr,
      "error: at base depth 250, its largest weight [3,3,2000,2000] takes 137 MiB, but this GPU binds at most 128 MiB: " +
        "use --base-depth 241 or less",
    );
    assert.doesNotMatch(r.stdout, /epoch/);
    assert.deepEqual([...Deno.readDirSync(logDir)], []);
  } finally {
    await Deno.remove(logDir, { recursive: true });
  }
});

Deno.test("8. disk full says disk full", async () => {
  const e = await Deno.writeFile("/dev/full", new Uint8Array(1)).then(() => undefined, (e) => e);
  assert.ok(e, "writing /dev/full fails");
  assert.equal(writeFailure("r.json", e), "disk full writing r.json: free some space");
  assert.match(writeFailure("r.json", new Error("Permission denied (os error 13)")), /check the folder exists/);
});

// ---- 9. a fresh machine needs two commands

Deno.test("9. the README's quick start is two commands, and .ci/run installs what they need", async () => {
  const readme = await Deno.readTextFile(join(ROOT, "README.md"));
  const quick = readme.split("## Quick start")[1]?.split("\n## ")[0] ?? "";
  const commands = quick.match(/```sh\n([\s\S]*?)```/)?.[1].split("\n").filter(Boolean).map((l) =>
    l.split("#")[0].trim()
  );
  assert.deepEqual(commands, ["bash .ci/run", "deno task train"]);
  const tasks = JSON.parse(await Deno.readTextFile(join(ROOT, "deno.json"))).tasks;
  assert.equal(tasks.train, "deno run -A main.ts");
  const ci = await Deno.readTextFile(join(ROOT, ".ci", "run"));
  assert.match(ci, /npm install -g "deno@\$DENO_VERSION"/, ".ci/run installs Deno from npm");
  assert.match(ci, /apt-get install -y -qq mesa-vulkan-drivers/, ".ci/run installs lavapipe from apt");
  assert.match(ci, /deno task test/, ".ci/run runs the README's test command");
  assert.match(
    ci,
    /echo "\$\(\(passed \+ dpassed\)\) passed, \$\(\(failed \+ dfailed\)\) failed"\nexit/,
    "the last line",
  );
});
