"""Shared fixtures and helpers for the modeling_deepseek test suite.

Everything runs in fp32 on CPU with tiny shapes: 3 decoder layers (layer 0 dense, layers 1-2 MoE), 8 routed experts in
2 groups, top-2, one shared expert, one MTP module at model.layers.3.
"""

from __future__ import annotations

import copy
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers
from torch import nn

import modeling_deepseek  # noqa: F401  (registers model_type "deepseek")
from modeling_deepseek import DeepseekConfig, DeepseekForCausalLM

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
# Tiny shapes: one intra-op thread is fastest, and immune to OpenMP spin contention when the 2 cores are busy.
torch.set_num_threads(1)

VOCAB = 128

TINY = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    q_lora_rank=32,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    n_group=2,
    topk_group=1,
    first_k_dense_replace=1,
    num_nextn_predict_layers=1,
    max_position_embeddings=256,
)

# transformers' DeepseekV3Config / DeepseekV2Config take the same field names (minus our MTP/training knobs).
# num_key_value_heads: DeepseekV3Config defaults it to 128, which breaks transformers' eager attention at 4 heads.
HF_TINY = dict({k: v for k, v in TINY.items() if k != "num_nextn_predict_layers"}, num_key_value_heads=4)

YARN = {
    "rope_type": "yarn",
    "factor": 4.0,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "original_max_position_embeddings": 64,
    "rope_theta": 10000.0,
}
YARN_V2 = dict(YARN, mscale=0.707, mscale_all_dim=0.707)


def tiny_kwargs(**overrides) -> dict:
    return {**TINY, **overrides}


def tiny_config(**overrides) -> DeepseekConfig:
    return DeepseekConfig(**tiny_kwargs(**overrides))


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial weights: N(0, 0.1) for weights, U(0.5, 1.5) for RMSNorm scales, N(0, 0.05) for the routing bias.

    Works on transformers' DeepSeek classes and ours (RMSNorms are found by class name, so both kinds are covered).
    """
    g = torch.Generator().manual_seed(seed)
    norm_params = set()
    for module_name, module in model.named_modules():
        if type(module).__name__.endswith("RMSNorm"):
            for pname, _ in module.named_parameters(recurse=False):
                norm_params.add(f"{module_name}.{pname}" if module_name else pname)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in norm_params:
                p.copy_(torch.empty(p.shape, dtype=torch.float32).uniform_(0.5, 1.5, generator=g).to(p.dtype))
            else:
                p.copy_(torch.empty(p.shape, dtype=torch.float32).normal_(0.0, 0.1, generator=g).to(p.dtype))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.empty(b.shape, dtype=torch.float32).normal_(0.0, 0.05, generator=g).to(b.dtype))
    return model


def tiny_model(seed: int = 0, train: bool = False, **overrides) -> DeepseekForCausalLM:
    torch.manual_seed(seed)
    model = randomize_(DeepseekForCausalLM(tiny_config(**overrides)), seed)
    return model.train(train)


def random_ids(batch: int, length: int, seed: int = 1, vocab: int = VOCAB) -> torch.Tensor:
    # Token ids 2.. so that no id equals bos (0) / eos (1).
    return torch.randint(2, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def hf_v3_model(seed: int = 0, **overrides):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    return randomize_(DeepseekV3ForCausalLM(DeepseekV3Config(**{**HF_TINY, **overrides})), seed).eval()


def hf_v2_model(seed: int = 0, **overrides):
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    torch.manual_seed(seed)
    return randomize_(DeepseekV2ForCausalLM(DeepseekV2Config(**{**HF_TINY, **overrides})), seed).eval()


def save_and_load_ours(hf_model, path: Path, **from_pretrained_kwargs) -> DeepseekForCausalLM:
    """transformers model -> save_pretrained(path) -> DeepseekForCausalLM.from_pretrained(path)."""
    hf_model.save_pretrained(path)
    return DeepseekForCausalLM.from_pretrained(path, **from_pretrained_kwargs).eval()


def set_mla_impl(model: nn.Module, impl: str) -> int:
    """Force every attention module's MLA path; returns how many modules were set."""
    n = 0
    for module in model.modules():
        if hasattr(module, "mla_impl"):
            module.mla_impl = impl
            n += 1
    assert n > 0
    return n


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def clone_model(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def routers(model: nn.Module) -> list[nn.Module]:
    """Routers carrying a balancing bias, in layer order (main layers then MTP)."""
    return [m for m in model.modules() if getattr(m, "e_score_correction_bias", None) is not None]


def record_bias_updates(local: list, reduced: list):
    """Wrap the balancing update (the 2-rank workers) to append each router's token count before the all-reduce to
    `local` and after it to `reduced`, one list per update. Returns the function that unwraps it."""
    from modeling_deepseek import balancing

    update, all_reduce = balancing.update_balancing_bias, balancing.dist.all_reduce

    def recording_all_reduce(tensor, *args, **kwargs):
        work = all_reduce(tensor, *args, **kwargs)
        reduced.append(tensor.sum(dim=-1).tolist())
        return work

    def counting_update(model):
        local.append([float(r.pending_load.sum()) for r in balancing.balancing_routers(model)])
        balancing.dist.all_reduce = recording_all_reduce
        try:
            return update(model)
        finally:
            balancing.dist.all_reduce = all_reduce

    balancing.update_balancing_bias = counting_update
    return lambda: setattr(balancing, "update_balancing_bias", update)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def model():
    """A randomised tiny model in eval mode."""
    return tiny_model()


@pytest.fixture
def hub_commits(monkeypatch):
    """The Hub API mocked offline for push_to_hub: returns the list of commits made, each as
    (repo_id, {path_in_repo: bytes}, other create_commit kwargs). create_repo answers with the repo id it is given
    (a bare name goes to the namespace "someone"), the remote has no model card yet, and any other Hub call or socket
    connection fails the test."""
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    def no_network(*args, **kwargs):
        raise AssertionError("network access during push_to_hub")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)

    commits = []

    def create_repo(self, repo_id, **kwargs):
        return SimpleNamespace(repo_id=repo_id if "/" in repo_id else f"someone/{repo_id}")

    def create_commit(self, repo_id, operations, **kwargs):
        uploaded = {}
        for op in operations:
            src = op.path_or_fileobj
            uploaded[op.path_in_repo] = Path(src).read_bytes() if isinstance(src, (str, Path)) else src.read()
        commits.append((repo_id, uploaded, kwargs))
        return f"https://huggingface.co/{repo_id}/commit/{len(commits) - 1}"

    def card_not_found(*args, **kwargs):
        raise EntryNotFoundError("no README.md yet")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
    for forbidden in ("upload_folder", "upload_file", "create_branch", "preupload_lfs_files"):
        monkeypatch.setattr(huggingface_hub.HfApi, forbidden, no_network)
    monkeypatch.setattr(huggingface_hub.ModelCard, "load", classmethod(card_not_found))
    return commits


def eager_and_compiled_static_decode(model, make_cache, ids: torch.Tensor, prefill: int):
    """Logits of a prefill of `prefill` tokens then one decode step per remaining token of `ids`, through a static
    cache from `make_cache(model)`, for `model` and for a deep copy whose forward is compiled whole (fullgraph):
    ({"eager": logits, "compiled": logits}, the compile counter, the compiled run's cache)."""
    import copy

    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("eager")
    torch._dynamo.reset()
    compiled = copy.deepcopy(model)
    compiled.forward = torch.compile(compiled.forward, fullgraph=True, backend=counter)
    B, T = ids.shape
    logits = {}
    with torch.no_grad():
        for name, m in (("eager", model), ("compiled", compiled)):
            cache = make_cache(model)
            cache.early_initialization(B, torch.float32, "cpu")
            steps = [m(ids[:, :prefill], cache=cache, use_cache=True).logits]
            for t in range(prefill, T):
                steps.append(m(ids[:, t:t + 1], cache=cache, use_cache=True,
                               position_ids=torch.full((B, 1), t)).logits)
            logits[name] = torch.cat(steps, dim=1)
    torch._dynamo.reset()
    return logits, counter, cache
