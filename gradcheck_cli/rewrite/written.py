"""Write a rewritten PyTorch model so that what is verified is what is written. Never prints.

Both rewrites (fold-bn, reinit) go through here. The model is written into a scratch directory
beside the output, *loaded back as a user would load it* (or, for ONNX, run in onnxruntime),
and run against the reference outputs of a :class:`~gradcheck_cli.rewrite.verify.TorchPlan`
at each of its batch sizes. Only a file that passes is moved onto the output path; otherwise
the scratch directory goes and nothing is left behind.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradcheck_cli.errors import GradcheckError, UsageError
from gradcheck_cli.model.formats import ModelFormat
from gradcheck_cli.rewrite.fold_records import Verification

if TYPE_CHECKING:
    from torch import nn

    from gradcheck_cli.model.handle import LoadedModel
    from gradcheck_cli.rewrite.output import WrittenFormat
    from gradcheck_cli.rewrite.verify import TorchPlan


@dataclass
class Written:
    """The verification of the written file; ``path`` None when nothing was written (a failed
    verification, or no output asked for). ``reloaded``: the file as loaded back (torch formats)."""

    verification: Verification
    path: str | None
    notes: list[str]
    reloaded: LoadedModel | None = None


def check_writable_as(loaded: LoadedModel, written_as: WrittenFormat, out: Path | None) -> bool:
    """Refuse what cannot be written from ``loaded``; return whether only tensors are written
    (then the rewrite must keep the module's structure, so the tensors load back into it)."""
    from gradcheck_cli.model.torch_save import writes_state_dict

    if written_as.state_dict_only is False and (not loaded.trusted_pickle or loaded.arch is not None):
        raise UsageError(
            "`to` pickle writes a file that runs code when loaded; gradcheck writes one "
            "only for a pickled module loaded with `trust_pickle`",
            hint="write a .pt2, TorchScript, state_dict or safetensors file instead",
        )
    tensors_only = writes_state_dict(loaded, written_as.format, state_dict_only=written_as.state_dict_only)
    if tensors_only and loaded.arch is None and out is not None:
        # The written tensors are loaded back into the architecture and verified before they are
        # kept; a model that came with its own architecture has none to load them into.
        raise UsageError(
            f"{loaded.path} is {loaded.format.description}, which carries its own architecture: a state_dict "
            "or safetensors file of it could not be loaded back and verified",
            hint="write a .pt2, TorchScript or ONNX file",
        )
    return tensors_only


@contextmanager
def staging(out: Path) -> Iterator[Path]:
    """A scratch directory beside ``out`` (same filesystem, so the final rename is atomic)."""
    parent = out.parent if str(out.parent) else Path(".")
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=parent) as scratch:
        yield Path(scratch)


def write_torch_verified(
    loaded: LoadedModel,
    module: nn.Module,
    out: Path,
    written_as: WrittenFormat,
    plan: TorchPlan,
    *,
    arch_kwargs: dict[str, Any] | None,
    device: str,
    what: str,
) -> Written:
    """Save ``module`` in a torch format, load it back, verify it against ``plan``, then move it."""
    from gradcheck_cli.model.torch_load import model_from_path
    from gradcheck_cli.model.torch_save import save_model
    from gradcheck_cli.rewrite.verify import BACKEND_TORCH, as_written, torch_outputs, verify_torch_plan

    first = plan.groups[0][0]
    with staging(out) as scratch:
        staged = scratch / out.name
        saved = save_model(
            loaded,
            module,
            staged,
            fmt=written_as.format,
            example_args=first.args,
            example_kwargs=first.kwargs,
            state_dict_only=written_as.state_dict_only,
            output_names=torch_outputs(module, [first])[0] if written_as.format is ModelFormat.ONNX else None,
        )
        # Load the file back exactly as a user would, and verify *that*.
        reloaded = model_from_path(
            staged,
            arch=loaded.arch,
            arch_kwargs=arch_kwargs,
            trust_pickle=loaded.trusted_pickle,
            device=device,
        )
        checked = as_written(plan, saved)
        verification = verify_torch_plan(
            reloaded.module,
            checked,
            backend=f"{BACKEND_TORCH} (the written file, loaded back)",
            what=f"the written {saved.format.description} of {what}",
        )
        if not verification.passed:
            return Written(verification, None, checked.notes, reloaded)
        os.replace(staged, out)
    return Written(verification, str(out), checked.notes, reloaded)


def write_onnx_verified(
    loaded: LoadedModel, module: nn.Module, out: Path | None, plan: TorchPlan, *, against: str = "the original"
) -> Written:
    """Export ``module`` to ONNX, run the export in onnxruntime at the plan's batch sizes against
    the reference in torch (``against`` names it), and write it to ``out`` (if given) when it
    matches."""
    from gradcheck_cli.model.dynamic import batch_range
    from gradcheck_cli.model.onnx_load import onnx_model_from_path, onnx_model_to_path
    from gradcheck_cli.model.torch_save import export_onnx, input_dims
    from gradcheck_cli.rewrite.verify import (
        BACKEND_ORT,
        compare_outputs,
        fails_at,
        merge_checks,
        onnx_outputs,
        torch_outputs,
    )

    first = plan.groups[0][0]
    with tempfile.TemporaryDirectory(
        prefix=".gradcheck-export.",
        dir=None if out is None else (out.parent if str(out.parent) else Path(".")),
    ) as scratch:
        staged = Path(scratch) / "export.onnx"
        dims = input_dims(loaded, first.args, first.kwargs)
        export_onnx(module, staged, first.args, first.kwargs, dims=dims, output_names=torch_outputs(module, [first])[0])
        exported = onnx_model_from_path(staged)
        # The export was asked for a dynamic batch wherever the plan has a second size (the plan
        # follows the input's own dimensions): it must run there, whatever the graph declares.
        if len(plan.groups) > 1 and batch_range(dims) is None:
            plan = plan.without_second(
                f"verified at batch size {plan.sizes[0]} only: the input's batch dimension is static"
            )
        initializers = {t.name for t in exported.graph.initializer}
        input_names = [i.name for i in exported.graph.input if i.name not in initializers]
        checks = []
        for index, (group, (names, ref, dtypes)) in enumerate(zip(plan.groups, plan.references, strict=True)):
            feeds = [
                dict(
                    zip(
                        input_names,
                        [a.detach().cpu().numpy() for a in (*batch.args, *batch.kwargs.values())],
                        strict=False,
                    )
                )
                for batch in group
            ]
            try:
                _, new, _ = onnx_outputs(exported, feeds)
            except GradcheckError as exc:
                if index == 0:
                    raise
                raise fails_at("the exported ONNX model", group[0].size, plan.sizes[0], exc.message) from exc
            checks.append(compare_outputs(names, ref, new, dtypes=dtypes))
        verification = Verification(
            f"{BACKEND_ORT}, against {against} in torch",
            sum(batch.size for batch in plan.groups[0]),  # the second size repeats these samples
            merge_checks(checks),
            batch_sizes=plan.sizes,
        )
        if out is None or not verification.passed:
            return Written(verification, None, plan.notes)
        # Written again through the ONNX writer rather than moved: a model too large for one
        # protobuf message keeps its data file beside the output, under the output's name.
        onnx_model_to_path(exported, out)
    return Written(verification, str(out), plan.notes)
