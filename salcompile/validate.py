"""Argument checking shared by every entry point: numbers, paths, sizes.

One place decides what a valid number is (finite, of the right type, in range; `True` is not a
number, 2.5 is not an int) and how the error reads: it names the argument, the value given and
the valid range, so the user knows what to pass instead.

    number("lr", lr, lo=0, lo_open=True)              # a finite float > 0
    integer("batch", batch, lo=1)                     # an int >= 1
    check_numbers(obj, {"lr": Num(lo=0, lo_open=True), "batch": Int(lo=1)}, who="Recipe")
    check_memory(nbytes, "route_dim=... gates")       # before allocating
"""
from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

from .errors import SalcompileError

INT64_MAX = 2 ** 63 - 1


@dataclass(frozen=True)
class Num:
    """A real number (int or float, not bool), finite, within [lo, hi] (open ends if asked)."""
    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False
    hi_open: bool = False
    integer: bool = False
    optional: bool = False   # None accepted
    hint: str = ""           # appended after "; ": what the value is, a typical choice
    label: str = ""          # the name shown in the message (default: the argument's name)

    def range_text(self) -> str:
        kind = "an int" if self.integer else "a finite number"
        if self.lo is not None and self.hi is not None:
            lb, rb = ("(" if self.lo_open else "["), (")" if self.hi_open else "]")
            return f"{kind} in {lb}{_fmt(self.lo)}, {_fmt(self.hi)}{rb}"
        bound = None
        if self.lo is not None:
            bound = f"{'>' if self.lo_open else '>='} {_fmt(self.lo)}"
        elif self.hi is not None:
            bound = f"{'<' if self.hi_open else '<='} {_fmt(self.hi)}"
        if bound is None:
            return kind
        return f"{kind} {bound}" if self.integer else f"{bound} ({kind})"


def Int(lo: Optional[int] = None, hi: Optional[int] = None, **kw) -> Num:
    return Num(lo=lo, hi=hi, integer=True, **kw)


def _fmt(v: float) -> str:
    if isinstance(v, int) and abs(v) >= 2 ** 20:
        exp = int(math.log2(abs(v))) if v else 0
        if 2 ** exp == abs(v):
            return f"{'-' if v < 0 else ''}2**{exp}"
        if v == INT64_MAX:
            return "2**63-1"
    return f"{v:g}" if isinstance(v, float) else str(v)


def check(name: str, value: Any, spec: Num, who: str = "") -> Any:
    """`value` if it satisfies `spec`, else a SalcompileError naming `name`, the value and the
    valid range. Ints are returned as int; floats as float."""
    if value is None and spec.optional:
        return None
    shown = spec.label or name
    label = f"{who}: {shown}" if who else shown
    want = spec.range_text() + (" or None" if spec.optional else "")
    why = ""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        why = f" (a {type(value).__name__}, not a number)"
    elif spec.integer and not isinstance(value, numbers.Integral):
        why = " (not a whole number)"
    else:
        try:
            if not math.isfinite(value):
                why = " (NaN and infinity make training non-finite)"
        except OverflowError:  # an int too large for a float: finite
            pass
        lo, hi = spec.lo, spec.hi
        if not why and ((lo is not None and (value < lo or (spec.lo_open and value == lo))) or
                        (hi is not None and (value > hi or (spec.hi_open and value == hi)))):
            why = " (out of range)"
    if why:
        hint = f"; {spec.hint}" if spec.hint else ""
        raise SalcompileError(f"{label} must be {want}, got {value!r}{why}{hint}.")
    return int(value) if spec.integer else value


def number(name: str, value: Any, who: str = "", **kw) -> Any:
    """A finite real number within the given bounds (see Num)."""
    return check(name, value, Num(**kw), who)


def integer(name: str, value: Any, who: str = "", **kw) -> Any:
    """An int (not bool, not 2.5) within the given bounds."""
    return check(name, value, Int(**kw), who)


def check_numbers(obj: Any, table: Dict[str, Num], who: str = "") -> None:
    """Check every attribute of `obj` named in `table` (a dataclass's numeric fields as data)."""
    for name, spec in table.items():
        check(name, getattr(obj, name), spec, who)


def seed(name: str, value: Any, who: str = "") -> int:
    return check(name, value, SEED, who)


SEED = Int(0, INT64_MAX, hint="a seed, e.g. 0")


def path_arg(name: str, value: Any, who: str = "") -> Path:
    """A filesystem path argument: a str or os.PathLike, not None/int/bytes."""
    label = f"{who}: {name}" if who else name
    if isinstance(value, (str, os.PathLike)) and not isinstance(value, bytes):
        text = os.fspath(value)
        if isinstance(text, str) and text.strip():
            if "\x00" in text:
                raise SalcompileError(f"{label}: the path contains a NUL byte; pass a file name.")
            return Path(text)
    raise SalcompileError(f"{label} must be a file path (a str or pathlib.Path), got {value!r} "
                          f"({type(value).__name__}); pass e.g. {name}='model.pt2'.")


def available_memory(device: Any = "cpu") -> Optional[int]:
    """Bytes that can still be allocated on `device` (None where it cannot be told)."""
    import torch
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    if dev.type == "meta":
        return None
    if dev.type == "cuda":
        try:
            free, _ = torch.cuda.mem_get_info(dev)
            return int(free)
        except Exception:
            return None
    if dev.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} PiB"  # pragma: no cover


def check_memory(nbytes: int, what: str, device: Any = "cpu", fix: str = "") -> None:
    """Refuse, before allocating, a request of `nbytes` that the device cannot hold."""
    avail = available_memory(device)
    if avail is None or nbytes <= avail:
        return
    raise SalcompileError(
        f"{what} needs {_bytes(nbytes)} on {device}, but only {_bytes(avail)} is available"
        + (f"; {fix}" if fix else "; choose smaller sizes") + ".")


def flag(name: str, value: Any, who: str = "") -> bool:
    """True or False (not 0/1, not 'yes')."""
    if not isinstance(value, bool):
        label = f"{who}: {name}" if who else name
        raise SalcompileError(f"{label} must be True or False, got {value!r}.")
    return value


def shape(name: str, dims: Any, who: str = "", itemsize: int = 4, batch: int = 1,
          device: Any = "cpu") -> tuple:
    """An input shape (without or with the batch): each dimension an int >= 1, and the tensor
    it describes (times `batch`, `itemsize` bytes per element) fits in the device's memory.
    For the CLI's --input-shape."""
    label = f"{who}: {name}" if who else name
    try:
        dims = tuple(dims)
    except TypeError:
        raise SalcompileError(f"{label} must be a sequence of ints, got {dims!r}.") from None
    if not dims:
        raise SalcompileError(f"{label} is empty; give the input's sizes, e.g. 64 or 3,32,32.")
    for i, d in enumerate(dims):
        check(f"{name}[{i}]", d, Int(lo=1, hint="every size must be a positive int, e.g. 64 or "
                                                "3,32,32 (the batch is added)"), who)
    n = batch * itemsize * math.prod(dims)
    check_memory(n, f"an input of shape {list(dims)}", device,
                 fix=f"give {label} the model's real input sizes")
    return dims
