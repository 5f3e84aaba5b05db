"""The one exception type of the data pipeline.

Every problem a user can cause (a missing file, a bad input line, a corrupt dataset, a bad flag)
raises DataError with a single-line message that names the file, line, flag or value; the tools
print it as `error: <message>` and exit with status 1 instead of showing a traceback.
"""


class DataError(ValueError):
    """A user-facing data problem; str(error) is one line naming what is wrong and where."""


class IndexedDatasetError(DataError):
    """A missing, truncated or corrupt Megatron indexed dataset (.bin/.idx pair)."""
