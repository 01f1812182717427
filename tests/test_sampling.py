"""The guided sampler: the mathematics of MGD3 (ICML 2025, Sec. 3.2, Alg. 1), pinned down."""

import math

import numpy as np
import pytest
import torch

from mgd3_core.images import png_bytes, to_uint8
from mgd3_core.sampling import (
    SamplerSettings,
    denoise_with_cfg,
    guided_ddim_step,
    guided_ddpm_step,
    image_seed,
    respace_schedule,
    sample,
)
from tests.toys import GaussianToyBackbone, linear_betas

S = 20


def _request(bb, n_per_class=3):
    labels = [c for c in range(bb.num_classes) for _ in range(n_per_class)]
    seeds = [image_seed(0, str(c), n_per_class, i) for c in range(bb.num_classes) for i in range(n_per_class)]
    g = torch.Generator().manual_seed(1)
    modes = torch.stack([bb.means[c] + 0.8 * torch.randn(bb.latent_shape, generator=g) for c in labels])
    return labels, seeds, modes


def test_respaced_schedule_keeps_the_chosen_alphas_cumprod():
    betas = linear_betas()
    sch = respace_schedule(betas, 50)
    abar = torch.cumprod(1 - betas, 0)
    assert sch.steps == 50
    assert sch.timesteps[0] == 0 and sch.timesteps[-1] == 999
    torch.testing.assert_close(sch.alphas_cumprod, abar[sch.timesteps])
    torch.testing.assert_close(torch.cumprod(1 - sch.betas, 0), sch.alphas_cumprod)
    with pytest.raises(ValueError, match="sampler.steps"):
        respace_schedule(betas, 1001)


def test_hand_computed_guided_ddpm_step():
    sch = respace_schedule(linear_betas(), 10)
    t = 6
    x_t = torch.tensor([[[[1.0, -2.0]]]])
    eps = torch.tensor([[[[0.5, 0.25]]]])
    mode = torch.tensor([[[[0.3, 0.7]]]])
    z = torch.tensor([[[[0.1, -0.2]]]])
    lam = 0.1
    abar = float(sch.alphas_cumprod[t])
    abar_prev = float(sch.alphas_cumprod_prev[t])
    beta = 1 - abar / abar_prev
    # By hand, straight from the formulas.
    x0 = (x_t - math.sqrt(1 - abar) * eps) / math.sqrt(abar)
    mu = (beta * math.sqrt(abar_prev) / (1 - abar)) * x0 + ((1 - abar_prev) * math.sqrt(1 - beta) / (1 - abar)) * x_t
    sigma = math.sqrt(beta * (1 - abar_prev) / (1 - abar))
    expected = mu + lam * sigma * (mode - x0) + sigma * z
    out = guided_ddpm_step(x_t, eps, t, sch, noise=z, mode=mode, guidance_strength=lam)
    torch.testing.assert_close(out.pred_original_sample, x0)
    torch.testing.assert_close(out.mean, mu)
    torch.testing.assert_close(out.prev_sample, expected)
    # Unguided: the guidance term is gone, nothing else changes.
    plain = guided_ddpm_step(x_t, eps, t, sch, noise=z)
    torch.testing.assert_close(plain.prev_sample, mu + sigma * z)
    # Last step: no noise.
    last = guided_ddpm_step(x_t, eps, 0, sch, noise=z)
    torch.testing.assert_close(last.prev_sample, last.mean)


def test_hand_computed_guided_ddim_step():
    sch = respace_schedule(linear_betas(), 10)
    t, lam = 4, 0.2
    x_t = torch.tensor([[[[0.4, -1.0]]]])
    eps = torch.tensor([[[[0.3, -0.1]]]])
    mode = torch.tensor([[[[1.0, 0.0]]]])
    abar, abar_prev = float(sch.alphas_cumprod[t]), float(sch.alphas_cumprod_prev[t])
    x0 = (x_t - math.sqrt(1 - abar) * eps) / math.sqrt(abar)
    eps_hat = eps - math.sqrt(1 - abar) * lam * (mode - x0)  # Algorithm 1
    x0_hat = (x_t - math.sqrt(1 - abar) * eps_hat) / math.sqrt(abar)
    expected = math.sqrt(abar_prev) * x0_hat + math.sqrt(1 - abar_prev) * eps_hat
    out = guided_ddim_step(x_t, eps, t, sch, noise=None, mode=mode, guidance_strength=lam)
    torch.testing.assert_close(out.prev_sample, expected)


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_lambda_zero_and_t_stop_S_are_exactly_unguided(kind):
    bb = GaussianToyBackbone()
    labels, seeds, modes = _request(bb)
    base = SamplerSettings(steps=S, cfg_scale=2.0, guidance_strength=0.1, t_stop=5, kind=kind)
    unguided = sample(bb, labels, seeds, modes=None, settings=base).latents
    lam0 = sample(bb, labels, seeds, modes=modes, settings=SamplerSettings(**{**base.__dict__, "guidance_strength": 0.0})).latents
    stop_s = sample(bb, labels, seeds, modes=modes, settings=SamplerSettings(**{**base.__dict__, "t_stop": S})).latents
    guided = sample(bb, labels, seeds, modes=modes, settings=base).latents
    # Exact: one backbone instance, the same inputs and batches, and the same code path
    # (the guidance term is skipped, not added as zero), so the same kernels run.
    assert torch.equal(unguided, lam0)
    assert torch.equal(unguided, stop_s)
    assert not torch.equal(unguided, guided)


def test_guided_samples_end_closer_to_their_modes_and_distance_shrinks_while_guided():
    bb = GaussianToyBackbone()
    labels, seeds, modes = _request(bb, n_per_class=4)
    settings = SamplerSettings(steps=S, cfg_scale=1.0, guidance_strength=0.5, t_stop=8)
    trace = {}

    def record(info):
        d = (info.x0_hat - modes[info.image_indices.start:info.image_indices.stop]).flatten(1).norm(dim=1)
        trace[info.step] = d.mean().item()

    guided = sample(bb, labels, seeds, modes=modes, settings=settings, callback=record).latents
    unguided = sample(bb, labels, seeds, modes=None, settings=settings).latents
    dg = (guided - modes).flatten(1).norm(dim=1)
    du = (unguided - modes).flatten(1).norm(dim=1)
    assert dg.mean() < 0.9 * du.mean()
    assert (dg < du).float().mean() >= 0.9
    # During the guided steps (t = S-1 .. t_stop+1) the estimate moves toward the mode.
    guided_steps = [trace[t] for t in range(S - 1, settings.t_stop, -1)]
    assert guided_steps[-1] < guided_steps[0]
    assert sum(b < a for a, b in zip(guided_steps, guided_steps[1:])) >= 0.8 * (len(guided_steps) - 1)


def test_lambda_schedules_fade_guidance_out_by_t_stop_and_constant_is_the_paper():
    base = SamplerSettings(steps=S, guidance_strength=0.4, t_stop=5)
    linear = SamplerSettings(**{**base.__dict__, "guidance_schedule": "linear"})
    cosine = SamplerSettings(**{**base.__dict__, "guidance_schedule": "cosine"})
    # constant: lambda on every guided step t = S-1 .. t_stop+1, then 0 (the paper's hard stop)
    assert [base.strength_at(t) for t in (S - 1, 6, 5, 0)] == [0.4, 0.4, 0.0, 0.0]
    # fades: lambda at t = S-1, decreasing to 0 at t_stop; linear halfway is lambda/2, cosine too
    for sched in (linear, cosine):
        values = [sched.strength_at(t) for t in range(S - 1, -1, -1)]
        assert values[0] == pytest.approx(0.4) and values[-1] == 0.0 and sched.strength_at(5) == 0.0
        assert all(b <= a for a, b in zip(values, values[1:]))
    mid = (S - 1 + 5) / 2  # t = 12: u = 1/2
    assert linear.strength_at(int(mid)) == pytest.approx(0.2) and cosine.strength_at(int(mid)) == pytest.approx(0.2)
    assert cosine.strength_at(S - 2) > linear.strength_at(S - 2)  # the cosine holds lambda longer
    # the paper's constant schedule writes the manifest columns it always did; others add theirs
    assert "guidance_schedule" not in base.as_dict() and linear.as_dict()["guidance_schedule"] == "linear"
    with pytest.raises(ValueError, match="guidance_schedule 'step' must be constant, linear or cosine"):
        SamplerSettings(guidance_schedule="step")
    # sampling: a fading schedule guides less than the constant one, more than none
    bb = GaussianToyBackbone()
    labels, seeds, modes = _request(bb, n_per_class=4)
    dist = {name: (sample(bb, labels, seeds, modes=modes, settings=st).latents - modes).flatten(1).norm(dim=1).mean()
            for name, st in (("constant", base), ("linear", linear),
                             ("none", SamplerSettings(**{**base.__dict__, "guidance_strength": 0.0})))}
    assert dist["constant"] < dist["linear"] < dist["none"]


def test_cfg_on_noise_channels_only_and_variance_from_conditional_half():
    bb = GaussianToyBackbone(learned_variance=True)
    x = torch.randn(2, *bb.latent_shape)
    labels = torch.tensor([1, 2])
    w = 4.0
    eps, var = denoise_with_cfg(bb, x, 500, labels, w)
    t = torch.full((2,), 500)
    out_c = bb.denoise(x, t, labels)
    out_u = bb.denoise(x, t, torch.full_like(labels, bb.null_class))
    c = bb.latent_shape[0]
    torch.testing.assert_close(eps, out_u[:, :c] + w * (out_c[:, :c] - out_u[:, :c]))
    torch.testing.assert_close(var, out_c[:, c:])  # not CFG-combined, not the null half
    # The learned-variance path runs end to end and its variance changes the result.
    labels2, seeds, modes = _request(bb)
    s = SamplerSettings(steps=5, cfg_scale=w, t_stop=2)
    a = sample(bb, labels2, seeds, modes=modes, settings=s).latents
    bb.learned_variance = False
    b = sample(bb, labels2, seeds, modes=modes, settings=s).latents
    assert torch.isfinite(a).all() and not torch.allclose(a, b)


def test_cfg_scale_one_uses_a_single_forward_pass():
    bb = GaussianToyBackbone()
    labels, seeds, _ = _request(bb)
    sample(bb, labels, seeds, settings=SamplerSettings(steps=5, cfg_scale=1.0, t_stop=0), batch_size=100)
    assert bb.calls == 5


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_batch_size_does_not_change_images_and_same_seed_same_png(kind):
    bb = GaussianToyBackbone()
    labels, seeds, modes = _request(bb, n_per_class=5)
    s = SamplerSettings(steps=S, cfg_scale=3.0, t_stop=10, kind=kind)
    runs = [sample(bb, labels, seeds, modes=modes, settings=s, batch_size=b).latents for b in (1, 7, len(labels))]
    # Other batch compositions may take other vectorised paths: float32 after S steps,
    # rtol/atol 1e-5.
    for r in runs[1:]:
        torch.testing.assert_close(r, runs[0], rtol=1e-5, atol=1e-5)
    # Order of requests does not matter either: image i depends on its own seed only.
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(3))
    shuffled = sample(bb, [labels[i] for i in perm], [seeds[i] for i in perm], modes=modes[perm], settings=s).latents
    torch.testing.assert_close(shuffled, runs[2][perm], rtol=1e-5, atol=1e-5)
    # Exact: the same instance, inputs and batch size in one process give the same PNG bytes.
    again = sample(bb, labels, seeds, modes=modes, settings=s, batch_size=7).latents
    pngs = lambda lat: [png_bytes(im) for im in to_uint8(lat[:, :1])]
    assert pngs(again) == pngs(runs[1])


def test_image_seed_is_a_function_of_identity_only():
    # Pinned values: the seed of a stored image must not change between processes (no hash()
    # randomisation), machines or versions, or every stored distilled set would be re-made.
    assert image_seed(0, "3", 10, 2) == 4821844494190709817
    assert image_seed(0, "n01440764", 50, 49) == 4457045557945286810
    assert len({image_seed(0, "3", 10, i) for i in range(10)}) == 10
    assert image_seed(0, "3", 10, 2) != image_seed(0, "3", 50, 2)
    assert image_seed(0, "3", 10, 2) != image_seed(1, "3", 10, 2)
    assert image_seed(0, "3", 10, 2) != image_seed(0, "4", 10, 2)


def test_bad_requests_give_named_errors():
    bb = GaussianToyBackbone()
    labels, seeds, modes = _request(bb)
    with pytest.raises(ValueError, match="one mode per image"):
        sample(bb, labels, seeds, modes=modes[:-1], settings=SamplerSettings(steps=2, t_stop=0))
    bad = modes.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        sample(bb, labels, seeds, modes=bad, settings=SamplerSettings(steps=2, t_stop=0))
    with pytest.raises(ValueError, match="seed"):
        sample(bb, labels, seeds[:-1], settings=SamplerSettings(steps=2, t_stop=0))
    with pytest.raises(ValueError, match="outside the backbone's classes"):
        sample(bb, [99], [1], settings=SamplerSettings(steps=2, t_stop=0))
    with pytest.raises(ValueError, match="t_stop"):
        SamplerSettings(steps=10, t_stop=11)
