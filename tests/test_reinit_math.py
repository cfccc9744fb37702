"""init_math against the formulas of docs/theory.md#initialisation-schemes and against measured layer behaviour.

The variance tests use the sampling distribution of the sample variance: for n iid draws with
known mean 0, s² = mean(w²) has variance (mu4 - sigma⁴)/n, with mu4 = 3 sigma⁴ for a normal and
9 sigma⁴/5 for a uniform. A 4.5-sigma bound fails a correct sampler with probability ~7e-6 and
still rejects a formula with the wrong fan or gain (checked below), unlike a fixed 10%.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from gradcheck_cli.options import Distribution, FanMode, Scheme
from gradcheck_cli.rewrite.init_math import (
    Fans,
    WeightLayout,
    activation_gain,
    auto_scheme,
    default_mode,
    fans,
    he_gain,
    identity_blocks,
    layer_rng,
    orthogonal,
    orthogonal_spec,
    random_spec,
    sample,
    scheme_gain,
    uniform_bound,
)

Z = 4.5
# A large conv weight: C_out=256, C_in=128, 3x3 -> fan_in 1152, fan_out 2304, n = 294,912.
SHAPE = (256, 128, 3, 3)
FAN_IN, FAN_OUT = 128 * 9, 256 * 9


def sample_variance_bound(variance: float, n: int, distribution: Distribution) -> float:
    kurtosis = 3.0 if distribution is Distribution.NORMAL else 9.0 / 5.0
    return Z * math.sqrt((kurtosis - 1.0) * variance * variance / n)


def paper_variance(scheme: Scheme, mode: FanMode) -> float:
    """docs/theory.md#initialisation-schemes, written out independently of init_math (ReLU after He)."""
    fan = {FanMode.FAN_IN: FAN_IN, FanMode.FAN_OUT: FAN_OUT, FanMode.FAN_AVG: (FAN_IN + FAN_OUT) / 2}[mode]
    if scheme is Scheme.HE:
        return 2.0 / fan
    return 1.0 / fan  # Glorot with fan_avg is 2/(fan_in + fan_out); LeCun is 1/fan_in


# ----------------------------------------------------------------------------- fans


def test_linear_fans_are_in_features_and_out_features() -> None:
    assert fans((10, 3), layout=WeightLayout.OUT_IN) == Fans(fan_in=3, fan_out=10)
    assert fans((3, 10), layout=WeightLayout.IN_OUT) == Fans(fan_in=3, fan_out=10)


def test_conv_fans_follow_theory_with_groups() -> None:
    # Conv2d(8 -> 16, 3x3, groups=4): weight (16, 2, 3, 3)
    assert fans((16, 2, 3, 3), layout=WeightLayout.CONV, groups=4) == Fans(fan_in=2 * 9, fan_out=16 * 9)


def test_conv_transpose_fans_use_the_real_in_and_out_channels() -> None:
    # ConvTranspose2d(8 -> 12, 3x3, groups=4): weight (C_in=8, C_out/groups=3, 3, 3)
    assert fans((8, 3, 3, 3), layout=WeightLayout.CONV_TRANSPOSE, groups=4) == Fans(fan_in=2 * 9, fan_out=12 * 9)


def test_fans_agree_with_torch_for_conv_and_linear() -> None:
    torch = pytest.importorskip("torch")
    from torch.nn.init import _calculate_fan_in_and_fan_out

    for shape, layout in (
        ((10, 3), WeightLayout.OUT_IN),
        ((16, 2, 3, 3), WeightLayout.CONV),
        ((7, 5, 2, 3, 4), WeightLayout.CONV),
    ):
        theirs = _calculate_fan_in_and_fan_out(torch.empty(shape))
        ours = fans(shape, layout=layout)
        assert (ours.fan_in, ours.fan_out) == theirs


@pytest.mark.parametrize(
    ("module_kind", "groups"), [("conv", 1), ("conv", 4), ("conv_transpose", 1), ("conv_transpose", 4)]
)
def test_fan_in_is_the_number_of_terms_each_output_sums(module_kind: str, groups: int) -> None:
    """Measured, not restated: Var(y) = fan_in·Var(w)·Var(x) at interior output positions."""
    torch = pytest.importorskip("torch")
    from torch import nn

    torch.manual_seed(0)
    if module_kind == "conv":
        layer: nn.Module = nn.Conv2d(8, 16, 3, groups=groups, bias=False)
        layout = WeightLayout.CONV
    else:
        layer = nn.ConvTranspose2d(8, 12, 3, groups=groups, bias=False)
        layout = WeightLayout.CONV_TRANSPOSE
    weight = layer.weight
    fan_in = fans(tuple(weight.shape), layout=layout, groups=groups).fan_in
    with torch.no_grad():
        weight.normal_(0.0, 1.0)
        x = torch.randn(256, 8, 12, 12)
        y = layer(x)
        interior = y[..., 2:-2, 2:-2] if module_kind == "conv_transpose" else y
        measured = float(interior.var()) / float(weight.var())
    assert measured == pytest.approx(fan_in, rel=0.05)


# ----------------------------------------------------------------------------- gains


def test_relu_family_gains_match_the_he_paper_and_torch() -> None:
    torch = pytest.importorskip("torch")
    assert he_gain(None) == pytest.approx(math.sqrt(2.0))
    for slope in (0.01, 0.2, 0.5):
        assert he_gain(slope) == pytest.approx(math.sqrt(2.0 / (1.0 + slope**2)))
        assert he_gain(slope) == pytest.approx(torch.nn.init.calculate_gain("leaky_relu", slope))
    assert activation_gain("tanh") == pytest.approx(torch.nn.init.calculate_gain("tanh"))


@pytest.mark.parametrize("slope", [0.0, 0.1, 0.3])
def test_he_gain_preserves_the_second_moment_through_a_leaky_relu(slope: float) -> None:
    """gain² · E[f(z)²] = 1 for z ~ N(0, 1): the property the He gain exists for."""
    z = np.random.default_rng(0).standard_normal(2_000_000)
    second_moment = np.mean(np.where(z > 0, z, slope * z) ** 2)
    assert he_gain(slope) ** 2 * second_moment == pytest.approx(1.0, abs=0.005)


def test_scheme_gains() -> None:
    assert scheme_gain(Scheme.HE, "relu") == pytest.approx(math.sqrt(2))
    assert scheme_gain(Scheme.HE, "leaky_relu", slope=0.2) == pytest.approx(math.sqrt(2 / 1.04))
    assert scheme_gain(Scheme.GLOROT, "tanh") == pytest.approx(5 / 3)
    assert scheme_gain(Scheme.GLOROT, "sigmoid") == 1.0
    assert scheme_gain(Scheme.GLOROT, None) == 1.0
    assert scheme_gain(Scheme.LECUN, "selu") == 1.0


def test_auto_scheme_by_activation() -> None:
    assert auto_scheme("relu")[0] is Scheme.HE
    assert auto_scheme("leaky_relu")[0] is Scheme.HE
    assert auto_scheme("prelu")[0] is Scheme.HE
    assert auto_scheme("gelu")[0] is Scheme.HE
    assert auto_scheme("selu")[0] is Scheme.LECUN
    assert auto_scheme("tanh")[0] is Scheme.GLOROT
    assert auto_scheme("sigmoid")[0] is Scheme.GLOROT
    assert auto_scheme(None)[0] is Scheme.GLOROT


def test_default_modes() -> None:
    assert default_mode(Scheme.HE) is FanMode.FAN_IN
    assert default_mode(Scheme.LECUN) is FanMode.FAN_IN
    assert default_mode(Scheme.GLOROT) is FanMode.FAN_AVG


# ----------------------------------------------------------------------------- sample variance


@pytest.mark.parametrize("scheme", [Scheme.HE, Scheme.GLOROT, Scheme.LECUN])
@pytest.mark.parametrize("distribution", [Distribution.NORMAL, Distribution.UNIFORM])
@pytest.mark.parametrize("mode", [FanMode.FAN_IN, FanMode.FAN_OUT, FanMode.FAN_AVG])
def test_sample_variance_matches_the_formula(scheme: Scheme, distribution: Distribution, mode: FanMode) -> None:
    layer_fans = fans(SHAPE, layout=WeightLayout.CONV)
    gain = scheme_gain(scheme, "relu" if scheme is Scheme.HE else None)
    spec = random_spec(scheme, fans_=layer_fans, distribution=distribution, mode=mode, gain=gain)
    expected = paper_variance(scheme, mode)
    assert spec.variance == pytest.approx(expected, rel=1e-12)
    values = sample(SHAPE, spec, layer_rng(1, f"{scheme}-{distribution}-{mode}"))
    n = values.size
    measured = float(np.mean(values**2))
    assert abs(measured - expected) <= sample_variance_bound(expected, n, distribution)
    assert abs(float(values.mean())) <= Z * math.sqrt(expected / n)
    if distribution is Distribution.UNIFORM:
        bound = math.sqrt(3 * expected)
        assert float(np.abs(values).max()) <= bound
        assert float(np.abs(values).max()) >= 0.999 * bound
    kurtosis = float(np.mean(values**4)) / measured**2
    assert kurtosis == pytest.approx(3.0 if distribution is Distribution.NORMAL else 1.8, abs=0.05)


def test_the_variance_bound_rejects_a_wrong_fan() -> None:
    """The bound is tight enough to fail: fan_in vs fan_avg, and a missing ReLU gain."""
    layer_fans = fans(SHAPE, layout=WeightLayout.CONV)
    spec = random_spec(
        Scheme.HE, fans_=layer_fans, distribution=Distribution.NORMAL, mode=FanMode.FAN_IN, gain=math.sqrt(2)
    )
    values = sample(SHAPE, spec, layer_rng(2, "x"))
    measured = float(np.mean(values**2))
    for wrong in (2.0 / ((FAN_IN + FAN_OUT) / 2), 1.0 / FAN_IN, 2.0 / FAN_IN * 1.03):
        assert abs(measured - wrong) > sample_variance_bound(wrong, values.size, Distribution.NORMAL)


def test_uniform_bound_gives_the_same_variance() -> None:
    assert uniform_bound(1.0) ** 2 / 3 == pytest.approx(1.0)


# ----------------------------------------------------------------------------- orthogonal


@pytest.mark.parametrize("shape", [(64, 64), (32, 128), (128, 32), (16, 8, 3, 3)])
@pytest.mark.parametrize("gain", [1.0, math.sqrt(2)])
def test_orthogonal_rows_or_columns_are_orthonormal(shape: tuple[int, ...], gain: float) -> None:
    values = orthogonal(shape, gain=gain, rng=layer_rng(0, "o"))
    assert values.shape == shape
    flat = values.reshape(shape[0], -1) / gain
    rows, cols = flat.shape
    gram = flat @ flat.T if rows <= cols else flat.T @ flat
    assert np.allclose(gram, np.eye(min(rows, cols)), atol=1e-10)
    spec = orthogonal_spec(shape, fans_=Fans(1, 1), gain=gain)
    assert float(np.mean(values**2)) == pytest.approx(spec.variance, rel=1e-9)


def test_identity_blocks() -> None:
    values = identity_blocks((12, 3), block=3)
    for k in range(4):
        assert np.array_equal(values[3 * k : 3 * k + 3], np.eye(3))
    with pytest.raises(ValueError):
        identity_blocks((10, 3), block=3)


def test_layer_rng_is_keyed_by_seed_and_name() -> None:
    a = layer_rng(0, "fc1.weight").standard_normal(8)
    assert np.array_equal(a, layer_rng(0, "fc1.weight").standard_normal(8))
    assert not np.array_equal(a, layer_rng(0, "fc2.weight").standard_normal(8))
    assert not np.array_equal(a, layer_rng(1, "fc1.weight").standard_normal(8))


@pytest.mark.parametrize("shape", [(300, 40), (64, 64), (9, 1)])
def test_orthonormal_columns_is_the_sign_corrected_householder_q(shape: tuple[int, int]) -> None:
    from gradcheck_cli.rewrite.init_math import orthonormal_columns

    a = np.random.default_rng(5).standard_normal(shape)
    q = orthonormal_columns(a)
    householder, r = np.linalg.qr(a)
    householder = householder * np.sign(np.diag(r))
    assert np.allclose(q, householder, atol=1e-12)
    assert np.allclose(q.T @ q, np.eye(shape[1]), atol=1e-13)


def test_orthonormal_columns_falls_back_on_ill_conditioned_input() -> None:
    # cond ~1e10: Cholesky QR twice cannot orthonormalise it (cond² overflows float64's precision),
    # so the Householder result must come back, still orthonormal.
    from gradcheck_cli.rewrite.init_math import orthonormal_columns

    rng = np.random.default_rng(6)
    u, _ = np.linalg.qr(rng.standard_normal((50, 8)))
    v, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    a = u @ np.diag(np.logspace(0, -10, 8)) @ v.T
    q = orthonormal_columns(a)
    assert np.allclose(q.T @ q, np.eye(8), atol=1e-12)
    householder, r = np.linalg.qr(a)
    assert np.allclose(q, householder * np.sign(np.diag(r)), atol=1e-6)
