"""Validation's ONNX Runtime sessions: the fp16 weights' float32 casts run per inference, one at a time."""
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from kvplan.runtime.ort_session import session

SIDE, LAYERS = 1024, 16          # 2 MiB of fp16 weight a MatMul: 64 MiB of float32 casts in all


def _chain(path: Path) -> Path:
    """x -> MatMul(W0) -> ... -> MatMul(W15): fp16 weights, which ONNX Runtime's CPU provider casts."""
    g = np.random.default_rng(0)
    inits, nodes, prev = [], [], "x"
    for i in range(LAYERS):
        w = (g.standard_normal((SIDE, SIDE)) / SIDE ** 0.5).astype(np.float16)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"]))
        prev = f"h{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, SIDE])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT16, [1, SIDE])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, path, save_as_external_data=True, location="chain.data")
    return path


PEAK = textwrap.dedent("""
    import sys, numpy as np
    from kvplan.runtime.ort_session import session
    def status(key):
        return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
    s = session(sys.argv[1])
    x = np.ones((1, %d), np.float16)
    s.run(None, {"x": x})
    with open("/proc/self/clear_refs", "w") as f:     # the peak from here on: the second run's
        f.write("5")
    before = status("VmRSS:")
    s.run(None, {"x": x})
    print(status("VmHWM:") - before)
""" % SIDE)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's resettable peak RSS")
def test_a_basic_level_session_holds_one_weight_cast_at_a_time(tmp_path):
    """The casts depend on nothing, so ONNX Runtime's default order runs them all first (every
    float32 copy alive at once); validation's sessions run each beside the MatMul it feeds."""
    path = _chain(tmp_path / "chain.onnx")
    grown = int(subprocess.run([sys.executable, "-c", PEAK, str(path)], capture_output=True, text=True,
                               check=True).stdout)
    all_casts = LAYERS * SIDE * SIDE * 4
    assert grown < all_casts / 4, f"a run grew the RSS by {grown >> 20} MiB; all the casts are {all_casts >> 20} MiB"


def test_the_order_changes_no_number(tmp_path):
    path = _chain(tmp_path / "chain.onnx")
    x = np.random.default_rng(1).standard_normal((1, SIDE)).astype(np.float16)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    in_default_order = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session(path).run(None, {"x": x})[0], in_default_order.run(None, {"x": x})[0])
