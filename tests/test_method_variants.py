"""Method variants in the config: names, grids, effective settings and the errors that name them."""

import pytest

from mgd3_core.config import ALL_METHODS, ConfigError, config_from_dict

GRID = {"grid": {"kind": "mgd3", "guidance_strength": [0.2, 0.05], "t_stop": [25, 0]}}


def test_the_six_names_resolve_as_before():
    cfg = config_from_dict({"sampler": {"guidance_strength": 0.2, "t_stop": 20},
                            "method_overrides": {"mgd3": {"cfg_scale": 2.0}}})
    variants = cfg.method_variants()
    assert cfg.methods == list(ALL_METHODS) == list(variants)
    assert all(v.kind == n and v.changed == {} for n, v in variants.items())
    assert cfg.model_dump(mode="json")["methods"] == list(ALL_METHODS)  # dumps write the file's key
    assert cfg.sampler_for("mgd3").cfg_scale == 2.0 and cfg.sampler_for("unguided").cfg_scale == 4.0
    assert cfg.modes_for("closest_real") == cfg.modes and cfg.kind_of("mgd3_no_stop") == "mgd3_no_stop"


def test_named_variants_and_a_grid_resolve_their_settings():
    cfg = config_from_dict({
        "sampler": {"cfg_scale": 2.0},
        "method_overrides": {"mgd3": {"cfg_scale": 3.0}},  # the plain base name only
        "methods": ["mgd3", "random_real",
                    {"name": "mgd3-l01", "kind": "mgd3", "guidance_strength": 0.1, "t_stop": 10},
                    {"name": "no-stop-ddim", "kind": "mgd3_no_stop", "sampler": "ddim", "steps": 25},
                    {"kind": "closest_real", "modes": {"method": "gmm", "n_init": 2}},
                    GRID]})
    v = cfg.method_variants()
    assert cfg.methods[:5] == ["mgd3", "random_real", "mgd3-l01", "no-stop-ddim", "closest_real~modes.method=gmm~modes.n_init=2"]
    assert v["mgd3-l01"].changed == {"guidance_strength": 0.1, "t_stop": 10}
    assert (v["mgd3-l01"].sampler.cfg_scale, cfg.sampler_for("mgd3").cfg_scale) == (2.0, 3.0)
    ddim = cfg.sampler_for("no-stop-ddim")
    assert (ddim.kind, ddim.steps, ddim.t_stop, ddim.guidance_strength) == ("ddim", 25, 0, 0.1)
    gmm = cfg.modes_for("closest_real~modes.method=gmm~modes.n_init=2")
    assert (gmm.method, gmm.n_init, gmm.max_iter) == ("gmm", 2, cfg.modes.max_iter)
    assert cfg.kind_of("no-stop-ddim") == "mgd3_no_stop"
    grid = [n for n in cfg.methods if n.startswith("mgd3~")]
    assert grid == ["mgd3~guidance_strength=0.2~t_stop=25", "mgd3~guidance_strength=0.2~t_stop=0",
                    "mgd3~guidance_strength=0.05~t_stop=25", "mgd3~guidance_strength=0.05~t_stop=0"]
    assert cfg.sampler_for("mgd3~guidance_strength=0.05~t_stop=0").model_dump(include={"guidance_strength", "t_stop"}) \
        == {"guidance_strength": 0.05, "t_stop": 0}
    with pytest.raises(ValueError, match="not a diffusion method"):
        cfg.sampler_for("closest_real~modes.method=gmm~modes.n_init=2")


def test_grid_names_do_not_depend_on_the_order_of_keys_or_values():
    a = config_from_dict({"methods": [GRID]}).methods
    b = config_from_dict({"methods": [{"grid": {"t_stop": [0, 25], "guidance_strength": [0.05, 0.2],
                                                 "kind": "mgd3"}}]}).methods
    assert sorted(a) == sorted(b) and len(a) == 4
    named = config_from_dict({"methods": [{"grid": {"kind": "mgd3", "name": "cfg", "cfg_scale": [2, 4.5]}}]})
    assert named.methods == ["cfg~cfg_scale=2", "cfg~cfg_scale=4.5"]


@pytest.mark.parametrize("methods, fragment", [
    (["mgd3", {"name": "mgd3-l01", "kind": "mgd3", "t_stop": 99}], "methods[1] (mgd3-l01).t_stop = 99 is outside [0, steps = 50]"),
    ([{"name": "fast", "kind": "mgd3", "steps": 20}], "methods[0] (fast).steps = 20 is below t_stop = 25"),
    ([{"name": "x", "kind": "mgd3", "guidance_strength": -1}], "methods[0] (x).guidance_strength: Input should be greater than or equal to 0"),
    ([{"name": "x", "kind": "mgd3", "sampler": "euler"}], "methods[0] (x).sampler: Input should be 'ddpm' or 'ddim'"),
    ([{"name": "x", "kind": "mgd3", "modes": {"method": "dbscan"}}], "methods[0] (x).modes.method: Input should be"),
    ([{"name": "x", "kind": "mgd3", "lambda": 0.1}], "methods[0] (x): unknown variant key(s) ['lambda']"),
    ([{"name": "x", "kind": "mgd4"}], "methods[0] (x).kind = 'mgd4' is not a base method"),
    ([{"name": "rr", "kind": "random_real", "guidance_strength": 0.1}], "methods[0] (rr).guidance_strength does not apply to kind random_real"),
    ([{"name": "u", "kind": "unguided", "t_stop": 10}], "methods[0] (u).t_stop does not apply to kind unguided"),
    ([{"name": "a/b", "kind": "mgd3"}], "methods[0].name = 'a/b' cannot be a folder name and partition key"),
    ([{"name": "a,b", "kind": "mgd3"}], "methods[0].name = 'a,b' cannot be"),
    ([{"name": "mgd3", "kind": "mgd3", "t_stop": 10}], "methods[0] (mgd3).name: 'mgd3' is a base method's name"),
    ([{"name": "full_data", "kind": "mgd3"}], "'full_data' is reserved"),
    (["mgd3", {"name": "v", "kind": "mgd3"}, {"name": "v", "kind": "unguided"}], "methods[2] (v): the name 'v' is listed twice"),
    ([{"name": "V1", "kind": "mgd3"}, {"name": "v1", "kind": "mgd3"}], "differ only in case"),
    ([{"grid": {"kind": "mgd3", "t_stop": []}}], "methods[0].grid.t_stop: a non-empty list of distinct values"),
    ([{"grid": {"kind": "mgd3", "t_stop": [0, 60]}}], "methods[0] (mgd3~t_stop=60).t_stop = 60 is outside"),
    ([], "methods: list at least one method"),
])
def test_bad_variants_name_the_entry_and_the_key(methods, fragment):
    with pytest.raises(ConfigError) as e:
        config_from_dict({"methods": methods}, source="exp.yaml")
    assert "exp.yaml" in str(e.value) and fragment in str(e.value), str(e.value)
