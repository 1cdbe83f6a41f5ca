"""TEST ONLY: a cheating shard miner, to prove that re-checks of activations catch it.

Enabled, like :mod:`covey.miner.backends.adversary`, solely by ``COVEY_TEST_ADVERSARY``:

- ``perturb-activations[:SCALE]`` adds Gaussian noise of SCALE (default 0.05) times each
  position's own standard deviation to the hidden states a shard sends on (a miner saving
  work by skipping blocks, or steering the answer);
- ``wrong-tokens`` makes a last shard send the token after the one it sampled (by id).
"""

from __future__ import annotations

from covey.miner.backends.base import ShardBackendBase
from covey.protocol.shard import Forward, Forwarded, tensor_digest


class AdversaryShard(ShardBackendBase):
    """Wraps an honest shard backend and perturbs the hidden states it returns."""

    def __init__(self, inner: ShardBackendBase, behaviour: str, argument: str) -> None:
        self.inner = inner
        self.offer = inner.offer
        self.slots = inner.slots
        self.behaviour = behaviour
        self.scale = float(argument) if argument else 0.05

    async def forward(self, task: Forward) -> Forwarded:
        reply = await self.inner.forward(task)
        if self.behaviour == "wrong-tokens" and reply.token_id is not None \
                and not reply.end_of_text:
            n_vocab = getattr(self.inner, "n_vocab", reply.token_id + 2)
            bent = reply.model_copy(update={"token_id": (reply.token_id + 1) % n_vocab})
            return bent.model_copy(update={"output_sha256": tensor_digest(bent)})
        if self.behaviour != "perturb-activations" or reply.hidden is None or not reply.data:
            return reply
        import torch

        dtype = getattr(torch, reply.hidden.dtype)
        x = torch.frombuffer(bytearray(reply.data), dtype=dtype).reshape(reply.hidden.shape)
        x = x.float()
        noise = torch.randn_like(x) * x.std(dim=-1, keepdim=True) * self.scale
        y = (x + noise).to(dtype).contiguous()
        data = (y.view(torch.int16) if dtype == torch.bfloat16 else y).numpy().tobytes()
        bent = reply.model_copy(update={"data": data})
        return bent.model_copy(update={"output_sha256": tensor_digest(bent)})

    def drop(self, session: str) -> None:
        self.inner.drop(session)

    def close(self) -> None:
        self.inner.close()
