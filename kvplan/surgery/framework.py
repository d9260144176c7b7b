"""The pass contract: find candidates, check every assumption, rewrite, report.

A pass never edits the graph while checking: ``match`` either raises ``Rejected``
(reported as a near miss, graph untouched), returns None (not a candidate at all),
or returns a ``rewrite`` callable that performs the edit. Only after every check
of that candidate has passed is the callable run.
"""
from __future__ import annotations

from typing import Callable, Iterable

from kvplan.lazy import lazy_import
from kvplan.surgery.graphutil import Rejected
from kvplan.surgery.report import NearMiss, PassReport

gs = lazy_import("onnx_graphsurgeon")

Rewrite = Callable[[], None]


class Pass:
    name: str = ""
    summary: str = ""

    def candidates(self, graph: gs.Graph) -> Iterable[gs.Node]:
        raise NotImplementedError

    def match(self, graph: gs.Graph, anchor: gs.Node) -> Rewrite | None:
        raise NotImplementedError

    def reset(self) -> None:
        """Forget what was kept about the last graph (a pass sharing nodes between matches keeps some)."""

    def apply(self, graph: gs.Graph) -> PassReport:
        self.reset()
        try:
            return self._apply(graph)
        finally:
            self.reset()

    def _apply(self, graph: gs.Graph) -> PassReport:
        report = PassReport()
        # A snapshot: rewrites append nodes and detach the ones they replace.
        for anchor in list(self.candidates(graph)):
            if not anchor.outputs:
                continue  # detached by an earlier rewrite of this pass
            try:
                rewrite = self.match(graph, anchor)
            except Rejected as r:
                report.near_misses.append(NearMiss(r.nodes, r.reason))
                continue
            if rewrite is not None:
                rewrite()
                report.fused += 1
        graph.cleanup().toposort()
        return report
