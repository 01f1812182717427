"""Experiment configuration: one YAML file, validated when loaded.

The paper's defaults live here and nowhere else (``PAPER_DEFAULTS``). A config
error names the file, the dotted key at fault and the allowed values.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from .config_base import DEFAULT_MEMORY_BUDGET_MB, _Strict  # noqa: F401  (re-exported)
from .config_eval import (EvaluationConfig, HardLabelConfig, SoftLabelConfig,  # noqa: F401  (re-exported)
                          TeacherConfig)
from .config_methods import (ALL_METHODS, DIFFUSION_METHODS, PAPER_DEFAULTS, REAL_METHODS,  # noqa: F401  (re-exported)
                             GuidanceSchedule, MethodOverride, MethodVariant, ModesConfig, SamplerConfig,
                             VariantError, expand_methods, finder_key)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = PROJECT_ROOT / "configs" / "embedded.yaml"
DEFAULT_HOME = PROJECT_ROOT / "mgd3_home"

# One module per kind in mgd3_core/backbones/ (registry.KINDS); a kind's own settings are a
# field of BackboneConfig named after it.
BACKBONE_KINDS = ("embedded", "pretrained", "stable_diffusion")


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message says where and why."""


class ClassSpec(_Strict):
    """One class: folder id on disk, readable name, label index in the backbone."""

    id: str = Field(min_length=1)
    name: str | None = None
    label: int | None = Field(default=None, ge=0)


class DatasetConfig(_Strict):
    kind: Literal["embedded_mnist", "imagefolder"] = "embedded_mnist"
    root: str | None = None
    train_dir: str = "train"
    test_dir: str = "val"
    # None = every class found; strings are folder ids; mappings give name/label too.
    classes: list[ClassSpec | str] | None = None
    image_size: int = Field(default=32, ge=8, le=1024)
    channels: Literal[1, 3] = 1
    strict: bool = False
    max_per_class: int | None = Field(default=None, ge=1)
    # Fraction of each class's *training* images held out for hyperparameter choice.
    validation_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    # Digits and text: never flip horizontally during student training.
    orientation_sensitive: bool = True
    split_seed: int = 0
    # Images with more pixels are refused unread (decompression-bomb guard; PIL's default).
    max_image_pixels: int = Field(default=89_478_485, ge=1)

    @model_validator(mode="after")
    def _root_for_imagefolder(self) -> "DatasetConfig":
        if self.kind == "imagefolder" and not self.root:
            raise ValueError("dataset.root is required when dataset.kind is 'imagefolder'")
        return self

    def class_specs(self) -> list[ClassSpec] | None:
        if self.classes is None:
            return None
        return [c if isinstance(c, ClassSpec) else ClassSpec(id=c) for c in self.classes]


class EmbeddedVAEConfig(_Strict):
    # Measured recipe (experiments/embedded_backbone.py): 32 px digits -> 4 x 8 x 8 latents.
    block_out_channels: list[int] = [8, 16, 32]
    latent_channels: int = Field(default=4, ge=1)
    layers_per_block: int = Field(default=1, ge=1)
    steps: int = Field(default=400, ge=1)
    batch_size: int = Field(default=64, ge=1)
    lr: float = Field(default=2e-3, gt=0)
    kl_weight: float = Field(default=1e-6, ge=0)


class EmbeddedDiTConfig(_Strict):
    # Measured recipe: a narrow DiT (width 64, 0.59 M parameters) trained for many small-batch
    # steps beat a 2.1 M one at equal CPU time; min-SNR weighting and lr 2e-3 were the largest
    # single gains; 4800 steps rather than 3200 raised MGD3's validation top-1 (docs/decisions.md).
    num_layers: int = Field(default=6, ge=1)
    num_attention_heads: int = Field(default=2, ge=1)
    attention_head_dim: int = Field(default=32, ge=1)
    patch_size: int = Field(default=2, ge=1)
    steps: int = Field(default=4800, ge=1)
    batch_size: int = Field(default=64, ge=1)
    lr: float = Field(default=2e-3, gt=0)
    warmup_steps: int = Field(default=100, ge=0)
    ema_decay: float = Field(default=0.999, ge=0.0, lt=1.0)
    label_dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    num_train_timesteps: int = Field(default=1000, ge=2)
    # Training noise schedule (saved as scheduler/ next to the weights).
    beta_schedule: Literal["linear", "squaredcos_cap_v2"] = "linear"
    # Min-SNR-gamma loss weighting (Hang et al. 2023); None = plain epsilon MSE.
    min_snr_gamma: float | None = Field(default=5.0, gt=0)


class EmbeddedBackboneConfig(_Strict):
    vae: EmbeddedVAEConfig = EmbeddedVAEConfig()
    dit: EmbeddedDiTConfig = EmbeddedDiTConfig()
    seed: int = 0
    checkpoint_every: int = Field(default=250, ge=1)
    # Torch intra-op threads while training. Float reductions are split per thread, so
    # the count changes the weights' last bits: training always runs with this many
    # threads (whatever the caller's setting) and the count is part of the backbone's key.
    threads: int = Field(default=2, ge=1)


class StableDiffusionConfig(_Strict):
    """A text-to-image backbone (SD-1.x in the diffusers layout), prompted with class names.

    ``prompt_template`` is formatted with ``{name}`` = the class's readable name
    (``dataset.classes[].name``); the unconditional branch of CFG uses
    ``negative_prompt`` ("" = the empty prompt). Images are generated (and the
    training images encoded) at ``generation_size`` px, then resized to
    ``dataset.image_size``.
    """

    pipeline_dir: str = Field(min_length=1)
    prompt_template: str = "{name}"
    negative_prompt: str = ""
    generation_size: int = Field(default=512, ge=8, le=2048)

    @field_validator("prompt_template")
    @classmethod
    def _only_name_field(cls, v: str) -> str:
        import string

        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(v) if f is not None}
        except ValueError as e:
            raise ValueError(f"not a valid template ({e}); write {{name}} where the class name goes") from None
        if fields != {"name"}:
            raise ValueError(f"must contain {{name}} and no other field, got fields {sorted(fields)}")
        return v


class BackboneConfig(_Strict):
    kind: Literal[BACKBONE_KINDS] = "embedded"  # type: ignore[valid-type]
    # Pretrained: diffusers-layout directories (e.g. DiT-XL-2-256 and sd-vae-ft-mse).
    transformer_dir: str | None = None
    vae_dir: str | None = None
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    embedded: EmbeddedBackboneConfig = EmbeddedBackboneConfig()
    stable_diffusion: StableDiffusionConfig | None = None

    @model_validator(mode="after")
    def _dirs_for_pretrained(self) -> "BackboneConfig":
        if self.kind == "stable_diffusion" and self.stable_diffusion is None:
            raise ValueError(
                "backbone.stable_diffusion (with pipeline_dir = a local SD-1.x directory in the diffusers "
                "layout) is required when backbone.kind is 'stable_diffusion'"
            )
        if self.kind == "pretrained" and not (self.transformer_dir and self.vae_dir):
            raise ValueError(
                "backbone.transformer_dir and backbone.vae_dir are required when backbone.kind is "
                "'pretrained' (local directories in the diffusers layout)"
            )
        return self


class EncodeConfig(_Strict):
    batch_size: int = Field(default=64, ge=1)
    chunk_size: int = Field(default=256, ge=1)
    dtype: Literal["float32", "float16"] = "float32"


class RunsConfig(_Strict):
    """How many partitions (classes) one Dagster run materializes: the run loads the backbone once
    and the sampler sees all its classes' images at once (up to ``sampler.batch_size`` per forward
    pass). ``auto``: enough classes for four full sampler batches (at least one class), so the
    per-run cost (a process, imports, a weight load) is small next to the work; 1 = one run per
    class, as before batching. Never part of any output's version: grouping changes no image."""

    classes_per_run: Literal["auto"] | Annotated[int, Field(ge=1)] = "auto"


class ExperimentConfig(_Strict):
    # ``methods`` in the file is the field ``method_entries`` (names, variants and grids as
    # written); ``methods`` the resolved names (``method_variants``). Dumps write ``methods``.
    model_config = ConfigDict(validate_by_alias=True, serialize_by_alias=True)

    name: str = Field(default="embedded", pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = 0
    dataset: DatasetConfig = DatasetConfig()
    backbone: BackboneConfig = BackboneConfig()
    encode: EncodeConfig = EncodeConfig()
    ipc: list[int] = [10]
    modes: ModesConfig = ModesConfig()
    sampler: SamplerConfig = SamplerConfig()
    method_entries: list[str | dict[str, Any]] = Field(default=list(ALL_METHODS), alias="methods")
    method_overrides: dict[str, MethodOverride] = {}
    evaluation: EvaluationConfig = EvaluationConfig()
    runs: RunsConfig = RunsConfig()

    @field_validator("ipc")
    @classmethod
    def _ipc_values(cls, v: list[int]) -> list[int]:
        if not v or any(i < 1 for i in v) or len(set(v)) != len(v):
            raise ValueError("ipc must be a non-empty list of distinct integers >= 1")
        return sorted(v)

    @model_validator(mode="after")
    def _cross_checks(self) -> "ExperimentConfig":
        bad = sorted(set(self.method_overrides) - set(ALL_METHODS))
        if bad:
            raise ValueError(f"method_overrides: unknown method(s) {bad}; allowed: {list(ALL_METHODS)}")
        for name, o in self.method_overrides.items():
            if o.t_stop is not None and o.t_stop > self.sampler.steps:
                raise ValueError(f"method_overrides.{name}.t_stop = {o.t_stop} is outside "
                                 f"[0, steps = {self.sampler.steps}]")
        if self.evaluation.split == "validation" and self.dataset.validation_fraction <= 0:
            raise ValueError("evaluation.split = 'validation' scores on the held-out part of the training split, "
                             "but dataset.validation_fraction is 0: set it above 0 (e.g. 0.1) or use split 'test'")
        if not self.method_entries:
            raise ValueError("methods: list at least one method")
        self.method_variants()  # every entry resolves: names, kinds and settings are valid
        if self.backbone.kind == "embedded":
            factor = 2 ** (len(self.backbone.embedded.vae.block_out_channels) - 1)
            if self.dataset.image_size % factor:
                raise ValueError(
                    f"dataset.image_size = {self.dataset.image_size} is not divisible by the VAE "
                    f"downsampling factor {factor} (backbone.embedded.vae.block_out_channels)"
                )
            latent = self.dataset.image_size // factor
            if latent % self.backbone.embedded.dit.patch_size:
                raise ValueError(
                    f"latent size {latent} is not divisible by backbone.embedded.dit.patch_size = "
                    f"{self.backbone.embedded.dit.patch_size}"
                )
        return self

    # ------------------------------------------------------------------ helpers
    @property
    def methods(self) -> list[str]:
        """The methods' names, in the listed order: the partition keys of ``distilled_images`` and
        ``students`` (the base names themselves when ``methods`` lists base names only)."""
        return list(self.method_variants())

    def method_variants(self) -> dict[str, MethodVariant]:
        """Every ``methods`` entry resolved (``config_methods``), by name."""
        return expand_methods(self.method_entries, self.sampler, self.modes, self.method_overrides)

    def variant(self, method: str) -> MethodVariant:
        """The listed method ``method``; a base method's name resolves even when it is not listed."""
        variants = self.method_variants()
        if method in variants:
            return variants[method]
        if method in ALL_METHODS:
            return expand_methods([method], self.sampler, self.modes, self.method_overrides)[method]
        raise KeyError(f"method {method!r} is not in the config's methods {list(variants)}")

    def kind_of(self, method: str) -> str:
        """The base method (one of ``ALL_METHODS``) of a listed method or variant."""
        return self.variant(method).kind

    def sampler_for(self, method: str) -> SamplerConfig:
        """Sampler settings of a diffusion method or variant: the config's sampler, the base method's
        fixed setting, and ``method_overrides`` (base names) or the variant's own settings."""
        v = self.variant(method)
        if not v.diffusion:
            raise ValueError(f"method {method!r} is not a diffusion method; its kind {v.kind!r} is not one "
                             f"of {DIFFUSION_METHODS}")
        return v.sampler

    def modes_for(self, method: str) -> ModesConfig:
        """The mode finder of a method or variant: the config's ``modes`` unless the variant sets its own."""
        return self.variant(method).modes

    def epochs_for_ipc(self, ipc: int, protocol: Literal["hard", "soft"] = "hard", student: str | None = None) -> int:
        """Student epochs at ``ipc``: the protocol's table (hard: the student's,
        ``evaluation.hard_for``), nearest key at or below ``ipc``."""
        if protocol == "soft":
            table = self.evaluation.soft.epochs_by_ipc
            if not table:
                return self.evaluation.soft.epochs
        else:
            table = self.evaluation.hard_for(student).epochs_by_ipc
        keys = sorted(k for k in table if k <= ipc) or [min(table)]
        return table[keys[-1]]

    def images_per_class(self) -> int:
        """Distilled images of one class by one method: every IPC times every generation seed."""
        return sum(self.ipc) * len(self.evaluation.generation_seeds)

    def classes_per_run(self) -> int:
        """``runs.classes_per_run`` resolved: ``auto`` fills four sampler batches."""
        k = self.runs.classes_per_run
        if k == "auto":
            return max(1, -(-4 * self.sampler.batch_size // self.images_per_class()))
        return k

    def teacher_epochs(self) -> int:
        ev = self.evaluation
        return ev.teacher.epochs or ev.hard_for(ev.teacher.model).full_data_epochs


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-after"))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see configs/embedded.yaml for every key)"
        # A cross-check's message names its key; its input would be the whole file.
        got = f" (got {e.get('input')!r})" if loc else ""
        lines.append(f"  {loc}: {msg}{got}" if loc else f"  {msg}")
    return "\n".join(lines)


def load_config(path: str | os.PathLike | None = None) -> ExperimentConfig:
    """Load and validate a config file; ``None`` means ``$MGD3_CONFIG`` or the embedded default."""
    path = Path(path or os.environ.get("MGD3_CONFIG") or DEFAULT_CONFIG)
    if not path.is_absolute() and not path.exists():
        path = PROJECT_ROOT / path
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; set MGD3_CONFIG to a YAML file under configs/")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(raw).__name__}")
    return config_from_dict(raw, source=str(path))


def config_from_dict(raw: dict, source: str = "<dict>") -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{source}: invalid configuration:\n{_format_errors(e)}") from None
