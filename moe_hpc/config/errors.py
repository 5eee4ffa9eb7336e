"""The project's error types. Anything the user can fix is a MoeHpcError: the CLI prints it as
one ``error:`` line and exits non-zero on every rank; anything else is a bug.

``discards_partial`` says whether the error dooms a partial output (``<output>.tmp`` and its
progress record): bad inputs and configs do, since no rerun could finish that output; anything
else (a full disk, a refused resume, a signal, a dead rank, a bug) leaves the chunks already
recorded valid for a rerun to resume.
"""


class MoeHpcError(Exception):
    """A problem the user can fix; the message names the file, dataset or key."""
    discards_partial = False


class ConfigError(MoeHpcError):
    """A bad config key or value."""
    discards_partial = True


class InputError(MoeHpcError):
    """A missing, malformed or inconsistent HDF5 file or dataset."""
    discards_partial = True


class OutputError(MoeHpcError):
    """The output path cannot be written, or would overwrite a complete output."""


class ResumeError(MoeHpcError):
    """A partial output exists that this run may not resume (other config, input or layout)."""


class Interrupted(MoeHpcError):
    """A stop signal was agreed on at a chunk boundary; progress is recorded (exit status 75)."""


class PeerFailed(MoeHpcError):
    """Another rank reported an error; that rank prints it, this one exits quietly."""

    def __init__(self, message: str, discards_partial: bool = False):
        super().__init__(message)
        self.discards_partial = discards_partial
