"""Cross-check of the WGSL network against PyTorch's own ops (optional, needs python3-torch).

Loads a network saved by `deno run -A main.ts --save FILE.safetensors`, rebuilds the hlb-CIFAR10
forward pass from SPEC.md with torch.nn.functional (conv2d, max_pool2d, batch_norm in eval mode,
exact GELU, global max, linear x 1/9, flip TTA by logit averaging, cross-entropy with label
smoothing 0.2), and prints the test accuracy and loss, to compare with
`deno run -A main.ts --eval FILE.safetensors` on the same data. Nothing here is shared with
main.ts: it reads only the saved tensors and the dataset.

    python3 bench/torch_check.py FILE.safetensors CIFAR10_DIR [--test-subset N]
"""

import argparse
import json
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def read_safetensors(path):
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    body = raw[8 + n :]
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        assert t["dtype"] == "F32", f"{name}: {t['dtype']}"
        a, b = t["data_offsets"]
        out[name] = torch.from_numpy(np.frombuffer(body[a:b], dtype="<f4").reshape(t["shape"]).copy())
    return out


def read_split(folder, files):
    records = np.concatenate([np.fromfile(Path(folder) / f, dtype=np.uint8).reshape(-1, 3073) for f in files])
    labels = torch.from_numpy(records[:, 0].astype(np.int64))
    images = torch.from_numpy(records[:, 1:].reshape(-1, 3, 32, 32).astype(np.float32) / 255.0)
    return images, labels


def forward(w, x):
    """The network in NCHW; our conv weights are HWIO [kh][kw][cin][cout], PyTorch's OIHW."""
    conv = lambda x, name, pad: F.conv2d(x, w[name].permute(3, 2, 0, 1), padding=pad)
    bn = lambda x, name: F.batch_norm(
        x, w[f"{name}.running_mean"], w[f"{name}.running_var"], w[f"{name}.weight"], w[f"{name}.bias"],
        training=False, eps=1e-12,
    )
    x = F.gelu(conv(x, "initial_block.whiten.weight", 0))  # exact (erf) GELU is torch's default
    for g in ["conv_group_1", "conv_group_2", "conv_group_3"]:
        x = F.gelu(bn(F.max_pool2d(conv(x, f"{g}.conv1.weight", 1), 2), f"{g}.norm1"))
        x = F.gelu(bn(conv(x, f"{g}.conv2.weight", 1), f"{g}.norm2"))
    x = torch.amax(x, dim=(2, 3))
    return F.linear(x, w["linear.weight"] * (1.0 / 9))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("weights")
    p.add_argument("data")
    p.add_argument("--test-subset", type=int, default=10000)
    a = p.parse_args()
    w = read_safetensors(a.weights)
    train_x, _ = read_split(a.data, [f"data_batch_{i}.bin" for i in range(1, 6)])
    mean = train_x.mean(dim=(0, 2, 3), dtype=torch.float64)
    std = train_x.double().std(dim=(0, 2, 3))  # n - 1, as torch.std and main.ts
    test_x, test_y = read_split(a.data, ["test_batch.bin"])
    test_x, test_y = test_x[: a.test_subset], test_y[: a.test_subset]
    test_x = ((test_x.double() - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)).float()
    correct, loss_sum = 0, 0.0
    with torch.no_grad():
        for i in range(0, len(test_x), 500):
            x, y = test_x[i : i + 500], test_y[i : i + 500]
            logits = 0.5 * forward(w, x) + 0.5 * forward(w, torch.flip(x, (-1,)))
            loss_sum += F.cross_entropy(logits, y, label_smoothing=0.2, reduction="sum").item()
            correct += (logits.argmax(-1) == y).sum().item()
    n = len(test_x)
    print(f"PyTorch {torch.__version__}: test accuracy {100 * correct / n:.2f}% | test loss {loss_sum / n:.4f} | {n} images, flip TTA")


if __name__ == "__main__":
    main()
