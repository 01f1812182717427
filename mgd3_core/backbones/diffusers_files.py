"""The diffusers directory layout: finding a component, its config and its weights.

A diffusers model directory holds ``config.json`` and its weights as
``diffusion_pytorch_model.safetensors`` (or shards listed in
``diffusion_pytorch_model.safetensors.index.json``). A pipeline root (e.g. a
copy of ``facebook/DiT-XL-2-256``) holds one such directory per component:
``transformer/``, ``vae/``, ``scheduler/`` (config only).

Only safetensors weights are accepted: a ``.bin`` file is a pickle and
unpickling an untrusted file can run arbitrary code.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .base import hash_files

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
SCHEDULER_CONFIG_NAME = "scheduler_config.json"


class BackboneFilesError(FileNotFoundError):
    """A model directory that is missing, incomplete or in the wrong format.

    The message names the directory (or file) and says what was expected.
    """


class BackboneMismatchError(ValueError):
    """Components that cannot work together (latent channels, sizes, classes)."""


def resolve_component_dir(path: str | os.PathLike, component: str, what: str) -> Path:
    """The directory holding ``config.json`` of one component.

    ``path`` may be a pipeline root with a ``<component>/`` subfolder or the
    component folder itself. ``what`` names the setting in errors (e.g.
    ``"backbone.vae_dir"``).
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise BackboneFilesError(
            f"{what} = {root}: directory does not exist; point it at a local diffusers-layout "
            f"directory (a pipeline root with {component}/ or the {component} folder itself)"
        )
    if not root.is_dir():
        raise BackboneFilesError(f"{what} = {root}: is a file, expected a directory in the diffusers layout")
    for candidate in (root / component, root):
        if (candidate / "config.json").is_file():
            return candidate.resolve()
    raise BackboneFilesError(
        f"{what} = {root}: no config.json in {root / component} or {root}; expected the diffusers "
        f"layout (save_pretrained output, or a pipeline root with a {component}/ folder)"
    )


def read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise BackboneFilesError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BackboneFilesError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(data, dict):
        raise BackboneFilesError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def weight_files(component_dir: Path, name: str = WEIGHTS_NAME, index_name: str = WEIGHTS_INDEX_NAME) -> list[Path]:
    """The safetensors files ``from_pretrained`` will read from ``component_dir``: ``name``, or
    the shards listed in ``index_name`` (transformers models: ``model.safetensors``).

    Raises BackboneFilesError naming the directory when there are none (or only
    pickled ``.bin`` weights), or when a shard listed in the index is missing.
    """
    single = component_dir / name
    if single.is_file():
        return [single]
    index = component_dir / index_name
    if index.is_file():
        shards = sorted(set(read_json(index).get("weight_map", {}).values()))
        if not shards:
            raise BackboneFilesError(f"{index}: the weight_map lists no shard files")
        missing = [s for s in shards if not (component_dir / s).is_file()]
        if missing:
            raise BackboneFilesError(f"{index}: shard file(s) {missing} listed in the index are missing")
        return [index] + [component_dir / s for s in shards]
    pickled = sorted(p.name for p in component_dir.glob("*.bin"))
    hint = (
        f" (found pickled weights {pickled}: they are never loaded because unpickling can run code; "
        "convert them to safetensors, e.g. load once in a trusted environment and save_pretrained)"
        if pickled else ""
    )
    raise BackboneFilesError(f"{component_dir}: no {name} (or sharded index){hint}")


# In-process memo: (path, size, mtime, inode) of every file -> fingerprint. A
# multi-GB DiT-XL/2 is re-hashed only when one of its files changes on disk.
_FINGERPRINT_MEMO: dict[tuple, str] = {}
FINGERPRINT_CACHE_VERSION = 1


def _cache_file(cache_dir: Path, files: list[Path]) -> Path:
    digest = hashlib.sha256("\n".join(str(p.resolve()) for p in files).encode()).hexdigest()[:24]
    return Path(cache_dir) / f"{digest}.json"


def _read_cached(path: Path, key: list) -> str | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # absent, torn or foreign: hash again and overwrite
    if data.get("version") == FINGERPRINT_CACHE_VERSION and data.get("files") == key:
        fp = data.get("fingerprint")
        return fp if isinstance(fp, str) else None
    return None


def _write_cached(path: Path, key: list, fingerprint: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": FINGERPRINT_CACHE_VERSION, "files": key,
                                   "fingerprint": fingerprint}))
        os.replace(tmp, path)
    except OSError:  # a read-only cache only costs a re-hash next time
        pass


def files_fingerprint(files: list[Path], cache_dir: Path | None = None) -> str:
    """``hash_files(files)``, recomputed only when a file's (path, size, mtime, inode) changes.

    Hashing DiT-XL/2's 2.7 GB of weights takes seconds to minutes, and every
    step process that needs the fingerprint would pay it. So the hash is kept
    per process and, with ``cache_dir``, on disk (one JSON file per set of
    files) next to the files' (path, size, mtime, inode). A file rewritten in
    place with the same size and a restored mtime would keep its old
    fingerprint; touch it (or delete the cache file) to force a re-hash.
    """
    key = [[str(p), st.st_size, st.st_mtime_ns, st.st_ino] for p in files for st in [p.stat()]]
    memo_key = tuple(tuple(k) for k in key)
    if memo_key in _FINGERPRINT_MEMO:
        return _FINGERPRINT_MEMO[memo_key]
    cached = _read_cached(_cache_file(cache_dir, files), key) if cache_dir is not None else None
    fingerprint = cached or hash_files(files)
    if cache_dir is not None and cached is None:
        _write_cached(_cache_file(cache_dir, files), key, fingerprint)
    _FINGERPRINT_MEMO[memo_key] = fingerprint
    return fingerprint


def component_fingerprint(component_dir: Path, cache_dir: Path | None = None) -> str:
    """Hash of a component's ``config.json`` and the weight files it loads from (``files_fingerprint``)."""
    return files_fingerprint([component_dir / "config.json"] + weight_files(component_dir), cache_dir)


def check_class_name(config: dict, config_path: Path, allowed: tuple[str, ...]) -> None:
    """Refuse a config written for another model class (a UNet where a DiT is expected...)."""
    name = config.get("_class_name")
    if name is not None and name not in allowed:
        raise BackboneFilesError(
            f"{config_path}: _class_name is {name!r}, expected one of {list(allowed)}; "
            "point the setting at the right component folder"
        )


def load_pretrained(model_cls, component_dir: Path, dtype, *, library: str = "diffusers"):
    """``model_cls.from_pretrained`` on a local component directory, refusing weights that
    do not fit its ``config.json``.

    diffusers and transformers initialise parameters that the weights lack at
    random and only warn; a transformer whose config asks for more layers than
    its weights hold would then load "successfully" and sample noise. Raises
    BackboneFilesError (unloadable files) or BackboneMismatchError (missing,
    unexpected or differently shaped parameters), naming the directory.
    ``library``: ``"diffusers"`` (DiT, UNet, VAE) or ``"transformers"`` (the
    text encoder), whose ``from_pretrained`` spell the dtype differently.
    """
    name = model_cls.__name__
    if library == "diffusers":
        # low_cpu_mem_usage: the faster path needs `accelerate`, not a dependency.
        options = {"torch_dtype": dtype, "low_cpu_mem_usage": False}
    elif library == "transformers":
        options = {"dtype": dtype}
    else:
        raise ValueError(f"load_pretrained: library must be 'diffusers' or 'transformers', not {library!r}")
    try:
        model, info = model_cls.from_pretrained(
            component_dir, local_files_only=True, use_safetensors=True, output_loading_info=True, **options,
        )
    except (OSError, ValueError, RuntimeError) as e:
        raise BackboneFilesError(f"{component_dir}: cannot load {name} ({e})") from e
    problems = [
        f"{len(info[key])} {what}, e.g. {sorted(map(str, info[key]))[:3]}"
        for key, what in (("missing_keys", "parameter(s) of the model missing from the weights"),
                          ("unexpected_keys", "weight(s) the model has no parameter for"),
                          ("mismatched_keys", "weight(s) of another shape"))
        if info.get(key)
    ]
    if problems:
        raise BackboneMismatchError(
            f"{component_dir}: the weights are of another architecture than config.json describes "
            f"({'; '.join(problems)}); use the config.json saved with these weights"
        )
    return model
