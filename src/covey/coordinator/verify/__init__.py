"""Verification: trial tasks, sampled re-checks by validators, judging and penalties."""
