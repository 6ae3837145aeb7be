// The README's picture of the --web page: serves it (main.ts --web with the flags given here), opens it in headless
// Chromium, waits for the run to finish (the page's title becomes "done: <status>") and saves a PNG through the
// DevTools protocol.
//   deno run -A bench/web_screenshot.ts OUT.png [main.ts flags, e.g. --data DIR --epochs 4]
import { findChromium, spawnMain } from "../tests/util.ts";

const [out, ...flags] = Deno.args;
if (!out?.endsWith(".png")) throw new Error("usage: deno run -A bench/web_screenshot.ts OUT.png [main.ts flags]");
const chromium = findChromium();
if (!chromium) throw new Error("no chromium on the PATH: apt-get install chromium");

const server = spawnMain(["--web", ...flags]);
await server.until(/training page: \S+/);
const url = (await server.stdoutSoFar()).match(/training page: (\S+)/)![1];
const port = 9300 + Math.floor(Math.random() * 600), profile = await Deno.makeTempDir();
const browser = new Deno.Command(chromium, {
  args: ["--headless=new", "--no-sandbox", "--enable-unsafe-webgpu", "--window-size=1100,1000"]
    .concat([`--remote-debugging-port=${port}`, `--user-data-dir=${profile}`, url]),
  stdout: "null",
  stderr: "null",
}).spawn();
try {
  let target: { type: string; webSocketDebuggerUrl: string } | undefined;
  for (let i = 0; i < 100 && !target; i++) {
    await new Promise((r) => setTimeout(r, 100));
    const list = await fetch(`http://127.0.0.1:${port}/json`).then((r) => r.json()).catch(() => []);
    target = list.find((t: { type: string }) => t.type === "page");
  }
  if (!target) throw new Error("Chromium's DevTools endpoint did not answer");
  const ws = new WebSocket(target.webSocketDebuggerUrl);
  await new Promise((r) => ws.addEventListener("open", r, { once: true }));
  let id = 0;
  const call = (method: string, params = {}) =>
    new Promise<Record<string, unknown>>((resolve) => {
      const mine = ++id;
      const on = (e: MessageEvent) => {
        const m = JSON.parse(e.data);
        if (m.id !== mine) return;
        ws.removeEventListener("message", on);
        resolve(m.result);
      };
      ws.addEventListener("message", on);
      ws.send(JSON.stringify({ id: mine, method, params }));
    });
  for (let title = ""; !title.startsWith("done:");) {
    await new Promise((r) => setTimeout(r, 1000));
    const r = await call("Runtime.evaluate", { expression: "document.title" });
    title = String((r.result as { value?: string })?.value ?? "");
  }
  const shot = await call("Page.captureScreenshot", { format: "png", captureBeyondViewport: true });
  await Deno.writeFile(out, Uint8Array.from(atob(String(shot.data)), (c) => c.charCodeAt(0)));
  console.log(`screenshot written to ${out}`);
  ws.close();
} finally {
  browser.kill("SIGKILL");
  await browser.status;
  server.child.kill("SIGTERM");
  await server.finish();
  await Deno.remove(profile, { recursive: true }).catch(() => {});
}
