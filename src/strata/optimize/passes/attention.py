"""Self-attention as PyTorch's SDPA exports it, rewritten into onnxruntime's fused `Attention` operator.

onnxruntime's transformer optimizer knows the attention subgraphs of older exporters; the one `transformers` now
exports (scaled_dot_product_attention: Q and K each scaled by sqrt(scale), the padding mask as Where(mask, 0,
-inf) added to the scores, IsNaN/Where after the Softmax) it does not recognise, and dynamic quantization can
then only quantize the projections one MatMul at a time. This module finds, per Softmax:

    q, k, v = x @ Wq + bq, x @ Wk + bk, x @ Wv + bv       (MatMul + Add, weights and biases initializers)
    scores  = (Transpose(Reshape(q)) [* c1]) @ (Transpose(Reshape(k)) [* c2]) [* c3 | / c3] + mask_bias
    context = [Where(IsNaN(p), 0, p) of] Softmax(scores) @ Transpose(Reshape(v))
    out     = Reshape/Transpose chain of context, consumed as [batch, seq, hidden]

and replaces it with Attention(x, [Wq Wk Wv], [bq bk bv], mask) where mask is the one graph input the mask
bias derives from, as int32 (a raw [batch, seq] padding mask, the form Attention accepts). A match is a guess
about what the subgraph computes: the caller must check the rewritten graph against the original on real
inputs (with padding) before using it, as `FusedDynamicQuantizationPass` does.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

MASK_INT32 = "strata_attention_mask_int32"


class _Graph:
    def __init__(self, model: Any) -> None:
        from onnx import numpy_helper

        self.model = model
        self.graph = model.graph
        self.inits = {init.name: init for init in self.graph.initializer}
        self.producer = {out: node for node in self.graph.node for out in node.output}
        self.consumers: dict[str, list[Any]] = {}
        for node in self.graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self._array = numpy_helper.to_array

    def const(self, name: str) -> np.ndarray | None:
        if name in self.inits:
            return np.asarray(self._array(self.inits[name]))
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            return np.asarray(self._array(node.attribute[0].t))
        return None

    def parent(self, name: str, op: str) -> Any | None:
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op else None

    def perm(self, node: Any) -> list[int]:
        return next((list(a.ints) for a in node.attribute if a.name == "perm"), [])

    def graph_inputs_of(self, name: str) -> set[str]:
        """The graph inputs whose values (not only their shapes) `name` is computed from."""
        inputs = {i.name for i in self.graph.input}
        seen, todo, found = set(), [name], set()
        while todo:
            tensor = todo.pop()
            if tensor in seen:
                continue
            seen.add(tensor)
            if tensor in inputs:
                found.add(tensor)
            node = self.producer.get(tensor)
            if node is not None and node.op_type not in ("Shape", "Size"):  # sizes are not values
                todo.extend(node.input)
        return found


def _scaled(g: _Graph, name: str) -> tuple[str, float]:
    """`name` without a Mul/Div by a scalar constant in front of it, and that factor."""
    node = g.producer.get(name)
    if node is not None and node.op_type in ("Mul", "Div"):
        for i, other in ((1, 0), (0, 1)):
            value = g.const(node.input[i])
            if value is not None and value.size == 1 and (node.op_type == "Mul" or i == 1):
                factor = float(value.reshape(()))
                return node.input[other], factor if node.op_type == "Mul" else 1.0 / factor
    return name, 1.0


def _projection(g: _Graph, name: str, perm: list[int]) -> tuple[str, np.ndarray, np.ndarray, int] | None:
    """(x, W, b, head_dim) of Transpose(perm)(Reshape(x @ W + b, [.., .., heads, head_dim]))."""
    transpose = g.parent(name, "Transpose")
    if transpose is None or g.perm(transpose) != perm:
        return None
    reshape = g.parent(transpose.input[0], "Reshape")
    add = g.parent(reshape.input[0], "Add") if reshape is not None else None
    if reshape is None or add is None:
        return None
    shape = g.const(reshape.input[1])
    if shape is None:
        concat = g.parent(reshape.input[1], "Concat")
        last = g.const(concat.input[-1]) if concat is not None else None
        head_dim = int(last.reshape(-1)[-1]) if last is not None and last.size >= 1 else 0
    else:
        head_dim = int(shape.reshape(-1)[-1])
    for m_i, b_i in ((0, 1), (1, 0)):
        matmul = g.parent(add.input[m_i], "MatMul")
        bias = g.const(add.input[b_i])
        if matmul is not None and bias is not None:
            weight = g.const(matmul.input[1])
            if weight is not None and weight.ndim == 2 and bias.shape == (weight.shape[1],) and head_dim > 0:
                return matmul.input[0], weight, bias, head_dim
    return None


def _output(g: _Graph, context: str) -> str | None:
    """The last tensor of the Reshape/Transpose chain after `context` (each link with one consumer besides the
    Shape nodes that compute the next Reshape's target)."""
    name, steps = context, 0
    while True:
        users = [u for u in g.consumers.get(name, []) if u.op_type != "Shape"]
        if len(users) != 1 or users[0].op_type not in ("Reshape", "Transpose"):
            return name if steps else None
        name, steps = users[0].output[0], steps + 1


def _match(g: _Graph, softmax: Any) -> dict[str, Any] | None:
    add = g.parent(softmax.input[0], "Add")
    if add is None:
        return None
    for s_i, m_i in ((0, 1), (1, 0)):
        scores, outer = _scaled(g, add.input[s_i])
        matmul = g.parent(scores, "MatMul")
        masks = g.graph_inputs_of(add.input[m_i])
        if matmul is None or len(masks) != 1 or g.producer.get(add.input[m_i]) is None:
            continue
        q_name, c1 = _scaled(g, matmul.input[0])
        k_name, c2 = _scaled(g, matmul.input[1])
        q = _projection(g, q_name, [0, 2, 1, 3])
        k = _projection(g, k_name, [0, 2, 3, 1])
        probs = softmax.output[0]
        users = g.consumers.get(probs, [])
        if len(users) == 2 and {u.op_type for u in users} == {"IsNaN", "Where"}:
            probs = next(u for u in users if u.op_type == "Where").output[0]
        context = [u for u in g.consumers.get(probs, []) if u.op_type == "MatMul" and u.input[0] == probs]
        if q is None or k is None or len(context) != 1:
            continue
        v = _projection(g, context[0].input[1], [0, 2, 1, 3])
        out = _output(g, context[0].output[0])
        if v is None or out is None or not (q[0] == k[0] == v[0]) or not (q[3] == k[3] == v[3]):
            continue
        hidden = q[1].shape[1]
        if hidden % q[3] or not (q[1].shape == k[1].shape == v[1].shape):
            continue
        return {
            "x": q[0],
            "weight": np.concatenate([q[1], k[1], v[1]], axis=1),
            "bias": np.concatenate([q[2], k[2], v[2]]),
            "heads": hidden // q[3],
            "scale": outer * c1 * c2,
            "mask": masks.pop(),
            "output": out,
        }
    return None


def fuse_sdpa_attention(model: Any) -> int:
    """Rewrite every SDPA attention block of `model` (an onnx ModelProto, changed in place) into `Attention`;
    returns how many were rewritten. The nodes the blocks no longer need are pruned."""
    from onnx import TensorProto, helper, numpy_helper

    g = _Graph(model)
    matches = [m for m in (_match(g, n) for n in list(g.graph.node) if n.op_type == "Softmax") if m is not None]
    matches = [m for m in matches if m["mask"] == matches[0]["mask"]] if matches else []  # one padding mask
    if not matches:
        return 0
    new_nodes = [helper.make_node("Cast", [matches[0]["mask"]], [MASK_INT32], to=TensorProto.INT32)]
    for i, match in enumerate(matches):
        weight, bias = f"strata_attention_{i}_qkv_weight", f"strata_attention_{i}_qkv_bias"
        g.graph.initializer.extend(
            [
                numpy_helper.from_array(match["weight"].astype(np.float32), weight),
                numpy_helper.from_array(match["bias"].astype(np.float32), bias),
            ]
        )
        new_nodes.append(
            helper.make_node(
                "Attention",
                [match["x"], weight, bias, MASK_INT32],
                [match["output"]],
                name=f"strata_attention_{i}",
                domain="com.microsoft",
                num_heads=int(match["heads"]),
                scale=float(match["scale"]),
            )
        )
    replaced = {m["output"] for m in matches}
    kept = [n for n in g.graph.node if not set(n.output) & replaced]
    del g.graph.node[:]
    g.graph.node.extend(
        _ordered(
            kept + new_nodes,
            {i.name for i in g.graph.input} | set(g.inits) | {init.name for init in g.graph.initializer},
        )
    )
    _prune(model)
    if not any(op.domain == "com.microsoft" for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return len(matches)


def _ordered(nodes: list[Any], available: set[str]) -> list[Any]:
    """`nodes` in an order where every input is made before it is used."""
    done, pending = set(available) | {""}, list(nodes)
    ordered: list[Any] = []
    while pending:
        ready = [n for n in pending if all(i in done for i in n.input)]
        if not ready:
            return ordered + pending  # a cycle or an outer-scope input: leave the rest as they were
        for node in ready:
            ordered.append(node)
            done.update(node.output)
        taken = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in taken]
    return ordered


def _prune(model: Any) -> None:
    """Drop nodes and initializers that no graph output depends on."""
    graph = model.graph
    needed: set[str] = {o.name for o in graph.output}
    keep = []
    for node in reversed(list(graph.node)):
        if set(node.output) & needed:
            keep.append(node)
            needed.update(_inputs(node))
    del graph.node[:]
    graph.node.extend(reversed(keep))
    unused = [init for init in graph.initializer if init.name not in needed]
    for init in unused:
        graph.initializer.remove(init)


def _inputs(node: Any) -> Iterable[str]:
    yield from node.input
    for attribute in node.attribute:  # subgraphs (If, Loop) read outer names too
        for sub in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
            for inner in sub.node:
                yield from _inputs(inner)
