"""The torch reinit pass: the paper results, auto's choices, and what must not change."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from gradcheck_cli.options import (  # noqa: E402
    Distribution,
    FanMode,
    RecurrentInit,
    ReinitOptions,
    Scheme,
)
from gradcheck_cli.probe.batch import ProbeBatch  # noqa: E402
from gradcheck_cli.rewrite.reinit_records import ActivationSource, LayerInit  # noqa: E402
from gradcheck_cli.rewrite.torch_reinit import reinit_module  # noqa: E402


def batch(*shape: int, seed: int = 0) -> list[ProbeBatch]:
    generator = torch.Generator().manual_seed(seed)
    return [ProbeBatch((torch.randn(*shape, generator=generator),))]


def by_name(layers: list[LayerInit]) -> dict[str, LayerInit]:
    return {layer.name: layer for layer in layers}


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8)))


class Deep(nn.Module):
    """depth square Linear layers, each followed by ``act``; outputs every activation."""

    def __init__(self, width: int, depth: int, act: nn.Module) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = self.act(layer(x))
        return x


def activation_variances(model: Deep, x: torch.Tensor) -> tuple[list[float], list[float]]:
    """(pre-activation variances, post-activation variances) per layer, measured by hand."""
    pre, post = [], []
    with torch.no_grad():
        h = x
        for layer in model.layers:
            z = layer(h)
            h = model.act(z)
            pre.append(float(z.var()))
            post.append(float(h.var()))
    return pre, post


def old_uniform(model: nn.Module) -> None:
    """The old default U[-1/sqrt(n_in), 1/sqrt(n_in)] (docs/theory.md#variance-through-a-layer)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                bound = 1.0 / math.sqrt(module.in_features)
                module.weight.uniform_(-bound, bound)
                module.bias.zero_()


# ----------------------------------------------------------------------------- the paper results


def test_he_keeps_a_20_layer_relu_mlp_within_a_factor_2_of_the_input_variance() -> None:
    torch.manual_seed(0)
    model = Deep(512, 20, nn.ReLU())  # wide: the product of 20 random layer gains stays near 1
    probe = batch(16, 512)
    result = reinit_module(model, probe, options=ReinitOptions(scheme=Scheme.AUTO))
    assert {layer.scheme for layer in result.layers} == {"he"}
    x = torch.randn(512, 512)
    _, post = activation_variances(result.module, x)  # type: ignore[arg-type]
    input_variance = float(x.var())
    assert all(0.5 * input_variance <= v <= 2.0 * input_variance for v in post), post
    # The same check fails with the old init: it is a real test.
    old_uniform(model)
    _, old_post = activation_variances(model, x)
    assert old_post[-1] < 1e-6 * input_variance


def test_glorot_keeps_a_20_layer_tanh_mlp_from_collapsing_where_the_old_init_shrinks_by_a_third() -> None:
    torch.manual_seed(0)
    model = Deep(256, 20, nn.Tanh())
    x = torch.randn(512, 256)
    result = reinit_module(model, batch(16, 256), options=ReinitOptions(scheme=Scheme.GLOROT))
    _, post = activation_variances(result.module, x)  # type: ignore[arg-type]
    assert min(post) >= 0.25 * post[0], post  # settles (at ~0.42 with tanh's 5/3 gain), no decay
    assert post[-1] > 0.3
    old_uniform(model)
    old_pre, _ = activation_variances(model, x)
    ratios = [b / a for a, b in itertools.pairwise(old_pre[1:13])]
    geometric = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    assert geometric == pytest.approx(1 / 3, rel=0.1)  # n_in·Var(w) = 1/3, tanh ~linear near 0


def lsuv_model(kind: str) -> tuple[nn.Module, list[ProbeBatch]]:
    """A seeded MLP (ReLU and tanh) or CNN (grouped convolution) with its probe batch."""
    torch.manual_seed(0)
    if kind == "mlp":
        return (
            nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10)),
            batch(64, 32),
        )
    return (
        nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, groups=2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(16 * 6 * 6, 10),
        ),
        batch(16, 3, 8, 8),
    )


@pytest.mark.parametrize("model_kind", ["mlp", "cnn"])
def test_lsuv_gives_every_layer_output_variance_1(model_kind: str) -> None:
    model, probe = lsuv_model(model_kind)
    options = ReinitOptions(scheme=Scheme.LSUV)
    result = reinit_module(model, probe, options=options)
    outputs: dict[str, float] = {}
    handles = [
        sub.register_forward_hook(
            lambda _m, _i, out, name=name: outputs.__setitem__(name, float(out.double().var(unbiased=False)))
        )
        for name, sub in result.module.named_modules()
        if isinstance(sub, (nn.Linear, nn.Conv2d))
    ]
    try:
        with torch.no_grad():
            result.module(*probe[0].args)
    finally:
        for handle in handles:
            handle.remove()
    assert len(result.layers) == len(outputs)
    for layer in result.layers:
        assert layer.lsuv is not None and layer.lsuv.converged
        assert layer.lsuv.iterations >= 1
        assert abs(outputs[layer.name] - 1.0) <= options.lsuv_tolerance
        assert layer.lsuv.variance == pytest.approx(outputs[layer.name], rel=1e-6)


# ----------------------------------------------------------------------------- auto's choices


class ModuleActs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.relu_fc, self.tanh_fc, self.selu_fc = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64)
        self.leaky_fc, self.sigmoid_fc, self.head = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 8)
        self.relu, self.tanh, self.selu = nn.ReLU(), nn.Tanh(), nn.SELU()
        self.leaky, self.sigmoid = nn.LeakyReLU(0.2), nn.Sigmoid()
        self.norm = nn.BatchNorm1d(64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.norm(self.relu_fc(x)))  # BatchNorm in between: still ReLU that follows
        x = self.tanh(self.tanh_fc(x))
        x = self.selu(self.selu_fc(x))
        x = self.leaky(self.leaky_fc(x))
        x = self.sigmoid(self.sigmoid_fc(x))
        return self.head(x)


class FunctionalActs(ModuleActs):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.norm(self.relu_fc(x)))
        x = self.tanh_fc(x).tanh()
        x = F.selu(self.selu_fc(x))
        x = F.leaky_relu(self.leaky_fc(x), 0.2)
        x = torch.sigmoid(self.sigmoid_fc(x))
        return self.head(x)


EXPECTED = {
    "relu_fc": ("he", "relu", math.sqrt(2 / 64)),
    "tanh_fc": ("glorot", "tanh", 5 / 3 / math.sqrt(64)),
    "selu_fc": ("lecun", "selu", math.sqrt(1 / 64)),
    "leaky_fc": ("he", "leaky_relu", math.sqrt(2 / (1.04 * 64))),
    "sigmoid_fc": ("glorot", "sigmoid", math.sqrt(1 / 64)),
    "head": ("glorot", None, math.sqrt(2 / 72)),
}


def check_auto(layers: list[LayerInit], *, source: ActivationSource) -> None:
    found = by_name(layers)
    for name, (scheme, activation, std) in EXPECTED.items():
        layer = found[name]
        assert (layer.scheme, layer.activation) == (scheme, activation), name
        assert layer.activation_source is source
        weight = layer.tensors[0]
        assert weight.std == pytest.approx(std, rel=1e-9), name
        assert layer.tensors[1].scheme == "zeros"


@pytest.mark.parametrize("cls", [ModuleActs, FunctionalActs])
def test_auto_reads_the_following_activation_from_execution(cls: type[nn.Module]) -> None:
    torch.manual_seed(0)
    result = reinit_module(cls(), batch(16, 64), options=ReinitOptions())
    check_auto(result.layers, source=ActivationSource.EXECUTION)
    assert any("running statistics of norm " in note for note in result.notes)  # after relu_fc: stale


@pytest.mark.parametrize("cls", [ModuleActs, FunctionalActs])
def test_auto_on_a_torch_export_program(cls: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model = cls().eval()
    program = torch.export.export(model, (torch.randn(4, 64),))
    result = reinit_module(program.module(), batch(4, 64), options=ReinitOptions())
    check_auto([layer for layer in result.layers if layer.name in EXPECTED], source=ActivationSource.EXECUTION)


@pytest.mark.parametrize("cls", [ModuleActs, FunctionalActs])
def test_auto_on_torchscript_reads_the_scripted_graph(cls: type[nn.Module]) -> None:
    torch.manual_seed(0)
    scripted = torch.jit.script(cls().eval())
    result = reinit_module(scripted, batch(4, 64), options=ReinitOptions())
    check_auto(result.layers, source=ActivationSource.GRAPH)
    assert not any("module definition order" in note for note in result.notes)


@pytest.mark.parametrize("distribution", [Distribution.NORMAL, Distribution.UNIFORM])
@pytest.mark.parametrize("mode", [FanMode.FAN_IN, FanMode.FAN_OUT, FanMode.FAN_AVG])
@pytest.mark.parametrize("scheme", [Scheme.HE, Scheme.GLOROT, Scheme.LECUN])
def test_written_conv_weights_have_the_formula_variance(
    scheme: Scheme, distribution: Distribution, mode: FanMode
) -> None:
    """Through the whole pass, after the cast to the layer's dtype (float32)."""
    model = nn.Sequential(nn.Conv2d(128, 256, 3), nn.ReLU())
    result = reinit_module(
        model, batch(1, 128, 5, 5), options=ReinitOptions(scheme=scheme, distribution=distribution, fan=mode)
    )
    fan = {FanMode.FAN_IN: 128 * 9, FanMode.FAN_OUT: 256 * 9, FanMode.FAN_AVG: (128 + 256) * 9 / 2}[mode]
    expected = (2.0 if scheme is Scheme.HE else 1.0) / fan
    weight = result.module[0].weight.detach().double()  # type: ignore[index]
    n = weight.numel()
    kurtosis = 3.0 if distribution is Distribution.NORMAL else 1.8
    assert abs(float(weight.pow(2).mean()) - expected) <= 4.5 * math.sqrt((kurtosis - 1) / n) * expected


def test_conv_transpose_with_groups_gets_theory_fans() -> None:
    model = nn.Sequential(nn.ConvTranspose2d(8, 12, 3, groups=4), nn.ReLU())
    result = reinit_module(model, batch(2, 8, 5, 5), options=ReinitOptions())
    weight = result.layers[0].tensors[0]
    assert (weight.fan_in, weight.fan_out) == (2 * 9, 12 * 9)
    assert weight.std == pytest.approx(math.sqrt(2 / 18))


# ----------------------------------------------------------------------------- what must not change


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(16, 32)
        self.middle = nn.Linear(32, 32)
        self.decoder = nn.Linear(32, 16)
        self.back = nn.Linear(32, 16, bias=False)
        self.back.weight = self.decoder.weight  # tied: one Parameter under two names

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.encoder(x))
        h = torch.tanh(self.middle(h))
        return self.decoder(h) + self.back(torch.relu(h))


def test_untouched_layers_are_bit_identical_and_the_input_module_is_not_modified() -> None:
    torch.manual_seed(0)
    model = Tied()
    before = snapshot(model)
    result = reinit_module(model, batch(8, 16), options=ReinitOptions(layers=("middle",)))
    assert [layer.name for layer in result.layers] == ["middle"]
    after = result.module.state_dict()
    for key, value in before.items():
        assert same_bits(model.state_dict()[key], value), f"the input module changed: {key}"
        if key.startswith("middle."):
            assert not torch.equal(after[key], value) or (key == "middle.bias" and not value.any())
        else:
            assert same_bits(after[key], value), key
        assert (after[key].shape, after[key].dtype, after[key].device) == (value.shape, value.dtype, value.device)


def test_shared_weights_get_one_new_tensor_and_stay_shared() -> None:
    torch.manual_seed(0)
    model = Tied()
    result = reinit_module(model, batch(8, 16), options=ReinitOptions())
    new = result.module
    assert new.back.weight is new.decoder.weight  # type: ignore[union-attr]
    assert not torch.equal(new.decoder.weight, model.decoder.weight)  # type: ignore[union-attr]
    records = by_name(result.layers)
    assert "decoder.weight" in records["decoder"].tensors[0].parameter
    assert "back.weight" in records["decoder"].tensors[0].shared_with
    assert "shares its weight" in records["back"].reason


def test_dtype_is_kept() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU()).double()
    result = reinit_module(model, [ProbeBatch((torch.randn(4, 8, dtype=torch.float64),))], options=ReinitOptions())
    assert result.module[0].weight.dtype == torch.float64  # type: ignore[index]


def test_norm_layers_change_only_with_the_flag() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    with torch.no_grad():
        model[1].weight.fill_(3.0)
        model[1].running_var.fill_(7.0)
    kept = reinit_module(model, batch(2, 3, 6, 6), options=ReinitOptions())
    assert torch.equal(kept.module[1].weight, model[1].weight)  # type: ignore[index]
    reset = reinit_module(model, batch(2, 3, 6, 6), options=ReinitOptions(reset_norm=True))
    norm = reset.module[1]  # type: ignore[index]
    assert torch.equal(norm.weight, torch.ones(4)) and torch.equal(norm.bias, torch.zeros(4))
    assert torch.equal(norm.running_var, torch.ones(4)) and torch.equal(norm.running_mean, torch.zeros(4))
    assert by_name(reset.layers)["0"].activation == "relu"


# ----------------------------------------------------------------------------- recurrent


@pytest.mark.parametrize("cls", [nn.RNN, nn.GRU, nn.LSTM])
@pytest.mark.parametrize("recurrent", [RecurrentInit.ORTHOGONAL, RecurrentInit.IDENTITY])
def test_recurrent_weights(cls: Any, recurrent: RecurrentInit) -> None:
    hidden, gates = 16, {nn.RNN: 1, nn.GRU: 3, nn.LSTM: 4}[cls]
    model = cls(8, hidden, num_layers=2, bidirectional=True)
    result = reinit_module(model, batch(5, 3, 8), options=ReinitOptions(recurrent=recurrent, forget_bias=True))
    params = dict(result.module.named_parameters())
    for name, value in params.items():
        if name.startswith("weight_hh"):
            for g in range(gates):
                block = value[g * hidden : (g + 1) * hidden].detach().double()
                if recurrent is RecurrentInit.IDENTITY:
                    assert torch.equal(block, torch.eye(hidden, dtype=torch.float64))
                else:
                    assert torch.allclose(block @ block.T, torch.eye(hidden, dtype=torch.float64), atol=1e-5)
        elif name.startswith("bias_ih") and cls is nn.LSTM:
            expected = torch.zeros(4 * hidden)
            expected[hidden : 2 * hidden] = 1.0  # PyTorch gate order i, f, g, o
            assert torch.equal(value.detach(), expected)
        elif name.startswith("bias"):
            assert not value.any()
    layer = result.layers[0]
    assert layer.activation_source is ActivationSource.INTERNAL
    expected_scheme = "glorot"  # tanh RNN and sigmoid gates
    assert layer.scheme == expected_scheme


def test_dead_relu_units_come_back() -> None:
    """A layer with dead units (large negative bias) revives after reinit: bias 0, He weights."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    with torch.no_grad():
        model[0].bias[:40] = -100.0
    x = torch.randn(64, 32)

    def dead(module: nn.Module) -> int:
        with torch.no_grad():
            return int((torch.relu(module[0](x)) == 0).all(dim=0).sum())  # type: ignore[index]

    assert dead(model) >= 40
    result = reinit_module(model, [ProbeBatch((x,))], options=ReinitOptions())
    assert dead(result.module) == 0


@pytest.mark.parametrize("model_kind", ["mlp", "cnn"])
def test_lsuv_in_one_pass_is_the_truncated_forward_loop(model_kind: str) -> None:
    # Cross-check: the single-pass LSUV must give exactly what re-running the model up to each
    # layer gives (same variances, same number of rescales, same final weights bit for bit).
    import copy

    from gradcheck_cli.rewrite.torch_reinit import _lsuv_by_truncated_forwards, _lsuv_in_one_pass, _tensors_by_name

    model, probe = lsuv_model(model_kind)
    start = reinit_module(model, probe, options=ReinitOptions(scheme=Scheme.ORTHOGONAL)).module
    weights = [name for name, p in start.named_parameters() if p.dim() > 1]
    options = ReinitOptions(scheme=Scheme.LSUV)
    one, loop = copy.deepcopy(start), copy.deepcopy(start)
    in_one_pass = _lsuv_in_one_pass(one, probe, weights, _tensors_by_name(one), options)
    loop_params = _tensors_by_name(loop)
    by_loop = {name: _lsuv_by_truncated_forwards(loop, probe, name, loop_params[name], options) for name in weights}
    assert in_one_pass == by_loop
    assert any(rescales >= 1 for _, _, rescales in in_one_pass.values())  # something was rescaled
    for key, value in loop.state_dict().items():
        assert same_bits(one.state_dict()[key], value), key


def test_probes_reuse_the_inferred_input_shapes(tmp_path: Any) -> None:
    # reinit builds the probe inputs once; the before/after probes then get the shapes written in
    # (no trial forward each) only where that rebuilds the very same tensors.
    from pathlib import Path

    from gradcheck_cli.model.formats import ModelFormat
    from gradcheck_cli.model.handle import LoadedModel
    from gradcheck_cli.model.torch_load import resolve_device
    from gradcheck_cli.options import InputOptions, ProbeOptions
    from gradcheck_cli.probe.batch import probe_inputs
    from gradcheck_cli.rewrite.reinit import _with_known_shapes

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 3, 32, 32))
    loaded = LoadedModel(path=Path("m.pt"), format=ModelFormat.TORCH_ZIP, module=model)
    probe = ProbeOptions(inputs=InputOptions(batch_size=3, seed=7))
    inputs = probe_inputs(model, probe.inputs, device=resolve_device("cpu"))
    known = _with_known_shapes(loaded, probe, inputs)
    assert known.inputs.input_shape == ((3, 3, 32, 32),)
    again = probe_inputs(model, known.inputs, device=resolve_device("cpu"))
    assert torch.equal(again.batches[0].args[0], inputs.batches[0].args[0]) and again.specs == inputs.specs
    # An integer-input model (embedding): shapes alone would synthesise floats, so nothing changes.
    embed = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(64, 2))
    loaded_embed = LoadedModel(path=Path("e.pt"), format=ModelFormat.TORCH_ZIP, module=embed)
    embed_inputs = probe_inputs(embed, probe.inputs, device=resolve_device("cpu"))
    assert _with_known_shapes(loaded_embed, probe, embed_inputs) is probe


def test_a_model_that_fails_while_traced_is_refused_with_its_error_and_its_mode_restored() -> None:
    from gradcheck_cli.errors import ProbeError
    from gradcheck_cli.rewrite.torch_reinit import trace_execution

    class Fails(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            assert not self.training and not torch.is_grad_enabled()  # traced in eval mode, without autograd
            raise ValueError("shape mismatch in forward")

    model = Fails().train()
    with pytest.raises(ProbeError, match="while reinit traced it: ValueError: shape mismatch in forward"):
        trace_execution(model, batch(2, 4))
    assert model.training and torch.is_grad_enabled()
