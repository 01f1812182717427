"""The paper-scale path: DiT-XL/2 + SD-VAE shapes through the real loader, weights loaded only
where used, cheap cached fingerprints, dtype/device in the fingerprint, CFG channels option."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import dagster as dg
import pytest
import torch

from mgd3_core import pipeline, sampling
from mgd3_core.backbones import backbone_fingerprint, backbone_vae_fingerprint, diffusers_backbone, load_backbone
from mgd3_core.backbones import diffusers_files as layout
from mgd3_core.backbones.reference import DIT_XL_2_256, SD_VAE_FT_MSE, save_reference_backbone
from mgd3_core.config import DIFFUSION_METHODS, BackboneConfig, config_from_dict
from mgd3_core.sampling import SamplerSettings, denoise_with_cfg, guided_ddpm_step, respace_schedule
from tests.dagster_helpers import build_defs, requested, run_ticks, seed_graph, tiny_config, write_config
from tests.toys import GaussianToyBackbone


@pytest.fixture(scope="module")
def xl_shaped(tmp_path_factory) -> dict:
    """One DiT-XL/2 block at full width and the full SD VAE, random weights, on disk."""
    root = tmp_path_factory.mktemp("xl")
    dit_dir, vae_dir = save_reference_backbone(root, depth=1, seed=0)
    return {"root": root, "dit": dit_dir, "vae": vae_dir, "home": root / "home",
            "cfg": BackboneConfig(kind="pretrained", transformer_dir=str(dit_dir), vae_dir=str(vae_dir))}


# --------------------------------------------------------------------------- B: paper shapes
def test_dit_xl2_and_sd_vae_shapes_load_and_take_one_guided_step(xl_shaped):
    b = load_backbone(xl_shaped["cfg"], xl_shaped["home"])
    tcfg, vcfg = b.transformer.config, b.vae.config
    assert (tcfg.num_attention_heads * tcfg.attention_head_dim, tcfg.patch_size, tcfg.num_layers) == (1152, 2, 1)
    assert b.latent_shape == (4, 32, 32) and b.learned_variance and b.num_classes == 1000 and b.null_class == 1000
    assert list(vcfg.block_out_channels) == [128, 256, 512, 512] and b.scaling_factor == 0.18215
    assert b.image_size == 256 and b.image_channels == 3
    assert DIT_XL_2_256["num_layers"] == 28 and SD_VAE_FT_MSE["latent_channels"] == 4  # the full model's facts

    schedule = respace_schedule(b.train_betas(), 50)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((2, 4, 32, 32), generator=g)
    mode = torch.randn((2, 4, 32, 32), generator=g)
    labels = torch.tensor([0, 999])
    with torch.inference_mode():
        eps, var = denoise_with_cfg(b, x, int(schedule.timesteps[49]), labels, 4.0)
        step = guided_ddpm_step(x, eps, 49, schedule, noise=torch.randn((2, 4, 32, 32), generator=g), mode=mode,
                                guidance_strength=0.1, variance_values=var)
        unguided = guided_ddpm_step(x, eps, 49, schedule, noise=None, mode=None, variance_values=var)
        image = b.decode(step.prev_sample[:1])
    assert eps.shape == var.shape == (2, 4, 32, 32)
    assert torch.isfinite(step.prev_sample).all() and image.shape == (1, 3, 256, 256)
    # The guidance term moved the sample toward its mode (same x_t, eps and variance).
    assert not torch.equal(step.mean, step.prev_sample)
    assert torch.equal(unguided.mean, step.mean)


# --------------------------------------------------------------------------- (vi) CFG channels
def test_cfg_channels_guides_only_the_first_k_noise_channels():
    toy = GaussianToyBackbone(num_classes=3, shape=(4, 4, 4), learned_variance=True)
    x = torch.randn((2, 4, 4, 4), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 2])
    eps_all, var_all = denoise_with_cfg(toy, x, 500, labels, 4.0)
    eps_3, var_3 = denoise_with_cfg(toy, x, 500, labels, 4.0, cfg_channels=3)
    eps_c, var_c = denoise_with_cfg(toy, x, 500, labels, 1.0)  # the conditional prediction alone
    assert torch.equal(eps_3[:, :3], eps_all[:, :3])          # first 3 channels guided as before
    assert torch.equal(eps_3[:, 3:], eps_c[:, 3:])            # the 4th: conditional, unguided
    assert not torch.equal(eps_3[:, 3:], eps_all[:, 3:])
    assert torch.equal(var_3, var_all) and torch.equal(var_3, var_c)  # variance from the conditional half
    assert torch.equal(denoise_with_cfg(toy, x, 500, labels, 4.0, cfg_channels=4)[0], eps_all)
    with pytest.raises(ValueError, match="cfg_channels = 5"):
        denoise_with_cfg(toy, x, 500, labels, 4.0, cfg_channels=5)


def test_cfg_channels_setting_reaches_the_sampler_and_the_method_settings(tmp_path):
    from mgd3_assets.versions import code_version, method_settings_version

    base = config_from_dict(tiny_config())
    three = config_from_dict(tiny_config(sampler={"steps": 4, "t_stop": 2, "batch_size": 16, "cfg_channels": 3}))
    assert base.sampler.cfg_channels == "all"
    assert SamplerSettings.from_config(three.sampler).cfg_channels == 3
    assert SamplerSettings.from_config(base.sampler).cfg_channels is None
    # The diffusion methods' settings change (their distilled images go stale); nothing else does.
    assert method_settings_version(three, "mgd3") != method_settings_version(base, "mgd3")
    assert method_settings_version(three, "random_real") == method_settings_version(base, "random_real")
    assert code_version(three, "latent_store") == code_version(base, "latent_store")
    with pytest.raises(ValueError, match="cfg_channels"):
        config_from_dict(tiny_config(sampler={"cfg_channels": 0}))
    toy = GaussianToyBackbone(num_classes=3, shape=(4, 4, 4))
    run = [sampling.sample(toy, [0, 1], [1, 2], settings=SamplerSettings(steps=5, t_stop=0, cfg_channels=k)).latents
           for k in (None, 3)]
    assert not torch.allclose(run[0], run[1])


# --------------------------------------------------------------------------- (iv) fingerprints
def backbone_fingerprints(cfg, home) -> tuple[str, str]:
    return backbone_fingerprint(cfg, home), backbone_vae_fingerprint(cfg, home)


def test_pretrained_fingerprint_is_hashed_once_and_again_only_when_a_file_changes(xl_shaped, monkeypatch, tmp_path):
    cfg, home = xl_shaped["cfg"], tmp_path / "home"  # a home with no fingerprint cache yet
    calls = []
    real_hash = layout.hash_files
    monkeypatch.setattr(layout, "hash_files", lambda files, *a: calls.append(len(files)) or real_hash(files, *a))
    layout._FINGERPRINT_MEMO.clear()
    first = backbone_fingerprints(cfg, home)
    assert len(calls) == 2  # transformer and VAE, hashed in full once
    layout._FINGERPRINT_MEMO.clear()  # a new process: only the on-disk cache is left
    assert backbone_fingerprints(cfg, home) == first and len(calls) == 2
    assert list((home / "cache" / "fingerprints").glob("*.json"))
    weights = Path(xl_shaped["vae"]) / "diffusion_pytorch_model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # touched: hashed again
    layout._FINGERPRINT_MEMO.clear()
    assert backbone_fingerprints(cfg, home) == first and len(calls) == 3


def test_only_accelerator_pooled_steps_load_the_backbone(tiny_graph):
    loads = tiny_graph.backbone_loads
    graph = tiny_graph.defs.resolve_asset_graph()
    pools = {k.to_user_string(): graph.get(k).pools for k in graph.materializable_asset_keys}
    # The embedded backbone is trained and loaded by its own asset; the latent stores of every
    # class are encoded in one run, which loads it once; only the methods that sample or decode
    # load it to distil (one run per method, all classes), the real-image ones do not.
    cfg = tiny_graph.cfg
    classes = len(cfg.dataset.classes)
    decoding = [m for m in cfg.methods if m in DIFFUSION_METHODS or m == "decoded_centroids"]
    assert len(decoding) < len(cfg.methods)  # the tiny graph has a real-image method too
    counts = Counter(loads)
    assert set(counts) == {"backbone", "latent_store", "distilled_images"}, loads
    assert classes > 1 and counts["latent_store"] == 1 and counts["distilled_images"] == len(decoding), loads
    assert all(pools[name] == {"accelerator"} for name in loads)
    assert pools["mode_centroids"] != {"accelerator"}  # needs the VAE fingerprint only


# --------------------------------------------------------------------------- (v) dtype in fingerprint
def _observe_backbone(defs, instance) -> None:
    """The real observation of the pretrained backbone, as ``make demo`` runs it."""
    from mgd3_assets import demo

    demo.run_stage(defs, instance, demo.stage_of("backbone"), log=lambda m: None, log_level="WARNING")


def test_switching_to_bfloat16_makes_latents_and_distilled_images_stale(tmp_path, xl_shaped):
    backbone = {"kind": "pretrained", "transformer_dir": str(xl_shaped["dit"]), "vae_dir": str(xl_shaped["vae"])}
    dataset = {"image_size": 256, "channels": 3}
    home = xl_shaped["home"]
    a = config_from_dict(tiny_config(backbone=backbone, dataset=dataset))
    b = config_from_dict(tiny_config(backbone={**backbone, "dtype": "bfloat16"}, dataset=dataset))
    fp32 = build_defs(write_config(tmp_path / "a.yaml", tiny_config(backbone=backbone, dataset=dataset)), home)
    bf16 = build_defs(write_config(tmp_path / "b.yaml", tiny_config(
        backbone={**backbone, "dtype": "bfloat16"}, dataset=dataset)), home)
    with dg.DagsterInstance.ephemeral() as instance:
        seed_graph(instance, fp32, backbone_version=pipeline.backbone_fingerprint(a, home), observe_backbone=True)
        first = dg.evaluate_automation_conditions(defs=fp32, instance=instance)
        assert first.total_requested == 0
        _observe_backbone(fp32, instance)  # observed again, nothing switched: nothing to re-run
        ticks, cursor = run_ticks(fp32, instance, first.cursor)
        assert ticks == []
        _observe_backbone(bf16, instance)  # backbone.dtype: bfloat16
        asked = requested(dg.evaluate_automation_conditions(defs=bf16, instance=instance, cursor=cursor))
        assert asked["latent_store"] == {"0", "1"}, asked
        assert len(asked["distilled_images"]) == 4, asked
    # And the bf16 latents live in their own store: the fp32 one is never silently reused.
    assert pipeline.vae_fingerprint(a, home) != pipeline.vae_fingerprint(b, home)


def test_runtime_identity_and_the_embedded_backbone_code_version():
    from mgd3_assets.versions import code_version

    assert diffusers_backbone.runtime_identity("cpu", torch.float32) == {}
    assert diffusers_backbone.runtime_identity("cuda:1", torch.bfloat16) == {"device": "cuda", "dtype": "bfloat16"}
    assert diffusers_backbone.runtime_identity("cuda:0", torch.float32) == \
        diffusers_backbone.runtime_identity("cuda:1", torch.float32)
    base = config_from_dict(tiny_config())
    bf16 = config_from_dict(tiny_config(backbone={"dtype": "bfloat16"}))
    # The embedded backbone must re-run (and report its new fingerprint) when its dtype changes.
    assert code_version(bf16, "backbone") != code_version(base, "backbone")
    assert code_version(config_from_dict(tiny_config()), "backbone") == code_version(base, "backbone")


def test_the_demo_reports_each_stages_peak_memory(tiny_graph):
    peaks = [r.peak_rss_mib for r in tiny_graph.stage_reports if r.in_graph]  # variant_modes: not in this graph
    from mgd3_assets import demo

    assert len(tiny_graph.stage_reports) == len(demo.STAGES) and len(peaks) == len(demo.STAGES) - 1
    assert all(100 < p < 64 * 1024 for p in peaks), peaks  # MiB: a torch process, bounded
