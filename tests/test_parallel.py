"""Tensor, expert and FSDP parallelism through transformers' own distributed engine, on 2 CPU ranks (torchrun + gloo).

One torchrun launch (tests/_parallel_worker.py) loads the tiny model with `from_pretrained(...,
distributed_config=DistributedConfig(...))` for every layout below and compares it with the same checkpoint loaded
in one process: logits, the loss and its parts (MTP and balance included), input and parameter gradients, greedy
tokens, and for tensor parallelism the absorbed and expanded decode, chunked prefill and MTP speculative decoding.
The layouts (plans in configuration.py and modeling.py):

    tp              DistributedConfig(tp_size=2)                              heads, MLPs, vocab split
    ep              DistributedConfig(tp_size=2, tp_plan={}, ep_size=2)       experts split (all_reduce at inference)
    ep_all_to_all   ... ep_implementation="all_to_all"                        tokens exchanged
    tp_ep           DistributedConfig(tp_size=2, ep_size=2)                   both
    fsdp            DistributedConfig(fsdp_size=2)                            FSDP2, one unit per decoder layer
    fsdp_ep         DistributedConfig(fsdp_size=2, ep_size=2)                 experts split, the rest FSDP
    ep_eager        ep with experts_implementation="eager" (the per-expert loop skips other ranks' experts)
    tp_q_proj       tp on the full-rank query projection (q_lora_rank=None, V2-Lite's q_proj)

The last section mirrors transformers' TensorParallelTesterMixin (its tests/test_tensor_parallel_mixin.py) case by
case against our classes, with its shapes and tolerances, except its quantized generation (torchao's
Float8WeightOnlyConfig, not a quantization this package loads: see quantized.py).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers.distributed import DistributedConfig

from benchmarks.harness import free_port
from conftest import tiny_config, tiny_model
from modeling_deepseek import DeepseekForCausalLM
from modeling_deepseek.ledger import parallel_bytes
from modeling_deepseek.parallel import EMPTY_TP_PLAN_RELEASE, engine_takes_empty_tp_plan

REPO = Path(__file__).resolve().parent.parent
WORKER = REPO / "tests" / "_parallel_worker.py"
TORCHRUN = Path(sys.executable).with_name("torchrun")
TIMEOUT_S = 300
ATOL = 1e-5

pytestmark = pytest.mark.skipif(
    not (TORCHRUN.exists() and torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs torchrun next to the interpreter and torch.distributed with gloo",
)

EP_ALONE = ("ep", "ep_all_to_all", "ep_eager", "mixin_ep", "mixin_ep_tied")  # tp_plan={} with tp_size=2
LAYOUTS = ("tp", "ep", "ep_all_to_all", "tp_ep", "fsdp", "fsdp_ep", "ep_eager", "tp_q_proj")
MIXIN = ("mixin_tp", "mixin_tp_tied", "mixin_ep", "mixin_ep_tied")
needs_empty_tp_plan = pytest.mark.skipif(
    not engine_takes_empty_tp_plan(),
    reason=f"expert parallelism alone (tp_plan={{}}) needs transformers >= {EMPTY_TP_PLAN_RELEASE}; this engine "
           "refuses an empty tp_plan (test_ep_alone_on_an_older_engine_raises checks the error)")




def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def start_torchrun(worker: Path, *args: str) -> subprocess.Popen:
    """2 ranks of `worker` in their own process group (a hang kills torchrun and both ranks)."""
    cmd = [str(TORCHRUN), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           str(worker), *args]
    return subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen, errors_in: Path, timeout_s: int = TIMEOUT_S) -> None:
    """Wait for the launch; on a timeout or a failure, raise with the ranks' tracebacks (errors_in/*.error.txt)."""
    try:
        log, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        raise AssertionError(f"{proc.args[4:6]} timed out after {timeout_s}s\n{log[-4000:]}")
    if proc.returncode != 0:
        errors = "\n".join(p.read_text() for p in sorted(errors_in.glob("*.error.txt")))
        raise AssertionError(f"{proc.args[4:6]} exited with {proc.returncode}\n{errors or log[-4000:]}")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Both ranks' measurements, {layout: {...}}, from one launch over every layout this transformers can build."""
    root = tmp_path_factory.mktemp("parallel")
    ckpts, out = root / "ckpts", root / "out"
    out.mkdir()
    tiny_model(seed=0).save_pretrained(ckpts / "plain")
    tiny_model(seed=0, tie_word_embeddings=True).save_pretrained(ckpts / "tied")
    tiny_model(seed=0, q_lora_rank=None).save_pretrained(ckpts / "q_proj")
    names = [n for n in (*LAYOUTS, *MIXIN) if engine_takes_empty_tp_plan() or n not in EP_ALONE]
    finish(start_torchrun(WORKER, str(out), str(ckpts), *names), out)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def layout_param(name: str):
    return pytest.param(name, marks=needs_empty_tp_plan) if name in EP_ALONE else name


def each_rank(ranks, layout):
    records = [r[layout] for r in ranks]
    assert [r["rank"] for r in records] == [0, 1]
    return records


def assert_grads_match(grad_diffs: dict, what: str) -> None:
    assert grad_diffs, what
    missing = [n for n, d in grad_diffs.items() if d == float("inf")]
    assert not missing, f"{what}: gradient on one side only: {missing}"
    worst = max((d, n) for n, d in grad_diffs.items() if d is not None)
    assert worst[0] <= ATOL, f"{what}: {worst}"
    # every parameter the loss reaches has a gradient (the MTP module and every expert included)
    assert sum(d is not None for d in grad_diffs.values()) >= len(grad_diffs) - 1


# ---------------------------------------------------------------------------------------------------------------------
# Every layout against one process
@pytest.mark.parametrize("layout", [layout_param(n) for n in LAYOUTS])
def test_layout_matches_one_process(ranks, layout):
    for rec in each_rank(ranks, layout):
        assert rec["logits_diff"] <= ATOL
        for part in ("loss", "main_loss", "mtp_loss", "balance_loss"):
            assert rec[f"{part}_diff"] <= ATOL, (part, rec[f"{part}_diff"])
        assert rec["input_grad_diff"] <= ATOL
        assert_grads_match(rec["grad_diffs"], f"{layout} rank {rec['rank']}")
        assert rec["greedy"]["tokens_equal"] and rec["greedy"]["scores_diff"] <= ATOL
    assert ranks[0][layout]["greedy"]["tokens"] == ranks[1][layout]["greedy"]["tokens"]


def _split(name: str, layout: str) -> bool:
    """Whether `layout` splits parameter `name` across the 2 ranks (from the plans)."""
    tp = layout in ("tp", "tp_ep", "tp_q_proj")
    ep = layout in ("ep", "ep_all_to_all", "tp_ep", "fsdp_ep", "ep_eager")
    if ep and ".mlp.experts." in name:
        return True
    if tp and re.search(r"self_attn\.(q_proj|q_b_proj|kv_b_proj|o_proj)\.|mlp\.(shared_experts\.)?"
                        r"(gate_proj|up_proj|down_proj)\.|embed_tokens\.|lm_head\.", name):
        return True
    return False


@pytest.mark.parametrize("layout", [layout_param(n) for n in LAYOUTS])
def test_each_rank_holds_its_share(ranks, layout):
    r0, r1 = each_rank(ranks, layout)
    full = r0["full_numel"]
    assert r0["local_numel"].keys() == full.keys()
    for name, numel in full.items():
        local0, local1 = r0["local_numel"][name], r1["local_numel"][name]
        if layout.startswith("fsdp") and not (layout == "fsdp_ep" and ".mlp.experts." in name):
            # FSDP2 shards every parameter on dim 0 over the 2 ranks
            assert local0 + local1 == numel and min(local0, local1) > 0, (name, local0, local1, numel)
        elif _split(name, layout):
            assert local0 == local1 == numel // 2, (name, local0, local1, numel)
        else:  # replicated: the latent projection, q_a_proj, norms, routers, eh_proj; experts under tp alone
            assert local0 == local1 == numel, (name, local0, numel)
    for rec in (r0, r1):
        assert rec["local_bytes"] < rec["full_bytes"]
    if layout.startswith("fsdp"):
        assert r0["local_bytes"] + r1["local_bytes"] == r0["full_bytes"]
    # the ledger's bytes per rank, computed from the plans on a meta-device model, are what the engine holds
    sizes = {"tp": dict(tp_size=2), "ep": dict(tp_size=2, ep_size=2, split_heads=False),
             "ep_all_to_all": dict(tp_size=2, ep_size=2, split_heads=False), "tp_ep": dict(tp_size=2, ep_size=2),
             "fsdp": dict(fsdp_size=2), "fsdp_ep": dict(fsdp_size=2, ep_size=2),
             "ep_eager": dict(tp_size=2, ep_size=2, split_heads=False), "tp_q_proj": dict(tp_size=2)}[layout]
    config = tiny_config(q_lora_rank=None) if layout.endswith("q_proj") else tiny_config()
    predicted = parallel_bytes(config, weight_bytes=4, **sizes)
    assert predicted["weight_bytes_total"] == r0["full_bytes"]
    assert predicted["weight_bytes_per_rank"] == (r0["local_bytes"] + r1["local_bytes"]) / 2


# ---------------------------------------------------------------------------------------------------------------------
# MLA under tensor parallelism: each rank decodes its own heads over the whole latent cache
@pytest.mark.parametrize("layout", ["tp", "tp_ep", "tp_q_proj"])
def test_tensor_parallel_decode_paths(ranks, layout):
    for rec in each_rank(ranks, layout):
        greedy = rec["greedy"]["tokens"]
        for impl in ("absorbed", "expanded"):
            run = rec[f"greedy_{impl}"]
            assert run["tokens_equal"] and run["scores_diff"] <= ATOL and run["tokens"] == greedy, impl
        chunked = rec["greedy_chunked"]  # a 14-token prompt prefilled 4 tokens at a time
        assert chunked["tokens_equal"] and chunked["scores_diff"] <= ATOL and chunked["equals_unchunked"]
        spec = rec["mtp_speculative"]
        assert spec["tokens_equal"] and spec["drafted"] > 0


@pytest.mark.parametrize("layout", ["tp", "tp_ep", "tp_q_proj"])
def test_absorbed_path_trains_under_tensor_parallelism(ranks, layout):
    """mla_impl='absorbed' in training: the latent feeds each rank's heads without kv_b_proj's forward, so its
    gradient is summed over the ranks in attention (without that sum, kv_a_proj_with_mqa's gradient is off by ~0.5)."""
    for rec in each_rank(ranks, layout):
        run = rec["absorbed_train"]
        assert run["loss_diff"] <= ATOL and run["input_grad_diff"] <= ATOL
        assert_grads_match(run["grad_diffs"], f"absorbed training, {layout}")


# ---------------------------------------------------------------------------------------------------------------------
# Layouts that cannot work raise before anything is sharded (no process group needed)
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    tiny_model(seed=0).save_pretrained(path)
    return path


@pytest.mark.parametrize("distributed_config, message", [
    (DistributedConfig(tp_size=3), "tp_size=3 does not divide num_attention_heads=4"),
    (DistributedConfig(tp_size=3, ep_size=3), "tp_size=3 does not divide num_attention_heads=4"),
    ({"tp_size": 8}, "tp_size=8 does not divide num_attention_heads=4"),
    (DistributedConfig(fsdp_size=3, ep_size=3), "ep_size=3 does not divide n_routed_experts=8"),
    (DistributedConfig(tp_size=2, fsdp_size=3, ep_size=6), "ep_size=6 does not divide n_routed_experts=8"),
])
def test_size_that_splits_a_head_or_an_expert_raises(checkpoint, distributed_config, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        DeepseekForCausalLM.from_pretrained(checkpoint, distributed_config=distributed_config)


@pytest.mark.skipif(engine_takes_empty_tp_plan(), reason="this transformers' engine takes tp_plan={}")
def test_ep_alone_on_an_older_engine_raises(checkpoint):
    with pytest.warns(FutureWarning, match="enable_expert_parallel"):  # the mixin's spelling, deprecated
        deprecated = DistributedConfig(tp_size=2, enable_expert_parallel=True)
    for cfg in (DistributedConfig(tp_size=2, tp_plan={}, ep_size=2), deprecated):
        with pytest.raises(ValueError, match=rf"needs transformers >= {EMPTY_TP_PLAN_RELEASE}.*ep_size=N"):
            DeepseekForCausalLM.from_pretrained(checkpoint, distributed_config=cfg)


def test_plans_cover_every_part():
    """Each rule names modules that exist (q_proj in the full-rank-query variant, V2-Lite), in the main layers and in
    the MTP block (layers.3)."""
    names = set()
    for model in (DeepseekForCausalLM(tiny_config(q_lora_rank=None)), DeepseekForCausalLM(tiny_config())):
        names |= {re.sub(r"\.\d+(\.|$)", r".*\1", n) for n, _ in [*model.named_modules(), *model.named_parameters()]}
    assert set(model.tp_plan) <= names | {"model.embed_tokens"}
    assert set(model.ep_plan) <= names and set(model.fsdp_plan) <= names
    assert model.tp_plan["lm_head"] == "colwise_gather_output"
    assert model.tp_plan["model.embed_tokens"] == "embedding_rowwise"
    mtp = model.model.layers[3]
    for rule in ("model.layers.*.self_attn.q_b_proj", "model.layers.*.mlp.shared_experts.down_proj"):
        module = rule.removeprefix("model.layers.*.")
        assert mtp.get_submodule(module) is not None and rule in model.tp_plan
    assert mtp.get_submodule("mlp.experts") is not None and "model.layers.*.mlp.experts" in model.ep_plan
    assert model.fsdp_plan["model.layers.*"] == "free_full_weight"


# ---------------------------------------------------------------------------------------------------------------------
# transformers' TensorParallelTesterMixin, case by case (batch 2 x 64 tokens over the whole vocabulary, 25 generated
# tokens, atol = rtol = 1e-5; its EP cases load with the deprecated enable_expert_parallel=True)
def _mixin_close(a_minus_b: float) -> bool:
    return a_minus_b <= ATOL


def test_mixin_skip_rule_ep_plan_declared():
    """The mixin asserts that a model with a switchable experts implementation declares an expert-parallel plan."""
    assert DeepseekForCausalLM._can_set_experts_implementation()
    assert tiny_config().base_model_ep_plan


@pytest.mark.parametrize("layout", ["mixin_tp", "mixin_tp_tied"])
def test_tp_forward(ranks, layout):
    for rec in each_rank(ranks, layout):
        assert _mixin_close(rec["logits_diff"])
        # its sharding check: a split dimension holds at most ceil(full / world) entries
        for name, shape in rec["local_shape"].items():
            assert all(d >= 0 for d in shape)
            if rec["local_numel"][name] != rec["full_numel"][name]:
                assert rec["local_numel"][name] <= (rec["full_numel"][name] + 1) // 2, name


def test_tp_backward(ranks):
    for rec in each_rank(ranks, "mixin_tp"):
        assert _mixin_close(rec["loss_diff"])
        worst = max((d, n) for n, d in rec["local_grad_diffs"].items())
        assert _mixin_close(worst[0]), worst
        assert len(rec["local_grad_diffs"]) >= len(rec["full_numel"]) - 1


def test_tp_generation(ranks):
    for rec in each_rank(ranks, "mixin_tp"):
        assert rec["generation"]["tokens_equal"] and _mixin_close(rec["generation"]["scores_diff"])
        assert len(rec["generation"]["tokens"][0]) == 10 + 25


@pytest.mark.parametrize("layout", [layout_param("mixin_ep"), layout_param("mixin_ep_tied")])
def test_ep_forward(ranks, layout):
    for rec in each_rank(ranks, layout):
        assert _mixin_close(rec["logits_diff"])


@needs_empty_tp_plan
def test_ep_backward(ranks):
    for rec in each_rank(ranks, "mixin_ep"):
        assert _mixin_close(rec["loss_diff"])
