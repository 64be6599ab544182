"""The one error of the report: a command-line input it cannot use."""


class ReportError(ValueError):
    """A bad command-line input: refused with one line and exit code 2."""
