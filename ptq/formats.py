"""Element formats and `QuantSpec`: the single source of numeric truth.

A `QuantSpec` is data: a format family, element bits, a block (group) size, the blocked axis, a rounding mode and a
scale rule. Quantizers and kernels derive every constant they need from the properties below; nothing else in ptq
hard-codes a format constant.

Families (see DESIGN.md, "Numeric semantics"):
- ``mxint``: OCP MX integer, sign-magnitude symmetric. ``width`` k in 2..8; element = m / 2^(k-2),
  |m| <= 2^(k-1) - 1 (MXINT8: +-127/64, MXINT4: +-7/4). Shared scale E8M0 = 2^(floor(log2 amax) - emax), emax = 0.
- ``mxfp``: OCP MX minifloat ExMy (E2M1, E2M3, E3M2, E4M3, E5M2 or general widths). Shared scale E8M0.
  E4M3 follows OCP's "fn" encoding (max 448), E5M2 and wider exponents are IEEE-like (top exponent reserved,
  max 57344 for E5M2); the other formats use every code for finite values (E2M1 max 6, E2M3 7.5, E3M2 28).
- ``mx6`` / ``mx9``: AMD Quark's shared-prime-bit emulation: blocks of 16, pairs of 2 share one prime bit,
  5 / 8 element bits.
- ``nvfp4``: E2M1 elements, blocks of 16, E4M3 block scales, fp32 per-tensor global scale.
- ``int``: per-group absmax integer, symmetric or asymmetric (zero point), fp32 scales.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

from ptq.errors import QuantSpecError

Family = Literal["mxint", "mxfp", "mx6", "mx9", "nvfp4", "int"]
Rounding = Literal["even", "nearest", "floor", "stochastic"]
ScaleRule = Literal["floor", "ceil"]

FAMILIES: tuple[str, ...] = ("mxint", "mxfp", "mx6", "mx9", "nvfp4", "int")
ROUNDINGS: tuple[str, ...] = ("even", "nearest", "floor", "stochastic")
SCALE_RULES: tuple[str, ...] = ("floor", "ceil")

# Named minifloat element formats: name -> (exponent bits, mantissa bits).
MINIFLOATS: dict[str, tuple[int, int]] = {
    "e2m1": (2, 1),
    "e2m3": (2, 3),
    "e3m2": (3, 2),
    "e4m3": (4, 3),
    "e5m2": (5, 2),
}

E8M0_MIN_EXP = -127  # E8M0 encodes 2^-127 .. 2^127; code 255 is NaN
E8M0_MAX_EXP = 127


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized. Immutable and hashable; build it with the class methods below.

    Attributes:
        family: format family, one of ``FAMILIES``.
        width: element bits including the sign (MXINT4 -> 4, E2M1 -> 4, E4M3 -> 8, MX6 -> 5, MX9 -> 8).
        exp_bits / man_bits: minifloat exponent / mantissa bits (``mxfp`` and ``nvfp4`` only, else 0).
        block_size: elements sharing one scale, along ``axis``. Lengths that are not a multiple are zero-padded for
            the scale computation and unpadded afterwards (zeros never change a block's amax).
        axis: the blocked axis (for activations: the matmul's reduction axis, i.e. -1).
        rounding: element rounding: ``even`` (round half to even, default), ``nearest`` (half away from zero),
            ``floor`` (truncate the magnitude, as microxcaling does), ``stochastic`` (needs ``seed``).
        scale_rule: ``floor``: OCP, 2^(floor(log2 amax) - emax), elements above the grid saturate;
            ``ceil``: the smallest power-of-two scale that does not clip (MX families only).
        symmetric: ``int`` family only: absmax (True) or min/max with a zero point (False).
        seed: base seed of stochastic rounding.
    """

    family: Family
    width: int
    exp_bits: int = 0
    man_bits: int = 0
    block_size: int = 32
    axis: int = -1
    rounding: Rounding = "even"
    scale_rule: ScaleRule = "floor"
    symmetric: bool = True
    seed: int | None = None

    # ---- construction -------------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        f = self.family
        if f not in FAMILIES:
            raise QuantSpecError(f"unknown format family {f!r}; choose one of {', '.join(FAMILIES)}")
        for key in ("width", "exp_bits", "man_bits", "block_size", "axis"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int):
                raise QuantSpecError(f"{key} must be an integer, got {v!r} ({type(v).__name__})")
        if self.block_size < 2:
            raise QuantSpecError(f"block_size must be >= 2, got {self.block_size}")
        if self.rounding not in ROUNDINGS:
            raise QuantSpecError(f"unknown rounding {self.rounding!r}; choose one of {', '.join(ROUNDINGS)}")
        if self.scale_rule not in SCALE_RULES:
            raise QuantSpecError(f"unknown scale_rule {self.scale_rule!r}; choose one of {', '.join(SCALE_RULES)}")
        if self.rounding == "stochastic" and self.seed is None:
            raise QuantSpecError("rounding='stochastic' needs a seed (an integer) so results are reproducible")
        if f == "mxint":
            if not 2 <= self.width <= 8:
                raise QuantSpecError(f"mxint width must be in 2..8, got {self.width}")
        elif f == "int":
            if not 2 <= self.width <= 16:
                raise QuantSpecError(f"int width must be in 2..16, got {self.width}")
        elif f in ("mxfp", "nvfp4"):
            if f == "nvfp4" and (self.exp_bits, self.man_bits, self.block_size) != (2, 1, 16):
                raise QuantSpecError("nvfp4 is fixed: E2M1 elements in blocks of 16 (use family 'mxfp' otherwise)")
            if self.exp_bits < 1 or self.man_bits < 0 or self.exp_bits > 8 or self.man_bits > 10:
                raise QuantSpecError(
                    f"minifloat needs 1..8 exponent bits and 0..10 mantissa bits, got E{self.exp_bits}M{self.man_bits}")
            if self.width != 1 + self.exp_bits + self.man_bits:
                raise QuantSpecError(
                    f"minifloat width {self.width} != 1 + exponent {self.exp_bits} + mantissa {self.man_bits}")
        elif f in ("mx6", "mx9"):
            if self.width != (5 if f == "mx6" else 8):
                raise QuantSpecError(f"{f} has {5 if f == 'mx6' else 8} element bits, got width {self.width}")
        if f not in ("mxfp", "nvfp4") and (self.exp_bits or self.man_bits):
            raise QuantSpecError(f"exponent/mantissa widths apply to 'mxfp' only, not {f!r}")
        if f != "int" and not self.symmetric:
            raise QuantSpecError(f"asymmetric quantization applies to family 'int' only, not {f!r}")
        if self.scale_rule == "ceil" and not self.is_mx:
            raise QuantSpecError("scale_rule='ceil' applies to the power-of-two scales of mxint / mxfp only")

    @classmethod
    def mxint(cls, width: int, block_size: int = 32, **kw) -> QuantSpec:
        return cls("mxint", width, block_size=block_size, **kw)

    @classmethod
    def mxfp(cls, fmt: str | tuple[int, int], block_size: int = 32, **kw) -> QuantSpec:
        """``fmt``: a name in ``MINIFLOATS`` (``"e2m1"``) or an ``(exponent_bits, mantissa_bits)`` pair."""
        e, m = parse_minifloat(fmt)
        return cls("mxfp", 1 + e + m, exp_bits=e, man_bits=m, block_size=block_size, **kw)

    @classmethod
    def nvfp4(cls, **kw) -> QuantSpec:
        return cls("nvfp4", 4, exp_bits=2, man_bits=1, block_size=16, **kw)

    @classmethod
    def mx6(cls, **kw) -> QuantSpec:
        kw.setdefault("block_size", 16)
        return cls("mx6", 5, **kw)

    @classmethod
    def mx9(cls, **kw) -> QuantSpec:
        kw.setdefault("block_size", 16)
        return cls("mx9", 8, **kw)

    @classmethod
    def int_(cls, width: int, block_size: int = 128, symmetric: bool = True, **kw) -> QuantSpec:
        return cls("int", width, block_size=block_size, symmetric=symmetric, **kw)

    def with_(self, **changes) -> QuantSpec:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    # ---- derived constants ----------------------------------------------------------------------------------------
    @property
    def is_mx(self) -> bool:
        """Power-of-two E8M0 shared scale (mxint, mxfp)."""
        return self.family in ("mxint", "mxfp")

    @property
    def is_minifloat(self) -> bool:
        return self.family in ("mxfp", "nvfp4")

    @property
    def exp_bias(self) -> int:
        return (1 << (self.exp_bits - 1)) - 1 if self.is_minifloat else 0

    @property
    def ieee_like(self) -> bool:
        """The top exponent code is reserved for Inf/NaN (E5M2 and wider exponents)."""
        return self.is_minifloat and self.exp_bits >= 5

    @property
    def emax(self) -> int:
        """Exponent of the largest power of two an element represents (OCP's emax_elem)."""
        if self.family == "mxint":
            return 0
        if self.is_minifloat:
            top = (1 << self.exp_bits) - 1 - self.exp_bias
            return top - 1 if self.ieee_like else top
        raise QuantSpecError(f"emax is defined for mxint / mxfp / nvfp4, not {self.family!r}")

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal element (minifloats); subnormals below it are exact."""
        if not self.is_minifloat:
            raise QuantSpecError(f"emin is defined for minifloats, not {self.family!r}")
        return 1 - self.exp_bias

    @property
    def max_normal(self) -> float:
        """Largest finite element magnitude (before scaling)."""
        if self.family == "mxint":
            return ((1 << (self.width - 1)) - 1) / (1 << (self.width - 2))
        if self.is_minifloat:
            if self.exp_bits == 4 and self.man_bits == 3:  # OCP E4M3 "fn": S.1111.111 is NaN
                return 448.0
            return math.ldexp(2.0 - 2.0 ** -self.man_bits, self.emax)
        if self.family == "int":
            return float((1 << (self.width - 1)) - 1) if self.symmetric else float((1 << self.width) - 1)
        raise QuantSpecError(f"max_normal is not defined for {self.family!r}")

    @property
    def int_levels(self) -> int:
        """mxint / int: largest integer code magnitude (symmetric) or code count - 1 (asymmetric)."""
        if self.family == "mxint":
            return (1 << (self.width - 1)) - 1
        if self.family == "int":
            return (1 << (self.width - 1)) - 1 if self.symmetric else (1 << self.width) - 1
        raise QuantSpecError(f"int_levels is defined for mxint / int, not {self.family!r}")

    @property
    def mxint_frac_bits(self) -> int:
        """mxint: fractional bits of an element (element = m / 2^frac_bits)."""
        return self.width - 2

    @property
    def bits_per_element(self) -> float:
        """Storage cost including the shared scale (8-bit E8M0 / E4M3 per block; fp32 per int group)."""
        if self.family in ("mx6", "mx9"):
            # 8-bit shared exponent per block + one prime bit per pair of elements
            return self.width + 8 / self.block_size + 1 / 2
        if self.family == "int":
            return self.width + (32 if self.symmetric else 64) / self.block_size
        return self.width + 8 / self.block_size

    # ---- printing --------------------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        if self.family == "mxint":
            return f"MXINT{self.width}"
        if self.family == "mxfp":
            return f"MXFP{self.width}_E{self.exp_bits}M{self.man_bits}"
        if self.family == "int":
            return f"INT{self.width}"
        return self.family.upper()

    def __str__(self) -> str:
        word = "group" if self.family == "int" else "block"
        parts = [f"{word}={self.block_size}", f"axis={self.axis}"]
        if self.family == "int" and not self.symmetric:
            parts.append("asym")
        if self.rounding != "even":
            parts.append(f"rounding={self.rounding}" + (f"(seed={self.seed})" if self.seed is not None else ""))
        if self.scale_rule != "floor":
            parts.append(f"scale_rule={self.scale_rule}")
        return f"{self.name}({', '.join(parts)})"


def parse_minifloat(fmt: str | tuple[int, int]) -> tuple[int, int]:
    """``"e2m1"`` / ``"E4M3"`` / ``(2, 1)`` -> (exponent bits, mantissa bits)."""
    if isinstance(fmt, tuple):
        return int(fmt[0]), int(fmt[1])
    key = str(fmt).lower()
    if key in MINIFLOATS:
        return MINIFLOATS[key]
    import re

    m = re.fullmatch(r"e(\d)m(\d+)", key)
    if not m:
        raise QuantSpecError(f"unknown minifloat {fmt!r}; use one of {', '.join(MINIFLOATS)} or 'eXmY'")
    return int(m.group(1)), int(m.group(2))
