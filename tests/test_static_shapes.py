"""Static programs explain themselves: the exported shape is used, or refused in one line."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from gradcheck_cli.errors import UsageError
from gradcheck_cli.model.static_shapes import (
    InputDims,
    check_inputs,
    explain_forward_failure,
    program_inputs,
)
from tests.conftest import one_line_error


def small_net() -> nn.Module:
    # Flatten + Linear: the spatial size is fixed by the weights, the batch size is not.
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 14 * 14, 5)).eval()


def pooled_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)).eval()


@pytest.fixture(scope="module")
def programs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("programs")
    x = torch.randn(2, 3, 16, 16)
    paths = {"static": root / "static.pt2", "dynamic": root / "dynamic.pt2", "traced": root / "traced.pt"}
    torch.export.save(torch.export.export(small_net(), (x,)), paths["static"])
    batch = torch.export.Dim("batch", min=1, max=64)
    torch.export.save(torch.export.export(pooled_net(), (x,), dynamic_shapes=({0: batch},)), paths["dynamic"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(small_net(), x), paths["traced"])
    return paths


def test_static_program_is_probed_at_its_exported_shape_with_a_note(cli: Any, programs: dict[str, Path]) -> None:
    code, out, err = cli("inspect", programs["static"], "-f", "json")
    assert code == 0, err
    report = json.loads(out)
    assert [spec["shape"] for spec in report["probe"]["inputs"]] == [[2, 3, 16, 16]]
    notes = [n for n in report["notes"] if "exported with fixed input shapes" in n]
    assert len(notes) == 1 and "(2, 3, 16, 16)" in notes[0]


@pytest.mark.parametrize(
    "args",
    [("--input-shape", "8,3,128,128"), ("--batch-size", "8"), ("--input-shape", "2,3,20,20")],
)
def test_static_program_refuses_another_shape_in_one_line(
    cli: Any, programs: dict[str, Path], args: tuple[str, str]
) -> None:
    code, _, err = cli("inspect", programs["static"], *args)
    assert code == 2
    one_line_error(err)
    assert "fixed input shape (2, 3, 16, 16)" in err
    assert "torch.export.Dim" in err
    assert "Guard failed" not in err


def test_fold_and_reinit_refuse_the_same_way(cli: Any, programs: dict[str, Path], tmp_path: Path) -> None:
    code, _, err = cli("fold-bn", programs["static"], "--input-shape", "4,3,16,16", "--dry-run")
    assert code == 2 and "(2, 3, 16, 16)" in err
    one_line_error(err)
    code, _, err = cli("reinit", programs["static"], "--batch-size", "4", "-o", tmp_path / "r.pt2")
    assert code == 2 and "(2, 3, 16, 16)" in err
    one_line_error(err)
    assert not (tmp_path / "r.pt2").exists()


def test_dynamic_batch_is_accepted_within_its_range_only(cli: Any, programs: dict[str, Path]) -> None:
    code, out, err = cli("inspect", programs["dynamic"], "--input-shape", "8,3,16,16", "-f", "json")
    assert code == 0, err
    report = json.loads(out)
    assert report["probe"]["inputs"][0]["shape"] == [8, 3, 16, 16]
    assert not any("fixed input shapes" in n for n in report["notes"])
    code, _, err = cli("inspect", programs["dynamic"], "--input-shape", "100,3,16,16")
    assert code == 2 and "exported as dynamic in 1..64" in err
    one_line_error(err)
    code, _, err = cli("inspect", programs["dynamic"], "--input-shape", "8,3,20,20")
    assert code == 2 and "dimension 2 is 20, fixed at 16" in err
    one_line_error(err)


def test_program_inputs_reads_fixed_and_dynamic_dimensions(programs: dict[str, Path]) -> None:
    static = torch.export.load(programs["static"]).module()
    dynamic = torch.export.load(programs["dynamic"]).module()
    (s,) = program_inputs(static) or ()
    (d,) = program_inputs(dynamic) or ()
    assert s.dims == (2, 3, 16, 16) and s.static
    assert d.dims == ((1, 64), 3, 16, 16) and not d.static
    assert program_inputs(small_net()) is None  # an eager module declares nothing
    check_inputs(dynamic, (torch.randn(5, 3, 16, 16),), {})
    with pytest.raises(UsageError, match="rank 3 instead of 4"):
        check_inputs(dynamic, (torch.randn(5, 3, 16),), {})


def test_mismatch_reports_the_first_dimension_that_does_not_fit() -> None:
    dims = InputDims("x", (2, (1, None), 8))
    assert dims.mismatch((2, 1000, 8)) is None
    assert dims.mismatch((2, 0, 8)) == (1, "dimension 1 is 0, exported as dynamic in >= 1")
    assert dims.mismatch((3, 5, 9)) == (0, "dimension 0 is 3, fixed at 2 when exported")
    assert dims.describe() == "(2, 1..inf, 8)"


def test_torchscript_failures_name_their_cause(cli: Any, programs: dict[str, Path]) -> None:
    # TorchScript archives keep no input shapes: the evidence is the interpreter's own message,
    # whose first line ("The following operation failed ...") says nothing.
    module = torch.jit.load(str(programs["traced"]))
    with pytest.raises(RuntimeError) as caught:
        module(torch.randn(1, 3, 32, 32))
    assert "TorchScript interpreter" in str(caught.value).splitlines()[0]
    assert explain_forward_failure(caught.value).startswith("mat1 and mat2 shapes cannot be multiplied")
    code, _, err = cli("inspect", programs["traced"])
    assert code == 2
    one_line_error(err)
    assert "mat1 and mat2 shapes cannot be multiplied" in err


class TwoInputs(nn.Module):
    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return image.mean(dim=(2, 3)) * mask


def test_keyword_inputs_are_matched_by_name_not_order() -> None:
    image, mask = torch.randn(2, 3, 8, 8), torch.randn(2, 3)
    module = torch.export.export(TwoInputs(), (), {"image": image, "mask": mask}).module()
    check_inputs(module, (), {"mask": mask, "image": image})  # another order: still fits
    with pytest.raises(UsageError, match="'mask' with a fixed input shape \\(2, 3\\)"):
        check_inputs(module, (), {"mask": torch.randn(2, 4), "image": image})
