"""Designs the gate must not mistake for faults: batch statistics without dropout for a model that
was never trained, layers off the signal's path, a block run on several scales, and classifier
heads initialised large on purpose. Each test also shows the fault the design resembles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gradcheck_cli import api
from gradcheck_cli.options import InputOptions, Mode, ProbeOptions
from gradcheck_cli.records import Report, Severity
from tests._check_models import IN_FEATURES, WIDTH, run


def loud(report: Report) -> list[tuple[str, str | None]]:
    return [(f.code, f.layer) for f in report.findings if f.severity.rank >= Severity.WARNING.rank]


class DropAlways(nn.Module):
    """Stochastic depth at its worst: in training the branch's output is multiplied by a mask that
    is zero for every sample (timm's drop_path with every draw dropped)."""

    def __init__(self, branch: nn.Module) -> None:
        super().__init__()
        self.branch = branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(x.shape[0], 1) if self.training else torch.ones(x.shape[0], 1)
        return x + self.branch(x) * mask


def _dropped_block_net() -> nn.Sequential:
    torch.manual_seed(0)
    branch = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU())
    return nn.Sequential(
        nn.Linear(IN_FEATURES, WIDTH), nn.BatchNorm1d(WIDTH), nn.ReLU(), DropAlways(branch), nn.Linear(WIDTH, 10)
    )


def _probe(mode: Mode) -> ProbeOptions:
    return ProbeOptions(inputs=InputOptions(input_shape=((32, IN_FEATURES),), seed=0), mode=mode)


def test_batch_stats_mode_normalises_with_the_batch_and_keeps_dropout_off() -> None:
    model = _dropped_block_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = api.inspect_module(model, _probe(Mode.BATCH_STATS))
    train = api.inspect_module(model, _probe(Mode.TRAIN))
    evaluated = api.inspect_module(model, _probe(Mode.EVAL))
    norm = {r.name: r for r in stats.layers}["1"]
    # Batch statistics: each channel has mean 0 and variance 1 over the batch (beta 0, gamma 1).
    assert abs(norm.output.mean) < 1e-5 and abs(norm.output.var - 1.0) < 0.05
    eval_norm = {r.name: r for r in evaluated.layers}["1"]
    assert abs(eval_norm.output.var - 1.0) > 0.2  # default running statistics: the identity
    branch = {r.name: r for r in stats.layers}["3.branch.0"]
    assert branch.grad is not None and branch.grad.norm is not None and branch.grad.norm > 0
    dropped = {r.name: r for r in train.layers}["3.branch.0"]
    assert dropped.grad is not None and dropped.grad.norm == 0.0  # train mode: the block is dropped
    assert stats.probe.mode == "batch-stats"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # running stats restored


def test_a_never_trained_model_is_gated_with_batch_statistics_not_train_mode() -> None:
    # Under full train mode the dropped block's layers get exactly zero gradient: GC203 on a
    # healthy model (what EfficientNet-B4's stochastic depth did on a two-sample probe).
    report = run(_dropped_block_net(), batch_size=32)
    assert loud(report) == []
    assert report.probe.mode == "batch-stats"
    assert any("batch-stats" in note for note in report.notes)
    train = api.check_module(_dropped_block_net(), _probe(Mode.TRAIN))
    assert ("GC203", "3.branch.0") in loud(train)


class PositionBiasAttention(nn.Module):
    """Swin V2's continuous position bias (an MLP on a coordinate table) and ConViT's gate (a
    sigmoid of a parameter), around projections at the transformers' std 0.02."""

    def __init__(self, width: int, tokens: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.bias_mlp = nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 1))
        self.gate = nn.Parameter(torch.ones(1))
        coords = torch.stack(torch.meshgrid(torch.arange(tokens), torch.arange(tokens), indexing="ij"), -1)
        self.register_buffer("table", (coords.float() - coords.float().mean()).unsqueeze(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        bias = self.bias_mlp(self.table).squeeze(-1)  # (1, tokens, tokens): no sample dimension
        logits = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5 + bias
        gate = torch.sigmoid(self.gate)
        return self.proj(gate * torch.softmax(logits, dim=-1) @ v)


class TinyTransformer(nn.Module):
    def __init__(self, blocks: int = 3, width: int = 32, tokens: int = 8) -> None:
        super().__init__()
        self.embed = nn.Linear(IN_FEATURES, width)
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(blocks))
        self.attn = nn.ModuleList(PositionBiasAttention(width, tokens) for _ in range(blocks))
        self.final = nn.LayerNorm(width)
        self.head = nn.Linear(width, 10)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for norm, attn in zip(self.norms, self.attn, strict=True):
            x = x + attn(norm(x))
        return self.head(self.final(x).mean(1))


def test_position_bias_tables_and_parameter_gates_are_off_the_signal_path() -> None:
    torch.manual_seed(0)
    model = TinyTransformer()
    report = api.check_module(model, ProbeOptions(inputs=InputOptions(input_shape=((2, 8, IN_FEATURES),), seed=0)))
    assert [code for code, _ in loud(report)] == []
    rows = {r.name: r for r in report.layers}
    assert "no sample dimension" in rows["attn.0.bias_mlp.0"].reasons["init"]
    assert "normalisation" in rows["attn.0.qkv"].reasons["init"]
    # With one sample the test cannot tell a table from the signal: the MLP is judged (at std
    # 0.02, far below He), though not a finding (its small output is added to the logits).
    single = api.check_module(model, ProbeOptions(inputs=InputOptions(input_shape=((1, 8, IN_FEATURES),), seed=0)))
    judged = {r.name: r for r in single.layers}["attn.0.bias_mlp.0"]
    assert judged.init is not None and judged.init.ratio < 1 / 3


class MultiScaleBlock(nn.Module):
    """CoaT's parallel blocks: one MLP run on three scales one after the other, then each scale's
    own norm. In execution order the MLP's first call passes three GELUs before a norm."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(3))
        for fc in (self.fc1, self.fc2):
            nn.init.trunc_normal_(fc.weight, std=0.02)

    def forward(self, scales: list[torch.Tensor]) -> list[torch.Tensor]:
        mixed = [x + self.fc2(self.act(self.fc1(x))) for x in scales]
        return [norm(x) for norm, x in zip(self.norms, mixed, strict=True)]


class MultiScaleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(IN_FEATURES, 32)
        self.blocks = nn.ModuleList(MultiScaleBlock() for _ in range(2))
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scales = [self.embed(x), self.embed(x[:, ::2]), self.embed(x[:, ::4])]
        for block in self.blocks:
            scales = block(scales)
        return self.head(torch.cat(scales, 1).mean(1))


def test_a_block_run_on_several_scales_is_bounded_by_each_scales_norm() -> None:
    torch.manual_seed(0)
    report = api.check_module(
        MultiScaleNet(), ProbeOptions(inputs=InputOptions(input_shape=((2, 8, IN_FEATURES),), seed=0))
    )
    assert loud(report) == []
    rows = {r.name: r for r in report.layers}
    assert "normalisation 'blocks.0.norms.0'" in rows["blocks.0.fc1"].reasons["init"]


def test_a_large_classifier_head_is_a_choice_but_a_large_body_layer_is_not() -> None:
    # Inception v3's classifier: std 0.1 on 2048 -> 1000, where every fan prescribes at most
    # 1/1000 (here 512 -> 1000: variance 0.01 is over 5 times the closest fan's 1/512).
    torch.manual_seed(0)
    wide = 512
    body = [nn.Linear(IN_FEATURES, wide), nn.ReLU(), nn.Linear(wide, wide), nn.ReLU()]
    for layer in body[::2]:
        assert isinstance(layer, nn.Linear)
        nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
    head = nn.Linear(wide, 1000)
    nn.init.normal_(head.weight, std=0.1)
    report = run(nn.Sequential(*body, head))
    assert loud(report) == []
    scale = {r.name: r for r in report.layers}["4"].init
    assert scale is not None and scale.ratio > 3.0  # measured, and over the bound: exempt as a head
    with torch.no_grad():
        body[2].weight.mul_(4.0)  # a body layer 16 times He's variance: compounds with depth
    assert ("GC301", "2") in loud(run(nn.Sequential(*body, head)))


def _trained_with_dead_units() -> nn.Sequential:
    """A trained network (its BatchNorm statistics moved) whose second ReLU's units are off for
    every sample of standard-normal noise: their BatchNorm shifts them far below zero."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN_FEATURES, WIDTH), nn.BatchNorm1d(WIDTH), nn.ReLU(), nn.Linear(WIDTH, 10))
    norm = model[1]
    assert isinstance(norm, nn.BatchNorm1d)
    with torch.no_grad():
        norm.running_mean.normal_(0.0, 0.3)
        norm.running_var.uniform_(0.5, 2.0)
        norm.num_batches_tracked.fill_(1000)
        norm.bias[: WIDTH * 3 // 4].fill_(-50.0)
    return model.eval()


def test_dead_units_of_a_trained_model_on_synthetic_inputs_are_information(tmp_path: Path) -> None:
    report = run(_trained_with_dead_units())
    dead = [f for f in report.findings if f.code == "GC101"]
    assert [(f.layer, f.severity) for f in dead] == [("2", Severity.INFO)]
    assert "trained" in dead[0].message and "--input" in dead[0].message
    assert loud(report) == []
    # Real samples (a file) judge the same units: the finding is an error again.
    samples = tmp_path / "samples.npy"
    np.save(samples, torch.randn(32, IN_FEATURES).numpy())
    real = api.check_module(_trained_with_dead_units(), ProbeOptions(inputs=InputOptions(input=samples, seed=0)))
    assert ("GC101", "2") in loud(real)
    # At init the same units are a fault whatever the input.
    fresh = _trained_with_dead_units()
    fresh[1].reset_running_stats()
    assert ("GC101", "2") in loud(run(fresh))


def _hf_model(name: str) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    from bench.hf_sources import ARCHITECTURES

    kwargs = next(k for n, _, k in ARCHITECTURES if n == name)
    cls = getattr(transformers, name)
    torch.manual_seed(0)
    model: nn.Module = cls(cls.config_class(**kwargs))
    return model


def test_attention_projections_at_a_small_init_are_not_a_vanishing_gradient() -> None:
    report = api.check_module(_hf_model("BartForConditionalGeneration"), ProbeOptions())
    assert loud(report) == []
    rows = {r.name: r for r in report.layers}
    query = rows["model.encoder.layers.0.self_attn.q_proj"]
    # The design the rules recognise: a gradient of second order, below GC203's absolute bound.
    assert query.grad is not None and query.grad.norm is not None and query.grad.norm < 1e-7
    attention = next(r for r in report.layers if r.attention is not None)
    assert attention.attention is not None
    entropy = sum(attention.attention.entropy) / len(attention.attention.entropy)
    assert entropy >= 0.5 * attention.attention.max_entropy


def test_mamba_softplus_step_size_is_not_saturation() -> None:
    report = api.check_module(_hf_model("MambaForCausalLM"), ProbeOptions())
    assert loud(report) == []
    softplus = [r for r in report.layers if r.fn == "softplus"]
    # Measured and shown: most of the step-size softplus sits on its flat side by design.
    assert softplus and all(r.saturation is not None and r.saturation.fraction > 0.5 for r in softplus)


class Branchy(nn.Module):
    """Blocks x + f(x) whose f is two layers at PyTorch's default init (1/6 of He each)."""

    def __init__(self, skip: bool, blocks: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Linear(IN_FEATURES, WIDTH)
        nn.init.kaiming_normal_(self.stem.weight, nonlinearity="relu")
        self.branches = nn.ModuleList(
            nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH), nn.ReLU()) for _ in range(blocks)
        )
        self.skip = skip
        self.head = nn.Linear(WIDTH, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        for branch in self.branches:
            x = x + branch(x) if self.skip else branch(x)
        return self.head(x)


def test_small_layers_compound_only_where_the_signal_shrinks() -> None:
    # Without skips the eight small layers shrink the signal layer after layer: GC301 on each.
    plain = run(Branchy(skip=False))
    assert {layer for code, layer in loud(plain) if code == "GC301"} == {
        f"branches.{b}.{i}" for b in range(4) for i in (0, 2)
    }
    # With skips the same layers only scale what each branch adds: the signal keeps its size.
    assert [code for code, _ in loud(run(Branchy(skip=True)))] == []


def test_a_depthwise_conv_between_its_two_fans_is_a_compromise() -> None:
    torch.manual_seed(0)
    # PyTorch's default init on a depthwise 3x3 conv: variance 1/27, between He with fan_in (2/9)
    # and with PyTorch's fan_out (2/(64*9)); a compromise like Glorot's average, not a fault.
    model = nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1, groups=64),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64 * 8 * 8, 10),
    )
    nn.init.kaiming_normal_(model[0].weight, nonlinearity="relu")
    report = api.check_module(model, ProbeOptions(inputs=InputOptions(input_shape=((2, 3, 8, 8),), seed=0)))
    scale = {r.name: r for r in report.layers}["2"].init
    assert scale is not None and not 1 / 3 <= scale.ratio <= 3  # far from the closest single fan
    assert [code for code, _ in loud(report)] == []


class ZeroLastWithExcitation(nn.Module):
    """NF-ResNet's block: the branch's last conv starts at zero (zero_init_last), and a
    squeeze-excitation block after it sees only zeros, so its ReLU outputs zeros by design."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 1)
        nn.init.zeros_(self.conv3.weight)
        nn.init.zeros_(self.conv3.bias)
        self.fc1, self.fc2 = nn.Conv2d(8, 32, 1), nn.Conv2d(32, 8, 1)
        nn.init.zeros_(self.fc1.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.conv3(torch.relu(self.conv1(x)))
        gate = torch.sigmoid(self.fc2(torch.relu(self.fc1(branch.mean((2, 3), keepdim=True)))))
        return x + branch * gate


def test_units_silent_behind_a_zero_initialised_branch_are_by_design() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), ZeroLastWithExcitation(), ZeroLastWithExcitation())
    nn.init.kaiming_normal_(model[0].weight, nonlinearity="relu")
    report = api.check_module(model, ProbeOptions(inputs=InputOptions(input_shape=((4, 3, 8, 8),), seed=0)))
    silent = [r for r in report.layers if r.dead is not None and r.dead.total and r.dead.units == r.dead.total]
    assert silent  # the excitation's ReLU: every unit at zero
    assert loud(report) == []
    assert any(f.code == "GC302" for f in report.findings)


class ClippableLinear(nn.Module):
    """Gemma 4's clippable linear layer: clamp bounds kept as buffers, infinite when open."""

    def __init__(self, low: float = float("-inf"), high: float = float("inf")) -> None:
        super().__init__()
        self.linear = nn.Linear(IN_FEATURES, WIDTH)
        self.register_buffer("input_min", torch.tensor(low))
        self.register_buffer("input_max", torch.tensor(high))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.clamp(self.input_min, self.input_max))


def _clippable(**bounds: float) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(ClippableLinear(**bounds), nn.ReLU(), nn.Linear(WIDTH, 10))
    nn.init.kaiming_normal_(model[0].linear.weight, nonlinearity="relu")
    return model


def test_infinite_bounds_are_settings_but_nan_is_damage(tmp_path: Path) -> None:
    assert [f.code for f in run(_clippable()).findings if f.code == "GC001"] == []
    path = tmp_path / "clippable.pt2"
    model = _clippable()
    torch.export.save(torch.export.export(model, (torch.randn(2, IN_FEATURES),)), str(path))
    assert api.inspect(path).layers  # loads: an open bound is not a damaged checkpoint
    nan = run(_clippable(high=float("nan")))
    assert ("GC001", "0.input_max") in [(f.code, f.layer) for f in nan.findings]


def test_dead_units_on_pooled_inputs_need_four_sigmas() -> None:
    from dataclasses import replace

    from gradcheck_cli.gate.rules import _chance_margin

    row = run(_clippable()).layers[0]
    assert _chance_margin(replace(row, shape=(2, 8, 1, 1))) == 4.0  # one vector per sample
    assert _chance_margin(replace(row, shape=(2, 8, 4, 4))) == 2.0
    assert _chance_margin(replace(row, shape=(32, 64))) == 2.0


class OneChannelAttention(nn.Module):
    """CSATv2's spatial attention: a LayerNorm over one channel (its output is its bias, 0 at
    init) before a 1 -> 3 qkv projection, added back to the map."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(1)
        self.qkv = nn.Linear(1, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.norm(x.flatten(2).transpose(1, 2))  # (B, N, 1)
        q, k, v = self.qkv(tokens).unbind(-1)
        attended = (q.unsqueeze(-1) @ k.unsqueeze(-2)).softmax(-1) @ v.unsqueeze(-1)
        return x + attended.transpose(1, 2).reshape(x.shape)


def test_a_one_feature_layernorm_is_a_zero_initialised_gate() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 1, 3, padding=1), OneChannelAttention(), nn.Flatten(), nn.Linear(16, 10))
    report = api.check_module(model, ProbeOptions(inputs=InputOptions(input_shape=((2, 3, 4, 4),), seed=0)))
    qkv = {r.name: r for r in report.layers}["1.qkv"]
    assert qkv.grad is not None and qkv.grad.norm == 0.0  # exactly: its input is the zero bias
    assert loud(report) == []
    assert [f.layer for f in report.findings if f.code == "GC302"] == ["1.norm.bias"]


def test_batchnorm_affine_drawn_at_init_is_not_training() -> None:
    # RepVGG (timm) draws every BatchNorm's gamma from N(0.1, 0.1) and beta from N(0, 0.1) at init.
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for cin, cout in ((3, 16), (16, 16), (16, 16)):
        conv, norm = nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout)
        nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
        nn.init.normal_(norm.weight, 0.1, 0.1)
        nn.init.normal_(norm.bias, 0.0, 0.1)
        layers += [conv, norm, nn.ReLU()]
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    report = api.check_module(model, ProbeOptions(inputs=InputOptions(input_shape=((2, 3, 16, 16),), seed=0)))
    assert loud(report) == []
    (never,) = [f for f in report.findings if f.code == "GC003"]
    assert never.severity is Severity.INFO and "drawn at init" in never.message
    assert report.probe.mode == "batch-stats"


class Excite(nn.Module):
    """A squeeze-excitation block whose reduction units are all off on the probe."""

    def __init__(self, reduced: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        nn.init.kaiming_normal_(self.conv.weight, nonlinearity="relu")
        self.fc1, self.fc2 = nn.Conv2d(16, reduced, 1), nn.Conv2d(reduced, 16, 1)
        with torch.no_grad():
            self.fc1.bias.fill_(-100.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x))
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


def test_pooled_units_off_within_chance_leave_their_producer_alone() -> None:
    probe = ProbeOptions(inputs=InputOptions(input_shape=((2, 3, 8, 8),), seed=0))

    def net(reduced: int) -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(Excite(reduced), nn.Flatten(), nn.Linear(16 * 64, 10))

    # 8 units off: as likely as a coin flip per unit on two pooled samples (1 in 256): no finding.
    assert loud(api.check_module(net(8), probe)) == []
    # 64 units off is no coin flip: GC101 names the layer, and GC203 its producer's zero gradient.
    many = loud(api.check_module(net(64), probe))
    assert any(code == "GC101" for code, _ in many)
    assert ("GC203", "0.fc1") in many


class LayerScaled(nn.Module):
    """BEiT's layout: a patch projection, blocks whose branches LayerScale closes (1e-6), a final
    norm and a head initialised tiny (timm's head_init_scale)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(IN_FEATURES, 32)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(32), nn.Linear(32, 32), nn.GELU()) for _ in range(3))
        self.gammas = nn.ParameterList(nn.Parameter(torch.full((32,), 1e-6)) for _ in range(3))
        self.norm = nn.LayerNorm(32)
        self.head = nn.Linear(32, 10)
        with torch.no_grad():
            self.head.weight.mul_(1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block, gamma in zip(self.blocks, self.gammas, strict=True):
            x = x + gamma * block(x)
        return self.head(self.norm(x))


def test_no_depth_ratio_when_every_block_is_gated() -> None:
    report = run(LayerScaled())
    assert loud(report) == []
    assert any(f.code == "GC302" for f in report.findings)


def test_a_torchscript_archive_under_batch_stats_keeps_dropout_off(tmp_path: Path) -> None:
    """TorchScript without BatchNorm: batch-stats is eval, dropout included (the whole script was
    put in train mode before). With BatchNorm the converter cannot translate the training branch:
    a one-line error that says to pass `mode` eval."""
    from gradcheck_cli.errors import ProbeError

    torch.manual_seed(0)
    dropout = nn.Sequential(nn.Linear(IN_FEATURES, WIDTH), nn.ReLU(), nn.Dropout(0.9), nn.Linear(WIDTH, 10)).eval()
    torch.jit.script(dropout).save(str(tmp_path / "dropout.pt"))
    inputs = InputOptions(input_shape=((8, IN_FEATURES),), seed=0)
    stats = api.inspect(tmp_path / "dropout.pt", probe=ProbeOptions(inputs=inputs, mode=Mode.BATCH_STATS))
    evaluated = api.inspect(tmp_path / "dropout.pt", probe=ProbeOptions(inputs=inputs, mode=Mode.EVAL))
    assert [(r.name, r.output_grad_norm) for r in stats.layers] == [
        (r.name, r.output_grad_norm) for r in evaluated.layers
    ]
    normed = nn.Sequential(nn.Linear(IN_FEATURES, WIDTH), nn.BatchNorm1d(WIDTH), nn.Linear(WIDTH, 10)).eval()
    torch.jit.script(normed).save(str(tmp_path / "normed.pt"))
    with pytest.raises(ProbeError) as info:
        api.inspect(tmp_path / "normed.pt", probe=ProbeOptions(inputs=inputs, mode=Mode.BATCH_STATS))
    assert "mode` eval" in (info.value.hint or "")
