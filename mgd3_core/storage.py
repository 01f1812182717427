"""The storage layout: every path under the storage root, in one place.

The tree (the README's "Layout" section summarises it)::

    <home>/                                   $MGD3_HOME, default <repo>/mgd3_home
      backbones/embedded-<key>/               embedded backbone (diffusers layout)
      latents/<dataset key>/<VAE fp>/<class>.h5
      latents/<dataset key>/content/<class>.json   file hashes behind a class's content key
      runs/<config name>/                     (runs/<config name>@validation/ with evaluation.split: validation)
        modes/<class>.h5, modes/by_finder/<finder>/<class>.h5   (the config's finder; a variant's own)
        distilled/<method>/ipc<k>/seed<s>/{images/<class>/, latents/<class>.h5, manifest/<class>.csv}
        teacher/, students/{<method>.csv, runs/}, diversity/, report/
      dagster/                                the persistent Dagster instance
      demo.lock                               held by a running `make demo` (pid and host)

Functions take the experiment config and the storage root (``home``) and only
compute paths: nothing here creates, reads or writes files. Keys that are
computed elsewhere (the embedded backbone's training key, a VAE fingerprint)
are passed in, so this module imports nothing from the rest of the core but
the config (and the dataset module, lazily, for its dataset key).
"""

from __future__ import annotations

import os
from pathlib import Path

from .config import DEFAULT_HOME, ExperimentConfig


def storage_root() -> Path:
    """The storage root: ``$MGD3_HOME`` or ``<project>/mgd3_home`` (git-ignored)."""
    return Path(os.environ.get("MGD3_HOME") or DEFAULT_HOME).resolve()


def dagster_dir(home: Path) -> Path:
    """``<home>/dagster``: the persistent Dagster instance's files."""
    return Path(home) / "dagster"


def fingerprint_cache_dir(home: Path) -> Path:
    """``<home>/cache/fingerprints``: weight-file hashes kept between processes, keyed by each
    file's path, size, mtime and inode (``backbones.diffusers_files.component_fingerprint``)."""
    return Path(home) / "cache" / "fingerprints"


def demo_lock_file(home: Path) -> Path:
    """``<home>/demo.lock``: held by a running demo, so two never run on one storage root."""
    return Path(home) / "demo.lock"


# --------------------------------------------------------------------------- backbones
def backbones_dir(home: Path) -> Path:
    return Path(home) / "backbones"


def embedded_backbone_dir(home: Path, training_key: str) -> Path:
    """``<home>/backbones/embedded-<training key>``: exists only once training completed."""
    return backbones_dir(home) / f"embedded-{training_key}"


# --------------------------------------------------------------------------- latent stores
def latent_store_path(home: Path, dataset_key: str, vae_fingerprint: str, class_id: str,
                      split: str = "train") -> Path:
    """``<home>/latents/<dataset_key>/<vae_fingerprint>/<class_id>.h5``.

    Stores of a split other than "train" (e.g. "test") get ``<class_id>@<split>.h5``;
    "val" and "fit" are subsets of "train": select their rows with ``LatentStore.select``.
    """
    from .data import check_path_component

    for value, what in ((dataset_key, "dataset_key"), (vae_fingerprint, "vae_fingerprint"),
                        (class_id, "class id"), (split, "split")):
        check_path_component(value, what)
    name = class_id if split == "train" else f"{class_id}@{split}"
    return Path(home) / "latents" / dataset_key / vae_fingerprint / f"{name}.h5"


def latent_store_file(cfg: ExperimentConfig, home: Path, class_id: str, vae_fingerprint: str) -> Path:
    """The training-split latent store of one class of the configured dataset."""
    from .data import open_dataset

    return latent_store_path(Path(home), open_dataset(cfg.dataset).dataset_key, vae_fingerprint, class_id)


def content_key_cache_file(home: Path, dataset_key: str, class_id: str) -> Path:
    """``<home>/latents/<dataset_key>/content/<class_id>.json``: the cached file hashes behind
    one class's content key (``dataset_content``); "content" is never a VAE fingerprint (hex)."""
    from .data import check_path_component

    check_path_component(dataset_key, "dataset_key")
    check_path_component(class_id, "class id")
    return Path(home) / "latents" / dataset_key / "content" / f"{class_id}.json"


# --------------------------------------------------------------------------- one experiment's outputs
def run_dir(cfg: ExperimentConfig, home: Path) -> Path:
    """Outputs that depend on the experiment (modes, distilled sets, students, reports):
    ``runs/<config name>``, or ``runs/<config name>@validation`` when students are scored on the
    validation split (``evaluation.split``), whose modes, sets and runs never mix with the test ones."""
    suffix = "" if cfg.evaluation.split == "test" else f"@{cfg.evaluation.split}"
    return Path(home) / "runs" / f"{cfg.name}{suffix}"


def modes_file(cfg: ExperimentConfig, home: Path, class_id: str, finder: str | None = None) -> Path:
    """``modes/<class>.h5``: the modes of the config's finder (``modes``); ``finder`` (a
    ``config_methods.finder_key``) names another finder, one a method variant chose:
    ``modes/by_finder/<finder>/<class>.h5``."""
    if finder is None:
        return run_dir(cfg, home) / "modes" / f"{class_id}.h5"
    return run_dir(cfg, home) / "modes" / "by_finder" / finder / f"{class_id}.h5"


def distilled_root(cfg: ExperimentConfig, home: Path) -> Path:
    return run_dir(cfg, home) / "distilled"


def distill_lock(cfg: ExperimentConfig, home: Path, method: str, class_id: str) -> Path:
    """``<distilled root>/.locks/<method>.<class_id>``: runs of one (method, class) take turns on it."""
    return distilled_root(cfg, home) / ".locks" / f"{method}.{class_id}"


def set_dir(root: Path, method: str, ipc: int, gen_seed: int) -> Path:
    """One distilled set: ``<distilled root>/<method>/ipc<k>/seed<s>``."""
    return Path(root) / method / f"ipc{ipc}" / f"seed{gen_seed}"


def distilled_set_dir(cfg: ExperimentConfig, home: Path, method: str, ipc: int, gen_seed: int) -> Path:
    return set_dir(distilled_root(cfg, home), method, ipc, gen_seed)


def set_images_dir(set_root: Path, class_id: str | None = None) -> Path:
    """``<set>/images`` (an ImageFolder root), or one class's folder in it."""
    images = Path(set_root) / "images"
    return images / class_id if class_id is not None else images


def set_manifest_file(set_root: Path, class_id: str) -> Path:
    return Path(set_root) / "manifest" / f"{class_id}.csv"


def set_latents_file(set_root: Path, class_id: str) -> Path:
    return Path(set_root) / "latents" / f"{class_id}.h5"


def set_staging_dir(set_root: Path) -> Path:
    """Where a class's images are written before they replace ``images/<class>`` in one rename."""
    return Path(set_root) / ".staging"


def set_of_png(png: Path) -> tuple[Path, str]:
    """(set root, class id) of ``<set>/images/<class>/<file>.png``."""
    png = Path(png)
    return png.parent.parent.parent, png.parent.name


def teacher_dir(cfg: ExperimentConfig, home: Path) -> Path:
    return run_dir(cfg, home) / "teacher"


def teacher_weights_file(cfg: ExperimentConfig, home: Path) -> Path:
    return teacher_dir(cfg, home) / "model.safetensors"


def students_file(cfg: ExperimentConfig, home: Path, method: str) -> Path:
    """The sweep's table of one method: ``students/<method>.csv``."""
    return run_dir(cfg, home) / "students" / f"{method}.csv"


def student_runs_dir(cfg: ExperimentConfig, home: Path) -> Path:
    """One JSON record per finished student run, keyed by its settings and inputs."""
    return run_dir(cfg, home) / "students" / "runs"


def diversity_dir(cfg: ExperimentConfig, home: Path) -> Path:
    return run_dir(cfg, home) / "diversity"


def report_dir(cfg: ExperimentConfig, home: Path) -> Path:
    return run_dir(cfg, home) / "report"
