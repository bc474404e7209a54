"""Serve a DeepSeek checkpoint of ours through transformers' OpenAI-compatible server (`transformers serve`).

    python -m modeling_deepseek.serve PATH [--continuous-batching] [--port 8000] [--host localhost] [--device cpu]
                                      [--api-key KEY]                       (or the DEEPSEEK_API_KEY variable)
    make serve                                                   (the `make demo` model, from .venv-latest)

takes every option of `transformers serve` (see `--help`: --cb-num-blocks, --cb-max-batch-tokens, --dtype,
--max-model-len, ...). With --continuous-batching, requests join one running batch as they arrive, over the paged
latent cache (continuous_batching.py); without it, each request runs `generate()`. Endpoints: /v1/chat/completions,
/v1/completions, /v1/models, /health.

What it adds to transformers' server, for a server on a network (serve_app.py): each completion request is checked
as OpenAI's API defines it before it reaches the model (serve_requests.py: types, ranges, the context, fields the
server cannot honour), errors are OpenAI's error objects, and with an API key every endpoint but /health answers 401
without `Authorization: Bearer KEY`. A client that leaves stops its request (transformers cancels it in the batch).

`transformers serve PATH` itself refuses our folders: it looks the model class up among transformers' own
(compat.transformers_serve). Needs fastapi, uvicorn and openai (the `serve` extra) and transformers >= 5.25; nothing
here is imported by `import modeling_deepseek`.
"""

from __future__ import annotations

import inspect

from .compat import exposed_in_transformers, serve_cli_class, serve_model_loader_base
from .modeling import DeepseekForCausalLM, DeepseekModel


class DeepseekModelLoader(serve_model_loader_base()):
    """transformers serve's model loader, which also knows our classes (by the names config.json gives them)."""

    def _load_model(self, *args, **kwargs):
        with exposed_in_transformers(DeepseekForCausalLM, DeepseekModel):
            return super()._load_model(*args, **kwargs)


def api_key_option() -> inspect.Parameter:
    from typing import Annotated

    import typer

    from .serve_app import API_KEY_ENV

    help_text = ("Require `Authorization: Bearer KEY` on every endpoint but /health (401 without it). Read from "
                 f"${API_KEY_ENV} when not given.")
    return inspect.Parameter("api_key", inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[str | None, typer.Option(help=help_text, envvar=API_KEY_ENV)])


def main(argv: list[str] | None = None) -> None:
    import typer

    from .serve_app import customize

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command(help="Serve a DeepSeek checkpoint (ours) with transformers' OpenAI-compatible server.")(
        serve_cli_class(DeepseekModelLoader, customize_app=customize, extra_options=[api_key_option()]))
    app(args=argv, prog_name="python -m modeling_deepseek.serve")


if __name__ == "__main__":
    main()
