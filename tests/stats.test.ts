// The comparison statistics against values worked out by hand (closed forms of Student's t for
// 1 and 2 degrees of freedom, a textbook quantile, and a Welch test computed step by step).
import assert from "node:assert/strict";
import {
  fCdf,
  fTest,
  incompleteBeta,
  logGamma,
  mean,
  std,
  tQuantileTwoSided,
  tTwoSided,
  welch,
} from "../bench/stats.ts";

const close = (got: number, want: number, tol: number, what: string) =>
  assert.ok(Math.abs(got - want) <= tol, `${what}: got ${got}, want ${want}`);

Deno.test("logGamma and the incomplete beta at known points", () => {
  close(logGamma(1), 0, 1e-13, "lgamma(1)");
  close(logGamma(5), Math.log(24), 1e-12, "lgamma(5)");
  close(logGamma(0.5), Math.log(Math.sqrt(Math.PI)), 1e-12, "lgamma(1/2)");
  close(incompleteBeta(0.3, 1, 1), 0.3, 1e-12, "I_x(1,1) = x");
  close(incompleteBeta(0.3, 2, 1), 0.09, 1e-12, "I_x(2,1) = x^2");
  close(incompleteBeta(0.3, 1, 3), 1 - 0.7 ** 3, 1e-12, "I_x(1,3) = 1 - (1-x)^3");
});

Deno.test("Student t tails: closed forms for df 1 and 2, and the textbook 95% quantiles", () => {
  for (const t of [0.1, 1, 2.5, 10]) {
    close(tTwoSided(t, 1), 1 - (2 / Math.PI) * Math.atan(t), 1e-12, `df 1, t ${t}`);
    close(tTwoSided(t, 2), 1 - t / Math.sqrt(t * t + 2), 1e-12, `df 2, t ${t}`);
  }
  close(tQuantileTwoSided(0.05, 10), 2.228139, 1e-6, "t(0.975, 10)");
  close(tQuantileTwoSided(0.05, 4), 2.776445, 1e-6, "t(0.975, 4)");
  close(tQuantileTwoSided(0.05, 1e6), 1.959966, 1e-5, "t(0.975, inf)");
});

Deno.test("Welch's t-test, step by step", () => {
  const a = [1, 2, 3, 4, 5], b = [2, 4, 6, 8, 10];
  close(mean(a), 3, 0, "mean");
  close(std(b), Math.sqrt(10), 1e-12, "std (n - 1)");
  const w = welch(a, b);
  // se^2 = 2.5/5 + 10/5 = 2.5; t = -3 / sqrt(2.5); df = 2.5^2 / (0.5^2/4 + 2^2/4) = 6.25 / 1.0625
  close(w.diff, -3, 1e-12, "diff");
  close(w.t, -3 / Math.sqrt(2.5), 1e-12, "t");
  close(w.df, 6.25 / 1.0625, 1e-12, "df");
  close(w.p, tTwoSided(3 / Math.sqrt(2.5), 6.25 / 1.0625), 1e-12, "p");
  assert.ok(w.p > 0.1 && w.p < 0.12, `p ${w.p}`); // t = 1.897 on 5.88 df
  const half = tQuantileTwoSided(0.05, w.df) * Math.sqrt(2.5);
  close(w.low, -3 - half, 1e-9, "interval low");
  close(w.high, -3 + half, 1e-9, "interval high");
  assert.equal(welch([1, 1, 1], [1, 1, 1]).p, 1);
});

Deno.test("F-test of two variances: closed forms, and a ratio worked out by hand", () => {
  // F(1, d) is t(d) squared; F(2, 2) has the cdf f / (1 + f)
  for (const t of [0.5, 1.7, 3]) close(1 - fCdf(t * t, 1, 7), tTwoSided(t, 7), 1e-12, `F(1, 7) at ${t}^2`);
  for (const f of [0.2, 1, 4]) close(fCdf(f, 2, 2), f / (1 + f), 1e-12, `F(2, 2) at ${f}`);
  // var(a) = 10, var(b) = 2.5: F = 4 on (4, 4) degrees of freedom
  const a = [2, 4, 6, 8, 10], b = [1, 2, 3, 4, 5], r = fTest(a, b);
  close(r.f, 4, 1e-12, "F");
  assert.deepEqual([r.d1, r.d2], [4, 4]);
  close(r.pWider, 1 - fCdf(4, 4, 4), 1e-15, "one-sided p");
  close(r.p, 2 * r.pWider, 1e-15, "two-sided p");
  // P(F(4, 4) > 4) = 1 - I_0.8(2, 2) = I_0.2(2, 2), and I_x(2, 2) = 3 x^2 - 2 x^3: 0.104
  close(r.pWider, 3 * 0.2 ** 2 - 2 * 0.2 ** 3, 1e-12, "P(F(4,4) > 4)");
  close(fTest(b, a).pWider, 1 - r.pWider, 1e-12, "the other way round");
});
