// bench/plot.ts: the SVG parses as XML, has both panels with axes, every series of every log with
// the right points, and a legend; the CLI reads run logs and writes the file atomically.
import assert from "node:assert/strict";
import { join } from "node:path";
import { meanCurve, niceTicks, plotSvg } from "../bench/plot.ts";

const ROOT = new URL("..", import.meta.url).pathname;

interface XmlNode {
  name: string;
  attrs: Record<string, string>;
  children: XmlNode[];
  text: string;
}

/** A strict little XML parser (elements, attributes, text, self-closing tags): throws on anything malformed. */
function parseXml(src: string): XmlNode {
  const root: XmlNode = { name: "#root", attrs: {}, children: [], text: "" };
  const stack = [root];
  const tag = /<(\/?)([A-Za-z][\w:-]*)((?:\s+[\w:-]+="[^"<]*")*)\s*(\/?)>/y;
  let i = 0;
  while (i < src.length) {
    const lt = src.indexOf("<", i);
    const text = src.slice(i, lt < 0 ? src.length : lt);
    if (/[<>]/.test(text) || /&(?!(amp|lt|gt|quot|apos);)/.test(text)) throw new Error(`bad text at ${i}`);
    stack.at(-1)!.text += text;
    if (lt < 0) break;
    tag.lastIndex = lt;
    const m = tag.exec(src);
    if (!m) throw new Error(`malformed tag at ${lt}: ${src.slice(lt, lt + 40)}`);
    const [, close, name, attrText, selfClose] = m;
    if (close) {
      const open = stack.pop()!;
      if (open.name !== name || attrText || selfClose) throw new Error(`</${name}> closes <${open.name}>`);
    } else {
      const attrs: Record<string, string> = {};
      for (const [, k, v] of attrText.matchAll(/([\w:-]+)="([^"]*)"/g)) {
        if (k in attrs) throw new Error(`attribute ${k} twice in <${name}>`);
        attrs[k] = v;
      }
      const node = { name, attrs, children: [], text: "" };
      stack.at(-1)!.children.push(node);
      if (!selfClose) stack.push(node);
    }
    i = tag.lastIndex;
  }
  if (stack.length !== 1) throw new Error(`<${stack.at(-1)!.name}> is never closed`);
  if (root.children.length !== 1) throw new Error("an XML document has exactly one root element");
  return root.children[0];
}

const all = (n: XmlNode): XmlNode[] => [n, ...n.children.flatMap(all)];
const texts = (n: XmlNode) => all(n).map((c) => c.text.trim()).filter(Boolean);

function fakeRun(shift: number, epochs = 4) {
  return {
    epochs: Array.from({ length: epochs }, (_, e) => ({
      epoch: e,
      trainLoss: 2.3 - 0.3 * e + shift,
      valLoss: 2.2 - 0.25 * e + shift,
      trainAcc: 0.2 + 0.1 * e,
      valAcc: 0.25 + 0.1 * e,
      emaValAcc: e >= 2 ? 0.3 + 0.1 * e : null,
    })),
  };
}

Deno.test("plot: the XML checker rejects malformed documents", () => {
  assert.throws(() => parseXml("<svg><g></svg>"), /closes/);
  assert.throws(() => parseXml("<svg><g>"), /never closed/);
  assert.throws(() => parseXml('<svg a="1" a="2"/>'), /twice/);
  assert.throws(() => parseXml("<svg>a < b</svg>"), /malformed|bad text/);
  assert.equal(parseXml('<svg x="1"><g/><text>hi &amp; bye</text></svg>').children.length, 2);
});

Deno.test("plot: nice ticks enclose the range at 1/2/5 x 10^k steps", () => {
  assert.deepEqual(niceTicks(0, 11, 6), [0, 2, 4, 6, 8, 10, 12]);
  assert.deepEqual(niceTicks(0.31, 0.87, 5), [0.2, 0.4, 0.6, 0.8, 1]);
  assert.deepEqual(niceTicks(10, 90, 4), [0, 20, 40, 60, 80, 100]);
  assert.deepEqual(niceTicks(5, 5, 5), [4.4, 4.6, 4.8, 5, 5.2, 5.4, 5.6]); // a flat line gets a range around it
  assert.deepEqual(niceTicks(0, 1, 6, 1), [0, 1]); // epochs: never a fractional step
});

Deno.test("plot: mean curve over runs, null where a run has no EMA yet", () => {
  const c = meanCurve("x", [fakeRun(0), fakeRun(0.2), fakeRun(0.4, 3)]);
  assert.deepEqual(c.epochs, [0, 1, 2]); // the epochs every run reached
  assert.ok(Math.abs(c.trainLoss[1]! - (2.0 + 0.2)) < 1e-12);
  assert.deepEqual(c.emaValAcc.slice(0, 2), [null, null]);
  assert.ok(Math.abs(c.emaValAcc[2]! - 0.5) < 1e-12);
});

Deno.test("plot: the SVG parses and has both panels, axes, every series of both logs, and a legend", () => {
  const curves = [meanCurve("baseline", [fakeRun(0)]), meanCurve("idea", [fakeRun(0.1)])];
  const svg = parseXml(plotSvg(curves));
  assert.equal(svg.name, "svg");
  assert.equal(svg.attrs.xmlns, "http://www.w3.org/2000/svg");
  const panels = all(svg).filter((n) => n.attrs.class === "panel");
  assert.deepEqual(panels.map((p) => p.attrs["data-title"]), ["loss", "accuracy"]);
  for (const p of panels) {
    assert.equal(all(p).filter((n) => n.attrs.class === "axes").length, 1);
    assert.ok(texts(p).includes("epoch"), "x axis label");
  }
  assert.ok(texts(panels[1]).includes("accuracy (%)"));
  const series = all(svg).filter((n) => n.attrs.class === "series");
  for (const log of ["baseline", "idea"]) {
    const mine = series.filter((s) => s.attrs["data-log"] === log).map((s) => s.attrs["data-series"]);
    assert.deepEqual(mine.sort(), ["emaValAcc", "trainAcc", "trainLoss", "valAcc", "valLoss"]);
  }
  // Each path has one point per epoch with a value: 4 for loss, 2 for the EMA (epochs 2 and 3).
  const points = (s: XmlNode) => s.attrs.d.split(/[ML]/).filter((x) => x.trim()).length;
  assert.equal(points(series.find((s) => s.attrs["data-series"] === "valLoss")!), 4);
  assert.equal(points(series.find((s) => s.attrs["data-series"] === "emaValAcc")!), 2);
  assert.notEqual(series[0].attrs.stroke, series.at(-1)!.attrs.stroke, "one colour per log");
  const legend = texts(all(svg).find((n) => n.attrs.class === "legend")!);
  for (const label of ["baseline", "idea", "val", "EMA val"]) assert.ok(legend.includes(label), label);
  // Higher loss is drawn higher up: the y coordinate of train loss falls as the loss falls.
  const ys = series[0].attrs.d.split(/[ML]/).filter((x) => x.trim()).map((p) => Number(p.split(",")[1]));
  assert.ok(ys.every((y, i) => i === 0 || y > ys[i - 1]), "y axis points up");
});

Deno.test("plot: CLI reads run logs and writes the SVG; a bad log gets one line", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const log = join(dir, "20261127-120000-abcdef12.json");
    await Deno.writeTextFile(log, JSON.stringify({ runs: [{ seed: 1, ...fakeRun(0) }, { seed: 2, ...fakeRun(0.2) }] }));
    const out = join(dir, "curves.svg");
    const run = (...args: string[]) =>
      new Deno.Command(Deno.execPath(), { args: ["run", "-A", join(ROOT, "bench/plot.ts"), ...args], stderr: "piped" })
        .output();
    const ok = await run(log, "-o", out);
    assert.equal(ok.code, 0, new TextDecoder().decode(ok.stderr));
    const svg = parseXml(await Deno.readTextFile(out));
    const labels = all(svg).filter((n) => n.attrs.class === "series").map((n) => n.attrs["data-log"]);
    assert.ok(labels.includes("20261127-120000-abcdef12 (mean of 2)"));
    assert.deepEqual([...Deno.readDirSync(dir)].map((e) => e.name).sort(), [
      "20261127-120000-abcdef12.json",
      "curves.svg",
    ]);
    await Deno.writeTextFile(join(dir, "bad.json"), "{ not json");
    const bad = await run(join(dir, "bad.json"), "-o", out);
    const err = new TextDecoder().decode(bad.stderr).trim().split("\n");
    assert.equal(bad.code, 1);
    assert.match(err[0], /^error: cannot read run log .*bad\.json/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
