"""Backbone loading: the pretrained diffusers layout and the embedded kind.

Tiny models of the real classes (DiTTransformer2DModel with learned sigma,
AutoencoderKL, DDPMScheduler) are created from configs, saved with
``save_pretrained`` and reloaded through the real loader: no mocks.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel
from safetensors.torch import load_file, save_file

from mgd3_core.backbones import (
    Backbone,
    BackboneFilesError,
    BackboneMismatchError,
    DiffusersBackbone,
    backbone_fingerprint,
    ensure_embedded_backbone,
    load_backbone,
    load_vae,
    vae_fingerprint,
)
from mgd3_core.config import BackboneConfig, config_from_dict
from tests.toys import tiny_embedded_config

N_CLASSES = 5


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_dit(in_channels: int = 4, sample_size: int = 4, learned_sigma: bool = True) -> DiTTransformer2DModel:
    torch.manual_seed(0)
    return DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=in_channels,
        out_channels=2 * in_channels if learned_sigma else in_channels, num_layers=1,
        sample_size=sample_size, patch_size=2, num_embeds_ada_norm=N_CLASSES,
    ).eval()


def tiny_vae(latent_channels: int = 4, sample_size: int = 8) -> AutoencoderKL:
    torch.manual_seed(1)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=4, sample_size=sample_size, scaling_factor=0.5,
    ).eval()


@pytest.fixture
def pretrained(tmp_path: Path) -> dict:
    """A DiT-XL-2-256-like pipeline root (transformer/ + scheduler/) and a separate
    sd-vae-like VAE folder, as a user would have them on disk."""
    root, vae_dir = tmp_path / "dit-pipeline", tmp_path / "vae"
    dit, vae = tiny_dit(), tiny_vae()
    dit.save_pretrained(root / "transformer", safe_serialization=True)
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").save_pretrained(root / "scheduler")
    vae.save_pretrained(vae_dir, safe_serialization=True)
    cfg = BackboneConfig(kind="pretrained", transformer_dir=str(root), vae_dir=str(vae_dir))
    return {"root": root, "vae_dir": vae_dir, "dit": dit, "vae": vae, "cfg": cfg, "home": tmp_path / "home"}


def _check_protocol(b: DiffusersBackbone) -> None:
    assert isinstance(b, Backbone)
    c, h, w = b.latent_shape
    x = torch.rand(2, b.image_channels, b.image_size, b.image_size) * 2 - 1
    z = b.encode(x)
    assert z.shape == (2, c, h, w) and z.dtype == torch.float32
    img = b.decode(z)
    assert img.shape == x.shape and float(img.min()) >= -1 and float(img.max()) <= 1
    out = b.denoise(z, torch.tensor([0, 999 % len(b.train_betas())]), torch.tensor([0, b.null_class]))
    assert out.shape == (2, 2 * c if b.learned_variance else c, h, w)
    betas = b.train_betas()
    assert betas.dtype == torch.float64 and betas.ndim == 1 and bool(((betas > 0) & (betas < 1)).all())
    assert b.null_class == b.num_classes
    assert isinstance(b.fingerprint, str) and isinstance(b.vae_fingerprint, str)


# --------------------------------------------------------------------------- pretrained
def test_pretrained_loads_through_the_interface(pretrained):
    b = load_backbone(pretrained["cfg"], pretrained["home"])
    _check_protocol(b)
    assert b.num_classes == N_CLASSES and b.null_class == N_CLASSES
    assert b.learned_variance and b.latent_shape == (4, 4, 4)
    assert b.image_size == 8 and b.image_channels == 3 and b.scaling_factor == 0.5
    expected = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").betas.double()
    torch.testing.assert_close(b.train_betas(), expected, rtol=0, atol=1e-7)


def test_transformer_folder_itself_and_sibling_scheduler(pretrained):
    cfg = pretrained["cfg"].model_copy(update={"transformer_dir": str(pretrained["root"] / "transformer")})
    b = load_backbone(cfg, pretrained["home"])
    assert b.fingerprint == load_backbone(pretrained["cfg"], pretrained["home"]).fingerprint
    assert b.source["scheduler_config"].endswith("scheduler/scheduler_config.json")


def test_save_load_round_trip_gives_the_same_weights_and_outputs(pretrained):
    b = load_backbone(pretrained["cfg"], pretrained["home"])
    dit, vae = pretrained["dit"], pretrained["vae"]
    # The weights round-trip bit for bit: safetensors stores the exact float32 bytes.
    for saved, loaded in ((dit, b.transformer), (vae, b.vae)):
        ours = loaded.state_dict()
        assert all(torch.equal(v, ours[k]) for k, v in saved.state_dict().items())
    torch.manual_seed(2)
    x = torch.rand(3, 3, 8, 8) * 2 - 1
    z = torch.randn(3, 4, 4, 4)
    t, y = torch.tensor([1, 500, 999]), torch.tensor([0, 4, N_CLASSES])
    # Two model instances with the same weights (saved and reloaded vs in memory) may run
    # different float32 kernels: rounding-level tolerance (measured: 6e-8 on encode), far
    # below what a wrong weight, scaling factor or label mapping would change.
    close = dict(rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(b.encode(x), vae.encode(x).latent_dist.mean * 0.5, **close)
        torch.testing.assert_close(b.decode(z), vae.decode(z / 0.5).sample.clamp(-1, 1), **close)
        torch.testing.assert_close(b.denoise(z, t, y), dit(z, timestep=t, class_labels=y).sample, **close)


def test_fingerprint_is_cheap_and_matches_loaded(pretrained):
    fp = backbone_fingerprint(pretrained["cfg"], pretrained["home"])
    b = load_backbone(pretrained["cfg"], pretrained["home"])
    assert fp == b.fingerprint
    assert b.vae_fingerprint == vae_fingerprint(pretrained["vae_dir"]) == load_vae(pretrained["vae_dir"])[1]


def _perturb_one_weight(model_dir: Path, which: int) -> None:
    path = model_dir / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    name = sorted(tensors)[which]
    tensors[name].view(-1)[0] += 1e-3
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize("component", ["transformer", "vae"])
@pytest.mark.parametrize("which", [0, 7, -1])
def test_fingerprint_changes_when_any_weight_changes(pretrained, component, which):
    cfg, home = pretrained["cfg"], pretrained["home"]
    before, vae_before = backbone_fingerprint(cfg, home), vae_fingerprint(pretrained["vae_dir"])
    _perturb_one_weight(pretrained["root"] / "transformer" if component == "transformer" else pretrained["vae_dir"],
                        which)
    assert backbone_fingerprint(cfg, home) != before
    assert load_backbone(cfg, home).fingerprint != before
    # The VAE fingerprint covers the VAE alone.
    assert (vae_fingerprint(pretrained["vae_dir"]) != vae_before) == (component == "vae")


def test_fingerprint_changes_with_training_schedule(pretrained):
    before = backbone_fingerprint(pretrained["cfg"], pretrained["home"])
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2").save_pretrained(
        pretrained["root"] / "scheduler")
    assert backbone_fingerprint(pretrained["cfg"], pretrained["home"]) != before


def test_fingerprint_stable_otherwise(pretrained, tmp_path):
    cfg, home = pretrained["cfg"], pretrained["home"]
    before = backbone_fingerprint(cfg, home)
    # Re-saving identical weights, touching files, moving the directories, and
    # scheduler settings that do not change the training schedule leave it alone.
    pretrained["dit"].save_pretrained(pretrained["root"] / "transformer", safe_serialization=True)
    (pretrained["root"] / "transformer" / "config.json").touch()
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False).save_pretrained(
        pretrained["root"] / "scheduler")
    moved_root, moved_vae = tmp_path / "elsewhere" / "dit", tmp_path / "elsewhere" / "vae"
    shutil.copytree(pretrained["root"], moved_root)
    shutil.copytree(pretrained["vae_dir"], moved_vae)
    moved = cfg.model_copy(update={"transformer_dir": str(moved_root), "vae_dir": str(moved_vae)})
    assert backbone_fingerprint(cfg, home) == before
    assert backbone_fingerprint(moved, home) == before
    assert load_backbone(moved, home).fingerprint == before


# --------------------------------------------------------------------------- errors
def test_in_channels_mismatch_names_both_files(pretrained, tmp_path):
    other = tmp_path / "vae3"
    tiny_vae(latent_channels=3).save_pretrained(other, safe_serialization=True)
    cfg = pretrained["cfg"].model_copy(update={"vae_dir": str(other)})
    with pytest.raises(BackboneMismatchError, match=r"in_channels = 4.*latent_channels = 3") as e:
        load_backbone(cfg, pretrained["home"])
    assert str(pretrained["root"] / "transformer") in str(e.value) and str(other) in str(e.value)


def test_sample_size_mismatch_is_an_error(pretrained, tmp_path):
    big = tmp_path / "dit16"
    tiny_dit(sample_size=8).save_pretrained(big / "transformer", safe_serialization=True)
    cfg = pretrained["cfg"].model_copy(update={"transformer_dir": str(big)})
    with pytest.raises(BackboneMismatchError, match=r"sample_size = 8.*16 px.*sample_size = 8 px"):
        load_backbone(cfg, pretrained["home"])
    with pytest.raises(BackboneMismatchError):
        backbone_fingerprint(cfg, pretrained["home"])


def test_missing_directory_names_the_setting(pretrained, tmp_path):
    cfg = pretrained["cfg"].model_copy(update={"vae_dir": str(tmp_path / "nope")})
    with pytest.raises(BackboneFilesError, match=r"backbone.vae_dir = .*nope: directory does not exist"):
        load_backbone(cfg, pretrained["home"])
    cfg = pretrained["cfg"].model_copy(update={"transformer_dir": str(tmp_path)})
    with pytest.raises(BackboneFilesError, match=r"backbone.transformer_dir = .*no config.json"):
        backbone_fingerprint(cfg, pretrained["home"])


def test_missing_or_pickled_weights_are_refused(pretrained):
    tdir = pretrained["root"] / "transformer"
    weights = tdir / "diffusion_pytorch_model.safetensors"
    weights.rename(tdir / "diffusion_pytorch_model.bin")  # a pickle is never loaded
    with pytest.raises(BackboneFilesError, match=r"transformer: no diffusion_pytorch_model.safetensors.*pickled"):
        load_backbone(pretrained["cfg"], pretrained["home"])
    (tdir / "diffusion_pytorch_model.bin").unlink()
    with pytest.raises(BackboneFilesError, match=str(tdir)):
        backbone_fingerprint(pretrained["cfg"], pretrained["home"])


def test_wrong_component_is_refused(pretrained):
    # vae_dir pointing at the transformer: the class name in config.json says so.
    cfg = pretrained["cfg"].model_copy(update={"vae_dir": str(pretrained["root"] / "transformer")})
    with pytest.raises(BackboneFilesError, match=r"_class_name is 'DiTTransformer2DModel'"):
        load_backbone(cfg, pretrained["home"])


def test_legacy_transformer2d_class_name_loads(pretrained):
    # facebook/DiT-XL-2-256 was saved as the generic Transformer2DModel.
    path = pretrained["root"] / "transformer" / "config.json"
    config = json.loads(path.read_text())
    config["_class_name"] = "Transformer2DModel"
    path.write_text(json.dumps(config))
    _check_protocol(load_backbone(pretrained["cfg"], pretrained["home"]))


# --------------------------------------------------------------------------- embedded
def test_embedded_backbone_conforms_and_loads_like_a_pretrained_one(tmp_path):
    cfg, home = tiny_embedded_config(), tmp_path / "home"
    assert backbone_fingerprint(cfg, home) is None  # not trained yet
    with pytest.raises(BackboneFilesError, match="has not been trained yet"):
        load_backbone(cfg, home)
    root = ensure_embedded_backbone(cfg, home, progress=lambda *a: None)
    b = load_backbone(cfg, home)
    _check_protocol(b)
    assert b.num_classes == 3 and not b.learned_variance
    assert b.latent_shape == (2, 8, 8) and b.image_size == 16 and b.image_channels == 1
    assert backbone_fingerprint(cfg, home) == b.fingerprint
    # The same directory through the pretrained path: the same backbone.
    as_pretrained = BackboneConfig(kind="pretrained", transformer_dir=str(root), vae_dir=str(root))
    assert load_backbone(as_pretrained, home).fingerprint == b.fingerprint
    # Latents are unit-variance on the training data (scaling factor fitted).
    assert json.loads((root / "training.json").read_text())["scaling_factor"] == b.scaling_factor
    with pytest.raises(TypeError, match="pass the ExperimentConfig"):
        load_backbone(cfg.backbone, home)


def test_dataset_size_must_match_the_backbone(pretrained):
    cfg = config_from_dict({
        "dataset": {"image_size": 32, "channels": 3},
        "backbone": {"kind": "pretrained", "transformer_dir": str(pretrained["root"]),
                     "vae_dir": str(pretrained["vae_dir"])},
    })
    with pytest.raises(BackboneMismatchError, match=r"dataset.image_size = 32.*8 px"):
        load_backbone(cfg, pretrained["home"])
