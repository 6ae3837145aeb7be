// bench/compare.ts end to end: two forks, alternating child processes, statistics, and a crashing
// variant reported without stopping the comparison.
import assert from "node:assert/strict";
import { join } from "node:path";
import { writeFixtureDataset } from "./util.ts";

const ROOT = new URL("..", import.meta.url).pathname;

async function fork(dir: string, name: string, edit: (src: string) => string) {
  await Deno.mkdir(join(dir, "kernels"), { recursive: true });
  for await (const f of Deno.readDir(join(ROOT, "kernels"))) {
    await Deno.copyFile(join(ROOT, "kernels", f.name), join(dir, "kernels", f.name));
  }
  await Deno.writeTextFile(join(dir, name), edit(await Deno.readTextFile(join(ROOT, "main.ts"))));
  return join(dir, name);
}

Deno.test("compare: two forks, N runs each, table, intervals, p-values; a crashing fork is reported", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const data = await writeFixtureDataset(dir);
    const a = await fork(dir, "a.ts", (s) => s);
    const b = await fork(dir, "b.ts", (s) => s.replace("scalingFactor: 1 / 9,", "scalingFactor: 1 / 8,"));
    const crash = await fork(
      dir,
      "crash.ts",
      (s) =>
        s.replace(
          "export async function main(argv: string[]) {",
          'export async function main(argv: string[]) {\n  throw new Error("boom");',
        ),
    );
    const flags = [
      "--data",
      data,
      "--train-subset",
      "256",
      "--test-subset",
      "32",
      "--base-depth",
      "4",
      "--batch-size",
      "64",
      "--epochs",
      "2",
    ];
    const svg = join(dir, "curves.svg");
    const run = async (x: string, y: string) => {
      const out = await new Deno.Command(Deno.execPath(), {
        args: [
          "run",
          "-A",
          join(ROOT, "bench/compare.ts"),
          x,
          y,
          "--runs",
          "2",
          "--seed",
          "5",
          "--plot",
          svg,
          ...flags,
        ],
        stdout: "piped",
        stderr: "piped",
      }).output();
      return { code: out.code, stdout: new TextDecoder().decode(out.stdout) };
    };
    const ok = await run(a, b);
    assert.equal(ok.code, 0, ok.stdout);
    assert.match(ok.stdout, /a\.ts run 1\/2, seed 5: EMA acc \d+\.\d\d%, train \d+\.\d\d s/);
    assert.match(ok.stdout, /b\.ts run 2\/2, seed 6: EMA acc/);
    assert.match(ok.stdout, /variant\s+ok\s+EMA val acc \(mean ± std\)\s+train s \(mean ± std\)/);
    assert.match(
      ok.stdout,
      /B - A accuracy: -?\d+\.\d\d points, 95% interval \[-?\d+\.\d\d, -?\d+\.\d\d\], Welch p = /,
    );
    assert.match(ok.stdout, /B - A train time: -?\d+\.\d\d s, 95% interval/);
    assert.match(ok.stdout, /(is faster, by|no significant difference in training time)/);
    assert.match(ok.stdout, /mean curves written to .*curves\.svg/);
    const curves = await Deno.readTextFile(svg); // tests/plot.test.ts checks the drawing itself
    for (const label of ["a.ts (mean of 2)", "b.ts (mean of 2)"]) {
      assert.ok(curves.includes(`data-log="${join(dir, label)}"`));
    }
    const bad = await run(a, crash);
    assert.equal(bad.code, 1);
    assert.match(bad.stdout, /crash\.ts run 1\/2, seed 5: FAILED \(exit 1: error: boom\)/);
    assert.match(bad.stdout, /a\.ts run 2\/2, seed 6: EMA acc/);
    assert.match(bad.stdout, /fewer than 2 successful runs of a variant: no statistics/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
