"""`python -m modeling_deepseek.serve PATH --continuous-batching`: transformers' OpenAI-compatible server running our
model with continuous batching, started as a subprocess on a loopback port and called through the real `openai`
client by several requests at once. Each completion must be the greedy continuation `generate()` gives its prompt
alone. The tokenizer is word-level (one word per token id), so the returned text maps back to token ids exactly."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from benchmarks.harness import free_port, serving
from conftest import random_ids, tiny_model
from modeling_deepseek.compat import MLA_PAGED_CACHE, PAGED_CACHE_MIN_VERSION

needs_mla_paged_cache = pytest.mark.skipif(
    not MLA_PAGED_CACHE, reason=f"continuous batching of MLA needs transformers >= {PAGED_CACHE_MIN_VERSION}")

REPO = Path(__file__).resolve().parent.parent
VOCAB = 128
SPECIALS = ("<bos>", "<eos>", "<pad>")


def word_tokenizer():
    """Token id i <-> the word "w{i}" (ids 0-2: bos, eos, pad), words separated by spaces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {**{s: i for i, s in enumerate(SPECIALS)}, **{f"\u2581w{i}": i for i in range(len(SPECIALS), VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="\u2581w3"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


@pytest.fixture(scope="module", params=[None, "fp8"], ids=["latent", "fp8-latent"])
def served(tmp_path_factory, request):
    """The server over a saved folder; with latent_cache_dtype "fp8" in its config.json, the paged latent is e4m3."""
    folder = tmp_path_factory.mktemp("served")
    model = tiny_model(seed=0, bos_token_id=0, eos_token_id=1, pad_token_id=2, latent_cache_dtype=request.param).eval()
    model.generation_config.update(do_sample=False, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    model.save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    env.pop("DEEPSEEK_API_KEY", None)  # a key in the caller's environment would guard this server too
    cmd = [sys.executable, "-m", "modeling_deepseek.serve", str(folder), "--continuous-batching", "--host", "127.0.0.1",
           "--port", str(port), "--device", "cpu", "--cb-num-blocks", "16", "--cb-block-size", "16"]
    with serving(cmd, port, folder / "server.log", env, timeout=240):
        yield folder, port, model


@needs_mla_paged_cache
def test_concurrent_completions_through_the_openai_client_match_generate(served):
    from openai import OpenAI

    folder, port, model = served
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
    prompts = [random_ids(1, n, seed=n, vocab=VOCAB)[0].tolist() for n in (4, 11, 23, 37, 52, 8)]
    budgets = [9, 4, 12, 6, 10, 7]

    def complete(args):
        ids, n = args
        text = " ".join(f"w{i}" for i in ids)
        response = client.completions.create(model=str(folder), prompt=text, max_tokens=n, temperature=0)
        return response.choices[0].text, response.usage

    with ThreadPoolExecutor(len(prompts)) as pool:
        answers = list(pool.map(complete, zip(prompts, budgets)))

    changed_by_fp8 = False
    for ids, n, (text, usage) in zip(prompts, budgets, answers):
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=n)  # with the config's latent cache dtype
            changed_by_fp8 |= not torch.equal(out, model.generate(torch.tensor([ids]), max_new_tokens=n,
                                                                  latent_cache_dtype=None))
        expected = out[0, len(ids):].tolist()
        if 1 in expected:  # EOS: generation stops there, the server does not print it
            expected = expected[: expected.index(1)]
        assert [int(word[1:]) for word in text.split()] == expected
        assert usage.prompt_tokens == len(ids)
        assert usage.completion_tokens in (len(expected), len(expected) + 1)  # + the EOS token, if one ended it
    assert changed_by_fp8 == (model.config.latent_cache_dtype == "fp8"), "fixture: the FP8 latent changes no token"


@pytest.mark.skipif(MLA_PAGED_CACHE, reason="checks the error of a transformers without our serving path")
def test_old_transformers_serve_raises_naming_the_version():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-m", "modeling_deepseek.serve", "--help"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and f"needs transformers >= {PAGED_CACHE_MIN_VERSION}" in run.stderr, run.stderr
    assert "make serve" in run.stderr and f"pip install -U 'transformers>={PAGED_CACHE_MIN_VERSION}'" in run.stderr
