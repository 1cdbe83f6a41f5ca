"""Building and checking an ezkl circuit for a scoring model (the work behind
:func:`covey.scoring.proofs.prove_setup`).

Fixed-point choices, measured on the bundled models (30 raw measurements from 0.0008 to
4254, an MLP 30 → 16 → 1): inputs at scale 2^16 keep the smallest measurements (about
1e-3) to 1.5e-5; weights at 2^20 keep the folded weights of the largest ones (about 1e-3,
multiplied by values in the thousands) to 1e-6. Together they put the proved logit within
about 2e-3 of onnxruntime's, against 0.09 at 2^14/2^14. The circuit then has no lookup table
(ReLU and rescaling use range checks, split into base-2^8 digits), so it fits 2^11 rows and
proves in about a second.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from covey.scoring import _graph
from covey.scoring.model import missing_extra

INPUT_SCALE = 16
"""Inputs are proved as round(x · 2^16) (ezkl's ``input_scale``)."""
PARAM_SCALE = 20
"""Weights are fixed as round(w · 2^20) (ezkl's ``param_scale``)."""
DECOMP_BASE, DECOMP_LEGS = 2**8, 6
"""Range checks split a value into 6 base-256 digits (range up to 2^48 before a rescale):
a 256-row table instead of one of 2^14 rows, which would set the circuit's size."""
MAX_CHECK_ROWS = 256
"""Calibration rows whose proved output is compared with onnxruntime's at setup."""
SPARE_ROWS = 64
"""Circuit rows kept free beyond ezkl's count (its blinding rows) when choosing logrows."""


class ProofError(Exception):
    """A proof that does not verify, or a setup that cannot be made or read."""


@dataclass(frozen=True)
class Circuit:
    """What :func:`build_circuit` made: ``features`` inputs, the ``link`` applied to the
    proved output ("sigmoid" or "identity"), the circuit's 2^``logrows`` rows, its scales
    and the seconds it took."""

    features: int
    link: str
    logrows: int
    input_scale: int
    output_scale: int
    seconds: float


def ezkl_module() -> Any:
    """The ezkl module. Raises ImportError naming ``pip install 'covey[score]'``."""
    try:
        import ezkl
    except ImportError as exc:
        raise missing_extra(exc) from exc
    return ezkl


def quantize(row: Sequence[float], scale: int) -> list[str]:
    """``row`` as the field elements (hex) a proof's public inputs hold: each value rounded
    to float32 (the ONNX input's type, as ezkl reads it), times 2^``scale``, rounded."""
    ezkl = ezkl_module()
    f32 = ezkl.PyInputType.F32
    return [ezkl.float_to_felt(float(x), scale, input_type=f32) for x in row]


def apply_link(link: str, value: float) -> float:
    """The score a proved output stands for: sigmoid(value) for "sigmoid", else value."""
    if link == "sigmoid":
        # Two branches so that exp never overflows.
        if value >= 0:
            return 1.0 / (1.0 + math.exp(-value))
        e = math.exp(value)
        return e / (1.0 + e)
    return value


def call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` for an ezkl function, its errors as :class:`ProofError`."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # ezkl raises RuntimeError with its own message
        raise ProofError(f"ezkl {getattr(fn, '__name__', 'call')} failed: {exc}") from exc


def build_circuit(model_onnx: Path, folder: Path,
                  rows: Sequence[Sequence[float]] | None) -> Circuit:
    """Write ``settings.json`` and ``model.compiled`` for ``model_onnx`` into ``folder``.

    Inputs and outputs are public, weights fixed. A circuit without lookup tables (the
    bundled models) gets the scales above and the fewest rows that hold it; one with lookup
    tables (other nonlinear operators) is calibrated by ezkl on ``rows``.

    Raises:
        ProofError: operators ezkl cannot prove, lookups without ``rows``, or ezkl fails.
    """
    import onnx

    started = time.monotonic()
    ezkl = ezkl_module()
    model = onnx.load(str(model_onnx))
    foreign = sorted({f"{n.domain}.{n.op_type}" for n in model.graph.node
                      if n.domain not in ("", "ai.onnx")})
    if foreign:
        raise ProofError(f"ezkl cannot prove these operators: {', '.join(foreign)}; export "
                         "the model with standard ONNX operators only")
    circuit, has_sigmoid = _graph.split_sigmoid(model)
    path, settings = folder / "circuit.onnx", folder / "settings.json"
    onnx.save(circuit, str(path))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    args = ezkl.PyRunArgs()
    args.input_visibility, args.param_visibility, args.output_visibility = (
        "public", "fixed", "public")
    args.input_scale, args.param_scale = INPUT_SCALE, PARAM_SCALE
    args.decomp_base, args.decomp_legs = DECOMP_BASE, DECOMP_LEGS
    # A proof is for one row: every symbolic dimension (the batch) is 1.
    args.variables = [(d.dim_param, 1) for d in dims if d.dim_param] or [("batch_size", 1)]
    try:
        call(ezkl.gen_settings, str(path), str(settings), py_run_args=args)
        info = json.loads(settings.read_text())
        if info.get("required_lookups"):
            if not rows:
                raise ProofError("this model's circuit needs lookup tables, calibrated on "
                                 "rows of its inputs: pass calibration rows or put a "
                                 "card.json with ranges beside the model")
            data = folder / "calibration.json"
            data.write_text(json.dumps({"input_data": [[float(x) for r in rows for x in r]]}))
            call(ezkl.calibrate_settings, str(data), str(path), str(settings), "resources")
            data.unlink()
        else:
            args.logrows = max(int(math.ceil(math.log2(info["num_rows"] + SPARE_ROWS))),
                               int(math.log2(DECOMP_BASE)) + 1)
            call(ezkl.gen_settings, str(path), str(settings), py_run_args=args)
        call(ezkl.compile_circuit, str(path), str(folder / "model.compiled"), str(settings))
        info = json.loads(settings.read_text())
    finally:
        path.unlink(missing_ok=True)
    features = math.prod(info["model_instance_shapes"][0])
    return Circuit(features=features, link="sigmoid" if has_sigmoid else "identity",
                   logrows=int(info["run_args"]["logrows"]),
                   input_scale=int(info["model_input_scales"][0]),
                   output_scale=int(info["model_output_scales"][0]),
                   seconds=time.monotonic() - started)


def check_circuit(model_onnx: Path, compiled: Path, circuit: Circuit,
                  rows: Sequence[Sequence[float]] | None) -> tuple[float | None, int]:
    """Compare the circuit's output with onnxruntime's on up to :data:`MAX_CHECK_ROWS` of
    ``rows`` and run its constraints on their per-feature low and high corners.

    Returns:
        (largest absolute difference in output units, rows compared); (None, 0) without rows.

    Raises:
        ProofError: a row the circuit cannot take, or constraints that fail on a corner
            (values too large for the range checks).
    """
    if not rows:
        return None, 0
    import tempfile

    import numpy as np
    import onnxruntime as ort

    ezkl = ezkl_module()
    x = np.asarray(rows, dtype=np.float64).reshape(len(rows), circuit.features)
    picked = x[np.linspace(0, len(x) - 1, min(len(x), MAX_CHECK_ROWS)).round().astype(int)]
    corners = np.stack([x.min(axis=0), x.max(axis=0)])
    session = ort.InferenceSession(str(model_onnx), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    want = session.run(None, {name: np.vstack([picked, corners]).astype(np.float32)})[0]
    want = np.asarray(want).reshape(len(picked) + 2, -1)[:, -1]
    worst = 0.0
    with tempfile.TemporaryDirectory(prefix="covey-check-") as tmp:
        data, witness = Path(tmp) / "input.json", Path(tmp) / "witness.json"
        for i, row in enumerate(np.vstack([picked, corners])):
            data.write_text(json.dumps({"input_data": [row.tolist()]}))
            out = call(ezkl.gen_witness, str(data), str(compiled), str(witness))
            got = apply_link(circuit.link, ezkl.felt_to_float(out["outputs"][0][0],
                                                              circuit.output_scale))
            worst = max(worst, abs(got - float(want[i])))
            if i >= len(picked):
                try:
                    ok = ezkl.mock(str(witness), str(compiled))
                except Exception as exc:  # ezkl raises RuntimeError with its own message
                    ok = exc
                if ok is not True:
                    raise ProofError("the circuit's constraints fail at the calibration rows' "
                                     f"{'low' if i == len(picked) else 'high'} corner: {ok}")
    return worst, len(picked) + 2
