"""Hugging Face export: for each architecture, a TP=2 x PP=2 checkpoint exported with the factors
folded gives the logits of the training model (fp32, relative 1e-5), loaded through
``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)``; greedy decoding with the
KV cache equals decoding without it, and each cached step's logits equal a full forward pass;
the exported tokenizer gives our ids; bad input is refused with one line and nothing written.

Every weight and learned scale is perturbed away from its initial value (where folds that are
wrong only for non-initial scales would pass unnoticed). One 4-process checkpoint write per
architecture is shared by the module.
"""

import os
import subprocess
import sys

import pytest
import torch
from test_training import ROOT

ARCHS = ("angpt", "ngpt", "gptplus")
SHAPE = dict(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=512, seq_length=48)
CORPUS = os.path.join(ROOT, "examples", "data", "kjv.jsonl.gz")


def perturbed_weights(config, seed: int = 0) -> dict:
    """GPTModel's initial weights (TP=1), every tensor multiplied by ``1 + 0.3 U(0, 1)``."""
    from an_megatron.model import GPTModel

    model = GPTModel(config)
    gen = torch.Generator().manual_seed(seed)
    return {n: p.detach() * (1 + 0.3 * torch.rand(p.shape, generator=gen)) for n, p in model.named_parameters()}


def training_model(config, weights):
    from an_megatron.model import GPTModel

    model = GPTModel(config).eval()
    model.load_state_dict(weights, strict=False)  # strict=False: megatron-core's _extra_state entries
    return model


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def load_exported(path, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, **kw).eval()


@pytest.fixture(scope="module")
def world():
    from an_megatron.parallel import destroy_parallel, initialize_parallel

    initialize_parallel(1, 1)
    yield
    destroy_parallel()


@pytest.fixture(scope="module")
def tok_model(tmp_path_factory):
    from an_megatron.data.tokenizer_training import train_sentencepiece

    prefix = str(tmp_path_factory.mktemp("tok") / "tok")
    train_sentencepiece([CORPUS], prefix, 500, sample_sentences=20000, num_threads=1)
    return prefix + ".model"


@pytest.fixture(scope="module")
def sources(world, tmp_path_factory):
    """Per architecture: (config, weights, TP=2 x PP=2 checkpoint directory, consolidated file)."""
    from an_megatron.model.config import ModelConfig
    from an_megatron.training.convert import FORMAT, write_layout

    d = tmp_path_factory.mktemp("export_sources")
    out = {}
    for i, arch in enumerate(ARCHS):
        config = ModelConfig(arch=arch, **SHAPE)
        weights = perturbed_weights(config, seed=i)
        path = str(d / f"{arch}.pt")
        obj = dict(format=FORMAT, model=weights, config=config.to_dict(), iteration=5, consumed_samples=0, source={})
        torch.save(obj, path)
        write_layout(path, str(d / f"{arch}_tp2_pp2"), tp=2, pp=2)
        out[arch] = (config, weights, str(d / f"{arch}_tp2_pp2"), path)
    return out


@pytest.fixture(scope="module")
def exported(sources, tok_model, tmp_path_factory):
    """Each architecture's TP=2 x PP=2 checkpoint exported (anGPT through the command line)."""
    from an_megatron.hf.export import export

    d = tmp_path_factory.mktemp("exported")
    tokenizer = dict(tokenizer_type="SentencePieceTokenizer", tokenizer_model=tok_model)
    for arch, (_, _, ckpt, _) in sources.items():
        if arch == "angpt":
            run = subprocess.run(
                [sys.executable, "tools/export_hf.py", "--load", ckpt, "--output", str(d / arch)]
                + ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", tok_model],
                capture_output=True,
                text=True,
                timeout=300,
                cwd=ROOT,
            )
            assert run.returncode == 0, run.stderr[-3000:]
            last = run.stdout.splitlines()[-1]
            assert last.startswith(f"wrote {d / arch}: angpt, ") and last.endswith("tokenizer SentencePieceTokenizer")
        else:
            export(ckpt, str(d / arch), tokenizer)
    return d


@pytest.mark.timeout(900)
@pytest.mark.parametrize("arch", ARCHS)
def test_exported_logits_equal_training_model(arch, sources, exported):
    from safetensors.torch import load_file

    config, weights, ckpt, _ = sources[arch]
    meta = open(os.path.join(ckpt, "iter_0000005", "an_megatron.json")).read()
    assert '"tensor_model_parallel_size": 2' in meta and '"pipeline_model_parallel_size": 2' in meta
    files = sorted(os.listdir(exported / arch))
    for name in ("config.json", "configuration_angpt.py", "generation_config.json", "model.safetensors"):
        assert name in files
    assert {"modeling_angpt.py", "tokenizer.json", "tokenizer_config.json"} <= set(files)
    stored = load_file(str(exported / arch / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in stored.values())
    assert not any("s_hat" in k or "s_z" in k for k in stored)  # the scales are folded into weights

    ref_model, hf = training_model(config, weights), load_exported(exported / arch)
    assert type(hf).__name__ == "AnGPTForCausalLM" and hf.config.arch == arch
    gen = torch.Generator().manual_seed(1)
    # 2 x 48 tokens (the training length), and 70 (past it: the gaussian factor's lookup table ends)
    for shape in ((2, SHAPE["seq_length"]), (1, 70)):
        tokens = torch.randint(0, SHAPE["vocab_size"], shape, generator=gen)
        with torch.no_grad():
            ref, got = ref_model(tokens), hf(tokens).logits
        assert got.shape == ref.shape
        assert rel_err(got, ref) < 1e-5, (arch, shape, rel_err(got, ref))


@pytest.mark.timeout(600)
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_decoding_with_cache_equals_without(arch, exported):
    hf = load_exported(exported / arch)
    prompt = torch.tensor([[17, 40, 5, 300, 2]])
    with torch.no_grad():
        # min_new_tokens: no stop at the end-of-document token, so 60 positions are compared
        cached = hf.generate(prompt, max_new_tokens=60, min_new_tokens=60, do_sample=False, use_cache=True)
        uncached = hf.generate(prompt, max_new_tokens=60, min_new_tokens=60, do_sample=False, use_cache=False)
    assert cached.shape == (1, 65) and torch.equal(cached, uncached)

    # Each cached step's logits are a full forward pass's: the attention factor and RoPE use the
    # token's absolute position in the cache (also past max_position_embeddings = 48).
    from transformers import DynamicCache

    with torch.no_grad():
        full = hf(cached, use_cache=False).logits
        cache = DynamicCache(config=hf.config)
        steps = [hf(cached[:, :10], cache=cache, use_cache=True).logits]  # prefill
        steps.append(hf(cached[:, 10:17], cache=cache, use_cache=True).logits)  # a chunk after a prefill
        for i in range(17, cached.shape[1]):
            steps.append(hf(cached[:, i : i + 1], cache=cache, use_cache=True).logits)
    assert cache.get_seq_length() == cached.shape[1]
    assert rel_err(torch.cat(steps, dim=1), full) < 1e-5


@pytest.mark.timeout(300)
def test_left_padded_batch_generates_as_each_prompt_alone(exported):
    from transformers import AutoTokenizer

    hf, tok = load_exported(exported / "angpt"), AutoTokenizer.from_pretrained(exported / "angpt")
    tok.padding_side = "left"
    prompts = ["In the beginning God created", "And"]
    batch = tok(prompts, return_tensors="pt", padding=True)
    assert batch["attention_mask"][1].tolist().count(0) > 0
    greedy = dict(max_new_tokens=12, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        together = hf.generate(**batch, **greedy)
        for row, prompt in enumerate(prompts):
            alone = hf.generate(tok(prompt, return_tensors="pt").input_ids, **greedy)
            # Same scores at every step; the tokens may part only where two logits tie to rounding
            # (a batch of 2 and of 1 round differently), after which the continuations differ.
            for step, (t_scores, a_scores) in enumerate(zip(together.scores, alone.scores)):
                t_scores, a_scores = t_scores[row], a_scores[0]
                if together.sequences[row, -12 + step] != alone.sequences[0, -12 + step]:
                    top2 = a_scores.topk(2).values
                    assert top2[0] - top2[1] < 1e-4, (row, step)
                    break
                torch.testing.assert_close(t_scores, a_scores, rtol=1e-4, atol=1e-5)


@pytest.mark.timeout(300)
def test_exported_tokenizer_keeps_our_ids(exported, tok_model):
    import gzip
    import json

    from transformers import AutoTokenizer

    from an_megatron.data.tokenizers import SentencePieceTokenizer

    ours, theirs = SentencePieceTokenizer(tok_model), AutoTokenizer.from_pretrained(exported / "angpt")
    with gzip.open(CORPUS, "rt") as f:
        texts = [json.loads(line)["text"] for _, line in zip(range(200), f)]
    texts += ["  leading and  double spaces\tand\ttabs\n\nnewlines 12345 naïve 東京 🙂", "<EOD> </s> written out"]
    for text in texts:
        ids = theirs(text, add_special_tokens=False)["input_ids"]
        assert ids == ours.tokenize(text), text[:80]
        assert theirs.decode(ids) == ours.detokenize(ids)
    assert theirs.eos_token_id == ours.eod == ours.token_to_id("<EOD>")
    assert theirs.convert_ids_to_tokens(ours.eod) == "<EOD>"
    hf = load_exported(exported / "angpt")
    assert hf.config.eos_token_id == hf.generation_config.eos_token_id == ours.eod
    assert hf.generation_config.suppress_tokens == list(range(ours.vocab_size, SHAPE["vocab_size"]))


@pytest.mark.timeout(300)
def test_bf16_export(sources, tmp_path):
    from safetensors.torch import load_file

    from an_megatron.hf.export import export

    config, weights, _, consolidated = sources["angpt"]
    export(consolidated, str(tmp_path / "bf16"), dtype="bf16")
    assert sorted(os.listdir(tmp_path / "bf16")) == [
        "config.json",
        "configuration_angpt.py",
        "generation_config.json",
        "model.safetensors",
        "modeling_angpt.py",
    ]  # a consolidated file records no tokenizer: none is written
    assert {t.dtype for t in load_file(str(tmp_path / "bf16" / "model.safetensors")).values()} == {torch.bfloat16}
    hf = load_exported(tmp_path / "bf16")
    assert hf.dtype == torch.bfloat16
    tokens = torch.randint(0, SHAPE["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        err = rel_err(hf(tokens).logits, training_model(config, weights)(tokens))
    assert 1e-4 < err < 5e-2  # bf16 rounding: visible, small


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "options",
    [
        dict(nu_att="exact"),
        dict(nu_att="dense"),
        dict(nu_att="none"),
        dict(alpha_per_dim=False, use_nu_lerp=False, scales={"s_qk": (1.5, None), "s_z": (2.0, 0.5)}),
        dict(arch="ngpt", alpha_per_dim=False),
    ],
)
def test_every_option_folds(options, world):
    """The folds for anGPT's other attention factors, scalar alpha, no nu_lerp and non-default
    scale reparameterizations (in process: no checkpoint needed)."""
    from an_megatron.hf.configuration_angpt import AnGPTConfig
    from an_megatron.hf.export import fold_state_dict, hf_config_kwargs
    from an_megatron.hf.modeling_angpt import AnGPTForCausalLM
    from an_megatron.model.config import ModelConfig

    config = ModelConfig(**{**SHAPE, "arch": "angpt", **options})
    weights = perturbed_weights(config, seed=7)
    hf = AnGPTForCausalLM(AnGPTConfig(**hf_config_kwargs(config))).eval()
    hf.load_state_dict(fold_state_dict(weights, config), strict=True)
    tokens = torch.randint(0, SHAPE["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert rel_err(hf(tokens).logits, training_model(config, weights)(tokens)) < 1e-5
        cached = hf.generate(tokens[:1, :4], max_new_tokens=20, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = hf.generate(tokens[:1, :4], max_new_tokens=20, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)


def _cli(*args):
    from export_hf import main  # tools/export_hf.py

    return main(list(args))


@pytest.fixture
def tools_path(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "tools"))


@pytest.mark.timeout(300)
def test_bad_input_is_refused_with_one_line(sources, tok_model, tmp_path, capsys, tools_path):
    from an_megatron.training.convert import FORMAT

    _, weights, _, consolidated = sources["angpt"]

    def refused(*args) -> str:
        assert _cli(*args) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: "), err
        return err

    # an unknown architecture
    obj = dict(format=FORMAT, model=weights, config={**SHAPE, "arch": "transformer"}, iteration=1)
    torch.save(obj, tmp_path / "unknown.pt")
    err = refused("--load", str(tmp_path / "unknown.pt"), "--output", str(tmp_path / "out"))
    assert "architecture 'transformer'" in err and "angpt, ngpt, gptplus" in err
    # a missing tokenizer file
    missing = str(tmp_path / "nowhere" / "tok.model")
    err = refused(
        "--load", consolidated, "--output", str(tmp_path / "out"),
        "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", missing,
    )  # fmt: skip
    assert missing in err and "no such file" in err
    # a tokenizer that is not one
    (tmp_path / "bad.model").write_text("not a model")
    err = refused(
        "--load", consolidated, "--output", str(tmp_path / "out"),
        "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", str(tmp_path / "bad.model"),
    )  # fmt: skip
    assert "bad.model" in err
    # a checkpoint that is not there
    err = refused("--load", str(tmp_path / "no_ckpt"), "--output", str(tmp_path / "out"))
    assert "no_ckpt" in err
    assert not (tmp_path / "out").exists()
    # an output directory that exists and is not empty: untouched
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    err = refused("--load", consolidated, "--output", str(tmp_path / "full"))
    assert f"--output {tmp_path / 'full'}: exists and is not an empty directory" in err
    assert os.listdir(tmp_path / "full") == ["keep.txt"]
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]  # no temporary directory left behind
    # an empty output directory is fine
    (tmp_path / "empty").mkdir()
    assert _cli("--load", consolidated, "--output", str(tmp_path / "empty")) == 0
    assert "model.safetensors" in os.listdir(tmp_path / "empty")


@pytest.mark.timeout(600)
def test_generate_tool_from_export_and_from_checkpoint(sources, exported, tok_model):
    """tools/generate.py: greedy decoding from the exported directory and from the TP=2 x PP=2
    checkpoint (folded in memory) continues the prompt with the same tokens as generate()."""
    from transformers import AutoTokenizer

    from an_megatron.data.tokenizers import SentencePieceTokenizer

    hf, tok = load_exported(exported / "angpt"), AutoTokenizer.from_pretrained(exported / "angpt")
    prompt = "In the beginning God"
    with torch.no_grad():
        ids = hf.generate(tok(prompt, return_tensors="pt").input_ids, max_new_tokens=15, do_sample=False)[0].tolist()

    def tool(*args):
        out = subprocess.run(
            [sys.executable, "tools/generate.py", "--prompt", prompt, "--max-new-tokens", "15", *args],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=ROOT,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout  # the text is the last thing printed (after any library's log lines)

    assert tool("--load", str(exported / "angpt"), "--temperature", "0").endswith(tok.decode(ids) + "\n")
    ckpt = sources["angpt"][2]
    flags = ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", tok_model]
    from_ckpt = tool("--load", ckpt, "--temperature", "0", *flags)
    assert from_ckpt.endswith(SentencePieceTokenizer(tok_model).detokenize(ids) + "\n")
    sampled = tool("--load", str(exported / "angpt"), "--temperature", "0.8", "--top-k", "40", "--top-p", "0.9")
    assert prompt in sampled


@pytest.mark.timeout(300)
def test_inference_overhead_benchmark_smoke():
    out = subprocess.run(
        [sys.executable, "benchmarks/inference_overhead.py", "--hidden-size", "64", "--num-layers", "2"]
        + ["--num-attention-heads", "4", "--vocab-size", "256", "--prompt", "16", "--decode", "4"]
        + ["--rounds", "2", "--warmup", "1", "--cpu-time"],
        capture_output=True,
        text=True,
        timeout=280,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split(" | ") for line in out.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert [(r[0], r[1]) for r in rows[1:]] == [
        (f"| {a}", phase) for phase in ("prefill", "decode") for a in ("gptplus", "angpt", "ngpt")
    ]
    assert "load average" in out.stdout


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["HuggingFaceTokenizer", "GPT2BPETokenizer"])
def test_tokenizer_json_tokenizers_export_with_our_ids(kind, sources, tmp_path):
    """A tokenizer.json (HuggingFaceTokenizer) and GPT-2 BPE files are written as tokenizer.json
    with our ids and end of document."""
    import gzip
    import json

    from tokenizers import ByteLevelBPETokenizer
    from transformers import AutoTokenizer

    from an_megatron.data.config import DataConfig
    from an_megatron.data.tokenizers import build_tokenizer
    from an_megatron.hf.export import export

    with gzip.open(CORPUS, "rt") as f:
        texts = [json.loads(line)["text"] for _, line in zip(range(300), f)]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=400, special_tokens=["<|endoftext|>"])
    if kind == "HuggingFaceTokenizer":
        bpe.save(str(tmp_path / "tokenizer.json"))
        settings = dict(tokenizer_type=kind, tokenizer_model=str(tmp_path / "tokenizer.json"))
    else:
        bpe.save_model(str(tmp_path))
        settings = dict(
            tokenizer_type=kind, vocab_file=str(tmp_path / "vocab.json"), merge_file=str(tmp_path / "merges.txt")
        )
    export(sources["angpt"][3], str(tmp_path / "out"), settings)
    ours, theirs = build_tokenizer(DataConfig(**settings)), AutoTokenizer.from_pretrained(tmp_path / "out")
    assert theirs.eos_token_id == ours.eod == ours.token_to_id("<|endoftext|>")
    for text in texts[:50] + ["  spaces\tand\nlines 123 naïve 東京"]:
        ids = theirs(text, add_special_tokens=False)["input_ids"]
        assert ids == ours.tokenize(text)
        assert theirs.decode(ids) == ours.detokenize(ids)
