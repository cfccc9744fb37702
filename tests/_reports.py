"""Hand-made reports for the renderer tests: fixed numbers, no probe, no torch."""

from __future__ import annotations

from gradcheck_cli.records import (
    DeadUnits,
    Finding,
    Histograms,
    InputSpec,
    LayerStats,
    ModelInfo,
    OutputStats,
    ProbeInfo,
    Report,
    RowKind,
    Saturation,
    Severity,
    ToolInfo,
)
from gradcheck_cli.stats import histogram_edges

BINS = len(histogram_edges()) + 1


def row(
    index: int,
    name: str,
    *,
    kind: RowKind = RowKind.PARAM,
    var: float | None = 1.0,
    grad: float | None = 0.5,
    dead: float | None = None,
    saturated: float | None = None,
    nan: int = 0,
    histograms: bool = False,
) -> LayerStats:
    """One row; ``dead`` is a fraction of 100 units, ``nan`` makes the output non-finite."""
    output = OutputStats(
        count=800,
        mean=None if nan else 0.1,
        var=None if nan else var,
        min=None if nan else -1.0,
        max=None if nan else 1.0,
        nan=nan,
        inf=0,
    )
    counts = tuple((index + i) % 7 if 40 <= i <= 60 else 0 for i in range(BINS)) if histograms else None
    return LayerStats(
        index=index,
        name=name,
        type="relu" if kind is RowKind.ACTIVATION else "Linear",
        kind=kind,
        module="" if kind is RowKind.ACTIVATION else name,
        shape=(8, 100),
        output=output,
        output_grad_norm=grad,
        fn="relu" if kind is RowKind.ACTIVATION else None,
        dead=DeadUnits(units=round(dead * 100), total=100, axis=1) if dead is not None else None,
        saturation=Saturation(fraction=saturated, cutoff=0.05) if saturated is not None else None,
        histograms=Histograms(output=counts, output_grad=counts) if counts is not None else None,
    )


def finding(code: str, layer: str | None, severity: Severity = Severity.ERROR, rule: str = "dead-relu") -> Finding:
    return Finding(
        code=code,
        rule=rule,
        severity=severity,
        layer=layer,
        value=0.6,
        threshold=0.5,
        message=f"{rule} at {layer}",
        advice="use He init",
    )


def report(
    layers: tuple[LayerStats, ...],
    findings: tuple[Finding, ...] = (),
    *,
    path: str = "model.pt",
    histograms: bool = False,
) -> Report:
    probe = ProbeInfo(
        inputs=(InputSpec(name="x", shape=(8, 100), dtype="float32", source="synthesized"),),
        batch_size=8,
        batches=1,
        seed=0,
        loss="mse",
        loss_value=1.25,
        mode="eval",
        device="cpu",
        output="output",
        saturation_cutoff=0.05,
        method="hooks",
    )
    return Report(
        tool=ToolInfo(name="gradcheck", version="0.0.test"),
        model=ModelInfo(path=path, format="state_dict", parameters=1234),
        probe=probe,
        layers=layers,
        findings=findings,
        histogram_edges=tuple(histogram_edges()) if histograms else None,
    )


def mixed_report(*, histograms: bool = False) -> Report:
    """Six rows covering every mark the charts draw: a finding, a dead and a saturated row, a zero
    variance (an all-dead layer), a NaN output, and a model-level finding."""
    layers = (
        row(0, "fc1", var=4.0, grad=0.1, histograms=histograms),
        row(1, "relu()", kind=RowKind.ACTIVATION, var=1.5, grad=0.2, dead=0.6, histograms=histograms),
        row(2, "fc2", var=0.04, grad=0.01, histograms=histograms),
        row(3, "relu()#1", kind=RowKind.ACTIVATION, var=0.0, grad=0.0, dead=1.0, histograms=histograms),
        row(4, "fc3", nan=5, grad=None, histograms=histograms),
        row(5, "sigmoid()", kind=RowKind.ACTIVATION, var=0.2, grad=1e-4, saturated=0.7, histograms=histograms),
    )
    findings = (
        finding("GC101", "relu()"),
        finding("GC101", "relu()#1"),
        finding("GC102", "sigmoid()", Severity.WARNING, rule="saturated-activation"),
        finding("GC003", None, Severity.INFO, rule="whole-model"),
    )
    return report(layers, findings, histograms=histograms)
