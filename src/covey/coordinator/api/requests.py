"""Checking OpenAI requests and turning them into miner jobs: shared with the local privacy
proxy, so they live in :mod:`covey.protocol.requests`."""

from covey.protocol.requests import chat_job, completion_job, new_id, watermarked

__all__ = ["chat_job", "completion_job", "new_id", "watermarked"]
