"""Initialisation maths: fans, gains, target variances and the samplers (docs/theory.md#initialisation-schemes).

Everything here is a plain function of shapes and numbers, shared by the torch and ONNX passes,
so that both frameworks give a layer exactly the same formula (and, for one seed, the same
values). Weights are drawn in float64 with numpy and cast by the caller.

Conventions (docs/reinit.md repeats them for users):

* Fans follow PyTorch's convention for a conv weight (C_out, C_in/groups, k1, k2, ...):
  ``fan_in = (C_in/groups)·k1·k2·...`` and ``fan_out = C_out·k1·k2·...``. For a transposed conv,
  whose weight is laid out (C_in, C_out/groups, k...), the same rule is applied to the layer's
  real input and output channels, so ``fan_in = (C_in/groups)·receptive`` (not what
  ``torch.nn.init`` computes, which reads dim 1 as the input blindly and gets
  ``(C_out/groups)·receptive``).
* Every scheme is ``Var(w) = gain² / fan`` with the fan picked by the mode:
  He ``gain² = 2/(1+a²)`` (a: negative slope of a following leaky ReLU/PReLU, 0 otherwise),
  default mode fan_in; Glorot ``gain = 5/3`` after tanh and 1 otherwise, default mode fan_avg
  (so ``Var = 2/(fan_in+fan_out)`` exactly as in the paper); LeCun ``gain = 1``, mode fan_in.
  Uniform draws use ``U[-r, r]`` with ``r = sqrt(3)·std``, which has the same variance.
* The ReLU and leaky-ReLU gains are those of ``torch.nn.init.calculate_gain`` and of the He
  paper. Tanh's 5/3 is PyTorch's (it is ~1/sqrt(E[tanh(z)²]) for z ~ N(0, 1), so a deep tanh net
  settles at a non-zero variance instead of decaying like 1/(2·depth) with gain 1). SELU uses
  LeCun with gain 1 as the SELU paper requires for self-normalisation, not PyTorch's 3/4.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gradcheck_cli.choice import Choice
from gradcheck_cli.options import Distribution, FanMode, Scheme

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt


class WeightLayout(Choice):
    """How a weight tensor's dimensions map to the layer's outputs and inputs."""

    OUT_IN = "out_in"  # Linear, Gemm with transB=1, recurrent gate blocks: (out, in)
    IN_OUT = "in_out"  # MatMul's right operand, Gemm with transB=0: (..., in, out)
    CONV = "conv"  # (C_out, C_in/groups, k...)
    CONV_TRANSPOSE = "conv_transpose"  # (C_in, C_out/groups, k...)


# Activation families, by the normalised names the probe uses (probe/activations.py).
# He after the whole ReLU family: the smooth members are ReLU-like (identity for large positive
# inputs, ~0 for negative ones), so ReLU's second-moment halving is the right first-order model.
HE_ACTIVATIONS = frozenset(
    {"relu", "relu6", "leaky_relu", "rrelu", "prelu", "elu", "celu", "gelu", "silu", "mish", "hardswish", "softplus"}
)
LECUN_ACTIVATIONS = frozenset({"selu"})
# Symmetric or squashing functions, and "no activation" (None): Glorot.
TANH_GAIN = 5.0 / 3.0


@dataclass(frozen=True)
class Fans:
    fan_in: int
    fan_out: int

    def pick(self, mode: FanMode) -> float:
        if mode is FanMode.FAN_IN:
            return float(self.fan_in)
        if mode is FanMode.FAN_OUT:
            return float(self.fan_out)
        return (self.fan_in + self.fan_out) / 2.0


def fans(shape: Sequence[int], *, layout: WeightLayout, groups: int = 1) -> Fans:
    """Fan-in and fan-out of a weight (docs/theory.md#fans, PyTorch's convention for convs)."""
    if groups < 1:
        raise ValueError(f"groups must be positive, got {groups}")
    dims = tuple(int(d) for d in shape)
    if layout in (WeightLayout.CONV, WeightLayout.CONV_TRANSPOSE):
        if len(dims) < 2:
            raise ValueError(f"a conv weight has at least 2 dimensions, got shape {dims}")
        receptive = math.prod(dims[2:])
        if layout is WeightLayout.CONV:
            c_out, c_in_per_group = dims[0], dims[1]
        else:  # (C_in, C_out/groups, k...): the same rule on the layer's real in/out channels
            c_in, c_out = dims[0], dims[1] * groups
            c_in_per_group = c_in // groups
        return Fans(fan_in=c_in_per_group * receptive, fan_out=c_out * receptive)
    if len(dims) < 2:
        raise ValueError(f"a dense weight has at least 2 dimensions, got shape {dims}")
    if layout is WeightLayout.OUT_IN:
        return Fans(fan_in=dims[-1], fan_out=dims[-2])
    return Fans(fan_in=dims[-2], fan_out=dims[-1])


def default_mode(scheme: Scheme) -> FanMode:
    return FanMode.FAN_AVG if scheme is Scheme.GLOROT else FanMode.FAN_IN


def activation_gain(activation: str | None, *, slope: float | None = None) -> float:
    """The gain that keeps the second moment through ``activation`` (used by orthogonal init)."""
    if activation in HE_ACTIVATIONS:
        return he_gain(slope if activation in ("leaky_relu", "prelu", "rrelu") else None)
    if activation == "tanh":
        return TANH_GAIN
    return 1.0


def he_gain(slope: float | None) -> float:
    """sqrt(2 / (1 + a²)): a ReLU with negative slope a keeps (1 + a²)/2 of the second moment."""
    a = 0.0 if slope is None else float(slope)
    return math.sqrt(2.0 / (1.0 + a * a))


def auto_scheme(activation: str | None) -> tuple[Scheme, str]:
    """The scheme ``auto`` picks for a layer followed by ``activation``, and why."""
    if activation in HE_ACTIVATIONS:
        return Scheme.HE, f"followed by {activation} (ReLU family)"
    if activation in LECUN_ACTIVATIONS:
        return Scheme.LECUN, f"followed by {activation} (self-normalising)"
    if activation is None:
        return Scheme.GLOROT, "no activation follows"
    return Scheme.GLOROT, f"followed by {activation} (symmetric or squashing)"


def scheme_gain(scheme: Scheme, activation: str | None, *, slope: float | None = None) -> float:
    """The gain a scheme uses for a layer followed by ``activation`` (see the module docstring)."""
    if scheme is Scheme.HE:
        leaky = activation in ("leaky_relu", "prelu", "rrelu")
        return he_gain(slope if leaky else None)
    if scheme is Scheme.GLOROT:
        return TANH_GAIN if activation == "tanh" else 1.0
    if scheme is Scheme.LECUN:
        return 1.0
    if scheme is Scheme.ORTHOGONAL:
        return activation_gain(activation, slope=slope)
    if scheme is Scheme.LSUV:
        return 1.0  # orthonormal start; the probe batch sets the scale afterwards
    raise ValueError(f"scheme {scheme} has no gain of its own; resolve 'auto' first")


@dataclass(frozen=True)
class InitSpec:
    """What one weight tensor is drawn from."""

    scheme: Scheme
    distribution: Distribution | None  # None for orthogonal
    mode: FanMode | None  # None for orthogonal
    gain: float
    fans: Fans
    std: float  # the standard deviation of every entry (orthogonal: the root mean square)

    @property
    def variance(self) -> float:
        return self.std * self.std

    @property
    def bound(self) -> float | None:
        """Half-width of the uniform distribution, None unless uniform."""
        return uniform_bound(self.std) if self.distribution is Distribution.UNIFORM else None


def random_spec(scheme: Scheme, *, fans_: Fans, distribution: Distribution, mode: FanMode, gain: float) -> InitSpec:
    """He, Glorot or LeCun: ``Var(w) = gain² / fan(mode)``."""
    if scheme not in (Scheme.HE, Scheme.GLOROT, Scheme.LECUN):
        raise ValueError(f"{scheme} is not a random-variance scheme")
    fan = fans_.pick(mode)
    if fan <= 0:
        raise ValueError(f"{mode} is zero for this weight; it has no entries to initialise")
    return InitSpec(
        scheme=scheme, distribution=distribution, mode=mode, gain=gain, fans=fans_, std=gain / math.sqrt(fan)
    )


def orthogonal_spec(shape: Sequence[int], *, fans_: Fans, gain: float, scheme: Scheme = Scheme.ORTHOGONAL) -> InitSpec:
    """A (semi-)orthogonal matrix over (shape[0], rest) has mean square gain²/max(rows, cols)."""
    rows, cols = _matrix_shape(shape)
    return InitSpec(
        scheme=scheme, distribution=None, mode=None, gain=gain, fans=fans_, std=gain / math.sqrt(max(rows, cols))
    )


def uniform_bound(std: float) -> float:
    """U[-r, r] has variance r²/3, so r = sqrt(3)·std gives the same variance as N(0, std²)."""
    return math.sqrt(3.0) * std


def layer_rng(seed: int, name: str) -> np.random.Generator:
    """A generator per layer, keyed by the seed and the layer's name.

    Keying by name (not by order) means a layer gets the same values whether it is
    re-initialised alone (`layers`) or with the whole model, and in torch and ONNX alike.
    """
    import numpy as np

    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(name.encode("utf-8"))])


def sample(shape: Sequence[int], spec: InitSpec, rng: np.random.Generator) -> npt.NDArray[np.float64]:
    """Draw a float64 array of ``shape`` as ``spec`` prescribes."""
    dims = tuple(int(d) for d in shape)
    if spec.distribution is None:
        return orthogonal(dims, gain=spec.gain, rng=rng)
    if spec.distribution is Distribution.NORMAL:
        values = rng.standard_normal(dims)
        values *= spec.std  # in place: no second array of the layer's size
        return values
    bound = uniform_bound(spec.std)
    return rng.uniform(-bound, bound, size=dims)


def orthogonal(shape: Sequence[int], *, gain: float, rng: np.random.Generator) -> npt.NDArray[np.float64]:
    """A (semi-)orthogonal matrix over (shape[0], prod(shape[1:])), times ``gain`` (Saxe et al.).

    The Q of a Gaussian's QR decomposition with R's diagonal made positive, which makes Q
    uniformly (Haar) distributed rather than biased by the decomposition. Computed by
    :func:`orthonormal_columns` (Cholesky QR, twice), float64 throughout.
    """
    dims = tuple(int(d) for d in shape)
    rows, cols = _matrix_shape(dims)
    flat = rng.standard_normal((max(rows, cols), min(rows, cols)))
    q = orthonormal_columns(flat)
    if rows < cols:
        q = q.T
    result: npt.NDArray[np.float64] = (gain * q).reshape(dims)
    return result


# Largest |QᵀQ - I| accepted from Cholesky QR before falling back to Householder QR.
_ORTHONORMAL_TOLERANCE = 1e-12


def orthonormal_columns(a: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Q of ``a = Q·R`` (``a`` tall, full column rank) with R's diagonal positive.

    Cholesky QR applied twice (CholeskyQR2): R1 = chol(AᵀA), Q1 = A·R1⁻¹, then the same on Q1;
    A = Q·(R2·R1) with R2·R1 upper triangular with a positive diagonal, so Q is exactly the
    factor the sign-corrected Householder QR defines, to rounding. It is made of matrix products,
    which run an order of magnitude faster than numpy's Householder QR (ResNet-50's 54 weights:
    minutes on a loaded 2-core machine, against seconds). One pass loses orthogonality as
    cond(A)²·eps; the second pass restores it to ~eps whenever cond(A) < ~1e7, which Gaussian
    matrices satisfy except with negligible probability. The result is checked, and anything
    worse (or a failed Cholesky) is recomputed with Householder QR.
    """
    import numpy as np

    n = a.shape[1]
    identity = np.eye(n)
    try:
        q = a
        for _ in range(2):
            upper = np.linalg.cholesky(q.T @ q).T
            q = q @ np.linalg.inv(upper)
        if float(np.abs(q.T @ q - identity).max(initial=0.0)) <= _ORTHONORMAL_TOLERANCE:
            return q
    except np.linalg.LinAlgError:
        pass
    q, r = np.linalg.qr(a)
    signs = np.sign(np.diag(r))
    signs[signs == 0] = 1.0
    householder: npt.NDArray[np.float64] = q * signs
    return householder


def identity_blocks(shape: Sequence[int], *, block: int) -> npt.NDArray[np.float64]:
    """Stacked identity matrices: a recurrent weight (gates·H, H) with every gate block I_H."""
    import numpy as np

    rows, cols = int(shape[0]), int(shape[1])
    if cols != block or rows % block:
        raise ValueError(f"shape {tuple(shape)} is not a stack of {block}x{block} blocks")
    return np.tile(np.eye(block), (rows // block, 1))


def _matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
    dims = tuple(int(d) for d in shape)
    if len(dims) < 2:
        raise ValueError(f"orthogonal init needs at least 2 dimensions, got shape {dims}")
    return dims[0], math.prod(dims[1:])
