"""Encrypted scoring (covey.scoring.he): the bundled logistic regression scored on CKKS
ciphertexts equals the plain score within ERROR_BOUND on every row of its data set; the
registered keys hold no secret key; ciphertexts of other keys or parameters, garbage and
rows of the wrong length are refused with HEError; keys survive a save and load; scoring is
deterministic.

``python tests/test_scoring_he.py`` prints the sizes and timings instead."""

from __future__ import annotations

import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("tenseal")
pytest.importorskip("onnxruntime")
pytest.importorskip("skl2onnx")

from covey.scoring import he  # noqa: E402
from covey.scoring.he import ClientKeys, EvalKeys, HEError, score_encrypted  # noqa: E402

LR = "breast-cancer-lr"


class Model:
    """The bundled logistic regression: weights, bias, the data set's rows and the plain
    (onnxruntime) scores of those rows."""

    def __init__(self, root: Path) -> None:
        from covey.scoring.bundled import dataset_rows, materialize
        from covey.scoring.model import ScoringModel

        model = ScoringModel.load(materialize(LR, root))
        linear = model.linear()
        assert linear is not None
        self.w, self.b = linear
        self.rows = dataset_rows()
        self.plain = model.predict(self.rows)

    def logit(self, row: list[float]) -> float:
        return math.fsum(w * x for w, x in zip(self.w, row, strict=True)) + self.b

    def exact(self, row: list[float]) -> float:
        return 1.0 / (1.0 + math.exp(-self.logit(row)))


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Model:
    return Model(tmp_path_factory.mktemp("scoring"))


@pytest.fixture(scope="module")
def keys() -> ClientKeys:
    return ClientKeys.generate()


@pytest.fixture(scope="module")
def evk(keys: ClientKeys) -> EvalKeys:
    return EvalKeys.from_bytes(keys.public)


def _tenseal_row(n: int = 8192, bits: tuple[int, ...] = (60, 45, 60), scale: int = 45,
                 row: list[float] | None = None) -> bytes:
    """A TenSEAL ciphertext of ``row`` under fresh keys with the given parameters."""
    import tenseal as ts

    ctx = ts.context(ts.SCHEME_TYPE.CKKS, n, coeff_mod_bit_sizes=list(bits))
    ctx.global_scale = 2.0**scale
    return ts.ckks_vector(ctx, row or [1.0] * 30).serialize()


def _envelope(kind: int, keys_sha256: str, payload: bytes) -> bytes:
    return he._pack(kind, keys_sha256, payload)


def test_encrypted_scores_equal_plain_on_every_row(model: Model, keys: ClientKeys,
                                                   evk: EvalKeys) -> None:
    worst_exact = worst_plain = 0.0
    for row, plain in zip(model.rows, model.plain, strict=True):
        score = keys.decrypt(score_encrypted(evk, keys.encrypt(row, 30), model.w, model.b))
        worst_exact = max(worst_exact, abs(score - model.exact(row)))
        worst_plain = max(worst_plain, abs(score - plain))
    assert worst_exact <= he.ERROR_BOUND / 10  # measured ≤ 5e-8: the bound has margin
    assert worst_plain <= he.ERROR_BOUND  # onnxruntime computes in float32


def test_model_fits_the_stated_limits(model: Model) -> None:
    """The bundled model is within what ERROR_BOUND and the scale's headroom assume."""
    he.check_model(model.w, model.b)
    largest = max(math.fsum(abs(w * x) for w, x in zip(model.w, row, strict=True))
                  for row in model.rows) + abs(model.b)
    assert largest < 2.0 ** (59 - he.SCALE_BITS) / 8


@pytest.mark.parametrize("n", [1, 7, 32])
def test_any_row_length_the_keys_can_sum(n: int, keys: ClientKeys, evk: EvalKeys) -> None:
    row = [(-1.0) ** i * (i + 0.5) * 10 for i in range(n)]
    w = [0.01 * (i + 1) for i in range(n)]
    z = math.fsum(a * b for a, b in zip(w, row, strict=True)) + 0.3
    assert keys.decrypt(score_encrypted(evk, keys.encrypt(row), w, 0.3)) == pytest.approx(
        1.0 / (1.0 + math.exp(-z)), abs=he.ERROR_BOUND)


def test_keys_are_small_and_hold_no_secret(keys: ClientKeys, evk: EvalKeys) -> None:
    import tenseal as ts

    assert len(keys.public) < 5_000_000  # only the five rotation keys, no relin keys
    assert not ts.context_from(keys.public).is_private()
    ciphertext = keys.encrypt([1.0] * 30)
    vector = ts.ckks_vector_from(evk._context, he._unpack(ciphertext, he._ROW, evk.sha256))
    with pytest.raises(ValueError, match="secret"):
        vector.decrypt()
    secret = keys._context.serialize(save_public_key=False, save_secret_key=True,
                                     save_galois_keys=False, save_relin_keys=False)
    with pytest.raises(HEError, match="secret key"):
        EvalKeys.from_bytes(secret)
    assert evk.sha256 == keys.keys_sha256 and evk.nbytes == len(keys.public)


def test_ciphertext_of_other_keys_refused(model: Model, keys: ClientKeys,
                                          evk: EvalKeys) -> None:
    other = ClientKeys.generate()
    with pytest.raises(HEError, match="other keys"):
        score_encrypted(evk, other.encrypt(model.rows[0]), model.w, model.b)
    answer = score_encrypted(evk, keys.encrypt(model.rows[0]), model.w, model.b)
    with pytest.raises(HEError, match="other keys"):
        other.decrypt(answer)


@pytest.mark.parametrize("params", [
    {"n": 4096, "bits": (40, 30, 39), "scale": 30},
    {"n": 8192, "bits": (60, 40, 40, 60), "scale": 40},
    {"n": 16384, "bits": (60, 45, 60), "scale": 45},
], ids=["N4096", "N8192-4primes", "N16384"])
def test_ciphertext_of_other_parameters_refused(params: dict, model: Model,
                                                evk: EvalKeys) -> None:
    forged = _envelope(he._ROW, evk.sha256, _tenseal_row(**params))
    with pytest.raises(HEError, match="parameters"):
        score_encrypted(evk, forged, model.w, model.b)


def test_keys_of_other_parameters_or_without_ours_refused() -> None:
    import tenseal as ts

    def public(bits: list[int], scale: int, galois: bool = False) -> bytes:
        ctx = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=bits)
        ctx.global_scale = 2.0**scale
        if galois:
            ctx.generate_galois_keys()  # TenSEAL's full set: 25 keys
        return ctx.serialize(save_secret_key=False)

    with pytest.raises(HEError, match="parameters"):
        EvalKeys.from_bytes(public([60, 40, 60], 40))
    with pytest.raises(HEError, match="parameters"):
        EvalKeys.from_bytes(public([60, 45, 60], 40))
    with pytest.raises(HEError, match="Galois keys for rotations"):
        EvalKeys.from_bytes(public([60, 45, 60], 45))
    with pytest.raises(HEError, match="at most"):
        EvalKeys.from_bytes(public([60, 45, 60], 45, galois=True))


def test_same_parameters_other_scale_or_level_refused(keys: ClientKeys, model: Model,
                                                      evk: EvalKeys) -> None:
    import tenseal as ts

    lower = ts.ckks_vector(keys._context, model.rows[0]) * ([1.0] * 30)  # rescaled: level 0
    with pytest.raises(HEError, match="fresh"):
        score_encrypted(evk, _envelope(he._ROW, evk.sha256, lower.serialize()),
                        model.w, model.b)


def test_garbage_refused(keys: ClientKeys, evk: EvalKeys, model: Model) -> None:
    good = keys.encrypt(model.rows[0])
    head = he._HEADER.size
    flipped = bytearray(good)
    flipped[head + 5] ^= 0xFF
    zeroed = good[:head + 50] + bytes(200) + good[head + 250:]
    cases = [b"", b"garbage", os.urandom(1000), good[:head], good[:head + 1],
             good[:len(good) // 2], good[:-1], bytes(flipped), zeroed,
             b"XXXX" + good[4:], good + b"\0" * (he.MAX_CIPHERTEXT_BYTES)]
    for bad in cases:
        with pytest.raises(HEError):
            score_encrypted(evk, bad, model.w, model.b)
        with pytest.raises(HEError):
            keys.decrypt(bad)
    for bad in [b"", b"garbage", os.urandom(4096), keys.public[:len(keys.public) // 2]]:
        with pytest.raises(HEError):
            EvalKeys.from_bytes(bad)


def test_row_and_score_are_not_interchangeable(keys: ClientKeys, evk: EvalKeys,
                                               model: Model) -> None:
    row = keys.encrypt(model.rows[0])
    answer = score_encrypted(evk, row, model.w, model.b)
    with pytest.raises(HEError, match="holds a row"):
        keys.decrypt(row)
    with pytest.raises(HEError, match="holds a score"):
        score_encrypted(evk, answer, model.w, model.b)


def test_wrong_rows_refused(keys: ClientKeys, evk: EvalKeys, model: Model) -> None:
    row = model.rows[0]
    for bad, n in [(row[:29], 30), (row, 29), ([], None), ([1.0] * 33, None),
                   ([*row[:29], math.nan], 30), ([*row[:29], math.inf], None),
                   ([*row[:29], "x"], None), ([*row[:29], 1e13], None)]:
        with pytest.raises(HEError):
            keys.encrypt(bad, n)
    with pytest.raises(HEError, match="holds 30 values; the model takes 29"):
        score_encrypted(evk, keys.encrypt(row), model.w[:29], model.b)


def test_models_that_cannot_score_ciphertext() -> None:
    """The model, not the request, is at fault: ValueError, not HEError."""
    for weights, bias in [([1.0] * 33, 0.0), ([], 0.0), ([math.nan] * 30, 0.0),
                          ([1.0] * 30, math.inf), ([400.0] * 30, 0.0)]:
        with pytest.raises(ValueError) as info:
            he.check_model(weights, bias)
        assert not isinstance(info.value, HEError)


def test_save_and_load(tmp_path: Path, keys: ClientKeys, evk: EvalKeys, model: Model) -> None:
    path = tmp_path / "keys.he"
    path.write_bytes(b"old")
    path.chmod(0o644)
    answer = score_encrypted(evk, keys.encrypt(model.rows[3]), model.w, model.b)
    keys.save(path)
    assert path.stat().st_mode & 0o777 == 0o600
    loaded = ClientKeys.load(path)
    assert loaded.public == keys.public and loaded.keys_sha256 == keys.keys_sha256
    assert loaded.decrypt(answer) == keys.decrypt(answer)
    again = score_encrypted(evk, loaded.encrypt(model.rows[3]), model.w, model.b)
    assert abs(keys.decrypt(again) - model.exact(model.rows[3])) <= he.ERROR_BOUND
    for bad in [b"", b"CVHEKEY1", path.read_bytes()[:1000], b"CVHEKEY1" + bytes(8) + b"x"]:
        path.write_bytes(bad)
        with pytest.raises(HEError):
            ClientKeys.load(path)


def test_scoring_is_deterministic(keys: ClientKeys, evk: EvalKeys, model: Model) -> None:
    ciphertext = keys.encrypt(model.rows[7])
    first = score_encrypted(evk, ciphertext, model.w, model.b)
    reloaded = EvalKeys.from_bytes(keys.public)
    assert he.DETERMINISTIC
    assert he.same_result(first, score_encrypted(reloaded, ciphertext, model.w, model.b))
    assert not he.same_result(first, score_encrypted(evk, keys.encrypt(model.rows[7]),
                                                     model.w, model.b))


def test_import_is_cheap() -> None:
    code = "import sys, covey.scoring.he; assert 'tenseal' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def measure(rows: int = 569) -> None:
    """Print sizes, timings (p50) and the largest error over ``rows`` rows of the data set."""
    import tempfile

    import tenseal as ts

    def ms(f, n: int = 20) -> float:
        times = []
        for _ in range(n):
            t = time.perf_counter()
            f()
            times.append(time.perf_counter() - t)
        return statistics.median(times) * 1e3

    model = Model(Path(tempfile.mkdtemp()))
    t = time.perf_counter()
    keys = ClientKeys.generate()
    generate = time.perf_counter() - t
    evk = EvalKeys.from_bytes(keys.public)
    row = keys.encrypt(model.rows[0])
    answer = score_encrypted(evk, row, model.w, model.b)
    worst = worst_logit = 0.0
    for r in model.rows[:rows]:
        answer = score_encrypted(evk, keys.encrypt(r), model.w, model.b)
        worst = max(worst, abs(keys.decrypt(answer) - model.exact(r)))
        payload = he._unpack(answer, he._SCORE, keys.keys_sha256)
        z = ts.ckks_vector_from(keys._context, payload).decrypt()[0]
        worst_logit = max(worst_logit, abs(z - model.logit(r)))
    print(f"TenSEAL {ts.__version__}, N={he.POLY_MODULUS_DEGREE}, moduli "
          f"{he.COEFF_MOD_BIT_SIZES}, scale 2^{he.SCALE_BITS}, {os.cpu_count()} CPUs")
    print(f"keys: generate {generate * 1e3:.0f} ms, public {len(keys.public) / 1e6:.2f} MB, "
          f"load (EvalKeys.from_bytes) {ms(lambda: EvalKeys.from_bytes(keys.public), 10):.1f} ms")
    print(f"ciphertext: row {len(row) / 1e3:.0f} KB, score {len(answer) / 1e3:.0f} KB")
    print(f"client: encrypt {ms(lambda: keys.encrypt(model.rows[0])):.2f} ms, "
          f"decrypt {ms(lambda: keys.decrypt(answer)):.2f} ms")
    print(f"miner: score_encrypted {ms(lambda: score_encrypted(evk, row, model.w, model.b)):.2f}"
          f" ms p50 (keys loaded)")
    print(f"over {rows} rows: max |encrypted - sigmoid(w·x+b)| {worst:.2e} (rounded to "
          f"{he.DECIMALS} decimals; ERROR_BOUND {he.ERROR_BOUND:g}), logit {worst_logit:.2e}")


if __name__ == "__main__":
    measure()
