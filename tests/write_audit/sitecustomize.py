"""Put on the PYTHONPATH of launched processes by tests/test_multinode.py only: records what each
process creates, writes, reads, renames and removes under $WRITE_AUDIT_ROOT, one line per event,
in $WRITE_AUDIT_DIR/node<N>-rank<R>-<pid>.log (R is "agent" for the launcher itself).

Python's audit hooks see every builtins.open / os.open (with its flags), os.rename / os.replace,
os.remove and os.mkdir, whatever library makes the call; files that torch.save writes from C++
are not seen (the test checks those by listing the checkpoint)."""

import os
import sys

_ROOT, _OUT = os.environ.get("WRITE_AUDIT_ROOT"), os.environ.get("WRITE_AUDIT_DIR")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _relative(path):
    if path is None or isinstance(path, int):
        return None
    try:
        path = os.path.abspath(os.fsdecode(path))
    except TypeError:
        return None
    return os.path.relpath(path, _ROOT) if path.startswith(_ROOT + os.sep) else None


def _install():
    who = f"node{os.environ.get('WRITE_AUDIT_NODE', '?')}-rank{os.environ.get('RANK', 'agent')}-{os.getpid()}"
    log = open(os.path.join(_OUT, who + ".log"), "a", buffering=1)  # opened before the hook exists

    def hook(event, args):
        if event == "open":
            path, _, flags = args
            rel = _relative(path)
            if rel is not None:
                log.write(f"{'write' if (flags or 0) & _WRITE_FLAGS else 'read'} {rel}\n")
        elif event == "os.rename":
            src, dst = _relative(args[0]), _relative(args[1])
            if src is not None or dst is not None:
                log.write(f"rename {src} {dst}\n")
        elif event in ("os.remove", "os.mkdir", "os.rmdir"):
            rel = _relative(args[0])
            if rel is not None:
                log.write(f"{event[3:]} {rel}\n")

    sys.addaudithook(hook)


if _ROOT and _OUT:
    _ROOT = os.path.abspath(_ROOT)
    _install()
