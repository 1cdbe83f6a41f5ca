"""``--model hf:…``: fetching from the Hugging Face Hub, offline reuse, errors and weight hashes.

No hub is reachable from this machine, so a small local HTTP server on 127.0.0.1 stands in for
it: it answers the requests huggingface_hub makes (read from its ``file_download.py`` and
``_snapshot_download.py``, and seen in the server's request log):

- ``HEAD /{repo}/resolve/{rev}/{path}``: ``X-Repo-Commit``, ``ETag`` (git blob sha1) and
  ``Content-Length`` for a plain file; for an LFS file a 302 to a CDN URL (a second server on
  another port) with ``X-Linked-Etag`` (the file's sha256) and ``X-Linked-Size``; 404 with
  ``X-Error-Code`` ``RepoNotFound`` / ``RevisionNotFound`` / ``EntryNotFound`` otherwise;
- ``GET`` of the same URL (plain files) or of the CDN URL (LFS files) for the bytes;
- ``GET /api/models/{repo}/revision/{rev}`` (commit sha and file list) and
  ``GET /api/models/{repo}/tree/{commit}?recursive=…`` (the listing newer clients use) for
  ``snapshot_download``.

huggingface_hub reads ``HF_ENDPOINT`` and ``HF_HOME`` when it is imported, so each resolution
runs in a fresh ``python -c`` child with those set.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

import pytest

from covey.miner.hub import HubRef, parse_hub_ref
from covey.miner.models import ModelNotFound, resolve_model, weights_sha256

COMMIT = "0123456789abcdef0123456789abcdef01234567"
GGUF = b"GGUF" + bytes(range(256)) * 16  # 4 KiB and a bit
REPOS: dict[str, dict[str, bytes]] = {
    "covey-test/tiny-gguf": {
        "x.gguf": GGUF,
        "quant/y.gguf": GGUF[::-1],
        "README.md": b"# tiny\n",
    },
    "covey-test/tiny-st": {
        "config.json": b'{"model_type": "bert", "hidden_size": 8}\n',
        "tokenizer.json": b'{"version": "1.0"}\n',
        "1_Pooling/config.json": b'{"pooling_mode_mean_tokens": true}\n',
        "model.safetensors": bytes(range(200)) * 10,
        ".gitattributes": b"*.safetensors filter=lfs\n",
    },
}
LFS = (".gguf", ".safetensors")


def _git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _Hub(BaseHTTPRequestHandler):
    """Answers hub (``/…``) and CDN (``/cdn/<sha256>``) URLs; logs each request."""

    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        url = urlsplit(self.path)
        self.server.log.append(f"{self.command} {self.path}")
        parts = unquote(url.path).strip("/").split("/")
        if parts[0] == "cdn":
            blobs = {hashlib.sha256(d).hexdigest(): d for r in REPOS.values() for d in r.values()}
            data = blobs.get(parts[1], b"")
            # The real CDN names the file (for the progress bar) from a signed query parameter.
            name = parse_qs(url.query).get("filename", ["blob"])[0]
            disposition = {"Content-Disposition": f'attachment; filename="{name}";'}
            return self._send(200 if data else 404, data, disposition, body)
        if parts[:2] == ["api", "models"]:  # /api/models/{repo}/(revision|tree)/{rev}
            parts = parts[2:]
        if len(parts) < 4 or parts[2] not in ("revision", "tree", "resolve"):
            return self._send(404, b"", {}, body)
        repo, kind, rev, name = "/".join(parts[:2]), parts[2], parts[3], "/".join(parts[4:])
        if repo not in REPOS:
            return self._error("RepoNotFound", body)
        if rev not in ("main", COMMIT):
            return self._error("RevisionNotFound", body)
        files = REPOS[repo]
        if kind != "resolve":
            info: object = [_tree_entry(n, d) for n, d in files.items()]
            if kind == "revision":
                info = {"id": repo, "sha": COMMIT, "siblings": [{"rfilename": f} for f in files]}
            return self._send(200, json.dumps(info).encode(), {}, body)
        data = files.get(name)
        if data is None:
            return self._error("EntryNotFound", body, {"X-Repo-Commit": COMMIT})
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{_git_sha1(data)}"'}
        if not name.endswith(LFS):
            return self._send(200, data, headers, body)
        sha, query = hashlib.sha256(data).hexdigest(), urlencode({"filename": name.split("/")[-1]})
        headers |= {
            "Location": f"{self.server.cdn_url}/cdn/{sha}?{query}",
            "X-Linked-Etag": f'"{sha}"',
            "X-Linked-Size": str(len(data)),
        }
        self._send(302, b"", headers, body)

    def _error(self, code: str, body: bool, headers: dict[str, str] | None = None) -> None:
        self._send(404, code.encode(), {"X-Error-Code": code, **(headers or {})}, body)

    def _send(self, status: int, data: bytes, headers: dict[str, str], body: bool) -> None:
        self.send_response(status)
        for key, value in {"Content-Length": str(len(data)), **headers}.items():
            self.send_header(key, value)
        self.end_headers()
        if body:
            self.wfile.write(data)


def _tree_entry(name: str, data: bytes) -> dict[str, object]:
    entry = {"type": "file", "oid": _git_sha1(data), "size": len(data), "path": name}
    if name.endswith(LFS):
        entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data),
                        "pointerSize": 134}
    return entry


class _Server(ThreadingHTTPServer):
    log: list[str]
    cdn_url: str


def _serve(log: list[str], cdn_url: str = "") -> _Server:
    server = _Server(("127.0.0.1", 0), _Hub)
    server.log, server.cdn_url = log, cdn_url
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[dict]:
    """A running fake hub: ``env`` for a child process, ``log`` of requests, ``stop()``."""
    log: list[str] = []
    cdn = _serve(log)
    server = _serve(log, f"http://127.0.0.1:{cdn.server_address[1]}")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env |= {
        "HF_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}",
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }

    def stop() -> None:  # idempotent
        for s in (server, cdn):
            s.shutdown()
            s.server_close()

    yield {"env": env, "log": log, "stop": stop, "data": tmp_path / "data"}
    stop()


_RESOLVE = """
import json, sys
from pathlib import Path
from covey.miner.models import ModelNotFound, resolve_model, weights_sha256
if sys.argv[3:] == ["quiet-library"]:  # some library turned the hub's bars off
    from huggingface_hub.utils import disable_progress_bars
    disable_progress_bars()
try:
    m = resolve_model(sys.argv[1])
except ModelNotFound as exc:
    print(json.dumps({"error": str(exc)}))
else:
    sha = weights_sha256(m.path, Path(sys.argv[2]))
    print(json.dumps({"name": m.name, "path": str(m.path), "sha": sha}))
"""


def _resolve(hub: dict, spec: str, **env: str) -> dict:
    """Resolve ``spec`` in a fresh interpreter pointed at the fake hub; its JSON answer."""
    proc = subprocess.run(
        [sys.executable, "-c", _RESOLVE, spec, str(hub["data"])],
        env={**hub["env"], **env}, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_gguf_file_downloads_then_resolves_offline(hub: dict) -> None:
    got = _resolve(hub, "hf:covey-test/tiny-gguf/x.gguf")
    assert got["name"] == "x"
    path = Path(got["path"])
    assert path.read_bytes() == GGUF
    assert got["sha"] == hashlib.sha256(GGUF).hexdigest()
    assert str(path).startswith(hub["env"]["HF_HOME"])
    assert "HEAD /covey-test/tiny-gguf/resolve/main/x.gguf" in hub["log"]
    assert any(line.startswith("GET /cdn/") for line in hub["log"])

    nested = _resolve(hub, f"hf:covey-test/tiny-gguf@{COMMIT}/quant/y.gguf")
    assert nested["name"] == "y"
    assert Path(nested["path"]).read_bytes() == GGUF[::-1]

    hub["stop"]()
    seen = len(hub["log"])
    again = _resolve(hub, "hf:covey-test/tiny-gguf/x.gguf")
    assert again == got
    assert len(hub["log"]) == seen
    offline = _resolve(hub, "hf:covey-test/tiny-gguf/x.gguf", HF_HUB_OFFLINE="1")
    assert offline == got

    # The digest was cached under the blob the snapshot links to, and is read back from there.
    cache_file = hub["data"] / "weights-sha256.json"
    cache = json.loads(cache_file.read_text())
    (key,) = [k for k in cache if k.startswith(str(path.resolve()) + ":")]
    assert f"/blobs/{got['sha']}:" in key and cache[key] == got["sha"]
    cache_file.write_text(json.dumps({**cache, key: "e" * 64}))
    assert _resolve(hub, "hf:covey-test/tiny-gguf/x.gguf")["sha"] == "e" * 64


def test_download_draws_a_progress_bar_on_a_terminal(hub: dict) -> None:
    """huggingface_hub's tqdm bar reaches a terminal, even after a library disabled bars."""
    import fcntl
    import pty
    import select
    import struct
    import termios

    master, slave = pty.openpty()
    # A fresh pty is 0 columns wide, and tqdm draws nothing in 0 columns.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-c", _RESOLVE, "hf:covey-test/tiny-gguf/x.gguf", str(hub["data"]),
         "quiet-library"],
        env=hub["env"], stdin=subprocess.DEVNULL, stdout=slave, stderr=slave,
    )
    os.close(slave)
    out = b""
    try:
        while select.select([master], [], [], 60)[0]:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(master)
        assert proc.wait(timeout=60) == 0, out
    text = out.decode(errors="replace")
    assert "x.gguf: 100%" in text, text
    assert '"name": "x"' in text, text


def test_repo_snapshot_downloads_then_resolves_offline(hub: dict) -> None:
    got = _resolve(hub, "hf:covey-test/tiny-st")
    assert got["name"] == "tiny-st"
    folder = Path(got["path"])
    assert folder.is_dir() and folder.name == COMMIT
    for name, data in REPOS["covey-test/tiny-st"].items():
        assert (folder / name).read_bytes() == data
    assert any(line.startswith("GET /api/models/covey-test/tiny-st/") for line in hub["log"])
    assert got["sha"] == _dir_digest(REPOS["covey-test/tiny-st"])

    hub["stop"]()
    assert _resolve(hub, "hf:covey-test/tiny-st") == got
    assert _resolve(hub, "hf:covey-test/tiny-st@main", HF_HUB_OFFLINE="1") == got


def test_missing_file_repo_or_revision_is_a_clear_error(hub: dict) -> None:
    err = _resolve(hub, "hf:covey-test/tiny-gguf/missing.gguf")["error"]
    assert "has no file 'missing.gguf'" in err, err
    err = _resolve(hub, "hf:covey-test/nope/x.gguf")["error"]
    assert "no repository 'covey-test/nope'" in err, err
    err = _resolve(hub, "hf:covey-test/nope")["error"]
    assert "no repository 'covey-test/nope'" in err, err
    err = _resolve(hub, "hf:covey-test/tiny-gguf@v9/x.gguf")["error"]
    assert "no revision 'v9'" in err, err


def test_uncached_and_unreachable_is_a_clear_error(hub: dict) -> None:
    hub["stop"]()
    for spec in ("hf:covey-test/tiny-gguf/x.gguf", "hf:covey-test/tiny-st"):
        err = _resolve(hub, spec)["error"]
        assert "not in the Hugging Face cache" in err and "could not be reached" in err, err
        err = _resolve(hub, spec, HF_HUB_OFFLINE="1")["error"]
        assert "HF_HUB_OFFLINE" in err, err


def test_parse_hub_ref() -> None:
    assert parse_hub_ref("hf:Org/Repo") == HubRef("Org/Repo")
    ref = parse_hub_ref("hf:Org/Repo@v1.0/a/B.Q4.gguf")
    assert ref == HubRef("Org/Repo", "a/B.Q4.gguf", "v1.0")
    assert ref.served_name == "b.q4"
    assert parse_hub_ref("hf:Org/Tiny-ST@main").served_name == "tiny-st"
    assert str(parse_hub_ref("hf:o/r@dev/x.gguf")) == "hf:o/r@dev/x.gguf"
    for bad in ("hf:", "hf:repo", "hf:o/r/../x.gguf", "hf:o/r//x.gguf", "hf:o/r@/x.gguf",
                "hf:o/r/config.json", "hf:o/r@a b"):
        with pytest.raises(ModelNotFound):
            parse_hub_ref(bad)


def _dir_digest(files: dict[str, bytes]) -> str:
    lines = b"".join(
        rel.encode() + b"\0" + hashlib.sha256(data).hexdigest().encode() + b"\n"
        for rel, data in sorted(files.items())
        if not any(part.startswith(".") for part in rel.split("/"))
    )
    return hashlib.sha256(lines).hexdigest()


def test_local_directory_file_and_their_cached_sha(tmp_path: Path) -> None:
    folder = tmp_path / "My-Embedder"
    files = dict(REPOS["covey-test/tiny-st"])
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    (folder / ".git").mkdir()
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n")

    model = resolve_model(str(folder))
    assert model == type(model)("my-embedder", folder.resolve())
    cache_dir = tmp_path / "data"
    sha = weights_sha256(folder, cache_dir)
    assert sha == _dir_digest(files)

    cache_file = cache_dir / "weights-sha256.json"
    cache = json.loads(cache_file.read_text())
    assert len(cache) == 4  # the visible files; .git and .gitattributes are skipped
    # Reused, not recomputed: a doctored entry changes the answer.
    key = next(k for k in cache if "config.json" in k and "Pooling" not in k)
    cache[key] = "0" * 64
    cache_file.write_text(json.dumps(cache))
    assert weights_sha256(folder, cache_dir) != sha
    # Touching a file changes its key, so that file is hashed again.
    (folder / "config.json").write_bytes(files["config.json"] + b"\n")
    files["config.json"] += b"\n"
    assert weights_sha256(folder, cache_dir) == _dir_digest(files)

    gguf = tmp_path / "Tiny.Q8.gguf"
    gguf.write_bytes(GGUF)
    assert resolve_model(str(gguf)).name == "tiny.q8"
    assert weights_sha256(gguf, cache_dir) == hashlib.sha256(GGUF).hexdigest()
