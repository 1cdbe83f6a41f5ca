"""Refresh the web page's vendored libraries from npm: ``make vendor``.

The page loads nothing from a CDN (users run offline, and most networks here reach no CDN),
and the package installs with pip alone (no Node.js at install or run time). So pinned builds
of the few libraries the page needs are copied into the package, each with its licence, and
``vendor/VENDOR.json`` records each file's version and SHA-256; ``tests/test_web_vendor.py``
checks the files against it. To move a library to another version, change ``PINS`` and run
``make vendor``.

Needs ``npm`` (only to run this script): ``npm pack`` fetches the exact published tarball.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WEB_VENDOR = ROOT / "src/covey/coordinator/web/vendor"
TEST_VENDOR = ROOT / "tests/vendor"

# package -> (version, [(file in the tarball, name in the target)], licence files, target)
PINS: dict[str, tuple[str, list[tuple[str, str]], list[str], Path]] = {
    # libsodium compiled to WebAssembly (with an asm.js fallback), and its JS wrappers:
    # X25519 + XSalsa20-Poly1305 boxes, sealed boxes, Ed25519 and SHA-256, the same
    # primitives PyNaCl gives the Python side. The "sumo" build, because only it has
    # SHA-256 (receipts and the ledger head are signed over SHA-256 digests), and the
    # browser's own (WebCrypto) exists only on https or localhost pages.
    "libsodium-sumo": ("0.8.4", [("dist/modules-sumo/libsodium-sumo.js", "libsodium.js")],
                       ["LICENSE"], WEB_VENDOR),
    "libsodium-wrappers-sumo": ("0.8.4", [("dist/modules-sumo/libsodium-wrappers.js",
                                           "libsodium-wrappers.js")], ["LICENSE"], WEB_VENDOR),
    # Markdown for chat answers; its HTML is always passed through DOMPurify.
    "marked": ("18.2.1", [("lib/marked.umd.js", "marked.umd.js")], ["LICENSE"], WEB_VENDOR),
    "dompurify": ("3.4.18", [("dist/purify.min.js", "purify.min.js")], ["LICENSE"],
                  WEB_VENDOR),
    # Accessibility checks in the browser tests only; not shipped in the package.
    "axe-core": ("4.14.1", [("axe.min.js", "axe.min.js")], ["LICENSE"], TEST_VENDOR),
}


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def refresh() -> None:
    """Fetch every pinned package with ``npm pack`` and copy its files and licences.

    Raises:
        subprocess.CalledProcessError: npm failed (offline, unknown version).
    """
    manifests: dict[Path, dict[str, dict[str, str]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for package, (version, files, licences, target) in PINS.items():
            out = subprocess.run(["npm", "pack", "--json", f"{package}@{version}"], cwd=tmp,
                                 check=True, capture_output=True, text=True).stdout
            info = json.loads(out)[0]
            target.mkdir(parents=True, exist_ok=True)
            with tarfile.open(Path(tmp) / info["filename"]) as tar:
                for inner, name in files:
                    data = tar.extractfile(f"package/{inner}")
                    assert data is not None, f"{package}: {inner} missing"
                    (target / name).write_bytes(data.read())
                    manifests.setdefault(target, {})[name] = {
                        "package": package, "version": version, "source": inner,
                        "sha256": sha256(target / name), "npm_integrity": info["integrity"]}
                for licence in licences:
                    data = tar.extractfile(f"package/{licence}")
                    assert data is not None, f"{package}: {licence} missing"
                    (target / f"{package}.{licence}").write_bytes(data.read())
            print(f"{package}@{version}: {', '.join(n for _, n in files)}")
    for target, manifest in manifests.items():
        (target / "VENDOR.json").write_text(json.dumps(manifest, indent=2, sort_keys=True)
                                            + "\n")


if __name__ == "__main__":
    refresh()
    sys.exit(0)
