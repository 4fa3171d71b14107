"""The command line: parse, call the library, pick a format, map errors to exit codes.

Exit codes: 0 success; 1 a check finding or a diff outside tolerance; 2
unreadable input or a usage error (one ``Error:`` line on stderr, nothing on
stdout).
"""

from __future__ import annotations

import io
import math
import os
import sys
from typing import Any, NoReturn

import click

from . import __version__
from . import formats
from .formats._escape import printable

EXIT_OK = 0
EXIT_FINDINGS = 1
EXIT_INPUT = 2

_CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class NormType(click.ParamType):
    name = "P"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        from .norms import parse_norm_type

        if isinstance(value, float):
            return value
        try:
            return parse_norm_type(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


class GroupBy(click.ParamType):
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

    Run `gradinspect COMMAND --help` for a command's options.
    """


def _format_option(kind: str) -> Any:
    choices = formats.names(kind)
    helps = "; ".join(f"{n}: {formats.get(n).help}" for n in choices)
    return click.option(
        "--format", "-f", "fmt", type=click.Choice(choices), default=choices[0], show_default=True,
        help=f"Output format ({helps}).",
    )


_json_option = click.option("--json", "as_json", is_flag=True, help="Short for --format json.")


def _emit(fmt: str, kind: str, report: Any, width: int | None = None) -> None:
    """Render fully in memory first: on any error nothing half-written reaches stdout.

    Names are elided to fit ``width`` (--width), else the terminal; output that
    is not a terminal keeps them whole (laid out as for its COLUMNS or 80)."""
    buf = io.StringIO()
    options = formats.RenderOptions(width=width)
    if not formats.get(fmt).machine:
        # Let rich see the real stdout to detect width, colour and NO_COLOR.
        out = sys.stdout
        from .formats.table import console_for

        con = console_for(out, options)
        options = formats.RenderOptions(width=con.width, color=con.is_terminal and not con.no_color,
                                        elide=width is not None or con.is_terminal)
    formats.render(fmt, kind, report, buf, options)
    click.echo(buf.getvalue(), nl=False)


def _warn(lines: list[str], quiet: bool | int = False) -> None:
    if quiet:
        return
    for line in lines:
        click.echo(f"Warning: {printable(line)}", err=True)


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
                from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                           TransferSpeedColumn)

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


def _jobs_option(f: Any) -> Any:
    f = click.option("--quiet", "-q", count=True,
                     help="-q: no progress bar and no warnings on stderr except those about NaN/Inf values; "
                          "-qq: none of those either (only Error lines).")(f)
    from .config import MAX_JOBS

    return click.option("--jobs", "-j", type=click.IntRange(1, MAX_JOBS), default=None, metavar="N",
                        help=f"Threads to use (default: one per core, at most {MAX_JOBS}). "
                             "Results are identical for every N.")(f)


def _shards_option(f: Any) -> Any:
    return click.option(
        "--shards", type=click.Choice(["slices", "replicas"]), default=None,
        help="What a tensor name in several files means: slices = disjoint pieces of one tensor "
             "(ZeRO/FSDP, tensor parallel), merged exactly; replicas = copies (data-parallel ranks), "
             "counted once. Without it, a repeated name is an error.")(f)


def _dedup_option(f: Any) -> Any:
    return click.option(
        "--dedup/--no-dedup", default=False,
        help="Count exact copies once (tied weights saved twice, e.g. lm_head.weight = wte.weight), as "
             "model.parameters() does: a copy's row is left out. Without it, copies are a warning. Tensors merged "
             "from --shards slices are never compared.")(f)


def _outside_option(f: Any) -> Any:
    return click.option("--allow-outside-index", is_flag=True,
                        help="Let a *.safetensors.index.json name shard files outside its own directory "
                             "(an absolute path or one climbing out with ..); refused by default.")(f)


def _width_option(f: Any) -> Any:
    return click.option("--width", type=click.IntRange(min=1), default=None, metavar="N",
                        help="Fit the table in N columns, eliding long names in the middle (default: the "
                             "terminal's width; output that is not a terminal keeps names whole).")(f)


def _paths_argument(f: Any) -> Any:
    return click.argument("paths", nargs=-1, required=True, metavar="PATH...")(f)


def _norm_options(f: Any) -> Any:
    for opt in reversed([
        click.option("--norm-type", "-p", type=NormType(), default="2", show_default=True,
                     help="The norm: 1, 2, inf, or any number > 0."),
        click.option("--max-norm", "-c", type=click.FloatRange(0, min_open=True), default=1.0, show_default=True,
                     help="The clip threshold, as clip_grad_norm_(max_norm)."),
        click.option("--eps", type=click.FloatRange(0), default=1e-6, show_default=True,
                     help="Added to the norm as torch does; 0 gives optax's formula."),
    ]):
        f = opt(f)
    return f


def _loss_scale_option(f: Any) -> Any:
    return click.option(
        "--loss-scale", type=click.FloatRange(0, min_open=True), default=None, metavar="S",
        help="Gradients saved before the AMP loss scale was removed: divide every norm by S (the clip is "
             "computed on the result). Default: the safetensors metadata key loss_scale, when the files have it.")(f)


def _selection_options(f: Any) -> Any:
    f = click.option("--exclude", multiple=True, metavar="GLOB", help="Leave out tensors whose name matches (repeatable).")(f)
    return click.option("--include", multiple=True, metavar="GLOB", help="Only tensors whose name matches (repeatable).")(f)


def _finite(name: str, value: float | None) -> None:
    if value is not None and not math.isfinite(value):
        raise click.BadParameter("must be finite", param_hint=name)


@cli.command(context_settings=_CONTEXT)
@_paths_argument
@_norm_options
@_format_option("norms")
@_json_option
@click.option("--sort", type=click.Choice(["share", "norm", "name", "numel", "none"]), default="share",
              show_default=True, help="Row order; none keeps file order.")
@click.option("--top", type=click.IntRange(min=1), default=None, metavar="N",
              help="Show only N rows (totals still cover every selected tensor).")
@_selection_options
@click.option("--group-by", type=GroupBy(), default=None, metavar="N|REGEX",
              help="One row per group: tensors sharing the first N name parts (split on --sep), or the text "
                   "a REGEX captures in the name (its groups joined by --sep, or the whole match; a name it "
                   "does not match is a row of its own).")
@click.option("--sep", "group_sep", default=".", show_default=True, metavar="TEXT",
              help="What --group-by N splits names on (JAX names use /).")
@_shards_option
@_dedup_option
@_loss_scale_option
@_jobs_option
@_width_option
@_outside_option
def norms(paths: tuple[str, ...], norm_type: float, max_norm: float, eps: float, fmt: str, as_json: bool,
          sort: str, top: int | None, include: tuple[str, ...], exclude: tuple[str, ...],
          group_by: int | str | None, group_sep: str, shards: str | None, dedup: bool, loss_scale: float | None,
          jobs: int | None, quiet: int, width: int | None, allow_outside_index: bool) -> None:
    """Per-tensor and global gradient norms, and what clipping would do.

    PATH is a .safetensors, .npz or .npy file, a directory of them, a
    *.safetensors.index.json, or a quoted glob.  Several PATHs are the shards
    of one gradient set: the global norm is over all of them.

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

    if as_json:
        fmt = "json"
    if not group_sep:
        raise click.BadParameter("must not be empty", param_hint="--sep")
    _finite("--max-norm", max_norm)
    _finite("--eps", eps)
    _finite("--loss-scale", loss_scale)
    with _ProgressBar(not quiet) as bar:
        report = inspect(
            list(paths), norm_type=norm_type, max_norm=max_norm, eps=eps, include=include, exclude=exclude,
            group_by=group_by, group_sep=group_sep, sort=sort, top=top, shards=shards, jobs=jobs, progress=bar,
            dedup=dedup, loss_scale=loss_scale, allow_outside_index=allow_outside_index,
        )
    _warn(report.input_warnings(), quiet >= 1)
    _warn(report.nonfinite_warnings(), quiet >= 2)
    _emit(fmt, "norms", report, width)


_CHECK_OPTIONS = ("norm_type", "max_norm", "eps", "include", "exclude", "allow_nonfinite", "max_total", "min_total",
                  "fail_on_clip", "max_share", "fail_on_zero", "max_tensor_norm", "max_replica_diff", "fmt", "shards",
                  "dedup", "jobs", "quiet")


@cli.command(context_settings=_CONTEXT)
@_paths_argument
@_norm_options
@_selection_options
@click.option("--allow-nonfinite/--no-allow-nonfinite", default=False, help="Turn off the nonfinite rule (NaN/Inf in a tensor).")
@click.option("--max-total", type=float, default=None, metavar="X", help="Fail when the global norm > X.")
@click.option("--min-total", type=float, default=None, metavar="X",
              help="Fail when the global norm < X (vanishing gradients, a detached loss).")
@click.option("--fail-on-clip/--no-fail-on-clip", default=False,
              help="Fail when clipping at --max-norm would scale the gradients.")
@click.option("--max-share", type=click.FloatRange(0, 1), default=None, metavar="F",
              help="Fail when a tensor holds more than F (0..1) of the squared L2 norm.")
@click.option("--fail-on-zero/--no-fail-on-zero", default=False,
              help="Fail when a tensor's gradient is all zeros (frozen or disconnected).")
@click.option("--max-tensor-norm", type=float, default=None, metavar="X", help="Fail when a tensor's norm > X.")
@click.option("--max-replica-diff", type=click.FloatRange(0), default=None, metavar="X",
              help="With --shards replicas (rule replicas_differ, on with it): tolerate copies of a tensor that "
                   "differ by max |difference| <= X (default 0: copies must be identical; NaN/Inf in a copy "
                   "always fails).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Read [tool.gradinspect.check] from FILE instead of the nearest pyproject.toml.")
@_format_option("check")
@_json_option
@_shards_option
@_dedup_option
@_loss_scale_option
@_jobs_option
@_outside_option
def check(paths: tuple[str, ...], config_file: str | None, as_json: bool, **options: Any) -> None:
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
    from click.core import ParameterSource

    from .api import check as run_check
    from .check import rules_from
    from .config import ConfigError, find_config, load_check_config

    ctx = click.get_current_context()
    path = config_file or find_config()
    settings = load_check_config(path) if path else {}
    if "format" in settings:
        if settings["format"] not in formats.names("check"):
            raise ConfigError(path, f"[tool.gradinspect.check] format must be one of {', '.join(formats.names('check'))}")
        settings["fmt"] = settings.pop("format")
    if settings.get("shards") not in (None, "slices", "replicas"):
        raise ConfigError(path, '[tool.gradinspect.check] shards must be "slices" or "replicas"')
    for name in _CHECK_OPTIONS:
        if name in settings and ctx.get_parameter_source(name) != ParameterSource.COMMANDLINE:
            options[name] = settings[name]
    if as_json:
        options["fmt"] = "json"
    for name in ("max_norm", "eps", "max_total", "min_total", "max_tensor_norm", "max_replica_diff", "loss_scale"):
        _finite("--" + name.replace("_", "-"), options[name])
    try:
        rules = rules_from(options)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    quiet = int(options["quiet"])  # the config file's quiet = true is -q
    with _ProgressBar(not quiet) as bar:
        result = run_check(list(paths), rules, norm_type=options["norm_type"], max_norm=options["max_norm"],
                           eps=options["eps"], include=options["include"], exclude=options["exclude"],
                           shards=options["shards"], jobs=options["jobs"], progress=bar,
                           dedup=options["dedup"], loss_scale=options["loss_scale"],
                           allow_outside_index=options["allow_outside_index"])
    _warn(result.report.input_warnings(), quiet)
    _emit(options["fmt"], "check", result)
    sys.exit(EXIT_OK if result.ok else EXIT_FINDINGS)


@cli.command(context_settings=_CONTEXT)
@click.argument("a", metavar="A")
@click.argument("b", metavar="B")
@click.option("--rtol", type=click.FloatRange(0), default=None, metavar="R",
              help="A tensor fails when l2_diff > atol + R * max(l2_a, l2_b).")
@click.option("--atol", type=click.FloatRange(0), default=None, metavar="A", help="See --rtol.")
@click.option("--min-cosine", type=click.FloatRange(-1, 1), default=None, metavar="C",
              help="A tensor fails when its cosine similarity < C.")
@click.option("--allow-missing", is_flag=True,
              help="Different tensor sets or shapes do not fail the comparison (nothing compared still does).")
@click.option("--strip-prefix", multiple=True, metavar="PREFIX",
              help="Match names without PREFIX (e.g. module.), on both sides; the first matching one is removed "
                   "(repeatable). --include/--exclude and the report see the stripped names.")
@click.option("--strip-prefix-a", multiple=True, metavar="PREFIX", help="Like --strip-prefix, for A only.")
@click.option("--strip-prefix-b", multiple=True, metavar="PREFIX", help="Like --strip-prefix, for B only.")
@_selection_options
@_shards_option
@click.option("--shards-a", type=click.Choice(["slices", "replicas"]), default=None,
              help="Like --shards, for A only (each side is one gradient set with its own mode).")
@click.option("--shards-b", type=click.Choice(["slices", "replicas"]), default=None, help="Like --shards, for B only.")
@_format_option("diff")
@_json_option
@_width_option
@_outside_option
def diff(a: str, b: str, rtol: float | None, atol: float | None, min_cosine: float | None, allow_missing: bool,
         strip_prefix: tuple[str, ...], strip_prefix_a: tuple[str, ...], strip_prefix_b: tuple[str, ...],
         include: tuple[str, ...], exclude: tuple[str, ...], shards: str | None, shards_a: str | None,
         shards_b: str | None, fmt: str, as_json: bool, width: int | None, allow_outside_index: bool) -> None:
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

    if as_json:
        fmt = "json"
    for name, v in (("--rtol", rtol), ("--atol", atol), ("--min-cosine", min_cosine)):
        _finite(name, v)
    report = run_diff(a, b, rtol=rtol, atol=atol, min_cosine=min_cosine, allow_missing=allow_missing,
                      include=include, exclude=exclude, strip_prefix=strip_prefix, strip_prefix_a=strip_prefix_a,
                      strip_prefix_b=strip_prefix_b, allow_outside_index=allow_outside_index, shards=shards,
                      shards_a=shards_a, shards_b=shards_b)
    _warn(report.warnings())
    _emit(fmt, "diff", report, width)
    sys.exit(EXIT_OK if report.ok else EXIT_FINDINGS)


@cli.command(context_settings=_CONTEXT)
@_paths_argument
@_format_option("info")
@_json_option
@_width_option
@_outside_option
def info(paths: tuple[str, ...], fmt: str, as_json: bool, width: int | None, allow_outside_index: bool) -> None:
    """List tensors from the file headers alone: instant on a file of any size.

    Name, dtype, shape, element count, bytes and source of every tensor,
    totals per dtype, and each file's safetensors metadata.

    \b
    Examples:
      gradinspect info grads.safetensors
      gradinspect info model.safetensors.index.json --format json | jq .total.by_dtype
    """
    from .api import info as run_info

    if as_json:
        fmt = "json"
    report = run_info(list(paths), allow_outside_index=allow_outside_index)
    _warn(list(report.notes))
    _emit(fmt, "info", report, width)


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="gradinspect")


if __name__ == "__main__":  # pragma: no cover
    main()
