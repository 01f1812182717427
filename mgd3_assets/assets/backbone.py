"""``backbone``: the diffusion model every later stage depends on, known by its fingerprint.

Embedded (the default): a materialized asset that trains the small latent
diffusion backbone, or reuses the checkpoint that matches the config. Pretrained
(a local DiT + VAE in the diffusers layout): an observable source asset whose
observation fingerprints the weights. Either way the data version is the
fingerprint, which is what the automation downstream reacts to.
"""

import dagster as dg

from mgd3_core.config import ExperimentConfig

from ..automation import observe_backbone_on_schedule, on_backbone_config_change
from ..metadata import training_progress_logger
from ..resources import ACCELERATOR_POOL, BackboneResource
from ..versions import checked_config, code_version


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
    if cfg.backbone.kind == "embedded":
        return _embedded_backbone(cfg)
    return _pretrained_backbone(cfg)


def _embedded_backbone(cfg: ExperimentConfig) -> dg.AssetsDefinition:
    @dg.asset(
        name="backbone",
        code_version=code_version(cfg, "backbone"),
        pool=ACCELERATOR_POOL,
        kinds={"pytorch"},
        automation_condition=on_backbone_config_change(),
        description="The embedded latent diffusion backbone (VAE + class-conditional DiT), trained on the "
        "training split or reused when a checkpoint for this config exists. Data version: its fingerprint.",
    )
    def backbone(context: dg.AssetExecutionContext, backbone: BackboneResource) -> dg.MaterializeResult:
        checked_config(context, backbone.experiment, "backbone")
        fingerprint = backbone.ensure(progress=training_progress_logger(context.log, "backbone"))
        model = backbone.get()
        context.log.info(f"backbone fingerprint {fingerprint}")
        return dg.MaterializeResult(
            data_version=dg.DataVersion(fingerprint),
            metadata=_backbone_metadata(model, fingerprint, "embedded"),
        )

    return backbone


def _pretrained_backbone(cfg: ExperimentConfig) -> dg.SourceAsset:
    @dg.observable_source_asset(
        name="backbone",
        automation_condition=observe_backbone_on_schedule(),
        description=f"Pretrained backbone: DiT {cfg.backbone.transformer_dir}, VAE {cfg.backbone.vae_dir}. "
        "Each observation fingerprints the weight files; the fingerprint is the data version.",
    )
    def backbone(context, backbone: BackboneResource) -> dg.ObserveResult:
        fingerprint = backbone.fingerprint()
        if fingerprint is None:
            raise FileNotFoundError(
                f"backbone.transformer_dir {cfg.backbone.transformer_dir} / backbone.vae_dir "
                f"{cfg.backbone.vae_dir}: no model found to fingerprint; point the config at local "
                "directories in the diffusers layout"
            )
        return dg.ObserveResult(
            data_version=dg.DataVersion(fingerprint),
            metadata={"fingerprint": fingerprint, "kind": "pretrained",
                      "transformer_dir": cfg.backbone.transformer_dir, "vae_dir": cfg.backbone.vae_dir},
        )

    return backbone
