"""What serve.py adds to transformers' FastAPI app: an API key, OpenAI's error objects, and the request checks.

- `ApiKey`: with --api-key (or DEEPSEEK_API_KEY), every request but GET /health must carry `Authorization: Bearer
  KEY`, else 401, before anything else runs. A plain ASGI middleware, outermost, so streamed answers pass it untouched.
- `openai_errors`: every error answer is OpenAI's error object {"error": {"message", "type", "param", "code"}} --
  transformers' own answer `{"detail": ...}` for its 400s and 422s, plain text for a 500. A request's fault is a 4xx;
  anything else a 500 whose message names the cause.
- `checked(handler, endpoint)`: transformers' /v1/completions and /v1/chat/completions handlers, their class swapped
  for a subclass that checks each request with serve_requests.py: the body against the endpoint's table before
  anything else, then, with the model's engine and the tokenized prompt in hand and before the request is sent to
  the model, the context and what the engine can apply (the hooks are listed in compat.SERVING_HANDLER_HOOKS).
"""

from __future__ import annotations

import contextvars
import hmac

from .compat import serving_handlers
from .serve_requests import (
    FIELDS, RequestError, check_context, check_for_engine, check_request, error_body,
    requested_max_tokens,
)

API_KEY_ENV = "DEEPSEEK_API_KEY"
OPEN_PATHS = ("/health",)  # what a load balancer probes: answered without the key

# The request being handled, from _build_generation_kwargs to _check_prompt_length (the same asyncio task, which
# gives each request its own value): its body, and the generation settings the handler built from it.
_REQUEST = contextvars.ContextVar("deepseek_serve_request")


class ApiKey:
    """ASGI middleware: 401 (OpenAI's error object) for an HTTP request without `Authorization: Bearer <key>`."""

    def __init__(self, app, key: str):
        if not key:
            raise ValueError("--api-key must not be empty")
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send):
        # A browser's CORS preflight (OPTIONS, with --enable-cors) carries no credentials: the request it precedes does
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or scope["method"] == "OPTIONS":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(given, self.expected):  # in constant time: the key cannot be guessed byte by byte
            return await self.app(scope, receive, send)
        from fastapi.responses import JSONResponse

        message = ("Incorrect API key provided" if given else
                   "You didn't provide an API key: send it as `Authorization: Bearer KEY`")
        answer = JSONResponse(error_body(message, "invalid_request_error", code="invalid_api_key"), status_code=401,
                              headers={"WWW-Authenticate": "Bearer"})
        await answer(scope, receive, send)


def openai_errors(app) -> None:
    """Answer every error with OpenAI's error object (the handlers replace transformers' own)."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    EngineDeadError = serving_handlers()[3]

    def answer(status: int, message: str, type: str, param=None, code=None):
        return JSONResponse(error_body(message, type, param, code), status_code=status)

    async def request_error(_request, exc: RequestError):
        return JSONResponse(exc.body(), status_code=exc.status)

    async def value_error(_request, exc: ValueError):  # transformers': the request's fault (an unknown model, ...)
        return answer(400, str(exc), "invalid_request_error")

    async def http_error(_request, exc: HTTPException):
        return answer(exc.status_code, str(exc.detail), "invalid_request_error" if exc.status_code < 500 else
                      "server_error")

    async def unparsable(_request, exc: RequestValidationError):  # malformed JSON, or not an object
        problems = "; ".join(str(error.get("msg", error)) for error in exc.errors()) or "invalid body"
        return answer(400, f"We could not parse the JSON body of your request: {problems}", "invalid_request_error")

    async def engine_dead(_request, exc: Exception):
        return answer(503, str(exc), "server_error")

    async def failure(_request, exc: Exception):  # not the request's fault: say what failed
        return answer(500, f"{type(exc).__name__}: {exc}", "server_error")

    for kind, handler in ((RequestError, request_error), (ValueError, value_error), (HTTPException, http_error),
                          (RequestValidationError, unparsable), (EngineDeadError, engine_dead),
                          (Exception, failure)):
        app.add_exception_handler(kind, handler)


class CheckedRequests:
    """Mixed in before transformers' handler class: the request checks of serve_requests.py at its hooks."""

    endpoint: str
    prompt_param: str

    def _validate_request(self, body: dict) -> None:
        check_request(self.endpoint, body)
        for name, field in FIELDS[self.endpoint].items():  # at their no-op values: transformers need not see them
            if field.honoured is not None and name in body:
                del body[name]

    def _build_generation_kwargs(self, body: dict, model_generation_config):
        generation_kwargs = super()._build_generation_kwargs(body, model_generation_config)
        _REQUEST.set((body, generation_kwargs))
        return generation_kwargs

    def _check_prompt_length(self, engine, inputs: dict) -> None:
        body, generation_kwargs = _REQUEST.get()
        check_for_engine(body, engine.generation_config, engine.use_cb)
        max_param, max_tokens = requested_max_tokens(body)
        prompt_tokens = PROMPT_LENGTH(inputs)
        context = self.generation_state.context_length(engine.model_config)
        check_context(prompt_tokens, max_tokens, context, prompt_param=self.prompt_param, max_param=max_param)
        if max_tokens is None and context is not None:  # the default, cut to what the context has room for (vLLM)
            generation_kwargs["max_new_tokens"] = min(generation_kwargs["max_new_tokens"], context - prompt_tokens)


CompletionHandler, ChatCompletionHandler, PROMPT_LENGTH, _ = serving_handlers()


class CheckedCompletionHandler(CheckedRequests, CompletionHandler):
    endpoint, prompt_param = "/v1/completions", "prompt"


class CheckedChatCompletionHandler(CheckedRequests, ChatCompletionHandler):
    endpoint, prompt_param = "/v1/chat/completions", "messages"


def customize(serve, app, model_manager, chat_handler, completion_handler) -> None:
    """compat.serve_cli_class's hook: `serve` (the command, with its api_key) and the app it is about to serve."""
    chat_handler.__class__ = CheckedChatCompletionHandler  # the app's routes call these very objects
    completion_handler.__class__ = CheckedCompletionHandler
    openai_errors(app)
    if getattr(serve, "api_key", None):
        app.add_middleware(ApiKey, key=serve.api_key)

