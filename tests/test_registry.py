"""The backbone registry: one module per backbone.kind, each with the names the pipeline calls."""

from __future__ import annotations

from mgd3_core.backbones import registry
from mgd3_core.config import BACKBONE_KINDS, config_from_dict

KIND_API = ("TRAINED_BY_PIPELINE", "ensure", "load", "fingerprint", "version_inputs", "describe")


def test_every_configurable_kind_has_a_module_with_the_kind_api():
    assert set(registry.KINDS) == set(BACKBONE_KINDS)
    for kind, module in registry.KINDS.items():
        missing = [name for name in KIND_API if not hasattr(module, name)]
        assert missing == [], f"{module.__name__} (backbone.kind {kind!r}) lacks {missing}"


def test_the_configured_kind_selects_its_module(tmp_path):
    embedded = config_from_dict({})
    pretrained = config_from_dict({"backbone": {"kind": "pretrained", "transformer_dir": str(tmp_path / "t"),
                                                "vae_dir": str(tmp_path / "v")}})
    assert registry.backbone_kind(embedded).__name__ == "mgd3_core.backbones.embedded"
    assert registry.backbone_kind(pretrained).__name__ == "mgd3_core.backbones.pretrained_dit"
    assert registry.backbone_kind(pretrained.backbone) is registry.backbone_kind(pretrained)
    # The embedded backbone is trained here and versioned by its training key; a pretrained one is observed.
    assert registry.backbone_kind(embedded).TRAINED_BY_PIPELINE
    assert not registry.backbone_kind(pretrained).TRAINED_BY_PIPELINE
    assert set(registry.backbone_kind(embedded).version_inputs(embedded)) == {"embedded_training_key"}
    # Not trained yet: no fingerprint (nothing downstream can run), not an error.
    assert registry.backbone_fingerprint(embedded, tmp_path / "home") is None
