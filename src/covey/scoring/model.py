"""A scoring model folder (``model.onnx`` + ``card.json``), the checks its input rows pass,
and scoring rows with onnxruntime."""

from __future__ import annotations

import hashlib
import math
import numbers
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from covey.protocol.score import MAX_PROOF_ROWS, ScoringCard

MODEL_FILE = "model.onnx"
CARD_FILE = "card.json"
SCORE_EXTRA = "pip install 'covey[score]'"
"""The command that installs what scoring needs (onnxruntime, onnx, scikit-learn, skl2onnx,
ezkl, TenSEAL)."""


class InputError(ValueError):
    """Rows a model cannot take; ``param`` names the request field at fault (OpenAI's error
    ``param``), the message says what to fix."""

    def __init__(self, message: str, param: str = "inputs") -> None:
        super().__init__(message)
        self.param = param


def missing_extra(exc: ImportError) -> ImportError:
    """An ImportError that names the missing module and the command installing it."""
    return ImportError(f"scoring needs {exc.name or 'a missing module'}: {SCORE_EXTRA}")


def is_scoring_folder(path: Path) -> bool:
    """Whether ``path`` is a folder holding ``model.onnx`` and ``card.json``."""
    return (path / MODEL_FILE).is_file() and (path / CARD_FILE).is_file()


FLOAT32_MAX = 3.4028234663852886e38
"""The largest float32: the ONNX graph computes in 32-bit floats."""


def check_rows(card: ScoringCard, rows: Any, proof: bool = False,
               encrypted: bool = False) -> None:
    """Check request rows against ``card`` before any work is done.

    ``rows``: a sequence of rows, each a sequence of ``len(card.features)`` numbers in the
    card's order, each within float32's range. With ``proof``, at most
    :data:`MAX_PROOF_ROWS` rows; with ``proof`` or ``encrypted`` (the client checks its own
    row before encrypting it), each value must lie in the card's range for its feature: the
    circuit is checked on those ranges, and CKKS holds the logit of rows inside them.

    Raises:
        InputError: the first problem found, naming the row and feature (``param``
            ``inputs``, ``inputs[i]`` for row *i*, ``inputs[i][j]`` for its feature *j*, as
            request validation names them).
    """
    n = len(card.features)
    if isinstance(rows, str | bytes) or not isinstance(rows, Sequence) or not rows:
        raise InputError("inputs must be a non-empty list of rows, each a list of "
                         f"{n} numbers")
    if proof and len(rows) > MAX_PROOF_ROWS:
        raise InputError(f"at most {MAX_PROOF_ROWS} rows are proved per request (each row is "
                         f"its own proof); got {len(rows)}")
    for i, row in enumerate(rows):
        if isinstance(row, str | bytes) or not isinstance(row, Sequence):
            raise InputError(f"row {i} is not a list of numbers", f"inputs[{i}]")
        if len(row) != n:
            raise InputError(f"row {i} has {len(row)} features; this model takes {n}, in the "
                             "order GET /v1/models/{id} lists them", f"inputs[{i}]")
        for j, value in enumerate(row):
            name, param = card.features[j], f"inputs[{i}][{j}]"
            # bool is an int in Python, but JSON true is not a measurement.
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise InputError(f"row {i}, feature {j} ({name!r}) is not a number: "
                                 f"{value!r:.40}", param)
            if not math.isfinite(value) or abs(value) > FLOAT32_MAX:
                raise InputError(f"row {i}, feature {j} ({name!r}) is not a finite 32-bit "
                                 f"number: {value!r}", param)
            if (proof or encrypted) and card.ranges:
                low, high = card.ranges[j]
                if not low <= value <= high:
                    what = "a proof" if proof else "an encrypted row"
                    raise InputError(f"row {i}, feature {j} ({name!r}) is {value!r}, outside "
                                     f"[{low:g}, {high:g}], the range {what} can take", param)


class ScoringModel:
    """A loaded scoring model: its card and an onnxruntime session on one thread.

    Not for concurrent use from several threads at once (one session, one thread each).
    """

    def __init__(self, folder: Path, card: ScoringCard, onnx_bytes: bytes,
                 session: Any, onnx_model: Any) -> None:
        self.folder = folder
        self.card = card
        self.sha256 = hashlib.sha256(onnx_bytes).hexdigest()
        self._session = session
        self._onnx = onnx_model
        self._input = session.get_inputs()[0].name
        self._output = _float_output(session)

    @classmethod
    def load(cls, folder: Path) -> ScoringModel:
        """Read ``folder/card.json`` and ``folder/model.onnx``.

        Raises:
            ValueError: a file is missing or invalid, or the model's input width differs
                from the card's features.
            ImportError: onnxruntime or onnx are missing (``pip install 'covey[score]'``).
        """
        folder = Path(folder)
        if not is_scoring_folder(folder):
            raise ValueError(f"{folder} is not a scoring model folder: it needs {MODEL_FILE} "
                             f"and {CARD_FILE}")
        try:
            card = ScoringCard.model_validate_json((folder / CARD_FILE).read_text())
        except (ValidationError, UnicodeDecodeError) as exc:
            raise ValueError(f"{folder / CARD_FILE} is not a valid model card: {exc}") from exc
        if card.ranges and len(card.ranges) != len(card.features):
            raise ValueError(f"{folder / CARD_FILE}: {len(card.ranges)} ranges for "
                             f"{len(card.features)} features")
        try:
            import onnx
            import onnxruntime as ort
        except ImportError as exc:
            raise missing_extra(exc) from exc
        data = (folder / MODEL_FILE).read_bytes()
        try:
            options = ort.SessionOptions()
            # One thread: a miner runs many small requests side by side.
            options.intra_op_num_threads = 1
            options.inter_op_num_threads = 1
            session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
            model = onnx.load_from_string(data)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ValueError(f"{folder / MODEL_FILE} is not a valid ONNX model: {exc}") from exc
        width = session.get_inputs()[0].shape[-1]
        if isinstance(width, int) and width != len(card.features):
            raise ValueError(f"{folder / MODEL_FILE} takes {width} features but its card lists "
                             f"{len(card.features)}")
        return cls(folder, card, data, session, model)

    def predict(self, rows: Sequence[Sequence[float]]) -> list[float]:
        """The model's output (the probability the card names) for each row, as floats.

        ``rows``: (n, features) numbers, checked by :func:`check_rows` first; they are run as
        float32, the type the ONNX graph takes.
        """
        import numpy as np

        x = np.asarray(rows, dtype=np.float32).reshape(len(rows), len(self.card.features))
        out = self._session.run([self._output], {self._input: x})[0]
        out = np.asarray(out).reshape(len(rows), -1)
        # One column: the probability; two (a classifier's): the second class's.
        return [float(v) for v in out[:, -1]]

    def linear(self) -> tuple[list[float], float] | None:
        """``(w, b)``, with ``len(w)`` the number of features, such that
        sigmoid(w·x + b) equals :meth:`predict` (to float32 rounding), when the model is a
        logistic regression; None for any other model."""
        from covey.scoring._graph import linear_weights

        return linear_weights(self._onnx)


def _float_output(session: Any) -> str:
    """The name of the session's output that holds the score: its only output, else its
    first float tensor of one or two columns (``probabilities`` of a classifier).

    Raises:
        ValueError: no such output.
    """
    outputs = session.get_outputs()
    for out in outputs:
        cols = out.shape[-1] if len(out.shape) >= 2 else 1
        if out.type == "tensor(float)" and cols in (1, 2):
            return str(out.name)
    raise ValueError("the model has no float output of one or two columns: "
                     f"{[(o.name, o.type, o.shape) for o in outputs]}")
