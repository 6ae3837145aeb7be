// Every signal at every moment, every output on every disk (issue 17): what a run keeps when its terminal closes,
// when Ctrl-C lands in its evaluation or its final writes, when stdout or the disk is full. Child processes of
// main.ts (or of a fork with a pause or a marker put in), temp folders for the outputs.
import assert from "node:assert/strict";
import { join } from "node:path";
import { onlyLog, ROOT, runMain, spawnMain, withFixture } from "./util.ts";

/** A fork of main.ts in `dir`: `insert` put in before the first line starting with `anchor`. */
async function fork(dir: string, anchor: string, insert: string) {
  const source = await Deno.readTextFile(join(ROOT, "main.ts"));
  const kernels = new URL("../kernels/", import.meta.url).href;
  const at = source.indexOf(anchor);
  assert.ok(at > 0, `main.ts has no "${anchor}"`);
  const edited = (source.slice(0, at) + insert + "\n" + source.slice(at))
    .replace('export const KERNEL_DIR = "./kernels/";', `export const KERNEL_DIR = "${kernels}";`);
  const path = join(dir, "fork.ts");
  await Deno.writeTextFile(path, edited);
  return path;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
// 640 steps of batch 16 per epoch (~15 s on lavapipe): a signal sent seconds into it lands mid-epoch
const LONG_EPOCH = ["--train-subset", "10240", "--test-subset", "32", "--base-depth", "4", "--batch-size", "16"];

Deno.test("signals: SIGHUP stops a run like Ctrl-C: outputs written, log interrupted, exit 130", async () => {
  await withFixture(async (dir, data) => {
    const logs = join(dir, "logs"), json = join(dir, "r.json");
    const run = spawnMain(["--data", data, ...LONG_EPOCH, "--epochs", "1", "--log-dir", logs, "--json", json]);
    await run.until(/total_time_seconds/);
    await sleep(2000);
    run.child.kill("SIGHUP");
    const r = await run.finish();
    assert.equal(r.code, 130, r.stderr);
    assert.equal((await onlyLog(logs)).status, "interrupted");
    assert.equal(JSON.parse(await Deno.readTextFile(json)).status, "interrupted");
  });
});

// a terminal that closes: main.ts on a pseudo-terminal whose other end is closed once the table has started
const HANGUP_PY = `
import os, pty, select, sys, time
pid, fd = pty.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
out, deadline = b"", time.time() + 180
while b"total_time_seconds" not in out and time.time() < deadline:
    if select.select([fd], [], [], 1)[0]:
        out += os.read(fd, 65536)
time.sleep(2)
os.close(fd)
print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
`;

Deno.test("signals: a closed terminal stops the run; what it prints after is dropped, its outputs are kept", async () => {
  await withFixture(async (dir, data) => {
    const logs = join(dir, "logs"), json = join(dir, "r.json"), helper = join(dir, "hangup.py");
    await Deno.writeTextFile(helper, HANGUP_PY);
    const args = ["run", "-A", join(ROOT, "main.ts"), "--data", data, ...LONG_EPOCH, "--epochs", "1"];
    const out = await new Deno.Command("python3", {
      args: [helper, Deno.execPath(), ...args, "--log-dir", logs, "--json", json],
      stdout: "piped",
      stderr: "piped",
    }).output();
    const code = new TextDecoder().decode(out.stdout).trim();
    assert.equal(code, "130", `exit ${code}: ${new TextDecoder().decode(out.stderr)}`);
    const log = await onlyLog(logs);
    assert.equal(log.status, "interrupted");
    assert.ok(log.runs[0].interrupted.steps < 640, "stopped mid-epoch");
    assert.equal(JSON.parse(await Deno.readTextFile(json)).status, "interrupted");
  });
});

Deno.test("signals: under nohup a hangup is ignored, as nohup promises", async () => {
  await withFixture(async (dir, data) => {
    const logs = join(dir, "logs");
    const run = spawnMain(["--data", data, ...LONG_EPOCH, "--epochs", "1", "--log-dir", logs], { prefix: ["nohup"] });
    await run.until(/total_time_seconds/);
    await sleep(1000);
    run.child.kill("SIGHUP");
    await sleep(3000);
    assert.equal((await onlyLog(logs)).status, "running", "the run goes on after SIGHUP");
    run.child.kill("SIGINT");
    const r = await run.finish();
    assert.equal(r.code, 130, r.stderr);
    assert.doesNotMatch(r.stdout, /SIGHUP/);
    assert.match(r.stdout, /Ctrl-C: stopping after the current step/);
  });
});

Deno.test("signals: a Ctrl-C during the final writes lets them finish; a second quits at once, no temp left", async () => {
  await withFixture(async (dir, data) => {
    // the fork pauses 4 s where the outputs start being written, and says so
    const script = await fork(
      dir,
      '  if (o.runs > 1 && status === "completed")',
      '  console.log("FINAL WRITES"); await new Promise((r) => setTimeout(r, 4000));',
    );
    const tiny = ["--data", data, "--train-subset", "64", "--test-subset", "8", "--base-depth", "4", "--epochs", "1"]
      .concat(["--batch-size", "16"]);
    const out = (name: string) => ["--json", join(dir, `${name}.json`), "--save", join(dir, `${name}.safetensors`)];
    const once = spawnMain([...tiny, ...out("once"), "--log-dir", join(dir, "once")], { script });
    await once.until(/FINAL WRITES/);
    once.child.kill("SIGINT");
    const r = await once.finish();
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /Ctrl-C: writing the outputs, then exiting/);
    assert.equal(JSON.parse(await Deno.readTextFile(join(dir, "once.json"))).status, "completed");
    assert.ok((await Deno.stat(join(dir, "once.safetensors"))).size > 0);
    assert.equal((await onlyLog(join(dir, "once"))).status, "completed");

    const twice = spawnMain([...tiny, ...out("twice"), "--log-dir", join(dir, "twice")], { script });
    await twice.until(/FINAL WRITES/);
    twice.child.kill("SIGINT");
    await twice.until(/writing the outputs, then exiting/);
    twice.child.kill("SIGINT");
    const started = performance.now(), t = await twice.finish();
    assert.equal(t.code, 130, t.stderr);
    assert.ok(performance.now() - started < 2500, "the second Ctrl-C does not wait for the writes");
    const left = (await Array.fromAsync(Deno.readDir(dir))).map((e) => e.name).filter((n) => n.includes(".tmp-"));
    assert.deepEqual(left, []);
  });
});

Deno.test("signals: a Ctrl-C during evaluation is heard between its batches; the run ends interrupted", async () => {
  await withFixture(async (dir, data) => {
    // the fork says when evaluation starts; 10,000 test images at batch 32 take many seconds on lavapipe
    const script = await fork(dir, "      const e0 = performance.now();", '      console.log("EVALUATING");');
    const args = ["--data", data, "--train-subset", "64", "--test-subset", "10000", "--base-depth", "8"]
      .concat(["--batch-size", "32", "--epochs", "1"]);
    const logs = join(dir, "logs");
    const once = spawnMain([...args, "--log-dir", logs], { script });
    await once.until(/EVALUATING/);
    await sleep(500);
    const sent = performance.now();
    once.child.kill("SIGINT");
    const r = await once.finish();
    const heard = performance.now() - sent;
    assert.equal(r.code, 130, `exit ${r.code} after ${heard} ms: ${r.stdout}`);
    const log = await onlyLog(logs);
    assert.equal(log.status, "interrupted");
    assert.deepEqual([log.runs[0].interrupted.epoch, log.runs[0].epochs.length], [0, 0]);
    assert.ok(heard < 10_000, `heard after ${heard} ms`);

    const twice = spawnMain([...args, "--no-log"], { script });
    await twice.until(/EVALUATING/);
    await sleep(500);
    twice.child.kill("SIGINT");
    await twice.until(/Ctrl-C: stopping/);
    twice.child.kill("SIGINT");
    const started = performance.now(), t = await twice.finish();
    assert.equal(t.code, 130, t.stderr);
    assert.ok(performance.now() - started < 3000, "the second Ctrl-C quits at once");
  });
});

Deno.test("outputs: an interrupted --runs run with --save says what was kept; JSON and log list the same runs", async () => {
  await withFixture(async (dir, data) => {
    const logs = join(dir, "logs"), json = join(dir, "r.json"), save = join(dir, "w.safetensors");
    const args = ["--data", data, "--train-subset", "2560", "--test-subset", "32", "--base-depth", "4"]
      .concat([
        "--batch-size",
        "16",
        "--epochs",
        "1",
        "--runs",
        "2",
        "--log-dir",
        logs,
        "--json",
        json,
        "--save",
        save,
      ]);
    const run = spawnMain(args);
    await run.until(/run 2\/2/);
    await sleep(1500);
    run.child.kill("SIGINT");
    const r = await run.finish();
    assert.equal(r.code, 130, r.stderr);
    assert.match(
      r.stdout,
      /^no weights written to .*w\.safetensors: --save keeps the last run's network once it completes/m,
    );
    const log = await onlyLog(logs), out = JSON.parse(await Deno.readTextFile(json));
    assert.deepEqual(out.runs.map((x: { seed: number }) => x.seed), log.runs.map((x: { seed: number }) => x.seed));
    assert.deepEqual(out.runs[1].interrupted, log.runs[1].interrupted);
    // the mean is of the completed run alone, in both
    assert.equal(log.meanEmaValAcc, log.runs[0].emaValAcc);
    assert.equal(out.meanEmaValAcc, log.meanEmaValAcc);
  });
});

Deno.test("outputs: a stdout that cannot be written gets one line on stderr and exit 1", async () => {
  await withFixture(async (dir, data) => {
    const main = join(ROOT, "main.ts"),
      tiny = `--data ${data} --train-subset 64 --test-subset 8 --base-depth 4 --batch-size 16`;
    for (const args of [`${tiny} --epochs 1 --log-dir ${join(dir, "logs")}`, "--help"]) {
      const out = await new Deno.Command("sh", {
        args: ["-c", `"${Deno.execPath()}" run -A ${main} ${args} > /dev/full`],
        stderr: "piped",
      }).output();
      const stderr = new TextDecoder().decode(out.stderr).split("\n").filter((l) => l && !l.includes("XDG_RUNTIME"));
      assert.equal(out.code, 1, stderr.join("\n"));
      assert.equal(stderr.length, 1, stderr.join("\n"));
      assert.match(stderr[0], /^error: could not print to stdout \(No space left on device.*\): redirect the output/);
    }
  });
});

Deno.test("outputs: on a full disk the run log still ends in the run's final state", async () => {
  await withFixture(async (dir, data) => {
    // a disk of its own (a tmpfs in a private mount namespace) 1.6 times the script's size: the first run log (the
    // script's text and a little more) fits, the copy an atomic rewrite needs does not
    const disk = join(dir, "disk"), main = join(ROOT, "main.ts");
    await Deno.mkdir(disk);
    const size = Math.ceil((1.6 * (await Deno.stat(main)).size) / 4096) * 4;
    const run = `"${Deno.execPath()}" run -A ${main} --data ${data} --train-subset 640 --test-subset 16 ` +
      `--base-depth 4 --batch-size 16 --epochs 2 --log-dir ${disk}/logs`;
    const out = await new Deno.Command("unshare", {
      args: [
        "-rm",
        "sh",
        "-c",
        `mount -t tmpfs -o size=${size}k tmpfs ${disk} && ${run}; echo "exit $?"; cat ${disk}/logs/*`,
      ],
      stdout: "piped",
      stderr: "piped",
    }).output();
    const stdout = new TextDecoder().decode(out.stdout), stderr = new TextDecoder().decode(out.stderr);
    assert.match(stdout, /^exit 0$/m, stderr);
    const log = JSON.parse(stdout.slice(stdout.indexOf("\nexit 0\n") + 8));
    assert.equal(log.status, "completed");
    assert.equal(log.runs[0].epochs.length, 2);
  });
});

Deno.test("outputs: a --log-dir that is a loop of symlinks gets one line", async () => {
  const dir = await Deno.makeTempDir();
  try {
    await Deno.symlink("b", join(dir, "a"));
    await Deno.symlink("a", join(dir, "b"));
    for (const logDir of [join(dir, "a"), join(dir, "a", "logs")]) {
      const r = await runMain(["--log-dir", logDir, "--data", "/nonexistent"]);
      assert.equal(r.code, 1);
      assert.equal(r.stderr, `error: --log-dir ${logDir} is a loop of symlinks: name another folder`);
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
