"""The third-party libraries a run imports, preloaded once by ``run_launcher``'s fork server.

The project's code location (``PROJECT``, without building its definitions) is imported too, for
the libraries it pulls in (Dagster's storage and execution modules, SQLAlchemy, ...: about 1 s a
run); each run's process then forgets the project's own modules (``fork_server``) and imports them
afresh, so an edit to the code or the config takes effect at the next run. Nothing here starts a
thread or touches a device (a fork after that would not be safe). A module that fails to import is
left to the run, which then reports the error itself.
"""

from __future__ import annotations

import importlib

MODULES = [
    "numpy", "pandas", "h5py", "yaml", "pydantic", "PIL.Image", "sklearn.cluster", "safetensors.torch",
    "torch", "torch.nn", "torchvision",
    "diffusers",  # lazy at the top: the classes below load their submodules
    "matplotlib.figure", "matplotlib.backends.backend_agg",
    "dagster",
]
PROJECT = "mgd3_assets.definitions"
CLASSES = [("diffusers", "AutoencoderKL"), ("diffusers", "DiTTransformer2DModel"), ("diffusers", "DDPMScheduler"),
           ("diffusers", "UNet2DConditionModel")]


def preload() -> list[str]:
    """Import what can be imported; the names that failed."""
    failed = []
    for name in MODULES:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - the run imports it again and reports the error
            failed.append(name)
    for module, attribute in CLASSES:
        try:
            getattr(importlib.import_module(module), attribute)
        except Exception:  # noqa: BLE001
            failed.append(f"{module}.{attribute}")
    try:
        importlib.import_module(PROJECT)
    except Exception:  # noqa: BLE001 - an edit in progress: each run imports it and reports
        failed.append(PROJECT)
    return failed


FAILED = preload()
