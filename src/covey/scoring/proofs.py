"""Zero-knowledge proofs (ezkl, KZG commitments) that a committed scoring model produced an
output from an input.

The model owner runs :func:`prove_setup` once; miners hold the whole setup folder and prove
with :class:`Prover`; anyone holding ``vk.key``, ``settings.json``, ``kzg.srs`` and
``setup.json`` (a few KB to a few MB; not the proving key) checks a proof with
:class:`ProofVerifier` or a whole ``POST /v1/scores`` answer with :func:`verify_answer`.

The circuit takes the row and the output as public instances and the weights as fixed
constants, so the verifying key commits to the weights: a proof made with other weights, or
for another row, does not verify against this key and that row.

A model whose output is a sigmoid is proved up to its logit (``setup.json`` says
``"link": "sigmoid"``): a sigmoid inside the circuit is a lookup table spanning the logit's
range at the output's fixed-point scale (2^20), far too large to prove in seconds, while the
sigmoid of a proved logit is a public function the verifier applies itself. The proved
score is the sigmoid of the proved logit; it differs from onnxruntime's float score by the
circuit's fixed-point error (``setup.json``'s ``max_abs_error``: about 4e-4 for the bundled
MLP), so a miner asked for a proof answers the proved score.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from covey.scoring._ezkl import (
    INPUT_SCALE,
    ProofError,
    apply_link,
    build_circuit,
    call,
    check_circuit,
    ezkl_module,
    quantize,
)

SETTINGS, COMPILED, PK, VK, SRS, SETUP = (
    "settings.json", "model.compiled", "pk.key", "vk.key", "kzg.srs", "setup.json")
LOCAL_SRS = "generated locally"
"""``setup.json``'s ``srs`` when the structured reference string was made by this setup."""


def prove_setup(model_onnx: Path, out: Path, srs: Path | None = None,
                calibration_rows: Sequence[Sequence[float]] | None = None) -> dict[str, Any]:
    """Make the proof setup of ``model_onnx`` in the folder ``out`` and return its summary
    (also written to ``out/setup.json``).

    ``out`` receives ``settings.json``, ``model.compiled`` (the circuit), ``pk.key`` (the
    proving key, for miners), ``vk.key`` (the verifying key, for everyone), ``kzg.srs`` and
    ``setup.json`` (model_sha256, vk_sha256, logrows, scales, link, srs origin, seconds,
    max_abs_error). A previous setup in ``out`` is replaced.

    ``srs``: a structured reference string file (KZG, ezkl's format, at least ``logrows``)
    to copy in. When None one is generated locally: whoever generated an SRS knows its
    secret and could forge proofs that verify, so a locally made one only serves tests and
    single-operator networks; a real network loads a public ceremony's SRS by path.

    ``calibration_rows``: rows (features in the model's order) spanning the inputs a proof
    may take; for the bundled models, the data set. The circuit's fixed-point error is
    measured on them (``max_abs_error``, in output units) and its range checks are run on
    their per-feature low and high corners. Default: rows made from the ``ranges`` of a
    ``card.json`` beside the model, else none (nothing measured).

    Raises:
        ProofError: the model cannot be proved (operators ezkl lacks, a circuit whose checks
            fail on the calibration rows), ``out`` holds something else, or ``srs`` is unusable.
        ImportError: ezkl, onnx or onnxruntime are missing (``pip install 'covey[score]'``).
    """
    started = time.monotonic()
    model_onnx, out = Path(model_onnx), Path(out)
    if out.exists() and any(out.iterdir()) and not (out / SETUP).is_file():
        raise ProofError(f"{out} exists and is not a proof setup: choose another folder")
    if srs is not None and not Path(srs).is_file():
        raise ProofError(f"no SRS file at {srs}")
    rows = calibration_rows if calibration_rows is not None else _card_rows(model_onnx)
    ezkl = ezkl_module()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        circuit = build_circuit(model_onnx, tmp, rows)
        t = time.monotonic()
        if srs is None:
            call(ezkl.gen_srs, str(tmp / SRS), circuit.logrows)
        else:
            shutil.copyfile(srs, tmp / SRS)
        srs_s = time.monotonic() - t
        t = time.monotonic()
        call(ezkl.setup, str(tmp / COMPILED), str(tmp / VK), str(tmp / PK),
              srs_path=str(tmp / SRS))
        setup_s = time.monotonic() - t
        t = time.monotonic()
        error, checked = check_circuit(model_onnx, tmp / COMPILED, circuit, rows)
        summary = {
            "model_sha256": _sha256(model_onnx),
            "vk_sha256": _sha256(tmp / VK),
            "features": circuit.features,
            "link": circuit.link,
            "logrows": circuit.logrows,
            "input_scale": circuit.input_scale,
            "output_scale": circuit.output_scale,
            "srs": LOCAL_SRS if srs is None else str(Path(srs).resolve()),
            "srs_sha256": _sha256(tmp / SRS),
            "max_abs_error": error,
            "rows_checked": checked,
            "ezkl": getattr(ezkl, "__version__", "unknown"),
            "seconds": {"circuit": round(circuit.seconds, 3), "srs": round(srs_s, 3),
                        "setup": round(setup_s, 3),
                        "check": round(time.monotonic() - t, 3),
                        "total": round(time.monotonic() - started, 3)},
        }
        (tmp / SETUP).write_text(json.dumps(summary, indent=1) + "\n")
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide the setup from the miner's user
        _replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary


class ProofVerifier:
    """Checks proofs of one setup; needs ``vk.key``, ``settings.json``, ``kzg.srs`` and
    ``setup.json`` (not the proving key).

    Give ``setup_dir``, or ``vk`` with any of the others; missing paths default to the
    files beside ``vk``.

    Raises:
        ProofError: a file is missing or does not belong to this setup.
        ImportError: ezkl is missing.
    """

    def __init__(self, setup_dir: Path | None = None, *, vk: Path | None = None,
                 settings: Path | None = None, srs: Path | None = None,
                 setup: Path | None = None) -> None:
        if setup_dir is None and vk is None:
            raise ProofError("give the setup folder or the verifying key")
        base = Path(setup_dir) if setup_dir is not None else Path(vk).parent  # type: ignore[arg-type]
        self.vk = Path(vk) if vk is not None else base / VK
        self.settings = Path(settings) if settings is not None else base / SETTINGS
        self.srs = Path(srs) if srs is not None else base / SRS
        setup_path = Path(setup) if setup is not None else base / SETUP
        for path in (self.vk, self.settings, self.srs, setup_path):
            if not path.is_file():
                raise ProofError(f"missing {path}: verifying needs vk.key, settings.json, "
                                 "kzg.srs and setup.json of the model's proof setup")
        self._ezkl = ezkl_module()
        self.vk_sha256 = _sha256(self.vk)
        try:
            info = json.loads(setup_path.read_text())
            settings_json = json.loads(self.settings.read_text())
            run_args = settings_json["run_args"]
            self.input_scale = int(settings_json["model_input_scales"][0])
            self.output_scale = int(settings_json["model_output_scales"][0])
            shapes = settings_json["model_instance_shapes"]
            self.features = math.prod(shapes[0])
            outputs = sum(math.prod(shape) for shape in shapes[1:])
            self.link = str(info["link"])
            recorded_vk = info["vk_sha256"]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise ProofError(f"unreadable setup files: {exc}") from exc
        if recorded_vk != self.vk_sha256:
            raise ProofError(f"{setup_path} belongs to another verifying key "
                             f"({recorded_vk[:12]}…, not {self.vk_sha256[:12]}…)")
        visibility = (run_args.get("input_visibility"), run_args.get("param_visibility"),
                      run_args.get("output_visibility"))
        if (visibility != ("Public", "Fixed", "Public") or self.link not in _LINKS
                or outputs != 1):
            raise ProofError(f"{self.settings} is not a setup this verifier checks: inputs and "
                             f"outputs must be public, weights fixed, and one output; got "
                             f"{visibility}, {outputs} outputs")
        # The output's dequantization step in score units: the sigmoid's slope is ≤ 1/4.
        self.step = 2.0 ** -self.output_scale * (0.25 if self.link == "sigmoid" else 1.0)

    def verify(self, proof_text: str, row: Sequence[float] | None = None) -> float:
        """Verify one proof (ezkl's proof JSON text) and return the score it proves.

        ``row``: when given, the proof's public inputs must be this row quantized with the
        circuit's input scale (2^-16), or the proof is for another input.

        Raises:
            ProofError: malformed, not valid for this key, or for another row.
        """
        instances, proof = _parse(proof_text)
        flat = instances[0] if len(instances) == 1 else None
        if flat is None or len(flat) != self.features + 1:
            raise ProofError(f"the proof's public values are not {self.features} inputs and "
                             "1 output")
        if row is not None:
            try:
                values = [float(x) for x in row]
            except (TypeError, ValueError) as exc:
                raise ProofError("the row is not a list of numbers") from exc
            if len(values) != self.features or not all(map(math.isfinite, values)):
                raise ProofError(f"the row is not {self.features} finite numbers")
            for j, (got, want) in enumerate(zip(flat, quantize(values, self.input_scale),
                                                strict=False)):
                if got.lower() != want.lower():
                    raise ProofError(f"the proof is for another input (feature {j} differs)")
        with tempfile.TemporaryDirectory(prefix="covey-verify-") as tmp:
            path = Path(tmp) / "proof.json"
            path.write_text(json.dumps({"instances": instances, "proof": proof}))
            try:
                ok = self._ezkl.verify(str(path), str(self.settings), str(self.vk),
                                       srs_path=str(self.srs))
            except Exception as exc:  # ezkl raises RuntimeError with its own message
                raise ProofError(f"the proof does not verify: {exc}") from exc
        if ok is not True:
            raise ProofError("the proof does not verify")
        value = float(self._ezkl.felt_to_float(flat[-1], self.output_scale))
        return apply_link(self.link, value)


class Prover:
    """Makes proofs with the setup folder ``setup_dir`` (which must hold ``pk.key`` and
    ``model.compiled`` besides the verifier's files).

    ezkl holds Python's GIL while it proves (about half a second here): beside an event
    loop, prove in a worker process (:func:`prove_row`), not a thread.

    Raises:
        ProofError: a file is missing or invalid.
    """

    def __init__(self, setup_dir: Path) -> None:
        self.dir = Path(setup_dir)
        for name in (PK, COMPILED):
            if not (self.dir / name).is_file():
                raise ProofError(f"missing {self.dir / name}: proving needs the model owner's "
                                 "whole setup folder (covey model prove-setup)")
        self.verifier = ProofVerifier(self.dir)
        self.features = self.verifier.features

    def prove(self, row: Sequence[float]) -> tuple[str, float]:
        """Prove the model's output on ``row`` (``features`` finite numbers, inside the
        card's ranges). Blocking, about a second for the bundled MLP.

        Returns:
            The proof (compact ezkl proof JSON text: ``instances`` and ``proof``, 13 KB for
            the bundled models) and the score it proves.

        Raises:
            ProofError: the row has the wrong width or ezkl fails on it.
        """
        try:
            values = [float(x) for x in row]
        except (TypeError, ValueError) as exc:
            raise ProofError(f"a proved row is {self.features} finite numbers") from exc
        if len(values) != self.features or not all(map(math.isfinite, values)):
            raise ProofError(f"a proved row is {self.features} finite numbers")
        ezkl = self.verifier._ezkl
        with tempfile.TemporaryDirectory(prefix="covey-prove-") as tmp:
            data, witness, proof = (Path(tmp) / n for n in ("input.json", "witness.json",
                                                             "proof.json"))
            data.write_text(json.dumps({"input_data": [values]}))
            compiled = str(self.dir / COMPILED)
            call(ezkl.gen_witness, str(data), compiled, str(witness))
            call(ezkl.prove, str(witness), compiled, str(self.dir / PK), str(proof),
                  srs_path=str(self.verifier.srs))
            full = json.loads(proof.read_text())
        # ezkl's file repeats the proof as hex and the inputs as text; verifying needs only
        # these two fields, which keeps the proof under half the size.
        text = json.dumps({"instances": full["instances"], "proof": full["proof"]},
                          separators=(",", ":"))
        value = float(ezkl.felt_to_float(full["instances"][0][-1],
                                         self.verifier.output_scale))
        return text, apply_link(self.verifier.link, value)


@functools.lru_cache(maxsize=8)
def _prover(setup_dir: Path) -> Prover:
    return Prover(setup_dir)


def prove_row(setup_dir: Path, row: Sequence[float]) -> tuple[str, float]:
    """:meth:`Prover.prove` with the setup in ``setup_dir``, as a function of picklable
    arguments for a process pool (ezkl holds the GIL while it proves):
    ``loop.run_in_executor(pool, prove_row, setup_dir, row)``. The prover is kept per
    process. Make the pool with the "spawn" start method
    (``ProcessPoolExecutor(mp_context=multiprocessing.get_context("spawn"))``): a child
    forked from a process where ezkl already ran hangs (its thread pool is not copied).

    Raises:
        ProofError: as :class:`Prover` and :meth:`Prover.prove`.
    """
    return _prover(Path(setup_dir)).prove(row)


def verify_answer(answer: dict[str, Any], vk: Path, settings: Path | None = None,
                  srs: Path | None = None) -> list[float]:
    """Verify every proof of a ``POST /v1/scores`` answer and return the proved scores, in
    the order of ``answer["data"]``.

    Each data item needs ``proof`` (the proof JSON text) and ``score``; its ``input``, when
    present, must be what the proof is for; its ``score`` must equal the proved score
    within the output's dequantization step. ``answer["proof"]["vk_sha256"]``, when
    present, must name ``vk``. ``settings``, ``srs`` and ``setup.json`` default to the files
    beside ``vk``.

    Raises:
        ProofError: naming the first item that fails, and why.
    """
    verifier = ProofVerifier(vk=vk, settings=settings, srs=srs)
    named = (answer.get("proof") or {}).get("vk_sha256") if isinstance(answer, dict) else None
    if named is not None and named != verifier.vk_sha256:
        raise ProofError(f"the answer was proved for the key {str(named)[:12]}…, not "
                         f"{vk} ({verifier.vk_sha256[:12]}…)")
    data = answer.get("data") if isinstance(answer, dict) else None
    if not isinstance(data, list) or not data:
        raise ProofError("the answer has no data items to verify")
    scores = []
    for n, item in enumerate(data):
        label = f"item {item.get('index', n) if isinstance(item, dict) else n}"
        if not isinstance(item, dict) or not isinstance(item.get("proof"), str):
            raise ProofError(f"{label} carries no proof")
        try:
            proved = verifier.verify(item["proof"], item.get("input"))
        except ProofError as exc:
            raise ProofError(f"{label}: {exc}") from exc
        score = item.get("score")
        if (not isinstance(score, int | float) or isinstance(score, bool)
                or not abs(score - proved) <= verifier.step + 1e-12):
            raise ProofError(f"{label}: the score {score!r} is not the proved {proved!r}")
        scores.append(proved)
    return scores


_LINKS = ("sigmoid", "identity")


def _parse(text: str) -> tuple[list[list[str]], list[int]]:
    """(instances, proof bytes) of an ezkl proof JSON text.

    Raises:
        ProofError: not JSON of that shape.
    """
    try:
        obj = json.loads(text)
        instances, proof = obj["instances"], obj["proof"]
    except (ValueError, TypeError, KeyError) as exc:
        raise ProofError("the proof is not ezkl proof JSON (instances and proof)") from exc
    if (not isinstance(instances, list)
            or not all(isinstance(i, list) and all(isinstance(f, str) for f in i)
                       for i in instances)
            or not isinstance(proof, list)
            or not all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b < 256
                       for b in proof)):
        raise ProofError("the proof is not ezkl proof JSON (instances and proof)")
    return instances, proof


def _card_rows(model_onnx: Path) -> list[list[float]] | None:
    """Rows spanning the ranges of the ``card.json`` beside ``model_onnx``: both corners and
    64 uniform draws (seed 0); None without a card or ranges."""
    from pydantic import ValidationError

    from covey.protocol.score import ScoringCard

    path = model_onnx.parent / "card.json"
    try:
        card = ScoringCard.model_validate_json(path.read_text())
    except (OSError, ValidationError):
        return None
    if not card.ranges:
        return None
    import random

    rng = random.Random(0)
    rows = [[lo for lo, _ in card.ranges], [hi for _, hi in card.ranges]]
    rows += [[rng.uniform(lo, hi) for lo, hi in card.ranges] for _ in range(64)]
    return rows


def _replace(new: Path, out: Path) -> None:
    """Put folder ``new`` at ``out``, moving a previous setup there aside first."""
    if out.exists():
        old = out.with_name(f".{out.name}-old-{time.monotonic_ns()}")
        out.rename(old)
        shutil.rmtree(old, ignore_errors=True)
    new.rename(out)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


__all__ = ["INPUT_SCALE", "ProofError", "ProofVerifier", "Prover", "prove_row", "prove_setup",
           "verify_answer"]
