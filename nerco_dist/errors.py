"""One error type for bad user input, so the CLI can report it cleanly and exit non-zero."""

from __future__ import annotations


class InputError(ValueError):
    """Bad input: a message that names the file, the line (when there is one) and the problem."""

    def __init__(self, path, problem: str, line: int | None = None):
        where = f"{path}:{line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {problem}")
        self.path, self.line, self.problem = path, line, problem
