"""The Dagster UI shows the asset graph, the partitions of distilled_images, a distilled_images
page with its lineage and thumbnails, and the automation sensor.

Starts ``dagster-webserver`` on 127.0.0.1 (a free port) on the session's tiny
instance, loads the code location through ``workspace.yaml`` as ``make ui``
does, and renders pages in headless Chromium: ``$CHROMIUM``, else ``chromium`` on PATH (``make
browser-deps`` installs Debian's as root, and says how to get one without). A missing Chromium
fails the test. Screenshots go to ``test-output/``: the README's tour of the UI shows copies of
them (``docs/img/``), so a UI that stops rendering a page fails here first.
"""

import base64
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from mgd3_core.config import PROJECT_ROOT

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or ""
OUTPUT = PROJECT_ROOT / "test-output"
ASSETS = ("backbone", "latent_store", "mode_centroids", "distilled_images", "teacher", "full_data_students",
          "students", "diversity_report", "evaluation_report")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _render(url: str, profile: Path, screenshot: Path, ready, attempts: int = 4, window: str = "1400,1100") -> str:
    """Render ``url`` headless: save a screenshot and return the DOM once ``ready(dom)`` holds
    (the UI loads the code location lazily, so a first render can be early)."""
    _need_chromium()
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--virtual-time-budget=15000", f"--window-size={window}",
           f"--screenshot={screenshot}", "--dump-dom", url]
    dom = ""
    for _ in range(attempts):
        dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
        if ready(dom):
            break
        time.sleep(3)
    return dom


def _need_chromium() -> None:
    if not (CHROMIUM and Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
        found = f"CHROMIUM={CHROMIUM} is not an executable file" if CHROMIUM else "no chromium on PATH, CHROMIUM unset"
        pytest.fail(f"no headless Chromium ({found}): put a `chromium` on PATH or set CHROMIUM=/path/to/chromium; "
                    "`make browser-deps` installs Debian's as root and says how to get one without root")


@contextlib.contextmanager
def _serving(env: dict, log: Path):
    """``dagster-webserver`` on a free port of 127.0.0.1 with ``env``'s instance and experiment; its URL."""
    _need_chromium()
    port = _free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dagster_webserver", "-w", str(PROJECT_ROOT / "workspace.yaml"),
             "-h", "127.0.0.1", "-p", str(port)],
            cwd=PROJECT_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 150
        while True:
            try:
                urllib.request.urlopen(f"{base}/server_info", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"dagster-webserver did not start:\n{log.read_text()[-3000:]}")
                time.sleep(1)
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the webserver and the code server it started
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def webserver(tiny_graph, tmp_path_factory):
    with _serving(tiny_graph.env(), tmp_path_factory.mktemp("webserver") / "webserver.log") as base:
        yield base


def test_the_asset_graph_shows_every_asset(webserver, tmp_path):
    OUTPUT.mkdir(exist_ok=True)
    url, shot = f"{webserver}/asset-groups", OUTPUT / "ui_asset_graph.png"
    dom = _render(url, tmp_path / "profile", shot, lambda d: all(a in d for a in ASSETS))
    missing = [a for a in ASSETS if a not in dom]
    assert not missing, f"asset graph at {url} does not show {missing}"
    assert shot.stat().st_size > 10_000


def test_the_distilled_images_page_shows_the_lineage_and_the_thumbnails(webserver, tmp_path):
    OUTPUT.mkdir(exist_ok=True)
    url, shot = f"{webserver}/assets/distilled_images", OUTPUT / "ui_distilled_images.png"
    dom = _render(url, tmp_path / "profile", shot, lambda d: "data:image/png;base64," in d)
    thumbnails = re.findall(r'<img[^>]+src="data:image/png;base64,([A-Za-z0-9+/=]+)"', dom)
    assert thumbnails, f"no thumbnail image rendered at {url}"
    assert base64.b64decode(thumbnails[0])[:8] == b"\x89PNG\r\n\x1a\n"
    for text in ("distilled_images", "preview", "lineage", "mode_index", "dist_to_mode", "thumbnails"):
        assert text in dom, f"{text!r} not shown at {url}"
    assert shot.stat().st_size > 10_000


def test_the_partitions_view_shows_every_method_and_class(webserver, tmp_path, tiny_graph):
    OUTPUT.mkdir(exist_ok=True)
    url, shot = f"{webserver}/assets/distilled_images?view=partitions", OUTPUT / "ui_partitions.png"
    methods = list(tiny_graph.cfg.methods)
    dom = _render(url, tmp_path / "profile", shot, lambda d: all(m in d for m in methods))
    missing = [m for m in methods if m not in dom]
    assert not missing, f"partitions view at {url} does not show the methods {missing}"
    for text in ("method", "class", "Materialized"):
        assert text in dom, f"{text!r} not shown at {url}"
    assert shot.stat().st_size > 10_000


def test_the_partitions_view_lists_a_grids_variants_as_methods(tmp_path):
    """Variants are the method partitions: a config with a grid shows each variant's name (nothing
    needs to be materialized for the partitions to be listed)."""
    from tests.dagster_helpers import TinyGraph, tiny_config

    grid = {"grid": {"kind": "mgd3", "guidance_strength": [0.3, 0.1], "t_stop": [0, 2]}}
    graph = TinyGraph(tmp_path / "grid", tiny_config(methods=["mgd3", "unguided", grid]))
    variants = [m for m in graph.cfg.methods if m not in ("mgd3", "unguided")]
    assert len(variants) == 4
    OUTPUT.mkdir(exist_ok=True)
    with _serving(graph.env(), tmp_path / "webserver.log") as base:
        url, shot = f"{base}/assets/distilled_images?view=partitions", OUTPUT / "ui_variant_partitions.png"
        dom = _render(url, tmp_path / "profile", shot, lambda d: all(v in d for v in variants))
    missing = [m for m in graph.cfg.methods if m not in dom]
    assert not missing, f"partitions view at {url} does not show the variants {missing}"


def test_the_automation_page_lists_the_declarative_automation_sensor(webserver, tmp_path):
    OUTPUT.mkdir(exist_ok=True)
    url, shot = f"{webserver}/automation", OUTPUT / "ui_automation.png"
    dom = _render(url, tmp_path / "profile", shot, lambda d: "mgd3_automation" in d)
    assert "mgd3_automation" in dom, f"the automation sensor is not listed at {url}"
    assert shot.stat().st_size > 10_000


def test_the_report_of_a_grid_shows_its_sweep_plot(tmp_path):
    """The evaluation report's page (index.html) of a λ × t_stop grid, as a browser shows it: the
    ranked variants, the grid table and the plot of accuracy against λ, one line per t_stop."""
    from mgd3_core.report import write_report
    from tests.toys import grid_accuracy, pixels_of

    OUTPUT.mkdir(exist_ok=True)
    acc, variants = grid_accuracy()
    rep = write_report(tmp_path / "report", acc, variants=variants, split="validation")
    shot = OUTPUT / "report_sweep.png"
    caption = "mgd3: final validation top-1 against guidance_strength and t_stop"
    dom = _render(rep.html.as_uri(), tmp_path / "profile", shot, lambda d: caption in d, window="1400,3000")
    assert caption in dom and "mgd3~guidance_strength=0.2~t_stop=25" in dom and "t_stop 25" in dom
    png = shot.read_bytes()
    for color in ("#1f77b4", "#ff7f0e", "#2ca02c"):  # the three t_stop lines, drawn on the page
        assert pixels_of(png, color) > 100, f"no {color} line of the sweep plot in the screenshot {shot}"
