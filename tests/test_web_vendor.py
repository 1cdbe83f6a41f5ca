"""The web page's vendored libraries are the pinned builds recorded in VENDOR.json (version,
SHA-256, npm integrity), each with its licence, and the page loads nothing from elsewhere."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WEB = ROOT / "src/covey/coordinator/web"
FOLDERS = [WEB / "vendor", ROOT / "tests/vendor"]


@pytest.mark.parametrize("folder", FOLDERS, ids=["web", "tests"])
def test_vendored_files_match_their_manifest(folder: Path):
    manifest = json.loads((folder / "VENDOR.json").read_text())
    assert manifest
    for name, entry in manifest.items():
        data = (folder / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], name
        assert re.fullmatch(r"\d+\.\d+\.\d+", entry["version"]), name
        assert entry["npm_integrity"].startswith("sha512-"), name
        assert (folder / f"{entry['package']}.LICENSE").stat().st_size > 100, name
    listed = set(manifest) | {"VENDOR.json"}
    extra = {p.name for p in folder.iterdir() if not p.name.endswith(".LICENSE")} - listed
    assert not extra, f"files in {folder} that no pin accounts for: {extra}"


def test_the_page_loads_nothing_from_another_origin():
    for path in WEB.glob("*.*"):
        if path.suffix not in (".html", ".js", ".css"):
            continue
        text = path.read_text()
        # Any absolute URL in a src/href or a fetch would reach outside this coordinator.
        found = re.findall(r"(?:src|href)\s*=\s*[\"']https?://"
                           r"|fetch\(\s*[\"'`]https?://|url\(\s*[\"']?https?://", text)
        assert not found, f"{path.name} loads from another origin: {found}"


def test_the_pages_scripts_declare_no_top_level_name_twice():
    # Classic scripts share one global scope: a second `function x` silently replaces the
    # first, and the view that relied on it breaks.
    seen: dict[str, str] = {}
    clashes = []
    for path in sorted(WEB.glob("*.js")):
        for name in re.findall(r"^(?:async\s+)?(?:function|const|let|var|class)\s+([\w$]+)",
                               path.read_text(), flags=re.M):
            if name in seen:
                clashes.append(f"{name} in {seen[name]} and {path.name}")
            seen[name] = path.name
    assert not clashes, clashes
