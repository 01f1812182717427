"""Config loading: defaults that work, and errors that name the key and the range."""

import pytest
import yaml

from mgd3_core.config import PAPER_DEFAULTS, PROJECT_ROOT, ConfigError, config_from_dict, load_config


def _write(tmp_path, data):
    p = tmp_path / "x.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_sampler_defaults_are_the_papers():
    cfg = config_from_dict({})
    assert cfg.sampler.guidance_strength == PAPER_DEFAULTS["guidance_strength"]
    assert cfg.sampler.t_stop == PAPER_DEFAULTS["t_stop"]
    assert cfg.sampler.cfg_scale == PAPER_DEFAULTS["cfg_scale"]


def test_shipped_embedded_configs_share_backbone_data_and_sampler():
    # embedded-full reuses the demo's backbone and latent stores only if these sections agree;
    # its sampler is the one chosen on the validation split for the demo (configs/embedded-sweep.yaml, docs/decisions.md).
    demo, full = load_config("configs/embedded.yaml"), load_config("configs/embedded-full.yaml")
    assert demo.ipc == [10] and full.ipc == [1, 10, 50]
    assert demo.dataset == full.dataset and demo.backbone == full.backbone and demo.sampler == full.sampler
    assert demo.sampler_for("mgd3_no_stop").t_stop == 0
    assert demo.sampler_for("unguided").guidance_strength == 0.0
    assert 0 < demo.sampler.t_stop < demo.sampler.steps  # mgd3 keeps stop guidance


def test_the_sweep_config_is_the_demo_with_a_lambda_t_stop_grid_scored_on_validation():
    demo, sweep = load_config("configs/embedded.yaml"), load_config("configs/embedded-sweep.yaml")
    assert (sweep.dataset, sweep.backbone, sweep.sampler, sweep.modes, sweep.ipc) == \
        (demo.dataset, demo.backbone, demo.sampler, demo.modes, demo.ipc)  # the demo's backbone and latents
    assert sweep.evaluation.split == "validation" and sweep.evaluation.hard == demo.evaluation.hard
    assert sweep.evaluation.generation_seeds == [0, 1, 2]
    grid = {(v.changed["guidance_strength"], v.changed["t_stop"])
            for v in sweep.method_variants().values() if v.kind == "mgd3"}
    assert grid == {(lam, t) for lam in (0.05, 0.1, 0.2) for t in (0, 10, 25)}
    assert [m for m in sweep.methods if not m.startswith("mgd3~")] == ["unguided", "random_real", "closest_real"]


def test_mgd3_config_env_var_selects_the_file(tmp_path, monkeypatch):
    p = _write(tmp_path, {"name": "other", "ipc": [1, 5]})
    monkeypatch.setenv("MGD3_CONFIG", str(p))
    cfg = load_config()
    assert cfg.name == "other" and cfg.ipc == [1, 5]


@pytest.mark.parametrize(
    "data, key, fragment",
    [
        ({"ipc": [0]}, "ipc", ">= 1"),
        ({"sampler": {"guidance_strength": -0.1}}, "sampler.guidance_strength", "greater than or equal to 0"),
        ({"sampler": {"steps": 50, "t_stop": 51}}, "sampler", "outside [0, steps = 50]"),
        ({"sampler": {"stepz": 50}}, "sampler.stepz", "unknown key"),
        ({"ipc": "ten"}, "ipc", "valid list"),
        ({"sampler": {"cfg_scale": "high"}}, "sampler.cfg_scale", "valid number"),
        ({"dataset": {"image_size": 30}}, "image_size = 30", "not divisible by the VAE downsampling factor 4"),
        ({"methods": ["mgd3", "magic"]}, "methods[1]", "unknown method 'magic'"),
        ({"method_overrides": {"mgd3": {"t_stop": 99}}}, "method_overrides.mgd3.t_stop", "outside [0, steps"),
        ({"dataset": {"kind": "imagefolder"}}, "dataset.root", "required"),
        ({"backbone": {"kind": "pretrained"}}, "backbone.transformer_dir", "required"),
        ({"evaluation": {"generation_seeds": [1, 1]}}, "evaluation.generation_seeds", "distinct"),
    ],
)
def test_invalid_values_name_the_key_and_the_range(tmp_path, data, key, fragment):
    p = _write(tmp_path, data)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg and key in msg and fragment in msg, msg


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("ipc: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_method_settings_share_one_sampler_and_differ_only_in_guidance():
    cfg = config_from_dict({"sampler": {"guidance_strength": 0.2, "t_stop": 20},
                            "method_overrides": {"mgd3": {"guidance_strength": 0.05}}})
    assert cfg.sampler_for("unguided").guidance_strength == 0.0
    assert cfg.sampler_for("mgd3_no_stop").t_stop == 0
    assert cfg.sampler_for("mgd3_no_stop").guidance_strength == 0.2
    assert cfg.sampler_for("mgd3").guidance_strength == 0.05
    assert cfg.sampler_for("mgd3").t_stop == 20
    with pytest.raises(ValueError, match="not a diffusion method"):
        cfg.sampler_for("random_real")


def test_the_lambda_schedule_is_a_sampler_setting_a_method_can_override():
    from mgd3_assets.versions import method_settings, method_settings_version
    from mgd3_core.sampling import SamplerSettings

    paper = config_from_dict({})
    explicit = config_from_dict({"sampler": {"guidance_schedule": "constant"}})
    faded = config_from_dict({"sampler": {"guidance_schedule": "linear"},
                              "method_overrides": {"mgd3": {"guidance_schedule": "cosine"}}})
    assert SamplerSettings.from_config(paper.sampler_for("mgd3")).guidance_schedule == "constant"
    assert SamplerSettings.from_config(faded.sampler_for("mgd3")).guidance_schedule == "cosine"
    assert SamplerSettings.from_config(faded.sampler_for("mgd3_no_stop")).guidance_schedule == "linear"
    # The paper's constant lambda is left out of the settings, so configs written before the option
    # existed keep their method-settings versions (no distilled partition becomes stale) ...
    assert "guidance_schedule" not in method_settings(paper, "mgd3")["sampler"]
    assert method_settings_version(explicit, "mgd3") == method_settings_version(paper, "mgd3")
    # ... and choosing a fade re-runs the diffusion methods it applies to, only.
    assert method_settings(faded, "mgd3")["sampler"]["guidance_schedule"] == "cosine"
    assert method_settings_version(faded, "mgd3") != method_settings_version(paper, "mgd3")
    assert method_settings_version(faded, "random_real") == method_settings_version(paper, "random_real")


def test_an_unknown_lambda_schedule_names_the_key(tmp_path):
    p = _write(tmp_path, {"method_overrides": {"mgd3": {"guidance_schedule": "exponential"}}})
    with pytest.raises(ConfigError, match="method_overrides.mgd3.guidance_schedule") as e:
        load_config(p)
    assert "'constant', 'linear' or 'cosine'" in str(e.value)


@pytest.mark.parametrize("path", sorted((PROJECT_ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path):
    cfg = load_config(path)
    assert cfg.methods and cfg.ipc


def test_protocol_epochs_by_ipc_and_the_named_teacher():
    cfg = config_from_dict({"evaluation": {"hard": {"epochs_by_ipc": {1: 300, 10: 30}, "full_data_epochs": 3},
                                           "soft": {"epochs": 40}}})
    assert [cfg.epochs_for_ipc(i) for i in (1, 10, 50)] == [300, 30, 30]
    assert [cfg.epochs_for_ipc(i, "soft") for i in (1, 10, 50)] == [40, 40, 40]  # one count without a table
    assert cfg.evaluation.teacher.model == "convnet" and cfg.teacher_epochs() == 3
    cfg = config_from_dict({"evaluation": {"soft": {"epochs_by_ipc": {1: 500, 50: 100}},
                                           "teacher": {"model": "resnet18", "epochs": 7}}})
    assert [cfg.epochs_for_ipc(i, "soft") for i in (1, 10, 50)] == [500, 500, 100]
    assert cfg.teacher_epochs() == 7
    with pytest.raises(ValueError, match="evaluation.teacher.model"):
        config_from_dict({"evaluation": {"teacher": {"model": "vgg11"}}})
