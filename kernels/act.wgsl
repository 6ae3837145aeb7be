// act.wgsl: exact GELU, y = x * Phi(x) with Phi the standard normal CDF (erf form, as PyTorch's
// default nn.GELU), and its derivative dx = dy * (Phi(x) + x * phi(x)).
// WGSL has no erf: erf_approx below has absolute error < 1.5e-7 (Abramowitz & Stegun 7.1.26).
// Layout: elementwise over `count` f32 values (any tensor shape).
// Bindings: 0 uniform EltShape, 1 x, 2 dy (backward only), 3 out (y or dx).
// Grid: 1-D over count (2-D if count > 65535 * WG).

const WG: u32 = 256u;
const INV_SQRT2: f32 = 0.7071067811865476;
const INV_SQRT_2PI: f32 = 0.3989422804014327;

struct EltShape { count: u32, _p0: u32, _p1: u32, _p2: u32 }

// Storage element types: f32, or f16 for a binding that main.ts binds to an f16 tensor (--precision
// f16: it compiles this file with `enable f16;` and that alias set to f16). Loads convert to f32 and
// stores back, so all arithmetic and accumulation stays f32.
alias X_T = f32;
alias DY_T = f32;
alias OUT_T = f32;

@group(0) @binding(0) var<uniform> s: EltShape;
@group(0) @binding(1) var<storage, read> x: array<X_T>;
@group(0) @binding(2) var<storage, read> dy: array<DY_T>;
@group(0) @binding(3) var<storage, read_write> out: array<OUT_T>;

fn erf_approx(v: f32) -> f32 {
  let a = abs(v);
  let t = 1.0 / (1.0 + 0.3275911 * a);
  let poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))));
  return sign(v) * (1.0 - poly * exp(-a * a));
}

fn normal_cdf(v: f32) -> f32 { return 0.5 * (1.0 + erf_approx(v * INV_SQRT2)); }

@compute @workgroup_size(WG)
fn gelu_forward(@builtin(global_invocation_id) g: vec3u, @builtin(num_workgroups) nw: vec3u) {
  let i = g.x + g.y * nw.x * WG;
  if (i >= s.count) { return; }
  let v = f32(x[i]);
  out[i] = OUT_T(v * normal_cdf(v));
}

@compute @workgroup_size(WG)
fn gelu_backward(@builtin(global_invocation_id) g: vec3u, @builtin(num_workgroups) nw: vec3u) {
  let i = g.x + g.y * nw.x * WG;
  if (i >= s.count) { return; }
  let v = f32(x[i]);
  out[i] = OUT_T(f32(dy[i]) * (normal_cdf(v) + v * INV_SQRT_2PI * exp(-0.5 * v * v)));
}
