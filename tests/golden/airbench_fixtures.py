"""Golden fixtures for the airbench94 network, its TTA, pooling and SGD: PyTorch in float64 on the CPU, fixed seeds.

Requires PyTorch (Debian's 1.13 is enough):  apt-get install python3-torch
Run from the repository root:                /usr/bin/python3 tests/golden/airbench_fixtures.py
Writes tests/golden/airbench.json (about 330 kB); tests only read it, so rerun this only to change the cases.

What it computes is what airbench94_muon.py (KellerJordan/cifar10-airbench, MIT) computes, in float64 where the
original runs in float16/bfloat16, so each fixture is the exact mathematics. Its CifarNet, at base depth D (widths D,
4D, 4D): whitening conv 2x2 (3 -> 24, bias, no padding) -> GELU (erf) -> 3 x [conv 3x3 "same", no bias -> MaxPool2d(2)
-> BatchNorm -> GELU -> conv 3x3 -> BatchNorm -> GELU] -> MaxPool2d(3) -> flatten -> linear (no bias) / 4D.
BatchNorm: eps 1e-12, weight frozen at 1, training mode normalises by the batch's biased variance and updates
running = 0.6 running + 0.4 batch (PyTorch momentum 0.4), with the unbiased variance for running_var.
Spatial sizes of a 32 x 32 image: 32 -> 31 (2x2 unpadded conv) -> 15 -> 7 -> 3 -> 1. Each MaxPool2d(2) floors an odd
side, so the last row and column of every conv1 output are never read. The final map is 3 x 3 and MaxPool2d(3) reads
all of it: a global max (not the top-left 3 x 3 of a 4 x 4 map; "maxpool3" covers both so either port can be checked).
Loss: F.cross_entropy(logits, labels, label_smoothing=0.2, reduction="sum"), i.e. per image
0.8 * -log p[label] + 0.2 * mean over the 10 classes of -log p.

Cases (keys of the JSON); every array is {"shape", "data"}, data flat in our layout: images and activations NHWC
[n][h][w][c], conv weights HWIO [kh][kw][in][out] (PyTorch's [out][in][kh][kw] permuted (2, 3, 1, 0)), linear [out][in]:
- network: D = 2, batch 4, a random state (not the init; the head's rows centred so that predictions differ), one
  training-mode forward and backward: logits, summed loss, pooled features [4, 4D], the gradient of every trainable
  tensor (the whitening bias's through the first GELU), and the running stats after the forward.
- network_eval: the same state with the running stats of "network" (rounded to 7 digits), eval mode, same images.
- tta2: airbench's infer() at TTA levels 0, 1, 2 on 5 images given as raw CIFAR bytes (binary file layout, per image
  [3][32][32] uint8), normalised by (v / 255 - mean[c]) / std[c]; the 6 views' logits, combined logits, losses, argmax.
- maxpool3: F.max_pool2d(x, 3) forward and backward on a 4 x 4 and a 3 x 3 map.
- sgd_groups: torch.optim.SGD(momentum 0.85, nesterov) with airbench's three parameter groups, 3 steps and a step
  after the whitening bias is frozen (its grad is None: SGD skips it, though its group lr has gone negative).
- schedule: each group's lr at each step, as the training loop sets it before opt.step().
Inputs are rounded to 7 significant digits before any arithmetic, so the JSON holds exactly what was computed from;
outputs are written to 9 significant digits.
"""

import json
import os

import torch
import torch.nn.functional as F

torch.set_default_dtype(torch.float64)

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
BN_EPS, BN_MOMENTUM = 1e-12, 0.4  # airbench's BatchNorm(momentum=0.6) passes 1 - 0.6 to PyTorch
LABEL_SMOOTHING = 0.2
WHITEN_OUT = 2 * 3 * 2**2  # 12 eigen-filters and their negations
GROUPS = ["conv_group_1", "conv_group_2", "conv_group_3"]
BIAS_LR, HEAD_LR, MUON_LR, SGD_MOMENTUM = 0.053, 0.67, 0.24, 0.85
SGD_BATCH, T, TW = 500, 40, 15  # wd = 2e-6 * batch; T total steps, TW whitening-bias steps
WD = 2e-6 * SGD_BATCH


def inputs(gen, shape, scale=1.0):
    """Normal values x scale, rounded to 7 significant digits (what the JSON holds is what is computed from)."""
    return rounded(torch.randn(*shape, generator=gen) * scale)


def rounded(t, digits=7):
    return torch.tensor([float(f"{v:.{digits}g}") for v in t.flatten().tolist()]).view(t.shape)


def values(t, digits=9):
    return [float(f"{v:.{digits}g}") for v in t.flatten().tolist()]


def ours(t):
    """PyTorch layout -> ours: 4-d weights OIHW -> HWIO; 4-d activations go through nhwc() instead."""
    return t.permute(2, 3, 1, 0) if t.dim() == 4 else t


def nhwc(t):
    return t.permute(0, 2, 3, 1)


def arr(t, digits=9):
    return {"shape": list(t.shape), "data": values(t.contiguous(), digits)}


def widths(depth):
    return [depth, 4 * depth, 4 * depth]


def random_state(gen, depth):
    """A random state, PyTorch layout, our names. Scales keep every GELU in its curved region and logits O(1)."""
    P = {"initial_block.whiten.weight": inputs(gen, (WHITEN_OUT, 3, 2, 2), 0.5),
         "initial_block.whiten.bias": inputs(gen, (WHITEN_OUT,), 0.3)}
    cin = WHITEN_OUT
    for g, c in zip(GROUPS, widths(depth)):
        P[f"{g}.conv1.weight"] = inputs(gen, (c, cin, 3, 3), (9 * cin) ** -0.5)
        P[f"{g}.conv2.weight"] = inputs(gen, (c, c, 3, 3), (9 * c) ** -0.5)
        for n in ("norm1", "norm2"):
            P[f"{g}.{n}.weight"] = torch.ones(c)  # frozen at PyTorch's init in airbench
            P[f"{g}.{n}.bias"] = inputs(gen, (c,), 0.3)
            P[f"{g}.{n}.running_mean"] = torch.zeros(c)
            P[f"{g}.{n}.running_var"] = torch.ones(c)
        cin = c
    # features are maxima of GELUs, so mostly positive and alike: centre each row, or the row with the largest sum
    # wins for every image and argmax checks nothing
    w = torch.randn(10, cin, generator=gen)
    P["linear.weight"] = rounded(w - w.mean(1, keepdim=True))
    return P


def trainable(P):
    return [n for n in P if n in ("initial_block.whiten.bias", "linear.weight")
            or n.endswith((".conv1.weight", ".conv2.weight", ".norm1.bias", ".norm2.bias"))]


def forward(P, x, train, trace=None):
    """airbench's CifarNet.forward on NCHW x. In training mode F.batch_norm updates P's running stats in place."""
    def norm(x, name):
        return F.batch_norm(x, P[f"{name}.running_mean"], P[f"{name}.running_var"], P[f"{name}.weight"],
                            P[f"{name}.bias"], training=train, momentum=BN_MOMENTUM, eps=BN_EPS)

    sides = [x.shape[-1]]
    x = F.gelu(F.conv2d(x, P["initial_block.whiten.weight"], P["initial_block.whiten.bias"]))
    sides.append(x.shape[-1])
    for g in GROUPS:
        x = F.max_pool2d(F.conv2d(x, P[f"{g}.conv1.weight"], padding=1), 2)  # padding 1 is "same" for 3x3
        sides.append(x.shape[-1])
        x = F.gelu(norm(x, f"{g}.norm1"))
        x = F.gelu(norm(F.conv2d(x, P[f"{g}.conv2.weight"], padding=1), f"{g}.norm2"))
    x = F.max_pool2d(x, 3)
    sides.append(x.shape[-1])
    features = x.reshape(len(x), -1)
    if trace is not None:
        trace.update(sides=sides, features=features)
    return F.linear(features, P["linear.weight"]) / features.size(-1)


def network_cases(gen, depth=2, batch=4):
    P = random_state(gen, depth)
    state_in = {n: arr(ours(t)) for n, t in P.items()}
    images = inputs(gen, (batch, 3, 32, 32))
    labels = torch.randint(0, 10, (batch,), generator=gen)
    for n in trainable(P):
        P[n].requires_grad_(True)
    trace = {}
    logits = forward(P, images, train=True, trace=trace)
    loss = F.cross_entropy(logits, labels, label_smoothing=LABEL_SMOOTHING, reduction="sum")
    loss.backward()
    assert trace["sides"] == [32, 31, 15, 7, 3, 1], trace["sides"]
    assert all(P[n].grad.abs().max() > 0 for n in trainable(P))
    running = [n for n in P if "running" in n]
    network = {
        "base_depth": depth, "widths": widths(depth), "bn_eps": BN_EPS, "bn_momentum": BN_MOMENTUM,
        "label_smoothing": LABEL_SMOOTHING, "spatial_sides": trace["sides"],
        "inputs": {"images": arr(nhwc(images)), "labels": labels.tolist(), "state": state_in},
        "logits": arr(logits.detach()), "loss": float(f"{loss.item():.9g}"),
        "features": arr(trace["features"].detach()),
        "grads": {n: arr(ours(P[n].grad)) for n in trainable(P)},
        "running_after": {n: arr(P[n]) for n in running},
    }

    # eval mode on the updated running stats, rounded so the JSON holds exactly what eval used
    P = {n: t.detach() for n, t in P.items()}
    for n in running:
        P[n] = rounded(P[n])
    with torch.no_grad():
        eval_logits = forward(P, images, train=False)
    network_eval = {"running_stats": {n: arr(P[n]) for n in running}, "logits": arr(eval_logits),
                    "about": "state and images as network.inputs, running stats replaced by these"}
    return network, network_eval, P


def tta_case(gen, P, n=5):
    # uniform noise images all look alike to a random network (every prediction the same class): give each image
    # its own colour and left-right / up-down gradients, with noise, so the views and predictions differ
    ramp = torch.linspace(-1, 1, 32)
    colour, slopes = torch.rand(n, 3, 1, 1, generator=gen) * 255, torch.randn(n, 3, 2, generator=gen) * 80
    raw = colour + slopes[..., :1, None] * ramp.view(1, 1, 32, 1) + slopes[..., 1:, None] * ramp.view(1, 1, 1, 32)
    raw = (raw + torch.randn(n, 3, 32, 32, generator=gen) * 20).round().clamp(0, 255).to(torch.uint8)
    labels = torch.randint(0, 10, (n,), generator=gen)
    mean, std = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    x = (raw.double() / 255 - mean) / std
    padded = F.pad(x, (1, 1, 1, 1), "reflect")
    # crop windows at offsets 0 and 2 of the reflect-padded image: the image moves 1 px down-right / up-left
    crops = [x, padded[:, :, 0:32, 0:32], padded[:, :, 2:34, 2:34]]
    with torch.no_grad():
        views = [forward(P, v, train=False) for c in crops for v in (c, c.flip(-1))]  # flip(-1): left-right
    mirror = [0.5 * views[i] + 0.5 * views[i + 1] for i in (0, 2, 4)]  # infer_mirror of each crop
    tta = 0.5 * mirror[0] + 0.5 * torch.stack(mirror[1:]).mean(0)
    losses = F.cross_entropy(tta, labels, label_smoothing=LABEL_SMOOTHING, reduction="none")
    return {
        "bytes": raw.flatten().tolist(), "bytes_layout": "per image [3][32][32] uint8, as in the CIFAR binary files",
        "labels": labels.tolist(), "mean": CIFAR_MEAN, "std": CIFAR_STD,
        "normalised_first_image": arr(nhwc(x[:1])),
        "view_order": ["none", "flip", "up-left", "up-left flipped", "down-right", "down-right flipped"],
        "views": [arr(v) for v in views],
        "level0": arr(views[0]), "level1": arr(mirror[0]), "level2": arr(tta),
        "losses": arr(losses), "predictions": tta.argmax(1).tolist(),
        "about": ("eval mode, the state of network_eval; views named by crop window of the reflect-padded image: "
                  "up-left = padded[0:32, 0:32] (content moves 1 px down-right), down-right = padded[2:34, 2:34]"),
    }


def maxpool3_case(gen):
    out = {}
    for side in (4, 3):
        x = inputs(gen, (2, 5, side, side)).requires_grad_(True)  # NCHW
        assert len(set(x.flatten().tolist())) == x.numel()  # no ties: the argmax, hence dx, is unique
        y = F.max_pool2d(x, 3)
        dy = inputs(gen, y.shape)
        y.backward(dy)
        out[f"{side}x{side}"] = {"x": arr(nhwc(x.detach())), "y": arr(nhwc(y.detach())), "dy": arr(nhwc(dy)),
                                 "dx": arr(nhwc(x.grad))}
    out["about"] = "kernel 3, stride 3, no padding: a 4x4 map gives 1x1 from its top-left 3x3 window only"
    return out


def lr_at(group, s):
    """The training loop's schedule: linear decay to 0 at TW (whitening bias) or T (the rest) steps."""
    lr0 = {"whiten_bias": BIAS_LR, "norm_biases": BIAS_LR, "head": HEAD_LR, "muon_filters": MUON_LR}[group]
    return lr0 * (1 - s / (TW if group == "whiten_bias" else T))


def sgd_case(gen, depth=2):
    names = [["initial_block.whiten.bias"],
             [f"{g}.{n}.bias" for g in GROUPS for n in ("norm1", "norm2")],
             ["linear.weight"]]
    shapes = {"initial_block.whiten.bias": (WHITEN_OUT,), "linear.weight": (10, widths(depth)[2])}
    shapes.update({n: (widths(depth)[i // 2],) for i, n in enumerate(names[1])})
    params = {n: torch.nn.Parameter(inputs(gen, shapes[n], 0.5)) for n in shapes}
    initial = {n: arr(p.detach()) for n, p in params.items()}
    opt = torch.optim.SGD([dict(params=[params[n] for n in names[0]], lr=BIAS_LR, weight_decay=WD / BIAS_LR),
                           dict(params=[params[n] for n in names[1]], lr=BIAS_LR, weight_decay=WD / BIAS_LR),
                           dict(params=[params[n] for n in names[2]], lr=HEAD_LR, weight_decay=WD / HEAD_LR)],
                          momentum=SGD_MOMENTUM, nesterov=True)
    for group in opt.param_groups:
        group["initial_lr"] = group["lr"]
    steps = []
    for s, frozen in [(0, False), (1, False), (2, False), (20, True)]:
        for n, p in params.items():
            p.grad = None if frozen and n in names[0] else inputs(gen, p.shape, 0.1)
        before = {n: (p.detach().clone(), opt.state[p].get("momentum_buffer", torch.empty(0)).clone())
                  for n, p in params.items()}
        # as the training loop: lrs set before step(); the whitening group's lr goes negative past TW, but its grad
        # is None there (the forward detaches the bias), so SGD skips it: no decay, no momentum, no update
        opt.param_groups[0]["lr"] = opt.param_groups[0]["initial_lr"] * (1 - s / TW)
        for group in opt.param_groups[1:]:
            group["lr"] = group["initial_lr"] * (1 - s / T)
        opt.step()
        if frozen:
            w = params[names[0][0]]
            assert torch.equal(w.detach(), before[names[0][0]][0])
            assert torch.equal(opt.state[w]["momentum_buffer"], before[names[0][0]][1])
        steps.append({
            "s": s, "frozen_whiten_bias": frozen, "lrs": [g["lr"] for g in opt.param_groups],
            "grads": {n: None if p.grad is None else arr(p.grad) for n, p in params.items()},
            "params": {n: arr(p.detach()) for n, p in params.items()},
            "momentum_buffers": {n: arr(opt.state[p]["momentum_buffer"]) for n, p in params.items()},
        })
    return {
        "batch_size": SGD_BATCH, "wd": WD, "momentum": SGD_MOMENTUM, "nesterov": True, "T": T, "Tw": TW,
        "groups": [{"params": names[i], "initial_lr": lr, "weight_decay": WD / lr}
                   for i, lr in enumerate((BIAS_LR, BIAS_LR, HEAD_LR))],
        "initial_params": initial, "steps": steps,
        "update": ("PyTorch SGD, weight_decay = wd / lr0, lr_t set per step: g = grad + (wd / lr0) p; "
                   "buf = 0.85 buf + g (buf = g at the first step); p -= lr_t (g + 0.85 buf). So p shrinks by "
                   "(lr_t / lr0) wd p through g, 1.85x at once and the rest as buf decays; at lr_t = lr0 that is "
                   "wd = 2e-6 * batch, independent of the group's lr. A grad of None skips p entirely."),
        "about": "steps 0-2 then s = 20 >= Tw, where the whitening bias grad is None (its lr would be negative)",
    }


def schedule_case():
    return {"T": T, "Tw": TW, "lrs": {
        "whiten_bias": [lr_at("whiten_bias", s) for s in range(TW)],  # frozen from step TW on
        **{g: [lr_at(g, s) for s in range(T)] for g in ("norm_biases", "head", "muon_filters")}}}


def main():
    gen = torch.Generator().manual_seed(94)
    network, network_eval, P_eval = network_cases(gen)
    fixture = {
        "about": "written by tests/golden/airbench_fixtures.py (PyTorch float64); NHWC activations, HWIO conv weights",
        "torch": torch.__version__,
        "network": network,
        "network_eval": network_eval,
        "tta2": tta_case(gen, P_eval),
        "maxpool3": maxpool3_case(gen),
        "sgd_groups": sgd_case(gen),
        "schedule": schedule_case(),
    }
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "airbench.json")
    with open(path, "w") as f:
        json.dump(fixture, f, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {path} ({os.path.getsize(path)} bytes)")


if __name__ == "__main__":
    main()
