"""Scoring a logistic regression on an encrypted row: CKKS, with TenSEAL (Microsoft SEAL inside).

The client makes the keys (:class:`ClientKeys`), registers the public evaluation keys once
(:attr:`ClientKeys.public`, ~3.7 MB, named by their SHA-256) and sends each row encrypted
(:meth:`ClientKeys.encrypt`). The miner keeps the registered keys loaded (:class:`EvalKeys`)
and computes ``Enc(z) = Enc(x)·w + b`` with the model's plaintext weights
(:func:`score_encrypted`): one plaintext product, five rotations that sum 32 slots, one
plaintext addition, ~13 ms. The client decrypts ``z`` and applies the sigmoid itself
(:meth:`ClientKeys.decrypt`). Neither the coordinator nor the miner can read the row or the
score. Encryption gives privacy, not integrity: a miner can return any affine function of
the row; re-checking (the computation is deterministic, :data:`DETERMINISTIC`) and proofs
answer that.

Why the sigmoid is applied after decryption, not as a polynomial under encryption. It is a
public, invertible function, so ``z`` tells the client nothing that ``sigmoid(z)`` does not,
and applying it exactly costs nothing. A polynomial costs precision, levels and key size
(measured here; the bundled model's logits span -16.8 … 50.9 on the 569 rows of its data set):

==========================  ==========================================  ==================
sigmoid on ciphertext       max error vs sigmoid (minimax on interval)  cost
==========================  ==========================================  ==================
degree 1, in the weights    0.30 on [-16, 16]; 0.42 on [-64, 64]        none (1 level)
degree 3                    0.18 on [-16, 16]; 0.35 on [-64, 64]        3 levels: N=8192
                                                                        [60,30,30,30,60],
                                                                        relin keys, 11.7 MB
                                                                        keys, 127 ms work
client, after decryption    0 (only CKKS noise: ERROR_BOUND)            none
==========================  ==========================================  ==================

An odd polynomial also diverges outside its interval, so a logit beyond it would give a
wrong probability, not a clipped one; here there is no interval: any logit is exact.

Ciphertexts travel in a 38-byte envelope: ``b"CVHE"``, version 1, kind (1 a row, 2 a score),
the SHA-256 of the evaluation keys (32 raw bytes), then TenSEAL's serialized CKKS vector.
The digest lets the miner refuse a row made under other keys (TenSEAL cannot tell: it would
compute garbage) and the client refuse a score made for other keys.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import struct
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

POLY_MODULUS_DEGREE = 8192
"""CKKS ring dimension N: 4096 slots. N=4096 (109 bits of modulus at 128-bit security) only
allows a 30-bit scale, whose logit error (~4e-3, measured) is 20 000 times ours."""
COEFF_MOD_BIT_SIZES = (60, 45, 60)
"""Coefficient moduli (bits): q0 (the score's level), q1 (consumed by rescaling the
plaintext product), the special prime of key switching. 165 bits: at most 218 are allowed
at N=8192 for 128-bit classical security by the HomomorphicEncryption.org Security
Standard (Albrecht et al., November 2018, the table for a ternary secret), which SEAL enforces
(``CoeffModulus::MaxBitCount``, ``sec_level_type::tc128``). Three primes are the fewest for
one multiplication: key and ciphertext sizes grow with their number."""
SCALE_BITS = 45
"""log2 of the CKKS scale. Values up to 2**(59 - 45) = 16384 fit at the last level: every
|w_i·x_i|, every partial sum of them and |z| must stay under it (the bundled model: 101).
At 2**40 the rotations add a per-key offset of up to 6.6e-6 to the logit; at 2**45, 2.1e-7
(measured, 30 keys)."""
SCALE = 2.0**SCALE_BITS
MAX_ABS_VALUE = 2.0 ** (59 - SCALE_BITS)
"""Largest |value| a slot holds at the last level (see :data:`SCALE_BITS`): a row whose
products or logit pass it decrypts to garbage, so a model scores ciphertext only for rows
inside its card's ranges, where Σ|w_i|·max|x_i| + |b| stays below it."""
ROTATION_STEPS = (1, 2, 4, 8, 16)
"""The Galois keys made: the steps that sum 32 slots (5 keys, ~3.7 MB; TenSEAL's default,
every power of two both ways, is 25 keys, ~35 MB)."""
MAX_FEATURES = 2 * ROTATION_STEPS[-1]
"""The longest row these keys can sum."""
MAX_ABS_FEATURE = 2.0**40
"""Largest |feature| accepted (the row's level holds |x|·2**45 < 2**104, with margin)."""
MAX_WEIGHT_L1 = 10_000.0
"""Largest sum of |w_i| + |b| a model may have to score ciphertext with the stated bound
(the bundled model: 710; with its weights scaled up to 9 200 the logit error measured
grew from 7e-8 to 1.2e-7)."""
ERROR_BOUND = 1e-5
"""Largest |encrypted score - sigmoid(w·x + b)| (probability). Measured: ≤ 5.1e-8 (logit
error ≤ 2.1e-7, 30 keys × 10 rows, and all 569 rows with one key); onnxruntime's float32
score of the bundled model differs from it by ≤ 1.5e-6, so the bound also covers the plain
score."""
DETERMINISTIC = True
"""Scoring the same ciphertext with the same keys and weights gives the same bytes
(measured: across processes and thread counts), so a validator can recompute an encrypted
answer and compare (:func:`same_result`). Holds for one TenSEAL/SEAL build: encoding the
weights uses floating-point FFTs and the output is zstd-compressed."""
DECIMALS = 6
"""Decimals of the score :meth:`ClientKeys.decrypt` returns. A full-precision CKKS decryption,
published, tells whoever holds its ciphertext (the miner) about the secret key (Li and
Micciancio, 2021); at 1e-6 the rounding step is 20 times the noise (5e-8), well within
:data:`ERROR_BOUND`."""
MAX_KEYS_BYTES = 8 * 2**20
"""Largest evaluation-key bytes accepted (ours: ~3.7 MB)."""
MAX_CIPHERTEXT_BYTES = 2**20
"""Largest ciphertext accepted (a row: ~250 KB; a score: ~135 KB)."""

_MAGIC, _VERSION, _ROW, _SCORE = b"CVHE", 1, 1, 2
_HEADER = struct.Struct(">4sBB32s")
_KEYFILE_MAGIC = b"CVHEKEY1"


class HEError(ValueError):
    """Encrypted input that cannot be used: malformed bytes, a ciphertext made with other
    parameters or other keys, a row of the wrong length, keys holding a secret key."""


def _tenseal() -> Any:
    try:
        import tenseal
    except ImportError as exc:
        raise ImportError("encrypted scoring needs TenSEAL: pip install 'covey[score]'") from exc
    return tenseal


@cache
def _reference() -> tuple[list[int], float]:
    """(SEAL's parms_id of our parameters, q1 / scale). The parms_id hashes N and the exact
    primes, so equal ids mean equal parameters."""
    ts = _tenseal()
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, POLY_MODULUS_DEGREE,
                     coeff_mod_bit_sizes=list(COEFF_MOD_BIT_SIZES),
                     encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC)
    seal = ctx.data.seal_context()
    # total_coeff_modulus() gives the low 64 bits of the product: q0 at the last level,
    # q0·q1 mod 2**64 at the first; q0 is odd, so q1 = that · q0⁻¹ (mod 2**64).
    q0 = seal.last_context_data().total_coeff_modulus()
    q1 = seal.first_context_data().total_coeff_modulus() * pow(q0, -1, 2**64) % 2**64
    return list(seal.key_parms_id()), q1 / SCALE


def _galois_elements() -> list[int]:
    """SEAL's Galois element for a left rotation by k slots: 3**k mod 2N."""
    return [pow(3, k, 2 * POLY_MODULUS_DEGREE) for k in ROTATION_STEPS]


def _check_params(ctx: Any, what: str) -> None:
    parms_id, _ = _reference()
    if list(ctx.data.seal_context().key_parms_id()) != parms_id or ctx.global_scale != SCALE:
        raise HEError(f"{what} made with other CKKS parameters; these take N="
                      f"{POLY_MODULUS_DEGREE}, moduli {list(COEFF_MOD_BIT_SIZES)} bits, "
                      f"scale 2^{SCALE_BITS}")


def _pack(kind: int, keys_sha256: str, payload: bytes) -> bytes:
    return _HEADER.pack(_MAGIC, _VERSION, kind, bytes.fromhex(keys_sha256)) + payload


def _unpack(data: bytes, kind: int, keys_sha256: str) -> bytes:
    """The TenSEAL payload of an envelope of ``kind`` under keys ``keys_sha256``."""
    what = "encrypted row" if kind == _ROW else "encrypted score"
    if not isinstance(data, bytes | bytearray) or len(data) > MAX_CIPHERTEXT_BYTES:
        raise HEError(f"{what}: not bytes of at most {MAX_CIPHERTEXT_BYTES}")
    if len(data) <= _HEADER.size:
        raise HEError(f"{what}: too short to be a ciphertext")
    magic, version, got, digest = _HEADER.unpack_from(data)
    if magic != _MAGIC or version != _VERSION:
        raise HEError(f"{what}: not a Covey CKKS ciphertext (version {_VERSION})")
    if got != kind:
        raise HEError(f"{what}: holds {'a row' if got == _ROW else 'a score'} instead")
    if not hmac.compare_digest(digest, bytes.fromhex(keys_sha256)):
        raise HEError(f"{what}: made with other keys (sha256 {digest.hex()[:12]}…, "
                      f"expected {keys_sha256[:12]}…)")
    return bytes(data[_HEADER.size:])


def _vector(ctx: Any, payload: bytes, what: str) -> Any:
    try:
        return _tenseal().ckks_vector_from(ctx, payload)
    except Exception as exc:  # untrusted bytes: SEAL and protobuf raise several types
        raise HEError(f"{what}: not a CKKS vector for these parameters ({exc})") from None


def _sigmoid(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


class ClientKeys:
    """The client's CKKS keys: the secret key (encrypts and decrypts; symmetric encryption,
    whose fresh noise is lower than public-key encryption's) and the evaluation keys it
    registers (:attr:`public`). Make with :meth:`generate` (~0.2 s) or :meth:`load`."""

    def __init__(self, context: Any, public: bytes) -> None:
        self._context = context
        self._public = public
        self._sha256 = hashlib.sha256(public).hexdigest()

    @classmethod
    def generate(cls) -> ClientKeys:
        """New keys with this module's parameters and only :data:`ROTATION_STEPS`' keys."""
        ts = _tenseal()
        ctx = ts.context(ts.SCHEME_TYPE.CKKS, POLY_MODULUS_DEGREE,
                         coeff_mod_bit_sizes=list(COEFF_MOD_BIT_SIZES),
                         encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC)
        ctx.global_scale = SCALE
        # TenSEAL's Python API only makes the full set (25 keys); SEAL's key generator, which
        # TenSEAL exposes, writes just ours into the context's own GaloisKeys object.
        ctx.generate_galois_keys()
        galois = ctx.data.galois_keys()
        ts._ts_cpp.KeyGenerator(ctx.data.seal_context(), ctx.data.secret_key()) \
            .create_galois_keys(_galois_elements(), galois)
        if ctx.data.galois_keys().size() != len(ROTATION_STEPS):
            raise RuntimeError("TenSEAL did not keep the chosen Galois keys")
        public = ctx.serialize(save_public_key=False, save_secret_key=False,
                               save_galois_keys=True, save_relin_keys=False)
        return cls(ctx, public)

    @property
    def public(self) -> bytes:
        """The evaluation keys to register (~3.7 MB): parameters and Galois keys, no secret
        key, no public encryption key."""
        return self._public

    @property
    def keys_sha256(self) -> str:
        """SHA-256 (hex) of :attr:`public`: the name the keys are registered under."""
        return self._sha256

    def save(self, path: Path | str) -> None:
        """Write the keys to ``path`` (mode 0600, replaced atomically): the secret context
        and :attr:`public` as registered (TenSEAL would regenerate other Galois keys)."""
        secret = self._context.serialize(save_public_key=False, save_secret_key=True,
                                         save_galois_keys=False, save_relin_keys=False)
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(_KEYFILE_MAGIC + struct.pack(">Q", len(self._public)))
            fh.write(self._public)
            fh.write(secret)
        try:
            os.chmod(tmp, 0o600)  # an older file of that name kept its mode
            os.replace(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)  # never leave a secret key behind under another name
            raise

    @classmethod
    def load(cls, path: Path | str) -> ClientKeys:
        """Keys written by :meth:`save`.

        Raises:
            HEError: not such a file, or keys with other parameters.
            OSError: the file cannot be read.
        """
        data = Path(path).read_bytes()
        head = len(_KEYFILE_MAGIC) + 8
        if data[:len(_KEYFILE_MAGIC)] != _KEYFILE_MAGIC or len(data) < head:
            raise HEError(f"{path} is not a Covey CKKS key file")
        (n,) = struct.unpack_from(">Q", data, len(_KEYFILE_MAGIC))
        public, secret = data[head:head + n], data[head + n:]
        try:
            ctx = _tenseal().context_from(secret)
        except Exception as exc:  # SEAL and protobuf raise several types
            raise HEError(f"{path}: unreadable secret key ({exc})") from None
        if len(public) != n or not ctx.is_private():
            raise HEError(f"{path}: truncated or without its secret key")
        _check_params(ctx, str(path))
        return cls(ctx, public)

    def encrypt(self, row: Sequence[float], n_features: int | None = None) -> bytes:
        """One row of features (raw, in the model card's order) as a ciphertext (~250 KB).

        Raises:
            HEError: the row is empty, longer than :data:`MAX_FEATURES` or than
                ``n_features`` when given, or holds a value that is not a finite number of
                magnitude at most :data:`MAX_ABS_FEATURE`.
        """
        try:
            values = [float(v) for v in row]
        except (TypeError, ValueError):
            raise HEError("a feature is not a number") from None
        if n_features is not None and len(values) != n_features:
            raise HEError(f"the row holds {len(values)} features; the model takes {n_features}")
        if not 1 <= len(values) <= MAX_FEATURES:
            raise HEError(f"the row holds {len(values)} features; these keys take 1 to "
                          f"{MAX_FEATURES}")
        if not all(math.isfinite(v) and abs(v) <= MAX_ABS_FEATURE for v in values):
            raise HEError(f"a feature is not a finite number of magnitude ≤ {MAX_ABS_FEATURE:g}")
        vector = _tenseal().ckks_vector(self._context, values)
        return _pack(_ROW, self._sha256, vector.serialize())

    def decrypt(self, ciphertext: bytes) -> float:
        """The score: sigmoid of the logit that :func:`score_encrypted` computed, rounded to
        :data:`DECIMALS`, within :data:`ERROR_BOUND` of the plain score. Only slot 0 is read.

        Raises:
            HEError: not a score computed for these keys, or malformed.
        """
        payload = _unpack(ciphertext, _SCORE, self._sha256)
        vector = _vector(self._context, payload, "encrypted score")
        try:
            z = float(vector.decrypt()[0]) if vector.size() == 1 else math.nan
        except Exception as exc:  # SEAL raises several types
            raise HEError(f"encrypted score: cannot be decrypted ({exc})") from None
        if not math.isfinite(z):
            raise HEError("encrypted score: not one finite number")
        return round(_sigmoid(z), DECIMALS)


class EvalKeys:
    """Registered evaluation keys, loaded (~16 ms, ~4 MB of memory): what a miner keeps,
    by :attr:`sha256`, to score ciphertexts. Can neither encrypt nor decrypt.

    Safe to share between threads for :func:`score_encrypted` (SEAL's evaluation reads the
    keys only)."""

    __slots__ = ("_context", "sha256", "nbytes")

    def __init__(self, context: Any, sha256: str, nbytes: int) -> None:
        self._context = context
        self.sha256 = sha256
        self.nbytes = nbytes

    @classmethod
    def from_bytes(cls, public: bytes) -> EvalKeys:
        """Load :attr:`ClientKeys.public` as registered.

        Raises:
            HEError: not TenSEAL context bytes, more than :data:`MAX_KEYS_BYTES`, other
                parameters, a Galois key missing, or a secret key included (refused, so a
                client that registers its key file by mistake does not hand it over).
        """
        if not isinstance(public, bytes | bytearray) or len(public) > MAX_KEYS_BYTES:
            raise HEError(f"keys: not bytes of at most {MAX_KEYS_BYTES}")
        public = bytes(public)
        try:
            ctx = _tenseal().context_from(public)
        except Exception as exc:  # untrusted bytes: SEAL and protobuf raise several types
            raise HEError(f"keys: not TenSEAL evaluation keys ({exc})") from None
        if ctx.is_private():
            raise HEError("keys: they include the secret key; register ClientKeys.public")
        _check_params(ctx, "keys")
        galois = ctx.data.galois_keys() if ctx.has_galois_keys() else None
        if galois is None or not all(galois.has_key(e) for e in _galois_elements()):
            raise HEError(f"keys: the Galois keys for rotations {list(ROTATION_STEPS)} "
                          "are missing")
        return cls(ctx, hashlib.sha256(public).hexdigest(), len(public))


def check_model(weights: Sequence[float], bias: float) -> list[float]:
    """The weights as floats, if this model can score ciphertext within
    :data:`ERROR_BOUND`: 1 to :data:`MAX_FEATURES` finite weights, a finite bias, and
    sum |w_i| + |b| at most :data:`MAX_WEIGHT_L1`.

    Raises:
        ValueError: (not :class:`HEError`: the model, not the request, is at fault.)
    """
    w = [float(v) for v in weights]
    if not 1 <= len(w) <= MAX_FEATURES:
        raise ValueError(f"{len(w)} weights: encrypted scoring takes 1 to {MAX_FEATURES}")
    if not all(math.isfinite(v) for v in [*w, bias]):
        raise ValueError("a weight or the bias is not finite")
    if sum(map(abs, w)) + abs(bias) > MAX_WEIGHT_L1:
        raise ValueError(f"sum |w| + |b| exceeds {MAX_WEIGHT_L1:g}")
    return w


def score_encrypted(keys: EvalKeys, ciphertext: bytes, weights: Sequence[float],
                    bias: float) -> bytes:
    """``Enc(w·x + b)`` for the encrypted row ``ciphertext`` (from :meth:`ClientKeys.encrypt`
    under ``keys``): the logit in slot 0 (the other slots hold partial sums of the same
    products), ~135 KB, for :meth:`ClientKeys.decrypt`. Deterministic (:data:`DETERMINISTIC`).
    CPU-bound (~13 ms) and holding the GIL: run it in a worker thread.

    ``weights``: one per feature, standardization folded in (raw features).

    Raises:
        HEError: the ciphertext is malformed, made under other keys or parameters, not a
            fresh row, or holds a number of values other than ``len(weights)``.
        ValueError: the model cannot score ciphertext (:func:`check_model`).
    """
    w = check_model(weights, bias)
    vector = _vector(keys._context, _unpack(ciphertext, _ROW, keys.sha256), "encrypted row")
    if vector.size() != len(w):
        raise HEError(f"encrypted row: holds {vector.size()} values; the model takes {len(w)}")
    cts = vector.data.ciphertext()
    fresh = list(keys._context.data.seal_context().first_parms_id())
    if len(cts) != 1 or list(cts[0].parms_id()) != fresh or cts[0].scale != SCALE \
            or cts[0].size() != 2:
        raise HEError("encrypted row: not a fresh ciphertext of these parameters")
    # TenSEAL labels a rescaled ciphertext with the global scale, but rescaling divided by the
    # prime q1, not by 2**45: a relative error of 1.3e-8 here (1.3e-7 at 2**40), undone by
    # scaling the weights by q1 / 2**45.
    _, q1_ratio = _reference()
    try:
        result = vector.dot([v * q1_ratio for v in w])
        result.add_(float(bias))
        out = result.serialize()
    except Exception as exc:  # SEAL refuses e.g. a transparent ciphertext
        raise HEError(f"encrypted row: cannot be scored ({exc})") from None
    return _pack(_SCORE, keys.sha256, out)


def same_result(a: bytes, b: bytes) -> bool:
    """Whether two encrypted answers are the same computation's (byte equality, valid
    because scoring is :data:`DETERMINISTIC` on one TenSEAL build)."""
    return hmac.compare_digest(bytes(a), bytes(b))
