"""Scoring models: small tabular ONNX models that turn one row of numbers into one number.

Shared by the miner (which runs them), the client (which checks what it gets back) and the
coordinator (which verifies proofs before paying):

- :mod:`covey.scoring.model`: load a model folder (``model.onnx`` + ``card.json``), check
  input rows against its card, score rows with onnxruntime;
- :mod:`covey.scoring.bundled`: the bundled breast-cancer models, trained at first use from
  scikit-learn's offline copy of the data set;
- :mod:`covey.scoring.proofs`: zero-knowledge proofs (ezkl) that the committed model produced
  an output from an input, and their verification;
- :mod:`covey.scoring.he`: scoring CKKS-encrypted rows (TenSEAL).

The heavy libraries (onnxruntime, onnx, scikit-learn, skl2onnx, ezkl, TenSEAL; the ``score``
extra) are imported inside the functions that need them, so importing these modules is cheap.
"""
