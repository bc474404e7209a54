"""What the OpenAI-compatible server (serve.py) accepts: the fields of /v1/completions and /v1/chat/completions, checked
as OpenAI's API reference defines them, before a request goes anywhere near the batch.

transformers' server takes OpenAI's request types as they come: it converts what it uses with int() / float() and
leaves the rest, so `max_tokens: -5` answers empty text, `temperature: -1` answers text, a request without
`prompt` generates from nothing, and `n`, `logprobs` or `presence_penalty` are dropped with a log line. Here every
field a request may carry is a row of one table per endpoint (COMPLETION_FIELDS, CHAT_FIELDS), which says

- its type and range, OpenAI's (`max_tokens` an integer >= 1, `temperature` 0..2, `top_p` in (0, 1], ...): a value
  outside them is a 400 naming the field and what it takes;
- which values this server can honour, when fewer than OpenAI allows (`n` 1, `echo` false, no `logprobs`): any other
  is a 400 saying the server does not support it. `null` is always the field's default.

A field in neither table is a 400 naming it ("Unrecognized request argument supplied", OpenAI's words). Some limits
depend on the served model, and are checked once its engine is known (`check_for_engine`): the context
(max_position_embeddings, or --max-model-len) against the prompt's tokens plus max_tokens -- a 400 naming both
numbers, in vLLM's words, with max_tokens left out defaulting to what the context has room for --, a prompt that
tokenizes to nothing, and the settings transformers' continuous-batching engine cannot apply per request (stop
strings, a `generation_config`, sampling the model's generation config did not set up).

Errors are OpenAI's error object (`RequestError.body()`): {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable


class RequestError(ValueError):
    """A request the server refuses, with OpenAI's error object as its answer."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.type, self.code = message, param, status, type, code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ---------------------------------------------------------------------------------------------------------------------
# Value checks: each takes the field's name and value (never None: null is the default) and raises RequestError.


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not 1


def integer(low: int | None = None, high: int | None = None) -> Callable[[str, Any], None]:
    bounds = "" if low is None else f" from {low} to {high}" if high is not None else f" >= {low}"

    def check(name, value):
        if not _is_int(value) or (low is not None and value < low) or (high is not None and value > high):
            raise RequestError(f"{name} must be an integer{bounds}, got {value!r}", name)
    return check


def number(low: float, high: float, low_open: bool = False) -> Callable[[str, Any], None]:
    def check(name, value):
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
              and (value > low if low_open else value >= low) and value <= high)
        if not ok:
            raise RequestError(f"{name} must be a number in {'(' if low_open else '['}{low}, {high}], got {value!r}",
                               name)
    return check


def of_type(kind: type, label: str) -> Callable[[str, Any], None]:
    def check(name, value):
        if not isinstance(value, kind):
            raise RequestError(f"{name} must be {label}, got {value!r}", name)
    return check


string, boolean, obj, array = (of_type(str, "a string"), of_type(bool, "a boolean"), of_type(dict, "an object"),
                               of_type(list, "an array"))


def stop(name, value):
    """OpenAI: a string or an array of up to 4 strings."""
    if isinstance(value, str):
        return
    if not (isinstance(value, list) and 1 <= len(value) <= 4 and all(isinstance(s, str) and s for s in value)):
        raise RequestError(f"{name} must be a string or an array of 1 to 4 non-empty strings, got {value!r}", name)


def prompt(name, value):
    if isinstance(value, list):  # OpenAI also takes arrays of strings or of token ids: one answer per prompt
        raise RequestError(f"{name}: an array of prompts (or of token ids) is not supported by this server; send one "
                           "string", name)
    string(name, value)


def stream_options(name, value):
    obj(name, value)
    unknown = sorted(set(value) - {"include_usage"})
    if unknown:
        raise RequestError(f"{name}.{unknown[0]} is not supported (only include_usage)", f"{name}.{unknown[0]}")
    if value.get("include_usage") is not None:
        boolean(f"{name}.include_usage", value["include_usage"])


ROLES = ("system", "developer", "user", "assistant", "tool")
MESSAGE_KEYS = {"role", "content", "name", "tool_calls", "tool_call_id"}


def messages(name, value):
    """Chat messages: a non-empty array of {role, content, ...}; content a string or an array of text parts (this
    server serves text models: image, audio and file parts are refused)."""
    if not isinstance(value, list) or not value:
        raise RequestError(f"{name} must be a non-empty array of messages", name)
    for i, message in enumerate(value):
        where = f"{name}[{i}]"
        obj(where, message)
        unknown = sorted(set(message) - MESSAGE_KEYS)
        if unknown:
            raise RequestError(f"{where}.{unknown[0]} is not supported (a message takes {sorted(MESSAGE_KEYS)})",
                               f"{where}.{unknown[0]}")
        role = message.get("role")
        if role not in ROLES:
            raise RequestError(f"{where}.role must be one of {list(ROLES)}, got {role!r}", f"{where}.role")
        content = message.get("content")
        if content is None:
            if role == "assistant" and message.get("tool_calls"):
                continue
            raise RequestError(f"{where}.content is required for a {role} message", f"{where}.content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                part_name = f"{where}.content[{j}]"
                obj(part_name, part)
                if part.get("type") != "text":
                    raise RequestError(f"{part_name}.type {part.get('type')!r} is not supported: this server serves "
                                       "a text model (content parts of type 'text' only)", f"{part_name}.type")
                string(f"{part_name}.text", part.get("text"))
        else:
            string(f"{where}.content", content)
        if message.get("name") is not None:
            string(f"{where}.name", message["name"])
        if role == "tool":
            string(f"{where}.tool_call_id", message.get("tool_call_id"))


# ---------------------------------------------------------------------------------------------------------------------
# The tables


ANY = None  # every value OpenAI allows is honoured


@dataclass(frozen=True)
class Field:
    check: Callable[[str, Any], None]  # OpenAI's type and range
    honoured: tuple | None = ANY  # the values this server can honour, when fewer than OpenAI allows
    required: bool = False


def unsupported(check: Callable[[str, Any], None], *neutral) -> Field:
    """A field this server takes only at its no-op value(s) (and null)."""
    return Field(check, honoured=neutral)


SHARED_FIELDS = {
    "model": Field(string),
    "temperature": Field(number(0, 2)),
    "top_p": Field(number(0, 1, low_open=True)),
    "seed": Field(integer()),
    "stop": Field(stop),  # not with continuous batching: see check_for_engine
    "stream": Field(boolean),
    "stream_options": Field(stream_options),
    "user": Field(string),  # an end-user id, for the operator's logs: it changes no answer
    "n": unsupported(integer(1, 128), 1),
    "frequency_penalty": unsupported(number(-2, 2), 0),
    "presence_penalty": unsupported(number(-2, 2), 0),
    "logit_bias": unsupported(obj, {}),
    "generation_config": Field(string),  # transformers' own: a JSON of generation settings (not with batching)
}
COMPLETION_FIELDS = {
    **SHARED_FIELDS,
    "prompt": Field(prompt, required=True),
    "max_tokens": Field(integer(1)),
    "suffix": Field(string),
    "echo": unsupported(boolean, False),
    "best_of": unsupported(integer(0, 20), 1),
    "logprobs": unsupported(integer(0, 5)),
}
CHAT_FIELDS = {
    **SHARED_FIELDS,
    "messages": Field(messages, required=True),
    "max_tokens": Field(integer(1)),  # deprecated by OpenAI for max_completion_tokens; both are honoured
    "max_completion_tokens": Field(integer(1)),
    "tools": Field(array),  # through the model's chat template
    "tool_choice": unsupported(lambda name, value: None, "auto"),
    "parallel_tool_calls": unsupported(boolean, True),
    "chat_template_kwargs": Field(obj),  # transformers' own
    "logprobs": unsupported(boolean, False),
    "top_logprobs": unsupported(integer(0, 20)),
    "response_format": unsupported(obj, {"type": "text"}),
    "store": unsupported(boolean, False),
    **{name: unsupported(lambda name, value: None) for name in (
        "audio", "function_call", "functions", "metadata", "modalities", "prediction", "reasoning_effort",
        "service_tier", "web_search_options")},
}
FIELDS = {"/v1/completions": COMPLETION_FIELDS, "/v1/chat/completions": CHAT_FIELDS}


def check_request(endpoint: str, body) -> None:
    """Every field of a request `body` to `endpoint`, against that endpoint's table (the engine-independent rules)."""
    if not isinstance(body, dict):
        raise RequestError("The request body must be a JSON object")
    fields = FIELDS[endpoint]
    unknown = sorted(set(body) - set(fields))
    if unknown:
        raise RequestError(f"Unrecognized request argument supplied: {unknown[0]}", unknown[0])
    for name, field in fields.items():
        value = body.get(name)
        if value is None:
            if field.required:
                raise RequestError(f"{name} is required", name)
            continue
        field.check(name, value)
        if field.honoured is not None and value not in field.honoured:
            takes = " or ".join(repr(v) for v in field.honoured) if field.honoured else "nothing but null"
            raise RequestError(f"{name}={value!r} is not supported by this server (it takes {takes})", name)
    if body.get("stream_options") is not None and not body.get("stream"):
        raise RequestError("stream_options can only be set when stream is true", "stream_options")


# ---------------------------------------------------------------------------------------------------------------------
# Once the model is known


def requested_max_tokens(body: dict) -> tuple[str, int | None]:
    """The field that sets the answer's length in `body`, and its value (None: not set)."""
    for name in ("max_completion_tokens", "max_tokens"):
        if body.get(name) is not None:
            return name, body[name]
    return "max_tokens", None


def check_context(prompt_tokens: int, max_tokens: int | None, context: int | None, *, prompt_param: str,
                  max_param: str) -> int | None:
    """Refuse a request whose prompt and answer cannot fit the model's `context` (in tokens). Returns the answer
    length a request that sets none gets: what the context has room for, at most `max_tokens`' default, which the
    caller passes as `max_tokens` then (None when unbounded)."""
    if prompt_tokens == 0:
        raise RequestError(f"The {prompt_param} tokenizes to no tokens: there is nothing to generate from (the model's "
                           "tokenizer adds no BOS token)", prompt_param)
    if context is None:
        return max_tokens
    if prompt_tokens >= context:
        raise RequestError(f"This model's maximum context length is {context} tokens. However, your {prompt_param} "
                           f"has {prompt_tokens} tokens, which leaves no room for a completion. Please reduce the "
                           f"length of the {prompt_param}.", prompt_param, code="context_length_exceeded")
    if max_tokens is not None and prompt_tokens + max_tokens > context:
        raise RequestError(f"This model's maximum context length is {context} tokens. However, you requested "
                           f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the {prompt_param}, {max_tokens} "
                           f"in the completion). Please reduce the length of the {prompt_param} or completion.",
                           max_param, code="context_length_exceeded")
    return max_tokens


def check_for_engine(body: dict, generation_config, continuous_batching: bool) -> None:
    """Refuse what the served model's engine would leave out. Sampling is the model's: transformers' server samples
    only when the model's generation config has do_sample=True, and its continuous batching applies a request's
    temperature / top_p only where the generation config built that logits processor (a value other than 1)."""
    if continuous_batching:
        for name in ("stop", "generation_config"):
            if body.get(name) is not None:
                raise RequestError(f"{name} is not supported by this server with --continuous-batching (transformers' "
                                   "engine applies no stop strings or generation settings per request)", name)
    temperature, top_p = body.get("temperature"), body.get("top_p")
    samples = bool(getattr(generation_config, "do_sample", False))
    greedy_asked = temperature == 0
    if not samples:
        if temperature not in (None, 0):
            raise RequestError(f"temperature={temperature!r} is not supported: this model generates greedily (its "
                               "generation config has do_sample=false); send temperature 0 or none", "temperature")
        if top_p not in (None, 1):
            raise RequestError(f"top_p={top_p!r} is not supported: this model generates greedily (its generation "
                               "config has do_sample=false)", "top_p")
        return
    if not continuous_batching:
        return
    built = {name: getattr(generation_config, name, None) not in (None, neutral)
             for name, neutral in (("temperature", 1.0), ("top_p", 1.0), ("top_k", 0))}
    if greedy_asked and not built["top_k"]:
        raise RequestError("temperature=0 is not supported by this server with --continuous-batching: the model's "
                           "generation config sets no top_k, which greedy decoding goes through", "temperature")
    for name, value in (("temperature", temperature), ("top_p", top_p)):
        if value not in (None, 1) and not (name == "temperature" and greedy_asked) and not built[name]:
            raise RequestError(f"{name}={value!r} is not supported by this server with --continuous-batching: the "
                               f"model's generation config sets no {name}, so transformers' engine has no per-request "
                               f"{name}", name)
