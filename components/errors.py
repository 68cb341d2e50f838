"""One exception type per failure kind; messages name the file, column, key or field."""


class RsllmError(Exception):
    """Base class: the CLI prints these as one clear line and exits non-zero."""


class ConfigError(RsllmError):
    """params.yaml (or another config) is missing, malformed or out of range."""


class SourceError(RsllmError):
    """A data source could not be fetched or read (checksum, missing file, unreadable format)."""


class DataValidationError(RsllmError):
    """Data failed its expectations; names the file, the column, the expectation and bad examples."""

    def __init__(
        self,
        message: str,
        *,
        file: str = "",
        column: str = "",
        expectation: str = "",
        examples: list | None = None,
    ):
        super().__init__(message)
        self.file = file
        self.column = column
        self.expectation = expectation
        self.examples = examples or []


class DropPathError(RsllmError):
    """A path given as a drop is not one (missing, a folder, a link, another suffix); refused before
    anything is read or moved. The CLI exits 2 (a usage error), not 1 (a rejected drop)."""

    exit_code = 2


class VersioningError(RsllmError):
    """A data version could not be recorded, pushed or restored."""


class LockError(RsllmError):
    """Another writer holds the repository lock (components/lock.py) past this command's timeout."""


class ModelError(RsllmError):
    """A model could not be trained, saved or loaded (missing input file, bad config, diverged loss)."""


class ExportError(RsllmError):
    """An ONNX export failed or its outputs disagree with the torch model beyond the tolerance."""


class RegistryError(RsllmError):
    """The model store or the production pointer could not be read or changed."""


class GateRejected(RsllmError):
    """The promotion gate rejected the candidate; the message lists every failed threshold."""


class DriftError(RsllmError):
    """A drift check could not run: unreadable reference or current data, missing production pointer data."""


class AlertError(RsllmError):
    """Alerts could not be set up on the Prefect server (no API URL, missing deployment, bad channel)."""


class RequestError(RsllmError):
    """A service request is well-formed JSON but asks for something impossible (unknown item ids,
    duplicate candidates); names the request field and the offending values."""

    def __init__(self, field: str, message: str, values: list | None = None, status: int = 400):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.values = values or []
        self.status = status
