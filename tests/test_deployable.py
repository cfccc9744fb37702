"""Rewrites write deployable files: the format the output's name asks for, every dynamic dimension
of the input kept, verification at two batch sizes, modes that follow the umask, archives that
carry their final name, and one parameter count.

Known answers come from outside gradcheck: the unfolded eager model (rebuilt from the same seed),
torch.export.load and onnx.load of the written files, onnxruntime runs at batch sizes the
verification did not choose (1 and 5), and parameter counts taken from the eager module's own
``named_parameters``.
"""

from __future__ import annotations

import json
import os
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from torch import nn
from torch.utils._sympy.numbers import int_oo

from gradcheck_cli.errors import UsageError
from gradcheck_cli.model.formats import ModelFormat, detect_format
from gradcheck_cli.options import WriteFormat
from gradcheck_cli.rewrite.output import WrittenFormat, written_format
from tests.conftest import one_line_error
from tests.test_fold_cli import ARCH, build_model

SHAPE = (3, 8, 8)  # per sample; the batch dimension is what varies


def _batch(size: int, seed: int = 5) -> torch.Tensor:
    return torch.randn(size, *SHAPE, generator=torch.Generator().manual_seed(seed))


def _export_onnx(model: nn.Module, path: Path, *, dynamic_axes: dict[str, dict[int, str]] | None) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (_batch(2),),
            str(path),
            dynamo=False,
            input_names=["x"],
            output_names=["y"],
            training=torch.onnx.TrainingMode.PRESERVE,
            do_constant_folding=False,
            dynamic_axes=dynamic_axes,
        )


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    model = build_model()
    paths = {
        "arch": tmp_path / "arch.py",
        "state_dict": tmp_path / "weights.pt",
        "dynamic_pt2": tmp_path / "dyn.pt2",
        "static_pt2": tmp_path / "static.pt2",
        "onnx": tmp_path / "model.onnx",
    }
    paths["arch"].write_text(ARCH)
    torch.save(model.state_dict(), paths["state_dict"])
    batch = torch.export.Dim("batch", min=1, max=64)
    torch.export.save(torch.export.export(model, (_batch(2),), dynamic_shapes=({0: batch},)), str(paths["dynamic_pt2"]))
    torch.export.save(torch.export.export(model, (_batch(2),)), str(paths["static_pt2"]))
    _export_onnx(model, paths["onnx"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    return paths


def _arch(files: dict[str, Path]) -> tuple[str, str]:
    return "--arch", f"{files['arch']}:build"


def _json(cli: Any, *args: Any) -> dict[str, Any]:
    code, stdout, stderr = cli(*args, "--format", "json")
    assert code == 0, stderr + stdout
    data: dict[str, Any] = json.loads(stdout)
    return data


def _user_input_shapes(program: Any) -> list[Any]:
    return [
        node.meta["val"].shape
        for node in program.graph.nodes
        if node.op == "placeholder" and node.name in program.graph_signature.user_inputs
    ]


def _graph_dims(path: Path) -> dict[str, list[Any]]:
    """Every graph input's and output's dims as onnx.load reads them: dim_param, size, or None."""
    model = onnx.load(str(path))
    return {
        value.name: [
            d.dim_param if d.HasField("dim_param") else d.dim_value if d.HasField("dim_value") else None
            for d in value.type.tensor_type.shape.dim
        ]
        for value in [*model.graph.input, *model.graph.output]
    }


def _ort(path: Path, x: torch.Tensor) -> Any:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


# --- the format decision -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "to", "input_format", "expected"),
    [
        ("out.pt2", None, ModelFormat.TORCH_ZIP, WrittenFormat(ModelFormat.EXPORTED_PROGRAM)),
        ("out.ONNX", None, ModelFormat.EXPORTED_PROGRAM, WrittenFormat(ModelFormat.ONNX)),
        ("out.safetensors", None, ModelFormat.TORCH_ZIP, WrittenFormat(ModelFormat.SAFETENSORS)),
        ("out.ts", None, ModelFormat.TORCH_ZIP, WrittenFormat(ModelFormat.TORCHSCRIPT)),
        ("out.torchscript", None, ModelFormat.EXPORTED_PROGRAM, WrittenFormat(ModelFormat.TORCHSCRIPT)),
        # torch.save-like extensions keep the input's own torch format ...
        ("out.pt", None, ModelFormat.TORCHSCRIPT, WrittenFormat(ModelFormat.TORCHSCRIPT)),
        ("out.pth", None, ModelFormat.TORCH_ZIP, WrittenFormat(ModelFormat.TORCH_ZIP)),
        ("out.ckpt", None, ModelFormat.TORCH_LEGACY, WrittenFormat(ModelFormat.TORCH_LEGACY)),
        ("out.pth.tar", None, ModelFormat.TORCH_ZIP, WrittenFormat(ModelFormat.TORCH_ZIP)),
        ("out.pkl", None, ModelFormat.TORCH_LEGACY, WrittenFormat(ModelFormat.TORCH_LEGACY)),
        # ... and mean a state_dict for anything else
        ("out.pt", None, ModelFormat.EXPORTED_PROGRAM, WrittenFormat(ModelFormat.TORCH_ZIP, state_dict_only=True)),
        ("out.pt", None, ModelFormat.SAFETENSORS, WrittenFormat(ModelFormat.TORCH_ZIP, state_dict_only=True)),
        ("out.pt", WriteFormat.TORCHSCRIPT, ModelFormat.TORCH_ZIP, WrittenFormat(ModelFormat.TORCHSCRIPT)),
        (
            "out.pt",
            WriteFormat.PICKLE,
            ModelFormat.TORCH_ZIP,
            WrittenFormat(ModelFormat.TORCH_ZIP, state_dict_only=False),
        ),
        ("out.bin", WriteFormat.ONNX, ModelFormat.TORCH_ZIP, WrittenFormat(ModelFormat.ONNX)),  # `to` decides
        (None, None, ModelFormat.TORCHSCRIPT, WrittenFormat(ModelFormat.TORCHSCRIPT)),  # dry run: the input's own
        ("out.onnx", None, ModelFormat.ONNX, WrittenFormat(ModelFormat.ONNX)),
    ],
)
def test_written_format(
    name: str | None, to: WriteFormat | None, input_format: ModelFormat, expected: WrittenFormat
) -> None:
    assert written_format(None if name is None else Path(name), to, input_format=input_format) == expected


@pytest.mark.parametrize(
    ("name", "to", "input_format", "words"),
    [
        ("out.pt2", WriteFormat.TORCHSCRIPT, ModelFormat.TORCH_ZIP, ("out.pt2", ".pt2", "torchscript")),
        ("out.onnx", WriteFormat.PT2, ModelFormat.TORCH_ZIP, (".onnx", "pt2")),
        ("out.pt", WriteFormat.ONNX, ModelFormat.TORCH_ZIP, (".pt", "onnx")),
        ("out.bin", None, ModelFormat.TORCH_ZIP, (".bin", ".pt2, .onnx, .safetensors, .pt, .pth, .ckpt")),
        ("out", None, ModelFormat.TORCH_ZIP, ("no extension", ".torchscript, .ts")),
        ("out.pt2", None, ModelFormat.ONNX, ("ONNX",)),
    ],
)
def test_written_format_refusals(
    name: str, to: WriteFormat | None, input_format: ModelFormat, words: tuple[str, ...]
) -> None:
    with pytest.raises(UsageError) as raised:
        written_format(Path(name), to, input_format=input_format)
    text = f"{raised.value.message} {raised.value.hint}"
    assert "\n" not in text and "--" not in raised.value.message
    assert all(word in text for word in words), text


@pytest.mark.parametrize(
    ("command", "name", "to"),
    [
        ("fold-bn", "out.pt2", "onnx"),
        ("reinit", "out.onnx", "pt2"),
        ("fold-bn", "out.bin", None),
        ("reinit", "out.weights", None),
    ],
)
def test_cli_refuses_disagreeing_or_unknown_extensions(
    cli: Any, files: dict[str, Path], tmp_path: Path, command: str, name: str, to: str | None
) -> None:
    out = tmp_path / name
    code, _, stderr = cli(command, files["state_dict"], *_arch(files), "-o", out, *(("--to", to) if to else ()))
    assert code == 2
    one_line_error(stderr)
    assert not out.exists()
    assert ".pt2" in stderr  # the hint lists the extensions that would do


# --- fold-bn: torch model -> .pt2 / .onnx, with a dynamic batch -------------------------------


def test_state_dict_to_pt2_writes_an_exported_program_without_batchnorm(
    cli: Any, files: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "folded.pt2"
    report = _json(cli, "fold-bn", files["state_dict"], *_arch(files), "-o", out, "--input-shape", "2,3,8,8")
    assert report["output_format"] == "exported_program" and report["written"] == str(out)
    assert report["verification"]["batch_sizes"] == [2, 1]
    assert detect_format(out) is ModelFormat.EXPORTED_PROGRAM
    program = torch.export.load(str(out))
    assert not any("batch_norm" in str(node.target) for node in program.graph.nodes)
    (shape,) = _user_input_shapes(program)
    assert isinstance(shape[0], torch.SymInt) and list(shape[1:]) == list(SHAPE)
    (bounds,) = program.range_constraints.values()
    assert int(bounds.lower) <= 1 and bounds.upper == int_oo  # any batch size from 1 up
    reference = build_model()
    for size in (1, 5):
        x = _batch(size, seed=size)
        torch.testing.assert_close(program.module()(x), reference(x), rtol=1e-4, atol=1e-4)


def test_state_dict_to_onnx_writes_onnx_with_a_dynamic_batch(cli: Any, files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "folded.onnx"
    report = _json(cli, "fold-bn", files["state_dict"], *_arch(files), "-o", out, "--input-shape", "2,3,8,8")
    assert report["output_format"] == "onnx" and report["verification"]["batch_sizes"] == [2, 1]
    assert out.read_bytes()[:2] != b"PK"  # not a torch zip named .onnx
    assert detect_format(out) is ModelFormat.ONNX
    assert _graph_dims(out)["input"] == ["batch", *SHAPE]
    assert not any(node.op_type == "BatchNormalization" for node in onnx.load(str(out)).graph.node)
    reference = build_model()
    for size in (1, 5):
        x = _batch(size, seed=size)
        np.testing.assert_allclose(_ort(out, x), reference(x).detach().numpy(), rtol=1e-4, atol=1e-4)


def test_a_model_that_fixes_its_batch_is_written_static_with_a_note(cli: Any, tmp_path: Path) -> None:
    arch = tmp_path / "fixed.py"
    arch.write_text(
        "from torch import nn\n\n"
        "class Fixed(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.conv = nn.Conv2d(3, 4, 3)\n"
        "        self.bn = nn.BatchNorm2d(4)\n"
        "    def forward(self, x):\n"
        "        return self.bn(self.conv(x)).reshape(2, -1)\n"
    )
    weights = tmp_path / "fixed.pt"
    namespace: dict[str, Any] = {}
    exec(arch.read_text(), namespace)
    torch.save(namespace["Fixed"]().state_dict(), weights)
    out = tmp_path / "fixed.pt2"
    report = _json(cli, "fold-bn", weights, "--arch", f"{arch}:Fixed", "-o", out, "--input-shape", "2,3,8,8")
    assert report["written"] == str(out) and report["verification"]["batch_sizes"] == [2]
    assert any("static batch of 2" in note for note in report["notes"]), report["notes"]
    assert not isinstance(_user_input_shapes(torch.export.load(str(out)))[0][0], torch.SymInt)


# --- fold-bn: a .pt2 keeps its own dynamic shapes ----------------------------------------------


def test_dynamic_pt2_keeps_its_range_constraints(cli: Any, files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "folded.pt2"
    report = _json(cli, "fold-bn", files["dynamic_pt2"], "-o", out)
    assert report["verification"]["batch_sizes"] == [2, 1] and report["after"]["batchnorms"] == 0
    original = torch.export.load(str(files["dynamic_pt2"]))
    program = torch.export.load(str(out))
    (before,) = original.range_constraints.values()
    (after,) = program.range_constraints.values()
    assert (int(after.lower), int(after.upper)) == (int(before.lower), int(before.upper)) == (1, 64)
    reference = build_model()
    for size in (1, 5):
        x = _batch(size, seed=size)
        torch.testing.assert_close(program.module()(x), reference(x), rtol=1e-4, atol=1e-4)
    with pytest.raises(Exception, match="64"):  # the upper bound is kept, not widened
        program.module()(_batch(65))


def test_dynamic_pt2_to_onnx_keeps_the_batch_dynamic(cli: Any, files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "folded.onnx"
    report = _json(cli, "fold-bn", files["dynamic_pt2"], "-o", out)
    assert report["verification"]["batch_sizes"] == [2, 1]
    dims = _graph_dims(out)
    assert dims["input"] == ["batch", *SHAPE]
    reference = build_model()
    for size in (1, 5):
        x = _batch(size, seed=size)
        np.testing.assert_allclose(_ort(out, x), reference(x).detach().numpy(), rtol=1e-4, atol=1e-4)


def test_static_pt2_is_verified_at_its_one_size_with_a_note(cli: Any, files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "folded.pt2"
    report = _json(cli, "fold-bn", files["static_pt2"], "-o", out)
    assert report["verification"]["batch_sizes"] == [2] and report["written"] == str(out)
    assert any("static batch dimension" in note for note in report["notes"]), report["notes"]


def test_a_written_file_that_loses_the_batch_is_refused(
    cli: Any, files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Simulate a re-export that drops the input's dynamic dimensions: the second batch size
    # must catch it, and nothing may be written.
    from gradcheck_cli.model import torch_save

    real = torch_save._export
    monkeypatch.setattr(torch_save, "_export", lambda module, args, kwargs, dynamic: real(module, args, kwargs, None))
    out = tmp_path / "folded.pt2"
    code, _, stderr = cli("fold-bn", files["dynamic_pt2"], "-o", out)
    assert code == 2, stderr
    one_line_error(stderr)
    assert "fails at batch size 1" in stderr
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# --- fold-bn: ONNX keeps its dim_params and its unknown dims ---------------------------------


def test_onnx_fold_keeps_dim_params_and_unknown_dims(cli: Any, files: dict[str, Path], tmp_path: Path) -> None:
    source = tmp_path / "mixed.onnx"
    model = onnx.load(str(files["onnx"]))
    model.graph.output[0].type.tensor_type.shape.dim[2].Clear()  # a dimension the exporter left unknown
    onnx.save(model, str(source))
    out = tmp_path / "folded.onnx"
    report = _json(cli, "fold-bn", source, "-o", out)
    assert report["verification"]["batch_sizes"] == [2, 1]
    assert _graph_dims(out) == _graph_dims(source) == {"x": ["N", *SHAPE], "y": ["N", 4, None, 12]}
    reference = build_model()
    for size in (1, 5):
        x = _batch(size, seed=size)
        np.testing.assert_allclose(_ort(out, x), reference(x).detach().numpy(), rtol=1e-4, atol=1e-4)


def test_static_onnx_is_verified_at_its_one_size(cli: Any, tmp_path: Path) -> None:
    source = tmp_path / "static.onnx"
    _export_onnx(build_model(), source, dynamic_axes=None)
    report = _json(cli, "fold-bn", source, "-o", tmp_path / "folded.onnx")
    assert report["verification"]["batch_sizes"] == [2]
    assert any("static batch dimension" in note for note in report["notes"]), report["notes"]


# --- reinit: the same formats and dimensions ---------------------------------------------------


def test_reinit_to_onnx_writes_onnx_with_its_batchnorms_and_a_dynamic_batch(
    cli: Any, files: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "fresh.onnx"
    report = _json(cli, "reinit", files["state_dict"], *_arch(files), "-o", out, "--input-shape", "2,3,8,8")
    assert report["output_format"] == "onnx" and report["verification"]["batch_sizes"] == [2, 1]
    assert out.read_bytes()[:2] != b"PK"
    graph = onnx.load(str(out))
    # Exported as the module is: the exporter's own BatchNorm folding would change the model.
    assert sum(node.op_type == "BatchNormalization" for node in graph.graph.node) == 3
    assert _graph_dims(out)["input"] == ["batch", *SHAPE]
    # The written weights are the re-initialised ones, not the input's.
    conv = next(t for t in graph.graph.initializer if t.name == "0.weight")
    assert not np.allclose(onnx.numpy_helper.to_array(conv), build_model()[0].weight.detach().numpy())
    for size in (1, 5):
        assert _ort(out, _batch(size)).shape[0] == size


def test_reinit_keeps_a_pt2_s_dynamic_shapes(cli: Any, files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "fresh.pt2"
    report = _json(cli, "reinit", files["dynamic_pt2"], "-o", out)
    assert report["output_format"] == "exported_program" and report["verification"]["batch_sizes"] == [2, 1]
    program = torch.export.load(str(out))
    (bounds,) = program.range_constraints.values()
    assert (int(bounds.lower), int(bounds.upper)) == (1, 64)
    for size in (1, 5):
        assert program.module()(_batch(size)).shape[0] == size


def test_reinit_onnx_keeps_dim_params(cli: Any, files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "fresh.onnx"
    _json(cli, "reinit", files["onnx"], "-o", out)
    assert _graph_dims(out) == _graph_dims(files["onnx"])


def test_reinit_state_dict_to_pt2(cli: Any, files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "fresh.pt2"
    report = _json(cli, "reinit", files["state_dict"], *_arch(files), "-o", out, "--input-shape", "2,3,8,8")
    assert report["written"] and detect_format(out) is ModelFormat.EXPORTED_PROGRAM
    assert isinstance(_user_input_shapes(torch.export.load(str(out)))[0][0], torch.SymInt)


# --- files: modes and names --------------------------------------------------------------------


@pytest.fixture
def umask() -> Iterator[Any]:
    previous = os.umask(0o022)
    os.umask(previous)

    def set_to(mask: int) -> None:
        os.umask(mask)

    yield set_to
    os.umask(previous)


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_written_files_and_their_data_files_follow_the_umask(
    cli: Any, files: dict[str, Path], tmp_path: Path, umask: Any, mask: int
) -> None:
    external = tmp_path / "external.onnx"
    wide = tmp_path / "wide.onnx"  # weights over the writer's 1 KiB threshold for external data
    _export_onnx(build_model(width=32), wide, dynamic_axes={"x": {0: "N"}})
    onnx.save_model(
        onnx.load(str(wide)), str(external), save_as_external_data=True, location="external.onnx.data", size_threshold=0
    )
    umask(mask)
    onnx_out = tmp_path / "folded.onnx"
    _json(cli, "fold-bn", external, "-o", onnx_out)
    pt_out = tmp_path / "folded.pt2"
    _json(cli, "fold-bn", files["dynamic_pt2"], "-o", pt_out)
    data = tmp_path / "folded.onnx.data"
    assert data.is_file(), "the external data stays external"
    expected = 0o666 & ~mask
    assert {path.name: path.stat().st_mode & 0o777 for path in (onnx_out, data, pt_out)} == {
        "folded.onnx": expected,
        "folded.onnx.data": expected,
        "folded.pt2": expected,
    }


@pytest.mark.parametrize(
    ("name", "extra"),
    [("renamed.pt", ()), ("renamed.pt2", ()), ("renamed.ts", ()), ("renamed.pth", ("--to", "torchscript"))],
)
def test_archives_carry_the_final_name(
    cli: Any, files: dict[str, Path], tmp_path: Path, name: str, extra: tuple[str, ...]
) -> None:
    out = tmp_path / name
    _json(cli, "fold-bn", files["state_dict"], *_arch(files), "-o", out, "--input-shape", "2,3,8,8", *extra)
    roots = {entry.split("/", 1)[0] for entry in zipfile.ZipFile(out).namelist()}
    assert roots == {Path(name).stem}, roots


# --- parameter counts ---------------------------------------------------------------------------


def _eager_count(model: nn.Module) -> int:
    # Independent of gradcheck: distinct nn.Parameter objects, so a tied weight counts once.
    return sum({id(p): p.numel() for _, p in model.named_parameters(remove_duplicate=False)}.values())


def test_inspect_and_fold_bn_count_the_same_parameters(cli: Any, files: dict[str, Path]) -> None:
    expected = _eager_count(build_model())
    assert expected == 354  # 3 convs with and without biases, 3 BatchNorms' weight and bias
    for source, extra in ((files["onnx"], ()), (files["dynamic_pt2"], ()), (files["state_dict"], _arch(files))):
        code, stdout, stderr = cli("inspect", source, *extra, "--format", "json", "--input-shape", "2,3,8,8")
        assert code in (0, 1), stderr
        inspected = json.loads(stdout)["model"]["parameters"]
        folded = _json(cli, "fold-bn", source, *extra, "--dry-run", "--input-shape", "2,3,8,8")["before"]["parameters"]
        assert inspected == folded == expected, source


def test_tied_weights_count_once_in_torch_and_onnx(tmp_path: Path) -> None:
    from gradcheck_cli.onnx.plan import plan_rows
    from gradcheck_cli.parameters import module_parameter_count, onnx_parameter_count

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.norm = nn.BatchNorm1d(4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.head(self.norm(self.embed(tokens)))

    model = Tied().eval()
    path = tmp_path / "tied.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.tensor([1, 2, 3]),),
            str(path),
            dynamo=False,
            training=torch.onnx.TrainingMode.PRESERVE,
            do_constant_folding=False,
        )
    expected = _eager_count(model)
    assert expected == 10 * 4 + 4 + 4
    assert module_parameter_count(model) == expected
    assert onnx_parameter_count(plan_rows(onnx.load(str(path)).graph)) == expected


class _Paired(nn.Module):
    """Two inputs whose leading sizes are related: ``pairs`` holds two rows per row of ``x``."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.norm = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
        return self.norm(self.linear(x)).repeat(2, 1) + pairs


def test_related_dynamic_inputs_keep_their_relation(cli: Any, tmp_path: Path) -> None:
    model = _Paired().eval()
    with torch.no_grad():
        model.norm.running_mean.uniform_(-1, 1)
        model.norm.running_var.uniform_(0.5, 2)
    rows = torch.export.Dim("rows", min=1, max=32)
    source, out = tmp_path / "paired.pt2", tmp_path / "folded.pt2"
    # `pairs` passed by keyword: the re-export must bind its shape to the parameter name.
    program = torch.export.export(
        model,
        (torch.randn(3, 4),),
        {"pairs": torch.randn(6, 4)},
        dynamic_shapes={"x": {0: rows}, "pairs": {0: 2 * rows}},
    )
    torch.export.save(program, str(source))
    report = _json(cli, "fold-bn", source, "-o", out)
    assert report["after"]["batchnorms"] == 0 and report["verification"]["batch_sizes"] == [3]
    assert any("related" in note for note in report["notes"]), report["notes"]
    folded = torch.export.load(str(out))
    assert {str(k): (int(v.lower), int(v.upper)) for k, v in folded.range_constraints.items()} == {
        str(k): (int(v.lower), int(v.upper)) for k, v in program.range_constraints.items()
    }
    x, pairs = torch.randn(5, 4), torch.randn(10, 4)
    torch.testing.assert_close(folded.module()(x, pairs=pairs), model(x, pairs=pairs), rtol=1e-4, atol=1e-4)
    with pytest.raises(Exception):  # noqa: B017 - the relation is enforced: 5 rows need 10 pairs
        folded.module()(x, pairs=torch.randn(9, 4))


def test_a_probe_batch_of_one_still_gives_a_dynamic_program(cli: Any, files: dict[str, Path], tmp_path: Path) -> None:
    # torch.export would specialise a batch traced at size 1; the export example is repeated to 2.
    out = tmp_path / "folded.pt2"
    report = _json(cli, "fold-bn", files["state_dict"], *_arch(files), "-o", out, "--input-shape", "1,3,8,8")
    assert report["verification"]["batch_sizes"] == [1, 2]
    program = torch.export.load(str(out))
    assert isinstance(_user_input_shapes(program)[0][0], torch.SymInt)
    x = _batch(5)
    torch.testing.assert_close(program.module()(x), build_model()(x), rtol=1e-4, atol=1e-4)
