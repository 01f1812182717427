"""Embedded backbone training: determinism, checkpoint/resume, reuse, label dropout."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mgd3_core.backbones import build_dit, embedded_backbone_dir, ensure_embedded_backbone
from mgd3_core.backbones.embedded_training import training_images
from mgd3_core.backbones.train_loop import LoopSettings, lr_at
from mgd3_core.config import EmbeddedDiTConfig
from mgd3_core.data import open_dataset

from tests.toys import tiny_embedded_config

pytestmark = pytest.mark.usefixtures("one_thread")


class Interrupt(Exception):
    pass


def interrupt_at(stage: str, step: int, seen: list):
    def progress(s, k, total, metrics):
        seen.append((s, k))
        if (s, k) == (stage, step):
            raise Interrupt(f"{s} step {k}")
    return progress


def weight_digests(root: Path) -> dict[str, str]:
    out = {}
    for f in sorted(root.rglob("*.safetensors")):
        for name, t in load_file(f).items():
            out[f"{f.parent.name}/{name}"] = hashlib.sha256(t.numpy().tobytes()).hexdigest()
    return out


def test_resume_after_interruptions_gives_the_uninterrupted_weights(tmp_path):
    cfg = tiny_embedded_config(steps=5)  # checkpoint_every = 2
    straight = ensure_embedded_backbone(cfg, tmp_path / "a", progress=lambda *a: None)

    home, seen = tmp_path / "b", []
    with pytest.raises(Interrupt):  # killed in the VAE stage after step 3 (checkpoint at 2)
        ensure_embedded_backbone(cfg, home, progress=interrupt_at("vae", 3, seen))
    partial = embedded_backbone_dir(cfg, home).with_name(embedded_backbone_dir(cfg, home).name + ".partial")
    assert (partial / "vae.ckpt.safetensors").is_file() and not embedded_backbone_dir(cfg, home).exists()
    seen.clear()
    with pytest.raises(Interrupt):  # killed in the DiT stage after step 5 (checkpoint at 4)
        ensure_embedded_backbone(cfg, home, progress=interrupt_at("dit", 5, seen))
    assert seen[0] == ("vae", 3), "the VAE stage restarted instead of resuming from its checkpoint"
    seen.clear()
    resumed = ensure_embedded_backbone(cfg, home, progress=interrupt_at("never", 0, seen))
    assert [s for s in seen if s[0] == "vae"] == [], "the finished VAE stage was trained again"
    assert [s for s in seen if s[0] == "dit"] == [("dit", 5)]

    a, b = weight_digests(straight), weight_digests(resumed)
    assert set(a) == set(b) and len(a) > 10
    # Bit for bit, and guaranteed: both trainings run in this process (one CPU
    # capability) under deterministic_training (the config's thread count,
    # deterministic algorithms), and a resume restores every tensor and the RNG.
    assert a == b
    assert not partial.exists()  # checkpoints are cleaned up once the backbone is saved


def test_trained_backbone_is_reused_not_retrained(tmp_path):
    cfg, seen = tiny_embedded_config(), []
    first = ensure_embedded_backbone(cfg, tmp_path, progress=lambda *a: None)
    digests = weight_digests(first)
    assert ensure_embedded_backbone(cfg, tmp_path, progress=interrupt_at("never", 0, seen)) == first
    assert seen == [] and weight_digests(first) == digests  # the same files, read twice


def test_training_uses_the_configured_threads_whatever_the_caller_uses(tmp_path):
    cfg = _embedded(tiny_embedded_config(), threads=2)
    inside, digests = [], []
    for caller in (1, 2):
        torch.set_num_threads(caller)
        record = lambda *a: inside.append((torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()))
        root = ensure_embedded_backbone(cfg, tmp_path / f"caller{caller}", progress=record)
        assert torch.get_num_threads() == caller and not torch.are_deterministic_algorithms_enabled()
        digests.append(weight_digests(root))
    assert set(inside) == {(2, True)}
    # Exact: same process and CPU capability, same (configured) thread count. Before the
    # count was fixed, a caller at 1 and at 2 threads trained different last bits.
    assert digests[0] == digests[1]


def _embedded(cfg, **changes):
    return cfg.model_copy(update={"backbone": cfg.backbone.model_copy(update={
        "embedded": cfg.backbone.embedded.model_copy(update=changes)})})


def test_directory_key_tracks_training_inputs_only(tmp_path):
    base = tiny_embedded_config()
    d = embedded_backbone_dir(base, tmp_path)
    assert embedded_backbone_dir(tiny_embedded_config(steps=5), tmp_path) != d
    assert embedded_backbone_dir(base.model_copy(update={"dataset": base.dataset.model_copy(
        update={"max_per_class": 11})}), tmp_path) != d
    assert embedded_backbone_dir(_embedded(base, seed=1), tmp_path) != d
    # How often checkpoints are written does not change the weights.
    assert embedded_backbone_dir(_embedded(base, checkpoint_every=3), tmp_path) == d


def test_directory_key_tracks_the_training_environment(tmp_path, monkeypatch):
    """The thread count and the CPU kernels change the weights' last bits: another
    machine or count trains its own backbone instead of reusing one it would not produce."""
    base = tiny_embedded_config()
    d = embedded_backbone_dir(base, tmp_path)
    assert embedded_backbone_dir(_embedded(base, threads=2), tmp_path) != d
    native = torch.backends.cpu.get_cpu_capability()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2" if native != "AVX2" else "DEFAULT")
    assert embedded_backbone_dir(base, tmp_path) != d
    monkeypatch.undo()
    monkeypatch.setattr(torch, "__version__", torch.__version__ + "+other")
    assert embedded_backbone_dir(base, tmp_path) != d
    monkeypatch.undo()
    assert embedded_backbone_dir(base, tmp_path) == d


def test_trains_on_the_training_split_only():
    cfg = tiny_embedded_config()
    x, y, n = training_images(cfg)
    source = open_dataset(cfg.dataset)
    expected = torch.cat([torch.from_numpy(source.load(c.id, "train", source.items(c.id, "train")))
                          for c in source.classes()])
    assert n == 3 and torch.equal(y.bincount(), torch.tensor([12, 12, 12]))
    assert torch.equal(((x + 1) * 127.5).round().to(torch.uint8), expected)


def test_label_dropout_is_not_done_per_block():
    # diffusers builds a class dropout (p = 0.1) into every DiT block; in train
    # mode the blocks would drop labels independently. It must be off: the
    # null label is substituted once, outside the model.
    cfg = EmbeddedDiTConfig(num_layers=3, num_attention_heads=2, attention_head_dim=8, patch_size=2)
    torch.manual_seed(0)
    dit = build_dit(cfg, latent_channels=2, latent_size=4, num_classes=3).train()
    for p in dit.parameters():  # adaLN-Zero starts at zero: give the label a visible effect
        torch.nn.init.normal_(p, std=0.2)
    x, t = torch.randn(512, 2, 4, 4), torch.randint(0, 1000, (512,))
    y = torch.randint(0, 3, (512,))
    with torch.no_grad():
        first = dit(x, timestep=t, class_labels=y).sample
        again = dit(x, timestep=t, class_labels=y).sample
        null = dit(x, timestep=t, class_labels=torch.full_like(y, 3)).sample
    assert torch.equal(first, again)  # exact: same instance, same inputs; no random label drops inside
    assert not torch.allclose(first, null)
    assert all(b.norm1.emb.class_embedder.dropout_prob == 0 for b in dit.transformer_blocks)


def test_learning_rate_schedule():
    s = LoopSettings(steps=100, lr=1e-3, warmup_steps=10, final_lr_fraction=0.1)
    assert lr_at(0, s) == pytest.approx(1e-4) and lr_at(9, s) == pytest.approx(1e-3)
    assert lr_at(10, s) == pytest.approx(1e-3) and lr_at(100, s) == pytest.approx(1e-4)
    assert all(lr_at(k, s) >= lr_at(k + 1, s) for k in range(10, 100))
