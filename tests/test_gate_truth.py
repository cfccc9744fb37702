"""The gate tells the truth (issue 16): deliberate designs are not faults, real faults still are.

Each model here is either a stock model at its library's default init (no warning may fire), a
deliberate design (zero-initialised branches: one GC302 info, no GC203), or a real fault built by
actually training (BatchNorm statistics frozen during training: GC003 warning).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradcheck_cli.gate.check import check_module
from gradcheck_cli.gate.init_scale import weight_verdict
from gradcheck_cli.options import InputOptions, ProbeOptions
from gradcheck_cli.records import Report, Severity
from tests._check_models import IN_FEATURES, WIDTH, run


def loud(report: Report) -> list[tuple[str, str | None, str]]:
    """Findings at warning or above, readable in an assertion message."""
    return [(f.code, f.layer, f.message) for f in report.findings if f.severity.rank >= Severity.WARNING.rank]


def of(report: Report, code: str) -> list[tuple[str | None, Severity, float | None]]:
    return [(f.layer, f.severity, f.value) for f in report.findings if f.code == code]


def image_probe(size: int = 64) -> ProbeOptions:
    return ProbeOptions(inputs=InputOptions(input_shape=((2, 3, size, size),), seed=0))


# --- GC003: never trained (info) versus trained with frozen statistics (warning) -------------


def _bn_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN_FEATURES, WIDTH), nn.BatchNorm1d(WIDTH), nn.ReLU(), nn.Linear(WIDTH, 10))


def test_fresh_batchnorm_is_never_trained_information_once() -> None:
    report = run(nn.Sequential(*_bn_mlp(), nn.BatchNorm1d(10)).eval())
    assert of(report, "GC003") == [("1", Severity.INFO, 2.0)]
    assert "not been trained" in next(f.message for f in report.findings if f.code == "GC003")
    assert loud(report) == []


def test_trained_with_frozen_batchnorm_statistics_is_a_warning() -> None:
    # A real training run with the BatchNorm in eval mode: gamma/beta learn, the statistics
    # are never updated (the bug GC003 exists for).
    model = _bn_mlp().eval()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(1)
    for _ in range(20):
        x = torch.randn(64, IN_FEATURES, generator=generator)
        loss = F.cross_entropy(model(x), torch.randint(0, 10, (64,), generator=generator))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert int(model[1].num_batches_tracked) == 0  # the statistics really never moved
    report = run(model)
    assert of(report, "GC003") == [("1", Severity.WARNING, 0.0)]
    assert "trained" in next(f.message for f in report.findings if f.code == "GC003")


# --- GC302: zero-initialised branches in any spelling ------------------------------------------


class LoRALinear(nn.Module):
    """peft's spelling: base Linear plus lora_B(lora_A(x)) * alpha/r, with B = 0 at init."""

    def __init__(self, d_in: int, d_out: int, r: int = 4) -> None:
        super().__init__()
        self.base = nn.Linear(d_in, d_out)
        self.lora_A = nn.Linear(d_in, r, bias=False)
        self.lora_B = nn.Linear(r, d_out, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(x)) * 2.0


def _he(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.weight.any():
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    return model


def test_lora_adapter_at_init_is_one_info_and_a_does_not_warn() -> None:
    torch.manual_seed(0)
    model = _he(
        nn.Sequential(
            LoRALinear(IN_FEATURES, WIDTH), nn.ReLU(), LoRALinear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, 10)
        )
    )
    report = run(model)
    gates = [f for f in report.findings if f.code == "GC302"]
    assert len(gates) == 1 and gates[0].severity is Severity.INFO
    assert gates[0].layer == "0.lora_B.weight" and gates[0].value == 2.0
    assert "LoRA" in gates[0].message
    # lora_A's gradient is exactly 0 (dL/dA = B^T ... = 0): by design, not a GC203 finding.
    lora_a = next(r for r in report.layers if r.name == "0.lora_A")
    assert lora_a.grad is not None and lora_a.grad.norm == 0.0
    assert loud(report) == []


def test_the_same_lora_with_b_trained_has_no_gate() -> None:
    torch.manual_seed(0)
    model = _he(nn.Sequential(LoRALinear(IN_FEATURES, WIDTH), nn.ReLU(), nn.Linear(WIDTH, 10)))
    with torch.no_grad():
        model[0].lora_B.weight.normal_(0.0, 0.01)
    report = run(model)
    assert of(report, "GC302") == [] and of(report, "GC203") == []


class ReZeroBlock(nn.Module):
    """ReZero (Bachlechner et al. 2020), functional spelling: x + alpha * f(x), alpha = 0."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)
        self.alpha = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.alpha * self.fc2(F.relu(self.fc1(x)))


def test_rezero_scalar_gate_in_functional_spelling() -> None:
    torch.manual_seed(0)
    model = _he(
        nn.Sequential(nn.Linear(IN_FEATURES, WIDTH), *[ReZeroBlock(WIDTH) for _ in range(3)], nn.Linear(WIDTH, 10))
    )
    report = run(model)
    assert of(report, "GC302") == [("1.alpha", Severity.INFO, 3.0)]
    assert "6 layer(s)" in next(f.message for f in report.findings if f.code == "GC302")
    assert loud(report) == []


def test_a_dead_branch_that_is_not_a_gate_still_warns() -> None:
    # Zero gradient with no zero parameter to explain it: a dead ReLU, GC203 must stay.
    torch.manual_seed(0)
    model = _he(
        nn.Sequential(
            nn.Linear(IN_FEATURES, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, 10)
        )
    )
    with torch.no_grad():
        model[2].bias.fill_(-1e3)
    report = run(model)
    assert ("0", Severity.WARNING, 0.0) in of(report, "GC203")
    assert of(report, "GC302") == []


class AdaLNZeroBlock(nn.Module):
    """DiT's block (Peebles & Xie 2023): shift/scale/gate from the condition, modulation at 0."""

    def __init__(self, width: int, cond: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.ada = nn.Linear(cond, 3 * width)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.ada(F.silu(c)).chunk(3, dim=-1)
        return x + gate * self.mlp(self.norm(x) * (1 + scale) + shift)


class TinyDiT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(IN_FEATURES, WIDTH)
        self.cond = nn.Linear(IN_FEATURES, WIDTH)
        self.blocks = nn.ModuleList(AdaLNZeroBlock(WIDTH, WIDTH) for _ in range(2))
        self.head = nn.Linear(WIDTH, IN_FEATURES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, c = self.embed(x), self.cond(x)
        for block in self.blocks:
            h = block(h, c)
        return self.head(h)


def test_dit_adaln_zero_is_a_zero_matrix_gate() -> None:
    report = run(TinyDiT())
    assert of(report, "GC302") == [("blocks.0.ada.weight", Severity.INFO, 2.0)]
    assert "adaLN" in next(f.message for f in report.findings if f.code == "GC302")
    assert loud(report) == []


# --- stock models at their libraries' default init (the issue's table) -------------------------


def test_torchvision_resnet18_default_and_zero_init_residual() -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    report = check_module(torchvision.models.resnet18(), image_probe())
    assert loud(report) == []
    assert [(f.code, f.severity) for f in report.findings] == [("GC003", Severity.INFO)]
    torch.manual_seed(0)
    zeroed = check_module(torchvision.models.resnet18(zero_init_residual=True), image_probe())
    assert loud(zeroed) == []
    assert of(zeroed, "GC302") == [("layer1.0.bn2.weight", Severity.INFO, 8.0)]


def test_timm_resnet18_zero_init_last() -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    report = check_module(timm.create_model("resnet18"), image_probe())
    assert loud(report) == []
    assert of(report, "GC302") == [("layer1.0.bn2.weight", Severity.INFO, 8.0)]
    assert "16 layer(s)" in next(f.message for f in report.findings if f.code == "GC302")


def test_bert_and_gpt2_at_default_init() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    bert = transformers.BertForMaskedLM(
        transformers.BertConfig(
            num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=128, vocab_size=500
        )
    )
    report = check_module(bert, ProbeOptions())
    assert loud(report) == []
    rows = {r.name: r for r in report.layers}
    assert "normalisation" in rows["bert.encoder.layer.0.attention.self.query"].reasons["init"]
    assert "tied" in rows["cls.predictions.decoder"].reasons["init"]
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=500))
    report = check_module(gpt2, ProbeOptions())
    assert loud(report) == []
    rows = {r.name: r for r in report.layers}
    assert "tied" in rows["lm_head"].reasons["init"]
    assert "normalisation" in rows["transformer.h.0.mlp.c_fc"].reasons["init"]


def test_gpt2_conv1d_is_measured_like_a_linear_with_its_weight_transposed() -> None:
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    torch.manual_seed(0)
    first = pytorch_utils.Conv1D(WIDTH, IN_FEATURES)  # weight (in=16, out=64)
    second = pytorch_utils.Conv1D(10, WIDTH)
    with torch.no_grad():
        first.weight.normal_(0.0, 1.0)  # N(0, 1): He wants 2/16 (fan_in) or 2/64 (fan_out)
        nn.init.xavier_normal_(second.weight)
    report = run(nn.Sequential(first, nn.ReLU(), second))
    scale = next(r.init for r in report.layers if r.name == "0")
    assert scale is not None and (scale.fan_in, scale.fan_out) == (IN_FEATURES, WIDTH)
    ((layer, _severity, value),) = of(report, "GC301")
    assert layer == "0" and value == pytest.approx(IN_FEATURES / 2, rel=0.15)  # the closer fan: fan_in


def test_he_fan_out_is_accepted_like_fan_in() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN_FEATURES, 256), nn.ReLU(), nn.Linear(256, 10))
    nn.init.kaiming_normal_(model[0].weight, mode="fan_out", nonlinearity="relu")
    nn.init.xavier_normal_(model[2].weight)
    report = run(model)
    assert of(report, "GC301") == []
    scale = report.layers[0].init
    assert scale is not None and scale.ratio == pytest.approx(1.0, rel=0.1)
    assert scale.expected_var == pytest.approx(2 / 256)


# --- GC301 judges only weights at init, and says what decided ----------------------------------


@pytest.mark.parametrize("draw", ["normal", "uniform", "orthogonal", "trunc_normal", "xavier"])
def test_every_init_family_passes_the_iid_test(draw: str) -> None:
    torch.manual_seed(0)
    weight = torch.empty(256, 512)
    {
        "normal": lambda w: nn.init.normal_(w, std=0.02),
        "uniform": lambda w: nn.init.uniform_(w, -0.1, 0.1),
        "orthogonal": nn.init.orthogonal_,
        "trunc_normal": lambda w: nn.init.trunc_normal_(w, std=1.0),
        "xavier": nn.init.xavier_uniform_,
    }[draw](weight)
    verdict = weight_verdict(weight)
    assert verdict.at_init, verdict.evidence


@pytest.mark.parametrize("change", ["heavy_tails", "unit_scales", "mean"])
def test_trained_like_weights_fail_the_iid_test(change: str) -> None:
    torch.manual_seed(0)
    weight = torch.randn(256, 512) * 0.05
    if change == "heavy_tails":  # what SGD leaves: a Laplace-like bulk with large outliers
        weight = torch.distributions.StudentT(3.0).sample((256, 512)) * 0.05
    elif change == "unit_scales":  # some output units grew, others shrank
        weight = weight * torch.exp(torch.randn(256, 1))
    else:
        weight = weight + 0.01
    verdict = weight_verdict(weight)
    assert not verdict.at_init and "not an init draw" in verdict.evidence


def test_optimizer_state_in_the_checkpoint_means_trained(tmp_path: Path) -> None:
    from gradcheck_cli import api
    from gradcheck_cli.gate.check import check_path

    (tmp_path / "arch.py").write_text(
        "from torch import nn\n\ndef mlp():\n"
        "    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 10))\n"
    )
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 10))
    with torch.no_grad():
        model[0].weight.normal_(0.0, 1.0)  # flagged at init; the optimizer key says it is not
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 3}, tmp_path / "ckpt.pt")
    options = ProbeOptions(inputs=InputOptions(input_shape=((8, 16),)))
    load = api.LoadOptions(arch=f"{tmp_path / 'arch.py'}:mlp")
    report = check_path(tmp_path / "ckpt.pt", load=load, probe=options)
    assert of(report, "GC301") == []
    assert "'optimizer'" in report.layers[0].reasons["init"]
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    bare = check_path(tmp_path / "bare.pt", load=load, probe=options)
    (finding,) = [f for f in bare.findings if f.code == "GC301"]
    assert finding.layer == "0" and "i.i.d. init test" in finding.message


def _mtcnn_onet() -> nn.Module:
    spec = importlib.util.find_spec("facenet_pytorch")  # locates the package without importing it
    if spec is None or spec.origin is None:
        pytest.skip(
            "facenet-pytorch is not installed (pip install --no-deps facenet-pytorch: its "
            "trained MTCNN weights ship inside the wheel)"
        )
    weights = Path(spec.origin).parent / "data" / "onet.pt"
    from bench.gate_corpus import ONet

    model = ONet()
    model.load_state_dict(torch.load(weights, weights_only=True))
    return model.eval()


def test_trained_mtcnn_onet_is_not_judged_as_an_init() -> None:
    report = check_module(_mtcnn_onet(), ProbeOptions(inputs=InputOptions(input_shape=((4, 3, 48, 48),))))
    assert loud(report) == []
    reasons = {r.name: r.reasons.get("init", "") for r in report.layers}
    for layer in ("conv2", "conv4", "dense5"):
        assert reasons[layer].startswith("not at init"), (layer, reasons[layer])


def test_weight_moments_in_blocks_equal_the_whole_matrix_formulas() -> None:
    """The i.i.d. test reads a weight in float64 row blocks (never a float64 copy of the whole):
    its moments against the whole-matrix formulas, on a matrix of several blocks whose rows and
    columns have different scales (so every moment differs from every other)."""
    from gradcheck_cli.gate.init_scale import _weight_moments

    generator = torch.Generator().manual_seed(3)
    rows, cols = 1500, 700  # 1.05M values: 5 blocks
    matrix = torch.randn(rows, cols, generator=generator) * torch.linspace(0.5, 1.5, rows)[:, None]
    matrix = (matrix * torch.linspace(1.0, 2.0, cols)[None, :] + 0.1).to(torch.bfloat16)
    whole = matrix.double()
    centred = whole - whole.mean()
    got = _weight_moments(matrix)
    assert got.count == rows * cols
    assert got.mean == pytest.approx(float(whole.mean()), rel=1e-12)
    assert got.variance == pytest.approx(float((centred**2).mean()), rel=1e-12)
    assert got.fourth == pytest.approx(float((centred**4).mean()), rel=1e-12)
    assert got.unit_spread == pytest.approx(float(whole.var(dim=1).var()), rel=1e-10)
    assert got.input_spread == pytest.approx(float(whole.T.var(dim=1).var()), rel=1e-10)
