"""The arrows of DESIGN.md: protocol imports nothing of ours; roles never import each other;
typer and rich stay in the CLI."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import covey.protocol

SRC = Path(__file__).resolve().parents[1] / "src" / "covey"
ROLES = ("coordinator", "miner", "client")


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def _package_of(path: Path) -> str:
    rel = path.relative_to(SRC).parts
    return rel[0] if len(rel) > 1 else rel[0].removesuffix(".py")


def test_import_arrows_point_down():
    problems = []
    for path in SRC.rglob("*.py"):
        pkg = _package_of(path)
        for name in _imports(path):
            if not name.startswith("covey."):
                if name.split(".")[0] in ("typer", "rich") and not pkg.startswith("cli"):
                    problems.append(f"{path.name} imports {name} outside the CLI")
                continue
            target = name.split(".")[1]
            if pkg == "protocol" and target != "protocol":
                problems.append(f"protocol/{path.name} imports {name}")
            if pkg in ROLES and target in ROLES and target != pkg:
                problems.append(f"{pkg}/{path.name} imports {name}")
    assert not problems, problems


def test_scoring_is_shared_and_imports_only_the_protocol():
    """``covey.scoring`` (models, proofs, HE) serves every role, so it imports none."""
    problems = [f"scoring/{path.name} imports {name}"
                for path in (SRC / "scoring").rglob("*.py") for name in _imports(path)
                if name.startswith("covey.") and name.split(".")[1] not in ("scoring",
                                                                            "protocol")]
    assert not problems, problems


def test_protocol_exports_exist():
    for name in covey.protocol.__all__:
        assert hasattr(covey.protocol, name), name


_MINER_SOCKET = re.compile(r"\.jobs[\[.]|\bsend_soon\(|\.websocket\.send|session\.send\(|"
                           r"fail_open_jobs\(")
_LINK_OWNERS = {"link.py", "miners.py"}


def test_only_the_link_touches_a_miner_socket():
    """DESIGN.md, Miner link: jobs, trials, re-checks, tokenize and embeddings reach a miner
    through ``MinerLink.call``; nothing else writes to its socket or its reply mailbox."""
    problems = []
    for path in (SRC / "coordinator").rglob("*.py"):
        if path.name in _LINK_OWNERS and path.parent.name == "coordinator":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if _MINER_SOCKET.search(line):
                problems.append(f"{path.relative_to(SRC)}:{n}: {line.strip()}")
    assert not problems, problems
