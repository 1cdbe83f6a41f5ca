"""Opening sealed (end-to-end encrypted) jobs on the miner: the plain job a sealed one stands
for, and a validator's plain view of a sealed job's check (:mod:`covey.protocol.sealing`)."""

from __future__ import annotations

from nacl.public import PrivateKey

from covey.miner.backends.base import BackendError
from covey.protocol import Check, Generate
from covey.protocol.sealing import SealedContent, open_delta, open_job_with, open_key


def unsealed(job: Generate, content: SealedContent) -> Generate:
    """The plain job a sealed ``job`` stands for: its public settings (model, weights pin,
    sampling settings, prompt bound) and the content from inside its box.

    Raises:
        BackendError: ``invalid_value`` when the box's resume point does not hold the
            ``job.resume_tokens`` tokens the coordinator delivered.
    """
    resumed = len(content.resume.token_ids) if content.resume else 0
    if resumed != job.resume_tokens:
        raise BackendError("invalid_value", f"The sealed job resumes after {resumed} tokens, "
                           f"but {job.resume_tokens} were delivered.", "resume")
    params = job.params.model_copy(update={"stop": content.stop})
    return job.model_copy(update={
        "sealed": None, "messages": content.messages, "prompt": content.prompt,
        "prompt_ids": content.prompt_ids, "stop_ids": content.stop_ids,
        "resume": content.resume, "params": params})


def unsealed_check(box: PrivateKey, check: Check) -> Check:
    """A validator's plain view of a sealed job's check: the job and the miner's answer,
    opened from the coordinator's copies with the session key the client sealed to us.

    Raises:
        SealingError: the key does not open the job or a delta (the client's fault).
    """
    key = open_key(box, check.sealed_key or "")
    job = unsealed(check.job, open_job_with(key, check.job.sealed or ""))
    texts: list[str] = []
    ids: list[int] = []
    for sealed in check.stream:
        text, token_ids = open_delta(key, sealed)
        texts.append(text)
        ids.extend(token_ids)
    return check.model_copy(update={"job": job, "token_ids": tuple(ids), "text": "".join(texts),
                                    "sealed_key": None, "stream": ()})
