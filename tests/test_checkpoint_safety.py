"""Checkpoints survive relaunches, crashes and a second writer: published by rename, never rewritten
in place; ``{save}/.lock``; a fresh run (or a reshard) into a directory with checkpoints refused."""

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from an_megatron.training.checkpointing import LOCK
from tests.test_training import MOCK, ROOT, TINY

ENV = {**os.environ, "PYTHONPATH": ROOT}  # the subprocesses import this checkout's packages
COMMON = [
    "--deepspeed_config",
    "examples/ds_fp32.json",
    "--micro-batch-size",
    "2",
    "--global-batch-size",
    "2",
    "--lr",
    "1e-3",
    *TINY,
    *MOCK,
]


def cmd(*args):
    return [sys.executable, os.path.join(ROOT, "examples", "pretrain_angpt.py"), *COMMON, *map(str, args)]


def train(*args, timeout=240):
    return subprocess.run(cmd(*args), capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=ENV)


def tool(*args):
    script = os.path.join(ROOT, "tools", "convert_checkpoint.py")
    return subprocess.run(
        [sys.executable, script, *map(str, args)], capture_output=True, text=True, timeout=240, cwd=ROOT, env=ENV
    )


def snapshot(d):
    """Every file under ``d``: size, mtime and contents' hash."""
    out = {}
    for root, _, files in os.walk(d):
        for name in files:
            path = os.path.join(root, name)
            st = os.stat(path)
            with open(path, "rb") as f:
                out[os.path.relpath(path, d)] = (st.st_size, st.st_mtime_ns, hashlib.sha256(f.read()).hexdigest())
    return out


def latest(d):
    with open(os.path.join(d, "latest")) as f:
        return f.read().strip()


def checkpoint_names(d):
    """What the directory holds but DeepSpeed's recovery scripts (zero_to_fp32.py, ...)."""
    return sorted(n for n in os.listdir(d) if not n.endswith(".py"))


def one_error_line(result):
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished run: iter_0000001, iter_0000002, latest -> iter_0000002."""
    d = tmp_path_factory.mktemp("finished") / "ck"
    r = train("--train-iters", 2, "--save", d, "--save-interval", 1)
    assert r.returncode == 0, r.stderr[-3000:]
    assert latest(d) == "iter_0000002" and not os.path.exists(d / ".lock")
    return d


@pytest.mark.timeout(300)
def test_relaunch_of_a_finished_run_rewrites_nothing(finished, tmp_path):
    d = tmp_path / "ck"
    shutil.copytree(finished, d, copy_function=shutil.copy2)
    before = snapshot(d)
    time.sleep(0.05)  # a rewrite would show in the modification times
    r = train("--train-iters", 2, "--load", d, "--save", d)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"loaded checkpoint from {d} at iteration 2" in r.stdout
    assert snapshot(d) == before  # byte-identical, same sizes and times; no lock left behind


@pytest.mark.timeout(400)
def test_a_save_killed_before_publishing_leaves_latest_complete(tmp_path):
    d = tmp_path / "ck"
    leftover = None
    for _ in range(5):  # a kill that lands after the save finished is retried
        resume = ["--load", d] if os.path.exists(d / "latest") else []
        p = subprocess.Popen(
            cmd("--train-iters", 40, "--save", d, "--save-interval", 1, *resume),
            cwd=ROOT,
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            while p.poll() is None:
                if os.path.exists(d / "latest"):
                    temps = [n for n in os.listdir(d) if ".tmp-" in n]
                    if temps:
                        p.send_signal(signal.SIGKILL)  # while it is saving
                        leftover = temps[0]
                        break
                time.sleep(0.001)
        finally:
            p.kill()
            p.wait()
        if leftover and os.path.isdir(d / leftover):
            break
        leftover = None
    assert leftover, "never caught a save in progress (no temporary tag directory appeared)"
    tag = latest(d)  # the previous complete checkpoint
    assert leftover.startswith("iter_") and int(leftover[5:12]) > int(tag[5:])
    with open(d / tag / "an_megatron.json") as f:
        k = json.load(f)["iteration"]
    assert tag == f"iter_{k:07d}" and os.path.exists(d / ".lock")  # the killed run's lock: stale

    r = train("--train-iters", k + 1, "--load", d, "--save", d)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"loaded checkpoint from {d} at iteration {k}" in r.stdout
    assert f"removed 1 unfinished checkpoint(s) of a crashed save in {d}: {leftover}" in r.stdout
    assert "taking over the stale lock" in r.stdout
    assert not [n for n in os.listdir(d) if ".tmp" in n] and not os.path.exists(d / ".lock")
    assert latest(d) == f"iter_{k + 1:07d}"


@pytest.mark.timeout(400)
def test_a_second_writer_is_refused_while_the_first_runs(tmp_path):
    d = tmp_path / "ck"
    first = subprocess.Popen(
        cmd("--train-iters", 60, "--save", d, "--save-interval", 20),
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while not os.path.exists(d / ".lock") and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert os.path.exists(d / ".lock"), "the first run never took the lock"
        second = train("--train-iters", 2, "--save", d, "--save-interval", 1)
        still_running = first.poll() is None
        out, err = first.communicate(timeout=300)
    finally:
        first.kill()
    assert second.returncode != 0
    line = one_error_line(second)
    assert line.startswith(f"error: --save {d} is in use by host {socket.gethostname()} pid {first.pid} (started ")
    assert still_running, "the first run ended before the second was refused: the test proved nothing"
    assert first.returncode == 0, err[-3000:]
    assert checkpoint_names(d) == ["iter_0000020", "iter_0000040", "iter_0000060", "latest"]
    assert latest(d) == "iter_0000060"
    r = train("--train-iters", 60, "--load", d, "--save", d)  # the checkpoint loads
    assert r.returncode == 0 and f"loaded checkpoint from {d} at iteration 60" in r.stdout, r.stderr[-3000:]


@pytest.mark.timeout(300)
def test_locks_of_another_host_and_of_a_dead_process(finished, tmp_path):
    d = tmp_path / "ck"
    shutil.copytree(finished, d, copy_function=shutil.copy2)
    lock = dict(host="elsewhere.example", pid=os.getpid(), started="2026-01-01 00:00:00 UTC")
    (d / ".lock").write_text(json.dumps(lock))
    before = snapshot(d)
    r = train("--train-iters", 3, "--load", d, "--save", d)
    assert r.returncode != 0
    assert one_error_line(r) == (
        f"error: --save {d} is in use by host elsewhere.example pid {os.getpid()} (started 2026-01-01 00:00:00 UTC); "
        f"if that run has ended, remove {d / '.lock'}"
    )
    assert snapshot(d) == before

    dead = subprocess.Popen(["true"])
    dead.wait()
    (d / ".lock").write_text(json.dumps(dict(lock, host=socket.gethostname(), pid=dead.pid)))
    r = train("--train-iters", 3, "--load", d, "--save", d)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"taking over the stale lock {d / '.lock'} of pid {dead.pid}" in r.stdout
    assert latest(d) == "iter_0000003" and not os.path.exists(d / ".lock")


@pytest.mark.timeout(300)
def test_a_fresh_run_into_checkpoints_is_refused_unless_overwrite_save(finished, tmp_path):
    d = tmp_path / "ck"
    shutil.copytree(finished, d, copy_function=shutil.copy2)
    before = snapshot(d)
    r = train("--train-iters", 2, "--save", d)
    assert r.returncode != 0
    assert one_error_line(r) == (
        f"error: --save {d} already holds checkpoints (iter_0000001, iter_0000002, latest) and this run has no "
        f"--load: resume with --load {d}, choose another --save, or pass --overwrite-save"
    )
    assert snapshot(d) == before
    assert "--overwrite-save" in subprocess.run(cmd("--help"), capture_output=True, text=True, env=ENV).stdout

    r = train("--train-iters", 2, "--save", d, "--overwrite-save")
    assert r.returncode == 0, r.stderr[-3000:]
    after = snapshot(d)
    assert checkpoint_names(d) == ["iter_0000001", "iter_0000002", "latest"]  # no leftovers, no lock
    assert after["iter_0000002/an_megatron.json"][1] != before["iter_0000002/an_megatron.json"][1]  # replaced
    assert latest(d) == "iter_0000002"


@pytest.mark.timeout(300)
def test_reshard_refuses_a_directory_with_checkpoints(finished, tmp_path):
    model = tmp_path / "model.pt"
    r = tool("consolidate", "--load", finished, "--output", model)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "out"  # a training run's directory, without the converted checkpoint's tag
    out.mkdir()
    shutil.copytree(finished / "iter_0000001", out / "iter_0000001", copy_function=shutil.copy2)
    (out / "latest").write_text("iter_0000001")
    before = snapshot(out)
    r = tool("reshard", "--input", model, "--save", out)
    assert r.returncode == 1
    assert one_error_line(r) == (
        f"error: --save {out} already holds checkpoints (iter_0000001, latest): choose an empty directory, "
        f"or pass --overwrite-save"
    )
    assert snapshot(out) == before
    r = tool("reshard", "--input", finished, "--save", out)  # a directory input: nothing consolidated there either
    assert r.returncode == 1 and snapshot(out) == before

    r = tool("reshard", "--input", model, "--save", out, "--overwrite-save")
    assert r.returncode == 0, r.stderr[-3000:]
    assert latest(out) == "iter_0000002" and checkpoint_names(out) == ["iter_0000001", "iter_0000002", "latest"]
    assert snapshot(out)["iter_0000001/an_megatron.json"] == before["iter_0000001/an_megatron.json"]


def loads(d):
    """``latest`` of ``d`` (if any) names a complete checkpoint: its files all load (consolidate
    reads the model states and the ZeRO optimizer states) at the iteration its metadata says."""
    from an_megatron.training.convert import consolidate

    if not os.path.exists(d / "latest"):
        return None
    tag = latest(d)
    got = consolidate(str(d))
    assert tag == f"iter_{got['iteration']:07d}", (tag, got["iteration"])
    return got["iteration"]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_kill_9_at_random_moments_never_leaves_a_latest_that_fails_to_load(tmp_path):
    """SIGKILL at seeded random moments while checkpoints are being written (a save every
    iteration; a kill follows a new name appearing in --save, after a random delay), then at a
    random moment of a relaunch of the finished run. After every kill ``latest`` loads, and each
    relaunch resumes from it."""
    import random

    rng = random.Random(14)
    d, iters = tmp_path / "ck", 10
    log = tmp_path / "stderr"

    def launch():
        # no `latest` yet (killed before the first was written): start afresh, as the refusal says
        resume = ["--load", d] if os.path.exists(d / "latest") else ["--overwrite-save"]
        with open(log, "w") as err:
            return subprocess.Popen(
                cmd("--train-iters", iters, "--save", d, "--save-interval", 1, *resume),
                cwd=ROOT,
                env=ENV,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )

    def names(d):
        return set(os.listdir(d)) if os.path.isdir(d) else set()

    def kill(p):
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
        assert p.returncode in (0, -signal.SIGKILL), log.read_text()[-3000:]  # a resume never fails

    kills, mid_save = 0, 0
    while kills < 3 or (not mid_save and kills < 6):  # at least one kill lands inside a save
        seen = {LOCK, *names(d)}
        p, skip, deadline = launch(), rng.randint(0, 2), time.time() + 120  # skip: new names to let pass
        while p.poll() is None and time.time() < deadline:
            if len(names(d) - seen) > skip:
                time.sleep(rng.uniform(0, 0.02))  # while saving, publishing, or just after
                break
            time.sleep(0.002)
        killed = p.poll() is None
        kill(p)
        kills += killed
        mid_save += killed and any(".tmp-" in n for n in names(d))
        if loads(d) == iters:  # it finished before the kill: start again
            shutil.rmtree(d)
    assert mid_save, "no kill landed inside a save"

    p = launch()  # the rest of the run
    assert p.wait(timeout=240) == 0, log.read_text()[-3000:]
    assert loads(d) == iters and not [n for n in os.listdir(d) if ".tmp" in n]  # leftovers removed

    p = launch()  # a relaunch of the finished run, killed while it starts, loads or stops
    time.sleep(rng.uniform(1, 12))
    kill(p)
    assert loads(d) == iters and latest(d) == f"iter_{iters:07d}"
