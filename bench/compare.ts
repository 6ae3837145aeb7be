// Compare two forks of main.ts: `deno task compare A.ts B.ts [--runs N] [flags for both ...]`.
// Runs A and B alternately, N times each, each run a separate process with the same flags and seed
// (run i uses seed --seed + i, default 0 + i), reads the run logs they write, and prints mean and
// std of the final (EMA) accuracy and training time, the differences B - A with 95% intervals, and
// Welch's t-test p-values. A crashing run is reported and left out; it does not stop the others.
import { join } from "node:path";
import { mean, std, welch } from "./stats.ts";
import { writeFileAtomic } from "../main.ts";
import { type EpochRow, meanCurve, plotSvg } from "./plot.ts";

interface Outcome {
  acc: number;
  ema: boolean; // acc is the EMA's (hlb), or the network's (a recipe without EMA: airbench94)
  seconds: number;
  epochs: EpochRow[]; // per-epoch metrics, for --plot
}

function usage(message: string): never {
  console.error(
    `error: ${message}\nusage: deno task compare A.ts B.ts [--runs N] [--seed S] [--plot FILE.svg] [main.ts flags ...]`,
  );
  Deno.exit(2);
}

async function runOnce(script: string, flags: string[], seed: number, logDir: string): Promise<Outcome | string> {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", script, ...flags, "--seed", String(seed), "--log-dir", logDir],
    stdout: "piped",
    stderr: "piped",
  }).output();
  if (out.code !== 0) {
    const err = new TextDecoder().decode(out.stderr).trim().split("\n").filter((l) => !l.includes("XDG_RUNTIME_DIR"));
    return `exit ${out.code}: ${err[err.length - 1] ?? "(no message)"}`;
  }
  const files = [...Deno.readDirSync(logDir)].map((e) => e.name).filter((n) => n.endsWith(".json"));
  if (files.length !== 1) return `expected one run log in ${logDir}, found ${files.length}`;
  const log = JSON.parse(await Deno.readTextFile(join(logDir, files[0])));
  const run = log.runs[0];
  // the recipe's final accuracy: the EMA's (hlb), or the network's where the recipe has no EMA (airbench94)
  const ran = { seconds: run.trainSeconds, epochs: run.epochs };
  if (log.hyp?.misc?.ema === null) return { acc: run.valAcc, ema: false, ...ran };
  if (run.emaValAcc === null) return "the EMA never started (too few steps): no accuracy to compare";
  return { acc: run.emaValAcc, ema: true, ...ran };
}

const argv = [...Deno.args];
const [a, b] = argv.splice(0, 2);
if (!a || !b || a.startsWith("-") || b.startsWith("-")) usage("name two scripts to compare");
let runs = 3, seed = 0;
for (const [flag, set] of [["--runs", (v: number) => (runs = v)], ["--seed", (v: number) => (seed = v)]] as const) {
  const i = argv.indexOf(flag);
  if (i < 0) continue;
  const v = Number(argv[i + 1]);
  if (!Number.isInteger(v) || v < (flag === "--runs" ? 2 : 0)) {
    usage(`${flag} needs an integer${flag === "--runs" ? " >= 2" : " >= 0"}`);
  }
  set(v);
  argv.splice(i, 2);
}
let plot: string | undefined;
const plotAt = argv.indexOf("--plot");
if (plotAt >= 0) {
  plot = argv[plotAt + 1];
  if (!plot || plot.startsWith("-")) usage("--plot needs a file name, e.g. --plot curves.svg");
  argv.splice(plotAt, 2);
}
if (argv.some((f) => f === "--plot" || f === "--runs" || f === "--seed" || f === "--log-dir" || f === "--no-log")) {
  usage("pass --runs and --seed once; compare sets --log-dir itself");
}

const tmp = await Deno.makeTempDir({ prefix: "compare-" });
const results: Record<string, Outcome[]> = { [a]: [], [b]: [] };
try {
  for (let i = 0; i < runs; i++) {
    for (const script of i % 2 === 0 ? [a, b] : [b, a]) { // alternate the order: drifts hit both
      const dir = join(tmp, `${results[script].length}-${i}-${script.replaceAll(/[^\w.-]/g, "_")}`);
      await Deno.mkdir(dir);
      const r = await runOnce(script, argv, seed + i, dir);
      const label = `${script} run ${i + 1}/${runs}, seed ${seed + i}`;
      if (typeof r === "string") {
        console.log(`${label}: FAILED (${r})`);
      } else {
        results[script].push(r);
        console.log(
          `${label}: ${r.ema ? "EMA" : "final"} acc ${(100 * r.acc).toFixed(2)}%, train ${r.seconds.toFixed(2)} s`,
        );
      }
    }
  }
} finally {
  await Deno.remove(tmp, { recursive: true });
}

const fmt = (xs: number[], scale: number, digits: number, unit: string) =>
  xs.length ? `${(scale * mean(xs)).toFixed(digits)}${unit} ± ${(scale * std(xs)).toFixed(digits)}` : "n/a";
const width = Math.max(a.length, b.length, 7);
const accName = [...results[a], ...results[b]].every((r) => r.ema) ? "EMA val acc" : "final val acc";
console.log(`\n${"variant".padEnd(width)}  ok  ${`${accName} (mean ± std)`.padEnd(26)}  train s (mean ± std)`);
for (const s of [a, b]) {
  const r = results[s];
  console.log(
    `${s.padEnd(width)}  ${String(r.length).padStart(2)}  ${fmt(r.map((x) => x.acc), 100, 2, "%").padEnd(26)}  ${
      fmt(r.map((x) => x.seconds), 1, 2, " s")
    }`,
  );
}
if (plot) {
  const curves = [a, b].filter((s) => results[s].length).map((s) =>
    meanCurve(`${s} (mean of ${results[s].length})`, results[s])
  );
  if (curves.length) {
    await writeFileAtomic(plot, plotSvg(curves));
    console.log(`\nmean curves written to ${plot}`);
  }
}
const [ra, rb] = [results[a], results[b]];
if (ra.length < 2 || rb.length < 2) {
  console.log("\nfewer than 2 successful runs of a variant: no statistics");
  Deno.exit(1);
}
const acc = welch(rb.map((x) => 100 * x.acc), ra.map((x) => 100 * x.acc));
const time = welch(rb.map((x) => x.seconds), ra.map((x) => x.seconds));
const p = (v: number) => (v < 1e-4 ? v.toExponential(1) : v.toFixed(4));
console.log(
  `\nB - A accuracy: ${acc.diff.toFixed(2)} points, 95% interval [${acc.low.toFixed(2)}, ${
    acc.high.toFixed(2)
  }], Welch p = ${p(acc.p)}`,
);
console.log(
  `B - A train time: ${time.diff.toFixed(2)} s, 95% interval [${time.low.toFixed(2)}, ${
    time.high.toFixed(2)
  }], Welch p = ${p(time.p)}`,
);
const faster = time.diff < 0 ? b : a;
console.log(
  time.p < 0.05
    ? `${faster} is faster, by ${Math.abs(time.diff).toFixed(2)} s (p = ${p(time.p)})`
    : `no significant difference in training time (p = ${p(time.p)})`,
);
console.log(
  acc.p < 0.05
    ? `accuracy changed significantly: ${acc.diff > 0 ? "up" : "down"} ${Math.abs(acc.diff).toFixed(2)} points (p = ${
      p(acc.p)
    })`
    : `no significant change in accuracy (p = ${p(acc.p)}; modded-nanogpt-style records ask for p < 0.01)`,
);
