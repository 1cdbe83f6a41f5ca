"""The bundled scoring models (trained from scikit-learn's breast-cancer data), loading a
scoring folder, and the checks rows pass before they are scored."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import pytest

np = pytest.importorskip("numpy")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("sklearn")
pytest.importorskip("skl2onnx")

from covey.protocol.score import MAX_PROOF_ROWS  # noqa: E402
from covey.scoring.bundled import (  # noqa: E402
    BUNDLED_SCORING,
    UnknownScoringModel,
    dataset_rows,
    materialize,
    train,
)
from covey.scoring.model import InputError, ScoringModel, check_rows  # noqa: E402


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scoring home holding both bundled models, trained once for this module."""
    path = tmp_path_factory.mktemp("scoring")
    for name in BUNDLED_SCORING:
        materialize(name, path)
    return path


@pytest.fixture(scope="module")
def rows() -> list[list[float]]:
    return dataset_rows()


@pytest.fixture(scope="module")
def card(root: Path):
    return ScoringModel.load(root / "breast-cancer-lr").card


@pytest.mark.parametrize("name", BUNDLED_SCORING)
def test_predict_matches_sklearn_and_raw_onnxruntime(root: Path, rows: list[list[float]],
                                                     name: str) -> None:
    model = ScoringModel.load(root / name)
    trained = train(name)
    got = np.array(model.predict(rows))
    # The ONNX graph takes raw measurements: sklearn's estimator has the scaler folded in.
    want = trained.estimator.predict_proba(np.array(rows))[:, 1]
    assert np.abs(got - want).max() <= 1e-5
    raw = ort.InferenceSession(str(root / name / "model.onnx"),
                               providers=["CPUExecutionProvider"])
    direct = raw.run(None, {"input": np.array(rows, dtype=np.float32)})[0][:, 0]
    np.testing.assert_allclose(got, direct, rtol=0, atol=1e-7)
    assert all(isinstance(v, float) and 0 <= v <= 1 for v in got)
    # Deterministic: training again makes the same bytes.
    assert trained.onnx_model.SerializeToString() == (root / name / "model.onnx").read_bytes()
    assert model.sha256 == __import__("hashlib").sha256(
        (root / name / "model.onnx").read_bytes()).hexdigest()


@pytest.mark.parametrize("name", BUNDLED_SCORING)
def test_card_describes_model_and_data(root: Path, rows: list[list[float]], name: str) -> None:
    from sklearn.datasets import load_breast_cancer

    card = ScoringModel.load(root / name).card
    assert card.accuracy is not None and card.accuracy >= 0.9
    assert card.test_rows == 143  # 25 % of 569, stratified
    assert list(card.features) == [str(f) for f in load_breast_cancer().feature_names]
    assert "Wisconsin" in card.training_data and "569" in card.training_data
    assert "malignant" in card.output
    data = np.array(rows)
    low, high = np.array(card.ranges).T
    assert (low <= data.min(axis=0)).all() and (high >= data.max(axis=0)).all()
    assert (low >= 0).all()  # every measurement is non-negative
    # The truth: the model says malignant for most malignant rows of the data set.
    y = 1 - load_breast_cancer().target
    predicted = np.array(ScoringModel.load(root / name).predict(rows)) > 0.5
    assert (predicted == y).mean() >= 0.9


def test_materialize_is_idempotent_and_safe_in_parallel(tmp_path: Path) -> None:
    results: list[Path] = []
    errors: list[BaseException] = []

    def make() -> None:
        try:
            results.append(materialize("breast-cancer-lr", tmp_path))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=make) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 2 and results[0] == results[1]
    folder = results[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["breast-cancer-lr"]  # no temp left
    mtime = (folder / "model.onnx").stat().st_mtime_ns
    assert materialize("breast-cancer-lr", tmp_path) == folder
    assert (folder / "model.onnx").stat().st_mtime_ns == mtime


def test_materialize_default_root_and_unknown_name(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COVEY_SCORING_HOME", str(tmp_path))
    assert materialize("breast-cancer-lr") == tmp_path / "breast-cancer-lr"
    with pytest.raises(UnknownScoringModel, match="breast-cancer-mlp") as info:
        materialize("breast-cancer-xgb", tmp_path)
    assert isinstance(info.value, KeyError)
    assert "no bundled scoring model 'breast-cancer-xgb'" in str(info.value)


def test_linear_reproduces_predict(root: Path, rows: list[list[float]]) -> None:
    model = ScoringModel.load(root / "breast-cancer-lr")
    linear = model.linear()
    assert linear is not None
    w, b = linear
    assert len(w) == 30
    z = np.array(rows) @ np.array(w) + b
    np.testing.assert_allclose(1 / (1 + np.exp(-z)), model.predict(rows), rtol=0, atol=1e-5)
    assert ScoringModel.load(root / "breast-cancer-mlp").linear() is None


def test_skl2onnx_linear_classifier_folder(root: Path, rows: list[list[float]],
                                           tmp_path: Path) -> None:
    """A logistic regression as skl2onnx exports it (LinearClassifier, label and two
    probability columns) scores and exposes its weights like the bundled one."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    estimator = train("breast-cancer-lr").estimator
    exported = convert_sklearn(estimator, initial_types=[("x", FloatTensorType([None, 30]))],
                               options={id(estimator): {"zipmap": False}}, target_opset=17)
    (tmp_path / "model.onnx").write_bytes(exported.SerializeToString())
    (tmp_path / "card.json").write_text((root / "breast-cancer-lr" / "card.json").read_text())
    plain = ScoringModel.load(tmp_path)
    bundled = ScoringModel.load(root / "breast-cancer-lr")
    np.testing.assert_allclose(plain.predict(rows), bundled.predict(rows), rtol=0, atol=1e-6)
    w, b = plain.linear()  # type: ignore[misc]
    w2, b2 = bundled.linear()  # type: ignore[misc]
    np.testing.assert_allclose(w, w2, rtol=1e-6)
    assert math.isclose(b, b2, rel_tol=1e-6)


def test_load_errors(root: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs model.onnx and card.json"):
        ScoringModel.load(tmp_path)
    (tmp_path / "model.onnx").write_bytes((root / "breast-cancer-lr" / "model.onnx").read_bytes())
    (tmp_path / "card.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid model card"):
        ScoringModel.load(tmp_path)
    card = json.loads((root / "breast-cancer-lr" / "card.json").read_text())
    (tmp_path / "card.json").write_text(json.dumps({**card, "features": card["features"][:5],
                                                    "ranges": card["ranges"][:5]}))
    with pytest.raises(ValueError, match="takes 30 features but its card lists 5"):
        ScoringModel.load(tmp_path)
    (tmp_path / "card.json").write_text(json.dumps(card))
    (tmp_path / "model.onnx").write_bytes(b"not onnx")
    with pytest.raises(ValueError, match="not a valid ONNX model"):
        ScoringModel.load(tmp_path)


def test_check_rows_accepts_good_rows(card, rows: list[list[float]]) -> None:
    check_rows(card, rows[:10])
    check_rows(card, rows[:MAX_PROOF_ROWS], proof=True)
    check_rows(card, [[int(v) for v in rows[0]]])  # integers are numbers too


@pytest.mark.parametrize("bad, proof, message", [
    ("wrong_count", False, r"row 1 has 29 features; this model takes 30, in the order "
                           r"GET /v1/models/\{id\} lists them"),
    ("nan", False, r"row 1, feature 3 \('mean area'\) is not a finite 32-bit number: nan"),
    ("inf", False, r"row 1, feature 3 \('mean area'\) is not a finite 32-bit number: inf"),
    ("string", False, r"row 1, feature 3 \('mean area'\) is not a number: '1001'"),
    ("bool", False, r"row 1, feature 3 \('mean area'\) is not a number: True"),
    ("none", False, r"row 1, feature 3 \('mean area'\) is not a number: None"),
    ("range", True, r"row 1, feature 3 \('mean area'\) is 99999\.0, outside \[0, 2.*\], the "
                    r"range a proof can take"),
    ("too_many", True, rf"at most {MAX_PROOF_ROWS} rows are proved"),
    ("empty", False, "non-empty list of rows"),
    ("flat", False, "row 0 is not a list of numbers"),
])
def test_check_rows_rejects(card, rows: list[list[float]], bad: str, proof: bool,
                            message: str) -> None:
    good = list(rows[0])
    row = list(rows[1])
    batch: object = [good, row]
    if bad == "wrong_count":
        batch = [good, row[:29]]
    elif bad in ("nan", "inf", "string", "bool", "none", "range"):
        row[3] = {"nan": math.nan, "inf": math.inf, "string": "1001", "bool": True,
                  "none": None, "range": 99999.0}[bad]
    elif bad == "too_many":
        batch = [good] * (MAX_PROOF_ROWS + 1)
    elif bad == "empty":
        batch = []
    elif bad == "flat":
        batch = [1.0] * 30
    with pytest.raises(InputError, match=message) as info:
        check_rows(card, batch, proof=proof)
    assert info.value.param == {"wrong_count": "inputs[1]", "flat": "inputs[0]",
                                "too_many": "inputs", "empty": "inputs"}.get(bad, "inputs[1][3]")
    if bad == "range":
        check_rows(card, batch)  # plain scoring takes any finite value
