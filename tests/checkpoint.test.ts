// Checkpoints (--checkpoint, --resume): a run interrupted and resumed ends with the same bits as the run left alone;
// a checkpoint of another run, script, kernel set or dataset is refused, and so is any damaged or hand-made file, each
// with one line.
import assert from "node:assert/strict";
import { join } from "node:path";
import {
  type Checkpoint,
  CHECKPOINT_FORMAT,
  decodeCheckpoint,
  encodeCheckpoint,
  layoutState,
  stateSpec,
} from "../main.ts";
import { Prng, ROOT, runMain, spawnMain, writeFixtureDataset } from "./util.ts";

const RUN = ["--train-subset", "256", "--test-subset", "64", "--base-depth", "4", "--batch-size", "64", "--seed", "5"];

/** The rows of a --json file without their clock (a resumed run's clock goes on from the checkpoint's). */
async function rowsOf(json: string) {
  const out = JSON.parse(await Deno.readTextFile(json));
  return out.runs.map((r: { epochs: { totalTimeSeconds?: number }[] }) =>
    r.epochs.map(({ totalTimeSeconds: _, ...m }) => m)
  );
}

Deno.test("--resume after a Ctrl-C inside epoch 2 ends with the same bits as the run left alone, and says what runs again", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const data = await writeFixtureDataset(dir), at = (f: string) => join(dir, f);
    const flags = ["--data", data, ...RUN, "--epochs", "3", "--runs", "2"];
    const alone = await runMain([...flags, "--no-log", "--save", at("alone.safetensors"), "--json", at("alone.json")]);
    assert.equal(alone.code, 0, alone.stderr);
    // Ctrl-C once epoch 1's row of the first run is out: the run stops in epoch 2, the checkpoint keeps epoch 1's end
    const cut = spawnMain([...flags, "--log-dir", at("logs"), "--checkpoint", at("ck.safetensors")]);
    await cut.until(/\|\s+1 {2}\|/);
    cut.child.kill("SIGINT");
    const stopped = await cut.finish();
    assert.equal(stopped.code, 130, stopped.stderr);
    assert.match(
      stopped.stdout,
      /^checkpoint: .*ck\.safetensors holds run 1 at the end of epoch 1: --resume .*ck\.safetensors continues from there$/m,
    );
    // resumed with its defaults from the checkpoint (only the data folder given)
    const resumed = await runMain([
      ...["--data", data, "--resume", at("ck.safetensors"), "--log-dir", at("logs")],
      ...["--save", at("resumed.safetensors"), "--json", at("resumed.json")],
    ]);
    assert.equal(resumed.code, 0, resumed.stderr);
    assert.match(
      resumed.stdout,
      /^resuming .*ck\.safetensors: run 1, from the end of epoch 1; it was interrupted in epoch 2 \(after step \d+ of the run\), which runs again from its start$/m,
    );
    // the epochs before the checkpoint are printed as they ran, then the run goes on
    assert.equal(resumed.stdout.match(/^\|\s+0 {2}\|/gm)?.length, 2, "epoch 0 of both runs");
    // the same bits: the saved network of the last run, every row (but the clock) of both runs, the results
    assert.deepEqual(await Deno.readFile(at("resumed.safetensors")), await Deno.readFile(at("alone.safetensors")));
    assert.deepEqual(await rowsOf(at("resumed.json")), await rowsOf(at("alone.json")));
    const [a, r] = [at("alone.json"), at("resumed.json")].map((f) => JSON.parse(Deno.readTextFileSync(f)));
    assert.deepEqual(
      r.runs.map((x: { emaValAcc: number }) => x.emaValAcc),
      a.runs.map((x: { emaValAcc: number }) => x.emaValAcc),
    );
    // the resumed run's log says from where, and keeps the rows from before
    const logs = [...Deno.readDirSync(at("logs"))].map((e) =>
      JSON.parse(Deno.readTextFileSync(join(at("logs"), e.name)))
    );
    const log = logs.find((l) => l.resumed);
    assert.ok(log, "a run log with `resumed`");
    assert.deepEqual(
      { ...log.resumed, checkpoint: undefined },
      { checkpoint: undefined, run: 1, epoch: 2, interrupted: log.resumed.interrupted },
    );
    assert.equal(log.resumed.interrupted.epoch, 2);
    assert.equal(log.status, "completed");
    assert.deepEqual(log.runs[0].epochs.map((m: { epoch: number }) => m.epoch), [0, 1, 2]);
    assert.equal(logs.find((l) => !l.resumed).status, "interrupted");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("--resume refuses another run's flags, kernels, script or data with one line naming the difference", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const data = await writeFixtureDataset(dir), ck = join(dir, "ck.safetensors");
    const made = await runMain(["--data", data, ...RUN, "--epochs", "1", "--no-log", "--checkpoint", ck]);
    assert.equal(made.code, 0, made.stderr);
    const resume = (...extra: string[]) => runMain(["--data", data, "--resume", ck, "--no-log", ...extra]);
    const refused = async (r: ReturnType<typeof resume>, line: RegExp) => {
      const out = await r;
      assert.equal(out.code, 1, out.stdout);
      assert.match(out.stderr, line);
      assert.equal(out.stderr.split("\n").length, 1, out.stderr);
      assert.doesNotMatch(out.stdout, /epoch/, "refused before the table");
    };
    await refused(
      resume("--batch-size", "32"),
      /^error: --resume .*ck\.safetensors continues a run with --batch-size 64, not 32: leave --batch-size out$/,
    );
    await refused(
      resume("--recipe", "airbench94"),
      /^error: --resume .* continues a run with --recipe hlb, not airbench94: leave --recipe out$/,
    );
    await refused(
      resume("--precision", "f16"),
      /^error: --resume .* continues a run with --precision f32, not f16: leave --precision out$/,
    );
    await refused(
      resume("--conv-kernels", "block"),
      /^error: --resume .* continues a run with --conv-kernels wide, not block: leave --conv-kernels out$/,
    );
    // another script: a fork of main.ts that differs by one comment
    const fork = join(dir, "fork");
    await Deno.mkdir(join(fork, "kernels"), { recursive: true });
    for (const e of Deno.readDirSync(join(ROOT, "kernels"))) {
      await Deno.copyFile(join(ROOT, "kernels", e.name), join(fork, "kernels", e.name));
    }
    const source = await Deno.readTextFile(join(ROOT, "main.ts"));
    await Deno.writeTextFile(join(fork, "main.ts"), source + "// an idea\n");
    await refused(
      runMain(["--data", data, "--resume", ck, "--no-log"], { script: join(fork, "main.ts") }),
      /^error: --resume .* was written by another main\.ts \(sha256 [0-9a-f]{12}\.\.\., this one [0-9a-f]{12}\.\.\.\): a checkpoint continues only the run that wrote it$/,
    );
    // the same script with another kernel
    await Deno.writeTextFile(join(fork, "main.ts"), source);
    await Deno.writeTextFile(join(fork, "kernels", "norm.wgsl"), "// faster\n", { append: true });
    await refused(
      runMain(["--data", data, "--resume", ck, "--no-log"], { script: join(fork, "main.ts") }),
      /^error: --resume .* was written with another norm\.wgsl \(sha256 [0-9a-f]{12}\.\.\., this one [0-9a-f]{12}\.\.\.\)/,
    );
    // other images: the fixture with one file changed
    const other = join(dir, "other");
    await Deno.mkdir(other);
    const otherData = await writeFixtureDataset(other), batch = join(otherData, "data_batch_1.bin");
    const bytes = await Deno.readFile(batch);
    for (let i = 1; i < 3073; i++) bytes[i] = 255 - bytes[i];
    await Deno.writeFile(batch, bytes);
    await refused(
      runMain(["--data", otherData, "--resume", ck, "--no-log"]),
      /^error: --resume .* was written for other training images \(their statistics differ\): pass its --data$/,
    );
    // saved weights are not a checkpoint
    const saved = join(dir, "w.safetensors");
    assert.equal((await runMain(["--data", data, ...RUN, "--epochs", "1", "--no-log", "--save", saved])).code, 0);
    await refused(
      resume().then(() => runMain(["--data", data, "--resume", saved])),
      /is saved weights \(--save\), not a checkpoint/,
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

/** A small valid checkpoint (base depth 2, epoch 1 of 2, the EMA started), built without a GPU. */
function sample(): Checkpoint {
  const layout = layoutState(stateSpec(2)), rng = new Prng(4);
  const values = () => rng.normals(layout.nTotal);
  const row = (epoch: number) => ({
    epoch,
    trainLoss: 2.3,
    trainAcc: 0.1,
    valLoss: 2.2,
    valAcc: 0.15,
    emaValAcc: 0.12,
    emaValLoss: 2.25,
    totalTimeSeconds: 1.5,
  });
  return {
    flags: {
      recipe: "hlb",
      runs: "1",
      epochs: "2",
      "base-depth": "2",
      "batch-size": "64",
      "train-subset": "256",
      "test-subset": "64",
      seed: "5",
      precision: "f32",
    },
    recipe: "{}",
    script: "a".repeat(64),
    kernels: { "norm.wgsl": "b".repeat(64) },
    convKernels: "wide",
    device: "test",
    norm: { mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25] },
    startedAt: "2026-12-05T00:00:00.000Z",
    run: 1,
    done: [],
    train: {
      epoch: 1,
      step: 4,
      rng: [1, 2, 3, 4],
      emaExists: true,
      trainSeconds: 1.5,
      epochs: [row(0)],
      state: values(),
      momentum: values(),
      ema: values(),
    },
    interrupted: null,
  };
}

Deno.test("checkpoint: round trip, tensors as net.*, momentum.*, ema.* that a safetensors reader opens", async () => {
  const c = sample(), bytes = await encodeCheckpoint(c), back = await decodeCheckpoint(bytes, "ck");
  const layout = layoutState(stateSpec(2));
  // the padding between tensors is not stored: it is zero in a real run's buffers
  const stored = (v: Float32Array) => {
    const out = new Float32Array(v.length);
    for (const e of layout.entries.values()) {
      const n = e.shape.reduce((a, b) => a * b, 1);
      out.set(v.subarray(e.offset, e.offset + n), e.offset);
    }
    return out;
  };
  const trainable = (v: Float32Array) => stored(v).map((x, i) => (i < layout.nTrainable ? x : 0));
  assert.deepEqual(back.train.state, stored(c.train.state));
  assert.deepEqual(back.train.momentum, trainable(c.train.momentum));
  assert.deepEqual(back.train.ema, stored(c.train.ema));
  const { train: _a, ...rest } = back, { train: _b, ...want } = c;
  assert.deepEqual(rest, want);
  const header = JSON.parse(
    new TextDecoder().decode(bytes.subarray(8, 8 + Number(new DataView(bytes.buffer).getBigUint64(0, true)))),
  );
  assert.equal(header.__metadata__.format, CHECKPOINT_FORMAT);
  assert.deepEqual(header["net.conv_group_1.conv1.weight"].shape, [3, 3, 24, 2]);
  assert.ok("momentum.linear.weight" in header && "ema.conv_group_3.norm2.running_var" in header);
  assert.ok(!("momentum.conv_group_1.norm1.running_mean" in header), "no momentum for what SGD does not train");
});

Deno.test("checkpoint: parts that disagree, or a hand-made file, are refused with one line each", async () => {
  const cases: [(c: Checkpoint) => void, RegExp][] = [
    [(c) => (c.train.step = 5), /says step 5 at epoch 1, where its run takes 4/],
    [(c) => (c.train.epoch = 3), /has no valid epoch/],
    [(c) => (c.train.epochs = []), /has no valid table rows for its 1 epochs/],
    [(c) => (c.train.rng = [1, 2, 3]), /has no valid generator state/],
    [(c) => (c.train.rng = [1, 2, 3, 2 ** 32]), /has no valid generator state/],
    [(c) => (c.run = 2), /has no valid run number/],
    [(c) => (c.flags["batch-size"] = "0x40"), /has bad flags \(--batch-size must be an integer/],
    [(c) => (c.flags = { ...c.flags, extra: "1" }), /has no valid flags/],
    [(c) => (c.norm.std[1] = 0), /has bad normalisation statistics/],
    [(c) => (c.script = "x"), /has no valid script hash/],
    [(c) => (c.interrupted = { epoch: -1, steps: 0 }), /has no valid interruption/],
    [(c) => (c.train.epochs[0].valLoss = NaN), /has no valid table rows/],
  ];
  for (const [spoil, message] of cases) {
    const c = sample();
    spoil(c);
    await assert.rejects(
      async () => await decodeCheckpoint(await encodeCheckpoint(c), "ck.safetensors"),
      (e: Error) =>
        message.test(e.message) && e.message.startsWith("ck.safetensors ") && !e.message.includes("\n") &&
        e.message.endsWith(": it cannot be resumed (start the run again)"),
      String(message),
    );
  }
  // a tensor of another network, and one missing
  const good = await encodeCheckpoint(sample());
  const n = Number(new DataView(good.buffer).getBigUint64(0, true));
  const header = JSON.parse(new TextDecoder().decode(good.subarray(8, 8 + n)));
  const rewrite = (h: unknown) => {
    const json = new TextEncoder().encode(JSON.stringify(h)),
      out = new Uint8Array(8 + json.length + good.length - 8 - n);
    new DataView(out.buffer).setBigUint64(0, BigInt(json.length), true);
    out.set(json, 8);
    out.set(good.subarray(8 + n), 8 + json.length);
    return out;
  };
  const renamed = { ...header, "net.conv_group_9.conv1.weight": header["net.linear.weight"] };
  delete renamed["net.linear.weight"];
  await assert.rejects(() => decodeCheckpoint(rewrite(renamed), "ck"), /holds net\.conv_group_9\.conv1\.weight, which/);
  const reshaped = { ...header, "ema.linear.weight": { ...header["ema.linear.weight"], shape: [16, 10] } };
  await assert.rejects(
    () => decodeCheckpoint(rewrite(reshaped), "ck"),
    /has ema\.linear\.weight of \[16,10\], not \[10,16\]/,
  );
  const overlapping = {
    ...header,
    "ema.linear.weight": { ...header["ema.linear.weight"], data_offsets: header["net.linear.weight"].data_offsets },
  };
  await assert.rejects(
    () => decodeCheckpoint(rewrite(overlapping), "ck"),
    /overlaps another tensor|belong to no tensor/,
  );
});

Deno.test("checkpoint fuzz: truncations and flipped bytes are one-line errors, never a silently different run", async () => {
  const good = await encodeCheckpoint(sample()), want = await decodeCheckpoint(good, "ck"), rng = new Prng(9);
  let refused = 0, same = 0;
  for (let k = 0; k < 300; k++) {
    let bytes: Uint8Array;
    if (k % 3 === 0) {
      bytes = good.slice(0, rng.int(good.length));
    } else {
      bytes = good.slice();
      for (let f = 0; f < 1 + rng.int(3); f++) bytes[rng.int(bytes.length)] ^= 1 << rng.int(8);
    }
    try {
      const got = await decodeCheckpoint(bytes, "ck.safetensors");
      assert.deepEqual(got, want, "a damaged file that decodes must decode to the same checkpoint");
      same++;
    } catch (e) {
      assert.ok(e instanceof Error && e.message.startsWith("ck.safetensors ") && !e.message.includes("\n"), String(e));
      refused++;
    }
  }
  assert.ok(refused >= 280, `${refused} refused, ${same} decoded the same`);
});
