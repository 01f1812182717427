"""The tiny asset graph on the Stable Diffusion backbone (a tiny random SD-1.x pipeline):
every asset materializes, and the distilled images' lineage carries the class prompt."""

from __future__ import annotations

import dagster as dg
import h5py
import pytest
import torch
import yaml

from mgd3_core import pipeline, storage
from mgd3_core.config import config_from_dict
from mgd3_core.distilled import MANIFEST_COLUMNS, PROMPT_COLUMNS, lineage_of, read_manifest
from mgd3_core.latents import read_latent_store
from tests.dagster_helpers import (
    DATA_VERSION_TAG,
    PER_CLASS,
    TinyGraph,
    all_partitions,
    build_defs,
    evaluate,
    latest_materialization,
    materialized_partitions,
    requested,
    tiny_config,
    write_config,
)
from tests.sd_helpers import build_tiny_sd

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sd_graph(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a busy 2-core machine (see test_stable_diffusion.py)
    try:
        root = tmp_path_factory.mktemp("sd_graph")
        raw = tiny_config(
            name="tiny-sd",
            methods=["mgd3"],  # the real-image methods do not touch the backbone's sampler
            dataset={"channels": 3, "image_size": 16},  # MNIST digits "0" and "1", named "zero" and "one"
            backbone={"kind": "stable_diffusion", "stable_diffusion": {
                "pipeline_dir": str(build_tiny_sd(root / "tiny-sd")), "prompt_template": "a photo of a {name}",
                "negative_prompt": "blurry", "generation_size": 32}},
        )
        yield TinyGraph(root / "graph", raw).materialize()
    finally:
        torch.set_num_threads(before)


def test_the_tiny_graph_materializes_on_stable_diffusion(sd_graph):
    instance, defs, cfg, home = sd_graph.instance, sd_graph.defs, sd_graph.cfg, sd_graph.home
    for asset, pks in all_partitions(defs).items():
        assert materialized_partitions(instance, asset) == set(pks), asset
    backbone = pipeline.get_backbone(cfg, home)
    assert type(backbone).__name__ == "StableDiffusionBackbone" and backbone.latent_shape == (4, 16, 16)
    # Modes live in the samples' space: the 16 px digits were encoded at the 32 px generation size.
    store = read_latent_store(storage.latent_store_file(cfg, home, "0", backbone.vae_fingerprint),
                              expected_vae_fingerprint=backbone.vae_fingerprint)
    assert store.latents.shape == (12, *backbone.latent_shape)
    with h5py.File(storage.distilled_set_dir(cfg, home, "mgd3", 2, 0) / "latents" / "0.h5") as f:
        assert f["latents"].shape == (2, *backbone.latent_shape)
    # The observed data version is the fingerprint of the SD files.
    observed = instance.get_latest_data_version_record(dg.AssetKey("backbone")).asset_observation
    assert observed.tags[DATA_VERSION_TAG] == backbone.fingerprint == pipeline.backbone_fingerprint(cfg, home)


def test_lineage_carries_the_prompt(sd_graph):
    cfg, home = sd_graph.cfg, sd_graph.home
    sdir = storage.distilled_set_dir(cfg, home, "mgd3", 2, 0)
    for class_id, name in (("0", "zero"), ("1", "one")):
        rows = read_manifest(sdir, class_id)
        assert list(rows[0]) == MANIFEST_COLUMNS + PROMPT_COLUMNS
        assert {(r["prompt"], r["negative_prompt"]) for r in rows} == {(f"a photo of a {name}", "blurry")}
        info = lineage_of(sdir / "images" / class_id / "1.png")
        assert info["verified"] and info["prompt"] == f"a photo of a {name}" and info["mode_index"] == "1"
        assert info["backbone_fingerprint"] == pipeline.backbone_fingerprint(cfg, home)
        mat = latest_materialization(sd_graph.instance, "distilled_images", f"{class_id}|mgd3")
        assert mat.metadata["prompt"].value == f"a photo of a {name}"
        assert {r.data["prompt"] for r in mat.metadata["lineage"].value.records} == {f"a photo of a {name}"}


def test_the_backbone_is_reloaded_when_the_class_list_changes(sd_graph):
    cfg, home = sd_graph.cfg, sd_graph.home
    assert pipeline.get_backbone(cfg, home).class_prompts == {0: "a photo of a zero", 1: "a photo of a one"}
    only_one = cfg.model_copy(update={"dataset": cfg.dataset.model_copy(update={"classes": ["1"]})})
    assert pipeline.get_backbone(only_one, home).class_prompts == {0: "a photo of a one"}


def test_renaming_a_class_remakes_only_that_class_images(sd_graph, tmp_path):
    """The prompt is made from the class's name: renaming class "0" re-makes its distilled images
    (its latent store is reused) and leaves class "1" alone; with a label-conditioned backbone a
    rename changes no class version."""
    from mgd3_assets import demo
    from mgd3_assets.versions import class_version

    instance, home, cfg = sd_graph.instance, sd_graph.home, sd_graph.cfg
    raw = yaml.safe_load(sd_graph.config_path.read_text())
    raw["dataset"]["classes"] = [{"id": "0", "name": "nought"}, "1"]
    renamed_defs = build_defs(write_config(tmp_path / "renamed.yaml", raw), home)
    renamed = config_from_dict(raw)
    assert [class_version(renamed, home, c) == class_version(cfg, home, c) for c in ("0", "1")] == [False, True]
    embedded = config_from_dict({**raw, "backbone": tiny_config()["backbone"],
                                 "dataset": {**raw["dataset"], "channels": 1}})
    assert class_version(embedded, home, "0") == pipeline.class_content_key(embedded, home, "0")

    first = evaluate(renamed_defs, instance)
    demo.run_stage(renamed_defs, instance, demo.STAGES[0], log=lambda m: None, log_level="WARNING")  # observe
    asked = requested(evaluate(renamed_defs, instance, first.cursor))
    assert asked["distilled_images"] == {"0|mgd3"}
    assert all(pk.split("|")[0] == "0" for asset in PER_CLASS for pk in asked.get(asset, ()))
    # Restore the observed versions of the original config for the tests below.
    demo.run_stage(sd_graph.defs, instance, demo.STAGES[0], log=lambda m: None, log_level="WARNING")


def test_a_changed_tokenizer_file_reruns_the_dependents(sd_graph):
    """Last in this module: it edits the pipeline's tokenizer."""
    from mgd3_assets import demo

    defs, instance, cfg, home = sd_graph.defs, sd_graph.instance, sd_graph.cfg, sd_graph.home
    first = evaluate(defs, instance)
    assert not {a for a in requested(first) if a != "backbone"}  # materialized: nothing to re-run
    old = pipeline.backbone_fingerprint(cfg, home)
    merges = cfg.backbone.stable_diffusion.pipeline_dir + "/tokenizer/merges.txt"
    with open(merges, "a") as f:
        f.write("o n\n")
    backbone_stage = demo.STAGES[len(demo.INPUT_STAGES)]
    demo.run_stage(defs, instance, backbone_stage, log=lambda m: None, log_level="WARNING")  # observe
    observed = instance.get_latest_data_version_record(dg.AssetKey("backbone")).asset_observation
    assert observed.tags[DATA_VERSION_TAG] == pipeline.backbone_fingerprint(cfg, home) != old
    asked = requested(evaluate(defs, instance, first.cursor))
    assert asked["distilled_images"] == {"0|mgd3", "1|mgd3"} and asked["latent_store"] == {"0", "1"}
