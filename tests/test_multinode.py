"""A two-node launch on one machine: two `torchrun --nnodes 2 --nproc_per_node 1 --node_rank R
--rdzv_endpoint 127.0.0.1:P` invocations (the README's command) meeting at one rendezvous,
training a tiny model on a tiny real corpus with a data index cache, checkpoints and metrics on
the shared filesystem.

What must happen once per job does: every file each process writes is recorded (Python's audit
hooks, tests/write_audit/sitecustomize.py), so the test sees who built the index cache, took the
save lock, published each checkpoint and wrote `latest`. Nothing of ours runs once per node: the
per-node part of a launch is the launcher agent, which writes nothing.
"""

import collections
import os
import re
import subprocess
import time

import numpy
import pytest
from test_training import TINY, losses

from an_megatron.parallel.groups import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AUDIT = os.path.join(ROOT, "tests", "write_audit")
NODES = 2


def _tiny_corpus(prefix):
    """200 documents of ids 1..254, each ending with NullTokenizer(255)'s end of document."""
    from an_megatron.data.indexed import CompactIndexedDatasetBuilder

    rng = numpy.random.default_rng(0)
    builder = CompactIndexedDatasetBuilder(prefix + ".bin", dtype=numpy.uint16)
    for _ in range(200):
        doc = numpy.append(rng.integers(1, 255, rng.integers(20, 60)), 255)
        builder.add_document(doc, [len(doc)])
    builder.finalize(prefix + ".idx")


def _events(audit_dir):
    """[(node, rank, op, path)] from every process's log; temporary names with a pid made generic."""
    out = []
    for name in sorted(os.listdir(audit_dir)):
        node, rank, _ = re.fullmatch(r"node(\d+)-rank(\w+)-(\d+)\.log", name).groups()
        with open(os.path.join(audit_dir, name)) as f:
            for line in f:
                op, *paths = line.split()
                paths = [re.sub(r"\.tmp\.\d+$", ".TMP", re.sub(r"\.tmp-\d+", ".tmp-PID", p)) for p in paths]
                out.append((int(node), rank, op, " ".join(paths)))
    return out


@pytest.mark.timeout(240)
def test_two_node_launch_does_once_per_job_work_once(tmp_path):
    shared = tmp_path / "shared"  # what a cluster's shared filesystem holds
    (shared / "data").mkdir(parents=True)
    _tiny_corpus(str(shared / "data" / "corpus"))
    audit = tmp_path / "audit"
    audit.mkdir()
    port = free_port()
    train = [
        *TINY,
        "--micro-batch-size",
        "2",
        "--global-batch-size",
        "4",
        "--train-iters",
        "4",
        "--lr",
        "1e-3",
        "--data-path",
        str(shared / "data" / "corpus"),
        "--split",
        "90,10,0",
        "--data-cache-path",
        str(shared / "cache"),
        "--tokenizer-type",
        "NullTokenizer",
        "--vocab-size",
        "255",
        "--deepspeed_config",
        "examples/ds_fp32.json",
        "--save",
        str(shared / "ckpt"),
        "--save-interval",
        "2",
        "--metrics-file",
        str(shared / "metrics.jsonl"),
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([AUDIT, ROOT, os.environ.get("PYTHONPATH", "")]),
        "WRITE_AUDIT_ROOT": str(shared),
        "WRITE_AUDIT_DIR": str(audit),
        "OMP_NUM_THREADS": "1",
    }
    nodes = [
        subprocess.Popen(
            [
                "torchrun",
                "--nnodes",
                str(NODES),
                "--nproc_per_node",
                "1",
                "--node_rank",
                str(rank),
                "--rdzv_endpoint",
                f"127.0.0.1:{port}",
                "examples/pretrain_angpt.py",
                *train,
            ],
            cwd=ROOT,
            env={**env, "WRITE_AUDIT_NODE": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(NODES)
    ]
    start = time.monotonic()
    try:
        outputs = [p.communicate(timeout=max(1.0, 200 - (time.monotonic() - start)))[0] for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
    for rank, (p, out) in enumerate(zip(nodes, outputs)):
        assert p.returncode == 0, f"node {rank}:\n{out[-3000:]}"

    events = _events(audit)
    by_rank = collections.defaultdict(list)
    for node, rank, op, path in events:
        by_rank[rank].append((node, op, path))
    assert set(by_rank) <= {"0", "1", "agent"}
    assert {node for node, rank, *_ in events if rank == "1"} == {1}  # global rank 1 ran on node 1
    # The launcher agents (the per-node part) write nothing to the shared filesystem.
    assert [e for e in by_rank["agent"] if e[1] != "read"] == []

    writes = [(rank, path) for node, rank, op, path in events if op in ("write", "mkdir")]
    renames = [(rank, path) for node, rank, op, path in events if op == "rename"]

    # The data index cache: built once, by global rank 0 (train and validation indices, one
    # description and three index files each), then read by rank 1 on the other node.
    cache = sorted(path for rank, path in writes if path.startswith("cache/"))
    cache_writers = collections.Counter(rank for rank, path in writes if path.startswith("cache/"))
    assert cache_writers.keys() == {"0"}, cache_writers
    files = [p for p in cache if not p.startswith("cache/.an_megatron-probe-")]
    assert len(files) == len(set(files)) == 8, files
    assert {re.sub(r"^cache/\w+-GPTDataset-", "", p) for p in files} == {
        f"{split}-{part}"
        for split in ("train", "valid")
        for part in ("description.txt", "document_index.npy", "sample_index.npy", "shuffle_index.npy")
    }
    read_by_1 = {path for node, rank, op, path in events if rank == "1" and op == "read"}
    assert {p for p in files if p.endswith(".npy")} <= read_by_1

    # The save lock: taken once, by global rank 0.
    assert [(r, p) for r, p in writes if p == "ckpt/.lock"] == [("0", "ckpt/.lock")]
    # Each checkpoint is published once by rank 0: its metadata, the rename of the temporary
    # directory every rank wrote into, and `latest` (written aside, then renamed over).
    for tag in ("iter_0000002", "iter_0000004"):
        assert [r for r, p in renames if p == f"ckpt/{tag}.tmp-PID ckpt/{tag}"] == ["0"]
        assert [r for r, p in writes if p.endswith(f"{tag}.tmp-PID/an_megatron.json.TMP")] == ["0"]
    assert [r for r, p in renames if p.endswith(" ckpt/latest")] == ["0", "0"]
    assert [r for r, p in writes if p.startswith("ckpt/latest")] == ["0", "0"]
    with open(shared / "ckpt" / "latest") as f:
        assert f.read().strip() == "iter_0000004"
    assert [r for r, p in writes if p == "ckpt/zero_to_fp32.py"] == ["0", "0"]  # DeepSpeed's, once a save
    # What each rank writes itself (torch.save, not seen by the hooks): its ZeRO optimizer
    # partition; the model states once (data-parallel rank 0).
    final = sorted(os.listdir(shared / "ckpt" / "iter_0000004"))
    assert [n for n in final if n.endswith(".pt")] == [
        "mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    assert "an_megatron.json" in final
    # The pre-flight probes (a file made and removed in the directory, or in its nearest existing
    # parent): --save by every rank (each writes its part of a checkpoint), --data-cache-path by
    # rank 0 (which builds the cache), --metrics-file by the logging rank (rank 0).
    probes = collections.Counter(r for r, p in writes if os.path.basename(p).startswith(".an_megatron-probe-"))
    assert probes == {"0": 3, "1": 1}, probes
    assert {r for r, p in writes if p == "metrics.jsonl"} == {"0"}
    assert sorted(os.listdir(shared)) == ["cache", "ckpt", "data", "metrics.jsonl"]
    assert re.search(r"iteration +4/ +4 \|", outputs[0])  # the log line, from rank 0 on node 0
    assert sorted(losses(shared / "metrics.jsonl")) == [1, 2, 3, 4]
