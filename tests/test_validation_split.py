"""``evaluation.split: validation``: students scored on the images held out of the training split,
everything they are built from (modes, real baselines, teacher, full data) from the rest of it,
under keys and folders of its own; the test split is never read."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from mgd3_assets.versions import code_version, stage_inputs
from mgd3_core import distillation, evaluate, pipeline, storage
from mgd3_core.config import ConfigError, config_from_dict
from mgd3_core.data import EmbeddedMNIST, open_dataset
from mgd3_core.distilled import read_manifest
from mgd3_core.evaluation_report import evaluation_report

from tests.toys import tiny_embedded_config

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = ["mgd3", "random_real", "closest_real"]


def _config(split: str):
    raw = tiny_embedded_config().model_dump(mode="json")
    raw["dataset"]["validation_fraction"] = 0.25  # 3 of a class's 12 training images
    raw["sampler"].update(steps=4, t_stop=2, batch_size=32)
    raw.update(ipc=[2], methods=METHODS)
    raw["modes"]["n_init"] = 1
    raw["evaluation"].update(split=split, generation_seeds=[0], representativeness_k=3, tsne_classes=0,
                             hard={"epochs_by_ipc": {1: 1}, "full_data_epochs": 1})
    return config_from_dict(raw)


def test_split_values_are_checked_and_test_keeps_its_dumps():
    with pytest.raises(ConfigError, match=r"evaluation\.split: Input should be 'test' or 'validation'.*'val'"):
        config_from_dict({"evaluation": {"split": "val"}})
    with pytest.raises(ConfigError, match=r"dataset\.validation_fraction is 0"):
        config_from_dict({"dataset": {"validation_fraction": 0.0}, "evaluation": {"split": "validation"}})
    test, val = _config("test"), _config("validation")
    assert "split" not in test.model_dump()["evaluation"]  # versions and run keys of test configs stay
    for stage in ("mode_centroids", "distilled_images", "teacher", "students", "evaluation_report"):
        assert '"split":' not in json.dumps(stage_inputs(test, stage)), stage
        assert code_version(test, stage) != code_version(val, stage), stage
    assert storage.run_dir(test, "/h").name == test.name
    assert storage.run_dir(val, "/h").name == f"{test.name}@validation"


def test_validation_scores_never_read_the_test_split(tmp_path, monkeypatch):
    cfg, home = _config("validation"), tmp_path
    pipeline.ensure_backbone(cfg, home)
    read = []
    real_load = EmbeddedMNIST._load

    def load(self, info, split, ids):
        read.append(split)
        if split == "test":
            raise AssertionError(f"the test split was read ({len(ids)} images of class {info.id})")
        return real_load(self, info, split, ids)

    monkeypatch.setattr(EmbeddedMNIST, "_load", load)
    vae_fp = pipeline.vae_fingerprint(cfg, home)
    source = open_dataset(cfg.dataset)
    for info in source.classes():
        pipeline.encode_latents(cfg, home, info.id)
        modes = pipeline.discover_modes(cfg, home, info.id, vae_fp)
        fit, val = set(source.items(info.id, "fit")), set(source.items(info.id, "val"))
        assert len(val) == 3 and not fit & val
        assert set(pipeline.read_modes(cfg, home, info.id, 2, 0).closest_items) <= fit
        assert modes["path"].startswith(str(home / "runs" / f"{cfg.name}@validation"))
        for method in METHODS:
            distillation.distill_class(cfg, home, method, info.id)
        for method in ("random_real", "closest_real"):  # real baselines from the fit split only
            rows = read_manifest(storage.distilled_set_dir(cfg, home, method, 2, 0), info.id)
            assert {r["source_item"] for r in rows} <= fit
    teacher = evaluate.train_teacher(cfg, home)
    assert teacher["n_train"] == 27 and teacher["split"] == "validation"  # 3 classes x 9 fit images
    for method in [evaluate.FULL_DATA, *METHODS]:
        evaluate.train_students(cfg, home, method)
    evaluate.diversity_report(cfg, home)
    report = evaluation_report(cfg, home)
    assert "test" not in read and {"train"} == set(read)  # "fit" and "val" images load from train
    assert "Final validation top-1 %" in report.table_markdown.splitlines()[0]
    md = report.markdown.read_text()
    assert "27 training images (the fit split) and 9 validation images" in md and "never read" in md
    assert set(pd.read_csv(report.results_csv)["method"]) == {evaluate.FULL_DATA, *METHODS}

    # The same run scored on the test split is another run: another key, in another folder.
    test_cfg, spec = _config("test"), {"method": "mgd3", "ipc": 2, "gen_seed": 0, "student": "convnet",
                                       "protocol": "hard", "train_seed": 0, "epochs": 1}
    assert evaluate._run_key(test_cfg, spec, "x", "y", None) != evaluate._run_key(cfg, spec, "x", "y", None)
    assert storage.student_runs_dir(test_cfg, home) != storage.student_runs_dir(cfg, home)
    assert len(list(storage.student_runs_dir(cfg, home).glob("*.json"))) == len(METHODS)
