// Issue 18's "distribution against the original": the final accuracies of airbench94_muon.py itself (the last line of
// bench/airbench_reference.py's output, JSON) against `main.ts --recipe airbench94 --runs N --json FILE` at the same
// configuration: each side's mean and std, Welch's t-test on the means and the F-test on the variances.
//   deno run -A bench/airbench_distribution.ts REFERENCE_OUTPUT.txt PORT.json
import { fTest, mean, std, welch } from "./stats.ts";

const [refFile, portFile] = Deno.args;
if (!refFile || !portFile) {
  console.error("usage: deno run -A bench/airbench_distribution.ts REFERENCE_OUTPUT.txt PORT.json");
  Deno.exit(2);
}
const refLine = (await Deno.readTextFile(refFile)).trim().split("\n").at(-1)!;
const ref = JSON.parse(refLine) as { seeds: number[]; tta_val_acc: number[]; time_seconds: number[] };
const port = JSON.parse(await Deno.readTextFile(portFile)) as {
  flags: { recipe: string };
  runs: { seed: number; valAcc: number; trainSeconds: number; interrupted?: unknown }[];
};
if (port.flags.recipe !== "airbench94") throw new Error(`${portFile} is a --recipe ${port.flags.recipe} run`);
const done = port.runs.filter((r) => !r.interrupted);
const a = ref.tta_val_acc, b = done.map((r) => r.valAcc);
const pct = (x: number) => (100 * x).toFixed(2) + "%";
const row = (name: string, accs: number[], seconds: number[], seeds: number[]) =>
  `| ${name} | ${accs.length} | ${seeds.join(" ")} | ${pct(mean(accs))} | ${pct(std(accs))} | ${
    mean(seconds).toFixed(1)
  } |`;
console.log("| side | runs | seeds | mean final accuracy | std | train seconds (mean) |");
console.log("| --- | --- | --- | --- | --- | --- |");
console.log(row("airbench94_muon.py (PyTorch, CPU)", a, ref.time_seconds, ref.seeds));
console.log(row("main.ts --recipe airbench94 (lavapipe)", b, done.map((r) => r.trainSeconds), done.map((r) => r.seed)));
const w = welch(b, a), f = fTest(b, a);
console.log(
  `\nport - original: ${(100 * w.diff).toFixed(2)} points (95% interval ${(100 * w.low).toFixed(2)} to ${
    (100 * w.high).toFixed(2)
  }), Welch's t ${w.t.toFixed(3)} on ${w.df.toFixed(1)} df, p = ${w.p.toFixed(3)}`,
);
console.log(
  `variance ratio port / original F = ${f.f.toFixed(3)} on (${f.d1}, ${f.d2}) df: p(port wider) = ${
    f.pWider.toFixed(3)
  }, two-sided p = ${f.p.toFixed(3)}`,
);
