"""Serve a DeepSeek checkpoint of ours through transformers' OpenAI-compatible server (`transformers serve`).

    python -m modeling_deepseek.serve PATH [--continuous-batching] [--port 8000] [--host localhost] [--device cpu]

takes every option of `transformers serve` (see `--help`: --cb-num-blocks, --cb-max-batch-tokens, --dtype, ...).
With --continuous-batching, requests join one running batch as they arrive, over the paged latent cache
(continuous_batching.py); without it, each request runs `generate()`. Endpoints: /v1/chat/completions, /v1/completions, /v1/models, /health.

`transformers serve PATH` itself refuses our folders: it looks the model class up among transformers' own
(compat.transformers_serve). Needs fastapi, uvicorn and openai (the `serve` extra); nothing here is imported by
`import modeling_deepseek`.
"""

from __future__ import annotations

from .compat import exposed_in_transformers, serve_cli_class, serve_model_loader_base
from .modeling import DeepseekForCausalLM, DeepseekModel


class DeepseekModelLoader(serve_model_loader_base()):
    """transformers serve's model loader, which also knows our classes (by the names config.json gives them)."""

    def _load_model(self, *args, **kwargs):
        with exposed_in_transformers(DeepseekForCausalLM, DeepseekModel):
            return super()._load_model(*args, **kwargs)


def main(argv: list[str] | None = None) -> None:
    import typer

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command(help="Serve a DeepSeek checkpoint (ours) with transformers' OpenAI-compatible server.")(
        serve_cli_class(DeepseekModelLoader))
    app(args=argv, prog_name="python -m modeling_deepseek.serve")


if __name__ == "__main__":
    main()
