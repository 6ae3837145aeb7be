// Curves from run logs: `deno task plot LOG.json [LOG2.json ...] -o FILE.svg`.
// Draws two panels, loss (train, val) and accuracy (train, val, EMA val) per epoch, one colour per
// log, one line style per series, with axes, ticks, labels and a legend. A log with several runs
// (`--runs N`) is drawn as the mean over its runs. Plain SVG written by hand: no dependency.
import { basename } from "node:path";
import { parseArgs } from "node:util";
import { writeFileAtomic } from "../main.ts";

/** One line set to draw: per-epoch values (null where missing, e.g. before the EMA starts). */
export interface Curve {
  label: string;
  epochs: number[];
  trainLoss: (number | null)[];
  valLoss: (number | null)[];
  trainAcc: (number | null)[];
  valAcc: (number | null)[];
  emaValAcc: (number | null)[];
}

export type EpochRow = Record<"epoch" | "trainLoss" | "valLoss" | "trainAcc" | "valAcc", number> & {
  emaValAcc: number | null;
};
const SERIES = ["trainLoss", "valLoss", "trainAcc", "valAcc", "emaValAcc"] as const;

/** The mean curve of several runs, over the epochs that every run reached. */
export function meanCurve(label: string, runs: { epochs: EpochRow[] }[]): Curve {
  const n = Math.min(...runs.map((r) => r.epochs.length));
  const curve: Curve = { label, epochs: [], trainLoss: [], valLoss: [], trainAcc: [], valAcc: [], emaValAcc: [] };
  for (let e = 0; e < n; e++) {
    curve.epochs.push(runs[0].epochs[e].epoch);
    for (const key of SERIES) {
      const xs = runs.map((r) => r.epochs[e][key]);
      curve[key].push(xs.every((x) => x !== null && Number.isFinite(x)) ? mean(xs as number[]) : null);
    }
  }
  return curve;
}

const mean = (xs: number[]) => xs.reduce((s, x) => s + x, 0) / xs.length;

/** Reads a run log written by main.ts into its mean curve; one clear line if it is not one. */
export async function readLogCurve(path: string): Promise<Curve> {
  let log;
  try {
    log = JSON.parse(await Deno.readTextFile(path));
  } catch (e) {
    throw new Error(`cannot read run log ${path} (${e instanceof Error ? e.message : e})`);
  }
  const runs = (log?.runs ?? []).filter((r: { epochs?: unknown[] }) => r.epochs?.length);
  if (!runs.length) throw new Error(`${path} has no run with epochs: is it a run log from main.ts?`);
  return meanCurve(basename(path, ".json") + (runs.length > 1 ? ` (mean of ${runs.length})` : ""), runs);
}

// ---- drawing --------------------------------------------------------------------------------------

const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"];
const STYLE = { train: "2,3", val: "", ema: "8,4" } as const; // stroke-dasharray per series
const PANEL = { w: 420, h: 300, left: 58, right: 16, top: 34, bottom: 46 };

/** Tick values enclosing [lo, hi] at a "nice" step (1, 2 or 5 x 10^k, at least minStep), about `count` intervals. */
export function niceTicks(lo: number, hi: number, count = 5, minStep = 0): number[] {
  if (!(hi > lo)) [lo, hi] = [lo - 0.5, lo + 0.5];
  const raw = Math.max((hi - lo) / count, minStep), mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw)!;
  const ticks: number[] = [];
  const first = Math.floor(lo / step + 1e-9), last = Math.ceil(hi / step - 1e-9); // the ticks enclose [lo, hi]
  for (let k = first; k <= last; k++) ticks.push(+(k * step).toPrecision(12));
  return ticks;
}

const esc = (s: string) => s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");
const num = (v: number) => +v.toFixed(2);

function panel(
  x0: number,
  title: string,
  yLabel: string,
  curves: Curve[],
  series: { key: typeof SERIES[number]; dash: string }[],
  scale: number,
): string {
  const { w, h, left, right, top, bottom } = PANEL;
  const xs = curves.flatMap((c) => c.epochs);
  const ys = curves.flatMap((c) => series.flatMap((s) => c[s.key].filter((v): v is number => v !== null)))
    .map((v) => v * scale);
  const xTicks = niceTicks(Math.min(0, ...xs), Math.max(...xs), 6, 1); // whole epochs
  const yTicks = niceTicks(Math.min(...ys), Math.max(...ys), 5);
  const [xLo, xHi, yLo, yHi] = [xTicks[0], xTicks.at(-1)!, yTicks[0], yTicks.at(-1)!];
  const px = (v: number) => num(x0 + left + (v - xLo) / (xHi - xLo) * (w - left - right));
  const py = (v: number) => num(top + (yHi - v) / (yHi - yLo) * (h - top - bottom));
  const out = [`<g class="panel" data-title="${esc(title)}">`];
  out.push(
    `<text x="${x0 + w / 2}" y="20" text-anchor="middle" font-size="14" font-weight="bold">${esc(title)}</text>`,
  );
  for (const t of yTicks) {
    out.push(`<line x1="${px(xLo)}" y1="${py(t)}" x2="${px(xHi)}" y2="${py(t)}" stroke="#e5e5e5"/>`);
    out.push(`<text x="${px(xLo) - 6}" y="${py(t) + 4}" text-anchor="end" font-size="11">${t}</text>`);
  }
  for (const t of xTicks) {
    out.push(`<line x1="${px(t)}" y1="${py(yLo)}" x2="${px(t)}" y2="${py(yLo) + 4}" stroke="#333"/>`);
    out.push(`<text x="${px(t)}" y="${py(yLo) + 17}" text-anchor="middle" font-size="11">${t}</text>`);
  }
  out.push(`<path class="axes" d="M${px(xLo)},${py(yHi)} V${py(yLo)} H${px(xHi)}" fill="none" stroke="#333"/>`);
  out.push(
    `<text x="${x0 + left + (w - left - right) / 2}" y="${h - 8}" text-anchor="middle" font-size="12">epoch</text>`,
  );
  const cy = top + (h - top - bottom) / 2;
  out.push(
    `<text x="${x0 + 14}" y="${cy}" text-anchor="middle" font-size="12" transform="rotate(-90 ${x0 + 14} ${cy})">${
      esc(yLabel)
    }</text>`,
  );
  curves.forEach((c, i) => {
    for (const s of series) {
      // A polyline per run of consecutive values; missing epochs (null) break the line.
      let d = "";
      c[s.key].forEach((v, e) => {
        if (v === null) return;
        d += `${d && c[s.key][e - 1] !== null ? " L" : " M"}${px(c.epochs[e])},${py(v * scale)}`;
      });
      if (!d) continue;
      out.push(
        `<path class="series" data-log="${esc(c.label)}" data-series="${s.key}" d="${d.trim()}" fill="none" ` +
          `stroke="${COLORS[i % COLORS.length]}" stroke-width="2"${s.dash ? ` stroke-dasharray="${s.dash}"` : ""}/>`,
      );
      c[s.key].forEach((v, e) => {
        if (v !== null) {
          out.push(
            `<circle cx="${px(c.epochs[e])}" cy="${py(v * scale)}" r="2.5" fill="${COLORS[i % COLORS.length]}"/>`,
          );
        }
      });
    }
  });
  out.push("</g>");
  return out.join("\n");
}

/** The whole figure: loss and accuracy panels side by side, and a legend below them. */
export function plotSvg(curves: Curve[]): string {
  if (!curves.length) throw new Error("nothing to plot");
  const { w, h } = PANEL;
  const legendRows = curves.length + 1;
  const height = h + 16 + 18 * legendRows;
  const body = [
    panel(0, "loss", "loss", curves, [{ key: "trainLoss", dash: STYLE.train }, { key: "valLoss", dash: STYLE.val }], 1),
    panel(w, "accuracy", "accuracy (%)", curves, [
      { key: "trainAcc", dash: STYLE.train },
      { key: "valAcc", dash: STYLE.val },
      { key: "emaValAcc", dash: STYLE.ema },
    ], 100),
  ];
  // Legend: one row per log (its colour), then one row for the line styles.
  const legend = ['<g class="legend">'];
  let y = h + 16;
  curves.forEach((c, i) => {
    const color = COLORS[i % COLORS.length];
    legend.push(`<rect x="${PANEL.left}" y="${y - 9}" width="22" height="4" fill="${color}"/>`);
    legend.push(`<text x="${PANEL.left + 30}" y="${y - 3}" font-size="12">${esc(c.label)}</text>`);
    y += 18;
  });
  let x = PANEL.left;
  for (const [name, dash] of [["train (first batch)", STYLE.train], ["val", STYLE.val], ["EMA val", STYLE.ema]]) {
    legend.push(
      `<line x1="${x}" y1="${y - 7}" x2="${x + 28}" y2="${y - 7}" stroke="#333" stroke-width="2"${
        dash ? ` stroke-dasharray="${dash}"` : ""
      }/>`,
    );
    legend.push(`<text x="${x + 34}" y="${y - 3}" font-size="12">${name}</text>`);
    x += 60 + 7 * name.length;
  }
  legend.push("</g>");
  return [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${2 * w}" height="${height}" viewBox="0 0 ${2 * w} ${height}" ` +
    `font-family="sans-serif">`,
    `<rect width="100%" height="100%" fill="white"/>`,
    ...body,
    ...legend,
    "</svg>",
    "",
  ].join("\n");
}

if (import.meta.main) {
  try {
    const { values, positionals } = parseArgs({
      args: Deno.args,
      options: { out: { type: "string", short: "o" }, help: { type: "boolean", short: "h" } },
      allowPositionals: true,
    });
    if (values.help) {
      console.log("usage: deno task plot LOG.json [LOG2.json ...] -o FILE.svg");
      Deno.exit(0);
    }
    if (!positionals.length) throw new Error("name at least one run log (runs/*.json)");
    if (!values.out) throw new Error("-o FILE.svg is required");
    const curves = await Promise.all(positionals.map(readLogCurve));
    await writeFileAtomic(values.out, plotSvg(curves)); // temp file + rename: never half a figure
    console.log(`wrote ${values.out} (${curves.length} log${curves.length > 1 ? "s" : ""})`);
  } catch (e) {
    console.error(`error: ${e instanceof Error ? e.message : e}\nusage: deno task plot LOG.json [...] -o FILE.svg`);
    Deno.exit(1);
  }
}
