"""The one boundary around the internals of DeepSpeed and megatron-core.

Every use of a private name of either library (an underscored name, or an attribute of its
optimizer wrappers and partitioned parameters that its documentation does not promise) goes
through ``deepspeed.py`` or ``megatron_core.py`` here: small accessors named for what they
return, each commented with the release it was read from. The rest of the project reads in
terms of what it needs ("this rank's fp32 partition of group g"), and a new release is checked
in one file per library.

Importing either module checks the installed release of its library against the releases its
accessors were read from (``check_version``). Outside them it stops with one line naming both;
``AN_MEGATRON_ALLOW_UNTESTED_VERSIONS=1`` turns that into a warning.
"""

from __future__ import annotations

import os
import warnings
from importlib import metadata

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

ALLOW_UNTESTED_VERSIONS = "AN_MEGATRON_ALLOW_UNTESTED_VERSIONS"


class UnsupportedVersionError(SystemExit):
    """A library release outside the supported range.

    A ``SystemExit`` (as argparse's usage errors are) because the check runs while modules are
    imported, before any entry point's ``try``: this way the trainer, the tools and spawned
    ranks all end with the one-line message (exit status 1) instead of a traceback.
    """


class UntestedVersionWarning(UserWarning):
    """A library release outside the supported range, allowed by ``AN_MEGATRON_ALLOW_UNTESTED_VERSIONS=1``."""


def installed_version(distribution: str) -> str | None:
    """The installed release of ``distribution`` (e.g. ``"deepspeed"``), None if not installed."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _is_supported(installed: str | None, supported: str) -> bool:
    try:
        return installed is not None and Version(installed) in SpecifierSet(supported)
    except InvalidVersion:
        return False


def check_version(distribution: str, installed: str | None, supported: str) -> None:
    """Stop (``UnsupportedVersionError``) unless release ``installed`` of ``distribution`` is in
    ``supported`` (a PEP 440 specifier such as ``"==0.19.8"``); with
    ``AN_MEGATRON_ALLOW_UNTESTED_VERSIONS=1`` warn instead."""
    if _is_supported(installed, supported):
        return
    found = f"{distribution} {installed} is installed" if installed else f"{distribution} is not installed"
    message = (
        f"{found}, but an_megatron supports {distribution}{supported} only (it reads internals "
        f"checked against that release)"
    )
    if os.environ.get(ALLOW_UNTESTED_VERSIONS) == "1":
        warnings.warn(f"{message}; running anyway ({ALLOW_UNTESTED_VERSIONS}=1)", UntestedVersionWarning, stacklevel=2)
    else:
        raise UnsupportedVersionError(f"error: {message}; set {ALLOW_UNTESTED_VERSIONS}=1 to run anyway")


def require_version(distribution: str, supported: str) -> None:
    """``check_version`` against the installed release (run once, when a compat module is imported)."""
    check_version(distribution, installed_version(distribution), supported)
