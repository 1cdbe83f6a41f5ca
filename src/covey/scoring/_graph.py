"""ONNX graph surgery for scoring models: keep one output, lower a linear classifier to
standard operators, split a final sigmoid off, read a linear model's weights.

Every function takes and returns ``onnx.ModelProto`` objects (``onnx`` is imported by the
caller; this module only reads their fields and builds new ones with ``onnx.helper``).
"""

from __future__ import annotations

from typing import Any

OUTPUT = "probability"
"""Name of a scoring model's one output: a float tensor of shape (batch, 1)."""
BATCH = "batch_size"
"""Name of the symbolic batch dimension (ezkl's default ``variables`` fix ``batch_size`` to
1 when it builds a circuit)."""
_DEFAULT_DOMAINS = ("", "ai.onnx")


def keep_output(model: Any, tensor: str, name: str | None = None) -> Any:
    """A copy of ``model`` that computes only ``tensor``, renamed :data:`OUTPUT` and shaped
    (batch, 1): nodes that do not lead to it (labels, ArgMax, ``ai.onnx.ml`` ops) are dropped,
    with the initializers only they used.

    ``name``: the graph's name (default: ``model``'s).

    Raises:
        ValueError: no node produces ``tensor``, or what is left is not a valid model.
    """
    import onnx

    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    if tensor not in producers:
        raise ValueError(f"no node produces {tensor!r}")
    needed: set[int] = set()
    stack = [tensor]
    while stack:
        node = producers.get(stack.pop())
        if node is None or id(node) in needed:
            continue
        needed.add(id(node))
        stack.extend(node.input)
    nodes = []
    for node in graph.node:
        if id(node) in needed:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.output[:] = [OUTPUT if o == tensor else o for o in copy.output]
            nodes.append(copy)
    used = {name for node in nodes for name in node.input}
    initializers = [init for init in graph.initializer if init.name in used]
    return _model_like(model, nodes, initializers, _batched_input(graph.input[0]), name=name)


def lower_linear_classifier(model: Any, name: str | None = None) -> Any:
    """The binary ``ai.onnx.ml`` LinearClassifier (LOGISTIC post-transform) of ``model``
    rewritten as MatMul → Add → Sigmoid, the probability of the second class as
    :data:`OUTPUT`: standard operators that onnxruntime and ezkl both run. ``name``: the
    graph's name (default: ``model``'s).

    Raises:
        ValueError: ``model`` holds no such classifier.
    """
    import numpy as np
    from onnx import helper, numpy_helper

    weights = linear_weights(model)
    if weights is None:
        raise ValueError("the model holds no binary logistic LinearClassifier")
    coef, bias = weights
    w = numpy_helper.from_array(np.asarray(coef, dtype=np.float32).reshape(-1, 1),
                                "coefficient")
    b = numpy_helper.from_array(np.asarray([bias], dtype=np.float32), "intercept")
    inp = _batched_input(model.graph.input[0])
    nodes = [helper.make_node("MatMul", [inp.name, "coefficient"], ["logit_product"]),
             helper.make_node("Add", ["logit_product", "intercept"], ["logit"]),
             helper.make_node("Sigmoid", ["logit"], [OUTPUT])]
    return _model_like(model, nodes, [w, b], inp, name=name)


def split_sigmoid(model: Any) -> tuple[Any, bool]:
    """``(graph, True)`` with the final Sigmoid removed (its input becomes the output) when
    ``model``'s one output is a Sigmoid's; ``(model, False)`` otherwise.

    Proofs prove the logit: a sigmoid in the circuit needs a lookup table spanning the
    logit's range at the output's fixed-point scale (2^20 here), far too large, while the
    sigmoid of a proved logit is a public function anyone applies exactly.
    """
    graph = model.graph
    if len(graph.output) != 1:
        return model, False
    last = [n for n in graph.node if graph.output[0].name in n.output]
    if len(last) != 1 or last[0].op_type != "Sigmoid":
        return model, False
    sigmoid = last[0]
    nodes = [n for n in graph.node if n is not sigmoid]
    out = _value_info(sigmoid.input[0], graph.output[0])
    return _model_like(model, nodes, list(graph.initializer), graph.input[0], out), True


def linear_weights(model: Any) -> tuple[list[float], float] | None:
    """``(w, b)`` such that the model's output is sigmoid(w·x + b), read from a binary
    LinearClassifier with a LOGISTIC post-transform, or from a graph that is exactly
    MatMul → Add → Sigmoid (Casts aside); None for any other model (an MLP)."""
    from onnx import helper, numpy_helper

    nodes = [n for n in model.graph.node if n.op_type != "Cast"]
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    ops = [n.op_type for n in nodes]
    if ops[:1] == ["LinearClassifier"]:
        attrs = {a.name: helper.get_attribute_value(a) for a in nodes[0].attribute}
        labels = attrs.get("classlabels_ints") or attrs.get("classlabels_strings") or []
        if len(labels) != 2 or attrs.get("post_transform") != b"LOGISTIC":
            return None
        coef = [float(x) for x in attrs["coefficients"]]
        intercepts = [float(x) for x in attrs.get("intercepts", [0.0])]
        rows = len(intercepts)
        n = len(coef) // rows
        # One row: the score of class 1; two rows (skl2onnx): class 0's then class 1's.
        return coef[(rows - 1) * n:], intercepts[-1]
    if ops == ["MatMul", "Add", "Sigmoid"]:
        matmul, add, _ = nodes
        w = inits.get(matmul.input[1])
        b = inits.get(add.input[1] if add.input[0] == matmul.output[0] else add.input[0])
        if w is None or b is None or w.ndim != 2 or w.shape[1] != 1 or b.size != 1:
            return None
        return [float(x) for x in w[:, 0]], float(b.reshape(-1)[0])
    return None


def _batched_input(inp: Any) -> Any:
    """A copy of graph input ``inp`` whose first dimension is the symbolic :data:`BATCH`."""
    import onnx

    copy = onnx.ValueInfoProto()
    copy.CopyFrom(inp)
    dim = copy.type.tensor_type.shape.dim[0]
    dim.ClearField("dim_value")
    dim.dim_param = BATCH
    return copy


def _value_info(name: str, like: Any) -> Any:
    import onnx

    copy = onnx.ValueInfoProto()
    copy.CopyFrom(like)
    copy.name = name
    return copy


def _model_like(model: Any, nodes: list[Any], initializers: list[Any], inp: Any,
                out: Any | None = None, name: str | None = None) -> Any:
    """A checked model of ``nodes`` with ``model``'s name, producer, IR version and standard
    opsets (``ai.onnx.ml`` dropped: nothing left uses it)."""
    import onnx
    from onnx import TensorProto, helper

    if out is None:
        out = helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, [BATCH, 1])
    graph = helper.make_graph(nodes, name or model.graph.name or "scoring", [inp], [out],
                              initializers)
    opsets = [o for o in model.opset_import if o.domain in _DEFAULT_DOMAINS]
    made = helper.make_model(graph, opset_imports=opsets, producer_name=model.producer_name,
                             producer_version=model.producer_version)
    made.ir_version = model.ir_version
    onnx.checker.check_model(made, full_check=True)
    return made
