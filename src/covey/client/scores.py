"""Scoring rows through a coordinator: plain, proved or encrypted (``POST /v1/scores``).

Encrypted scoring keeps the secret key here: :func:`score_encrypted` registers the client's
public evaluation keys once (by SHA-256), encrypts the row, sends only the ciphertext and
decrypts the answer. Neither the coordinator nor the miner sees the features or the score.
Proved answers can be checked offline with the model owner's verifying key
(:func:`covey.scoring.proofs.verify_answer`, ``covey proofs verify``).
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from covey.client.chat import ChatError, _error_of

DEFAULT_KEYS = Path.home() / ".covey" / "he-keys.bin"
"""Where ``covey score --encrypted`` keeps this client's CKKS keys (secret: mode 0600)."""


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _answer(response: httpx.Response) -> dict[str, Any]:
    try:
        payload = response.json()
    except ValueError:
        raise ChatError(f"unexpected answer ({response.status_code}): "
                        f"{response.text[:200]}", None, response.status_code) from None
    if response.status_code >= 400:
        raise _error_of(payload, response.status_code)
    return payload  # type: ignore[no-any-return]


def score(base_url: str, model: str, inputs: Sequence[Sequence[float]], *,
          api_key: str | None = None, proof: bool = False, timeout: float = 300.0
          ) -> dict[str, Any]:
    """The ``POST /v1/scores`` answer for ``inputs`` (rows of the model's features, in the
    order ``GET /v1/models/{model}`` lists them): ``data[i]["score"]`` per row, with
    ``"proof"`` and ``"input"`` per row when ``proof`` is set.

    Raises:
        ChatError: an error response (its ``code`` and ``status``).
        httpx.HTTPError: the coordinator cannot be reached.
    """
    body = {"model": model, "inputs": [list(map(float, row)) for row in inputs],
            "proof": proof}
    with httpx.Client(base_url=base_url, timeout=timeout) as http:
        return _answer(http.post("/v1/scores", json=body, headers=_headers(api_key)))


def register_keys(http: httpx.Client, keys: Any, api_key: str | None) -> str:
    """Register ``keys`` (:class:`~covey.scoring.he.ClientKeys`) public part unless the
    coordinator has it already; their ``keys_sha256``.

    Raises:
        ChatError: the coordinator refused them.
    """
    sha256: str = keys.keys_sha256
    known = http.get(f"/v1/scores/keys/{sha256}", headers=_headers(api_key))
    if known.status_code == 200:
        return sha256
    if known.status_code != 404:
        _answer(known)
    answer = _answer(http.post("/v1/scores/keys", content=keys.public, headers={
        **_headers(api_key), "Content-Type": "application/octet-stream"}))
    return str(answer["keys_sha256"])


def score_encrypted(base_url: str, model: str, row: Sequence[float], keys: Any, *,
                    api_key: str | None = None, timeout: float = 300.0
                    ) -> tuple[float, dict[str, Any]]:
    """(the decrypted score, the raw answer) of one row scored on ciphertext, under
    ``keys`` (:class:`~covey.scoring.he.ClientKeys`; registered first if need be). The row
    is checked here against the model's card first (its features, and each one's range:
    outside it the logit could pass what the ciphertext holds, and nobody else can look).

    Raises:
        covey.scoring.model.InputError: the row does not fit the model's card.
        ChatError: an error response.
        covey.scoring.he.HEError: the row does not fit the keys' parameters, or the answer
            does not decrypt.
        httpx.HTTPError: the coordinator cannot be reached.
    """
    from covey.protocol import ScoringCard
    from covey.scoring.model import check_rows

    with httpx.Client(base_url=base_url, timeout=timeout) as http:
        card = _answer(http.get(f"/v1/models/{model}", headers=_headers(api_key))).get("card")
        if card is None:
            raise ChatError(f"'{model}' is not a scoring model", "invalid_value", 400)
        check_rows(ScoringCard.model_validate(card), [list(row)], encrypted=True)
        ciphertext = base64.b64encode(keys.encrypt([float(x) for x in row])).decode()
        sha256 = register_keys(http, keys, api_key)
        answer = _answer(http.post("/v1/scores", headers=_headers(api_key), json={
            "model": model, "encrypted": {"ciphertext": ciphertext, "keys_sha256": sha256}}))
    value = keys.decrypt(base64.b64decode(answer["data"][0]["encrypted"]))
    return value, answer


def load_or_create_keys(path: Path = DEFAULT_KEYS) -> Any:
    """This client's :class:`~covey.scoring.he.ClientKeys` from ``path``, made (and saved,
    mode 0600) on first use: the same keys serve every request, so they are registered
    once."""
    from covey.scoring.he import ClientKeys

    if path.is_file():
        return ClientKeys.load(path)
    keys = ClientKeys.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    keys.save(path)
    return keys


__all__ = ["ChatError", "DEFAULT_KEYS", "load_or_create_keys", "register_keys", "score",
           "score_encrypted"]
