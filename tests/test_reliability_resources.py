"""Resource exhaustion and numerical faults: enormous declared shapes, sizes that do not match the
data, cyclic or deeply nested graphs, external data outside the model directory or on special
files are refused before anything is allocated; the probe's memory is estimated and refused
when it does not fit; NaN/Inf and degenerate models give findings or clear one-line errors."""

from __future__ import annotations

import io
import json
import os
import struct
import textwrap
import zipfile
from pathlib import Path
from typing import Any

import pytest

from tests._mutate import SAMPLES, onnx_mlp_bytes, time_bound
from tests.conftest import one_line_error

PT2 = str(SAMPLES / "relu_healthy.pt2")


def _onnx(tmp_path: Path, edit: Any, name: str = "model.onnx") -> Path:
    import onnx

    model = onnx.load_from_string(onnx_mlp_bytes())
    edit(model)
    path = tmp_path / name
    path.write_bytes(model.SerializeToString())
    return path


def _refused(cli: Any, argv: list[str], *needles: str) -> str:
    with time_bound():
        code, stdout, stderr = cli(*argv)
    assert code == 2, (stdout[-1500:], stderr)
    one_line_error(stderr)
    for needle in needles:
        assert needle in stderr, stderr
    return str(stderr)


# --- ONNX ------------------------------------------------------------------------------------------


def _huge_input(model: Any) -> None:
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[0].Clear()
    dims[0].dim_value = 10**9


def _lying_initializer(model: Any) -> None:
    tensor = model.graph.initializer[0]
    del tensor.dims[:]
    tensor.dims.extend([100_000, 100_000])  # 40 GB declared; 2 KiB of data


def _negative_dim(model: Any) -> None:
    model.graph.initializer[0].dims[0] = -5


def _cycle(model: Any) -> None:
    model.graph.node[0].input[0] = model.graph.node[2].output[0]  # fc1 reads fc2's output


@pytest.mark.parametrize("command", ["inspect", "check", "reinit", "fold-bn"])
@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (_huge_input, "more than gradcheck will allocate"),
        (_lying_initializer, "but holds"),
        (_negative_dim, "negative dimension"),
        (_cycle, "cycle"),
    ],
    ids=["huge-input", "size-mismatch", "negative-dim", "cycle"],
)
def test_onnx_declarations_refused(cli: Any, tmp_path: Path, command: str, edit: Any, needle: str) -> None:
    path = _onnx(tmp_path, edit)
    argv = [command, str(path)] + (["-o", str(tmp_path / "out.onnx")] if command in ("reinit", "fold-bn") else [])
    if command == "check":
        with time_bound():
            code, stdout, stderr = cli(*argv)
        assert code == 2 and "Traceback" not in stdout + stderr
        assert needle in " ".join(stdout.split()), stdout
        return
    _refused(cli, argv, needle)


def test_onnx_deep_nesting_refused(cli: Any, tmp_path: Path) -> None:
    """If-nodes nested 20 deep: refused before any walk recurses through them."""
    from onnx import TensorProto, helper

    def nest(depth: int) -> Any:
        out = helper.make_tensor_value_info(f"o{depth}", TensorProto.FLOAT, [1])
        if depth == 0:
            node = helper.make_node("Identity", ["c"], [f"o{depth}"])
            return helper.make_graph([node], f"g{depth}", [], [out])
        # Only the then-branch nests (a shared branch would double the graph at every level).
        leaf = helper.make_graph([helper.make_node("Identity", ["c"], [f"o{depth}"])], f"e{depth}", [], [out])
        node = helper.make_node("If", ["cond"], [f"o{depth}"], then_branch=nest(depth - 1), else_branch=leaf)
        return helper.make_graph([node], f"g{depth}", [], [out])

    def edit(model: Any) -> None:
        graph = nest(20)
        model.graph.node.append(graph.node[0])

    _refused(cli, ["inspect", str(_onnx(tmp_path, edit))], "nest")


def _external(tmp_path: Path, location: str, *, length: int | None = None, offset: int = 0) -> Path:
    import onnx

    def edit(model: Any) -> None:
        tensor = model.graph.initializer[0]
        tensor.ClearField("raw_data")
        tensor.ClearField("float_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
        entries = {"location": location, "offset": str(offset)}
        if length is not None:
            entries["length"] = str(length)
        for key, value in entries.items():
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value

    return _onnx(tmp_path, edit)


@pytest.mark.parametrize(
    "location", ["/dev/zero", "../outside.bin", "/etc/passwd", "link_to_dev_zero", "fifo.bin", "."]
)
def test_onnx_external_data_outside_or_special_refused(cli: Any, tmp_path: Path, location: str) -> None:
    (tmp_path.parent / "outside.bin").write_bytes(b"\0" * 4096)
    os.symlink("/dev/zero", tmp_path / "link_to_dev_zero")
    os.mkfifo(tmp_path / "fifo.bin")
    path = _external(tmp_path, location)
    for command in ("inspect", "check"):
        with time_bound():
            code, stdout, stderr = cli(command, str(path))
        assert code == 2, stderr
        assert "Traceback" not in stdout + stderr
        text = " ".join((stdout + stderr).split())
        assert "outside the model's directory" in text or "not a regular file" in text, text


def test_onnx_external_data_length_mismatch_and_overrun_refused(cli: Any, tmp_path: Path) -> None:
    (tmp_path / "w.bin").write_bytes(b"\0" * 16 * 32 * 4)
    _refused(cli, ["inspect", str(_external(tmp_path, "w.bin", length=10**12))], "external data is")
    _refused(cli, ["inspect", str(_external(tmp_path, "w.bin", offset=1024))], "past its end")


# --- other formats -------------------------------------------------------------------------------


def test_npy_declaring_terabytes_refused_before_allocating(cli: Any, tmp_path: Path) -> None:
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000, 1000000), }"
    header += " " * (-(len(header) + 11) % 64) + "\n"
    path = tmp_path / "huge.npy"
    path.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + b"\0" * 64)
    _refused(cli, ["inspect", PT2, "--input", str(path)], "declares 4000000000000 bytes")


def test_npz_member_declaring_terabytes_refused(cli: Any, tmp_path: Path) -> None:
    header = "{'descr': '<f8', 'fortran_order': False, 'shape': (10000000000,), }"
    header += " " * (-(len(header) + 11) % 64) + "\n"
    member = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + b"\0" * 64
    path = tmp_path / "huge.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("arr_0.npy", member)
    _refused(cli, ["inspect", PT2, "--input", str(path)], "declares")


def test_npy_object_array_refused(cli: Any, tmp_path: Path) -> None:
    import numpy as np

    path = tmp_path / "objects.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    _refused(cli, ["inspect", PT2, "--input", str(path)], "Python objects")


def test_safetensors_header_lying_about_sizes_refused(cli: Any, tmp_path: Path) -> None:
    header = json.dumps({"fc.weight": {"dtype": "F32", "shape": [100000, 100000], "data_offsets": [0, 40_000_000_000]}})
    data = header.encode()
    path = tmp_path / "lying.safetensors"
    path.write_bytes(struct.pack("<Q", len(data)) + data + b"\0" * 64)
    _refused(cli, ["inspect", str(path), "--arch", f"{SAMPLES / 'models.py'}:relu_mlp"], "could not be read")


def test_torch_storage_declaring_more_than_its_data_refused(cli: Any, tmp_path: Path) -> None:
    """A torch zip whose pickle declares a tensor far larger than the storage record behind it."""
    import torch

    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(4)}, buffer)
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as archive:
        members = {info.filename: archive.read(info.filename) for info in archive.infolist()}
    pkl = next(name for name in members if name.endswith("data.pkl"))
    # K\x04 is the size tuple (4,) of the tensor; J<int32> declares 2**30 elements instead.
    assert members[pkl].count(b"K\x04\x85") == 1
    members[pkl] = members[pkl].replace(b"K\x04\x85", b"J\x00\x00\x00\x40\x85")
    path = tmp_path / "lying.pt"
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    _refused(cli, ["inspect", str(path), "--arch", f"{SAMPLES / 'models.py'}:relu_mlp"], "could not be loaded")


# --- the memory estimate -------------------------------------------------------------------------


def test_memory_estimate_counts_weights_inputs_and_activations() -> None:
    import torch

    from gradcheck_cli.probe.budget import estimate_probe_memory

    model = torch.nn.Sequential(torch.nn.Linear(100, 1000), torch.nn.ReLU(), torch.nn.Linear(1000, 10))
    x = torch.randn(32, 100)
    estimate = estimate_probe_memory(model, (x,))
    assert estimate.parameters == (100 * 1000 + 1000 + 1000 * 10 + 10) * 4
    # The lean probe holds one gradient at a time for one micro-batch (the largest: 100x1000),
    # every one across several (probe/lean.py).
    assert estimate.gradients == 100 * 1000 * 4
    assert estimate_probe_memory(model, (x,), micro_batches=2).gradients == estimate.parameters
    assert estimate.inputs_per_sample == 100 * 4
    # Linear 1000 + ReLU 1000 + Linear 10 (+ the output again), each kept and its gradient: x2.
    assert estimate.activations_per_sample == 2 * (1000 + 1000 + 10 + 10) * 4
    assert estimate.measured and estimate.batch_size == 32
    assert model.training  # mode restored


def test_memory_budget_refuses_with_a_micro_batch_that_fits() -> None:
    import torch

    from gradcheck_cli.errors import ProbeError
    from gradcheck_cli.probe.budget import check_memory_budget, estimate_probe_memory

    model = torch.nn.Sequential(torch.nn.Linear(256, 4096), torch.nn.ReLU(), torch.nn.Linear(4096, 10))
    estimate = estimate_probe_memory(model, (torch.randn(64, 256),))
    check_memory_budget(estimate, budget=estimate.total)  # fits exactly
    budget = estimate.fixed + 8 * estimate.per_sample
    with pytest.raises(ProbeError) as caught:
        check_memory_budget(estimate, budget=budget, total_samples=64)
    from gradcheck_cli.cli.common import flag_text  # what the CLI prints: fields spelled as flags

    assert "--memory-budget" in flag_text(caught.value.message)
    assert flag_text(caught.value.hint or "") == (
        "micro-batch it: --batch-size 8 --batches 8 (statistics are merged exactly)"
    )
    with pytest.raises(ProbeError, match="weights and the largest gradient alone"):
        check_memory_budget(estimate, available=estimate.fixed // 2)


def test_weights_already_in_memory_count_against_a_budget_but_not_against_available_memory() -> None:
    from gradcheck_cli.errors import ProbeError
    from gradcheck_cli.probe.budget import MemoryEstimate, micro_batch_that_fits, over_limit

    estimate = MemoryEstimate(
        parameters=1000,
        gradients=1000,
        inputs_per_sample=10,
        activations_per_sample=40,
        batch_size=8,
        measured=True,
        resident=1000,
    )
    # The whole probe: 2000 + 8 x 50 = 2400 bytes; what it still has to allocate: 1400.
    assert micro_batch_that_fits(estimate, available=1400) is None
    assert micro_batch_that_fits(estimate, available=1300) == 6  # (1300 - 1000 gradients) // 50
    assert micro_batch_that_fits(estimate, budget=2400) is None
    assert micro_batch_that_fits(estimate, budget=2300) == 6  # (2300 - 2000 weights and gradients) // 50
    assert micro_batch_that_fits(estimate, budget=2300, available=1200) == 4  # the tighter one: (1200 - 1000) // 50
    assert "1.2 KiB of available memory" in over_limit(estimate, budget=2300, available=1200)
    with pytest.raises(ProbeError, match="largest gradient alone"):
        micro_batch_that_fits(estimate, available=1000)


@pytest.mark.parametrize(
    ("text", "expected"), [("4GiB", 4 * 1024**3), ("512MB", 512 * 1000**2), ("1.5k", 1500), ("2048", 2048)]
)
def test_parse_memory_budget(text: str, expected: int) -> None:
    from gradcheck_cli.probe.budget import parse_memory_budget

    assert parse_memory_budget(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "-1GB", "0", "4 parsecs"])
def test_parse_memory_budget_rejects(text: str) -> None:
    from gradcheck_cli.errors import UsageError
    from gradcheck_cli.probe.budget import parse_memory_budget

    with pytest.raises(UsageError):
        parse_memory_budget(text)


def test_available_memory_reads_meminfo_and_cgroup(tmp_path: Path) -> None:
    from gradcheck_cli.probe import budget

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 100 kB\nMemAvailable:    2048 kB\n")
    assert budget._meminfo_available(meminfo) == 2048 * 1024
    (tmp_path / "memory.max").write_text("1000000\n")
    (tmp_path / "memory.current").write_text("400000\n")
    assert budget._cgroup_headroom(tmp_path) == 600000
    (tmp_path / "memory.max").write_text("max\n")
    assert budget._cgroup_headroom(tmp_path) is None
    here = budget.available_memory()
    assert here is None or here > 0


# --- numerical faults and degenerate models --------------------------------------------------------

ARCH = textwrap.dedent("""
    import torch
    from torch import nn

    class MLP(nn.Module):
        def __init__(self, scale=1.0):
            super().__init__()
            self.fc1 = nn.Linear(8, 16)
            self.fc2 = nn.Linear(16, 4)
            with torch.no_grad():
                self.fc1.weight.mul_(scale)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    class SqrtNeg(MLP):  # NaN activations and gradients from finite weights and inputs
        def forward(self, x):
            return self.fc2(torch.sqrt(self.fc1(x) - 100.0))

    class IntOut(MLP):
        def forward(self, x):
            return super().forward(x).argmax(dim=1)

    def mlp():
        return MLP()

    def overflow():
        return MLP(1e38)

    def sqrtneg():
        return SqrtNeg()

    def intout():
        return IntOut()
""")


@pytest.fixture
def numeric(tmp_path: Path) -> dict[str, Path]:
    import torch

    arch = tmp_path / "numeric_arch.py"
    arch.write_text(ARCH)
    namespace: dict[str, Any] = {}
    exec(compile(ARCH, str(arch), "exec"), namespace)
    files = {"arch": arch}
    for name in ("mlp", "overflow", "sqrtneg", "intout"):
        torch.manual_seed(0)
        files[name] = tmp_path / f"{name}.pt"
        torch.save(namespace[name]().state_dict(), files[name])
    nan = namespace["mlp"]().state_dict()
    nan["fc1.weight"][0, 0] = float("nan")
    nan["fc2.bias"][1] = float("inf")
    files["nan_weights"] = tmp_path / "nan_weights.pt"
    torch.save(nan, files["nan_weights"])
    for name, value in (("nan_input", float("nan")), ("inf_input", float("inf"))):
        files[name] = tmp_path / f"{name}.pt"
        torch.save(torch.full((8, 8), value), files[name])
    files["empty_input"] = tmp_path / "empty_input.pt"
    torch.save(torch.zeros(0, 8), files["empty_input"])
    files["zero_width_input"] = tmp_path / "zero_width_input.pt"
    torch.save(torch.zeros(8, 0), files["zero_width_input"])
    return files


def _report(stdout: str) -> dict[str, Any]:
    """check --format json: one model's report (several models come as a list under 'models')."""
    data: dict[str, Any] = json.loads(stdout)
    return data["models"][0] if "models" in data else data


def _arch(files: dict[str, Path], name: str) -> list[str]:
    return ["--arch", f"{files['arch']}:{name}"]


def test_nan_weights_are_a_check_finding(cli: Any, numeric: dict[str, Path]) -> None:
    code, stdout, stderr = cli("check", str(numeric["nan_weights"]), *_arch(numeric, "mlp"), "--format", "json")
    assert code == 1, stderr
    codes = {f["code"] for f in _report(stdout)["findings"]}
    assert "GC001" in codes
    # inspect refuses them by default, in one line, and says how to probe anyway.
    code, _, stderr = cli("inspect", str(numeric["nan_weights"]), *_arch(numeric, "mlp"))
    assert code == 2
    one_line_error(stderr)
    assert "--allow-nonfinite" in stderr


@pytest.mark.parametrize(
    ("model", "arch", "extra"),
    [
        ("mlp", "mlp", ("--input", "nan_input")),
        ("mlp", "mlp", ("--input", "inf_input")),
        ("overflow", "overflow", ("--input-shape", "8,8")),
        ("sqrtneg", "sqrtneg", ("--input-shape", "8,8")),
    ],
    ids=["nan-input", "inf-input", "overflowing-activations", "nan-activations-and-gradients"],
)
def test_nonfinite_values_are_findings_not_crashes(
    cli: Any, numeric: dict[str, Path], model: str, arch: str, extra: tuple[str, str]
) -> None:
    flag, value = extra
    value = str(numeric[value]) if value in numeric else value
    code, stdout, stderr = cli("check", str(numeric[model]), *_arch(numeric, arch), flag, value, "--format", "json")
    assert code == 1, stderr
    report = _report(stdout)
    assert report["findings"], "non-finite values produced no finding"
    assert {f["code"] for f in report["findings"]} & {"GC001", "GC204", "GC101", "GC203"}
    code, stdout, stderr = cli("inspect", str(numeric[model]), *_arch(numeric, arch), flag, value)
    assert code == 0, stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize(
    ("model", "extra", "needle"),
    [
        ("mlp", ("--input", "empty_input"), "zero samples"),
        ("mlp", ("--input", "zero_width_input"), "forward pass failed"),
        ("intout", ("--input-shape", "8,8"), "floating-point"),
    ],
    ids=["zero-size-batch", "zero-size-features", "integer-output"],
)
def test_degenerate_inputs_and_outputs_are_clear_errors(
    cli: Any, numeric: dict[str, Path], model: str, extra: tuple[str, str], needle: str
) -> None:
    flag, value = extra
    value = str(numeric[value]) if value in numeric else value
    _refused(cli, ["inspect", str(numeric[model]), *_arch(numeric, model), flag, value], needle)


def test_model_without_parameters_is_a_clear_error(cli: Any, tmp_path: Path) -> None:
    import torch

    empty = tmp_path / "empty.pt"
    torch.save({}, empty)
    _refused(cli, ["inspect", str(empty), "--arch", f"{SAMPLES / 'models.py'}:relu_mlp"], "no weights")
    scripted = tmp_path / "relu.torchscript.pt"
    torch.jit.save(torch.jit.script(torch.nn.ReLU()), scripted)
    _refused(cli, ["inspect", str(scripted), "--input-shape", "8,8"], "does not depend on any parameter")
