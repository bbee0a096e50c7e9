"""Times one training step of fedtune's built-in CNN in PyTorch and in fedtune (burn + libtorch)
on the same GPU, and prints both and their ratio.

The PyTorch model mirrors fedtune's `cnn` (common/src/models/cnn.rs): conv 3x3 (16, same) ->
ReLU -> max-pool 2 -> conv 3x3 (32, same) -> ReLU -> max-pool 2 -> linear 1568->128 -> ReLU ->
dropout 0.1 -> linear 128->10; Adam (lr 1e-3), cross-entropy. Each step does what fedtune's
does: copy a normalised batch from host memory to the GPU, forward, backward, optimiser step, and
read the loss back (which synchronises).
"""
import argparse
import gzip
import re
import subprocess
import time

import torch
import torch.nn as nn


def read_idx(path):
    raw = open(path, "rb").read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    rank = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(rank)]
    return torch.frombuffer(bytearray(raw[4 + 4 * rank:]), dtype=torch.uint8).reshape(dims)


class Cnn(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(32 * 7 * 7, 128)
        self.dropout = nn.Dropout(0.1)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = self.dropout(torch.relu(self.fc1(x.flatten(1))))
        return self.fc2(x)


def torch_step_ms(images, labels, batch, steps, warmup=5):
    dev = torch.device("cuda:0")
    torch.manual_seed(0)
    model = Cnn().to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    n = images.shape[0]

    def step(i):
        idx = torch.arange(i * batch, (i + 1) * batch) % n
        x = ((images[idx].float() / 255.0 - 0.2860) / 0.3530).unsqueeze(1).to(dev)
        y = labels[idx].long().to(dev)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        return loss.item()

    for i in range(warmup):
        step(i)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(steps):
        step(warmup + i)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / steps


def fedtune_step_ms(binary, data, batches, steps):
    run = subprocess.run(
        [binary, "bench-step", "--data", data, "--model", "cnn", "--device", "cuda:0",
         "--batch-sizes", ",".join(map(str, batches)), "--steps", str(steps)],
        capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"fedtune bench-step failed ({run.returncode}):\n{run.stderr}")
    out = run.stdout
    print(out.strip())
    return {int(b): float(ms) for b, ms in re.findall(r"batch=(\d+) steps=\d+ mean_ms=([\d.]+)", out)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fedtune", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--batch-sizes", default="64,256")
    ap.add_argument("--steps", type=int, default=200)
    a = ap.parse_args()
    batches = [int(b) for b in a.batch_sizes.split(",")]
    images = read_idx(f"{a.data}/train-images-idx3-ubyte.gz")
    labels = read_idx(f"{a.data}/train-labels-idx1-ubyte.gz")
    fed = fedtune_step_ms(a.fedtune, a.data, batches, a.steps)
    print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    print(f"{'batch':>6} {'fedtune ms/step':>16} {'pytorch ms/step':>16} {'fedtune/pytorch':>16}")
    for b in batches:
        t = torch_step_ms(images, labels, b, a.steps)
        f = fed.get(b, float("nan"))
        print(f"{b:>6} {f:>16.3f} {t:>16.3f} {f / t:>16.2f}")


if __name__ == "__main__":
    main()
