"""Wire frames and hello signatures."""

import pytest
from nacl.signing import SigningKey
from pydantic import ValidationError

from covey.protocol import (
    Delta,
    Hardware,
    Hello,
    ModelOffer,
    decode_frame,
    encode_frame,
    sign_hello,
    verify_hello,
)

NONCE = "ab" * 32


def _hello_body(key: SigningKey) -> dict:
    body = Hello(
        public_key=key.verify_key.encode().hex(),
        nonce=NONCE,
        hardware=Hardware(cpu_count=2, ram_bytes=1 << 30),
        models=(ModelOffer(name="m", sha256="0" * 64, context_length=512, backend="x"),),
        slots=1,
        version="0",
        signature="0" * 128,
    ).model_dump(mode="json")
    body["signature"] = sign_hello(key, body)
    return body


def test_frames_round_trip():
    d = Delta(job_id="j", text="hé🙂", token_ids=(1, 2))
    assert decode_frame(encode_frame(d)) == d


def test_unknown_type_and_extra_fields_are_refused():
    with pytest.raises(ValidationError):
        decode_frame('{"type": "nope"}')
    with pytest.raises(ValidationError):
        decode_frame('{"type": "cancel", "job_id": "j", "extra": 1}')
    with pytest.raises(ValidationError):
        decode_frame(b"\xff garbage")


def test_hello_signature_binds_every_field():
    key = SigningKey.generate()
    body = _hello_body(key)
    assert verify_hello(body)
    assert not verify_hello({**body, "slots": 64})
    assert not verify_hello({**body, "nonce": "cd" * 32})
    other = SigningKey.generate()
    assert not verify_hello({**body, "public_key": other.verify_key.encode().hex()})
    assert not verify_hello({**body, "signature": "00" * 64})
