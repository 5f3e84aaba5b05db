"""lm-evaluation-harness on an exported model: a checkpoint trained on the bundled corpus with a
SentencePiece tokenizer is exported (the tokenizer the run recorded), and ``lm_eval --model hf``
runs the two local tasks in ``tests/lm_eval_tasks/`` (a multiple-choice task and a perplexity
task over jsonl files; no hub access). Every log-likelihood lm-eval reports, and the metrics it
aggregates from them, equal what ``GPTModel`` computes from the checkpoint for the same items.
"""

import glob
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from test_training import ROOT, TINY, corpus, run  # noqa: F401 (corpus: a fixture)

TASKS = os.path.join(ROOT, "tests", "lm_eval_tasks")
SEQ = 64


def export_hf(load, output) -> subprocess.CompletedProcess:
    """tools/export_hf.py with no tokenizer flags: the export takes the one the run recorded."""
    cmd = [sys.executable, "tools/export_hf.py", "--load", str(load), "--output", str(output)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=280, cwd=ROOT)


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):  # noqa: F811
    d = tmp_path_factory.mktemp("lm_eval")
    flags = ["--deepspeed_config", "examples/ds_fp32.json", "--micro-batch-size", "4", "--global-batch-size", "4"]
    flags += ["--train-iters", "20", "--lr", "3e-3", *TINY, "--seq-length", str(SEQ), "--split", "100,0,0"]
    flags += ["--data-path", str(corpus / "kjv_text_document"), "--tokenizer-type", "SentencePieceTokenizer"]
    flags += ["--tokenizer-model", str(corpus / "tok.model"), "--save", str(d / "ckpt"), "--save-interval", "20"]
    out = run(flags, env={"PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stderr[-3000:]
    export = export_hf(d / "ckpt", d / "hf")
    assert export.returncode == 0, export.stderr[-3000:]
    assert export.stdout.splitlines()[-1].endswith("iteration 20, fp32, tokenizer SentencePieceTokenizer")
    return d


@pytest.fixture(scope="module")
def lm_eval_results(trained):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(trained / "ds")}
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf"]
    cmd += ["--model_args", f"pretrained={trained / 'hf'},trust_remote_code=True,dtype=float32"]
    cmd += ["--tasks", "angpt_local_mc,angpt_local_ppl", "--include_path", TASKS, "--device", "cpu"]
    cmd += ["--batch_size", "4", "--output_path", str(trained / "eval"), "--log_samples"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    (results,) = glob.glob(str(trained / "eval" / "*" / "results_*.json"))
    samples = {}
    for task in ("angpt_local_mc", "angpt_local_ppl"):
        (path,) = glob.glob(str(trained / "eval" / "*" / f"samples_{task}_*.jsonl"))
        with open(path) as f:
            samples[task] = sorted((json.loads(line) for line in f), key=lambda s: s["doc_id"])
    with open(results) as f:
        return json.load(f)["results"], samples


@pytest.fixture(scope="module")
def ours(trained, corpus):  # noqa: F811
    """GPTModel from the checkpoint, and our tokenizer."""
    from an_megatron.data.tokenizers import SentencePieceTokenizer
    from an_megatron.parallel import destroy_parallel, initialize_parallel
    from an_megatron.training.convert import load_into_model

    initialize_parallel(1, 1)
    try:
        yield load_into_model(str(trained / "ckpt")).eval(), SentencePieceTokenizer(str(corpus / "tok.model"))
    finally:
        destroy_parallel()


def loglikelihood(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """Sum of log p(continuation | context) and whether it is the greedy continuation."""
    tokens = torch.tensor([context + continuation])
    assert tokens.shape[1] <= SEQ + 1  # one window: lm-eval's truncation never applies here
    with torch.no_grad():
        logp = torch.log_softmax(model(tokens[:, :-1]).float(), dim=-1)[0, len(context) - 1 :]
    target = torch.tensor(continuation)
    return logp.gather(-1, target[:, None]).sum().item(), bool((logp.argmax(-1) == target).all())


def close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-4 + 1e-5 * abs(b)


@pytest.mark.timeout(1200)
def test_multiple_choice_matches_our_model(lm_eval_results, ours):
    results, samples = lm_eval_results
    model, tok = ours
    with open(os.path.join(TASKS, "mc.jsonl")) as f:
        docs = [json.loads(line) for line in f]
    assert len(samples["angpt_local_mc"]) == len(docs)
    correct = []
    for doc, sample in zip(docs, samples["angpt_local_mc"]):
        scores = []
        for choice, resp in zip(doc["choices"], sample["resps"]):
            # lm-eval's split for causal models: encode context + continuation together, and the
            # continuation is what follows the context's own encoding
            context, continuation = doc["question"], " " + choice
            whole, ctx = tok.tokenize(context + continuation), tok.tokenize(context)
            ll, greedy = loglikelihood(model, ctx, whole[len(ctx) :])
            assert close(float(resp[0][0]), ll), (doc["question"], choice, resp, ll)
            assert (resp[0][1] == "True") == greedy
            scores.append(ll)
        correct.append(float(max(range(len(scores)), key=scores.__getitem__) == doc["answer"]))
        assert sample["acc"] == correct[-1]
    assert results["angpt_local_mc"]["acc,none"] == pytest.approx(sum(correct) / len(correct))


@pytest.mark.timeout(1200)
def test_perplexity_matches_our_model(lm_eval_results, ours):
    results, samples = lm_eval_results
    model, tok = ours
    with open(os.path.join(TASKS, "ppl.jsonl")) as f:
        texts = [json.loads(line)["text"] for line in f]
    total, words, nbytes = 0.0, 0, 0
    for text, sample in zip(texts, samples["angpt_local_ppl"], strict=True):
        # loglikelihood_rolling on a text shorter than the context: every token, after the
        # prefix token (no bos: the end-of-document token, which also starts documents in training)
        ll, _ = loglikelihood(model, [tok.eod], tok.tokenize(text))
        assert close(float(sample["resps"][0][0]), ll), (text, sample["resps"], ll)
        total, words, nbytes = total + ll, words + len(re.split(r"\s+", text)), nbytes + len(text.encode())
    got = results["angpt_local_ppl"]
    assert got["word_perplexity,none"] == pytest.approx(math.exp(-total / words), rel=1e-5)
    assert got["byte_perplexity,none"] == pytest.approx(math.exp(-total / nbytes), rel=1e-5)
    assert got["bits_per_byte,none"] == pytest.approx(-total / nbytes / math.log(2), rel=1e-5)


@pytest.mark.timeout(300)
def test_missing_recorded_tokenizer_is_one_line(trained, corpus, tmp_path):  # noqa: F811
    """The tokenizer file the run recorded has gone: the export says so in one line and writes
    nothing (the file is put back afterwards)."""
    model = corpus / "tok.model"
    os.rename(model, tmp_path / "tok.model")
    try:
        out = export_hf(trained / "ckpt", tmp_path / "hf")
    finally:
        os.rename(tmp_path / "tok.model", model)
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1 and out.stderr.startswith(f"error: --tokenizer-model {model}: no such file")
    assert "recorded by the checkpoint's run" in out.stderr
    assert not (tmp_path / "hf").exists()
