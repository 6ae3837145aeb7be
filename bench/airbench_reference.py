"""The reference side of issue 18's "distribution against the original": runs the pinned
airbench94_muon.py (KellerJordan/cifar10-airbench at f1c599c, MIT; ../shared/peers/, README beside it)
itself, on the CPU in fp32, at a reduced size taken from the environment.

The original is not copied here. This script reads its text, applies the exact string replacements
listed in PATCHES below (each must match exactly once, or the script stops with an error naming it),
executes the result as a module, and then does the runs itself in place of the original's
`if __name__ == "__main__":` block (which does not run: the module is executed under another name).

What changes, and why (one line each; the PATCHES list says the same next to each replacement):
  1. `import torchvision` / `torchvision.transforms as T` -> a four-line `T.Normalize`: the only
     torchvision use left once the download is gone; no torchvision install needed.
  2. `@torch.compile` on Newton-Schulz removed: no compiler on the CPU (and torch 1.13 has none).
  3. Newton-Schulz's `G.bfloat16()` -> `G.float().clone()`: f32 instead of bf16; the clone keeps the
     original's copy (bfloat16() always copied, and X is divided in place next).
  4. CifarLoader's torchvision download + torch.load(map_location="cuda") -> read the binary
     CIFAR-10 folder (CIFAR10_DIR), building the same tensors as the original's train.pt/test.pt
     (uint8 NHWC images, int64 labels, class names), cut to the first N records in file order.
  5. `self.images.half()` -> `.float()`, `.to(memory_format=torch.channels_last)` dropped (kept with
     CHANNELS_LAST=1): f32, and the plain layout.
  6. CifarNet widths 64/256/256 -> D/4D/4D with D = BASE_DEPTH (default 64: the original).
  7. `mod.half()` -> `mod.float()`: the model in f32 (the original keeps all but batch norm in fp16).
  8. `batch_size = 2000` -> BATCH_SIZE; the weight decay follows through the original's own line
     `wd = 2e-6 * batch_size`, unchanged.
  9. `ceil(8 * len(train_loader))` -> EPOCHS: the epoch loop runs ceil(total_train_steps /
     len(train_loader)) epochs, so it follows. `whiten_bias_train_steps = ceil(3 * len(...))` stays.
 10. `fused=True` dropped from the SGD: fused SGD is CUDA-only (and absent from torch 1.13).
 11. The CUDA event timer -> time.perf_counter(): same start/stop points, so time_seconds still
     counts whitening init + training + the final TTA evaluation, not the per-epoch evaluations.
 12. `return tta_val_acc` -> `return tta_val_acc, time_seconds`: to report each run's time.
 13. init_whiten's patches `.float()` -> `.double()`: the 2x2 patch covariance and its eigh in f64 (the
     result is stored into the f32 whitening weight). Debian's torch uses the generic reference BLAS,
     whose f32 matmul sums the 4.8M patches of 5,000 images one by one: the covariance comes out with
     a smallest eigenvalue of -5.3e-4 (f64: +5.7e-4, entries off by up to 5e-3), below -eps = -5e-4,
     so sqrt gives NaN and every run trains on NaN (seen at TRAIN_SUBSET=10000; 2,000 images pass).
     A GPU's blocked f32 reduction does not drift like this; f64 stands in for it.
The runs (below, replacing the original's main block): the model is built once and reused across runs
as the original does (main() calls model.reset()), but without .cuda(), channels_last (unless
CHANNELS_LAST=1) or model.compile(); the "warmup" run (which only warms up the compiled model, on random labels) is
skipped; torch.manual_seed(seed) is set before each run (the original sets no seed); the original's
final `logs/<uuid>/log.pt` save is skipped; the original's table is printed, then a Mean/Std line as
the original prints, then one JSON line.

Install (Debian): python3-torch (1.13) and python3-numpy, e.g.
    DEBIAN_FRONTEND=noninteractive apt-get install -y python3-torch python3-numpy
(torchvision is not needed.)

Command line (from the repository root; the values here are an example reduced configuration):
    TRAIN_SUBSET=10000 TEST_SUBSET=2000 EPOCHS=8 BATCH_SIZE=500 BASE_DEPTH=16 RUNS=8 SEED=1 \
        /usr/bin/python3 bench/airbench_reference.py

Environment (defaults: the original's full configuration, one run):
    CIFAR10_DIR   the binary CIFAR-10 folder (data_batch_1..5.bin, test_batch.bin; each record is 1 label
                  byte + 3072 CHW bytes, 10000 records per file)
                  (default: ../shared/data/cifar-10-batches-bin relative to the repository root)
    AIRBENCH_PY   the original script (default: ../shared/peers/airbench94_muon.py relative to the repo)
    TRAIN_SUBSET  first N training images in file order (default 50000)
    TEST_SUBSET   first N test images in file order (default 10000)
    EPOCHS        the 8 of ceil(8 * len(train_loader)); may be fractional (default 8)
    BATCH_SIZE    the training batch (default 2000); wd = 2e-6 * BATCH_SIZE as in the original
    BASE_DEPTH    D: widths D, 4D, 4D (default 64, the original's 64/256/256)
    RUNS          number of runs (default 1)
    SEED          seed of the first run; run i uses SEED + i (default 1)
    THREADS       torch.set_num_threads (default 2)
    CHANNELS_LAST 1 keeps the original's channels_last layout of the model and the test images (default 0:
                  dropped). A memory layout only, the same f32 arithmetic up to summation order; on this
                  CPU (torch 1.13) the network's forward + backward ran about twice as fast with it.
"""

import json
import os
import sys
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def env_int(name, default):
    return int(os.environ.get(name, default))


CIFAR10_DIR = os.environ.get("CIFAR10_DIR", os.path.join(REPO, "..", "shared", "data", "cifar-10-batches-bin"))
AIRBENCH_PY = os.environ.get("AIRBENCH_PY", os.path.join(REPO, "..", "shared", "peers", "airbench94_muon.py"))
TRAIN_SUBSET = env_int("TRAIN_SUBSET", 50000)
TEST_SUBSET = env_int("TEST_SUBSET", 10000)
EPOCHS = float(os.environ.get("EPOCHS", 8))
BATCH_SIZE = env_int("BATCH_SIZE", 2000)
BASE_DEPTH = env_int("BASE_DEPTH", 64)
RUNS = env_int("RUNS", 1)
SEED = env_int("SEED", 1)
THREADS = env_int("THREADS", 2)
CHANNELS_LAST = env_int("CHANNELS_LAST", 0) == 1

torch.set_num_threads(THREADS)


def load_cifar_bin(train):
    """The dict the original saves as train.pt / test.pt from torchvision's CIFAR10: images as uint8
    [N, 32, 32, 3] (NHWC, as torchvision's dset.data), labels as int64 [N], and the class names.
    Read from the binary release, first TRAIN_SUBSET / TEST_SUBSET records in file order."""
    files = [f"data_batch_{i}.bin" for i in range(1, 6)] if train else ["test_batch.bin"]
    limit = TRAIN_SUBSET if train else TEST_SUBSET
    records = np.concatenate([np.fromfile(os.path.join(CIFAR10_DIR, f), dtype=np.uint8).reshape(-1, 3073) for f in files])
    assert 1 <= limit <= len(records), f"subset {limit} out of range 1..{len(records)}"
    records = records[:limit]
    labels = torch.from_numpy(records[:, 0].astype(np.int64))
    # each record stores the image as CHW; the original expects NHWC and permutes it back itself
    images = torch.from_numpy(np.ascontiguousarray(records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)))
    with open(os.path.join(CIFAR10_DIR, "batches.meta.txt")) as f:
        classes = [line.strip() for line in f if line.strip()]
    return {"images": images, "labels": labels, "classes": classes}


# (reason, exact text in the original, replacement). Each must occur exactly once.
PATCHES = [
    (
        "1. no torchvision: T.Normalize is its only use once the download is gone",
        "import torchvision\nimport torchvision.transforms as T\n",
        "class T:  # torchvision.transforms.Normalize on a float tensor [..., C, H, W], no torchvision\n"
        "    class Normalize:\n"
        "        def __init__(self, mean, std): self.mean, self.std = torch.as_tensor(mean), torch.as_tensor(std)\n"
        "        def __call__(self, x): return (x - self.mean.to(x.dtype).view(-1, 1, 1)) / self.std.to(x.dtype).view(-1, 1, 1)\n",
    ),
    (
        "2. no torch.compile (CPU; torch 1.13 has none)",
        "@torch.compile\ndef zeropower_via_newtonschulz5",
        "def zeropower_via_newtonschulz5",
    ),
    (
        "3. Newton-Schulz in f32 instead of bf16; clone keeps bfloat16()'s copy (X is divided in place)",
        "    X = G.bfloat16()\n",
        "    X = G.float().clone()\n",
    ),
    (
        "4. data from the binary CIFAR-10 folder (CIFAR10_DIR, subsets) instead of torchvision + cuda load",
        '        data_path = os.path.join(path, "train.pt" if train else "test.pt")\n'
        "        if not os.path.exists(data_path):\n"
        "            dset = torchvision.datasets.CIFAR10(path, download=True, train=train)\n"
        "            images = torch.tensor(dset.data)\n"
        "            labels = torch.tensor(dset.targets)\n"
        '            torch.save({"images": images, "labels": labels, "classes": dset.classes}, data_path)\n'
        "\n"
        '        data = torch.load(data_path, map_location=torch.device("cuda"))\n',
        "        data = load_cifar_bin(train)\n",
    ),
    (
        "5. images in f32; channels_last dropped unless CHANNELS_LAST=1",
        "        self.images = (self.images.half() / 255).permute(0, 3, 1, 2).to(memory_format=torch.channels_last)\n",
        "        self.images = (self.images.float() / 255).permute(0, 3, 1, 2)"
        + (".to(memory_format=torch.channels_last)" if CHANNELS_LAST else "") + "\n",
    ),
    (
        "6. widths D, 4D, 4D from BASE_DEPTH",
        "        widths = dict(block1=64, block2=256, block3=256)\n",
        "        widths = dict(block1=BASE_DEPTH, block2=4*BASE_DEPTH, block3=4*BASE_DEPTH)\n",
    ),
    (
        "7. the model in f32 instead of fp16",
        "                mod.half()\n",
        "                mod.float()\n",
    ),
    (
        "8. batch size from BATCH_SIZE (wd = 2e-6 * batch_size follows, unchanged)",
        "    batch_size = 2000\n",
        "    batch_size = BATCH_SIZE\n",
    ),
    (
        "9. epoch count from EPOCHS (the epoch loop derives from total_train_steps)",
        "    total_train_steps = ceil(8 * len(train_loader))\n",
        "    total_train_steps = ceil(EPOCHS * len(train_loader))\n",
    ),
    (
        "10. no fused SGD (CUDA-only; not in torch 1.13)",
        "momentum=0.85, nesterov=True, fused=True)",
        "momentum=0.85, nesterov=True)",
    ),
    (
        "11. CPU clock instead of CUDA events (same start/stop points)",
        "    starter = torch.cuda.Event(enable_timing=True)\n"
        "    ender = torch.cuda.Event(enable_timing=True)\n"
        "    time_seconds = 0.0\n"
        "    def start_timer():\n"
        "        starter.record()\n"
        "    def stop_timer():\n"
        "        ender.record()\n"
        "        torch.cuda.synchronize()\n"
        "        nonlocal time_seconds\n"
        "        time_seconds += 1e-3 * starter.elapsed_time(ender)\n",
        "    from time import perf_counter\n"
        "    started = 0.0\n"
        "    time_seconds = 0.0\n"
        "    def start_timer():\n"
        "        nonlocal started\n"
        "        started = perf_counter()\n"
        "    def stop_timer():\n"
        "        nonlocal time_seconds\n"
        "        time_seconds += perf_counter() - started\n",
    ),
    (
        "13. whitening covariance in f64: this CPU's f32 sum over ~5M patches goes non-PSD (NaN weights)",
        "        patches = train_images.unfold(2,h,1).unfold(3,w,1).transpose(1,3).reshape(-1,c,h,w).float()\n",
        "        patches = train_images.unfold(2,h,1).unfold(3,w,1).transpose(1,3).reshape(-1,c,h,w).double()\n",
    ),
    (
        "12. return the run's time too, for the JSON line",
        "    return tta_val_acc\n",
        "    return tta_val_acc, time_seconds\n",
    ),
]


def patched_source():
    with open(AIRBENCH_PY) as f:
        src = f.read()
    for reason, old, new in PATCHES:
        n = src.count(old)
        if n != 1:
            sys.exit(f"airbench_reference.py: patch {reason!r} matches {n} times in {AIRBENCH_PY}, not once; stopping")
        src = src.replace(old, new)
    return src


def main():
    # Execute the patched original as a module named airbench94_muon: its `if __name__ == "__main__":`
    # block does not run; the loop below does the runs instead.
    ns = {
        "__name__": "airbench94_muon",
        "__file__": AIRBENCH_PY,
        "load_cifar_bin": load_cifar_bin,
        "BASE_DEPTH": BASE_DEPTH,
        "BATCH_SIZE": BATCH_SIZE,
        "EPOCHS": EPOCHS,
    }
    exec(compile(patched_source(), AIRBENCH_PY, "exec"), ns)

    print(
        f"airbench94_muon.py, patched: cpu f32, threads {THREADS}, train {TRAIN_SUBSET}, test {TEST_SUBSET}, "
        f"epochs {EPOCHS:g}, batch {BATCH_SIZE}, widths {BASE_DEPTH}/{4 * BASE_DEPTH}/{4 * BASE_DEPTH}, "
        f"runs {RUNS} from seed {SEED}, channels_last {int(CHANNELS_LAST)}",
        flush=True,
    )
    # As the original: one model, reused across runs (main() resets its parameters and batch-norm stats),
    # but on the CPU, without channels_last, without model.compile(), and without the "warmup" run.
    model = ns["CifarNet"]()
    if CHANNELS_LAST:
        model = model.to(memory_format=torch.channels_last)
    ns["print_columns"](ns["logging_columns_list"], is_head=True)
    seeds, accs, times, walls = [], [], [], []
    for run in range(RUNS):
        seed = SEED + run
        torch.manual_seed(seed)  # the original sets no seed; here each run is reproducible from its seed
        t0 = time.perf_counter()
        acc, secs = ns["main"](run, model)
        walls.append(time.perf_counter() - t0)
        seeds.append(seed)
        accs.append(acc)
        times.append(secs)
        sys.stdout.flush()
    a = torch.tensor(accs)
    # the original's summary line (std undefined for one run)
    print("Mean: %.4f    Std: %.4f" % (a.mean(), a.std() if len(a) > 1 else float("nan")))
    print(json.dumps({
        "script": "airbench94_muon.py (patched: bench/airbench_reference.py)",
        "train_subset": TRAIN_SUBSET, "test_subset": TEST_SUBSET, "epochs": EPOCHS, "batch_size": BATCH_SIZE,
        "base_depth": BASE_DEPTH, "threads": THREADS, "channels_last": CHANNELS_LAST,
        "seeds": seeds, "tta_val_acc": accs, "time_seconds": times, "wall_seconds": walls,
    }))


if __name__ == "__main__":
    main()
