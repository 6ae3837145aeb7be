"""Golden fixtures for the Muon optimiser's GPU ops (tests/muon.test.ts): PyTorch in float64, fixed seeds.

Requires PyTorch (Debian's 1.13 is enough):  apt-get install python3-torch
Run from the repository root:                /usr/bin/python3 tests/golden/muon_fixtures.py
Writes tests/golden/muon.json (about 200 kB); the test only reads it, so rerun this only to change the cases.

What it computes, as airbench94_muon.py (KellerJordan/cifar10-airbench, MIT) does, but in float64 where the
original runs Newton-Schulz in bfloat16, so that the fixture is the exact mathematics and the f32 GPU result is
compared with it:
- newton_schulz: zeropower_via_newtonschulz5 (quintic, (a, b, c) = (3.4445, -4.7750, 2.0315), 3 steps, X / (||X||_F
  + 1e-7), transposed when it has more rows than columns) on small rectangular matrices of both orientations, with
  odd sizes on each side of the GPU kernel's 32 x 32 tiles. Row-major [rows][cols].
- muon_step: one step of Muon (Nesterov momentum 0.6, the weight renormalised to norm sqrt(out channels), the update
  NS(g') of g' reshaped to [out, in * 3 * 3], lr 0.24) on a conv weight with a non-zero momentum buffer. It is
  computed in PyTorch's layout [out][in][kh][kw] and every array is written in main.ts's layout, HWIO
  [kh][kw][in][out], so the test compares flat arrays.
Inputs are rounded to 7 significant digits before any arithmetic, so the JSON holds exactly what was computed from
(f32 rounds them again by at most 6e-8 relative); outputs are written to 9 significant digits, far below f32's error.
"""

import json
import os

import torch

A, B, C = 3.4445, -4.7750, 2.0315
STEPS = 3
EPS = 1e-7
LR, MOMENTUM = 0.24, 0.6


def zeropower(G, steps=STEPS, eps=EPS):
    """The original's zeropower_via_newtonschulz5, in float64 instead of bfloat16."""
    X = G.double().clone()
    X /= X.norm() + eps
    tall = G.size(0) > G.size(1)
    if tall:
        X = X.T
    for _ in range(steps):
        A_ = X @ X.T
        B_ = B * A_ + C * A_ @ A_
        X = A * X + B_ @ X
    if tall:
        X = X.T
    return X


def muon_step(p, grad, buf, lr=LR, momentum=MOMENTUM):
    """The original's Muon.step for one parameter (nesterov=True), out of place."""
    buf = buf * momentum + grad
    g = grad + momentum * buf
    p = p * (len(p) ** 0.5 / p.norm())
    update = zeropower(g.reshape(len(g), -1)).view(g.shape)
    return p - lr * update, buf, update


def inputs(gen, shape, scale=1.0):
    """Normal values x scale, rounded to 7 significant digits (what the JSON holds is what is computed from)."""
    x = torch.randn(*shape, generator=gen, dtype=torch.float64) * scale
    return torch.tensor([float(f"{v:.7g}") for v in x.flatten().tolist()], dtype=torch.float64).view(shape)


def values(t, digits=9):
    return [float(f"{v:.{digits}g}") for v in t.flatten().tolist()]


def hwio(t):
    """[out][in][kh][kw] (PyTorch) -> [kh][kw][in][out] (main.ts)."""
    return t.permute(2, 3, 1, 0).contiguous()


def main():
    gen = torch.Generator().manual_seed(18)
    cases = []
    # wide and tall twins (the transposed path), near-square with partial tiles on both sides, a tall matrix
    # narrower than one tile, and a tiny scale (the normalisation, not the input's size, sets the result)
    for rows, cols, scale in [(5, 37, 1.0), (37, 5, 1.0), (33, 65, 0.01), (130, 21, 3.0), (3, 3, 1e-3)]:
        g = inputs(gen, (rows, cols), scale)
        cases.append({"rows": rows, "cols": cols, "g": values(g), "out": values(zeropower(g))})

    out_c, in_c = 17, 6  # a conv weight [17, 6, 3, 3]: G is [17, 54], our matrix [54, 17]
    p = inputs(gen, (out_c, in_c, 3, 3), 0.2)
    grad = inputs(gen, (out_c, in_c, 3, 3), 0.05)
    buf = inputs(gen, (out_c, in_c, 3, 3), 0.05)
    p_out, buf_out, update = muon_step(p, grad, buf)
    step = {
        "shape": [3, 3, in_c, out_c],
        "lr": LR,
        "momentum": MOMENTUM,
        "p": values(hwio(p)),
        "grad": values(hwio(grad)),
        "buf": values(hwio(buf)),
        "p_out": values(hwio(p_out)),
        "buf_out": values(hwio(buf_out)),
        "update": values(hwio(update)),
    }

    fixture = {
        "about": "written by tests/golden/muon_fixtures.py (PyTorch float64); row-major arrays, conv weights HWIO",
        "torch": torch.__version__,
        "coefficients": [A, B, C],
        "steps": STEPS,
        "eps": EPS,
        "newton_schulz": cases,
        "muon_step": step,
    }
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "muon.json")
    with open(path, "w") as f:
        json.dump(fixture, f, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {path} ({os.path.getsize(path)} bytes)")


if __name__ == "__main__":
    main()
