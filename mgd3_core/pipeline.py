"""The pipeline's stages as plain functions: what each Dagster asset calls.

Every stage reads its inputs from and writes its outputs to the storage root,
so stages share nothing in memory and run the same from a notebook, a script
or any Dagster executor. A loaded backbone is cached per process
(``get_backbone``), never passed between stages.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch

from . import storage
from .config import DIFFUSION_METHODS, ExperimentConfig
from .distances import pairwise_distances
from .distilled import DistilledClass, write_distilled_class
from .files import atomic_output
from .images import to_uint8
from .modes import ModeFinder
from .progress import StageProgress, no_progress
from .sampling import SamplerSettings, image_seed, sample

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
    closest_index: np.ndarray  # (k,) row in the latent store closest to each centroid
    closest_items: list[str]  # their item ids

    def finder(self) -> ModeFinder:
        """These modes as a fitted ``ModeFinder`` (``predict`` assigns latents to them)."""
        return ModeFinder.restored(self.centroids, self.counts)


def mode_finder(cfg: ExperimentConfig, ipc: int, gen_seed: int, class_id: str) -> ModeFinder:
    """The configured (unfitted) mode finder of one class, IPC and generation seed."""
    return ModeFinder(ipc, cfg.modes.method, n_init=cfg.modes.n_init, max_iter=cfg.modes.max_iter,
                      random_state=cfg.modes.seed + gen_seed, class_name=class_id)


def discover_modes(cfg: ExperimentConfig, home: Path, class_id: str, vae_fingerprint: str) -> dict:
    """Cluster one class's latents for every IPC and generation seed; write them atomically.

    Returns a summary: path, content hash, and per (ipc, seed) counts and inertia."""
    from .latents import read_latent_store

    store = read_latent_store(
        storage.latent_store_file(cfg, home, class_id, vae_fingerprint), expected_vae_fingerprint=vae_fingerprint
    )
    lat = np.asarray(store.latents, dtype=np.float32)
    shape = lat.shape[1:]
    path = storage.modes_file(cfg, home, class_id)
    summary: dict = {"path": str(path), "modes": {}}
    h = hashlib.sha256()
    with atomic_output(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs.update(
            class_id=class_id, vae_fingerprint=vae_fingerprint, method=cfg.modes.method,
            n_init=cfg.modes.n_init, base_seed=cfg.modes.seed, n_latents=len(lat),
        )
        f.create_dataset("index", data=np.asarray(store.index, dtype=h5py.string_dtype()))
        for ipc in cfg.ipc:
            for gen_seed in cfg.evaluation.generation_seeds:
                finder = mode_finder(cfg, ipc, gen_seed, class_id).fit(lat)
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
                    "closest_items": [store.index[i] for i in closest],
                }
    summary["content_hash"] = h.hexdigest()[:16]
    return summary


def read_modes(cfg: ExperimentConfig, home: Path, class_id: str, ipc: int, gen_seed: int) -> ClassModes:
    path = storage.modes_file(cfg, home, class_id)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no modes for class {class_id!r}; materialize mode_centroids first")
    with h5py.File(path, "r") as f:
        key = f"ipc{ipc}/seed{gen_seed}"
        if key not in f:
            raise KeyError(f"{path}: no modes for IPC {ipc}, generation seed {gen_seed}; re-materialize mode_centroids")
        g = f[key]
        index = [s.decode() if isinstance(s, bytes) else str(s) for s in f["index"][()]]
        ci = g["closest_index"][()]
        centroids = g["centroids"][()]
        if centroids.shape[0] != ipc:
            raise ValueError(f"{path}: {centroids.shape[0]} modes stored for IPC {ipc}")
        return ClassModes(centroids, g["counts"][()], g["assignment"][()], float(g.attrs["inertia"]),
                          ci, [index[i] for i in ci])


# --------------------------------------------------------------------------- distillation
def _distances(latents: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distance of image i to its own mode i, and to the nearest other mode."""
    d = pairwise_distances(latents.reshape(len(latents), -1), centroids.reshape(len(centroids), -1))
    own = d[np.arange(len(d)), np.arange(len(d))]
    if d.shape[1] > 1:
        d_other = d.copy()
        d_other[np.arange(len(d)), np.arange(len(d))] = np.inf
        other = d_other.min(1)
    else:
        other = np.full(len(d), np.nan)
    return own, other


def image_seeds(cfg: ExperimentConfig, class_id: str, ipc: int, gen_seed: int) -> list[int]:
    """Sampling seeds of the ``ipc`` images of one class in one generation seed's set."""
    return [image_seed(cfg.seed * 1_000_003 + gen_seed, class_id, ipc, i) for i in range(ipc)]


SetKey = tuple[int, int]  # (IPC, generation seed): one distilled set of a method


def set_keys(cfg: ExperimentConfig) -> list[SetKey]:
    """Every (IPC, generation seed) set a method writes, in a fixed order."""
    return [(ipc, s) for ipc in cfg.ipc for s in cfg.evaluation.generation_seeds]


@dataclass
class SetContent:
    """One class of one distilled set, before it is written."""

    latents: np.ndarray  # (ipc, C, h, w) float32
    images: np.ndarray  # (ipc, C, H, W) uint8
    extra: list[dict]  # per image: the method's own manifest columns


@dataclass
class DistillResult:
    method: str
    class_id: str
    classes: list[DistilledClass] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    preview: np.ndarray | None = None  # uint8 images of the first set, for thumbnails


def distill_class(
    cfg: ExperimentConfig, home: Path, method: str, class_id: str, progress: StageProgress = no_progress
) -> DistillResult:
    """Write every (IPC, generation seed) set of one method for one class.

    Two runs of the same (method, class) at once, e.g. on two cluster workers sharing the
    storage root, take turns: the second waits for the first's lock (``flock``, so the
    filesystem must support it) and then writes the same files again; their outputs never mix.
    """
    from .latent_writer import writer_lock

    with writer_lock(storage.distill_lock(cfg, home, method, class_id), timeout=None):
        return _distill_class(cfg, home, method, class_id, progress)


def _distill_class(cfg: ExperimentConfig, home: Path, method: str, class_id: str,
                   progress: StageProgress) -> DistillResult:
    info = class_info(cfg, class_id)
    keys = set_keys(cfg)
    modes = {key: read_modes(cfg, home, class_id, *key) for key in keys}
    needs_backbone = method in DIFFUSION_METHODS or method == "decoded_centroids"
    backbone = get_backbone(cfg, home) if needs_backbone else None
    fingerprint = backbone.fingerprint if backbone else (backbone_fingerprint(cfg, home) or "")
    if method in DIFFUSION_METHODS:
        contents = _sampled_sets(cfg, backbone, method, info, keys, modes, progress)
    elif method == "decoded_centroids":
        contents = _decoded_centroid_sets(cfg, backbone, keys, modes)
    elif method in ("random_real", "closest_real"):
        contents = _real_image_sets(cfg, home, method, class_id, keys, modes)
    else:
        raise ValueError(f"unknown method {method!r}")

    base = {"method": method, "class_id": class_id, "class_name": info.name, "class_label": info.label,
            "backbone_fingerprint": fingerprint, "config": cfg.name}
    result = DistillResult(method, class_id)
    for ipc, s in keys:
        content = contents[(ipc, s)]
        rows = _lineage_rows(base, method, ipc, s, content, modes[(ipc, s)])
        written = write_distilled_class(storage.distilled_set_dir(cfg, home, method, ipc, s), class_id,
                                        content.images, content.latents, rows)
        result.classes.append(written)
        result.rows.extend(rows)
        if result.preview is None:
            result.preview = content.images
    return result


def _sampled_sets(cfg: ExperimentConfig, backbone, method: str, info, keys: list[SetKey],
                  modes: dict[SetKey, ClassModes], progress: StageProgress) -> dict[SetKey, SetContent]:
    """A diffusion method: every set of the class sampled in one batched run (MGD3 Sec. 3.2)."""
    settings = SamplerSettings.from_config(cfg.sampler_for(method))
    labels, seeds, centroids = [], [], []
    for ipc, s in keys:
        labels += [info.label] * ipc
        seeds += image_seeds(cfg, info.id, ipc, s)
        centroids += list(modes[(ipc, s)].centroids)
    total_steps = settings.steps * -(-len(labels) // cfg.sampler.batch_size)
    done = [0]

    def on_step(_step):
        done[0] += 1
        if done[0] % 10 == 0 or done[0] == total_steps:
            progress(f"{method}/{info.id}: sampling step {done[0]}/{total_steps}", done[0] / total_steps)

    out = sample(backbone, labels, seeds, modes=torch.from_numpy(np.stack(centroids)), settings=settings,
                 batch_size=cfg.sampler.batch_size, callback=on_step)
    images = _decode(backbone, out.latents, cfg.sampler.batch_size)
    contents, pos = {}, 0
    for ipc, s in keys:
        contents[(ipc, s)] = SetContent(out.latents[pos:pos + ipc].numpy(), images[pos:pos + ipc],
                                        [{"seed": seeds[pos + i], **settings.as_dict(), **_prompt_row(backbone, info)}
                                         for i in range(ipc)])
        pos += ipc
    return contents


def _decoded_centroid_sets(cfg: ExperimentConfig, backbone, keys: list[SetKey],
                           modes: dict[SetKey, ClassModes]) -> dict[SetKey, SetContent]:
    """The baseline that decodes the mode centroids themselves."""
    contents = {}
    for key in keys:
        c = torch.from_numpy(modes[key].centroids)
        contents[key] = SetContent(c.numpy(), _decode(backbone, c, cfg.sampler.batch_size), [{} for _ in c])
    return contents


def _real_image_sets(cfg: ExperimentConfig, home: Path, method: str, class_id: str, keys: list[SetKey],
                     modes: dict[SetKey, ClassModes]) -> dict[SetKey, SetContent]:
    """The real-image baselines: ``ipc`` random training images, or the one closest to each mode."""
    from .latents import read_latent_store

    source = open_source(cfg)
    vae_fp = vae_fingerprint(cfg, home)  # the fingerprint only: real images need no model
    store = read_latent_store(storage.latent_store_file(cfg, home, class_id, vae_fp),
                              expected_vae_fingerprint=vae_fp)
    contents = {}
    for ipc, s in keys:
        if method == "closest_real":
            idx = modes[(ipc, s)].closest_index
        else:
            rng = np.random.default_rng([cfg.seed, s, int(hashlib.sha256(class_id.encode()).hexdigest()[:8], 16)])
            idx = np.sort(rng.choice(len(store.index), size=ipc, replace=False))
        items = [store.index[i] for i in idx]
        contents[(ipc, s)] = SetContent(np.asarray(store.latents[np.asarray(idx)], dtype=np.float32),
                                        source.load(class_id, "train", items), [{"source_item": it} for it in items])
    return contents


def _lineage_rows(base: dict, method: str, ipc: int, gen_seed: int, content: SetContent,
                  modes: ClassModes) -> list[dict]:
    """The manifest rows of one class of one set (``distilled.MANIFEST_COLUMNS``)."""
    own, other = _distances(content.latents, modes.centroids)
    # A random real image is not tied to a mode: report the nearest one.
    mode_idx = modes.finder().predict(content.latents) if method == "random_real" else np.arange(ipc)
    rows = []
    for i in range(ipc):
        r = dict(base, set=f"{method}/ipc{ipc}/seed{gen_seed}", ipc=ipc, gen_seed=gen_seed,
                 mode_index=int(mode_idx[i]), mode_count=int(modes.counts[mode_idx[i]]), dist_to_mode=float(own[i]),
                 dist_to_nearest_other_mode=float(other[i]))
        r.update(content.extra[i])
        rows.append(r)
    return rows


def _prompt_row(backbone, info) -> dict:
    """Lineage of a text-to-image backbone's conditioning: the class's prompt and the negative
    prompt (CFG's unconditional branch). Empty for class-label backbones."""
    if not hasattr(backbone, "prompt_for"):
        return {}
    return {"prompt": backbone.prompt_for(info.label), "negative_prompt": backbone.prompt_for(backbone.null_class)}


@torch.inference_mode()
def _decode(backbone, latents: torch.Tensor, batch_size: int) -> np.ndarray:
    parts = [to_uint8(backbone.decode(latents[i:i + batch_size].to(backbone.device, backbone.dtype)))
             for i in range(0, len(latents), batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0,), np.uint8)
