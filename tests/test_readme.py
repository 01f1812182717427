"""The README is a short guide whose commands run as written, and the docs' links lead somewhere.

Each shell block of README.md (```bash, ```sh, ```console) is read line by line: every
`make TARGET` must be a target of the Makefile, every script it runs (``python X.py``,
``bash X.sh``, ``bench/…``, ``experiments/…``) and every config it names (``configs/….yaml``)
must exist. Every relative link in README.md and docs/*.md must point to an existing file (and heading).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
MAX_README_LINES = 300

_BLOCK = re.compile(r"^```(bash|sh|console)[ \t]*\n(.*?)^```", re.M | re.S)
_MAKE = re.compile(r"(?:^|[\s;&|(])make\s+((?:[A-Z_]+=\S+\s+|-\S+\s+)*)([a-z][\w-]*)")
_SCRIPT = re.compile(r"(?:python[\d.]*|bash|sh)\s+(?:-\S+\s+)*([\w./-]+\.(?:py|sh))")
_PATH = re.compile(r"(?<![\w/.-])((?:bench|experiments|configs|tests|deploy)/[\w./-]*\w)")
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _shell_lines(text: str) -> list[str]:
    lines = []
    for _, body in _BLOCK.findall(text):
        for line in body.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith("$ "):
                line = line[2:]
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def _make_targets() -> set[str]:
    text = (REPO / "Makefile").read_text()
    return {m.group(1) for m in re.finditer(r"^([a-z][\w-]*)\s*:(?!=)", text, re.M)}


def test_readme_is_a_short_guide():
    n = len(README.read_text().splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines; keep it under {MAX_README_LINES}, move the rest to docs/"


def test_readme_has_shell_blocks_to_check():
    # the two commands at least; a README without checked blocks would pass the test below vacuously
    lines = _shell_lines(README.read_text())
    assert any("make demo" in line for line in lines) and any("make test" in line for line in lines)


def test_every_make_target_script_and_config_in_the_readme_exists():
    targets, missing = _make_targets(), []
    for line in _shell_lines(README.read_text()):
        for m in _MAKE.finditer(line):
            if m.group(2) not in targets:
                missing.append(f"make target {m.group(2)!r} in: {line}")
        for m in _SCRIPT.finditer(line):
            if not (REPO / m.group(1)).is_file():
                missing.append(f"script {m.group(1)} in: {line}")
        for m in _PATH.finditer(line):
            path = m.group(1)
            if "<" in path or "*" in path:
                continue
            if not (REPO / path).exists():
                missing.append(f"path {path} in: {line}")
    assert missing == []


def test_the_checks_catch_what_they_are_for():
    """The extraction sees a made-up target, script and config (so the test above can fail)."""
    text = "```bash\nmake no-such-target\npython experiments/nope.py\nMGD3_CONFIG=configs/nope.yaml make demo\n```\n"
    lines = _shell_lines(text)
    assert [m.group(2) for line in lines for m in _MAKE.finditer(line)] == ["no-such-target", "demo"]
    assert [m.group(1) for line in lines for m in _SCRIPT.finditer(line)] == ["experiments/nope.py"]
    assert [m.group(1) for line in lines for m in _PATH.finditer(line)] == ["experiments/nope.py", "configs/nope.yaml"]


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped (letters of any script kept),
    spaces to hyphens."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#{1,6} (.+)$", text, re.M)}


@pytest.mark.parametrize("page", [README, *sorted((REPO / "docs").glob("*.md"))], ids=lambda p: p.name)
def test_relative_links_point_to_existing_files_and_headings(page):
    broken = []
    for target in _LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # a URL
        path, _, anchor = target.partition("#")
        linked = (page.parent / path) if path else page
        if not linked.exists():
            broken.append(target)
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(target)
    assert broken == [], f"{page.relative_to(REPO)} links to missing files or headings"


def test_anchors_follow_githubs_rule():
    page = REPO / "docs" / "decisions.md"
    assert "λ-t_stop-and-cfg" in _anchors(page) and "resnet-18-with-hard-labels-its-own-schedule" in _anchors(page)
