"""fold_math against torch's own conv/linear + batch_norm (an independent computation)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from gradcheck_cli.rewrite.fold_math import (
    LayerKind,
    bn_affine,
    fold_after,
    fold_before,
    identity_running_var,
)

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def random_bn(channels: int, generator: torch.Generator, *, affine: bool = True) -> dict[str, torch.Tensor | None]:
    return {
        "running_mean": torch.randn(channels, generator=generator, dtype=torch.float64),
        "running_var": torch.rand(channels, generator=generator, dtype=torch.float64) * 2 + 0.1,
        "weight": torch.randn(channels, generator=generator, dtype=torch.float64) if affine else None,
        "bias": torch.randn(channels, generator=generator, dtype=torch.float64) if affine else None,
    }


def apply_bn(z: torch.Tensor, bn: dict[str, torch.Tensor | None], eps: float) -> torch.Tensor:
    return F.batch_norm(z, bn["running_mean"], bn["running_var"], bn["weight"], bn["bias"], False, 0.0, eps)


conv_configs = st.fixed_dictionaries(
    {
        "dims": st.integers(1, 3),
        "groups": st.sampled_from([1, 2, 3]),
        "in_per_group": st.integers(1, 3),
        "out_per_group": st.integers(1, 3),
        "kernel": st.integers(1, 3),
        "stride": st.integers(1, 2),
        "dilation": st.integers(1, 2),
        "padding": st.integers(0, 2),
        "bias": st.booleans(),
        "affine": st.booleans(),
        "seed": st.integers(0, 2**16),
    }
)


@settings(max_examples=40, deadline=None)
@given(conv_configs)
def test_fold_after_conv_and_conv_transpose_match_batch_norm(cfg: dict[str, int]) -> None:
    # float64 throughout: the comparison then measures the algebra, not float32 rounding.
    g = torch.Generator().manual_seed(cfg["seed"])
    dims, groups = cfg["dims"], cfg["groups"]
    c_in, c_out = cfg["in_per_group"] * groups, cfg["out_per_group"] * groups
    x = torch.randn(2, c_in, *([5] * dims), generator=g, dtype=torch.float64)
    kernel = [cfg["kernel"]] * dims
    bn = random_bn(c_out, g, affine=bool(cfg["affine"]))
    affine = bn_affine(eps=1e-3, **bn)  # type: ignore[arg-type]
    bias = torch.randn(c_out, generator=g, dtype=torch.float64) if cfg["bias"] else None

    w = torch.randn(c_out, c_in // groups, *kernel, generator=g, dtype=torch.float64)
    conv_kwargs = {"stride": cfg["stride"], "padding": cfg["padding"], "dilation": cfg["dilation"], "groups": groups}
    reference = apply_bn(CONV[dims](x, w, bias, **conv_kwargs), bn, 1e-3)
    new_w, new_b = fold_after(w, bias, affine, kind=LayerKind.CONV, groups=groups)
    torch.testing.assert_close(CONV[dims](x, new_w, new_b, **conv_kwargs), reference, rtol=1e-10, atol=1e-10)

    wt = torch.randn(c_in, c_out // groups, *kernel, generator=g, dtype=torch.float64)
    t_kwargs = {
        "stride": cfg["stride"],
        "padding": min(cfg["padding"], cfg["kernel"] - 1) * cfg["dilation"] // 2,
        "dilation": cfg["dilation"],
        "groups": groups,
    }
    reference_t = apply_bn(CONV_T[dims](x, wt, bias, **t_kwargs), bn, 1e-3)
    new_wt, new_bt = fold_after(wt, bias, affine, kind=LayerKind.CONV_TRANSPOSE, groups=groups)
    torch.testing.assert_close(CONV_T[dims](x, new_wt, new_bt, **t_kwargs), reference_t, rtol=1e-10, atol=1e-10)


@settings(max_examples=30, deadline=None)
@given(conv_configs)
def test_fold_before_conv_without_padding_matches(cfg: dict[str, int]) -> None:
    g = torch.Generator().manual_seed(cfg["seed"])
    dims, groups = cfg["dims"], cfg["groups"]
    c_in, c_out = cfg["in_per_group"] * groups, cfg["out_per_group"] * groups
    x = torch.randn(2, c_in, *([6] * dims), generator=g, dtype=torch.float64)
    w = torch.randn(c_out, c_in // groups, *([cfg["kernel"]] * dims), generator=g, dtype=torch.float64)
    bias = torch.randn(c_out, generator=g, dtype=torch.float64) if cfg["bias"] else None
    bn = random_bn(c_in, g, affine=bool(cfg["affine"]))
    kwargs = {"stride": cfg["stride"], "dilation": cfg["dilation"], "groups": groups}
    reference = CONV[dims](apply_bn(x, bn, 1e-5), w, bias, **kwargs)
    new_w, new_b = fold_before(w, bias, bn_affine(eps=1e-5, **bn), kind=LayerKind.CONV, groups=groups)  # type: ignore[arg-type]
    torch.testing.assert_close(CONV[dims](x, new_w, new_b, **kwargs), reference, rtol=1e-10, atol=1e-10)


def test_fold_before_conv_with_zero_padding_is_not_exact() -> None:
    # Why bn-conv is declined when the conv pads: the maths is only right in the interior.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 6, 6, generator=g, dtype=torch.float64)
    w = torch.randn(3, 2, 3, 3, generator=g, dtype=torch.float64)
    bn = random_bn(2, g)
    new_w, new_b = fold_before(w, None, bn_affine(eps=1e-5, **bn), kind=LayerKind.CONV)  # type: ignore[arg-type]
    exact = F.conv2d(apply_bn(x, bn, 1e-5), w, None, padding=1)
    folded = F.conv2d(x, new_w, new_b, padding=1)
    torch.testing.assert_close(folded[..., 1:-1, 1:-1], exact[..., 1:-1, 1:-1], rtol=1e-10, atol=1e-10)
    assert (folded - exact).abs().max() > 1e-3


def test_linear_after_and_before() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 4, generator=g, dtype=torch.float64)
    w = torch.randn(3, 4, generator=g, dtype=torch.float64)
    b = torch.randn(3, generator=g, dtype=torch.float64)
    bn_out, bn_in = random_bn(3, g), random_bn(4, g)
    w1, b1 = fold_after(w, b, bn_affine(eps=1e-5, **bn_out), kind=LayerKind.LINEAR)  # type: ignore[arg-type]
    torch.testing.assert_close(F.linear(x, w1, b1), apply_bn(F.linear(x, w, b), bn_out, 1e-5))
    w2, b2 = fold_before(w, None, bn_affine(eps=1e-5, **bn_in), kind=LayerKind.LINEAR)  # type: ignore[arg-type]
    torch.testing.assert_close(F.linear(x, w2, b2), F.linear(apply_bn(x, bn_in, 1e-5), w, None))


def test_folded_values_keep_the_layer_dtype() -> None:
    w = torch.randn(4, 2, 3, 3)
    affine = bn_affine(running_mean=torch.zeros(4), running_var=torch.ones(4), eps=1e-5)
    new_w, new_b = fold_after(w, None, affine, kind=LayerKind.CONV)
    assert new_w.dtype == torch.float32 and new_b.dtype == torch.float32 and new_b.shape == (4,)


def test_before_conv_transpose_is_refused() -> None:
    affine = bn_affine(running_mean=torch.zeros(2), running_var=torch.ones(2), eps=1e-5)
    with pytest.raises(ValueError, match="ConvTranspose"):
        fold_before(torch.randn(2, 3, 3, 3), None, affine, kind=LayerKind.CONV_TRANSPOSE)


def test_channel_mismatch_is_an_error() -> None:
    affine = bn_affine(running_mean=torch.zeros(5), running_var=torch.ones(5), eps=1e-5)
    with pytest.raises(ValueError, match="channels"):
        fold_after(torch.randn(4, 2, 3, 3), None, affine, kind=LayerKind.CONV)


@pytest.mark.parametrize("eps", [1e-5, 1e-3, 1e-1, 0.0, 3e-7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_identity_running_var_makes_batch_norm_exactly_the_identity(eps: float, dtype: torch.dtype) -> None:
    x = torch.randn(64, 3, 5).to(dtype)
    var = identity_running_var(eps, dtype)
    running_var = torch.full((3,), var, dtype=dtype)
    out = F.batch_norm(x, torch.zeros(3, dtype=dtype), running_var, None, None, False, 0.0, eps)
    assert torch.equal(out, x)


def test_numpy_and_torch_inputs_give_the_same_bits() -> None:
    # The ONNX pass hands numpy arrays, the torch pass tensors: one computation for both.
    import numpy as np

    g = torch.Generator().manual_seed(3)
    w = torch.randn(6, 3, 3, 3, generator=g)
    b = torch.randn(6, generator=g)
    bn = {k: v.float() if v is not None else None for k, v in random_bn(6, g).items()}
    affine_t = bn_affine(eps=1e-5, **bn)  # type: ignore[arg-type]
    affine_n = bn_affine(eps=1e-5, **{k: v.numpy() for k, v in bn.items() if v is not None})
    assert np.array_equal(affine_t.scale, affine_n.scale) and np.array_equal(affine_t.shift, affine_n.shift)
    tw, tb = fold_after(w, b, affine_t, kind=LayerKind.CONV)
    nw, nb = fold_after(w.numpy(), b.numpy(), affine_n, kind=LayerKind.CONV)
    assert isinstance(tw, torch.Tensor) and isinstance(nw, np.ndarray)
    assert np.array_equal(tw.numpy(), nw) and np.array_equal(tb.numpy(), nb)
    # Known answer: the exact float64 product, rounded once to float32.
    expected = (w.double() * torch.from_numpy(affine_t.scale).reshape(-1, 1, 1, 1)).float()
    assert torch.equal(tw, expected)


def test_bfloat16_weights_are_rounded_once_from_float64() -> None:
    g = torch.Generator().manual_seed(4)
    w = torch.randn(4, 2, 3, 3, generator=g).to(torch.bfloat16)
    affine = bn_affine(running_mean=torch.randn(4, generator=g), running_var=torch.rand(4, generator=g) + 0.5, eps=1e-5)
    new_w, new_b = fold_after(w, None, affine, kind=LayerKind.CONV)
    assert new_w.dtype == torch.bfloat16 and new_b.dtype == torch.bfloat16
    expected = (w.double() * torch.from_numpy(affine.scale).reshape(-1, 1, 1, 1)).to(torch.bfloat16)
    assert torch.equal(new_w, expected)
    assert torch.equal(new_b, torch.from_numpy(affine.shift).to(torch.bfloat16))
