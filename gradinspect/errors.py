"""The one exception type the CLI turns into ``Error: <file>: <what is wrong>`` and exit code 2."""

from __future__ import annotations

__all__ = ["GradInspectError", "InputError"]


class GradInspectError(Exception):
    """Base class of every error gradinspect reports to its user."""


class InputError(GradInspectError):
    """An input path that cannot be read as gradients: ``str()`` is ``"<path>: <problem>"``."""

    def __init__(self, path: object, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self) -> tuple[type[InputError], tuple[str, str]]:  # raised in a worker process, re-raised here
        return (type(self), (self.path, self.problem))
