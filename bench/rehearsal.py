"""Rehearse the paper-scale path end to end: DiT-XL/2 + SD VAE at 256 px on an ImageNet-style tree.

No weights or data can be downloaded here, so the rehearsal builds them, in a
temporary directory:

- random-initialised models with the exact architectures of
  ``facebook/DiT-XL-2-256`` (``--depth`` shortens the stack of 28 blocks for CPU
  time; width 1152, 16 heads, patch 2, 4 x 32 x 32 latents, learned sigma,
  1,000 classes unchanged) and ``stabilityai/sd-vae-ft-mse`` (scaling 0.18215),
  saved in the diffusers layout with safetensors
  (``mgd3_core.backbones.reference``);
- a procedural ImageFolder at 256 px RGB (JPEG files of varied sizes,
  ``train/`` and ``val/``, class folders named by the ImageNette WordNet ids,
  labels mapped as in ``configs/imagenette-dit-xl.yaml``);

then runs the whole asset graph on it through the command a user runs
(``python -m mgd3_assets.demo --config <config>``, ``backbone.kind: pretrained``,
bfloat16 where the device supports it, students at 256 px), once with
``--per-class`` N training images per class and once with ``--scale`` x N, and
prints per stage the wall time and peak RSS (and peak GPU memory on a GPU),
and the ratio of the peak RSS of the two runs (target <= 1.2: memory must not
grow with the dataset).

    .venv/bin/python bench/rehearsal.py                        # CPU defaults (make rehearsal)
    .venv/bin/python bench/rehearsal.py --device cuda --depth 28 --per-class 16 --encode-batch 16
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, header, markdown_table  # noqa: E402

IMAGENETTE = REPO / "configs" / "imagenette-dit-xl.yaml"


# --------------------------------------------------------------------------- data
def procedural_image(rng: np.random.Generator, class_index: int) -> Image.Image:
    """A 256-340 x 256-340 px RGB picture: a class-coloured gradient with a few random shapes."""
    w, h = (int(v) for v in rng.integers(256, 341, 2))
    hue = np.array([(class_index * 97) % 256, (class_index * 53 + 80) % 256, (class_index * 151 + 30) % 256])
    ramp = np.linspace(0.4, 1.0, w)[None, :, None] * np.linspace(1.0, 0.6, h)[:, None, None]
    pixels = (ramp * hue + rng.normal(0, 12, (h, w, 3))).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 6))):
        x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
        x1, y1 = x0 + int(rng.integers(30, 140)), y0 + int(rng.integers(30, 140))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if (class_index + _) % 2 else draw.rectangle)((x0, y0, x1, y1), fill=color)
    return image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0, 1.5))))


def write_image_folder(root: Path, classes: list[dict], per_class: dict[str, int], seed: int = 0) -> None:
    """``root/<split>/<wnid>/<wnid>_<i>.JPEG`` for every class, ``per_class[split]`` images each."""
    for c, spec in enumerate(classes):
        for split, n in per_class.items():
            folder = root / split / spec["id"]
            folder.mkdir(parents=True, exist_ok=True)
            rng = np.random.default_rng([seed, c, 0 if split == "train" else 1])
            for i in range(n):
                procedural_image(rng, c).save(folder / f"{spec['id']}_{i}.JPEG", quality=90)


# --------------------------------------------------------------------------- config
def rehearsal_config(args, data_root: Path, dit_dir: Path, vae_dir: Path) -> dict:
    """configs/imagenette-dit-xl.yaml with the rehearsal's data, models and small schedules."""
    from mgd3_core.config import config_from_dict

    raw = yaml.safe_load(IMAGENETTE.read_text())
    raw["name"] = "rehearsal"
    raw["dataset"].update(root=str(data_root), classes=raw["dataset"]["classes"][: args.classes])
    raw["backbone"].update(transformer_dir=str(dit_dir), vae_dir=str(vae_dir), device=args.device,
                           dtype=args.dtype)
    raw["encode"] = {"batch_size": args.encode_batch}
    raw["ipc"] = [args.ipc]
    raw["sampler"].update(steps=args.steps, t_stop=args.steps // 2, batch_size=max(args.ipc, 2))
    raw["methods"] = args.methods.split(",")
    raw["evaluation"] = {
        "students": args.students.split(","), "generation_seeds": [0], "training_seeds": [0],
        "device": args.device, "memory_budget_mb": args.memory_budget_mb, "evaluations": 1,
        "tsne_classes": 0, "representativeness_k": 1,
        "hard": {"batch_size": args.train_batch, "epochs_by_ipc": {1: args.epochs},
                 "full_data_epochs": args.epochs},
    }
    config_from_dict(raw)  # fail here, naming the key, if the rehearsal writes a bad config
    return raw


def resolve_runtime(args) -> None:
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.dtype == "auto":
        cuda = args.device.startswith("cuda")
        args.dtype = "bfloat16" if (not cuda or torch.cuda.is_bf16_supported()) else "float32"


# --------------------------------------------------------------------------- one run
def run_demo(config: dict, work: Path, label: str) -> dict:
    """``python -m mgd3_assets.demo`` on ``config`` in its own storage root; its stage profile."""
    home = work / f"home-{label}"
    cfg_path = work / f"rehearsal-{label}.yaml"
    cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
    profile = work / f"profile-{label}.json"
    env = {**os.environ, "MGD3_HOME": str(home), "MGD3_CONFIG": str(cfg_path), "DAGSTER_HOME": str(REPO)}
    cmd = [sys.executable, "-m", "mgd3_assets.demo", "--config", str(cfg_path), "--profile-json", str(profile)]
    print(f"\n$ MGD3_HOME={home} {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, env=env)
    if done.returncode != 0:
        raise SystemExit(f"rehearsal run {label} failed (exit {done.returncode}); its output is above")
    out = json.loads(profile.read_text())
    out["wall_seconds"] = time.perf_counter() - t0
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="cpu, cuda (default: cuda if available)")
    p.add_argument("--dtype", default="auto", help="bfloat16 / float32 / float16 (default: bfloat16 where supported)")
    p.add_argument("--depth", type=int, default=1, help="DiT blocks (DiT-XL/2 has 28; 1 for CPU time)")
    p.add_argument("--classes", type=int, default=2, help="ImageNette classes (at most 10)")
    p.add_argument("--per-class", type=int, default=2, help="N: training images per class in the first run")
    p.add_argument("--scale", type=int, default=4, help="second run with scale x N images (0: one run only)")
    p.add_argument("--steps", type=int, default=4, help="sampling steps (paper: 50)")
    p.add_argument("--ipc", type=int, default=1)
    p.add_argument("--methods", default="mgd3,unguided,random_real,closest_real")
    p.add_argument("--students", default="convnet,resnetap10,resnet18")
    p.add_argument("--epochs", type=int, default=1, help="student and teacher epochs")
    p.add_argument("--train-batch", type=int, default=4, help="hard-label batch size (protocol: 64)")
    p.add_argument("--encode-batch", type=int, default=2, help="VAE encoding batch size")
    p.add_argument("--memory-budget-mb", type=int, default=256, help="evaluation.memory_budget_mb")
    p.add_argument("--workdir", type=Path, default=None, help="keep everything here (default: a temp dir, removed)")
    p.add_argument("--out", type=Path, default=None, help="also write the tables (markdown) to this file")
    args = p.parse_args()
    resolve_runtime(args)
    if not 1 <= args.classes <= 10:
        p.error("--classes must be in 1..10 (the ImageNette classes of configs/imagenette-dit-xl.yaml)")

    import torch

    from mgd3_core.backbones.reference import save_reference_backbone

    work = args.workdir or Path(tempfile.mkdtemp(prefix="mgd3-rehearsal-"))
    work.mkdir(parents=True, exist_ok=True)
    lines = ["```", header(torch.get_num_threads(), args.device, extra=f"dtype {args.dtype} | DiT-XL/2 depth {args.depth}"), "```"]
    print("\n".join(lines), flush=True)
    try:
        t0 = time.perf_counter()
        dit_dir, vae_dir = save_reference_backbone(work / "models", depth=args.depth, seed=0)
        print(f"models: {dit_dir}, {vae_dir} ({time.perf_counter() - t0:.1f} s)", flush=True)
        sizes = [args.per_class] + ([args.scale * args.per_class] if args.scale > 1 else [])
        results = {}
        for n in sizes:
            data = work / f"imagenette-procedural-{n}"
            classes = yaml.safe_load(IMAGENETTE.read_text())["dataset"]["classes"][: args.classes]
            write_image_folder(data, classes, {"train": n, "val": max(1, n // 2)})
            results[n] = run_demo(rehearsal_config(args, data, dit_dir, vae_dir), work, f"n{n}")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    lines += table(results, args)
    text = "\n".join(lines[3:])
    print("\n" + text)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    return 0


def table(results: dict[int, dict], args) -> list[str]:
    sizes = list(results)
    gpu = any(s["peak_device_mib"] is not None for r in results.values() for s in r["stages"])
    head = ["stage"]
    for n in sizes:
        head += [f"N={n}: s", f"N={n}: peak RSS MiB"] + ([f"N={n}: peak GPU MiB"] if gpu else [])
    rows = []
    for i, stage in enumerate(results[sizes[0]]["stages"]):
        row = [stage["job"]]
        for n in sizes:
            s = results[n]["stages"][i]
            row += [f"{s['seconds']:.1f}", f"{s['peak_rss_mib']:.0f}"]
            if gpu:
                row.append("-" if s["peak_device_mib"] is None else f"{s['peak_device_mib']:.0f}")
        rows.append(row)
    total = ["total (demo process)"]
    for n in sizes:
        r = results[n]
        total += [f"{r['total_seconds']:.1f}", f"{max(s['peak_rss_mib'] for s in r['stages']):.0f}"]
        if gpu:
            total.append(f"{max((s['peak_device_mib'] or 0) for s in r['stages']):.0f}")
    rows.append(total)
    out = ["", f"{args.classes} classes x N training images (val N/2), IPC {args.ipc}, {args.steps} steps, "
           f"students {args.students} at 256 px, {args.epochs} epoch(s), memory budget {args.memory_budget_mb} MiB, "
           f"encode batch {args.encode_batch}", "", markdown_table(head, rows)]
    if len(sizes) == 2:
        peaks = [max(s["peak_rss_mib"] for s in results[n]["stages"]) for n in sizes]
        ratio = peaks[1] / peaks[0]
        out += ["", f"peak RSS at N={sizes[1]} / N={sizes[0]}: {peaks[1]:.0f} / {peaks[0]:.0f} MiB = {ratio:.3f} "
                f"(target <= 1.2: {'met' if ratio <= 1.2 else 'MISSED'})"]
    return out


if __name__ == "__main__":
    sys.exit(main())
