"""Parsing the counts users type: 150M MACs, 2.5M params, 75% of the full model."""
from __future__ import annotations

from compress.errors import CompressError

_SUFFIX = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9}


def parse_count(text: str | int | float, what: str = "MAC count", full: int | None = None) -> int:
    """'150M' -> 150_000_000; '1.2G'; '300000'; '50%' (of `full`, when given)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return int(text)
    s = str(text).strip().upper()
    try:
        if s.endswith("%"):
            if full is None:
                raise ValueError
            return int(full * float(s[:-1]) / 100)
        suffix = s[-1] if s and s[-1] in _SUFFIX else ""
        value = float(s[: len(s) - len(suffix)]) * _SUFFIX[suffix]
    except ValueError:
        pct = " or a percentage like 50%" if full is not None else ""
        raise CompressError(f"'{text}' is not a {what} like 150M, 1.2G or 300000{pct}.") from None
    if value <= 0:
        raise CompressError(f"a {what} must be positive, got '{text}'.")
    return int(value)


def human(n: float, unit: str = "") -> str:
    """1234567 -> '1.23M': counts as people read them."""
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def parse_latency(text: str | int | float, full_ms: float | None = None) -> float:
    """'3.5ms' or 3.5 -> 3.5 (ms); '60%' -> 60% of `full_ms` (the unpruned file's measured time)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        s = str(text).strip().lower().replace(" ", "")
        try:
            if s.endswith("%"):
                if full_ms is None:
                    raise ValueError
                value = full_ms * float(s[:-1]) / 100
            else:
                value = float(s.removesuffix("ms"))
        except ValueError:
            raise CompressError(f"'{text}' is not a latency like 3.5ms or 60% (of the unpruned model's measured "
                                "time).") from None
    if value <= 0:
        raise CompressError(f"a latency budget must be positive, got '{text}'.")
    return value


def duration(seconds: float) -> str:
    """A time for a person: 45 s, 12 min, 3.5 h."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def format_score(key: str, value: float | None) -> str:
    """A metric as people read it: a share as a percentage, PSNR in dB, SSIM as it is."""
    if value is None:
        return "-"
    if key.endswith("psnr"):
        return f"{value:.2f} dB"
    return f"{value:.4f}" if key.endswith("ssim") else f"{value:.2%}"
