"""Outside the rewritten regions, the output is the input.

Two things around a fold change a graph that no region asked to change, and each has made a model slower
or different in a runtime:

- **Inferred shapes.** The fold infers shapes to see ranks and broadcasts; written back as ``value_info``,
  they change what onnxruntime's optimizer fuses (a BERT that folds nothing ran 11-24% slower with 151
  inferred entries added). ``restore_declared`` gives every value the type and shape the input declared
  for it, and none to a value the input declared nothing for.
- **Dead-code removal.** onnx_ir's ``RemoveUnusedNodesPass`` also drops nodes and initializers that were
  unused in the input, trims optional outputs and empty inputs of live nodes, and walks subgraphs.
  ``Liveness`` removes only what a rewrite left without a reader.
"""

from __future__ import annotations

from collections.abc import Iterator

import onnx
import onnx_ir as ir

from branchfold.storage.onnx_weights import graphs
from branchfold.storage.onnx_wire import graph_protos


def declared_value_info(proto: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """Every type the model declares, by value name: graph inputs, outputs and ``value_info``, subgraphs too."""
    declared: dict[str, onnx.ValueInfoProto] = {}
    for graph in graph_protos(proto.graph):
        for info in (*graph.input, *graph.output, *graph.value_info):
            declared.setdefault(info.name, info)
    return declared


def _values(graph: ir.Graph) -> Iterator[ir.Value]:
    yield from graph.inputs
    yield from graph.initializers.values()
    for node in graph:
        yield from node.outputs
    yield from graph.outputs


def restore_declared(model: ir.Model, declared: dict[str, onnx.ValueInfoProto]) -> None:
    """Give each value of ``model`` exactly the type, shape, doc string and metadata the input declared for
    its name, and none where it declared nothing (so no ``value_info`` is written for it). A graph input or
    output the input did not declare (none in a valid model) keeps what it has."""
    for graph in graphs(model.graph):
        io = {*graph.inputs, *graph.outputs}
        for value in _values(graph):
            info = declared.get(value.name or "")
            if info is None and value in io:
                continue
            value.type = None
            value.shape = None
            if info is not None:
                ir.serde.deserialize_value_info_proto(info, value)


class Liveness:
    """What a graph computed for its outputs before a rewrite, so that afterwards only the nodes and
    initializers the rewrite left without a reader are removed, and nothing else is touched."""

    def __init__(self, graph: ir.Graph) -> None:
        self.nodes = set(graph)
        self.live = live_nodes(graph)
        self.initializers = set(graph.initializers)
        self.used = {name for name, v in graph.initializers.items() if _read(v)}

    def sweep(self, graph: ir.Graph) -> int:
        """Remove the nodes that were live (or are new) and are dead now, then the initializers that were read
        (or are new) and are read no more. Returns how many were removed."""
        live = live_nodes(graph)
        dead = [n for n in graph if n not in live and (n in self.live or n not in self.nodes)]
        for node in reversed(dead):
            graph.remove(node, safe=True)
        orphans = [
            name
            for name, v in graph.initializers.items()
            if not _read(v) and (name in self.used or name not in self.initializers)
        ]
        for name in orphans:
            graph.initializers.pop(name)
        return len(dead) + len(orphans)


def _read(value: ir.Value) -> bool:
    return bool(value.uses()) or value.is_graph_input() or value.is_graph_output()


def live_nodes(graph: ir.Graph) -> set[ir.Node]:
    """The nodes of ``graph`` that a graph output depends on, or that a subgraph reads from (whose reader is
    taken as live: nested scopes are never swept). Order-independent: a rewrite appends its nodes unsorted."""
    own = set(graph)
    stack = [v.producer() for v in graph.outputs]
    for node in own:
        if any(use.node.graph is not graph for out in node.outputs for use in out.uses()):
            stack.append(node)
    live: set[ir.Node] = set()
    while stack:
        node = stack.pop()
        if node is None or node in live or node not in own:
            continue
        live.add(node)
        stack.extend(v.producer() for v in node.inputs if v is not None)
    return live
