"""``gradcheck reinit``: re-initialise layers (He, Glorot, LeCun, orthogonal, LSUV) and show the
probe before and after. An unsafe rewrite: it discards trained weights."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from gradcheck_cli.cli import options as opt
from gradcheck_cli.cli.common import EXIT_OK, parse_range, user_errors, write_text
from gradcheck_cli.rewrite.init_math import Distribution, FanMode, RecurrentInit, Scheme
from gradcheck_cli.rewrite.output import OutputFormat

if TYPE_CHECKING:
    from gradcheck_cli.rewrite.reinit_records import ReinitReport


class ReportFormat(str, Enum):
    TABLE = "table"
    JSON = "json"


def reinit(
    model: opt.ModelArg,
    out: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Where to write the re-initialised model (its format from the extension, "
        "or --to).", show_default=False)] = None,
    to: Annotated[OutputFormat | None, typer.Option(
        "--to", help="Format of the written model (default: from the -o extension: .pt2, .onnx, .safetensors, "
        ".pt/.pth/.ckpt/.pkl/.tar (the input's torch format, or a state_dict), .torchscript/.ts).",
        show_default=False, rich_help_panel="Reinit")] = None,
    scheme: Annotated[Scheme, typer.Option(
        "--scheme", help="auto: per layer from the activation that follows it (He after the ReLU "
        "family, LeCun after SELU, Glorot after tanh/sigmoid/none); lsuv: orthogonal, then each "
        "layer's output variance set to 1 on the probe batch.", rich_help_panel="Reinit")] = Scheme.AUTO,
    distribution: Annotated[Distribution | None, typer.Option(
        "--distribution", help="Draw from a normal or a uniform distribution of the same variance "
        "(default: normal).", rich_help_panel="Reinit", show_default=False)] = None,
    mode: Annotated[FanMode | None, typer.Option(
        "--mode", help="Fan the variance is divided by (default: fan_avg for glorot, else fan_in).",
        rich_help_panel="Reinit", show_default=False)] = None,
    layers: Annotated[list[str] | None, typer.Option(
        "--layers", metavar="GLOB", help="Only layers whose name (module path, or ONNX node name) matches this glob; "
        "repeatable.", rich_help_panel="Reinit")] = None,
    recurrent: Annotated[RecurrentInit, typer.Option(
        "--recurrent", help="Recurrent weights of RNN/LSTM/GRU: orthogonal, or identity (IRNN).",
        rich_help_panel="Reinit")] = RecurrentInit.ORTHOGONAL,
    forget_bias: Annotated[bool, typer.Option(
        "--forget-bias", help="Set the LSTM forget-gate bias to 1.", rich_help_panel="Reinit")] = False,
    reset_norm: Annotated[bool, typer.Option(
        "--reset-norm", help="Also reset normalisation layers: affine to (1, 0), running statistics "
        "to (0, 1).", rich_help_panel="Reinit")] = False,
    seed: opt.Seed = 0,
    dry_run: opt.DryRun = False,
    force: opt.Force = False,
    arch: opt.Arch = None,
    arch_kwargs: opt.ArchKwargs = None,
    non_strict: opt.NonStrict = False,
    trust_pickle: opt.TrustPickle = False,
    device: opt.Device = "cpu",
    input_file: opt.InputFile = None,
    input_shape: opt.InputShape = None,
    input_dtype: opt.InputDtype = None,
    input_range: opt.InputRange = None,
    batch_size: opt.BatchSize = None,
    batches: opt.Batches = 1,
    report_format: Annotated[ReportFormat, typer.Option(
        "--report", help="What to print on stdout (table or json).")] = ReportFormat.TABLE,
    plot: opt.PlotFile = None,
    debug: opt.Debug = False,
) -> None:
    """Re-initialise a model's layers and show the probe before and after.

    Unsafe rewrite: the trained values of every selected layer are discarded. The input is never
    modified; an existing output is refused without --force. Exit 0 on success, 2 on errors.
    """
    import sys

    from gradcheck_cli.model.arch import parse_arch_kwargs
    from gradcheck_cli.probe.batch import InputOptions, parse_shape
    from gradcheck_cli.probe.options import ProbeOptions
    from gradcheck_cli.render.console import make_console
    from gradcheck_cli.render.reinit import reinit_json, render_reinit
    from gradcheck_cli.rewrite.reinit import reinit as run_reinit
    from gradcheck_cli.rewrite.reinit_options import ReinitOptions

    with user_errors(debug):
        from gradcheck_cli import api
        from gradcheck_cli.cli.visual import check_visual_outputs

        check_visual_outputs(plot=plot, html=None)

        options = ReinitOptions(scheme=scheme, distribution=distribution, mode=mode,
                                layers=tuple(layers or ()), seed=seed, recurrent=recurrent,
                                reset_norm=reset_norm, forget_bias=forget_bias)
        inputs = InputOptions(input_file=input_file,
                              input_shapes=tuple(parse_shape(s) for s in input_shape or ()),
                              input_dtype=input_dtype, input_range=parse_range(input_range),
                              batch_size=batch_size, batches=batches, seed=seed)
        load = api.LoadOptions(arch=arch, arch_kwargs=parse_arch_kwargs(arch_kwargs),
                               strict=not non_strict, trust_pickle=trust_pickle)
        report = run_reinit(model, out=out, options=options, load=load,
                            probe=ProbeOptions(inputs=inputs, device=device), dry_run=dry_run, force=force,
                            to=to)
        if report.written:
            sys.stderr.write(f"warning: unsafe rewrite: {out} holds re-initialised weights; the trained "
                             f"values of {len(report.layers)} layer(s) were discarded ({model} is unchanged)\n")
        if plot is not None:
            _write_plot(report, plot)
        if report_format is ReportFormat.JSON:
            write_text(reinit_json(report), None)
        else:
            render_reinit(report, make_console())
    raise typer.Exit(EXIT_OK)


def _write_plot(report: ReinitReport, plot: Path) -> None:
    """The probe before and after the rewrite, overlaid; a model probed neither time (ONNX) has none."""
    import sys

    from gradcheck_cli.render.plot import write_comparison

    if report.before is None or report.after is None:
        sys.stderr.write(f"warning: --plot {plot} not written: this model was not probed before and after "
                         "(see the notes)\n")
        return
    write_comparison(report.before, report.after, plot)
