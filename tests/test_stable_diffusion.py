"""The Stable Diffusion backbone on a tiny random SD-1.x pipeline (tests/sd_helpers.py):
loading, named errors, prompts, the guided step by hand, lambda 0, v-prediction, fingerprints."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from mgd3_core.backbones import BackboneFilesError, BackboneMismatchError
from mgd3_core.backbones.diffusers_backbone import runtime_identity
from mgd3_core.backbones.stable_diffusion import (
    StableDiffusionFiles,
    load_stable_diffusion,
    stop_step_for_timestep,
)
from mgd3_core.config import ConfigError, config_from_dict, load_config
from mgd3_core.distilled import MANIFEST_COLUMNS, PROMPT_COLUMNS, read_manifest, write_distilled_class
from mgd3_core.sampling import SamplerSettings, respace_schedule, sample
from tests.sd_helpers import MAX_TOKENS, build_tiny_sd

# Tiny models on a busy 2-core machine: one thread (conftest.one_thread), one kernel for bit-exact checks.
pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = {0: "a photo of a tench", 1: "a photo of a church"}
IMAGE, GEN = 8, 16  # dataset images 8 px, generated at 16 px (VAE factor 2 -> latents 4 x 8 x 8)


@pytest.fixture(scope="module")
def sd_root(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("sd") / "tiny-sd")


@pytest.fixture(scope="module")
def backbone(sd_root):
    return load_stable_diffusion(sd_root, class_prompts=PROMPTS, image_size=IMAGE, generation_size=GEN,
                                 negative_prompt="blurry")


def _copy(sd_root, tmp_path):
    return shutil.copytree(sd_root, tmp_path / "copy")


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_loader_reads_a_local_sd_directory(backbone, sd_root):
    assert backbone.latent_shape == (4, GEN // 2, GEN // 2)
    assert (backbone.image_size, backbone.generation_size, backbone.image_channels) == (IMAGE, GEN, 3)
    assert (backbone.num_classes, backbone.null_class, backbone.learned_variance) == (2, 2, False)
    assert backbone.prediction_type == "epsilon" and backbone.scaling_factor == pytest.approx(0.18215)
    # SD 1.5's scaled-linear schedule: betas 0.00085 .. 0.012 over 1,000 steps.
    betas = backbone.train_betas()
    assert betas.shape == (1000,) and betas[0].item() == pytest.approx(0.00085) and betas[-1].item() == pytest.approx(0.012)
    images = torch.rand(3, 3, IMAGE, IMAGE) * 2 - 1
    latents = backbone.encode(images)  # resized to the generation size before the VAE
    assert latents.shape == (3, *backbone.latent_shape)
    assert backbone.decode(latents).shape == (3, 3, IMAGE, IMAGE)  # decoded at 16 px, resized to 8
    with pytest.raises(ValueError, match="images must have shape"):
        backbone.encode(torch.zeros(1, 3, GEN, GEN))


@pytest.mark.parametrize("breakage, error, message", [
    (lambda r: shutil.rmtree(r / "tokenizer"), BackboneFilesError, r"missing component folder\(s\) \['tokenizer'\]"),
    (lambda r: (r / "tokenizer" / "merges.txt").unlink(), BackboneFilesError, "merges.txt"),
    (lambda r: (r / "unet" / "diffusion_pytorch_model.safetensors").rename(r / "unet" / "diffusion_pytorch_model.bin"),
     BackboneFilesError, "pickled weights"),
    (lambda r: (r / "text_encoder" / "model.safetensors").unlink(), BackboneFilesError, "model.safetensors"),
    (lambda r: (r / "scheduler" / "scheduler_config.json").unlink(), BackboneFilesError, "scheduler_config.json"),
    (lambda r: _edit_json(r / "unet" / "config.json", _class_name="DiTTransformer2DModel"), BackboneFilesError,
     "UNet2DConditionModel"),
    (lambda r: _edit_json(r / "unet" / "config.json", cross_attention_dim=64), BackboneMismatchError,
     "cross_attention_dim = 64 does not match hidden_size = 32"),
    (lambda r: _edit_json(r / "vae" / "config.json", latent_channels=8), BackboneMismatchError,
     "in_channels = 4 does not match latent_channels = 8"),
    (lambda r: _edit_json(r / "scheduler" / "scheduler_config.json", prediction_type="sample"),
     BackboneMismatchError, "prediction_type 'sample'"),
])
def test_missing_or_mismatched_parts_are_named_errors(sd_root, tmp_path, breakage, error, message):
    root = _copy(sd_root, tmp_path)
    breakage(root)
    with pytest.raises(error, match=message):
        StableDiffusionFiles(root, GEN)


def test_a_tokenizer_larger_than_the_text_encoder_vocabulary_is_refused(sd_root, tmp_path):
    root = _copy(sd_root, tmp_path)
    vocab = json.loads((root / "tokenizer" / "vocab.json").read_text())
    vocab.update({f"x{i}": len(vocab) + i for i in range(5)})
    (root / "tokenizer" / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(BackboneMismatchError, match=r"tokens but the text encoder .* has vocab_size = 61"):
        load_stable_diffusion(root, class_prompts=PROMPTS, image_size=IMAGE, generation_size=GEN)


def test_generation_size_must_fit_the_vae_and_unet(sd_root):
    with pytest.raises(BackboneMismatchError, match="generation_size = 18 px is not divisible by 4"):
        StableDiffusionFiles(sd_root, 18)
    with pytest.raises(BackboneFilesError, match="does not exist"):
        StableDiffusionFiles(sd_root / "nowhere", GEN)


def test_class_names_reach_the_text_encoder(backbone, sd_root):
    assert backbone.prompt_for(0) == "a photo of a tench" and backbone.prompt_for(backbone.null_class) == "blurry"
    e_tench, e_church = backbone.encode_prompt("a photo of a tench"), backbone.encode_prompt("a photo of a church")
    assert e_tench.shape == (1, MAX_TOKENS, 32)
    assert backbone.encode_prompt("a photo of a tench") is e_tench  # encoded once, then cached
    assert not torch.equal(e_tench, e_church)
    x = torch.randn(1, *backbone.latent_shape).expand(3, -1, -1, -1)
    eps = backbone.denoise(x, torch.tensor(500), torch.tensor([0, 1, 0]))
    assert torch.equal(eps[0], eps[2]) and not torch.allclose(eps[0], eps[1])
    # Another template gives another conditioning for the same class.
    other = load_stable_diffusion(sd_root, class_prompts={0: "tench"}, image_size=IMAGE, generation_size=GEN)
    assert not torch.allclose(other.denoise(x[:1], torch.tensor(500), torch.tensor([0])), eps[:1])
    with pytest.raises(ValueError, match=r"class labels must be in \[0, 1\] or 2"):
        backbone.denoise(x[:1], torch.tensor(500), torch.tensor([3]))


def _hand_embedding(backbone, prompt):
    """The SD conditioning, computed directly with the tokenizer and text encoder."""
    ids = backbone.tokenizer(prompt, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                             return_tensors="pt").input_ids
    return backbone.text_encoder(ids).last_hidden_state


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
@torch.inference_mode()
def test_first_guided_step_matches_a_hand_computation(backbone, kind):
    seed, lam, w = 7, 0.1, 3.0
    settings = SamplerSettings(steps=2, t_stop=0, guidance_strength=lam, cfg_scale=w, kind=kind)
    mode = torch.randn(1, *backbone.latent_shape, generator=torch.Generator().manual_seed(1))
    seen = {}

    def keep(info):
        seen.setdefault(info.step, info)

    sample(backbone, [1], [seed], modes=mode, settings=settings, callback=keep)
    step = seen[1]
    assert step.guided

    g = torch.Generator().manual_seed(seed)  # per image: the initial noise, then one draw per step
    x = torch.randn(backbone.latent_shape, generator=g)[None]
    z = torch.randn(backbone.latent_shape, generator=g)[None]
    assert torch.equal(step.x_t, x)
    # Respaced to 2 steps: step 1 is training timestep 999, step 0 is timestep 0.
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    abar_all = torch.cumprod(1 - betas, 0)
    abar, abar_prev = abar_all[999].item(), abar_all[0].item()
    t = torch.tensor([999])
    eps_c = backbone.unet(x, t, encoder_hidden_states=_hand_embedding(backbone, "a photo of a church")).sample
    eps_u = backbone.unet(x, t, encoder_hidden_states=_hand_embedding(backbone, "blurry")).sample
    eps = eps_u + w * (eps_c - eps_u)
    x0 = (x - math.sqrt(1 - abar) * eps) / math.sqrt(abar)
    if kind == "ddpm":
        beta = 1 - abar / abar_prev
        std = math.sqrt(beta * (1 - abar_prev) / (1 - abar))
        mean = (beta * math.sqrt(abar_prev) / (1 - abar)) * x0 + ((1 - abar_prev) * math.sqrt(1 - beta) / (1 - abar)) * x
        expected = mean + lam * std * (mode - x0) + std * z
    else:  # eta 0: eps_hat = eps - sqrt(1 - abar) lam (m - x0_hat), then the DDIM update
        eps_hat = eps - math.sqrt(1 - abar) * lam * (mode - x0)
        x0_hat = (x - math.sqrt(1 - abar) * eps_hat) / math.sqrt(abar)
        expected = math.sqrt(abar_prev) * x0_hat + math.sqrt(1 - abar_prev) * eps_hat
    # float32 model, batched (CFG-doubled) vs separate UNet calls: tolerance 1e-4 relative.
    torch.testing.assert_close(step.x0_hat, x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(step.x_prev, expected, rtol=1e-4, atol=1e-4)


def test_lambda_zero_is_plain_text_to_image_sampling_bit_for_bit(backbone):
    labels, seeds = [0, 1, 1], [11, 12, 13]
    modes = torch.randn(3, *backbone.latent_shape, generator=torch.Generator().manual_seed(2))
    base = SamplerSettings(steps=4, t_stop=2, cfg_scale=8.0, guidance_strength=0.0)
    plain = sample(backbone, labels, seeds, settings=base).latents
    assert torch.equal(sample(backbone, labels, seeds, modes=modes, settings=base).latents, plain)
    stopped = SamplerSettings(steps=4, t_stop=4, cfg_scale=8.0, guidance_strength=0.1)  # t_stop = S
    assert torch.equal(sample(backbone, labels, seeds, modes=modes, settings=stopped).latents, plain)
    guided = sample(backbone, labels, seeds, modes=modes,
                    settings=SamplerSettings(steps=4, t_stop=2, cfg_scale=8.0, guidance_strength=0.1)).latents
    assert not torch.allclose(guided, plain)
    # Seed-stable: an image does not depend on its batch (different batch compositions, float32:
    # tolerance 1e-4) and repeats exactly on the same instance.
    one_by_one = sample(backbone, labels, seeds, settings=base, batch_size=1).latents
    torch.testing.assert_close(one_by_one, plain, rtol=1e-4, atol=1e-4)
    assert torch.equal(sample(backbone, labels, seeds, settings=base).latents, plain)


def test_v_prediction_output_is_converted_to_noise(sd_root, tmp_path, backbone):
    root = _copy(sd_root, tmp_path)
    _edit_json(root / "scheduler" / "scheduler_config.json", prediction_type="v_prediction")
    v_backbone = load_stable_diffusion(root, class_prompts=PROMPTS, image_size=IMAGE, generation_size=GEN,
                                       negative_prompt="blurry")
    assert v_backbone.prediction_type == "v_prediction" and v_backbone.fingerprint != backbone.fingerprint
    x = torch.randn(2, *backbone.latent_shape, generator=torch.Generator().manual_seed(3))
    t, labels = torch.tensor([100, 900]), torch.tensor([0, 2])
    with torch.inference_mode():
        v = backbone.denoise(x, t, labels)  # the same weights' raw output, read as v
        eps = v_backbone.denoise(x, t, labels)
    abar = torch.cumprod(1 - backbone.train_betas(), 0)[t].float().view(-1, 1, 1, 1)
    # Two instances of the same float32 weights: tolerance 1e-5.
    torch.testing.assert_close(eps, abar.sqrt() * v + (1 - abar).sqrt() * x, rtol=1e-5, atol=1e-5)


def test_fingerprint_covers_every_component(sd_root, tmp_path):
    root = _copy(sd_root, tmp_path)
    fp, vae_fp = StableDiffusionFiles(root, GEN).fingerprints()
    assert StableDiffusionFiles(root, GEN).fingerprints() == (fp, vae_fp)  # stable
    vocab = json.loads((root / "tokenizer" / "vocab.json").read_text())
    vocab["zz"] = len(vocab)
    (root / "tokenizer" / "vocab.json").write_text(json.dumps(vocab))
    fp_tok, vae_tok = StableDiffusionFiles(root, GEN).fingerprints()
    assert fp_tok != fp and vae_tok == vae_fp  # the VAE's latent space did not change
    seen = {fp, fp_tok}
    for path, edit in [("text_encoder/config.json", {"layer_norm_eps": 1e-6}),
                       ("unet/config.json", {"upcast_attention": True}),
                       ("scheduler/scheduler_config.json", {"beta_end": 0.02})]:
        _edit_json(root / path, **edit)
        new = StableDiffusionFiles(root, GEN).fingerprints()[0]
        assert new not in seen, path
        seen.add(new)
    _edit_json(root / "vae/config.json", force_upcast=False)
    new, new_vae = StableDiffusionFiles(root, GEN).fingerprints()
    assert new not in seen and new_vae != vae_fp
    assert StableDiffusionFiles(root, 2 * GEN).fingerprints()[1] != new_vae  # another latent space


def test_dtype_and_device_kind_are_part_of_the_fingerprints(sd_root, backbone):
    """The same files run in bfloat16 (or on a GPU) give other latents and images: other
    fingerprints, so their latent stores and distilled sets are kept apart and re-made."""
    files = StableDiffusionFiles(sd_root, GEN)
    assert files.fingerprints(runtime_identity("cpu", torch.float32)) == files.fingerprints() == (
        backbone.fingerprint, backbone.vae_fingerprint)  # float32 on the CPU: the fingerprints as before
    bf16 = load_stable_diffusion(sd_root, class_prompts=PROMPTS, image_size=IMAGE, generation_size=GEN,
                                 dtype=torch.bfloat16)
    assert (bf16.fingerprint, bf16.vae_fingerprint) == files.fingerprints(runtime_identity("cpu", torch.bfloat16))
    assert bf16.fingerprint != backbone.fingerprint and bf16.vae_fingerprint != backbone.vae_fingerprint
    on_gpu = files.fingerprints(runtime_identity("cuda:1", torch.float32))
    assert on_gpu == files.fingerprints(runtime_identity("cuda", torch.float32))  # the kind, not the index
    assert len({on_gpu[0], bf16.fingerprint, backbone.fingerprint}) == 3


@pytest.mark.parametrize("component, weights", [("unet", "diffusion_pytorch_model.safetensors"),
                                                ("text_encoder", "model.safetensors")])
def test_weights_lacking_a_parameter_are_refused_not_initialised_at_random(sd_root, tmp_path, component, weights):
    from safetensors.torch import load_file, save_file

    root = _copy(sd_root, tmp_path)
    tensors = load_file(root / component / weights)
    dropped = sorted(k for k in tensors if k.endswith(".weight"))[-1]
    del tensors[dropped]
    save_file(tensors, root / component / weights)
    with pytest.raises(BackboneMismatchError, match=rf"{component}: .*missing from the weights.*{dropped}"):
        load_stable_diffusion(root, class_prompts=PROMPTS, image_size=IMAGE, generation_size=GEN)


def test_stop_guidance_in_scheduler_units():
    steps = 50
    timesteps = respace_schedule(torch.full((1000,), 0.01, dtype=torch.float64), steps).timesteps
    for boundary in (0, 300, 500, 510, 998):
        s = SamplerSettings(steps=steps, t_stop=stop_step_for_timestep(boundary, steps), guidance_strength=0.1)
        # Guidance runs exactly on the sampling steps whose UNet timestep is above the boundary.
        assert [s.guided_at(t) for t in range(steps)] == [int(timesteps[t]) > boundary for t in range(steps)]
    assert stop_step_for_timestep(510, 50) == 25 and int(timesteps[25]) == 510  # the paper's 25 of 50


def test_manifest_has_prompt_columns_only_for_prompted_rows(tmp_path):
    images = torch.zeros(1, 3, 8, 8, dtype=torch.uint8).numpy()
    plain = write_distilled_class(tmp_path / "plain", "0", images, None, [{"mode_index": 0}])
    header = plain.manifest.read_text().splitlines()[0].split(",")
    assert header == MANIFEST_COLUMNS  # class-label backbones: manifests exactly as before
    write_distilled_class(tmp_path / "sd", "0", images, None,
                          [{"mode_index": 0, "prompt": "a photo of a zero", "negative_prompt": ""}])
    row = read_manifest(tmp_path / "sd", "0")[0]
    assert list(row) == MANIFEST_COLUMNS + PROMPT_COLUMNS and row["prompt"] == "a photo of a zero"


def test_sd_config_example_loads_and_bad_templates_are_refused():
    cfg = load_config("configs/imagenette-sd15.yaml")
    sd = cfg.backbone.stable_diffusion
    assert cfg.backbone.kind == "stable_diffusion" and sd.generation_size == 512
    assert (cfg.sampler.cfg_scale, cfg.sampler.guidance_strength, cfg.sampler.t_stop, cfg.sampler.steps) == (8.0, 0.1, 25, 50)
    assert cfg.dataset.image_size == 256 and cfg.dataset.channels == 3
    assert all(c.name for c in cfg.dataset.class_specs())
    raw = {"dataset": {"channels": 3}, "backbone": {"kind": "stable_diffusion"}}
    with pytest.raises(ConfigError, match="backbone.stable_diffusion"):
        config_from_dict(raw)
    for bad in ("a photo of a {label}", "no field", "{name"):
        raw["backbone"]["stable_diffusion"] = {"pipeline_dir": "/x", "prompt_template": bad}
        with pytest.raises(ConfigError, match="prompt_template"):
            config_from_dict(raw)
