"""The documentation stays buildable and its links stay true.

The site (``mkdocs.yml``, ``docs/``) is built in strict mode, so a broken link or anchor, a
page left out of ``nav`` or an API page that cannot be rendered fails the suite, as CI runs
it. The README is the first screen: it stays short, and every relative link in it and in the
docs points at a file the repository has.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_LINES = 260

FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
# [text](target) and ![alt](target), with an optional "title"
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def relative_links(text: str) -> list[str]:
    """Link targets of a markdown text outside code, less web addresses and same-page anchors."""
    prose = INLINE_CODE.sub("", FENCE.sub("", text))
    targets = [m.group(1) for m in LINK.finditer(prose)]
    return [t for t in targets if not re.match(r"^([a-z][a-z0-9+.-]*:|#)", t)]


def test_link_finder_sees_links_outside_code_only():
    text = (
        "See [a](docs/a.md#x) and ![fig](img/f.png \"t\"), [web](https://x.org), [top](#y).\n"
        "`[not](in/code.md)`\n```\n[not](in/fence.md)\n```\n"
    )
    assert relative_links(text) == ["docs/a.md#x", "img/f.png"]


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines (at most {README_MAX_LINES}): it is the first screen; "
        "move reference material into a page under docs/ and link to it"
    )


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_files(path):
    missing = []
    for target in relative_links(path.read_text(encoding="utf-8")):
        file = target.split("#", 1)[0]
        if file and not (path.parent / file).exists():
            missing.append(target)
    assert not missing, f"{path.relative_to(ROOT)}: links to files that do not exist: {missing}"


PARENT_PATH = re.compile(r"(?:\.\./)+[\w.-]+")
MACHINE_PATH = re.compile(r"/work/[\w.-]+")  # the development machine's workspace, which users do not have


def paths_outside(path: Path, root: Path = ROOT) -> list[str]:
    """Paths a text names, in prose or code, that lead outside the repository: ``../`` chains
    that climb above its root (resolved from the file's folder) and the workspace's absolute paths."""
    text = path.read_text(encoding="utf-8")
    climbing = [m for m in PARENT_PATH.findall(text) if not (path.parent / m).resolve().is_relative_to(root)]
    return climbing + MACHINE_PATH.findall(text)


def test_outside_path_finder(tmp_path):
    (tmp_path / "docs").mkdir()
    page = tmp_path / "docs" / "p.md"
    page.write_text("[up](../README.md) `../../secret/SPEC.md` and /work/x/y\n")
    assert paths_outside(page, root=tmp_path) == ["../../secret", "/work/x"]


@pytest.mark.parametrize(
    "path", [*markdown_files(), ROOT / "mkdocs.yml"], ids=lambda p: str(p.relative_to(ROOT))
)
def test_nothing_points_outside_the_repository(path):
    outside = paths_outside(path)
    assert not outside, (
        f"{path.relative_to(ROOT)} names {outside}: a path outside the repository, which users "
        "do not have; ship what the page needs or name its public source"
    )


def test_site_builds_strictly(tmp_path):
    """``mkdocs build --strict``: warnings (broken links or anchors, pages missing from nav,
    API pages that cannot be rendered) fail the build."""
    try:
        import mkdocs  # noqa: F401
    except ImportError:
        pytest.fail('mkdocs is not installed: pip install -e ".[dev]" (or ".[docs]")')
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, (
        "mkdocs build --strict failed (run it from the repository root to see the same):\n"
        + result.stdout[-4000:]
        + result.stderr[-4000:]
    )
    assert (tmp_path / "site" / "index.html").exists()
