"""Options shared by every command, so that the same flag means the same thing everywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

# typer reads these annotations at runtime; keep Optional[...] (not X | None) for its parser.
ModelArg = Annotated[Path, typer.Argument(help="Model file: .pt2, TorchScript, torch.save checkpoint, "
                                          "safetensors or ONNX (detected from the content).",
                                          show_default=False)]
Arch = Annotated[str | None, typer.Option(
    "--arch", help="Architecture for a state_dict/safetensors file: pkg.module:callable, "
    "path/file.py:callable (runs that file), torchvision:<name>, timm:<name>.",
    rich_help_panel="Loading")]
ArchKwargs = Annotated[str | None, typer.Option(
    "--arch-kwargs", help="JSON object of keyword arguments for --arch.", rich_help_panel="Loading")]
NonStrict = Annotated[bool, typer.Option(
    "--non-strict", help="Load a state_dict even if keys are missing or unexpected.",
    rich_help_panel="Loading")]
TrustPickle = Annotated[bool, typer.Option(
    "--trust-pickle", help="Allow full unpickling (a pickled nn.Module). Unpickling runs code from "
    "the file: only for files you trust.", rich_help_panel="Loading")]
Device = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or auto (a model too big for one GPU "
                                     "is placed across the visible GPUs).", rich_help_panel="Probe")]
InputFile = Annotated[Path | None, typer.Option(
    "--input", help="Probe inputs: .pt (tensor, tuple or dict of tensors), .npy or .npz.",
    rich_help_panel="Probe")]
InputShape = Annotated[list[str] | None, typer.Option(
    "--input-shape", help="Shape of a synthesised input, batch first, e.g. 8,3,224,224. Repeat for "
    "several inputs.", rich_help_panel="Probe")]
InputDtype = Annotated[str | None, typer.Option(
    "--input-dtype", help="dtype of synthesised inputs (float32, int64, ...).", rich_help_panel="Probe")]
InputRange = Annotated[str | None, typer.Option(
    "--input-range", help="LOW,HIGH of synthesised inputs (integers: HIGH exclusive, e.g. token ids "
    "0,30522).", rich_help_panel="Probe")]
BatchSize = Annotated[int | None, typer.Option(
    "--batch-size", min=1, help="Samples per micro-batch (default 8, or the inputs' own).",
    rich_help_panel="Probe")]
Batches = Annotated[int, typer.Option(
    "--batches", min=1, help="Number of micro-batches; statistics are merged exactly.",
    rich_help_panel="Probe")]
Seed = Annotated[int, typer.Option("--seed", help="Seed for inputs, targets and dropout.",
                                   rich_help_panel="Probe")]
Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")]
Output = Annotated[Path | None, typer.Option(
    "--output", "-o", help="Write the output to this file instead of stdout.")]
Force = Annotated[bool, typer.Option("--force", help="Overwrite an existing output file.")]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Report what would change; write nothing.")]
PlotFile = Annotated[Path | None, typer.Option(
    "--plot", help="Also draw the gradient-flow figure (variance, |dL/dy|, dead/saturated over depth) to "
    "FILE.png or FILE.svg. Needs matplotlib: pip install 'gradcheck-cli[plot]'.", rich_help_panel="Output",
    show_default=False)]
HtmlFile = Annotated[Path | None, typer.Option(
    "--html", help="Also write a self-contained HTML report (summary, findings, sortable table, depth chart, "
    "per-layer histograms) to FILE; turns --histograms on.", rich_help_panel="Output", show_default=False)]
