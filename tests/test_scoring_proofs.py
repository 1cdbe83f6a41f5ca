"""Zero-knowledge proofs of the bundled scoring models (ezkl): setup, proving, verifying,
and the failures that matter (another row, another model, a tampered proof or score)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("ezkl")
pytest.importorskip("onnxruntime")
pytest.importorskip("sklearn")
pytest.importorskip("skl2onnx")

from typer.testing import CliRunner  # noqa: E402

from covey.cli import app  # noqa: E402
from covey.scoring.bundled import dataset_rows, materialize  # noqa: E402
from covey.scoring.model import ScoringModel  # noqa: E402
from covey.scoring.proofs import (  # noqa: E402
    ProofError,
    ProofVerifier,
    Prover,
    prove_row,
    prove_setup,
    verify_answer,
)

MAX_PROOF_BYTES = 16 * 1024
"""Issue 16's target for the size of one proof."""
FIDELITY = 1e-3
"""Largest difference allowed between a proved score and onnxruntime's (fixed-point error:
inputs at 2^-16, weights at 2^-20; about 4e-4 measured on the data set)."""


@pytest.fixture(scope="module")
def rows() -> list[list[float]]:
    return dataset_rows()


@pytest.fixture(scope="module")
def mlp(tmp_path_factory: pytest.TempPathFactory, rows: list[list[float]]
        ) -> tuple[Path, dict[str, Any]]:
    """The bundled MLP's folder and the summary of its proof setup (made once)."""
    folder = materialize("breast-cancer-mlp", tmp_path_factory.mktemp("scoring"))
    return folder, prove_setup(folder / "model.onnx", folder / "proof", calibration_rows=rows)


@pytest.fixture(scope="module")
def lr(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled logistic regression's folder (no proof setup)."""
    return materialize("breast-cancer-lr", tmp_path_factory.mktemp("scoring"))


@pytest.fixture(scope="module")
def proved(mlp: tuple[Path, dict[str, Any]], rows: list[list[float]]
           ) -> tuple[list[float], str, float]:
    """(row, proof text, proved score) for the data set's first row."""
    text, score = Prover(mlp[0] / "proof").prove(rows[0])
    return rows[0], text, score


def _answer(row: list[float], proof: str, score: float, vk: Path) -> dict[str, Any]:
    return {"object": "score", "model": "breast-cancer-mlp",
            "data": [{"index": 0, "score": score, "proof": proof, "input": row}],
            "proof": {"vk_sha256": hashlib.sha256(vk.read_bytes()).hexdigest()},
            "usage": {"rows": 1, "work_ms": 900}}


def _tamper_proof_byte(text: str) -> str:
    obj = json.loads(text)
    obj["proof"][100] ^= 1
    return json.dumps(obj)


def _tamper_output(text: str) -> str:
    """The proof with its public output (the last instance, little-endian hex) raised by
    one step."""
    obj = json.loads(text)
    felt = obj["instances"][0][-1]
    obj["instances"][0][-1] = f"{(int(felt[:2], 16) + 1) % 256:02x}" + felt[2:]
    return json.dumps(obj)


def test_setup_files_and_summary(mlp: tuple[Path, dict[str, Any]]) -> None:
    folder, summary = mlp
    setup = folder / "proof"
    for name in ("settings.json", "model.compiled", "pk.key", "vk.key", "kzg.srs",
                 "setup.json"):
        assert (setup / name).is_file(), name
    assert json.loads((setup / "setup.json").read_text()) == summary
    assert summary["model_sha256"] == hashlib.sha256(
        (folder / "model.onnx").read_bytes()).hexdigest()
    assert summary["vk_sha256"] == hashlib.sha256((setup / "vk.key").read_bytes()).hexdigest()
    assert summary["srs"] == "generated locally"
    assert summary["link"] == "sigmoid" and summary["features"] == 30
    assert summary["logrows"] <= 12  # a second's proof, not a minute's
    assert summary["max_abs_error"] < FIDELITY and summary["rows_checked"] > 200
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temp folders


def test_proof_verifies_and_matches_predict(mlp: tuple[Path, dict[str, Any]],
                                            proved: tuple[list[float], str, float]) -> None:
    folder, _ = mlp
    row, text, score = proved
    assert len(text.encode()) <= MAX_PROOF_BYTES
    verifier = ProofVerifier(folder / "proof")
    assert verifier.verify(text, row) == score
    assert verifier.verify(text) == score  # the proof alone says what it proves
    plain = ScoringModel.load(folder).predict([row])[0]
    assert abs(score - plain) <= FIDELITY


def test_prove_row(mlp: tuple[Path, dict[str, Any]], rows: list[list[float]]) -> None:
    """The process-pool entry point proves like :class:`Prover`."""
    text, score = prove_row(mlp[0] / "proof", rows[2])
    assert ProofVerifier(mlp[0] / "proof").verify(text, rows[2]) == score


def test_verifier_needs_no_proving_key(mlp: tuple[Path, dict[str, Any]],
                                       proved: tuple[list[float], str, float],
                                       tmp_path: Path) -> None:
    folder, _ = mlp
    for name in ("vk.key", "settings.json", "kzg.srs", "setup.json"):
        shutil.copy(folder / "proof" / name, tmp_path / name)
    row, text, score = proved
    verifier = ProofVerifier(vk=tmp_path / "vk.key")
    assert verifier.vk_sha256 == hashlib.sha256((tmp_path / "vk.key").read_bytes()).hexdigest()
    assert verifier.verify(text, row) == score
    (tmp_path / "setup.json").unlink()
    with pytest.raises(ProofError, match="missing .*setup.json"):
        ProofVerifier(vk=tmp_path / "vk.key")


def test_proof_for_another_row_fails(mlp: tuple[Path, dict[str, Any]],
                                     proved: tuple[list[float], str, float],
                                     rows: list[list[float]]) -> None:
    _, text, _ = proved
    verifier = ProofVerifier(mlp[0] / "proof")
    with pytest.raises(ProofError, match="another input"):
        verifier.verify(text, rows[1])
    nudged = list(rows[0])
    nudged[7] += 0.001
    with pytest.raises(ProofError, match="another input \\(feature 7 differs\\)"):
        verifier.verify(text, nudged)
    with pytest.raises(ProofError, match="not a list of numbers"):
        verifier.verify(text, ["x"] * 30)
    with pytest.raises(ProofError, match="not 30 finite numbers"):
        verifier.verify(text, rows[0][:29])
    with pytest.raises(ProofError, match="30 finite numbers"):
        Prover(mlp[0] / "proof").prove(rows[0][:29])


@pytest.mark.parametrize("tamper", [
    _tamper_proof_byte,
    _tamper_output,
    lambda text: text[:-10],
    lambda text: json.dumps({**json.loads(text), "proof": "00ff"}),
    lambda text: json.dumps({"instances": json.loads(text)["instances"]}),
])
def test_tampered_proof_fails(mlp: tuple[Path, dict[str, Any]],
                              proved: tuple[list[float], str, float], tamper: Any) -> None:
    row, text, _ = proved
    verifier = ProofVerifier(mlp[0] / "proof")
    with pytest.raises(ProofError):
        verifier.verify(tamper(text), row)
    with pytest.raises(ProofError):
        verifier.verify(tamper(text))


def test_proof_of_another_model_fails(mlp: tuple[Path, dict[str, Any]], lr: Path,
                                      tmp_path: Path, rows: list[list[float]]) -> None:
    """A proof made with the logistic regression's setup does not verify against the MLP's
    key, even for the same row."""
    summary = prove_setup(lr / "model.onnx", tmp_path / "lr-proof", calibration_rows=rows)
    text, score = Prover(tmp_path / "lr-proof").prove(rows[0])
    assert ProofVerifier(tmp_path / "lr-proof").verify(text, rows[0]) == score
    assert abs(score - ScoringModel.load(lr).predict([rows[0]])[0]) <= FIDELITY
    assert summary["vk_sha256"] != mlp[1]["vk_sha256"]
    with pytest.raises(ProofError, match="does not verify"):
        ProofVerifier(mlp[0] / "proof").verify(text, rows[0])


def test_verify_answer(mlp: tuple[Path, dict[str, Any]],
                       proved: tuple[list[float], str, float]) -> None:
    row, text, score = proved
    vk = mlp[0] / "proof" / "vk.key"
    answer = _answer(row, text, score, vk)
    assert verify_answer(answer, vk) == [score]
    answer["data"][0]["score"] = score + 0.01
    with pytest.raises(ProofError, match="item 0: the score .* is not the proved"):
        verify_answer(answer, vk)
    answer = _answer(row, text, score, vk)
    answer["proof"]["vk_sha256"] = "0" * 64
    with pytest.raises(ProofError, match="proved for the key 000000000000"):
        verify_answer(answer, vk)
    answer = _answer(row, text, score, vk)
    answer["data"][0]["input"] = [v * 1.01 for v in row]
    with pytest.raises(ProofError, match="item 0: the proof is for another input"):
        verify_answer(answer, vk)
    del answer["data"][0]["proof"]
    with pytest.raises(ProofError, match="item 0 carries no proof"):
        verify_answer(answer, vk)


def test_cli_proofs_verify(mlp: tuple[Path, dict[str, Any]],
                           proved: tuple[list[float], str, float], tmp_path: Path) -> None:
    row, text, score = proved
    vk = mlp[0] / "proof" / "vk.key"
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(_answer(row, text, score, vk)))
    bad.write_text(json.dumps(_answer(row, _tamper_proof_byte(text), score, vk)))
    runner = CliRunner()
    ok = runner.invoke(app, ["proofs", "verify", str(good), "--vk", str(vk)])
    assert ok.exit_code == 0, ok.output
    assert f"item 0: score {score:.6f} verified" in ok.stdout
    failed = runner.invoke(app, ["proofs", "verify", str(bad), "--vk", str(vk)])
    assert failed.exit_code == 1
    assert "proof check failed" in failed.stderr and "item 0" in failed.stderr
    missing = runner.invoke(app, ["proofs", "verify", str(tmp_path / "none.json"),
                                  "--vk", str(vk)])
    assert missing.exit_code == 2


def test_cli_prove_setup(lr: Path, tmp_path: Path) -> None:
    """``covey model prove-setup FOLDER`` (calibrated on the card's ranges) writes a working
    setup in FOLDER/proof and says plainly that the SRS was made here; ``--srs`` uses a
    given one; a folder holding something else is refused."""
    result = CliRunner().invoke(app, ["model", "prove-setup", str(lr)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.stderr.split())
    assert "could forge proofs" in text and "--srs PATH" in text
    summary = json.loads((lr / "proof" / "setup.json").read_text())
    assert summary["rows_checked"] == 68  # 64 draws and 2 corners of the ranges, 2 corners
    ceremony = tmp_path / "ceremony.srs"
    shutil.copy(lr / "proof" / "kzg.srs", ceremony)
    again = CliRunner().invoke(app, ["model", "prove-setup", str(lr / "model.onnx"),
                                     "--srs", str(ceremony)])
    assert again.exit_code == 0, again.output
    assert "could forge" not in again.stderr
    assert json.loads((lr / "proof" / "setup.json").read_text())["srs"] == str(ceremony)
    text, score = Prover(lr / "proof").prove(dataset_rows()[5])
    assert ProofVerifier(lr / "proof").verify(text, dataset_rows()[5]) == score
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    refused = CliRunner().invoke(app, ["model", "prove-setup", str(lr), "--out", str(other)])
    assert refused.exit_code == 1 and "is not a proof setup" in refused.stderr
    unknown = CliRunner().invoke(app, ["model", "prove-setup", "breast-cancer-xgb"])
    assert unknown.exit_code == 2
