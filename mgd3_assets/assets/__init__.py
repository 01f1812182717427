"""The asset graph, stage by stage (one module per stage)."""

import dagster as dg

from mgd3_core.config import ExperimentConfig

from .backbone import build_backbone_asset
from .distilled import build_distilled_images_asset
from .evaluation import build_evaluation_assets
from .inputs import build_input_assets
from .latents import build_latent_store_asset
from .modes import build_mode_centroids_asset, build_variant_modes_asset


# One group: the UI's global lineage view shows a single group's assets expanded.
GROUP = "mgd3"


def build_assets(cfg: ExperimentConfig) -> list[dg.AssetsDefinition | dg.SourceAsset]:
    assets = [
        *build_input_assets(cfg),
        build_backbone_asset(cfg),
        build_latent_store_asset(cfg),
        build_mode_centroids_asset(cfg),
        *filter(None, [build_variant_modes_asset(cfg)]),  # only when a variant has a mode finder of its own
        build_distilled_images_asset(cfg),
        *build_evaluation_assets(cfg),
    ]
    return [a.with_attributes(group_name=GROUP) if isinstance(a, dg.SourceAsset)
            else a.with_attributes(group_names_by_key={k: GROUP for k in a.keys}) for a in assets]
