"""The project's error types. Anything the user can fix is a MoeHpcError: the CLI prints it as
one ``error:`` line and exits non-zero on every rank; anything else is a bug."""


class MoeHpcError(Exception):
    """A problem the user can fix; the message names the file, dataset or key."""


class ConfigError(MoeHpcError):
    """A bad config key or value."""


class InputError(MoeHpcError):
    """A missing, malformed or inconsistent HDF5 file or dataset."""


class OutputError(MoeHpcError):
    """The output path cannot be written, or would overwrite a complete output."""


class PeerFailed(MoeHpcError):
    """Another rank reported an error; that rank prints it, this one exits quietly."""
