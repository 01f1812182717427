"""The evaluation report (mgd3_core.report) from a tiny fake run."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mgd3_core.images import image_grid, png_bytes
from mgd3_core.report import METHOD_ORDER, write_report

from tests.toys import grid_accuracy, pixels_of

METHODS = ["mgd3", "unguided", "mgd3_no_stop", "random_real", "closest_real", "decoded_centroids"]  # shuffled order


def fake_accuracy() -> pd.DataFrame:
    rows = []
    for seed in range(3):
        base = {"student": "convnet", "protocol": "hard", "gen_seed": seed, "train_seed": 0}
        rows.append({**base, "method": "full_data", "ipc": np.nan, "final_acc": 98.0 + seed, "best_acc": 99.0})
        for i, m in enumerate(METHODS):
            acc = 80.0 + i + 2.0 * seed  # per method: mean 82 + i, sample std 2
            rows.append({**base, "method": m, "ipc": 10, "final_acc": acc, "best_acc": acc + 1})
    return pd.DataFrame(rows)


def fake_metrics() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame([{"method": m, "ipc": 10, "class": c, "diversity": rng.random(),
                          "representativeness": rng.random(), "cos_div": rng.random(), "cos_rep": rng.random()}
                         for m in METHODS for c in range(3)])


def fake_tsne() -> pd.DataFrame:
    rng = np.random.default_rng(1)
    rows = [{"ipc": 10, "class": c, "method": m, "x": rng.normal(), "y": rng.normal()}
            for c in (0, 1) for m in ["real"] * 8 + ["mgd3"] * 2 + ["unguided"] * 2]
    return pd.DataFrame(rows)


def test_image_grid_layout_and_png_round_trip():
    images = np.stack([np.full((1, 4, 4), 10 * (i + 1), np.uint8) for i in range(5)])
    grid = image_grid(images, nrow=3, padding=2, pad_value=255)
    assert grid.mode == "L" and grid.size == (3 * 6 + 2, 2 * 6 + 2)  # (width, height)
    a = np.asarray(grid)
    assert (a[2:6, 2:6] == 10).all() and (a[2:6, 8:12] == 20).all() and (a[8:12, 8:12] == 50).all()
    assert (a[8:12, 14:18] == 255).all()  # the empty sixth cell stays padding
    rgb = image_grid(np.zeros((2, 3, 4, 4), np.uint8), nrow=2)
    assert rgb.mode == "RGB"
    data = png_bytes(grid)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), a)
    with pytest.raises(ValueError, match="uint8"):
        image_grid(np.zeros((2, 1, 4, 4), np.float32))


def test_report_from_a_tiny_fake_run(tmp_path):
    grids = {"mgd3 IPC 10": image_grid(np.zeros((10, 1, 8, 8), np.uint8), nrow=5)}
    rep = write_report(tmp_path / "report", fake_accuracy(), fake_metrics(), tsne=fake_tsne(), image_grids=grids,
                       notes="config: embedded")
    for path in [rep.markdown, rep.html, rep.results_csv, rep.metrics_csv, rep.summary_csv, *rep.pngs.values()]:
        assert path.is_file() and path.stat().st_size > 0, path
    assert set(rep.pngs) == {"accuracy.png", "div_rep_ipc10.png", "tsne_ipc10.png", "grid_mgd3_IPC_10.png"}
    assert not [p for p in rep.out_dir.iterdir() if p.name.endswith(".tmp")]

    # every method once, baselines first in the documented order
    lines = [line for line in rep.table_markdown.splitlines()[2:]]
    methods = [line.split("|")[4].strip() for line in lines]
    assert methods == list(METHOD_ORDER)
    mgd3 = lines[methods.index("mgd3")]
    assert "82.00 ± 2.00" in mgd3 and "| 3 |" in mgd3  # METHODS.index("mgd3") == 0
    assert "| all |" in lines[0]  # the full-data bound spans every IPC
    s = rep.summary.set_index("method")
    assert s.loc["mgd3", "ior"] == pytest.approx(82.0 - 85.0)  # random_real: 80 + 3 + 2
    assert s.loc["mgd3", "hlr"] == pytest.approx(99.0 - 82.0)

    md = rep.markdown.read_text()
    assert rep.table_markdown in md and "(accuracy.png)" in md and "final" in md
    page = rep.html.read_text()
    assert page.count("data:image/png;base64,") == 4 and "mgd3_no_stop" in page
    assert len(pd.read_csv(rep.results_csv)) == len(fake_accuracy())
    assert len(pd.read_csv(rep.metrics_csv)) == len(fake_metrics())


def test_report_without_optional_inputs_and_bad_columns(tmp_path):
    rep = write_report(tmp_path, fake_accuracy())
    assert rep.metrics_csv is None and set(rep.pngs) == {"accuracy.png"}
    assert "Diversity" not in rep.table_markdown
    with pytest.raises(ValueError, match="missing column"):
        write_report(tmp_path, fake_accuracy().drop(columns="best_acc"))


def test_dd_ranking_scores_use_the_ranking_accuracy_when_every_run_has_it(tmp_path):
    acc = fake_accuracy()
    acc["ranking_acc"] = acc["final_acc"] + np.where(acc["method"] == "mgd3", 5.0, 0.0)
    rep = write_report(tmp_path / "a", acc)
    s = rep.summary.set_index("method")
    assert s.loc["mgd3", "ior"] == pytest.approx(87.0 - 85.0)  # ranking 82 + 5 against random 85
    assert s.loc["mgd3", "hlr"] == pytest.approx(99.0 - 87.0)
    assert s.loc["mgd3", "mean"] == pytest.approx(82.0)  # the headline stays the final epoch
    assert "last fifth of training" in rep.markdown.read_text()
    acc.loc[0, "ranking_acc"] = np.nan  # one run without it: every score falls back to the final epoch
    s = write_report(tmp_path / "b", acc).summary.set_index("method")
    assert s.loc["mgd3", "ior"] == pytest.approx(82.0 - 85.0)


def test_a_grid_is_ranked_under_its_base_method_and_drawn_against_its_settings(tmp_path):
    acc, variants = grid_accuracy()
    rep = write_report(tmp_path / "grid", acc, variants=variants, split="validation")
    ranked, pivot = rep.variants_markdown.split("\n\n")[:2]
    lines = ranked.splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert head[3:8] == ["Rank", "Base method", "Variant", "guidance_strength", "t_stop"]
    assert "Final validation top-1 % (mean ± std)" in head
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert [r[4] for r in rows] == ["random_real", "closest_real", "unguided"] + ["mgd3"] * 9  # grouped
    best = rows[3]  # mgd3's best first: λ 0.2, t_stop 25 scores 85.2, above closest real (85)
    assert best[3:8] == ["1", "mgd3", "mgd3~guidance_strength=0.2~t_stop=25", "0.2", "25"]
    assert "85.70 ± 0.71" in best
    assert rows[1][3] == "2" and rows[2][3] == "12" and rows[2][6:8] == ["0", "–"]  # unguided: λ 0, no t_stop
    assert sorted(int(r[3]) for r in rows) == list(range(1, 13))

    grid = rep.variants_markdown.split("\n\n")[2].splitlines()  # the pivot: λ rows, t_stop columns
    assert pivot.startswith("mgd3, convnet, hard labels, IPC 10: final validation top-1 %")
    assert grid[0] == "| guidance_strength \\ t_stop | t_stop 0 | t_stop 10 | t_stop 25 |"
    assert grid[2:] == ["| 0.05 | 80.55 ± 0.71 | 81.05 ± 0.71 | 81.80 ± 0.71 |",
                        "| 0.1 | 80.60 ± 0.71 | 81.60 ± 0.71 | 83.10 ± 0.71 |",
                        "| 0.2 | 80.70 ± 0.71 | 82.70 ± 0.71 | 85.70 ± 0.71 |"]
    png = rep.pngs["sweep_mgd3.png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # one line per t_stop (matplotlib's C0..C2), one dotted line per baseline (C5..C7)
    for color in ("#1f77b4", "#ff7f0e", "#2ca02c", "#8c564b", "#e377c2", "#7f7f7f"):
        assert pixels_of(png, color) > 100, color
    md = rep.markdown.read_text()
    assert rep.variants_markdown in md and "(sweep_mgd3.png)" in md and "validation" in md.split("\n\n")[2]
    assert rep.html.read_text().count("data:image/png;base64,") == 2  # the bars and the sweep

    # Three varied settings: ranked, not drawn. The six base names alone: the report of before.
    v3 = {m: (k, {**s, "cfg_scale": 2.0 + (s.get("t_stop") or 0)} if k == "mgd3" else s)
          for m, (k, s) in variants.items()}
    assert "sweep_mgd3.png" not in write_report(tmp_path / "three", acc, variants=v3).pngs
    base = write_report(tmp_path / "base", fake_accuracy(), variants={m: (m, {}) for m in METHODS})
    assert base.variants_markdown == "" and set(base.pngs) == {"accuracy.png"}
    assert base.markdown.read_text() == write_report(tmp_path / "plain", fake_accuracy()).markdown.read_text()
