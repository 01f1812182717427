"""Methods and their variants: the ``methods`` list of a config, the sampler and the mode finder.

``methods`` lists the distillation methods the graph runs; each entry becomes one partition of
``distilled_images`` and of ``students``. An entry is

- one of the six base methods by name (``mgd3``, ``unguided``, ...): the config's ``sampler`` and
  ``modes``, the method's own fixed setting (unguided: lambda 0; mgd3_no_stop: t_stop 0) and
  ``method_overrides[<name>]``;
- a named **variant**, ``{name: mgd3-l01, kind: mgd3, guidance_strength: 0.1, t_stop: 25}``: a base
  method (``kind``) with some settings of its own (``VARIANT_KEYS``), on top of the config's
  ``sampler`` / ``modes`` and the kind's fixed setting (never ``method_overrides``, which concern
  the plain base names only). Without ``name`` the name is made from the settings, as for a grid;
- a **grid**, ``{grid: {kind: mgd3, guidance_strength: [0.05, 0.1], t_stop: [0, 25]}}``: one variant
  per combination of the listed values, named ``<kind>~<key>=<value>~...`` with the keys sorted
  (``mgd3~guidance_strength=0.1~t_stop=25``), so reordering keys or values renames nothing.
  ``grid.name`` replaces the kind as the names' prefix.

A name is a folder name and a Dagster partition key: letters, digits and ``_ . = ~ -`` (Dagster
refuses ``| , [ ]`` in partition keys; ``~`` and ``=`` are plain characters in paths and URLs).
"""

from __future__ import annotations

import functools
import itertools
import json
import re
from dataclasses import dataclass, field
from typing import Annotated, Literal

from pydantic import Field, ValidationError, model_validator

from .config_base import _Strict

# MGD3 (ICML 2025), Sec. 4 / reference code: DDPM respaced to 50 steps, CFG 4.0,
# guidance strength lambda 0.1, guidance stopped at t_stop = 25 of 50.
PAPER_DEFAULTS = {"steps": 50, "cfg_scale": 4.0, "guidance_strength": 0.1, "t_stop": 25}

DIFFUSION_METHODS = ("mgd3", "unguided", "mgd3_no_stop")
REAL_METHODS = ("random_real", "closest_real", "decoded_centroids")
ALL_METHODS = DIFFUSION_METHODS + REAL_METHODS


class ModesConfig(_Strict):
    method: Literal["kmeans", "gmm", "bisecting_kmeans"] = "kmeans"
    n_init: int = Field(default=3, ge=1)
    max_iter: int = Field(default=300, ge=1)
    seed: int = 0


GuidanceSchedule = Literal["constant", "linear", "cosine"]


class SamplerConfig(_Strict):
    kind: Literal["ddpm", "ddim"] = "ddpm"
    steps: int = Field(default=PAPER_DEFAULTS["steps"], ge=1, le=1000)
    cfg_scale: float = Field(default=PAPER_DEFAULTS["cfg_scale"], ge=0.0)
    guidance_strength: float = Field(default=PAPER_DEFAULTS["guidance_strength"], ge=0.0)
    t_stop: int = Field(default=PAPER_DEFAULTS["t_stop"], ge=0)
    batch_size: int = Field(default=100, ge=1)
    # CFG on all noise channels (diffusers' DiTPipeline) or the first k, the rest conditional:
    # the DiT / MGD3 reference code (forward_with_cfg) guides 3 of DiT-XL/2's 4 (cfg_channels: 3).
    cfg_channels: Literal["all"] | Annotated[int, Field(ge=1)] = "all"
    # lambda over the guided steps (sampling.SamplerSettings.strength_at); left out of dumps while
    # "constant" (the paper), so method-settings versions from before the option stay the same.
    guidance_schedule: GuidanceSchedule = Field(default="constant", exclude_if=lambda v: v == "constant")

    @model_validator(mode="after")
    def _t_stop_in_range(self) -> "SamplerConfig":
        if self.t_stop > self.steps:
            raise ValueError(f"sampler.t_stop = {self.t_stop} is outside [0, steps = {self.steps}]")
        return self


class MethodOverride(_Strict):
    guidance_strength: float | None = Field(default=None, ge=0.0)
    t_stop: int | None = Field(default=None, ge=0)
    cfg_scale: float | None = Field(default=None, ge=0.0)
    guidance_schedule: GuidanceSchedule | None = None


# A variant's keys -> (section, field). ``sampler`` is the sampler's kind (ddpm / ddim): ``kind``
# is the variant's base method.
SAMPLER_KEYS = {"guidance_strength": "guidance_strength", "t_stop": "t_stop", "cfg_scale": "cfg_scale",
                "cfg_channels": "cfg_channels", "guidance_schedule": "guidance_schedule",
                "sampler": "kind", "steps": "steps"}
MODES_KEYS = {"modes.method": "method", "modes.n_init": "n_init"}
VARIANT_KEYS = (*SAMPLER_KEYS, *MODES_KEYS)

# The settings a base method fixes, and the variant keys that change its images.
KIND_FIXED = {"unguided": {"guidance_strength": 0.0}, "mgd3_no_stop": {"t_stop": 0}}
_GUIDED = set(SAMPLER_KEYS)
APPLIES_TO = {
    "mgd3": _GUIDED | set(MODES_KEYS),
    "mgd3_no_stop": (_GUIDED - {"t_stop"}) | set(MODES_KEYS),
    "unguided": _GUIDED - {"guidance_strength", "t_stop", "guidance_schedule"},
    "closest_real": set(MODES_KEYS),
    "decoded_centroids": set(MODES_KEYS),
    "random_real": set(),
}
_WHY_NOT = {
    "unguided": "unguided samples without mode guidance (lambda 0)",
    "mgd3_no_stop": "mgd3_no_stop guides to the end (t_stop 0)",
    "random_real": "random_real picks random training images",
    "closest_real": "closest_real never runs the sampler",
    "decoded_centroids": "decoded_centroids never runs the sampler",
}
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=~-]*$")
MAX_NAME_LENGTH = 200
RESERVED_NAMES = ("full_data",)  # the full-data bound's row in the students' tables


@dataclass(frozen=True)
class MethodVariant:
    """One entry of ``methods`` resolved: its name (the partition key and folder), its base method,
    the settings it sets itself (dotted keys of ``VARIANT_KEYS``) and its effective settings."""

    name: str
    kind: str
    changed: dict = field(default_factory=dict)
    sampler: SamplerConfig = SamplerConfig()
    modes: ModesConfig = ModesConfig()

    @property
    def diffusion(self) -> bool:
        return self.kind in DIFFUSION_METHODS


def finder_key(modes: ModesConfig) -> str:
    """A mode finder's name (a partition key and folder): ``<method>~n_init=<k>``. ``max_iter`` and
    ``seed`` are the config's for every finder."""
    return f"{modes.method}~n_init={modes.n_init}"


def format_value(value) -> str:
    """A setting's value in a variant name: floats without a trailing ``.0`` (``2``, ``0.05``)."""
    if isinstance(value, float):
        short = f"{value:g}"
        return short if float(short) == value else repr(value)
    return str(value)


def variant_name(prefix: str, settings: dict) -> str:
    """``<prefix>~<key>=<value>~...``, keys sorted: the same settings always give the same name."""
    return "~".join([prefix, *(f"{k}={format_value(settings[k])}" for k in sorted(settings))])


class VariantError(ValueError):
    """A ``methods`` entry that cannot be used; the message names the entry and the key."""


def _where(i: int, name: str | None) -> str:
    return f"methods[{i}]" + (f" ({name})" if name else "")


def _flatten(i: int, name: str | None, raw: dict, what: str) -> dict:
    """Settings with ``modes: {method: ...}`` written as ``modes.method``; unknown keys refused."""
    flat = {}
    for k, v in raw.items():
        if k == "modes":
            if not isinstance(v, dict):
                raise VariantError(f"{_where(i, name)}.modes must be a mapping (method, n_init), got {v!r}")
            flat.update({f"modes.{mk}": mv for mk, mv in v.items()})
        else:
            flat[k] = v
    unknown = sorted(set(flat) - set(VARIANT_KEYS))
    if unknown:
        raise VariantError(f"{_where(i, name)}: unknown {what} key(s) {unknown}; a variant may set "
                           f"{list(VARIANT_KEYS)} (sampler = ddpm / ddim)")
    return flat


def _check_kind(i: int, name: str | None, kind) -> str:
    if kind not in ALL_METHODS:
        raise VariantError(f"{_where(i, name)}.kind = {kind!r} is not a base method; choose from {list(ALL_METHODS)}")
    return kind


def _check_name(i: int, name, kind: str, settings: dict) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or ".." in name or len(name) > MAX_NAME_LENGTH:
        raise VariantError(
            f"{_where(i, None)}.name = {name!r} cannot be a folder name and partition key: use letters, digits "
            f"and _ . = ~ - (starting with a letter or digit, no '..', at most {MAX_NAME_LENGTH} characters)")
    if name in RESERVED_NAMES:
        raise VariantError(f"{_where(i, name)}.name: {name!r} is reserved (the full-data bound); choose another")
    if name in ALL_METHODS and (name != kind or settings):
        raise VariantError(f"{_where(i, name)}.name: {name!r} is a base method's name; give the variant "
                           "a name of its own")
    return name


def _resolve(i: int, name: str, kind: str, settings: dict, sampler: SamplerConfig,
             modes: ModesConfig, override: MethodOverride | None) -> MethodVariant:
    """The variant's effective sampler and modes; each bad value named by entry and key."""
    for key in settings:
        if key not in APPLIES_TO[kind]:
            raise VariantError(f"{_where(i, name)}.{key} does not apply to kind {kind}: {_WHY_NOT[kind]}; "
                               f"it may set {sorted(APPLIES_TO[kind]) or 'nothing'}")
    s_upd = {**KIND_FIXED.get(kind, {})}
    if override is not None:
        s_upd.update({k: v for k, v in override.model_dump().items() if v is not None})
    s_upd.update({SAMPLER_KEYS[k]: v for k, v in settings.items() if k in SAMPLER_KEYS})
    m_upd = {MODES_KEYS[k]: v for k, v in settings.items() if k in MODES_KEYS}
    steps, t_stop = s_upd.get("steps", sampler.steps), s_upd.get("t_stop", sampler.t_stop)
    if isinstance(steps, int) and isinstance(t_stop, int) and not 0 <= t_stop <= steps:
        if "t_stop" in settings:
            raise VariantError(f"{_where(i, name)}.t_stop = {t_stop} is outside [0, steps = {steps}]")
        raise VariantError(f"{_where(i, name)}.steps = {steps} is below t_stop = {t_stop}; set the variant's t_stop too")
    back = {v: k for k, v in SAMPLER_KEYS.items()}
    new_sampler = _validated(i, name, SamplerConfig, sampler, s_upd, back)
    new_modes = _validated(i, name, ModesConfig, modes, m_upd, {v: k for k, v in MODES_KEYS.items()})
    changed = {k: (getattr(new_sampler, SAMPLER_KEYS[k]) if k in SAMPLER_KEYS else getattr(new_modes, MODES_KEYS[k]))
               for k in sorted(settings)}
    return MethodVariant(name, kind, changed, new_sampler, new_modes)


def _validated(i: int, name: str, model, base, updates: dict, key_of: dict):
    if not updates:
        return base
    try:
        return model.model_validate({**base.model_dump(), **updates})
    except ValidationError as e:
        err = e.errors()[0]
        field_name = str(err["loc"][0]) if err["loc"] else ""
        key = key_of.get(field_name, field_name)
        raise VariantError(f"{_where(i, name)}.{key}: {err['msg'].removeprefix('Value error, ')} "
                           f"(got {err.get('input')!r})") from None


def _grid(i: int, raw) -> list[tuple[str | None, str, dict]]:
    """(name prefix, kind, settings) of every combination of a grid entry."""
    if not isinstance(raw, dict):
        raise VariantError(f"{_where(i, None)}.grid must be a mapping (kind and lists of settings), got {raw!r}")
    raw = dict(raw)
    prefix = raw.pop("name", None)
    kind = _check_kind(i, None, raw.pop("kind", None))
    flat = _flatten(i, None, raw, "grid")
    axes = {}
    for k, v in flat.items():
        values = v if isinstance(v, list) else [v]
        if not values or len({json.dumps(x) for x in values}) != len(values):
            raise VariantError(f"{_where(i, None)}.grid.{k}: a non-empty list of distinct values, got {v!r}")
        axes[k] = values
    keys = sorted(axes)
    prefix = prefix if prefix is not None else kind
    return [(prefix, kind, dict(zip(keys, combo))) for combo in itertools.product(*(axes[k] for k in keys))]


def _entries(i: int, entry) -> list[tuple[str | None, str | None, str, dict]]:
    """(explicit name, generated-name prefix, kind, settings) of one ``methods`` entry."""
    if isinstance(entry, str):
        if entry not in ALL_METHODS:
            raise VariantError(f"{_where(i, None)}: unknown method {entry!r}; a base method is one of "
                               f"{list(ALL_METHODS)}, a variant a mapping with kind (and name, settings)")
        return [(entry, None, entry, {})]
    if not isinstance(entry, dict):
        raise VariantError(f"{_where(i, None)}: a method name or a mapping, got {entry!r}")
    if "grid" in entry:
        if set(entry) != {"grid"}:
            raise VariantError(f"{_where(i, None)}: a grid entry has the one key 'grid', got {sorted(entry)}")
        return [(None, prefix, kind, s) for prefix, kind, s in _grid(i, entry["grid"])]
    raw = dict(entry)
    name = raw.pop("name", None)
    kind = _check_kind(i, name, raw.pop("kind", None))
    return [(name, kind, kind, _flatten(i, name, raw, "variant"))]


def expand_methods(entries: list, sampler: SamplerConfig, modes: ModesConfig,
                   overrides: dict[str, MethodOverride]) -> dict[str, MethodVariant]:
    """Every ``methods`` entry resolved, by name, in the listed order (grids in sorted-key order)."""
    return dict(_expand(json.dumps(entries, sort_keys=True), sampler.model_dump_json(), modes.model_dump_json(),
                        json.dumps({k: o.model_dump() for k, o in overrides.items()}, sort_keys=True)))


@functools.lru_cache(maxsize=64)
def _expand(entries_json: str, sampler_json: str, modes_json: str, overrides_json: str) -> dict[str, MethodVariant]:
    entries = json.loads(entries_json)  # a fresh copy: nothing here changes the config's own lists
    sampler, modes = SamplerConfig.model_validate_json(sampler_json), ModesConfig.model_validate_json(modes_json)
    overrides = {k: MethodOverride.model_validate(v) for k, v in json.loads(overrides_json).items()}
    out: dict[str, MethodVariant] = {}
    folded: dict[str, str] = {}  # case-folded name -> name: folders on case-insensitive disks
    for i, entry in enumerate(entries):
        for name, prefix, kind, settings in _entries(i, entry):
            name = _check_name(i, name if name is not None else
                               (variant_name(prefix, settings) if settings or prefix != kind else kind), kind, settings)
            before = folded.get(name.casefold())
            if before is not None:
                raise VariantError(f"{_where(i, name)}: the name {name!r} is listed twice" if before == name else
                                   f"{_where(i, name)}: the names {before!r} and {name!r} differ only in case "
                                   "(one folder on a case-insensitive disk); rename one")
            folded[name.casefold()] = name
            override = overrides.get(kind) if name == kind else None
            out[name] = _resolve(i, name, kind, settings, sampler, modes, override)
    return out
