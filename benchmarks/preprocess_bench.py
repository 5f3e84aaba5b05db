"""Benchmark tools/preprocess_data.py: throughput with 1 and 2 workers, and peak memory of the
whole process tree for an input and one 4 times larger (it must not grow with the input).

    python benchmarks/preprocess_bench.py [--workdir /tmp/an_megatron_preprocess_bench]

Builds jsonl corpora by repeating the bundled King James Bible (examples/data/kjv.jsonl.gz) to
at least 50 MB and 200 MB, trains a SentencePiece model (vocab 8000) on the bundled corpus, runs
the tool as a subprocess, polls the RSS and PSS of it and its workers (summed) every 50 ms, and prints a
markdown table. Benchmark data stays under --workdir (not in git).
"""

import argparse
import gzip
import os
import re
import subprocess
import sys
import tempfile
import time

try:
    import psutil  # benchmark-only; not a dependency of the package
except ImportError:
    raise SystemExit("this benchmark needs psutil: pip install psutil") from None

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from test_data_support import KJV, REPO, tool_env  # noqa: E402  (the tests run the tools the same way)


def make_corpus(path: str, min_bytes: int) -> int:
    """Repeat the bundled corpus into `path` until it holds at least `min_bytes`."""
    with gzip.open(KJV, "rb") as f:
        chunk = f.read()
    repeats = -(-min_bytes // len(chunk))
    if not os.path.exists(path) or os.path.getsize(path) != repeats * len(chunk):
        with open(path, "wb") as out:
            for _ in range(repeats):
                out.write(chunk)
    return os.path.getsize(path)


def tree_memory(process: psutil.Process) -> tuple:
    """(summed RSS, summed PSS) of `process` and its descendants, in bytes.

    RSS counts pages shared between the forked workers once per process (an upper bound); PSS
    divides shared pages among the processes sharing them (what the tree really uses).
    """
    rss = pss = 0
    for p in [process] + process.children(recursive=True):
        try:
            info = p.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        rss += info.rss
        pss += getattr(info, "pss", info.rss)
    return rss, pss


def run_measured(command: list) -> tuple:
    """Run `command`; return (wall seconds, peak summed RSS, peak summed PSS, stdout)."""
    start = time.time()
    stderr_file = tempfile.TemporaryFile(mode="w+")  # progress lines; a pipe could fill up
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr_file, text=True, cwd=REPO, env=tool_env())
    watched, peak_rss, peak_pss = psutil.Process(process.pid), 0, 0
    while process.poll() is None:
        try:
            rss, pss = tree_memory(watched)
        except psutil.NoSuchProcess:
            break
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        time.sleep(0.05)
    stdout, _ = process.communicate()
    stderr_file.seek(0)
    stderr = stderr_file.read()
    if process.returncode != 0:
        raise SystemExit(f"failed ({process.returncode}): {' '.join(command)}\n{stderr[-2000:]}")
    return time.time() - start, peak_rss, peak_pss, stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/an_megatron_preprocess_bench")
    parser.add_argument("--min-mb", type=int, default=50)
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    small = os.path.join(args.workdir, "kjv_small.jsonl")
    large = os.path.join(args.workdir, "kjv_large.jsonl")
    sizes = {small: make_corpus(small, args.min_mb * 10**6), large: make_corpus(large, 4 * args.min_mb * 10**6)}

    tok = os.path.join(args.workdir, "kjv8k")
    seconds, _, _, _ = run_measured(
        [sys.executable, "tools/train_tokenizer.py", "--input", KJV, "--vocab-size", "8000", "--output-prefix", tok]
    )
    print(
        f"train_tokenizer.py (bundled 4.2 MB corpus, vocab 8000): {seconds:.1f} s wall "
        f"(1-min load average {os.getloadavg()[0]:.1f}: other work on the machine slows it)\n"
    )

    print(
        "| input | workers | documents | tokens | tool time (s) | documents/s | tokens/s | "
        "MB/s | peak RSS, tree (MiB) | peak PSS, tree (MiB) | load avg (1 min) after |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for path, workers in ((small, 1), (small, 2), (large, 2)):
        _, peak_rss, peak_pss, stdout = run_measured(
            [
                sys.executable,
                "tools/preprocess_data.py",
                "--input",
                path,
                "--json-keys",
                "text",
                "--tokenizer-type",
                "SentencePieceTokenizer",
                "--tokenizer-model",
                tok + ".model",
                "--append-eod",
                "--output-prefix",
                os.path.join(args.workdir, f"out_w{workers}"),
                "--workers",
                str(workers),
            ]
        )
        documents = int(re.search(r"^documents: (\d+)", stdout, re.M).group(1))
        tokens = int(re.search(r"^tokens: (\d+)", stdout, re.M).group(1))
        tool_seconds = float(re.search(r"^time: ([.\d]+) s", stdout, re.M).group(1))
        megabytes = sizes[path] / 1e6
        print(
            f"| {megabytes:.0f} MB | {workers} | {documents} | {tokens} | {tool_seconds:.1f} | "
            f"{documents / tool_seconds:.0f} | {tokens / tool_seconds:.0f} | "
            f"{megabytes / tool_seconds:.2f} | {peak_rss / 2**20:.0f} | {peak_pss / 2**20:.0f} | "
            f"{os.getloadavg()[0]:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
