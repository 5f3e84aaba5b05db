"""The one exception type of the data pipeline.

Every problem a user can cause (a missing file, a bad input line, a corrupt dataset, a bad flag)
raises DataError with a single-line message that names the file, line, field or value; the tools
print it as `error: <message>` (fields rendered as their flags) and exit with status 1 instead
of showing a traceback.
"""

from an_megatron.errors import FieldError


class DataError(ValueError):
    """A user-facing data problem; str(error) is one line naming what is wrong and where."""


class DataFieldError(DataError, FieldError):
    """A DataError about `DataConfig` fields: ``str()`` names the fields, ``render(flags)``
    the command line's flags for them (``DATA_FIELD_FLAGS`` in data/arguments.py)."""


class IndexedDatasetError(DataError):
    """A missing, truncated or corrupt Megatron indexed dataset (.bin/.idx pair)."""
