// Statistics for comparing two variants over several runs: mean, sample std, Welch's t-test and
// the 95% interval of the difference of means. Written out here (no dependency): the Student t
// distribution through the regularized incomplete beta function (Numerical Recipes' continued fraction).

import { mean, sampleStd } from "../main.ts";

export { mean };
/** Sample standard deviation (n - 1); NaN below two samples, where main.ts's sampleStd prints 0. */
export const std = (xs: number[]) => (xs.length < 2 ? NaN : sampleStd(xs));
export const variance = (xs: number[]) => std(xs) ** 2;

/** log Gamma(x) for x > 0 (Lanczos, g = 7, 9 terms: ~15 significant digits). */
export function logGamma(x: number): number {
  const c = [
    0.99999999999980993,
    676.5203681218851,
    -1259.1392167224028,
    771.32342877765313,
    -176.61502916214059,
    12.507343278686905,
    -0.13857109526572012,
    9.9843695780195716e-6,
    1.5056327351493116e-7,
  ];
  if (x < 0.5) return Math.log(Math.PI / Math.sin(Math.PI * x)) - logGamma(1 - x);
  x -= 1;
  let a = c[0];
  const t = x + 7.5;
  for (let i = 1; i < 9; i++) a += c[i] / (x + i);
  return 0.5 * Math.log(2 * Math.PI) + (x + 0.5) * Math.log(t) - t + Math.log(a);
}

/** Regularized incomplete beta I_x(a, b). */
export function incompleteBeta(x: number, a: number, b: number): number {
  if (x <= 0) return 0;
  if (x >= 1) return 1;
  const front = Math.exp(logGamma(a + b) - logGamma(a) - logGamma(b) + a * Math.log(x) + b * Math.log(1 - x));
  // the continued fraction converges fast for x < (a + 1) / (a + b + 2); use the symmetry otherwise
  if (x > (a + 1) / (a + b + 2)) return 1 - incompleteBeta(1 - x, b, a);
  const tiny = 1e-300;
  let c = 1, d = 1 - ((a + b) * x) / (a + 1);
  d = 1 / (Math.abs(d) < tiny ? tiny : d);
  let f = d;
  for (let m = 1; m <= 300; m++) {
    for (
      const num of [
        (m * (b - m) * x) / ((a + 2 * m - 1) * (a + 2 * m)),
        -((a + m) * (a + b + m) * x) / ((a + 2 * m) * (a + 2 * m + 1)),
      ]
    ) {
      d = 1 + num * d;
      d = 1 / (Math.abs(d) < tiny ? tiny : d);
      c = 1 + num / c;
      if (Math.abs(c) < tiny) c = tiny;
      f *= c * d;
    }
    if (Math.abs(c * d - 1) < 1e-15) break;
  }
  return (front * f) / a;
}

/** Two-sided tail P(|T| > t) of Student's t with df degrees of freedom. */
export const tTwoSided = (t: number, df: number) => incompleteBeta(df / (df + t * t), df / 2, 0.5);

/** The t value with P(|T| > t) = p (by bisection: plenty fast for a report). */
export function tQuantileTwoSided(p: number, df: number): number {
  let lo = 0, hi = 1e3;
  for (let i = 0; i < 200; i++) {
    const mid = (lo + hi) / 2;
    if (tTwoSided(mid, df) > p) lo = mid;
    else hi = mid;
  }
  return (lo + hi) / 2;
}

/** Welch's t-test of mean(a) - mean(b): t, Welch-Satterthwaite df, two-sided p and the 95% interval. */
export function welch(a: number[], b: number[]) {
  const va = variance(a) / a.length, vb = variance(b) / b.length, se = Math.sqrt(va + vb);
  const diff = mean(a) - mean(b), t = diff / se;
  const df = (va + vb) ** 2 / (va ** 2 / (a.length - 1) + vb ** 2 / (b.length - 1));
  const half = tQuantileTwoSided(0.05, df) * se;
  return { diff, t, df, p: se === 0 ? (diff === 0 ? 1 : 0) : tTwoSided(t, df), low: diff - half, high: diff + half };
}

/** P(F <= f) for Fisher's F with (d1, d2) degrees of freedom: I_{d1 f / (d1 f + d2)}(d1 / 2, d2 / 2). */
export const fCdf = (f: number, d1: number, d2: number) => incompleteBeta((d1 * f) / (d1 * f + d2), d1 / 2, d2 / 2);

/**
 * The F-test of var(a) against var(b): F = var(a) / var(b) on (n_a - 1, n_b - 1) degrees of freedom. `pWider`: the
 * one-sided p of "a is spread wider than b" (small when it is); `p`: two-sided, "the variances differ".
 */
export function fTest(a: number[], b: number[]) {
  const f = variance(a) / variance(b), d1 = a.length - 1, d2 = b.length - 1, below = fCdf(f, d1, d2);
  return { f, d1, d2, pWider: 1 - below, p: Math.min(1, 2 * Math.min(below, 1 - below)) };
}
