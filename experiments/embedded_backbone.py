"""Quality bars of the embedded backbone (issue 3), measured from scratch.

    .venv/bin/python experiments/embedded_backbone.py [--config configs/embedded.yaml]
        [--home DIR] [--threads N] [--cfg-scales 1.5,2,4] [--per-class 100]
        [--classifier FILE] [--set KEY=VALUE ...]

1. Trains the embedded backbone at the configured settings in a fresh storage
   root (``--home`` reuses one; then the training time is not measured) and
   reports the wall and process-CPU time of VAE + encoding + DiT training.
   On a shared machine the CPU time is the steadier figure; ``--threads 1``
   avoids OpenMP stalls when other processes hold the cores.
2. VAE reconstruction PSNR on the *test* split (uint8 round trip, as the PNGs
   of a distilled set are written): 10 log10(255^2 / MSE) over all pixels.
3. Class consistency: a ConvNet (mgd3_core.students) trained on the real
   training split classifies unguided classifier-free-guidance samples (DDPM,
   50 steps, lambda 0, via mgd3_core.sampling) of every class; the figure is
   the fraction labelled with their intended class, per CFG scale. Also
   reports the ConvNet's own test accuracy. ``--classifier FILE`` caches the
   judge (loaded when the file exists, else trained and saved).

Writes a sample grid per CFG scale (one row per class) into the storage root
and prints a table plus the exact command. ``--set`` overrides config values
for tuning, e.g. ``--set backbone.embedded.dit.steps=800``.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's mgd3_core, not an installed one
from mgd3_core.backbones import embedded_backbone_dir, ensure_embedded_backbone, load_backbone  # noqa: E402
from mgd3_core.config import DEFAULT_CONFIG, config_from_dict  # noqa: E402
from mgd3_core.data import open_dataset  # noqa: E402
from mgd3_core.images import uint8_from_signed  # noqa: E402
from mgd3_core.sampling import SamplerSettings, sample  # noqa: E402
from mgd3_core.students import as_model_input, build_student  # noqa: E402


def _override(raw: dict, assignment: str) -> None:
    key, _, value = assignment.partition("=")
    node = raw
    *parents, leaf = key.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = yaml.safe_load(value)


def _split(source, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for c in source.classes():
        ids = source.items(c.id, split)
        xs.append(torch.from_numpy(source.load(c.id, split, ids)))
        ys.append(torch.full((len(ids),), c.index, dtype=torch.long))
    return torch.cat(xs), torch.cat(ys)


def _psnr(backbone, images: torch.Tensor, batch: int = 250) -> float:
    """10 log10(255^2 / MSE) of the uint8 round trip over the whole split."""
    se, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = images[i:i + batch]
            rec = uint8_from_signed(backbone.decode(backbone.encode(as_model_input(x))))
            se += float(((rec.float() - x.float()) ** 2).sum())
            n += x.numel()
    return 10 * math.log10(255.0**2 / (se / n))


def _train_classifier(x: torch.Tensor, y: torch.Tensor, n_classes: int, epochs: int, seed: int = 0):
    torch.manual_seed(seed)
    model = build_student("convnet", x.shape[1], n_classes, x.shape[-1])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(128):
            loss = torch.nn.functional.cross_entropy(model(as_model_input(x[idx])), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def _predict(model, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([model(as_model_input(x[i:i + 500])).argmax(1) for i in range(0, len(x), 500)])


def _grid(images: torch.Tensor, rows: int, path: Path) -> None:
    """uint8 (rows*cols, C, H, W) -> one PNG, a row per class."""
    n, c, h, w = images.shape
    cols = n // rows
    a = images.view(rows, cols, c, h, w).permute(0, 3, 1, 4, 2).reshape(rows * h, cols * w, c).numpy()
    Image.fromarray(a[..., 0] if c == 1 else a).save(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(DEFAULT_CONFIG))
    ap.add_argument("--home", default=None, help="storage root (default: a fresh temporary one)")
    ap.add_argument("--cfg-scales", default="1.5,2,4")
    ap.add_argument("--per-class", type=int, default=100, help="samples per class for class consistency")
    ap.add_argument("--classifier-epochs", type=int, default=3)
    ap.add_argument("--classifier", default=None,
                    help="safetensors file of the judge ConvNet: loaded if it exists, else trained and saved")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--grid", default=None, help="PNG path of the sample grid (default: <home>/samples.png)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads, training included (sets backbone.embedded.threads; default: the "
                         "config's for training, torch's for the rest); 1 is far faster on a busy machine")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    raw = yaml.safe_load(Path(args.config).read_text()) or {}
    if args.threads:  # training runs with backbone.embedded.threads, whatever the process's count
        raw.setdefault("backbone", {}).setdefault("embedded", {})["threads"] = args.threads
    for s in args.set:
        _override(raw, s)
    cfg = config_from_dict(raw, source=args.config)
    home = Path(args.home) if args.home else Path(tempfile.mkdtemp(prefix="mgd3-bench-"))
    fresh = not embedded_backbone_dir(cfg, home).is_dir()
    print(f"torch threads: {torch.get_num_threads()}  home: {home}  fresh training: {fresh}", flush=True)

    t0 = time.perf_counter()

    def progress(stage, step, total, metrics):
        if step == total or step % max(total // 10, 1) == 0:
            print(f"  {time.perf_counter() - t0:7.1f} s", end="")
            print(f"  {stage:6s} {step:5d}/{total}  {json.dumps({k: round(v, 4) for k, v in metrics.items()})}",
                  flush=True)

    cpu0 = time.process_time()
    root = ensure_embedded_backbone(cfg, home, progress=progress)
    train_wall = time.perf_counter() - t0
    train_cpu = time.process_time() - cpu0
    info = json.loads((root / "training.json").read_text())
    backbone = load_backbone(cfg, home)

    source = open_dataset(cfg.dataset)
    classes = source.classes()
    x_train, y_train = _split(source, "train")
    x_test, y_test = _split(source, "test")
    psnr = _psnr(backbone, x_test)

    t1 = time.perf_counter()
    clf_file = Path(args.classifier) if args.classifier else None
    if clf_file is not None and clf_file.is_file():
        clf = build_student("convnet", x_train.shape[1], len(classes), x_train.shape[-1])
        clf.load_state_dict(load_file(clf_file))
        clf.eval()
    else:
        clf = _train_classifier(x_train, y_train, len(classes), args.classifier_epochs)
        if clf_file is not None:
            save_file({k: v.contiguous() for k, v in clf.state_dict().items()}, clf_file)
    clf_acc = float((_predict(clf, x_test) == y_test).float().mean())
    clf_s = time.perf_counter() - t1

    rows = []
    grid_written = None
    for w in [float(s) for s in args.cfg_scales.split(",")]:
        labels = torch.tensor([c.label for c in classes for _ in range(args.per_class)])
        intended = torch.tensor([c.index for c in classes for _ in range(args.per_class)])
        seeds = list(range(len(labels)))
        settings = SamplerSettings(steps=50, cfg_scale=w, guidance_strength=0.0, t_stop=0, kind="ddpm")
        t2 = time.perf_counter()
        lat = sample(backbone, labels, seeds, modes=None, settings=settings, batch_size=500).latents
        with torch.no_grad():
            imgs = torch.cat([uint8_from_signed(backbone.decode(lat[i:i + 500])) for i in range(0, len(lat), 500)])
        sample_s = time.perf_counter() - t2
        pred = _predict(clf, imgs)
        per_class = [float((pred[intended == c.index] == c.index).float().mean()) for c in classes]
        rows.append((w, float((pred == intended).float().mean()), min(per_class), sample_s / len(labels)))
        grid = Path(args.grid) if args.grid else home / "samples.png"
        g = grid.with_name(f"{grid.stem}_cfg{w:g}{grid.suffix}")
        k = min(10, args.per_class)
        pick = torch.cat([torch.arange(i * args.per_class, i * args.per_class + k) for i in range(len(classes))])
        _grid(imgs[pick], len(classes), g)
        grid_written = g

    vae_p, dit_p = info["vae_parameters"], info["dit_parameters"]
    print()
    print(f"| quality bar | value |")
    print(f"|---|---|")
    print(f"| training wall time, VAE + encode + DiT (bar <= 15 min) | "
          f"{train_wall / 60:.2f} min{'' if fresh else ' (reused, not trained)'} "
          f"(vae {info['timings_s']['vae_s']:.0f} s, encode {info['timings_s']['encode_s']:.0f} s, "
          f"dit {info['timings_s']['dit_s']:.0f} s; process CPU {train_cpu / 60:.2f} min) |")
    print(f"| VAE reconstruction PSNR, test split ({len(x_test)} images, uint8) | {psnr:.2f} dB |")
    for w, acc, worst, per in rows:
        print(f"| class consistency, unguided CFG {w:g}, DDPM 50 steps, {args.per_class}/class | "
              f"{acc * 100:.1f} % (worst class {worst * 100:.1f} %; {per * 1000:.0f} ms/image) |")
    print(f"| ConvNet judge: test accuracy on real images | {clf_acc * 100:.1f} % ({clf_s:.0f} s to train) |")
    print(f"| parameters | VAE {vae_p / 1e6:.2f} M, DiT {dit_p / 1e6:.2f} M |")
    print(f"\nsample grid: {grid_written}")
    print("command: " + " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
