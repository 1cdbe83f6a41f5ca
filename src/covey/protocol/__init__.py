"""Wire types shared by coordinator, miner and client.

This package imports only pydantic, PyNaCl and the standard library, never another part of
Covey, so every role shares one definition of each message.
"""

from covey.protocol.frames import (
    PROTOCOL_VERSION,
    Cancel,
    Challenge,
    Check,
    CheckReport,
    Delta,
    Done,
    Frame,
    Hardware,
    Heartbeat,
    Hello,
    Job,
    JobError,
    ModelOffer,
    Progress,
    Resume,
    SamplingParams,
    Started,
    Tokenize,
    Tokens,
    Welcome,
    decode_frame,
    encode_frame,
)
from covey.protocol.signing import (
    hello_digest,
    sign_action,
    sign_hello,
    verify_action,
    verify_hello,
)

__all__ = [
    "PROTOCOL_VERSION",
    "Cancel",
    "Challenge",
    "Check",
    "CheckReport",
    "Delta",
    "Done",
    "Frame",
    "Hardware",
    "Heartbeat",
    "Hello",
    "Job",
    "JobError",
    "ModelOffer",
    "Progress",
    "Resume",
    "SamplingParams",
    "Started",
    "Tokenize",
    "Tokens",
    "Welcome",
    "decode_frame",
    "encode_frame",
    "hello_digest",
    "sign_action",
    "sign_hello",
    "verify_action",
    "verify_hello",
]
