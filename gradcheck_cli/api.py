"""The library API: every command is one call here. Nothing in this module prints, and nothing
in the engine beneath it imports it back: it only re-exports.

    from gradcheck_cli import api
    report = api.inspect(Path("model.pt"), load=api.LoadOptions(arch="model.py:build"))
    print(report.to_dict()["layers"][0])

Every option is a field of one of the records in :mod:`gradcheck_cli.options`.
"""

from __future__ import annotations

from gradcheck_cli.gate.check import check_module
from gradcheck_cli.gate.check import check_path as check
from gradcheck_cli.gate.check import diagnose as inspect
from gradcheck_cli.model.load import load_model as load
from gradcheck_cli.options import (
    FoldOptions,
    GateOptions,
    InputOptions,
    LoadOptions,
    LossKind,
    Mode,
    ProbeOptions,
    ReinitOptions,
    WriteFormat,
    WriteOptions,
)
from gradcheck_cli.probe.entry import inspect_loaded as inspect_model
from gradcheck_cli.probe.entry import inspect_module, inspect_onnx
from gradcheck_cli.rewrite.fold import fold_batchnorm
from gradcheck_cli.rewrite.reinit import reinit

__all__ = [
    "FoldOptions",
    "GateOptions",
    "InputOptions",
    "LoadOptions",
    "LossKind",
    "Mode",
    "ProbeOptions",
    "ReinitOptions",
    "WriteFormat",
    "WriteOptions",
    "check",
    "check_module",
    "fold_batchnorm",
    "inspect",
    "inspect_model",
    "inspect_module",
    "inspect_onnx",
    "load",
    "reinit",
]
