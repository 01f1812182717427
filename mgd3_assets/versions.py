"""Code versions: which part of the experiment config each asset's output depends on.

A code version changes when, and only when, a setting that changes the asset's
output changes, so Dagster marks exactly those assets stale. The class list is
left out of the per-class stages (classes are partitions: adding one must not
make the other classes' partitions stale); it is part of the version of the
embedded backbone, which is trained on the classes, and of the gathering stages
(teacher, students, reports), which read them all. Bump ``STAGE_VERSIONS`` when
the code of a stage changes its output for the same config.
"""

from __future__ import annotations

import hashlib
import json

import dagster as dg

from mgd3_core.config import ALL_METHODS, ExperimentConfig, finder_key

STAGE_VERSIONS = {
    "backbone": 1,
    "latent_store": 1,
    "mode_centroids": 1,
    "variant_modes": 1,
    "distilled_images": 1,
    "teacher": 1,
    "full_data_students": 1,
    "students": 1,
    "evaluation_report": 1,
    "diversity_report": 1,
}


def _dataset(cfg: ExperimentConfig) -> dict:
    d = cfg.dataset.model_dump(mode="json")
    d.pop("classes", None)
    return d


def _split(cfg: ExperimentConfig) -> dict:
    """``evaluation.split`` where it is not the default "test": modes, real baselines and the teacher
    then learn from the fit split (the versions of test-split configs stay as they were)."""
    return {} if cfg.evaluation.split == "test" else {"split": cfg.evaluation.split}


def stage_inputs(cfg: ExperimentConfig, stage: str) -> dict:
    """The config values a stage's output depends on (JSON-able)."""
    dump = cfg.model_dump(mode="json")
    if stage == "backbone":
        # The backbone kind says what its trained weights depend on (backbones/registry.py).
        from mgd3_core.backbones.registry import backbone_kind

        return backbone_kind(cfg).version_inputs(cfg)
    if stage == "latent_store":
        return {"dataset": _dataset(cfg), "encode": dump["encode"]}
    if stage == "mode_centroids":
        return {"modes": dump["modes"], "ipc": dump["ipc"],
                "generation_seeds": dump["evaluation"]["generation_seeds"], **_split(cfg)}
    if stage == "variant_modes":
        # Each partition's finder (method, n_init) is its key; the rest of ``modes`` is shared.
        return {"modes": {k: dump["modes"][k] for k in ("max_iter", "seed")}, "ipc": dump["ipc"],
                "generation_seeds": dump["evaluation"]["generation_seeds"], **_split(cfg)}
    if stage == "distilled_images":
        # What every method shares; each method's own settings (the sampler, for the
        # diffusion methods) are the data version of its ``method_settings`` partition,
        # so a sampler change re-runs the diffusion methods only.
        return {"seed": dump["seed"], "ipc": dump["ipc"],
                "generation_seeds": dump["evaluation"]["generation_seeds"], **_split(cfg)}
    # The gathering stages read every class: the class list is part of what they compute.
    if stage == "teacher":
        ev = dump["evaluation"]
        # The teacher: the named model trained on the real data with the hard-label protocol.
        hard = cfg.evaluation.hard_for(ev["teacher"]["model"]).model_dump(mode="json")  # ev["hard"] unless overridden
        inputs = {"dataset": dump["dataset"], "hard": hard, "teacher": ev["teacher"],
                  "training_seeds": ev["training_seeds"], "evaluations": ev["evaluations"],
                  "ranking_evaluations": ev["ranking_evaluations"], "device": ev["device"], **_split(cfg)}
        if ev["teacher"]["model"] == "resnet18" and ev["bn_stats"] != "running":  # batch norm (saved with it);
            inputs["bn_stats"] = ev["bn_stats"]  # "running" as before the setting existed: same version
        return inputs
    if stage in ("full_data_students", "students", "evaluation_report", "diversity_report"):
        inputs = {"seed": dump["seed"], "ipc": dump["ipc"], "evaluation": dump["evaluation"],
                  "dataset": dump["dataset"]}
        # The reports show every listed method: removing a variant re-runs them (Dagster does not
        # count a removed upstream partition as a change). Left out for the six base names, so
        # those configs keep the versions they had before variants existed.
        if stage in ("evaluation_report", "diversity_report") and cfg.methods != list(ALL_METHODS):
            inputs["methods"] = cfg.methods
        return inputs
    raise KeyError(f"no code version rule for stage {stage!r}; add it to mgd3_assets/versions.py")


def method_settings(cfg: ExperimentConfig, method: str) -> dict:
    """The settings one distillation method's (or variant's) images depend on beyond the shared ones
    (``stage_inputs(cfg, "distilled_images")``): the effective sampler for a diffusion
    kind (defaults, the kind's own lambda / t_stop, ``method_overrides`` or the variant's settings)
    and, with a Stable Diffusion backbone, its prompt settings; nothing
    for the real-image methods and decoded centroids, which never run the sampler
    (decoding batch size changes no image beyond float rounding). A variant that is not a plain
    base method adds its kind, and its mode finder when that is not the config's ``modes``."""
    variant = cfg.variant(method)
    settings: dict = {}
    if variant.diffusion:
        settings["sampler"] = variant.sampler.model_dump(mode="json")
        if cfg.backbone.kind == "stable_diffusion":  # the prompts condition every generated image
            settings["stable_diffusion"] = cfg.backbone.model_dump(mode="json")["stable_diffusion"]
    if variant.name != variant.kind:
        settings["kind"] = variant.kind
        if variant.modes != cfg.modes:
            settings["mode_finder"] = finder_key(variant.modes)
    return settings


def class_version(cfg: ExperimentConfig, home, class_id: str, conditions: dict[str, str] | None = None) -> str:
    """Data version of the ``dataset`` partition of one class: its image content
    (``pipeline.class_content_key``) and, with a text-conditioned backbone, the prompt its
    images are generated from, which renaming the class changes (the name is not part of
    the per-class stages' code versions: classes are partitions). ``conditions``: the
    backbone's ``class_conditions`` when the caller has them for every class already."""
    from mgd3_core import pipeline
    from mgd3_core.backbones import backbone_class_conditions

    key = pipeline.class_content_key(cfg, home, class_id)
    condition = (backbone_class_conditions(cfg) if conditions is None else conditions).get(class_id)
    if condition is None:
        return key
    return hashlib.sha256(json.dumps([key, condition]).encode()).hexdigest()[:16]


def method_settings_version(cfg: ExperimentConfig, method: str) -> str:
    """Data version of the ``method_settings`` partition of ``method``."""
    payload = json.dumps([method, method_settings(cfg, method)], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def code_version(cfg: ExperimentConfig, stage: str) -> str:
    payload = json.dumps([stage, STAGE_VERSIONS[stage], stage_inputs(cfg, stage)], sort_keys=True)
    return f"v{STAGE_VERSIONS[stage]}-{hashlib.sha256(payload.encode()).hexdigest()[:12]}"


def combined_hash(parts: list[str]) -> str:
    """One data version for an output made of several content-hashed files."""
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def stage_asset(cfg: ExperimentConfig, stage: str, **asset_kwargs):
    """``dg.asset`` for one pipeline stage: named after the stage and code-versioned by it, so an
    asset states its stage once (``checked_config`` reads it back from the asset key)."""
    return dg.asset(name=stage, code_version=code_version(cfg, stage), **asset_kwargs)


def checked_config(context: dg.AssetExecutionContext, experiment) -> ExperimentConfig:
    """The experiment config at run time, refused if it no longer matches the loaded definitions.

    Partitions and code versions are fixed when the definitions load; running
    with a config edited since then would record outputs under the wrong version.
    The stage is the asset's name (``stage_asset``).
    """
    stage = context.asset_key.to_user_string()
    cfg = experiment.config()
    expected = context.assets_def.code_versions_by_key.get(context.asset_key)
    if expected is not None and code_version(cfg, stage) != expected:
        raise _config_changed(stage, f"code version {expected} loaded, {code_version(cfg, stage)} now")
    return cfg


def checked_method_settings(loaded: ExperimentConfig, now: ExperimentConfig, method: str) -> None:
    """Refuse a ``distilled_images`` run whose method settings (the sampler) were edited
    since the definitions loaded: the run would not match the observed ``method_settings``."""
    if method not in now.methods:  # a variant removed from (or renamed in) the file since loading
        raise _config_changed("distilled_images", f"method {method!r} is no longer in the config's methods")
    before, after = method_settings_version(loaded, method), method_settings_version(now, method)
    if before != after:
        raise _config_changed("distilled_images", f"settings of method {method!r}: {before} loaded, {after} now")


def _config_changed(stage: str, detail: str) -> dg.Failure:
    return dg.Failure(
        f"{stage}: the experiment config changed since the definitions were loaded ({detail}); "
        "reload the code location (UI: Deployment > Reload) and materialize again"
    )
