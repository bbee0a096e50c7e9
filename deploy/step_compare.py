"""Times one training step of fedtune's built-in CNN in PyTorch (eager) and in fedtune on the same
device, and prints both and their ratio against the target.

  --device cuda:0: fedtune on `cuda:0` (burn + libtorch) against PyTorch on the GPU (target 1.2x);
  --device cpu: fedtune on `libtorch` (target 1.2x) and on `flex` (pure Rust, target 2x)
                against PyTorch on the CPU. A fedtune device the binary was not built for is
                reported as such.

The PyTorch model mirrors fedtune's `cnn` (common/src/models/cnn.rs): conv 3x3 (16, same) ->
ReLU -> max-pool 2 -> conv 3x3 (32, same) -> ReLU -> max-pool 2 -> linear 1568->128 -> ReLU ->
dropout 0.1 -> linear 128->10; Adam (lr 1e-3), cross-entropy. Each step does what fedtune's
does: copy a normalised batch from host memory to the GPU, forward, backward, optimiser step, and
read the loss back (which synchronises). Both sides use the machine's default thread count.
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


def torch_step_ms(images, labels, batch, steps, device, warmup=5):
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
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
    sync()
    start = time.perf_counter()
    for i in range(steps):
        step(warmup + i)
    sync()
    return (time.perf_counter() - start) * 1e3 / steps


def fedtune_step_ms(binary, data, batches, steps, device):
    run = subprocess.run(
        [binary, "bench-step", "--data", data, "--model", "cnn", "--device", device,
         "--batch-sizes", ",".join(map(str, batches)), "--steps", str(steps)],
        capture_output=True, text=True)
    if run.returncode != 0:
        print(f"fedtune on {device}: not measured ({run.stderr.strip().splitlines()[-1:]})")
        return {}
    out = run.stdout
    print(out.strip())
    return {int(b): float(ms) for b, ms in re.findall(r"batch=(\d+) steps=\d+ mean_ms=([\d.]+)", out)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fedtune", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--batch-sizes", default="64,256")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--device", default="cuda:0", help="cuda:N or cpu")
    a = ap.parse_args()
    batches = [int(b) for b in a.batch_sizes.split(",")]
    images = read_idx(f"{a.data}/train-images-idx3-ubyte.gz")
    labels = read_idx(f"{a.data}/train-labels-idx1-ubyte.gz")
    if a.device == "cpu":
        targets = {"libtorch": 1.2, "flex": 2.0}
        print(f"CPU: {torch.get_num_threads()} threads, torch {torch.__version__}")
    else:
        targets = {a.device: 1.2}
        print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    fed = {d: fedtune_step_ms(a.fedtune, a.data, batches, a.steps, d) for d in targets}
    print(f"{'batch':>6} {'fedtune device':>15} {'fedtune ms/step':>16} {'pytorch ms/step':>16} {'fedtune/pytorch':>16}  target")
    for b in batches:
        t = torch_step_ms(images, labels, b, a.steps, a.device)
        for d, limit in targets.items():
            f = fed[d].get(b, float("nan"))
            verdict = "PASS" if f / t <= limit else ("not measured" if f != f else "SHORT")
            print(f"{b:>6} {d:>15} {f:>16.3f} {t:>16.3f} {f / t:>16.2f}  <= {limit} {verdict}")


if __name__ == "__main__":
    main()
