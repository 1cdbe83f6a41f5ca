"""Covey: an open network for decentralized AI inference.

The package is split by role (see DESIGN.md): ``protocol`` (wire types, imports nothing of
ours), ``coordinator``, ``miner`` and ``client`` (each imports only ``protocol``), and ``cli``.
"""

__version__ = "0.1.0"
