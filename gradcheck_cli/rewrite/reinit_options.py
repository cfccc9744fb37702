"""What the user asked ``reinit`` for, and the per-layer decision shared by torch and ONNX."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from gradcheck_cli.errors import UsageError
from gradcheck_cli.options import Distribution, ReinitOptions, Scheme
from gradcheck_cli.rewrite.init_math import (
    Fans,
    InitSpec,
    auto_scheme,
    default_mode,
    orthogonal_spec,
    random_spec,
    scheme_gain,
)


def validate(options: ReinitOptions) -> None:
    """Refuse option combinations that would silently do nothing."""
    if options.scheme in (Scheme.ORTHOGONAL, Scheme.LSUV):
        given = [
            f"`{name}` {value}"
            for name, value in (("distribution", options.distribution), ("fan", options.fan))
            if value is not None
        ]
        if given:
            raise UsageError(
                f"{' and '.join(given)} has no effect with `scheme` {options.scheme}: "
                "orthogonal matrices have no distribution or fan mode",
                hint="drop the option, or choose the scheme he, glorot, lecun or auto",
            )
    if not 0 < options.lsuv_tolerance < 1:
        raise UsageError(f"the LSUV tolerance must be in (0, 1), got {options.lsuv_tolerance}")
    if options.lsuv_max_iterations < 1:
        raise UsageError("the LSUV iteration bound must be at least 1")


@dataclass(frozen=True)
class WeightPlan:
    scheme: Scheme
    spec: InitSpec
    reason: str


def plan_weight(
    options: ReinitOptions, *, shape: Sequence[int], fans_: Fans, activation: str | None, slope: float | None
) -> WeightPlan:
    """The scheme, distribution and std one weight gets, and why."""
    if options.scheme is Scheme.AUTO:
        scheme, reason = auto_scheme(activation)
    else:
        scheme = options.scheme
        follows = f"followed by {activation}" if activation else "no activation follows"
        reason = f"scheme {scheme} asked for ({follows})"
    gain = scheme_gain(scheme, activation, slope=slope)
    if scheme in (Scheme.ORTHOGONAL, Scheme.LSUV):
        return WeightPlan(scheme, orthogonal_spec(shape, fans_=fans_, gain=gain, scheme=scheme), reason)
    distribution = options.distribution or Distribution.NORMAL
    mode = options.fan or default_mode(scheme)
    spec = random_spec(scheme, fans_=fans_, distribution=distribution, mode=mode, gain=gain)
    return WeightPlan(scheme, spec, reason)


def select(names: Iterable[str], globs: Sequence[str]) -> set[str]:
    """The names `layers` selects (all when no glob is given); every glob must match."""
    all_names = list(names)
    if not globs:
        return set(all_names)
    chosen: set[str] = set()
    for glob in globs:
        matched = {name for name in all_names if fnmatch.fnmatchcase(name, glob)}
        if not matched:
            shown = ", ".join(all_names[:8]) + (", ..." if len(all_names) > 8 else "")
            raise UsageError(
                f"`layers` {glob!r} matches no layer that reinit can re-initialise",
                hint=f"layer names are module paths, e.g. {shown or '(none found)'}",
            )
        chosen |= matched
    return chosen


def matches_any(name: str, globs: Sequence[str]) -> bool:
    """True when no glob is given (everything is selected) or one of them matches ``name``."""
    return not globs or any(fnmatch.fnmatchcase(name, glob) for glob in globs)
