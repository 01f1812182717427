"""The pipeline's stages as plain functions: what each Dagster asset calls.

Every stage reads its inputs from and writes its outputs to the storage root,
so stages share nothing in memory and run the same from a notebook, a script
or any Dagster executor. A loaded backbone is cached per process
(``get_backbone``), never passed between stages.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from . import storage
from .config import ExperimentConfig, ModesConfig, finder_key
from .files import atomic_output
from .modes import ModeFinder
from .progress import StageProgress, no_progress

log = logging.getLogger("mgd3")



# --------------------------------------------------------------------------- dataset
def open_source(cfg: ExperimentConfig):
    from .data import open_dataset

    return open_dataset(cfg.dataset)


def class_infos(cfg: ExperimentConfig) -> list:
    """The configured classes (``data.ClassInfo``), in label order."""
    return open_source(cfg).classes()


def class_info(cfg: ExperimentConfig, class_id: str):
    for c in class_infos(cfg):
        if c.id == class_id:
            return c
    raise KeyError(f"class {class_id!r} is not in the configured dataset; check dataset.classes")


# --------------------------------------------------------------------------- backbone
_BACKBONES: dict[tuple, object] = {}
_BACKBONE_LOCK = threading.Lock()


def backbone_fingerprint(cfg: ExperimentConfig, home: Path) -> str | None:
    from . import backbones

    return backbones.backbone_fingerprint(cfg, Path(home))


def vae_fingerprint(cfg: ExperimentConfig, home: Path) -> str:
    """The fingerprint latent stores are kept under, without loading any weights."""
    from . import backbones

    fp = backbones.backbone_vae_fingerprint(cfg, Path(home))
    if fp is None:
        raise FileNotFoundError("the embedded backbone has not been trained yet; materialize the backbone asset first")
    return fp


def ensure_backbone(cfg: ExperimentConfig, home: Path, progress=None) -> str:
    """Train (or reuse) a backbone the pipeline trains, check it loads; returns its fingerprint."""
    from . import backbones

    backbones.ensure_backbone(cfg, Path(home), progress=progress)
    return get_backbone(cfg, home).fingerprint


def get_backbone(cfg: ExperimentConfig, home: Path):
    """The configured backbone, loaded once per process and fingerprint."""
    from . import backbones

    # A text-to-image backbone holds the class prompts: a changed class list needs a new one.
    prompts = cfg.dataset.model_dump_json() if cfg.backbone.kind == "stable_diffusion" else None
    key = (cfg.backbone.model_dump_json(), str(home), backbone_fingerprint(cfg, home), prompts)
    with _BACKBONE_LOCK:
        if key not in _BACKBONES:
            _BACKBONES.clear()  # one backbone at a time: they can be large
            _BACKBONES[key] = backbones.load_backbone(cfg, Path(home))
            log.info("loaded the %s backbone %s in process %d", cfg.backbone.kind, key[2], os.getpid())
        return _BACKBONES[key]


# --------------------------------------------------------------------------- latents
def class_content_key(cfg: ExperimentConfig, home: Path, class_id: str) -> str:
    """Key of one class's image content (``dataset_content.class_content_key``), with its
    file-hash cache at ``storage.content_key_cache_file``."""
    return _class_content(cfg, home, class_id)[1].key


def _class_content(cfg: ExperimentConfig, home: Path, class_id: str):
    """(a fresh ImageSource, the ``dataset_content.ClassContent`` of the class as it lists it now)."""
    from .dataset_content import class_content

    source = open_source(cfg)
    return source, class_content(source, class_id, storage.content_key_cache_file(home, source.dataset_key, class_id))


def _stored_content_key(path: Path) -> str | None:
    with h5py.File(path, "r") as f:
        value = f.attrs.get("content_key")
    return value if isinstance(value, str) else None


def encode_latents(cfg: ExperimentConfig, home: Path, class_id: str, progress: StageProgress = no_progress):
    """Encode one class's training images into its latent store; a valid store encoded
    from the same image content (``class_content_key``) is reused. The store records the
    content key of the files it was encoded from: a class whose files change while it is
    encoded is encoded again (``dataset_content.encode_settled``)."""
    from .dataset_content import encode_settled
    from .latent_writer import encode_class
    from .latents import LatentStoreError, validate_latent_store

    source, content = _class_content(cfg, home, class_id)
    vae_fp = vae_fingerprint(cfg, home)
    path = storage.latent_store_file(cfg, home, class_id, vae_fp)
    if path.exists():  # a valid store of the same images is reused without loading the model
        try:
            info = validate_latent_store(path, expected_vae_fingerprint=vae_fp)
            if _stored_content_key(path) == content.key:
                return info
            log.info("re-encoding %s: the images of class %s changed", path, class_id)
        except LatentStoreError as e:
            log.warning("re-encoding %s: %s", path, e)
    backbone = get_backbone(cfg, home)
    return encode_settled(class_id, source, content, lambda: _class_content(cfg, home, class_id), lambda src, key: encode_class(
        src, class_id, "train", backbone.encode, path,
        vae_fingerprint=backbone.vae_fingerprint, scaling_factor=backbone.scaling_factor,
        batch_size=cfg.encode.batch_size, chunk_size=cfg.encode.chunk_size, dtype=cfg.encode.dtype,
        attrs={"image_size": cfg.dataset.image_size, "content_key": key},
        progress=lambda done, total: progress(f"encoded {done}/{total} images of class {class_id}", done / max(total, 1)),
    ))


# --------------------------------------------------------------------------- modes
@dataclass
class ClassModes:
    """Modes of one class for one (IPC, generation seed)."""

    centroids: np.ndarray  # (k, C, h, w) float32
    counts: np.ndarray  # (k,)
    assignment: np.ndarray  # (N,) mode of each training latent
    inertia: float
    closest_index: np.ndarray  # (k,) row of the clustered latents (``training_rows``) closest to each centroid
    closest_items: list[str]  # their item ids

    def finder(self) -> ModeFinder:
        """These modes as a fitted ``ModeFinder`` (``predict`` assigns latents to them)."""
        return ModeFinder.restored(self.centroids, self.counts)


def mode_finder(cfg: ExperimentConfig, ipc: int, gen_seed: int, class_id: str,
                modes: ModesConfig | None = None) -> ModeFinder:
    """The (unfitted) mode finder of one class, IPC and generation seed: the config's ``modes``, or
    ``modes`` (a method variant's, ``ExperimentConfig.modes_for``)."""
    modes = modes or cfg.modes
    return ModeFinder(ipc, modes.method, n_init=modes.n_init, max_iter=modes.max_iter,
                      random_state=modes.seed + gen_seed, class_name=class_id)


def training_rows(cfg: ExperimentConfig, index: list[str], class_id: str) -> np.ndarray:
    """Rows of a class's latent store (item ids ``index``) that modes and real-image baselines
    draw from: every row, or with ``evaluation.split: validation`` those of the "fit" split (the
    training split minus the validation images students are then scored on)."""
    split = cfg.evaluation.train_split()
    if split == "train":
        return np.arange(len(index))
    keep = set(open_source(cfg).items(class_id, split))
    return np.asarray([i for i, item in enumerate(index) if item in keep], dtype=np.int64)


def modes_path(cfg: ExperimentConfig, home: Path, class_id: str, modes: ModesConfig | None = None) -> Path:
    """Where the modes of ``modes`` (default: the config's) are kept: the config's finder in
    ``modes/<class>.h5`` (the ``mode_centroids`` asset), any other in ``modes/by_finder/``
    (``variant_modes``)."""
    other = modes is not None and modes != cfg.modes
    return storage.modes_file(cfg, home, class_id, finder_key(modes) if other else None)


def discover_modes(cfg: ExperimentConfig, home: Path, class_id: str, vae_fingerprint: str,
                   modes: ModesConfig | None = None) -> dict:
    """Cluster one class's latents (the rows ``training_rows`` selects) for every IPC and generation
    seed with the config's mode finder (or ``modes``); write them atomically.

    Returns a summary: path, content hash, and per (ipc, seed) counts and inertia."""
    from .latents import read_latent_store

    store = read_latent_store(
        storage.latent_store_file(cfg, home, class_id, vae_fingerprint), expected_vae_fingerprint=vae_fingerprint
    )
    rows = training_rows(cfg, store.index, class_id)
    lat = np.asarray(store.latents[rows], dtype=np.float32)
    index = [store.index[i] for i in rows]
    shape = lat.shape[1:]
    modes = modes or cfg.modes
    path = modes_path(cfg, home, class_id, modes)
    summary: dict = {"path": str(path), "modes": {}}
    h = hashlib.sha256()
    with atomic_output(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs.update(
            class_id=class_id, vae_fingerprint=vae_fingerprint, method=modes.method,
            n_init=modes.n_init, base_seed=modes.seed, n_latents=len(lat),
        )
        if cfg.evaluation.split != "test":  # the rows clustered: the fit split (absent: all training rows)
            f.attrs["split"] = cfg.evaluation.train_split()
        f.create_dataset("index", data=np.asarray(index, dtype=h5py.string_dtype()))
        for ipc in cfg.ipc:
            for gen_seed in cfg.evaluation.generation_seeds:
                finder = mode_finder(cfg, ipc, gen_seed, class_id, modes).fit(lat)
                closest = finder.closest_real(lat)
                g = f.create_group(f"ipc{ipc}/seed{gen_seed}")
                g.create_dataset("centroids", data=finder.centroids_.reshape(ipc, *shape))
                g.create_dataset("counts", data=finder.counts_)
                g.create_dataset("assignment", data=finder.labels_)
                g.create_dataset("closest_index", data=closest)
                g.attrs["inertia"] = finder.inertia_
                h.update(finder.centroids_.tobytes())
                summary["modes"][f"ipc{ipc}/seed{gen_seed}"] = {
                    "counts": finder.counts_.tolist(), "inertia": finder.inertia_,
                    "closest_items": [index[i] for i in closest],
                }
    summary["content_hash"] = h.hexdigest()[:16]
    return summary


def read_modes(cfg: ExperimentConfig, home: Path, class_id: str, ipc: int, gen_seed: int,
               modes: ModesConfig | None = None) -> ClassModes:
    """One class's modes for (IPC, generation seed), of the config's finder or of ``modes``."""
    path = modes_path(cfg, home, class_id, modes)
    asset = "mode_centroids" if path == storage.modes_file(cfg, home, class_id) else "variant_modes"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no modes for class {class_id!r}; materialize {asset} first")
    with h5py.File(path, "r") as f:
        key = f"ipc{ipc}/seed{gen_seed}"
        if key not in f:
            raise KeyError(f"{path}: no modes for IPC {ipc}, generation seed {gen_seed}; re-materialize {asset}")
        g = f[key]
        index = [s.decode() if isinstance(s, bytes) else str(s) for s in f["index"][()]]
        ci = g["closest_index"][()]
        centroids = g["centroids"][()]
        if centroids.shape[0] != ipc:
            raise ValueError(f"{path}: {centroids.shape[0]} modes stored for IPC {ipc}")
        return ClassModes(centroids, g["counts"][()], g["assignment"][()], float(g.attrs["inertia"]),
                          ci, [index[i] for i in ci])
