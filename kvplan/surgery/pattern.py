"""A small pattern helper over onnx-graphsurgeon: what every pass's matcher is written with.

A matcher reads like a rule file: walk from the anchor to the nodes the pattern names,
check each assumption, and build the rewrite only once every check has passed. Every pass
file has the same three parts: ``match`` (the walk, one small check method per piece of the
pattern, each rejecting with its reason through ``Match``), a dataclass of what was matched,
and a rewrite that reads only that dataclass. ``Match`` carries what the checks need: the
nodes walked so far (a near miss names them, in graph order as far as the walk knows it),
the one ``sole_consumer`` check, and rejections that say which node and which input break
the pattern.
"""
from __future__ import annotations

from typing import NoReturn

import numpy as np

from kvplan.lazy import lazy_import
from kvplan.surgery.graphutil import Rejected, const_value, producer_op

gs = lazy_import("onnx_graphsurgeon")


class Match:
    """The state of one candidate's match: its graph, the pattern's name and the nodes seen."""

    def __init__(self, graph: gs.Graph, pattern: str, nodes: list[gs.Node]):
        self.graph, self.pattern = graph, pattern
        self.nodes = nodes          # shared with the caller's list: one record of what was walked

    def before(self, node: gs.Node) -> gs.Node:
        """Record a node that comes before everything seen so far (walking up the graph)."""
        self.nodes.insert(0, node)
        return node

    def after(self, node: gs.Node) -> gs.Node:
        """Record a node that comes after everything seen so far (walking down the graph)."""
        self.nodes.append(node)
        return node

    def ahead_of(self, later: gs.Node, node: gs.Node) -> gs.Node:
        """Record a node that comes just before ``later`` (a side branch joining the walk there)."""
        self.nodes.insert(self.nodes.index(later), node)
        return node

    def reject(self, reason: str, *extra: gs.Node) -> NoReturn:
        raise Rejected(reason, self.nodes + list(extra))

    def sole(self, t: gs.Tensor, what: str) -> gs.Node:
        """The one node reading ``t``: a pattern may only delete a tensor nothing else reads."""
        return sole_consumer(self.graph, t, self.nodes, what, self.pattern)

    def up(self, t: gs.Tensor, *ops: str) -> gs.Node | None:
        """The producer of ``t`` if it is one of ``ops`` (recorded), else None."""
        node = producer_op(t, *ops)
        return self.before(node) if node is not None else None

    def constant(self, t: gs.Tensor, what: str) -> np.ndarray:
        value = const_value(t)
        if value is None:
            self.reject(f"{what} ({t.name}) is not a constant")
        return value


def sole_consumer(graph: gs.Graph, t: gs.Tensor, seen: list, what: str, pattern: str) -> gs.Node:
    """The one node reading ``t``; rejected (naming ``what`` and who else reads it) when
    anything outside ``pattern`` reads it or it is a graph output."""
    if t in graph.outputs:
        raise Rejected(f"{what} ({t.name}) is used outside {pattern} (it is a graph output)", seen)
    if len(t.outputs) != 1:
        readers = ", ".join(f"{n.op} {n.name}" for n in t.outputs[:3])
        raise Rejected(f"{what} ({t.name}) is used outside {pattern} (read by {len(t.outputs)} nodes: "
                       f"{readers})", seen)
    return t.outputs[0]
