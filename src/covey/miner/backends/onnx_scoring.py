"""The onnxruntime backend: a tabular scoring model (an ONNX file and its card), scoring
plain rows, proving its answers with ezkl, and scoring encrypted rows with TenSEAL.

A scoring folder holds ``model.onnx`` and ``card.json`` (:mod:`covey.scoring.model`); a
``proof/`` folder beside them, made by ``covey model prove-setup``, holds the proving key,
and its presence makes the miner offer proofs (``ModelOffer.proof_vk``). A linear model
(logistic regression) also scores CKKS-encrypted rows (:mod:`covey.scoring.he`). The
weights digest is the SHA-256 of ``model.onnx`` alone, so a miner with a proof setup and
one without serve the same committed model.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import math
import multiprocessing
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from covey.miner.backends.base import BackendError, ScoringBackend
from covey.protocol import ModelOffer, Score, Scored

log = logging.getLogger("covey.miner")

KEYS_KEPT = 4
"""Evaluation-key sets kept loaded (least recently used dropped first): each is tens of MB
(``shared/MEASURED.md``), and a client reuses its keys across requests."""


@dataclass(frozen=True)
class ScoringConfig:
    """Prices: ``ask_prompt`` µcr per 1M rows, ``ask_completion`` µcr per 1M milliseconds
    of proving or encrypted work (the network's floor applies when lower)."""

    ask_prompt: int = 0
    ask_completion: int = 0


class OnnxScoringBackend(ScoringBackend):
    """Serves the scoring model in ``folder`` as ``name``.

    Raises (from the constructor):
        ValueError: the folder holds no valid model or card.
    """

    def __init__(self, name: str, folder: Path, slots: int = 1,
                 config: ScoringConfig = ScoringConfig()) -> None:
        from covey.scoring.model import ScoringModel

        self.model = ScoringModel.load(folder)
        self.slots = slots
        self._linear = self.model.linear()
        self._setup: Path | None = None
        self._pool: ProcessPoolExecutor | None = None
        proof_vk = None
        setup = folder / "proof"
        if (setup / "pk.key").is_file():
            self._setup = setup
            proof_vk = hashlib.sha256((setup / "vk.key").read_bytes()).hexdigest()
        card = self.model.card
        if self._linear is not None and _he_available():
            from covey.scoring.he import ERROR_BOUND, MAX_ABS_VALUE, check_model

            try:  # the scheme's bounds: features per row, weights' size, the logit's reach
                weights, bias = check_model(*self._linear), self._linear[1]
                ranges = card.ranges
                if len(ranges) != len(weights):
                    raise ValueError("its card gives no range per feature")
                reach = sum(abs(w) * max(abs(lo), abs(hi))
                            for w, (lo, hi) in zip(weights, ranges, strict=True)) + abs(bias)
                if reach >= MAX_ABS_VALUE:
                    raise ValueError(f"rows in the card's ranges reach a logit of {reach:g}; "
                                     f"ciphertext holds values below {MAX_ABS_VALUE:g}")
                self._linear = (weights, bias)
            except ValueError as exc:
                log.info("%s scores plain rows only: %s", name, exc)
                self._linear = None
        else:
            self._linear = None  # no TenSEAL here: plain and proved rows only
        error = ERROR_BOUND if self._linear is not None else None
        card = card.model_copy(update={"encrypted_error": error})
        sha256 = hashlib.sha256((folder / "model.onnx").read_bytes()).hexdigest()
        self.offer = ModelOffer(name=name, sha256=sha256, context_length=len(card.features),
                                backend="onnxruntime", kind="scoring", card=card,
                                proof_vk=proof_vk, ask_prompt=config.ask_prompt,
                                ask_completion=config.ask_completion)
        self._keys: OrderedDict[str, Any] = OrderedDict()

    async def score(self, task: Score, keys: bytes | None = None,
                    progress: Callable[[int], None] | None = None) -> Scored:
        """See :meth:`ScoringBackend.score`."""
        if task.inputs is not None:
            return await self._plain(task, task.inputs, progress)
        return await self._encrypted(task, keys)

    async def _plain(self, task: Score, rows: tuple[tuple[float, ...], ...],
                     progress: Callable[[int], None] | None) -> Scored:
        from covey.scoring.model import InputError, check_rows

        try:
            check_rows(self.model.card, rows, proof=task.proof)
        except InputError as exc:
            raise BackendError("invalid_value", str(exc), exc.param) from None
        if not task.proof:
            outputs = await asyncio.to_thread(self.model.predict, rows)
            for i, value in enumerate(outputs):
                if not math.isfinite(value):
                    # float32 overflows (inf - inf in a layer): the request's values, not the
                    # miner, are at fault, and JSON could not carry the NaN anyway
                    raise BackendError("invalid_value", f"Row {i} gives no finite score: its "
                                       "values overflow the model's 32-bit arithmetic.",
                                       f"inputs[{i}]")
            return Scored(job_id=task.job_id, rows=len(rows), outputs=tuple(outputs))
        if self._setup is None:
            raise BackendError("proof_unavailable", f"This miner holds no proving key for "
                               f"{task.model!r}.", "proof")
        from covey.scoring.proofs import prove_row

        if self._pool is None:
            # ezkl holds the GIL while it proves (~0.5-1 s a row): in a thread it would
            # starve the event loop and its heartbeats. A fork of a process that ran ezkl
            # hangs, hence spawn.
            self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        loop = asyncio.get_running_loop()
        proofs: list[str] = []
        outputs: list[float] = []
        started = time.monotonic()
        for row in rows:
            proof, proved = await loop.run_in_executor(self._pool, prove_row, self._setup,
                                                       list(row))
            proofs.append(proof)
            outputs.append(proved)  # the circuit's fixed-point score: what the proof shows
            if progress is not None:
                progress(len(proofs))
        work_ms = round((time.monotonic() - started) * 1000)
        return Scored(job_id=task.job_id, rows=len(rows), work_ms=work_ms,
                      outputs=tuple(outputs), proofs=tuple(proofs))

    def close(self) -> None:
        """Stop the proving process, if one started."""
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)

    async def _encrypted(self, task: Score, keys: bytes | None) -> Scored:
        if self._linear is None:
            raise BackendError("encrypted_unsupported", f"{task.model!r} cannot score "
                               "encrypted rows (only linear models can).", "encrypted")
        from covey.scoring.he import HEError, score_encrypted

        assert task.keys_sha256 is not None and task.encrypted is not None
        try:
            evaluation = await self._eval_keys(task.keys_sha256, keys)
            ciphertext = base64.b64decode(task.encrypted, validate=True)
            weights, bias = self._linear
            started = time.monotonic()
            out = await asyncio.to_thread(score_encrypted, evaluation, ciphertext, weights,
                                          bias)
        except (HEError, binascii.Error) as exc:
            raise BackendError("invalid_value", f"The encrypted row cannot be scored: {exc}",
                               "encrypted") from None
        work_ms = round((time.monotonic() - started) * 1000)
        return Scored(job_id=task.job_id, rows=1, work_ms=work_ms,
                      encrypted=base64.b64encode(out).decode())

    async def _eval_keys(self, sha256: str, keys: bytes | None) -> Any:
        """The loaded evaluation keys ``sha256``: from ``keys`` when they came (the agent
        checked their digest), else from those kept.

        Raises:
            BackendError: ``keys_missing`` (neither); HEError from loading bad keys.
        """
        from covey.scoring.he import EvalKeys

        if sha256 in self._keys:
            self._keys.move_to_end(sha256)
            return self._keys[sha256]
        if keys is None:
            raise BackendError("keys_missing", f"This miner does not hold the evaluation "
                               f"keys {sha256[:16]}; send them with the task.", "encrypted")
        loaded = await asyncio.to_thread(EvalKeys.from_bytes, keys)
        self._keys[sha256] = loaded
        while len(self._keys) > KEYS_KEPT:
            self._keys.popitem(last=False)
        return loaded


def _he_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("tenseal") is not None
