"""The pattern helper every pass matches with: the one sole_consumer check and its near-miss reason."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from kvplan.surgery.graphutil import Rejected
from kvplan.surgery.pattern import Match, sole_consumer


def graph_with_fanout():
    x = gs.Variable("x", dtype=np.float32, shape=[2])
    t = gs.Variable("t", dtype=np.float32, shape=[2])
    a, b = gs.Variable("a", dtype=np.float32, shape=[2]), gs.Variable("b", dtype=np.float32, shape=[2])
    nodes = [gs.Node("Neg", "neg", inputs=[x], outputs=[t]), gs.Node("Relu", "relu", inputs=[t], outputs=[a]),
             gs.Node("Abs", "abs", inputs=[t], outputs=[b])]
    return gs.Graph(nodes=nodes, inputs=[x], outputs=[a, b]), t


def test_sole_consumer_names_every_reader():
    graph, t = graph_with_fanout()
    with pytest.raises(Rejected, match=r"the negated value \(t\) is used outside the pattern "
                                       r"\(read by 2 nodes: Relu relu, Abs abs\)") as e:
        sole_consumer(graph, t, [graph.nodes[0]], "the negated value", "the pattern")
    assert e.value.nodes == ["neg"]


def test_a_graph_output_is_never_a_sole_consumer():
    graph, _ = graph_with_fanout()
    with pytest.raises(Rejected, match=r"\(a\) is used outside the pattern \(it is a graph output\)"):
        sole_consumer(graph, graph.outputs[0], [], "the result", "the pattern")


def test_match_records_walked_nodes_in_graph_order():
    graph, t = graph_with_fanout()
    m = Match(graph, "the pattern", [graph.nodes[1]])
    m.before(graph.nodes[0])
    m.after(graph.nodes[2])
    with pytest.raises(Rejected) as e:
        m.reject("no")
    assert e.value.nodes == ["neg", "relu", "abs"]
