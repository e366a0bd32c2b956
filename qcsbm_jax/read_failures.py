"""What a failed checkpoint read means: damaged files, or something else.

Orbax and tensorstore raise several error types for missing, truncated or garbled files
and wrap some of them in a bare Exception; `read_problem` finds the underlying error and
says whether it means unreadable files. After such a failure, the read's other pending
array reads print their own copies of the error: tensorstore callbacks on the closed
asyncio loop as "unraisable" exceptions, and futures whose error nobody retrieved through
the asyncio logger. `ignore_noise_after_failed_reads` drops those (and only those).
"""

import logging as std_logging
import sys

# What orbax/tensorstore raise for missing, truncated or garbled files. Anything else
# (e.g. running out of device memory) is not a damaged checkpoint and propagates as is.
READ_ERRORS = (OSError, ValueError, KeyError, EOFError)
# The unraisable tracebacks printed after a failed read: noise after an error we report.
_AFTER_FAILED_READ = ("Event loop is closed", "Encountered error while reading array")
_UNRETRIEVED = "Future exception was never retrieved"  # asyncio's message


class _UnretrievedReadErrors(std_logging.Filter):
    """Drops asyncio's report of a future whose read error was never retrieved."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (record.getMessage().startswith(_UNRETRIEVED)
                    and isinstance(error, READ_ERRORS))


_DROP_UNRETRIEVED = _UnretrievedReadErrors()


def read_problem(error: Exception) -> tuple[str, BaseException]:
    """(what failed, the underlying error) for an error that means unreadable files;
    re-raises any other error. Orbax re-raises a failed array read as a bare Exception
    whose cause is the tensorstore error (or whatever interrupted the read)."""
    cause = error
    while type(cause) is Exception and cause.__cause__ is not None:
        cause = cause.__cause__
    if not isinstance(cause, READ_ERRORS):
        raise cause
    reason = (str(cause).splitlines() or [""])[0][:300]
    return f"reading it failed ({type(cause).__name__}: {reason})", cause


def ignore_noise_after_failed_reads() -> None:
    """Drops the unraisable tracebacks of _AFTER_FAILED_READ and asyncio's reports of
    unretrieved read errors (READ_ERRORS), once per process; every other unraisable
    exception and asyncio report still gets through."""
    std_logging.getLogger("asyncio").addFilter(_DROP_UNRETRIEVED)  # once: same object
    previous = sys.unraisablehook
    if getattr(previous, "_drops_failed_read_noise", False):
        return

    def hook(unraisable):
        if not str(unraisable.exc_value).startswith(_AFTER_FAILED_READ):
            previous(unraisable)

    hook._drops_failed_read_noise = True
    sys.unraisablehook = hook
