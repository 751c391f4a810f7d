"""The one exception type users see: a message that names what to fix."""


class CompressError(Exception):
    """A problem with the user's input (model, config, file, budget, data).

    The CLI prints its message as one paragraph and exits non-zero; it never
    shows a traceback for these.
    """

    exit_code = 2


class CheckFailed(CompressError):
    """A check the user asked for did not pass: a latency budget or an output parity
    tolerance. The report is still written; the exit code (3) tells a CI pipeline."""

    exit_code = 3

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report  # what was measured, for reports written despite the failure
