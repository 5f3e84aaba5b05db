"""The version check of the compat boundary (an_megatron/compat/)."""

import os
import subprocess
import sys

import pytest

from an_megatron.compat import (
    ALLOW_UNTESTED_VERSIONS,
    UnsupportedVersionError,
    UntestedVersionWarning,
    check_version,
    installed_version,
    require_version,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_other_release_stops_naming_both(monkeypatch):
    monkeypatch.delenv(ALLOW_UNTESTED_VERSIONS, raising=False)
    with pytest.raises(UnsupportedVersionError) as e:
        check_version("deepspeed", "0.20.1", "==0.19.8")
    message = str(e.value)
    assert message.startswith("error: ") and "\n" not in message
    assert "deepspeed 0.20.1" in message and "deepspeed==0.19.8" in message and ALLOW_UNTESTED_VERSIONS in message
    assert e.value.code == message  # as SystemExit: printed as this one line, exit status 1


@pytest.mark.parametrize("installed", [None, "not-a-version", "0.19.8rc1"])
def test_missing_or_unparsable_release_stops(monkeypatch, installed):
    monkeypatch.delenv(ALLOW_UNTESTED_VERSIONS, raising=False)
    with pytest.raises(UnsupportedVersionError, match="megatron-core==0.16.1"):
        check_version("megatron-core", installed, "==0.16.1")


def test_escape_hatch_warns_instead(monkeypatch):
    monkeypatch.setenv(ALLOW_UNTESTED_VERSIONS, "1")
    with pytest.warns(UntestedVersionWarning, match=r"megatron-core 0\.17\.0 .*megatron-core==0\.16\.1"):
        check_version("megatron-core", "0.17.0", "==0.16.1")


def test_local_build_of_the_tested_release_passes(monkeypatch):
    monkeypatch.delenv(ALLOW_UNTESTED_VERSIONS, raising=False)
    check_version("deepspeed", "0.19.8+cu124", "==0.19.8")


def test_installed_releases_pass(monkeypatch):
    from an_megatron.compat import deepspeed, megatron_core

    monkeypatch.delenv(ALLOW_UNTESTED_VERSIONS, raising=False)
    for distribution, module in (("deepspeed", deepspeed), ("megatron-core", megatron_core)):
        assert installed_version(distribution) is not None
        require_version(distribution, module.SUPPORTED)


# Runs a script (argv[2:]) with importlib.metadata reporting release 0.0.1 of distribution argv[1].
_WITH_FAKE_RELEASE = """
import importlib.metadata as metadata, runpy, sys
real, fake = metadata.version, sys.argv[1]
metadata.version = lambda name: "0.0.1" if name == fake else real(name)
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _run_with_fake_release(distribution, script, *args, allow=False):
    env = {k: v for k, v in os.environ.items() if k != ALLOW_UNTESTED_VERSIONS}
    if allow:
        env[ALLOW_UNTESTED_VERSIONS] = "1"
    return subprocess.run(
        [sys.executable, "-c", _WITH_FAKE_RELEASE, distribution, os.path.join(ROOT, script), *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    "distribution, script, args",
    [
        ("megatron-core", "examples/pretrain_angpt.py", []),
        ("deepspeed", "tools/convert_checkpoint.py", ["consolidate", "--load", "missing", "--output", "x.pt"]),
    ],
)
def test_entry_points_report_one_line(distribution, script, args):
    """Another release under the trainer or a tool: one line, exit status 1, no traceback."""
    proc = _run_with_fake_release(distribution, script, *args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: {distribution} 0.0.1 is installed") and f"{distribution}==" in lines[0]


def test_entry_point_runs_with_escape_hatch(tmp_path):
    """With the escape hatch the tool goes on (here: to its own error about the missing checkpoint)."""
    proc = _run_with_fake_release(
        "deepspeed",
        "tools/convert_checkpoint.py",
        "consolidate",
        "--load",
        str(tmp_path / "missing"),
        "--output",
        str(tmp_path / "x.pt"),
        allow=True,
    )
    assert "Traceback" not in proc.stderr and "UntestedVersionWarning" in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"error: --load {tmp_path / 'missing'}: no such directory"
