"""User-facing errors: one clear line, a non-zero exit, no traceback unless --debug."""


class KoloraError(Exception):
    """A mistake the user can fix. The message says what is wrong, where, and how to fix it."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        self.hint = hint
        super().__init__(message)

    def one_line(self) -> str:
        msg = str(self)
        return f"{msg} — {self.hint}" if self.hint else msg


class Stopped(Exception):
    """Training stopped on request (Ctrl-C, SIGTERM) after saving a checkpoint: not an error,
    but not a finished run either, so the exit code says which signal stopped it."""

    def __init__(self, message: str, exit_code: int):
        self.exit_code = exit_code
        super().__init__(message)


def nearest(name: str, choices) -> str | None:
    """The closest known name, for 'did you mean …' hints."""
    import difflib

    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return match[0] if match else None
