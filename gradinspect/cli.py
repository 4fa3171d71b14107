"""The command line: parse, call the library, pick a format, map errors to exit codes.

Exit codes: 0 success; 2 unreadable input or a usage error (one ``Error:`` line
on stderr, nothing on stdout).
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

EXIT_OK = 0
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
    click.echo(f"Error: {message}", err=True)
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
    """


def _format_option(kind: str) -> Any:
    choices = formats.names(kind)
    helps = "; ".join(f"{n}: {formats.get(n).help}" for n in choices)
    return click.option(
        "--format", "-f", "fmt", type=click.Choice(choices), default=choices[0], show_default=True,
        help=f"Output format ({helps}).",
    )


def _emit(fmt: str, kind: str, report: Any) -> None:
    """Render fully in memory first: on any error nothing half-written reaches stdout."""
    buf = io.StringIO()
    options = formats.RenderOptions()
    if not formats.get(fmt).machine:
        # Let rich see the real stdout to detect width, colour and NO_COLOR.
        out = sys.stdout
        from .formats.table import console_for

        con = console_for(out, options)
        options = formats.RenderOptions(width=con.width, color=con.is_terminal and not con.no_color)
    formats.render(fmt, kind, report, buf, options)
    click.echo(buf.getvalue(), nl=False)


def _warn(lines: list[str]) -> None:
    for line in lines:
        click.echo(f"Warning: {line}", err=True)


@cli.command(context_settings=_CONTEXT)
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
@click.option("--norm-type", "-p", type=NormType(), default="2", show_default=True,
              help="The norm: 1, 2, inf, or any number > 0.")
@click.option("--max-norm", "-c", type=click.FloatRange(0, min_open=True), default=1.0, show_default=True,
              help="The clip threshold, as clip_grad_norm_(max_norm).")
@click.option("--eps", type=click.FloatRange(0), default=1e-6, show_default=True,
              help="Added to the norm as torch does; 0 gives optax's formula.")
@_format_option("norms")
@click.option("--json", "as_json", is_flag=True, help="Short for --format json.")
@click.option("--sort", type=click.Choice(["share", "norm", "name", "numel", "none"]), default="share",
              show_default=True, help="Row order; none keeps file order.")
@click.option("--top", type=click.IntRange(min=1), default=None, metavar="N",
              help="Show only N rows (totals still cover every selected tensor).")
@click.option("--include", multiple=True, metavar="GLOB", help="Only tensors whose name matches (repeatable).")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Leave out tensors whose name matches (repeatable).")
@click.option("--group-by", type=click.IntRange(min=1), default=None, metavar="N",
              help="One row per group of tensors sharing the first N dot-separated name parts.")
def norms(paths: tuple[str, ...], norm_type: float, max_norm: float, eps: float, fmt: str, as_json: bool,
          sort: str, top: int | None, include: tuple[str, ...], exclude: tuple[str, ...],
          group_by: int | None) -> None:
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
      gradinspect norms grads.safetensors --include 'layers.*' --exclude '*.bias'
      gradinspect norms grads.safetensors --json | jq '.total.l2'

    Exit status: 0 on success, 2 on unreadable input or bad usage.
    """
    from .api import inspect

    if as_json:
        fmt = "json"
    if not math.isfinite(max_norm):
        raise click.BadParameter("must be finite", param_hint="--max-norm")
    if not math.isfinite(eps):
        raise click.BadParameter("must be finite", param_hint="--eps")
    report = inspect(
        list(paths), norm_type=norm_type, max_norm=max_norm, eps=eps, include=include, exclude=exclude,
        group_by=group_by, sort=sort, top=top,
    )
    _warn(report.warnings())
    _emit(fmt, "norms", report)


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="gradinspect")


if __name__ == "__main__":  # pragma: no cover
    main()
