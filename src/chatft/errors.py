"""User-facing errors.

Anything the user can fix (a bad data file, a wrong option, a model folder we cannot read)
raises a :class:`ChatftError`. The CLI prints its message as one paragraph and exits with
code 2, without a traceback; every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class ChatftError(Exception):
    """An error the user can fix; its message says what and where."""

    exit_code = 2
    every_rank = False
    """True when every training process raises it alike (they agreed on it): only process 0
    prints it."""


class ConfigError(ChatftError):
    """The configuration (YAML file or command-line overrides) is invalid."""


class DataError(ChatftError):
    """A data file or one of its records cannot be used.

    ``file``, ``record`` (0-based index) and ``field`` locate the problem; the message is
    built from them so every data error reads the same way.
    """

    def __init__(self, problem: str, *, file: str | None = None, record: int | None = None,
                 field: str | None = None):
        self.problem = problem
        self.file = file
        self.record = record
        self.field = field
        where = []
        if file is not None:
            where.append(str(file))
        if record is not None:
            where.append(f"record {record}")
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__((": ".join(where) + ": " if where else "") + problem)


class TemplateError(ChatftError):
    """The model's chat template does not render conversations the way training needs."""


class DistributedError(ChatftError):
    """The processes of a run could not meet (rendezvous), or one of them stopped; the
    message names the process, its node and the address involved."""
