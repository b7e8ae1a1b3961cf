"""User-facing errors.

The CLI turns a `ChronoriskError` into one line on stderr and a non-zero exit;
anything else is a bug and is reported without a traceback unless
`CHRONORISK_DEBUG=1`. Messages name the field and the problem, never a
patient identifier.
"""


class ChronoriskError(Exception):
    """An error the user can act on; its message is shown as is."""

    exit_code = 2


class InputError(ChronoriskError):
    """Bad input: names the offending field (or file) and what is accepted."""

    def __init__(self, field: str, problem: str):
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}")


class ConfigError(ChronoriskError):
    """A bad value in params.yaml or on the command line."""
