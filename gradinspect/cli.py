"""The command line: parse, call the library, pick a format, map errors to exit codes.

Exit codes: 0 success; 1 a check finding or a diff outside tolerance; 2
unreadable input or a usage error (one ``Error:`` line on stderr, nothing on
stdout).
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from . import __version__, formats
from . import options as o
from .check import COMMAND_OPTIONS, COMMAND_OPTIONS_AFTER
from .formats import printable
from .options import FINITE, Option, Range

EXIT_OK = 0
EXIT_FINDINGS = 1
EXIT_INPUT = 2

if TYPE_CHECKING:  # click >= 8.3 types ParamType by its value; older click cannot subscript it
    _ParamType = click.ParamType[Any]
else:
    _ParamType = click.ParamType

_CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class NormType(_ParamType):
    name = "P"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        from .norms import parse_norm_type

        if isinstance(value, float):
            return value
        try:
            return parse_norm_type(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


class GroupBy(_ParamType):
    """``--group-by``: an integer depth, or a regular expression."""

    name = "N|REGEX"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | str:
        from .api import compile_group_by

        if isinstance(value, int):
            return value
        by: int | str = int(value) if value.isdigit() else value
        try:
            compile_group_by(by)
        except ValueError as e:
            self.fail(str(e), param, ctx)
        return by


class GradInspectGroup(click.Group):
    """Turns every :class:`~gradinspect.errors.GradInspectError` into one line and exit 2."""

    def invoke(self, ctx: click.Context) -> Any:
        from .errors import GradInspectError

        try:
            return super().invoke(ctx)
        except GradInspectError as e:
            _fail(str(e))
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            sys.exit(130)
        except BrokenPipeError:
            # The reader went away (`| head`): stop quietly, as Unix tools do.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            sys.exit(EXIT_OK)


def _fail(message: str) -> NoReturn:
    """One line, whatever the path or name in ``message`` holds (control characters are escaped)."""
    click.echo(f"Error: {printable(message)}", err=True)
    sys.exit(EXIT_INPUT)


@click.group(cls=GradInspectGroup, context_settings=_CONTEXT)
@click.version_option(__version__, "-V", "--version", prog_name="gradinspect")
def cli() -> None:
    """Exact gradient norms of saved gradients (.safetensors, .npz, .npy).

    \b
    Examples:
      gradinspect norms grads.safetensors
      gradinspect norms ckpt/ --group-by 3 --top 10
      gradinspect norms grads.npz --max-norm 1.0 --format json | jq .clip
      gradinspect check grads.safetensors --max-total 10 --format github
      gradinspect diff run1/grads.safetensors run2/grads.safetensors --rtol 1e-6
      gradinspect info big.safetensors
      gradinspect trend 'run/step_*.safetensors' --fail-on nonfinite

    Run `gradinspect COMMAND --help` for a command's options.
    """



class _Ranged(click.FloatRange):
    """A float option limited by an :class:`~gradinspect.options.Range` (shown in --help as click does)."""

    def __init__(self, rng: Range) -> None:
        super().__init__(rng.lo, rng.hi, min_open=rng.lo_open, max_open=rng.hi_open)
        self.range = rng

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        x = click.FLOAT.convert(value, param, ctx)
        problem = self.range.problem(x)
        if problem:
            self.fail(problem, param, ctx)
        return x


class _RangedInt(click.IntRange):
    """An integer option limited by an :class:`~gradinspect.options.Range`."""

    def __init__(self, rng: Range) -> None:
        super().__init__(rng.lo, rng.hi, min_open=rng.lo_open, max_open=rng.hi_open)  # type: ignore[arg-type]
        self.range = rng

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        x = click.INT.convert(value, param, ctx)
        problem = self.range.problem(x)
        if problem:
            self.fail(problem, param, ctx)
        return x


class _Finite(_ParamType):
    name = "float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        x = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(x):
            self.fail("must be finite", param, ctx)
        return x


def _type(opt: Option) -> Any:
    if opt.kind in ("float", "int"):
        rng = opt.range or FINITE
        if opt.kind == "int":
            return _RangedInt(rng)
        return _Ranged(rng) if rng.notation() else _Finite()
    if opt.kind == "choice":
        return click.Choice(list(opt.choices))
    if opt.kind == "norm_type":
        return NormType()
    return None


def _click(opt: Option) -> Any:
    """The click option of a declared :class:`~gradinspect.options.Option`."""
    kw: dict[str, Any] = {"help": opt.help}
    if opt.metavar:
        kw["metavar"] = opt.metavar
    if opt.kind == "count":
        kw["count"] = True
    else:
        kw["default"] = opt.default
        kw["show_default"] = opt.show_default
    if opt.kind == "bool":
        kw["is_flag"] = True
    elif opt.kind == "globs":
        kw["multiple"] = True
    else:
        t = _type(opt)
        if t is not None:
            kw["type"] = t
    return click.option(*opt.flags, opt.name, **kw)


_F = TypeVar("_F", bound=Callable[..., Any])


def _options(*opts: Option | Any) -> Callable[[_F], _F]:
    """Apply options (declared ones or click decorators) so that --help lists them in this order."""

    def apply(f: _F) -> _F:
        for opt in reversed(opts):
            f = (_click(opt) if isinstance(opt, Option) else opt)(f)
        return f

    return apply


def _output_format(kind: str, fmt: str, given: bool, output: str | None) -> str:
    """The format to write: ``fmt`` when given, else the one --output's suffix implies, else the default.

    Also refuses, before any work, an --output that is a directory or in a directory that does not exist."""
    if output is None:
        return fmt
    if os.path.isdir(output):
        _fail(f"{output}: is a directory")
    parent = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(parent):
        _fail(f"{output}: no such directory {parent}")
    if given:
        return fmt
    inferred = formats.for_suffix(kind, output)
    if inferred is None:
        raise click.UsageError(
            f"cannot tell the format of --output {output} from its suffix (known: "
            f"{', '.join(formats.suffixes(kind))}); give --format")
    return inferred


def _given(ctx: click.Context, name: str) -> bool:
    from click.core import ParameterSource

    return ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE


def _not_an_input(output: str | None, inputs: Sequence[str], option: str = "--output") -> None:
    """--output must never replace one of the gradient files the command reads (checked before any work)."""
    if output is None:
        return
    try:
        out = os.stat(output)
    except OSError:
        return  # a new file
    from .errors import GradInspectError
    from .sources import resolve_paths

    try:
        files = resolve_paths(list(inputs))
    except GradInspectError:
        return  # the command itself says what is wrong with its inputs
    for path in files:
        try:
            st = os.stat(path)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (out.st_dev, out.st_ino):
            _fail(f"{output}: {option} names an input file; refusing to overwrite it")


def _emit(fmt: str, kind: str, report: Any, width: int | None = None, output: str | None = None,
          heatmap: str = "norm") -> None:
    """Render fully in memory first: on any error nothing half-written reaches stdout or ``output``.

    Names are elided to fit ``width`` (--width), else the terminal; output that
    is not a terminal keeps them whole (laid out as for its COLUMNS or 80).
    With ``output``, the report replaces that file atomically, without colour.
    A binary format (PNG) is never written to a terminal."""
    f = formats.get(fmt)
    if output is not None:
        data = f.render(report, formats.RenderOptions(width=width, color=False, elide=width is not None,
                                                      heatmap=heatmap))
        try:
            formats.write_file(output, data)
        except OSError as e:
            _fail(f"{output}: cannot write the report ({e.strerror or e})")
        return
    if f.binary and sys.stdout.isatty():
        _fail(f"the {fmt} format is binary: write it to a file with --output FILE.{fmt} (or pipe stdout)")
    options = formats.RenderOptions(width=width, heatmap=heatmap)
    if not f.machine:
        # Let rich see the real stdout to detect width, colour and NO_COLOR.
        from .formats.table import console_for

        con = console_for(sys.stdout, options)
        options = formats.RenderOptions(width=con.width, color=con.is_terminal and not con.no_color,
                                        elide=width is not None or con.is_terminal, heatmap=heatmap)
    data = f.render(report, options)
    if isinstance(data, bytes):
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    else:
        click.echo(data, nl=False)

def _run_part(command: str, part: str | None, partial: str | None, options: dict[str, Any], jobs: int | None,
              fmt: str | None, output: str | None, inputs: Sequence[str] = (), scheduler: str | None = None,
              quiet: int = 0, jobs_name: str = "--jobs") -> None:
    """``--part I/N --partial OUT``: compute that part (on the Dask cluster ``scheduler`` names, if any), write
    it, print nothing, exit 0 (neither given: return)."""
    if part is None and partial is None:
        return
    if part is None or partial is None:
        raise click.UsageError("--part and --partial go together (--part I/N --partial OUT)")
    if output is not None:
        raise click.UsageError("a part run writes only --partial; give --output to `gradinspect merge`")
    from .partial import parse_part, run_part

    try:
        which = parse_part(part)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--part") from None
    if os.path.isdir(partial):
        _fail(f"{partial}: is a directory")
    _not_an_input(partial, inputs, "--partial")
    with _executor(scheduler) as dask:
        run_part(command, options, which, partial, jobs, fmt, executor=dask)
    _warn(_jobs_with_scheduler(jobs, scheduler, part=True, name=jobs_name), quiet >= 1)
    sys.exit(EXIT_OK)


def _warn(lines: list[str], quiet: bool | int = False) -> None:
    if quiet:
        return
    for line in lines:
        click.echo(f"Warning: {printable(line)}", err=True)


def _jobs_with_scheduler(jobs: int | None, scheduler: str | None, part: bool = False, name: str = "--jobs"
                         ) -> list[str]:
    """The warning for --jobs given with a Dask cluster (--scheduler, else $GRADINSPECT_SCHEDULER): the
    cluster's workers do the reading --jobs would share among threads (a part run still hashes possible
    copies on this machine with --jobs threads)."""
    if jobs is None or (scheduler is None and not os.environ.get("GRADINSPECT_SCHEDULER")):
        return []
    by = "--scheduler" if scheduler is not None else "--scheduler ($GRADINSPECT_SCHEDULER)"
    if part:
        return [f"{name} with {by} only sets how many threads of this part run hash tensors of equal shapes "
                "(possible exact copies) on this machine; the Dask cluster's workers compute the statistics"]
    return [f"{name} is ignored with {by}: the Dask cluster's workers do the reading (local:N starts N of them)"]


@contextlib.contextmanager
def _executor(scheduler: str | None) -> Iterator[Any]:
    """The Dask executor --scheduler (else $GRADINSPECT_SCHEDULER) names, connected; None: local threads."""
    from_env = scheduler is None
    address = (os.environ.get("GRADINSPECT_SCHEDULER") or None) if from_env else scheduler
    if address is None:
        yield None
        return
    from .executors_dask import DaskExecutor

    try:
        executor = DaskExecutor(address)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="$GRADINSPECT_SCHEDULER" if from_env else "--scheduler"
                                 ) from None
    with executor:
        executor.connect()
        yield executor


class _ProgressBar:
    """Bytes done, rate and time left on stderr: only when stderr is a terminal,
    only once the work has taken about a second, never with --quiet."""

    DELAY = 1.0

    def __init__(self, enabled: bool) -> None:
        import threading
        import time

        self._now = time.monotonic
        self.enabled = enabled and sys.stderr.isatty()
        self.total: int | None = None
        self.done = 0
        self.start = self._now()
        self._lock = threading.Lock()
        self._bar: Any = None
        self._task: Any = None

    def set_total(self, nbytes: int) -> None:
        self.total = nbytes

    def __call__(self, nbytes: int) -> None:
        if not self.enabled:
            return
        with self._lock:
            self.done += nbytes
            if self._bar is None:
                if self._now() - self.start < self.DELAY:
                    return
                from rich.console import Console
                from rich.progress import (
                    BarColumn,
                    DownloadColumn,
                    Progress,
                    TextColumn,
                    TimeRemainingColumn,
                    TransferSpeedColumn,
                )

                self._bar = Progress(TextColumn("reading"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                                     TimeRemainingColumn(), console=Console(stderr=True), transient=True)
                self._bar.start()
                self._task = self._bar.add_task("reading", total=self.total, completed=self.done)
            else:
                self._bar.update(self._task, completed=self.done)

    def __enter__(self) -> _ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()




_PATHS = click.argument("paths", nargs=-1, required=True, metavar="PATH...")
_TOP = Option("top", ("--top",), "int", None, "Show only N rows (totals still cover every selected tensor).",
              metavar="N", range=Range(1, integer=True))


_GROUP_BY = click.option(
    "--group-by", type=GroupBy(), default=None, metavar="N|REGEX",
    help="One row per group: tensors sharing the first N name parts (split on --sep), or the text "
         "a REGEX captures in the name (its groups joined by --sep, or the whole match; a name it "
         "does not match is a row of its own).")
_SEP = click.option("--sep", "group_sep", default=".", show_default=True, metavar="TEXT",
                    help="What --group-by N splits names on (JAX names use /).")


@cli.command(context_settings=_CONTEXT)
@_PATHS
@_options(
    *o.NORM_OPTIONS, o.format_option("norms"), o.JSON,
    click.option("--sort", type=click.Choice(["share", "norm", "name", "numel", "none"]), default="share",
                 show_default=True, help="Row order; none keeps file order."),
    _TOP, *o.SELECTION_OPTIONS, _GROUP_BY, _SEP,
    o.SHARDS, o.DEDUP, o.LOSS_SCALE, o.JOBS, o.SCHEDULER, o.QUIET, o.WIDTH, o.ALLOW_OUTSIDE_INDEX, o.OUTPUT,
    o.VOID_AS, *o.PART_OPTIONS,
)
def norms(paths: tuple[str, ...], norm_type: float, max_norm: float, eps: float, format: str, as_json: bool,
          sort: str, top: int | None, include: tuple[str, ...], exclude: tuple[str, ...],
          group_by: int | str | None, group_sep: str, shards: str | None, dedup: bool, loss_scale: float | None,
          jobs: int | None, scheduler: str | None, quiet: int, width: int | None, allow_outside_index: bool,
          output: str | None, void_as: str | None, part: str | None, partial: str | None) -> None:
    """Per-tensor and global gradient norms, and what clipping would do.

    PATH is a .safetensors, .npz, .npy or torch.save .pt/.pth/.bin file, a
    directory (its .safetensors, .npz and .npy files; torch files only when
    named or globbed), a *.safetensors.index.json, or a quoted glob.  Several
    PATHs are the shards of one gradient set: the global norm is over all of them.

    \b
    Examples:
      gradinspect norms grads.safetensors
      gradinspect norms model.safetensors.index.json --top 20
      gradinspect norms grads.npz -p inf --max-norm 0.5
      gradinspect norms 'rank*.safetensors' --group-by 3 --sort name
      gradinspect norms jax_grads.npz --group-by 2 --sep /
      gradinspect norms grads.safetensors --group-by '(attn|mlp|wte|wpe|lm_head)'
      gradinspect norms 'fsdp/rank*.safetensors' --shards slices
      gradinspect norms grads.safetensors --include 'layers.*' --exclude '*.bias'
      gradinspect norms grads.safetensors --json | jq '.total.l2'

    Exit status: 0 on success, 2 on unreadable input or bad usage.
    """
    from .api import inspect

    if not group_sep:
        raise click.BadParameter("must not be empty", param_hint="--sep")
    given = as_json or _given(click.get_current_context(), "format")
    _run_part("norms", part, partial, dict(
        paths=paths, norm_type=norm_type, max_norm=max_norm, eps=eps, sort=sort, top=top, include=include,
        exclude=exclude, group_by=group_by, group_sep=group_sep, shards=shards, dedup=dedup, loss_scale=loss_scale,
        allow_outside_index=allow_outside_index, void_as=void_as), jobs,
        ("json" if as_json else format) if given else None, output, paths, scheduler, quiet)
    fmt = _output_format("norms", "json" if as_json else format,
                         as_json or _given(click.get_current_context(), "format"),
                         output)
    _not_an_input(output, paths)
    with _executor(scheduler) as dask, _ProgressBar(not quiet) as bar:
        report = inspect(
            list(paths), norm_type=norm_type, max_norm=max_norm, eps=eps, include=include, exclude=exclude,
            group_by=group_by, group_sep=group_sep, sort=sort, top=top, shards=shards, jobs=dask or jobs, progress=bar,
            dedup=dedup, loss_scale=loss_scale, allow_outside_index=allow_outside_index, void_as=void_as,
        )
    _warn(report.input_warnings(), quiet >= 1)
    _warn(report.nonfinite_warnings(), quiet >= 2)
    _warn(_jobs_with_scheduler(jobs, scheduler), quiet >= 1)
    _emit(fmt, "norms", report, width, output)


@cli.command(context_settings=_CONTEXT)
@_PATHS
@_options(
    *COMMAND_OPTIONS,
    click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None, metavar="FILE",
                 help="Read [tool.gradinspect.check] from FILE instead of the nearest pyproject.toml."),
    o.format_option("check"), o.JSON, *COMMAND_OPTIONS_AFTER, o.OUTPUT, *o.PART_OPTIONS,
)
def check(paths: tuple[str, ...], config_file: str | None, as_json: bool, output: str | None, part: str | None,
          partial: str | None, **options: Any) -> None:
    """Gate gradients in CI: exit 1 when any rule fails.

    Computes what `norms` does and evaluates the rules turned on below (only
    `nonfinite` is on by default).  Thresholds can also come from a
    [tool.gradinspect.check] table in the nearest pyproject.toml (from the
    working directory upward) or in --config FILE; keys are the long option
    names with underscores (max_total = 10.0, fail_on_clip = true).
    Command-line options win.

    With --shards replicas the rule replicas_differ is on: copies of a
    tensor must agree (within --max-replica-diff).  The numbers shown for a
    replicated tensor are its first copy's in file order, or, when a copy
    holds NaN/Inf, the first such copy's.

    \b
    Examples:
      gradinspect check grads.safetensors
      gradinspect check grads.safetensors --max-total 10 --fail-on-zero
      gradinspect check ckpt/ --max-share 0.5 --format github
      gradinspect check grads.safetensors --format junit > gradinspect.xml

    Exit status: 0 every rule holds, 1 at least one finding, 2 unreadable
    input or bad usage (a broken file is never a mere finding).
    """
    from .api import check as run_check
    from .check import rules_from
    from .config import check_options, find_config, load_check_config

    ctx = click.get_current_context()
    path = config_file or find_config()
    settings = load_check_config(path) if path else {}
    for opt in check_options():
        if opt.name in settings and not _given(ctx, opt.name):
            options[opt.name] = settings[opt.name]
    given = as_json or _given(ctx, "format") or "format" in settings
    jobs_name = "--jobs" if _given(ctx, "jobs") else f"jobs in {path}"  # else the config file's, or unset
    if part is not None or partial is not None:
        try:
            rules_from(options)
        except ValueError as e:
            raise click.UsageError(str(e)) from None
        recorded = {k: v for k, v in options.items() if k not in ("format", "jobs", "quiet", "scheduler")}
        _run_part("check", part, partial, {"paths": paths, **recorded}, options["jobs"],
                  ("json" if as_json else options["format"]) if given else None, output, paths, options["scheduler"],
                  int(options["quiet"]), jobs_name)
    fmt = _output_format("check", "json" if as_json else options["format"], given, output)
    _not_an_input(output, paths)
    try:
        rules = rules_from(options)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    quiet = int(options["quiet"])  # the config file's quiet = true is -q
    with _executor(options["scheduler"]) as dask, _ProgressBar(not quiet) as bar:
        result = run_check(list(paths), rules, norm_type=options["norm_type"], max_norm=options["max_norm"],
                           eps=options["eps"], include=options["include"], exclude=options["exclude"],
                           shards=options["shards"], jobs=dask or options["jobs"], progress=bar,
                           dedup=options["dedup"], loss_scale=options["loss_scale"],
                           allow_outside_index=options["allow_outside_index"], void_as=options["void_as"])
    _warn(result.report.input_warnings(), quiet)
    _warn(_jobs_with_scheduler(options["jobs"], options["scheduler"], name=jobs_name), quiet)
    _emit(fmt, "check", result, output=output)
    sys.exit(EXIT_OK if result.ok else EXIT_FINDINGS)


@cli.command(context_settings=_CONTEXT)
@click.argument("a", metavar="A")
@click.argument("b", metavar="B")
@_options(
    Option("rtol", ("--rtol",), "float", None, "A tensor fails when l2_diff > atol + R * max(l2_a, l2_b).",
           metavar="R", range=o.NON_NEGATIVE),
    Option("atol", ("--atol",), "float", None, "See --rtol.", metavar="A", range=o.NON_NEGATIVE),
    Option("min_cosine", ("--min-cosine",), "float", None, "A tensor fails when its cosine similarity < C.",
           metavar="C", range=o.COSINE),
    click.option("--allow-missing", is_flag=True,
                 help="Different tensor sets or shapes do not fail the comparison (nothing compared still does)."),
    click.option("--strip-prefix", multiple=True, metavar="PREFIX",
                 help="Match names without PREFIX (e.g. module.), on both sides; the first matching one is removed "
                      "(repeatable). --include/--exclude and the report see the stripped names."),
    click.option("--strip-prefix-a", multiple=True, metavar="PREFIX", help="Like --strip-prefix, for A only."),
    click.option("--strip-prefix-b", multiple=True, metavar="PREFIX", help="Like --strip-prefix, for B only."),
    *o.SELECTION_OPTIONS, o.SHARDS,
    click.option("--shards-a", type=click.Choice(["slices", "replicas"]), default=None,
                 help="Like --shards, for A only (each side is one gradient set with its own mode)."),
    click.option("--shards-b", type=click.Choice(["slices", "replicas"]), default=None,
                 help="Like --shards, for B only."),
    o.format_option("diff"), o.JSON, o.WIDTH, o.ALLOW_OUTSIDE_INDEX, o.OUTPUT, o.SCHEDULER, o.QUIET, o.VOID_AS,
    *o.PART_OPTIONS,
)
def diff(a: str, b: str, rtol: float | None, atol: float | None, min_cosine: float | None, allow_missing: bool,
         strip_prefix: tuple[str, ...], strip_prefix_a: tuple[str, ...], strip_prefix_b: tuple[str, ...],
         include: tuple[str, ...], exclude: tuple[str, ...], shards: str | None, shards_a: str | None,
         shards_b: str | None, format: str, as_json: bool, width: int | None, allow_outside_index: bool,
         output: str | None, scheduler: str | None, quiet: int, void_as: str | None, part: str | None,
         partial: str | None) -> None:
    """Compare two gradient dumps tensor by tensor and as a whole.

    A and B are each a file, a directory or an index.json (each side may be
    sharded).  For every tensor in both with the same shape: the L2 norms of
    A, B and A − B, the relative difference ‖A−B‖ / max(‖A‖, ‖B‖), the cosine
    similarity and max |A − B|; globally, the same over all compared tensors
    as one vector.  Tensors only on one side, or whose shapes differ, are
    listed.  Different dtypes of the same shape are compared.

    With --shards (or --shards-a/--shards-b), a side's repeated names are
    copies (the copy norms shows is compared) or slices (compared as their
    concatenation in file order: the same slicing on both sides, flat
    FSDP/ZeRO slices, or splits along the first dimension; otherwise listed
    as sliced differently).

    \b
    Examples:
      gradinspect diff run1/grads.safetensors run2/grads.safetensors
      gradinspect diff rank0.safetensors rank1.safetensors --rtol 1e-6
      gradinspect diff grads_fp32.safetensors grads_bf16.safetensors --min-cosine 0.999
      gradinspect diff golden/ current/ --rtol 1e-5 --format json
      gradinspect diff ddp_grads.safetensors grads.safetensors --strip-prefix-a module.
      gradinspect diff 'fsdp/rank*.safetensors' grads.safetensors --shards-a slices

    Exit status: without a tolerance, 0 (diff only reports; a warning when
    nothing was compared).  With --rtol, --atol or --min-cosine: 1 when a
    tensor fails, when nothing was compared, or when the tensor sets or shapes
    differ (unless --allow-missing), else 0.  2 on unreadable input or bad
    usage, a side with no floating-point tensor selected, or two names that
    --strip-prefix makes equal.
    """
    from .api import diff as run_diff

    given = as_json or _given(click.get_current_context(), "format")
    _run_part("diff", part, partial, dict(
        a=a, b=b, rtol=rtol, atol=atol, min_cosine=min_cosine, allow_missing=allow_missing,
        strip_prefix=strip_prefix, strip_prefix_a=strip_prefix_a, strip_prefix_b=strip_prefix_b, include=include,
        exclude=exclude, shards=shards, shards_a=shards_a, shards_b=shards_b,
        allow_outside_index=allow_outside_index, void_as=void_as), None,
        ("json" if as_json else format) if given else None, output, (a, b), scheduler)
    fmt = _output_format("diff", "json" if as_json else format,
                         as_json or _given(click.get_current_context(), "format"),
                         output)
    _not_an_input(output, (a, b))
    with _executor(scheduler) as dask:
        report = run_diff(a, b, rtol=rtol, atol=atol, min_cosine=min_cosine, allow_missing=allow_missing,
                          include=include, exclude=exclude, strip_prefix=strip_prefix, strip_prefix_a=strip_prefix_a,
                          strip_prefix_b=strip_prefix_b, allow_outside_index=allow_outside_index, shards=shards,
                          shards_a=shards_a, shards_b=shards_b, executor=dask, void_as=void_as)
    _warn(report.warnings(), quiet >= 1)
    _emit(fmt, "diff", report, width, output)
    sys.exit(EXIT_OK if report.ok else EXIT_FINDINGS)


@cli.command(context_settings=_CONTEXT)
@_PATHS
@_options(o.format_option("info"), o.JSON, o.WIDTH, o.ALLOW_OUTSIDE_INDEX, o.OUTPUT, o.QUIET, o.VOID_AS)
def info(paths: tuple[str, ...], format: str, as_json: bool, width: int | None, allow_outside_index: bool,
         output: str | None, quiet: int, void_as: str | None) -> None:
    """List tensors from the file headers alone: instant on a file of any size.

    Name, dtype, shape, element count, bytes and source of every tensor,
    totals per dtype, and each file's safetensors metadata.

    \b
    Examples:
      gradinspect info grads.safetensors
      gradinspect info model.safetensors.index.json --format json | jq .total.by_dtype
    """
    from .api import info as run_info

    fmt = _output_format("info", "json" if as_json else format,
                         as_json or _given(click.get_current_context(), "format"),
                         output)
    _not_an_input(output, paths)
    report = run_info(list(paths), allow_outside_index=allow_outside_index, void_as=void_as)
    _warn(list(report.notes), quiet >= 1)
    _emit(fmt, "info", report, width, output)


@cli.command(context_settings=_CONTEXT)
@_PATHS
@_options(
    *o.NORM_OPTIONS, o.format_option("trend"), o.JSON, *o.SELECTION_OPTIONS, _GROUP_BY, _SEP,
    click.option("--step-pattern", default=None, metavar="REGEX",
                 help="Take each step's number from the one group of REGEX, searched in the final component "
                      "of its PATH (or glob match); a PATH it does not match is an error. Default: the "
                      "safetensors metadata key step, else the last integer in that component."),
    Option("window", ("--window",), "int", 20, "A step's baseline: the median global norm of up to N steps "
           "before it (3 finite ones at least).", metavar="N", range=Range(1, integer=True), show_default=True),
    Option("spike_factor", ("--spike-factor",), "float", 3.0, "A spike: a global norm > X times its baseline.",
           metavar="X", range=o.POSITIVE, show_default=True),
    Option("clip_target", ("--clip-target",), "float", 0.1, "Suggest the smallest max_norm that clips at most "
           "this fraction of the finite steps.", metavar="F", range=o.SHARE, show_default=True),
    click.option("--fail-on", type=click.Choice(["spike", "nonfinite"]), multiple=True,
                 help="Exit 1 when a step is a spike, or holds NaN/Inf (repeatable)."),
    Option("max_clip_fraction", ("--max-clip-fraction",), "float", None,
           "Exit 1 when more than this fraction of the finite steps is clipped at --max-norm.", metavar="F",
           range=o.SHARE),
    o.SHARDS, o.DEDUP, o.LOSS_SCALE, o.JOBS, o.SCHEDULER, o.QUIET, o.WIDTH, o.ALLOW_OUTSIDE_INDEX, o.OUTPUT,
    o.VOID_AS,
    click.option("--heatmap", type=click.Choice(["norm", "share"]), default="norm", show_default=True,
                 help="What the plots' heatmap shows per tensor and step (--output run.png/.svg/.html): "
                      "log10 of the norm, or the share of the squared L2 norm."),
    click.option("--cache-dir", type=click.Path(file_okay=False), default=None, metavar="DIR",
                 help="Where each file's exact statistics are cached, so a re-run reads only new or changed "
                      "files (default: $GRADINSPECT_CACHE_DIR, else $XDG_CACHE_HOME/gradinspect, else "
                      "~/.cache/gradinspect; the oldest entries beyond 20,000 files or 512 MiB are pruned)."),
    click.option("--no-cache", is_flag=True, help="Read every file; neither use nor write the cache."),
    click.option("--follow", is_flag=True,
                 help="Keep watching the PATHs (globs expanded again every --interval seconds) and redraw the "
                      "table as steps land, for a run in progress (on a terminal in place; in a pipe, the table "
                      "again after each change). Unreadable steps are warnings, retried. Ctrl-C exits 0."),
    Option("interval", ("--interval",), "float", 2.0, "How often --follow looks for new steps, in seconds.",
           metavar="S", range=o.POSITIVE, show_default=True),
    *o.PART_OPTIONS,
)
def trend(paths: tuple[str, ...], norm_type: float, max_norm: float, eps: float, format: str, as_json: bool,
          include: tuple[str, ...], exclude: tuple[str, ...], group_by: int | str | None, group_sep: str,
          step_pattern: str | None, window: int, spike_factor: float, clip_target: float, fail_on: tuple[str, ...],
          max_clip_fraction: float | None, shards: str | None, dedup: bool, loss_scale: float | None,
          jobs: int | None, scheduler: str | None, quiet: int, width: int | None, allow_outside_index: bool,
          output: str | None, heatmap: str, cache_dir: str | None, no_cache: bool, follow: bool,
          interval: float, void_as: str | None, part: str | None, partial: str | None) -> None:
    """A training run over time: spikes and the tensors behind them, clipping over the run, the first NaN.

    Each PATH is one step: a file, or a directory or *.safetensors.index.json
    holding one step's files (per-rank shards with --shards); a quoted glob
    is one step per match ('run/step_*.safetensors', 'run/step_*/').  Each
    step's numbers are those of `gradinspect norms` on that step alone.  A
    step's number: --step-pattern, else the safetensors metadata key step
    (the files of one step must agree), else the last integer in the final
    path component.  Two PATHs with the same step number are an error.

    A spike: a finite global norm > --spike-factor times the median of the
    finite ones among the up to --window steps before it; its culprits are
    the tensors whose squared L2 norm grew most over their own median.

    \b
    Examples:
      gradinspect trend 'sample_data/run/step_*.safetensors'
      gradinspect trend 'run/step_*/' --shards slices --group-by 2
      gradinspect trend 'run/step_*.safetensors' --format json | jq .spikes
      gradinspect trend 'run/*.npz' --step-pattern 'iter(\\d+)' --format csv > run.csv
      gradinspect trend 'run/step_*.safetensors' --fail-on nonfinite --max-clip-fraction 0.5 -f github
      gradinspect trend 'sample_data/run/step_*.safetensors' --output run.html --heatmap share

    Exit status: 0 on success; 1 when a --fail-on or --max-clip-fraction
    rule fails; 2 on unreadable input or bad usage (a step number twice, a
    PATH --step-pattern does not match, a step with no floating-point
    values to read).
    """
    from .runs import compile_step_pattern, step_warnings
    from .runs import trend as run_trend
    from .trend import evaluate

    if not group_sep:
        raise click.BadParameter("must not be empty", param_hint="--sep")
    try:
        compile_step_pattern(step_pattern)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--step-pattern") from None
    if follow and (part is not None or partial is not None):
        raise click.UsageError("--follow watches a run in progress: not with --part")
    given = as_json or _given(click.get_current_context(), "format")
    _run_part("trend", part, partial, dict(
        paths=paths, norm_type=norm_type, max_norm=max_norm, eps=eps, include=include, exclude=exclude,
        group_by=group_by, group_sep=group_sep, step_pattern=step_pattern, window=window, spike_factor=spike_factor,
        clip_target=clip_target, fail_on=fail_on, max_clip_fraction=max_clip_fraction, shards=shards, dedup=dedup,
        loss_scale=loss_scale, allow_outside_index=allow_outside_index, heatmap=heatmap, void_as=void_as), jobs,
        ("json" if as_json else format) if given else None, output, paths, scheduler, quiet)
    fmt = _output_format("trend", "json" if as_json else format,
                         as_json or _given(click.get_current_context(), "format"), output)
    _not_an_input(output, paths)
    from .cache import Cache

    cache = None if no_cache else Cache(cache_dir)
    unused = _jobs_with_scheduler(jobs, scheduler)
    jobs = click.get_current_context().with_resource(_executor(scheduler)) or jobs  # a Dask executor, or threads
    if follow:
        if fmt != "table" or output is not None or fail_on or max_clip_fraction is not None:
            raise click.UsageError("--follow draws the table on stdout: not with --format, --output, --fail-on "
                                   "or --max-clip-fraction")

        def compute() -> Any:
            found: list[Any] = []
            report = run_trend(
                list(paths), norm_type=norm_type, max_norm=max_norm, eps=eps, include=include, exclude=exclude,
                group_by=group_by, group_sep=group_sep, shards=shards, jobs=jobs, dedup=dedup,
                loss_scale=loss_scale, allow_outside_index=allow_outside_index, step_pattern=step_pattern,
                window=window, spike_factor=spike_factor, clip_target=clip_target,
                on_step=lambda st, w: found.append((st, w)), cache=cache, void_as=void_as)
            return report, step_warnings(found)

        _warn(unused, quiet >= 1)
        _follow(paths, allow_outside_index, interval, compute, width, quiet)
    warnings: list[Any] = []
    with _ProgressBar(not quiet) as bar:
        report = run_trend(
            list(paths), norm_type=norm_type, max_norm=max_norm, eps=eps, include=include, exclude=exclude,
            group_by=group_by, group_sep=group_sep, shards=shards, jobs=jobs, dedup=dedup, loss_scale=loss_scale,
            allow_outside_index=allow_outside_index, step_pattern=step_pattern, window=window,
            spike_factor=spike_factor, clip_target=clip_target,
            on_step=lambda st, w: warnings.append((st, w)), progress=bar if bar.enabled else None,  # no sizes
            cache=cache, void_as=void_as,
        )
    report = evaluate(report, fail_on, max_clip_fraction)
    _warn(step_warnings(warnings), quiet >= 1)
    _warn(unused, quiet >= 1)
    _emit(fmt, "trend", report, width, output, heatmap)
    sys.exit(EXIT_OK if report.ok else EXIT_FINDINGS)


@cli.command(context_settings=_CONTEXT)
@click.argument("parts", nargs=-1, required=True, metavar="PARTIAL...")
@_options(
    click.option("--format", "-f", "format", default=None, metavar="FORMAT",
                 help="Output format, as the command's --format (default: the one the parts were given, else "
                      "the command's default)."),
    o.JSON, o.WIDTH, o.OUTPUT, o.QUIET,
)
def merge(parts: tuple[str, ...], format: str | None, as_json: bool, width: int | None, output: str | None,
          quiet: int) -> None:
    """Print the report of a run computed in parts (--part I/N --partial OUT), bit for bit that of one run.

    The parts may be given in any order (a glob will do); they must all come from the same command,
    options and files (as recorded: the files need not be here), and every part from 0/N to N-1/N
    must be there once.  The options that shape the numbers and the report were given to the parts;
    merge takes only output options.

    \b
    Examples:
      gradinspect norms grads/ --part 0/2 --partial p0.json
      gradinspect norms grads/ --part 1/2 --partial p1.json
      gradinspect merge p*.json --format json

    Exit status: that of the run (1 for check findings, diff outside tolerance, trend --fail-on); 2 when
    a part is missing, twice, unreadable, or from another run, or when a file changed between parts.
    """
    from .partial import load_parts, merged

    for p in parts:
        if output is not None and os.path.exists(output) and os.path.exists(p) and os.path.samefile(output, p):
            _fail(f"{output}: --output names a partial result; refusing to overwrite it")
    loaded = load_parts(list(parts))
    kind = loaded.command
    if format is not None and format not in formats.names(kind):
        raise click.BadParameter(f"{format!r} is not a {kind} format (one of {', '.join(formats.names(kind))})",
                                 param_hint="--format")
    chosen = "json" if as_json else format or loaded.fmt or formats.DEFAULT[kind]
    fmt = _output_format(kind, chosen, as_json or format is not None or loaded.fmt is not None, output)
    o_ = loaded.options
    if kind == "trend":
        from .runs import step_warnings

        found: list[Any] = []
        report = merged(loaded, on_step=lambda st, w: found.append((st, w)))
        _warn(step_warnings(found), quiet >= 1)
        _emit(fmt, "trend", report, width, output, o_["heatmap"])
    else:
        report = merged(loaded)
        if kind == "norms":
            _warn(report.input_warnings(), quiet >= 1)
            _warn(report.nonfinite_warnings(), quiet >= 2)
            _emit(fmt, "norms", report, width, output)
        elif kind == "check":
            _warn(report.report.input_warnings(), quiet)
            _emit(fmt, "check", report, output=output)
        else:
            _warn(report.warnings(), quiet >= 1)
            _emit(fmt, "diff", report, width, output)
    sys.exit(EXIT_OK if kind == "norms" or report.ok else EXIT_FINDINGS)


def _follow(paths: tuple[str, ...], allow_outside_index: bool, interval: float, compute: Any,
            width: int | None, quiet: int) -> NoReturn:
    """``trend --follow``: recompute when the files the PATHs resolve to change; redraw; Ctrl-C exits 0."""
    import time

    from .errors import InputError
    from .runs import files_state

    f = formats.get("table")
    con = None
    live: Any = None
    said: set[str] = set()
    last: Any = None
    try:
        from .formats.table import console_for

        con = console_for(sys.stdout, formats.RenderOptions(width=width))
        options = formats.RenderOptions(width=con.width, color=con.is_terminal and not con.no_color,
                                        elide=width is not None or con.is_terminal)
        while True:
            try:
                state = files_state(paths, allow_outside_index)
                if state != last:
                    report, warned = compute()
                    last = state
                    _warn([w for w in warned if w not in said], quiet >= 1)
                    said.update(warned)
                    text = f.render(report, options)
                    assert isinstance(text, str)
                    if con.is_terminal:
                        from rich.live import Live
                        from rich.text import Text

                        if live is None:
                            live = Live(console=con, auto_refresh=False, transient=False)
                            live.start()
                        live.update(Text.from_ansi(text.rstrip("\n")), refresh=True)
                    else:
                        click.echo(text, nl=False)
                        click.echo("")
                        sys.stdout.flush()
            except InputError as e:
                if str(e) not in said:  # a step being written, a glob with no match yet: look again later
                    said.add(str(e))
                    _warn([f"{e} (trying again every {interval:g} s)"], quiet >= 2)
            time.sleep(interval)
    except KeyboardInterrupt:
        if live is not None:
            live.stop()
        sys.exit(EXIT_OK)


def main(argv: list[str] | None = None) -> None:
    # gradinspect never calls BLAS, but OpenBLAS starts a thread per core as numpy is imported, and they spin
    # for a while: CPU a busy machine's other work could use (about 0.1 s per run on 2 cores).
    blas = "OPENBLAS_NUM_THREADS" not in os.environ
    if blas:
        os.environ["OPENBLAS_NUM_THREADS"] = "1"
    # A run makes many small objects that hold no cycles (a cold `trend` of 1,000 steps x 200 tensors: rows,
    # tuples and dicts by the hundred thousand), which the cyclic collector's passes at the default threshold
    # (700 new objects) walk again and again.  It still runs.
    threshold = gc.get_threshold()
    gc.set_threshold(100_000, 20, 100)
    try:
        cli.main(args=argv, prog_name="gradinspect")
    finally:  # as it was, for a program that calls main()
        gc.set_threshold(*threshold)
        if blas:
            os.environ.pop("OPENBLAS_NUM_THREADS", None)


if __name__ == "__main__":  # pragma: no cover
    main()
