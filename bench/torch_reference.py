#!/usr/bin/python3
"""PyTorch reference for `fqt bench step`: the same models, the same training step, same threads.

Run with Debian's python3-torch (/usr/bin/python3), not another interpreter:
    /usr/bin/python3 bench/torch_reference.py --model mlp,cnn,preact_resnet20 --threads 2 --json

Models mirror src/models/models.cpp and the layers in src/nn exactly (widths, biases, batch norm
with momentum 0.1 / eps 1e-5, pooling, pre-activation blocks with a bias-free 1x1 projection
shortcut on the pre-activated input). A step is forward + cross-entropy (mean) + backward +
SGD (momentum 0.9, weight decay 5e-4 on all but batch-norm parameters, as fqt's Param flags)
on one fixed random N(0,1) batch of 1x28x28 images, fp32, train mode. Warm-up steps, then the
median of the timed steps. One JSON record per model:
    model, framework ("pytorch"), mode ("fp32"), batch, input, threads, steps, params,
    median_ms, min_ms, images_per_s, torch_version, peak_rss_bytes (ru_maxrss of a process that ran
    only that model: includes the Python + PyTorch runtime)
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class PreActBlock(nn.Module):
    # a = relu(bn1(x)); s = shortcut(a) if projecting else x; y = conv2(relu(bn2(conv1(a)))) + s
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, 0, bias=False) if stride != 1 or cin != cout else None
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)

    def forward(self, x):
        a = F.relu(self.bn1(x))
        s = self.shortcut(a) if self.shortcut is not None else x
        return self.conv2(F.relu(self.bn2(self.conv1(a)))) + s


def make_preact(blocks_per_stage, in_c, classes):
    layers = [nn.Conv2d(in_c, 16, 3, 1, 1, bias=False)]
    cin = 16
    for s, width in enumerate((16, 32, 64)):
        for b in range(blocks_per_stage):
            layers.append(PreActBlock(cin, width, 2 if (s > 0 and b == 0) else 1))
            cin = width
    layers += [nn.BatchNorm2d(cin), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return nn.Sequential(*layers)


def make_model(name, c, h, w, classes=10):
    if name == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                             nn.Linear(256, classes))
    if name == "cnn":
        return nn.Sequential(nn.Conv2d(c, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2, 2),
                             nn.Conv2d(32, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                             nn.MaxPool2d(2, 2), nn.Flatten(), nn.Linear(64 * (h // 2 // 2) * (w // 2 // 2), classes))
    if name == "preact_resnet20":
        return make_preact(3, c, classes)
    if name == "preact_resnet56":
        return make_preact(9, c, classes)
    raise SystemExit(f"unknown model '{name}' (mlp, cnn, preact_resnet20, preact_resnet56)")


def bench(name, batch, c, h, w, steps, warmup, threads):
    torch.manual_seed(0)
    model = make_model(name, c, h, w)
    model.train()
    bn = [p for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters(recurse=False)]
    bn_ids = {id(p) for p in bn}
    rest = [p for p in model.parameters() if id(p) not in bn_ids]
    opt = torch.optim.SGD([{"params": rest, "weight_decay": 5e-4}, {"params": bn, "weight_decay": 0.0}], lr=0.01,
                          momentum=0.9)
    x = torch.randn(batch, c, h, w)
    y = torch.randint(0, 10, (batch,))
    times = []
    for s in range(warmup + steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=False)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        dt = (time.perf_counter() - t0) * 1e3
        if s >= warmup:
            times.append(dt)
    med = statistics.median(times)
    return {"model": name, "framework": "pytorch", "mode": "fp32", "batch": batch, "input": f"{c}x{h}x{w}",
            "threads": torch.get_num_threads(), "steps": steps, "warmup": warmup,
            "params": sum(p.numel() for p in model.parameters()), "median_ms": med, "min_ms": min(times),
            "images_per_s": batch / (med / 1e3), "torch_version": torch.__version__}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mlp,cnn,preact_resnet20", help="comma-separated model names")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--input", default="1x28x28", help="CxHxW")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    ap.add_argument("--json", action="store_true", help="JSON array of records instead of a table")
    ap.add_argument("--params-only", action="store_true", help="print parameter counts and exit")
    a = ap.parse_args()
    c, h, w = (int(v) for v in a.input.split("x"))
    threads = a.threads if a.threads > 0 else (os.cpu_count() or 1)
    torch.set_num_threads(threads)
    models = [m for m in a.model.split(",") if m]
    if a.params_only:
        for m in models:
            print(m, sum(p.numel() for p in make_model(m, c, h, w).parameters()))
        return 0
    recs = []
    for m in models:
        if len(models) == 1:
            r = bench(m, a.batch, c, h, w, a.steps, a.warmup, threads)
            r["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        else:
            # One process per model, so that peak RSS is that model's (it includes the Python and
            # PyTorch runtime, a few hundred MB, unlike fqt's figure).
            cmd = [sys.executable, os.path.abspath(__file__), "--model", m, "--batch", str(a.batch), "--input",
                   a.input, "--steps", str(a.steps), "--warmup", str(a.warmup), "--threads", str(threads), "--json"]
            r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)[0]
        recs.append(r)
        if not a.json:
            print(f"{m:16s} pytorch fp32 batch {a.batch}: median {r['median_ms']:.1f} ms, min {r['min_ms']:.1f} ms, "
                  f"{r['images_per_s']:.0f} images/s, {r['params']} params", flush=True)
    if a.json:
        print(json.dumps(recs, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
