"""Sweep MGD3's guidance settings (lambda, t_stop, CFG) and score each on the validation split.

Issue 6's investigation: when MGD3 does not beat unguided sampling, is it lambda, t_stop or CFG?
Every setting is scored the way the report scores a method -- a ConvNet student trained on the
distilled set with the hard-label protocol -- but on the *validation* split, never the test split,
and with modes found on the "fit" split (train minus validation), so choosing a setting here does
not leak into the test figures of the report.

Uses the config's backbone and latent stores in ``MGD3_HOME`` (``make demo`` or the ``backbone`` and
``latent_store`` assets materialize them); where they are missing -- e.g. a copy of the config with
another backbone recipe in an empty home -- it trains and encodes them first, as those assets would,
so their time is not part of the sweep's total. Samples every class in one batched call per setting and
generation seed (batch ``sampler.batch_size``, across classes), with the same per-image seeds as the
pipeline, so the unguided row is the pipeline's unguided set (modes aside).

    MGD3_HOME=<home> .venv/bin/python experiments/guidance_sweep.py                     # the default grid
    MGD3_HOME=<home> .venv/bin/python experiments/guidance_sweep.py --lambdas 0.1 --t-stops 0,25 --cfg-scales 2
    # the other levers: mode finders, and lambda fading over the guided steps instead of a hard stop
    MGD3_HOME=<home> .venv/bin/python experiments/guidance_sweep.py --lambdas 0.2 --t-stops 10 \
        --mode-methods kmeans,gmm,bisecting_kmeans --schedules constant,linear,cosine

Prints one row per setting: validation top-1 of the student (mean +- std over generation seeds),
the mean latent distance of the images to their own mode, and the share nearest to their own mode;
the random-real and closest-real baselines (from the fit split) are scored the same way.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))  # bench/_common.py
from _common import header, markdown_table, set_threads  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from mgd3_core import distillation, pipeline  # noqa: E402
from mgd3_core.config import load_config  # noqa: E402
from mgd3_core.storage import latent_store_file, storage_root  # noqa: E402
from mgd3_core.evaluate import real_split  # noqa: E402
from mgd3_core.latents import read_latent_store  # noqa: E402
from mgd3_core.sampling import SamplerSettings, sample  # noqa: E402
from mgd3_core.students import build_student  # noqa: E402
from mgd3_core.training import train_hard_label  # noqa: E402


def floats(s: str) -> list[float]:
    return [float(v) for v in s.split(",") if v]


def ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v]


def fit_modes(cfg, home, ipc: int, gen_seeds: list[int], method: str | None = None) -> dict:
    """Per class id: (class info, fit-split item ids, their latents, {gen seed: fitted ModeFinder}),
    with the config's mode finder or ``method`` (kmeans, gmm, bisecting_kmeans)."""
    source = pipeline.open_source(cfg)
    vae_fp = pipeline.get_backbone(cfg, home).vae_fingerprint
    out = {}
    for info in pipeline.class_infos(cfg):
        store = read_latent_store(latent_store_file(cfg, home, info.id, vae_fp), expected_vae_fingerprint=vae_fp)
        ids = source.items(info.id, "fit")
        lat = np.asarray(store.select(ids), dtype=np.float32)
        finders = {g: pipeline.mode_finder(cfg, ipc, g, info.id).set_params(method=method or cfg.modes.method).fit(lat)
                   for g in gen_seeds}
        out[info.id] = (info, ids, lat, finders)
    return out


def mode_distances(latents: np.ndarray, centroids: np.ndarray) -> tuple[float, float]:
    """Mean distance of image i to centroid i, and the share of images nearer to it than to any other."""
    own, other = pipeline._distances(latents, centroids)
    return float(own.mean()), float((own < other).mean())


def _score_real(cfg, source, classes: dict, ipc: int, g: int, name: str, score) -> tuple[float, tuple]:
    """Validation top-1 of a student on random or closest real images (fit split), and their
    (mean distance to the mode, share nearest to it)."""
    imgs, labs, dists = [], [], []
    for cid, (info, ids, lat, finders) in classes.items():
        finder = finders[g]
        if name == "closest_real":
            idx = finder.closest_real(lat)
        else:
            idx = np.sort(np.random.default_rng([cfg.seed, g, info.index]).choice(len(ids), ipc, replace=False))
        imgs.append(source.load(cid, "fit", [ids[i] for i in idx]))
        labs.append(np.full(ipc, info.index))
        dists.append(mode_distances(lat[idx], finder.centroids_))
    return score(np.concatenate(imgs), np.concatenate(labs)), tuple(np.mean(dists, axis=0))


def _score_sampled(cfg, backbone, classes: dict, ipc: int, g: int, st: SamplerSettings, score) -> dict:
    """One generated set (every class, generation seed g, the pipeline's per-image seeds) and its row."""
    labels, seeds, student_labels = [], [], []
    centroids = [finders[g].centroids_.reshape(ipc, *lat.shape[1:]) for _, _, lat, finders in classes.values()]
    for cid, (info, *_rest) in classes.items():
        labels += [info.label] * ipc
        seeds += distillation.image_seeds(cfg, cid, ipc, g)
        student_labels += [info.index] * ipc
    t0 = time.perf_counter()
    out = sample(backbone, labels, seeds, modes=torch.from_numpy(np.concatenate(centroids)), settings=st,
                 batch_size=cfg.sampler.batch_size)
    images = distillation._decode(backbone, out.latents, cfg.sampler.batch_size)
    sample_s = time.perf_counter() - t0
    generated = out.latents.numpy()
    d, share = np.mean([mode_distances(generated[k * ipc:(k + 1) * ipc], c) for k, c in enumerate(centroids)], axis=0)
    return dict(cfg_scale=st.cfg_scale, guidance_strength=st.guidance_strength, t_stop=st.t_stop, gen_seed=g,
                val_acc=score(images, np.asarray(student_labels)), dist_to_mode=d, own_mode_nearest=share,
                sample_s=sample_s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None)
    ap.add_argument("--ipc", type=int, default=None, help="default: the config's first IPC")
    ap.add_argument("--lambdas", type=floats, default=floats("0.05,0.1,0.2,0.4"))
    ap.add_argument("--t-stops", type=ints, default=ints("0,10,25"),
                    help="guided while t > t_stop (t counts down from steps-1): 0 = no stop")
    ap.add_argument("--cfg-scales", type=floats, default=None, help="default: the config's sampler.cfg_scale")
    ap.add_argument("--gen-seeds", type=ints, default=None, help="default: the config's generation seeds")
    ap.add_argument("--mode-methods", type=lambda v: v.split(","), default=None,
                    help="mode finders to compare, e.g. kmeans,gmm,bisecting_kmeans (default: the config's)")
    ap.add_argument("--schedules", type=lambda v: v.split(","), default=["constant"],
                    help="lambda schedules over the guided steps: constant (the paper), linear, cosine")
    ap.add_argument("--epochs", type=int, default=None, help="default: the config's epochs for this IPC")
    ap.add_argument("--train-seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-baselines", action="store_true", help="skip the random-real and closest-real rows")
    ap.add_argument("--csv", default=None, help="also write the per-run rows here")
    args = ap.parse_args()

    threads = set_threads(args.threads)
    cfg, home = load_config(args.config), storage_root()
    ipc = args.ipc or cfg.ipc[0]
    gen_seeds = args.gen_seeds or list(cfg.evaluation.generation_seeds)
    cfg_scales = args.cfg_scales or [cfg.sampler.cfg_scale]
    epochs = args.epochs or cfg.epochs_for_ipc(ipc)
    print(header(threads, extra=f"config {cfg.name} | home {home}"))
    print(f"IPC {ipc}; generation seeds {gen_seeds}; ConvNet hard-label student, {epochs} epochs, training seed "
          f"{args.train_seed}; scored on the validation split; modes from the fit split "
          f"({', '.join(args.mode_methods or [cfg.modes.method])}); lambda schedules {', '.join(args.schedules)}\n")

    t_prep = time.perf_counter()
    pipeline.ensure_backbone(cfg, home)  # no-op when trained (same key), else trains it
    for info in pipeline.class_infos(cfg):
        pipeline.encode_latents(cfg, home, info.id)  # reuses a valid store of the same images
    print(f"backbone and latent stores ready in {time.perf_counter() - t_prep:.0f} s")
    backbone = pipeline.get_backbone(cfg, home)
    mode_methods = args.mode_methods or [cfg.modes.method]
    source = pipeline.open_source(cfg)
    xv, yv = real_split(cfg, "val")
    n_classes = len(pipeline.class_infos(cfg))

    def score(images: np.ndarray, labels: np.ndarray) -> float:
        model = build_student("convnet", images.shape[1], n_classes, images.shape[-1], seed=args.train_seed)
        res = train_hard_label(model, images, labels, xv, yv, cfg=cfg.evaluation.hard, epochs=epochs,
                               seed=args.train_seed, orientation_sensitive=cfg.dataset.orientation_sensitive,
                               device=cfg.evaluation.device, evaluations=1)
        return res.final_acc

    guided = [(f"lambda {lam:g}, t_stop {ts}" + ("" if sched == "constant" else f", {sched}"),
               dict(cfg_scale=c, guidance_strength=lam, t_stop=ts, guidance_schedule=sched))
              for c in cfg_scales for lam in args.lambdas for ts in args.t_stops for sched in args.schedules]
    runs = []
    t_all = time.perf_counter()
    for m_i, method in enumerate(mode_methods):
        classes = fit_modes(cfg, home, ipc, gen_seeds, method)
        tag = f"[{method}] " if len(mode_methods) > 1 else ""
        # unguided sampling and random real images do not depend on the modes: once
        settings_list = [("unguided", dict(cfg_scale=c, guidance_strength=0.0, t_stop=0))
                         for c in cfg_scales] if m_i == 0 else []
        settings_list += [(tag + name, kw) for name, kw in guided]
        baselines = ([] if args.no_baselines else
                     ["random_real", "closest_real"] if m_i == 0 else ["closest_real"])
        for g in gen_seeds if baselines else []:  # real baselines from the fit split
            for name in baselines:
                acc, d = _score_real(cfg, source, classes, ipc, g, name, score)
                runs.append(dict(setting=(tag if name == "closest_real" else "") + name, cfg_scale=np.nan,
                                 guidance_strength=np.nan, t_stop=np.nan, gen_seed=g, val_acc=acc, dist_to_mode=d[0],
                                 own_mode_nearest=d[1], sample_s=0.0))
                print(f"  {runs[-1]['setting']:36s} seed {g}: val {acc:.2f} %  dist {d[0]:.2f}", flush=True)
        for name, kw in settings_list:
            st = SamplerSettings(steps=cfg.sampler.steps, kind=cfg.sampler.kind, **kw)
            for g in gen_seeds:
                runs.append(dict(setting=name, **_score_sampled(cfg, backbone, classes, ipc, g, st, score)))
                print(f"  {name:36s} CFG {st.cfg_scale:g} seed {g}: val {runs[-1]['val_acc']:.2f} %  "
                      f"dist {runs[-1]['dist_to_mode']:.2f}  ({runs[-1]['sample_s']:.1f} s sampling)", flush=True)

    df = pd.DataFrame(runs)
    if args.csv:
        df.to_csv(args.csv, index=False)
    keys = ["setting", "cfg_scale"]
    agg = (df.fillna({"cfg_scale": -1}).groupby(keys, sort=False)
           .agg(val_mean=("val_acc", "mean"), val_std=("val_acc", "std"), dist=("dist_to_mode", "mean"),
                share=("own_mode_nearest", "mean"), n=("val_acc", "size"))
           .reset_index().sort_values("val_mean", ascending=False))
    # One generation seed has no spread: its row shows the accuracy alone, not "± nan".
    rows = [[r.setting, "-" if r.cfg_scale < 0 else f"{r.cfg_scale:g}",
             f"{r.val_mean:.2f}" + (f" ± {r.val_std:.2f}" if r.n > 1 else ""),
             int(r.n), f"{r.dist:.2f}", f"{100 * r.share:.1f} %"] for r in agg.itertuples()]
    print()
    print(markdown_table(["setting", "CFG", "val top-1 % (mean ± std over gen seeds)", "seeds",
                          "mean latent dist to own mode", "nearest to own mode"], rows))
    print(f"\ntotal {time.perf_counter() - t_all:.0f} s")


if __name__ == "__main__":
    main()
