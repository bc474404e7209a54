"""`python -m modeling_deepseek.serve --api-key KEY --continuous-batching` as a server on a network: one server
subprocess on a loopback port for the module, called by raw HTTP (urllib) and the real `openai` client.

- every bad request of issue 24's table is a 400 in OpenAI's error shape naming the field, before anything runs;
- an empty prompt (the word tokenizer adds no BOS token: it tokenizes to nothing) is a 400, and the server then answers
  a good request with generate()'s tokens;
- without `Authorization: Bearer KEY`, 401 on every endpoint but /health;
- a failure inside the batching loop (the probe fails a forward over a poisoned pair of tokens) fails that request
  alone, a 500 naming the cause, while the good requests of the same step get generate()'s tokens, and the next
  request is served;
- a stream the client closes stops generating: the model's forward steps, counted in the server's processes by a
  sitecustomize probe on the subprocess' PYTHONPATH (tests/serve_probe/), stop growing once it is closed.

The model's EOS is an id it cannot produce, so that a generation runs to its max_tokens."""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from benchmarks.harness import free_port, serving
from conftest import random_ids, tiny_model
from modeling_deepseek.compat import MLA_PAGED_CACHE, PAGED_CACHE_MIN_VERSION
from test_openai_server import SPECIALS, VOCAB, word_tokenizer

needs_serving = pytest.mark.skipif(not MLA_PAGED_CACHE,
                                   reason=f"the server runs on transformers >= {PAGED_CACHE_MIN_VERSION}")

REPO = Path(__file__).resolve().parent.parent
KEY = "sk-test-key"
CONTEXT = 2048  # the model
NO_EOS = VOCAB + 7  # outside the vocabulary: never generated
POISON = 99  # the probe fails a forward whose input ids hold this token id twice in a row


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("served")
    model = tiny_model(seed=0, bos_token_id=0, eos_token_id=NO_EOS, pad_token_id=2,
                       max_position_embeddings=CONTEXT).eval()
    model.generation_config.update(do_sample=False, bos_token_id=0, eos_token_id=NO_EOS, pad_token_id=2)
    model.save_pretrained(folder)
    tokenizer = word_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"  # the words, one after another
    tokenizer.save_pretrained(folder)
    forwards = folder / "forwards.log"
    forwards.touch()

    port = free_port()
    probe = str(Path(__file__).resolve().parent / "serve_probe")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([probe, str(REPO)]), "TOKENIZERS_PARALLELISM": "false",
           "DEEPSEEK_API_KEY": KEY, "DEEPSEEK_FORWARD_LOG": str(forwards),
           "DEEPSEEK_POISON_TOKEN": str(POISON)}
    cmd = [sys.executable, "-m", "modeling_deepseek.serve", str(folder), "--continuous-batching", "--host", "127.0.0.1",
           "--port", str(port), "--device", "cpu", "--cb-num-blocks", "48", "--cb-block-size", "64"]
    with serving(cmd, port, folder / "server.log", env, timeout=240):
        yield dict(folder=folder, url=f"http://127.0.0.1:{port}", model=model, forwards=forwards)


def call(server, path: str, body=None, key: str | None = KEY, raw: bytes | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(server["url"] + path, data=data, method="GET" if data is None else "POST",
                                     headers={"Content-Type": "application/json"})
    if key is not None:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def words(ids) -> str:
    return " ".join(f"w{i}" for i in ids)


def greedy(model, ids, n: int) -> list[int]:
    with torch.no_grad():
        return model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)[0, len(ids):].tolist()


@needs_serving
def test_each_bad_request_is_a_400_naming_its_field(server):
    model_id = str(server["folder"])
    good = {"model": model_id, "prompt": "w5 w6 w7", "max_tokens": 4, "temperature": 0}
    long_prompt = words([5] * (CONTEXT + 3))
    rows = [  # (what is changed, the param the error names, words the message must have)
        ({"prompt": None}, "prompt", ["prompt is required"]),
        ({"max_tokens": -5}, "max_tokens", [">= 1", "-5"]),
        ({"max_tokens": 0}, "max_tokens", [">= 1"]),
        ({"max_tokens": 2.5}, "max_tokens", ["integer"]),
        ({"temperature": -1}, "temperature", ["[0, 2]"]),
        ({"temperature": 2.5}, "temperature", ["[0, 2]"]),
        ({"top_p": 0}, "top_p", ["(0, 1]"]),
        ({"max_tokens": 3000}, "max_tokens", [f"maximum context length is {CONTEXT}", "3003 tokens"]),
        ({"max_tokens": 1_000_000_000}, "max_tokens", [f"{CONTEXT} tokens", "1000000003 tokens"]),
        ({"prompt": 42}, "prompt", ["string"]),
        ({"prompt": ["w5", "w6"]}, "prompt", ["array of prompts"]),
        ({"prompt": long_prompt}, "prompt", [f"{CONTEXT} tokens", f"has {CONTEXT + 3} tokens"]),
        ({"model": "no/such-model"}, None, ["no/such-model"]),
        ({"n": 2}, "n", ["not supported"]),
        ({"logprobs": 1}, "logprobs", ["not supported"]),
        ({"presence_penalty": 0.5}, "presence_penalty", ["not supported"]),
        ({"stop": ["w9"]}, "stop", ["continuous-batching"]),
        ({"stream_options": {"include_usage": True}}, "stream_options", ["stream is true"]),
        ({"frobnicate": 1}, "frobnicate", ["Unrecognized request argument supplied: frobnicate"]),
    ]
    start = time.monotonic()
    for change, param, phrases in rows:
        body = {name: value for name, value in {**good, **change}.items() if value is not None}
        status, answer = call(server, "/v1/completions", body)
        assert status == 400, (change, answer)
        error = answer["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
        if param is not None:
            assert error["param"] == param, (change, error)
        assert all(phrase in error["message"] for phrase in phrases), (change, error["message"])
    status, answer = call(server, "/v1/completions", raw=b'{"prompt": "w5",')  # malformed JSON
    assert status == 400 and "parse the JSON body" in answer["error"]["message"]

    chat = {"model": model_id, "messages": [{"role": "user", "content": "w5"}], "max_completion_tokens": 3}
    for change, param in [({"messages": []}, "messages"),
                          ({"messages": [{"role": "wizard", "content": "w5"}]}, "messages[0].role"),
                          ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
                           "messages[0].content[0].type"),
                          ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
                          ({"max_completion_tokens": -1}, "max_completion_tokens"),
                          ({"max_completion_tokens": 5000}, "max_completion_tokens"),
                          ({"logprobs": True}, "logprobs")]:
        status, answer = call(server, "/v1/chat/completions", {**chat, **change})
        assert status == 400 and answer["error"]["param"] == param, (change, answer)
    assert time.monotonic() - start < 30  # refused up front: none of them ran max_tokens of generation

    status, answer = call(server, "/v1/completions", good)  # the server serves on
    assert status == 200 and [int(w[1:]) for w in answer["choices"][0]["text"].split()] == greedy(
        server["model"], [5, 6, 7], 4)


@needs_serving
def test_empty_prompt_is_refused_and_the_next_request_is_served(server):
    model_id = str(server["folder"])
    status, answer = call(server, "/v1/completions", {"model": model_id, "prompt": "", "max_tokens": 4})
    assert status == 400 and answer["error"]["param"] == "prompt" and "no tokens" in answer["error"]["message"]
    ids = random_ids(1, 9, seed=3, vocab=VOCAB)[0].tolist()
    status, answer = call(server, "/v1/completions",
                          {"model": model_id, "prompt": words(ids), "max_tokens": 6, "temperature": 0})
    assert status == 200, answer
    assert [int(w[1:]) for w in answer["choices"][0]["text"].split()] == greedy(server["model"], ids, 6)
    assert answer["usage"]["prompt_tokens"] == 9 and answer["usage"]["completion_tokens"] == 6
    status, answer = call(server, "/health", key=None)
    assert status == 200 and answer["status"] == "ok"


@needs_serving
def test_a_failure_inside_the_batch_fails_its_request_alone(server):
    """A poisoned prompt joins a step where good requests decode: that step fails, its requests are retried alone,
    the poisoned one gets a 500 naming the cause, the good ones generate()'s tokens, and the next request is served."""
    from concurrent.futures import ThreadPoolExecutor

    model_id = str(server["folder"])
    before = server["forwards"].read_text().count("\n")

    def complete(prompt_ids, n):
        return call(server, "/v1/completions", {"model": model_id, "prompt": words(prompt_ids), "max_tokens": n,
                                                "temperature": 0})

    with ThreadPoolExecutor(3) as pool:
        long_ids, short_ids = [5, 6, 7], [8, 9, 10, 11]
        long_answer = pool.submit(complete, long_ids, 120)
        deadline = time.monotonic() + 60
        while server["forwards"].read_text().count("\n") < before + 3 and time.monotonic() < deadline:
            time.sleep(0.01)  # the long request is decoding
        poisoned = pool.submit(complete, [POISON, POISON, 5], 4)
        short_answer = pool.submit(complete, short_ids, 6)
        status, answer = poisoned.result()
        assert status == 500 and answer["error"]["type"] == "server_error", answer
        assert "poisoned token reached the model" in answer["error"]["message"] and "alone" in answer["error"][
            "message"]
        for (status, answer), ids, n in [(long_answer.result(), long_ids, 120), (short_answer.result(), short_ids, 6)]:
            assert status == 200 and answer["usage"]["completion_tokens"] == n, answer
            assert [int(w[1:]) for w in answer["choices"][0]["text"].split()] == [  # the text leaves out specials
                token for token in greedy(server["model"], ids, n) if token >= len(SPECIALS)]
    failures = [int(line.split()[1]) for line in server["forwards"].read_text().splitlines()[before:]
                if line.startswith("failed")]
    assert failures[0] > 1 and failures[-1] == 1, failures  # failed among others, then alone
    for _ in range(2):  # the worker goes on
        status, answer = complete([5, 6, 7], 4)
        assert status == 200 and [int(w[1:]) for w in answer["choices"][0]["text"].split()] == greedy(
            server["model"], [5, 6, 7], 4)
    assert call(server, "/health", key=None) == (200, {"status": "ok"})


@needs_serving
def test_api_key_guards_every_endpoint_but_health(server):
    from openai import AuthenticationError, BadRequestError, OpenAI

    assert call(server, "/health", key=None)[0] == 200
    for path, body in [("/v1/models", None), ("/v1/completions", {"prompt": "w5"}),
                       ("/v1/chat/completions", {"messages": []}), ("/v1/responses", {"input": "w5"})]:
        for key in (None, "wrong"):
            status, answer = call(server, path, body, key=key)
            assert status == 401 and answer["error"]["code"] == "invalid_api_key", (path, key, answer)
    status, answer = call(server, "/v1/models")
    assert status == 200 and answer["object"] == "list"

    base = server["url"] + "/v1"
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=base, api_key="wrong", max_retries=0).models.list()
    client = OpenAI(base_url=base, api_key=KEY, max_retries=0, timeout=60)
    with pytest.raises(BadRequestError) as refused:
        client.completions.create(model=str(server["folder"]), prompt="w5", max_tokens=-5)
    assert refused.value.body["param"] == "max_tokens"
    chat = client.chat.completions.create(model=str(server["folder"]), messages=[{"role": "user", "content": "w5"}],
                                          max_completion_tokens=3, temperature=0)
    assert chat.usage.completion_tokens == 3


@needs_serving
def test_a_closed_stream_stops_generating(server):
    from openai import OpenAI

    def forward_steps() -> int:
        return server["forwards"].read_text().count("\n")

    client = OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0, timeout=60)
    before = forward_steps()
    stream = client.completions.create(model=str(server["folder"]), prompt="w5 w6 w7", max_tokens=2000,
                                       temperature=0, stream=True)
    received = 0
    for chunk in stream:
        assert chunk.choices[0].finish_reason is None  # 2,000 tokens take seconds: far from done
        received += 1
        if received == 3:
            break
    stream.close()
    deadline = time.monotonic() + 10
    settled = forward_steps()
    while time.monotonic() < deadline:  # the steps stop growing once the cancel reached the batch
        time.sleep(1.0)
        now = forward_steps()
        if now == settled:
            break
        settled = now
    assert now == settled, "the closed stream is still generating"
    assert settled - before < 1000, f"{settled - before} steps: the request ran on after its stream was closed"
    status, answer = call(server, "/v1/completions",
                          {"model": str(server["folder"]), "prompt": "w8 w9", "max_tokens": 5, "temperature": 0})
    assert status == 200 and answer["usage"]["completion_tokens"] == 5


def test_sampling_is_refused_where_the_engine_would_not_apply_it():
    """serve_requests.check_for_engine, without a server: transformers' server samples only with do_sample=True in
    the model's generation config, and its continuous batching applies a request's temperature / top_p / greedy
    top_k only where that config built the processor."""
    from transformers import GenerationConfig

    from modeling_deepseek.serve_requests import RequestError, check_for_engine

    greedy_config = GenerationConfig(do_sample=False)
    sampling_config = GenerationConfig(do_sample=True, temperature=0.7, top_p=0.9, top_k=50)
    bare_sampling = GenerationConfig(do_sample=True, top_k=None, top_p=1.0, temperature=1.0)
    for body, config, batching, param in [
        ({"temperature": 0.8}, greedy_config, False, "temperature"),
        ({"top_p": 0.5}, greedy_config, True, "top_p"),
        ({"temperature": 0.8}, bare_sampling, True, "temperature"),
        ({"temperature": 0}, bare_sampling, True, "temperature"),
        ({"stop": "w1"}, sampling_config, True, "stop"),
        ({"generation_config": "{}"}, sampling_config, True, "generation_config"),
    ]:
        with pytest.raises(RequestError) as refused:
            check_for_engine(body, config, batching)
        assert refused.value.param == param, body
    for body, config, batching in [({"temperature": 0}, greedy_config, True), ({"temperature": 0.3, "top_p": 0.5},
                                   sampling_config, True), ({"temperature": 0.8}, bare_sampling, False),
                                   ({"stop": ["w1"]}, greedy_config, False), ({"temperature": 1}, bare_sampling, True)]:
        check_for_engine(body, config, batching)  # honoured: no error
