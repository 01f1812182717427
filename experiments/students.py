"""Student training and evaluation cost per student, and ResNet-18's memory layout.

Times one hard-label SGD step (forward, cross-entropy, backward, update; momentum
and weight decay as the protocol) at the protocol's batch size and at an IPC-1
sized batch, and one evaluation pass over a test-split-sized batch, for every
student in ``mgd3_core.students`` at the embedded default's shape (1 x 32 x 32,
10 classes). ResNet-18 is also timed with torchvision's default (contiguous)
layout, to measure what the channels-last layout ``build_student`` gives it is
worth. Conditions are interleaved within each repetition; medians are printed.

    .venv/bin/python experiments/students.py              # 7 repeats
    .venv/bin/python experiments/students.py --repeats 3
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))  # bench/_common.py
from _common import header, markdown_table, median, set_threads  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mgd3_core.config import HardLabelConfig  # noqa: E402
from mgd3_core.students import STUDENTS, as_model_input, build_student  # noqa: E402


def contiguous_resnet18(channels: int, classes: int, size: int) -> torch.nn.Module:
    model = build_student("resnet18", channels, classes, size, seed=0)
    model._forward_pre_hooks.clear()  # the channels-last input hook
    return model.to(memory_format=torch.contiguous_format)


def main() -> None:
    hard = HardLabelConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--batch", type=int, default=hard.batch_size, help="training batch (protocol default)")
    p.add_argument("--small-batch", type=int, default=10, help="an IPC-1 set of 10 classes")
    p.add_argument("--eval-images", type=int, default=1000, help="test split size (embedded: 1,000)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    threads = set_threads(args.threads)
    print(header(threads, extra=f"repeats {args.repeats} (interleaved) | images {args.channels}x"
                 f"{args.image_size}x{args.image_size} | SGD lr {hard.lr} momentum {hard.momentum} "
                 f"wd {hard.weight_decay}"))
    shape = (args.channels, args.image_size, args.image_size)
    g = torch.Generator().manual_seed(0)
    data = {b: (torch.randint(0, 256, (b, *shape), generator=g, dtype=torch.uint8),
                torch.randint(0, 10, (b,), generator=g)) for b in (args.batch, args.small_batch)}
    evalx = torch.randint(0, 256, (args.eval_images, *shape), generator=g, dtype=torch.uint8)

    variants = {name: (lambda n=name: build_student(n, args.channels, 10, args.image_size, seed=0))
                for name in STUDENTS}
    variants["resnet18 (contiguous)"] = lambda: contiguous_resnet18(args.channels, 10, args.image_size)
    models = {}
    for name, make in variants.items():
        m = make().train()
        opt = torch.optim.SGD(m.parameters(), lr=hard.lr, momentum=hard.momentum, weight_decay=hard.weight_decay)
        models[name] = (m, opt)
    times: dict[tuple[str, str], list[float]] = {}

    def step(name: str, batch: int) -> float:
        m, opt = models[name]
        x, y = data[batch]
        t = time.perf_counter()
        loss = F.cross_entropy(m(as_model_input(x)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t

    @torch.no_grad()
    def evaluate(name: str) -> float:
        m, _ = models[name]
        m.eval()
        t = time.perf_counter()
        for i in range(0, len(evalx), 500):
            m(as_model_input(evalx[i:i + 500]))
        m.train()
        return time.perf_counter() - t

    for name in models:  # warm-up: oneDNN primitive creation is not timed
        step(name, args.batch), step(name, args.small_batch), evaluate(name)
    for r in range(args.repeats):
        for name in models:
            times.setdefault((name, "big"), []).append(step(name, args.batch))
            times.setdefault((name, "small"), []).append(step(name, args.small_batch))
            times.setdefault((name, "eval"), []).append(evaluate(name))
        print(f"  repeat {r + 1}/{args.repeats} done", flush=True)

    rows = []
    for name in models:
        big, small, ev = (median(times[name, k]) for k in ("big", "small", "eval"))
        params = sum(p.numel() for p in models[name][0].parameters()) / 1e6
        rows.append([name, f"{params:.2f}", f"{big:.3f}", f"{1000 * big / args.batch:.1f}", f"{small:.3f}",
                     f"{1000 * small / args.small_batch:.1f}", f"{ev:.2f}"])
    print()
    print(markdown_table(["student", "M params", f"step s (batch {args.batch})", "ms/image",
                          f"step s (batch {args.small_batch})", "ms/image",
                          f"eval s ({args.eval_images} images)"], rows))
    ratios = []
    for k, label in (("big", f"training step, batch {args.batch}"), ("small", f"training step, batch {args.small_batch}"),
                     ("eval", "evaluation pass")):
        per_rep = [a / b for a, b in zip(times["resnet18 (contiguous)", k], times["resnet18", k])]
        ratios.append([f"ResNet-18 contiguous / channels-last, {label}", f"{median(per_rep):.2f}x"])
    print()
    print(markdown_table(["ratio (median of per-repetition ratios)", "value"], ratios))


if __name__ == "__main__":
    main()
