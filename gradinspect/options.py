"""Every option shared by two or more commands, declared once.

An :class:`Option` holds what the command line (``cli.py`` turns it into a
click option), the config file (``config.py``: keys marked ``config``) and the
library (``ValueError`` via :meth:`Range.check`) need to know about it.
:class:`Range` is the one range validator: each layer keeps its own error type
(a click usage error, ``ValueError``, ``ConfigError``) but the same limits.

Adding a shared option: one :class:`Option` here, then name it in the
commands' option lists in ``cli.py`` (and in ``check.COMMAND_OPTIONS`` for a
``[tool.gradinspect.check]`` key).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Range", "Option", "MAX_JOBS", "NORM_TYPE", "MAX_NORM", "EPS", "INCLUDE", "EXCLUDE", "SHARDS", "DEDUP",
           "LOSS_SCALE", "JOBS", "QUIET", "WIDTH", "ALLOW_OUTSIDE_INDEX", "JSON", "OUTPUT", "format_option",
           "NORM_OPTIONS", "SELECTION_OPTIONS", "VOID_AS", "VOID_AS_CHOICES", "PART", "PARTIAL", "PART_OPTIONS",
           "SCHEDULER"]

MAX_JOBS = 64  # threads: more buy nothing (reads and numpy saturate first) and cost ~5 MiB each


def _num(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


@dataclass(frozen=True)
class Range:
    """Numbers from ``lo`` to ``hi`` (None: unbounded; ``*_open``: the bound excluded).

    ``integer``: whole numbers only; otherwise NaN and, with ``finite``, ±inf are out.
    """

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    integer: bool = False
    finite: bool = True

    def contains(self, x: Any) -> bool:
        if self.integer and (isinstance(x, bool) or not isinstance(x, numbers.Integral)):
            return False
        if math.isnan(x) or (self.finite and math.isinf(x)):
            return False
        if self.lo is not None and not (x > self.lo if self.lo_open else x >= self.lo):
            return False
        return self.hi is None or (x < self.hi if self.hi_open else x <= self.hi)

    def describe(self) -> str:
        """``a finite number > 0``, ``a number from 0 to 1``, ``a whole number from 1 to 64``."""
        what = "a whole number" if self.integer else "a finite number" if self.finite else "a number"
        if self.lo is not None and self.hi is not None and not (self.lo_open or self.hi_open):
            return f"{'a whole number' if self.integer else 'a number'} from {_num(self.lo)} to {_num(self.hi)}"
        parts = []
        if self.lo is not None:
            parts.append(f"{'>' if self.lo_open else '>='} {_num(self.lo)}")
        if self.hi is not None:
            parts.append(f"{'<' if self.hi_open else '<='} {_num(self.hi)}")
        return " ".join([what, " and ".join(parts)]) if parts else what

    def notation(self) -> str:
        """The range as click writes it in --help: ``x>0``, ``0<=x<=1``."""
        if self.lo is None:
            return "" if self.hi is None else f"x{'<' if self.hi_open else '<='}{self.hi}"
        if self.hi is None:
            return f"x{'>' if self.lo_open else '>='}{self.lo}"
        return f"{self.lo}{'<' if self.lo_open else '<='}x{'<' if self.hi_open else '<='}{self.hi}"

    def problem(self, x: float) -> str | None:
        """None when ``x`` is in the range, else what the command line says about it."""
        if self.contains(x):
            return None
        if isinstance(x, float) and (math.isnan(x) or (self.finite and math.isinf(x))):
            return "must be finite"
        return f"{x} is not in the range {self.notation()}."

    def check(self, name: str, x: Any, error: Callable[[str], Exception] = ValueError) -> Any:
        """``x`` when it is in the range; else raise ``error("<name> must be <describe>, not <x>")``."""
        if isinstance(x, bool) or not isinstance(x, numbers.Real) or not self.contains(x):
            raise error(f"{name} must be {self.describe()}, not {x}")
        return x


POSITIVE = Range(0, lo_open=True)
NON_NEGATIVE = Range(0)
FINITE = Range()
SHARE = Range(0, 1)
COSINE = Range(-1, 1)


@dataclass(frozen=True)
class Option:
    """One option: ``name`` is the click parameter, the library keyword and the config key.

    ``kind``: ``float`` or ``int`` (limited by ``range``), ``bool`` (a flag; ``--x/--no-x``
    in ``flags`` for a pair), ``count``, ``choice`` (``choices``), ``globs`` (repeatable),
    ``norm_type``, ``path``, ``text``.  ``config``: also a ``[tool.gradinspect.check]`` key.
    """

    name: str
    flags: tuple[str, ...]
    kind: str
    default: Any
    help: str
    metavar: str | None = None
    range: Range | None = None
    choices: tuple[str, ...] = ()
    config: bool = False
    show_default: bool = False

    def check(self, v: Any) -> None:
        """Refuse ``v`` outside ``range`` (a ValueError naming the option)."""
        if self.range is not None:
            self.range.check(self.name, v)

    def from_config(self, v: Any) -> Any:
        """The value of a config file's key; TypeError("<what it must be>") when it is wrong."""
        if self.kind in ("bool", "count"):
            if not isinstance(v, bool):
                raise TypeError("true or false")
            return int(v) if self.kind == "count" else v
        if self.kind == "globs":
            if isinstance(v, str):
                return (v,)
            if isinstance(v, list) and all(isinstance(x, str) for x in v):
                return tuple(v)
            raise TypeError("a string or a list of strings")
        if self.kind == "choice":
            if not isinstance(v, str) or v not in self.choices:
                raise TypeError("one of " + ", ".join(self.choices))
            return v
        if self.kind == "norm_type":
            from .norms import parse_norm_type

            if isinstance(v, bool) or not isinstance(v, (int, float, str)):
                raise TypeError('1, 2, "inf" or a number > 0')
            try:
                return parse_norm_type(v)
            except (ValueError, OverflowError):
                raise TypeError('1, 2, "inf" or a number > 0') from None
        if self.kind in ("float", "int"):
            rng = self.range or FINITE
            if self.kind == "float" and not isinstance(v, bool) and isinstance(v, int):
                try:
                    v = float(v)
                except OverflowError:  # TOML integers past the float range
                    raise TypeError(rng.describe()) from None
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not rng.contains(v):
                raise TypeError(rng.describe())
            return v
        if not isinstance(v, str):
            raise TypeError("a string")
        return v


NORM_TYPE = Option("norm_type", ("--norm-type", "-p"), "norm_type", "2", "The norm: 1, 2, inf, or any number > 0.",
                   config=True, show_default=True)
MAX_NORM = Option("max_norm", ("--max-norm", "-c"), "float", 1.0, "The clip threshold, as clip_grad_norm_(max_norm).",
                  range=POSITIVE, config=True, show_default=True)
EPS = Option("eps", ("--eps",), "float", 1e-6, "Added to the norm as torch does; 0 gives optax's formula.",
             range=NON_NEGATIVE, config=True, show_default=True)
INCLUDE = Option("include", ("--include",), "globs", (), "Only tensors whose name matches (repeatable).",
                 metavar="GLOB", config=True)
EXCLUDE = Option("exclude", ("--exclude",), "globs", (), "Leave out tensors whose name matches (repeatable).",
                 metavar="GLOB", config=True)
SHARDS = Option(
    "shards", ("--shards",), "choice", None,
    "What a tensor name in several files means: slices = disjoint pieces of one tensor "
    "(ZeRO/FSDP, tensor parallel), merged exactly; replicas = copies (data-parallel ranks), "
    "counted once. Without it, a repeated name is an error.", choices=("slices", "replicas"), config=True)
DEDUP = Option(
    "dedup", ("--dedup/--no-dedup",), "bool", False,
    "Count exact copies once (tied weights saved twice, e.g. lm_head.weight = wte.weight), as "
    "model.parameters() does: a copy's row is left out. Without it, copies are a warning. Tensors merged "
    "from --shards slices are never compared.", config=True)
LOSS_SCALE = Option(
    "loss_scale", ("--loss-scale",), "float", None,
    "Gradients saved before the AMP loss scale was removed: divide every norm by S (the clip is "
    "computed on the result). Default: the safetensors metadata key loss_scale, when the files have it.",
    metavar="S", range=POSITIVE)
JOBS = Option("jobs", ("--jobs", "-j"), "int", None,
              f"Threads to use (default: one per core, at most {MAX_JOBS}). Results are identical for every N. "
              "Not used with --scheduler (the cluster's workers read; a warning says so).",
              metavar="N", range=Range(1, MAX_JOBS, integer=True), config=True)
QUIET = Option("quiet", ("--quiet", "-q"), "count", 0,
               "-q: no progress bar and no warnings on stderr except those about NaN/Inf values; "
               "-qq: none of those either (only Error lines).", config=True)
WIDTH = Option("width", ("--width",), "int", None,
               "Fit the table in N columns, eliding long names in the middle (default: the "
               "terminal's width; output that is not a terminal keeps names whole).",
               metavar="N", range=Range(1, integer=True))
ALLOW_OUTSIDE_INDEX = Option(
    "allow_outside_index", ("--allow-outside-index",), "bool", False,
    "Let a *.safetensors.index.json name shard files outside its own directory "
    "(an absolute path or one climbing out with ..); refused by default.")
SCHEDULER = Option(
    "scheduler", ("--scheduler",), "text", None,
    "Read on a Dask cluster: tcp://HOST:PORT, or local:N to start N worker processes for this run "
    "(default: $GRADINSPECT_SCHEDULER; this option wins). Every worker must see the files at the same "
    "paths. Results are bit for bit those of a local run. Needs pip install 'gradinspect[dask]'.",
    metavar="ADDRESS")
JSON = Option("as_json", ("--json",), "bool", False, "Short for --format json.")
OUTPUT = Option("output", ("--output", "-o"), "path", None,
                "Write the report to PATH (replaced whole, or not at all on error) instead of stdout; "
                "without --format, the format follows the suffix (.json, .csv, .txt, and where the "
                "command has them .md, .xml for JUnit, .png/.svg/.html plots); an input is never replaced.",
                metavar="PATH")
PART = Option("part", ("--part",), "path", None,
              "Compute only part I of N of the work (I counts from 0: 0/8 ... 7/8; files, then tensors, then "
              "chunk ranges, split alike for the same inputs and options, whatever --jobs) and write its exact "
              "statistics to --partial; `gradinspect merge` then prints this command's report from the N parts, "
              "bit for bit.", metavar="I/N")
PARTIAL = Option("partial", ("--partial",), "path", None,
                 "With --part: where to write the part (JSON, gradinspect.partial/1; replaced atomically). "
                 "A part run prints nothing on stdout.", metavar="OUT")
PART_OPTIONS = (PART, PARTIAL)

#: What ``--void-as`` reads raw void arrays as: bfloat16, float16, the ml_dtypes float8 types, or skip.
VOID_AS_CHOICES = ("bfloat16", "float16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
                   "float8_e4m3b11fnuz", "float8_e4m3", "float8_e3m4", "float8_e8m0fnu", "skip")
VOID_AS = Option(
    "void_as", ("--void-as",), "choice", None,
    "np.save/np.savez write ml_dtypes' bfloat16 as raw 2-byte values (<V2) and float8 types as raw 1-byte "
    "values (<V1): read those of DTYPE's width as DTYPE (bfloat16, float16 or an ml_dtypes float8 name such "
    "as float8_e4m3fn, float8_e5m2, float8_e4m3fnuz), or skip them all. Default: <V2 as bfloat16 (with a "
    "note on stderr); <V1 has no default (an error).",
    metavar="DTYPE", choices=VOID_AS_CHOICES, config=True)

NORM_OPTIONS = (NORM_TYPE, MAX_NORM, EPS)
SELECTION_OPTIONS = (INCLUDE, EXCLUDE)


def format_option(kind: str) -> Option:
    """``--format`` for reports of ``kind``: the formats that render it, the kind's default first shown."""
    from . import formats

    choices = tuple(formats.names(kind))
    helps = "; ".join(f"{n}: {formats.get(n).help}" for n in choices)
    return Option("format", ("--format", "-f"), "choice", formats.DEFAULT[kind], f"Output format ({helps}).",
                  choices=choices, config=True, show_default=True)
