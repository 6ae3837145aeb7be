// The README's picture of the --web page: serves it (main.ts --web with the flags given here), opens it in headless
// Chromium, presses Start, waits for the run to finish (the page's title becomes "done: <status>") and for the trained
// network's answers, and saves a PNG of the whole page through the DevTools protocol.
//   deno run -A bench/web_screenshot.ts OUT.png [main.ts flags, e.g. --data DIR --epochs 4]
import { chromiumPage, findChromium, spawnMain } from "../tests/util.ts";

const [out, ...flags] = Deno.args;
if (!out?.endsWith(".png")) throw new Error("usage: deno run -A bench/web_screenshot.ts OUT.png [main.ts flags]");
const chromium = findChromium();
if (!chromium) throw new Error("no chromium on the PATH: apt-get install chromium");

const server = spawnMain(["--web", ...flags]);
await server.until(/training page: \S+/);
const url = (await server.stdoutSoFar()).match(/training page: (\S+)/)![1];
const page = await chromiumPage(chromium, url);
try {
  // the page opens with its form filled from the address; Start starts (once the page has enabled it)
  while (await page.evaluate("document.getElementById('start')?.disabled ?? true")) {
    await new Promise((r) => setTimeout(r, 250));
  }
  await page.evaluate("document.getElementById('start').click()");
  while (!String(await page.evaluate("document.title")).startsWith("done:")) {
    await new Promise((r) => setTimeout(r, 1000));
  }
  // a completed run: its network's answers (the grid, the matrix) come after the run log
  while (
    await page.evaluate("document.title === 'done: completed' && document.getElementById('answers').hidden")
  ) {
    await new Promise((r) => setTimeout(r, 1000));
  }
  await Deno.writeFile(out, await page.screenshot());
  // what the picture shows, as text (for bench/RESULTS.md)
  for (const id of ["device", "table", "tepoch", "trun", "answertext"]) {
    console.log(await page.evaluate(`document.getElementById("${id}").textContent`));
  }
  console.log(`screenshot written to ${out}`);
} finally {
  await page.close();
  server.child.kill("SIGTERM");
  await server.finish();
}
