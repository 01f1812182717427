"""``backbone``: the diffusion model every later stage depends on, known by its fingerprint.

Embedded (the default): a materialized asset that trains the small latent
diffusion backbone, or reuses the checkpoint that matches the config. Pretrained
(a local DiT + VAE in the diffusers layout): an observable source asset whose
observation fingerprints the weights. Either way the data version is the
fingerprint, which is what the automation downstream reacts to.
"""

import dagster as dg

from mgd3_core.backbones.registry import backbone_kind
from mgd3_core.config import ExperimentConfig

from ..automation import observe_on_schedule, on_backbone_config_change
from ..failures import fails_with_root_cause
from ..metadata import training_progress_logger
from ..executors import accelerator_step
from ..resources import BackboneResource
from ..versions import checked_config, stage_asset


def _backbone_metadata(model, fingerprint: str, kind: str) -> dict:
    return {
        "fingerprint": fingerprint,
        "kind": kind,
        "vae_fingerprint": model.vae_fingerprint,
        "latent_shape": str(tuple(model.latent_shape)),
        "image_size": model.image_size,
        "num_classes": model.num_classes,
        "learned_variance": model.learned_variance,
        "device": str(model.device),
        "dtype": str(model.dtype).removeprefix("torch."),
    }


def build_backbone_asset(cfg: ExperimentConfig) -> dg.AssetsDefinition | dg.SourceAsset:
    """A materialized asset for a backbone the pipeline trains, an observed source asset otherwise."""
    if backbone_kind(cfg).TRAINED_BY_PIPELINE:
        return _trained_backbone(cfg)
    return _observed_backbone(cfg)


def _trained_backbone(cfg: ExperimentConfig) -> dg.AssetsDefinition:
    @stage_asset(
        cfg, "backbone",
        **accelerator_step(),
        kinds={"pytorch"},
        automation_condition=on_backbone_config_change(),
        description=f"{backbone_kind(cfg).describe(cfg)} Data version: its fingerprint.",
    )
    @fails_with_root_cause
    def backbone(context: dg.AssetExecutionContext, backbone: BackboneResource) -> dg.MaterializeResult:
        checked_config(context, backbone.experiment)
        fingerprint = backbone.ensure(progress=training_progress_logger(context.log, "backbone"))
        model = backbone.get()
        context.log.info(f"backbone fingerprint {fingerprint}")
        return dg.MaterializeResult(
            data_version=dg.DataVersion(fingerprint),
            metadata=_backbone_metadata(model, fingerprint, cfg.backbone.kind),
        )

    return backbone


def _observed_backbone(cfg: ExperimentConfig) -> dg.SourceAsset:
    @dg.observable_source_asset(
        name="backbone",
        automation_condition=observe_on_schedule(),
        description=f"{backbone_kind(cfg).describe(cfg)} Each observation fingerprints the weight files; "
        "the fingerprint is the data version.",
    )
    @fails_with_root_cause
    def backbone(context, backbone: BackboneResource) -> dg.ObserveResult:
        fingerprint = backbone.fingerprint()
        if fingerprint is None:
            raise FileNotFoundError(
                f"{backbone_kind(cfg).describe(cfg)} No model found to fingerprint; point the config's "
                "backbone section at local directories in the diffusers layout"
            )
        return dg.ObserveResult(
            data_version=dg.DataVersion(fingerprint),
            metadata={"fingerprint": fingerprint, "kind": cfg.backbone.kind,
                      **cfg.backbone.model_dump(include={"transformer_dir", "vae_dir", "stable_diffusion"},
                                                exclude_none=True)},
        )

    return backbone
