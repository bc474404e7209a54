"""Self-speculative decoding with the model's own MTP module (DeepSeek-V3 section 5.4.3).

Each step the MTP module drafts k tokens (`mtp_draft_tokens`, default num_nextn_predict_layers), and one
main-model forward over [last token, d_1 .. d_k] verifies them all and yields the token after the accepted prefix:

    main([b, d_1..d_k]) -> logits at b (verifies d_1), at d_1 (verifies d_2), ..., at d_k (the bonus token)
    greedy:    d_j is accepted iff it is the main model's argmax and d_1..d_{j-1} were, so the output is
               token-for-token plain greedy decoding
    sampling:  d_j is accepted with probability min(1, p(d_j) / q(d_j)); at the first rejection the token is drawn
               from norm(max(0, p - q)): the standard speculative-sampling rule, which leaves the output
               distributed exactly as the main model's p, whatever the drafts were

Draft 1 comes from the MTP module as trained (main hidden state h_i, embedding of token i+1). Drafts 2..k chain the
first MTP module on its own output (its hidden state stands in for the main model's), which is how serving
engines stretch a single V3 MTP module to several drafts; those chained cache slots are dropped right after.

Rows of a batch accept different numbers of tokens. Instead of cropping each row's cache to its own length, every
step appends the same k+1 slots to every row and a rejected draft's slot is switched off in the attention mask
from then on (a "hole"). Position ids count only the valid slots, so RoPE and the attention pattern are exactly
those of the compact sequence. Left padding is the same mechanism: the prompt's padding slots are holes from the
start. The MTP module keeps its own latent cache whose slots line up one-to-one with the main cache's.

The MTP module at position i reads the main model's final (normed) hidden state at i and the embedding of token i+1, so
it runs once per step over the same k+1 slots, after the main model has decided which tokens they hold.

generate(use_mtp=True) (generation.py) only dispatches here: `mtp_arguments` checks the call (every generation option
this loop does not implement raises, naming it) and `mtp_generate` runs the loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import GenerationConfig
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .cache import DeepseekLatentCache
from .mtp import DeepseekMTPLayer

# The GenerationConfig fields this loop implements. Any other field set away from its default is refused by name, so
# that an option (today's or a future release's) is never silently ignored.
_IMPLEMENTED = {
    "max_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p", "min_p", "eos_token_id",
    "pad_token_id", "bos_token_id", "prefill_chunk_size", "return_dict_in_generate", "use_cache",
    "cache_implementation", "max_cache_len", "latent_cache_dtype", "index_cache_dtype", "use_mtp", "transformers_version",
    "disable_compile", "compile_config",
}
# Values that switch an option off, which callers such as TRL set explicitly: accepted like the defaults.
_NO_OP = {"repetition_penalty": 1.0, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "num_beams": 1,
          "num_return_sequences": 1, "no_repeat_ngram_size": 0, "min_length": 0, "min_new_tokens": 0,
          "length_penalty": 1.0}


@dataclass
class MTPStats:
    drafted: int = 0
    accepted: int = 0
    steps: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


def _warpers(gc) -> LogitsProcessorList:
    warpers = LogitsProcessorList()
    if not gc.do_sample:
        return warpers
    if gc.temperature is not None and gc.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(gc.temperature))
    if gc.top_k:
        warpers.append(TopKLogitsWarper(gc.top_k))
    if gc.top_p is not None and gc.top_p < 1.0:
        warpers.append(TopPLogitsWarper(gc.top_p))
    if getattr(gc, "min_p", None):
        warpers.append(MinPLogitsWarper(gc.min_p))
    return warpers


def _unset(value) -> bool:
    return value is None or value is False


def check_generation_config(gc) -> None:
    defaults = GenerationConfig().to_dict()
    for name, value in gc.to_dict().items():
        default = defaults.get(name)
        if (name in _IMPLEMENTED or name.startswith("_") or value == default or _unset(value) and _unset(default)
                or name in _NO_OP and value == _NO_OP[name]):
            continue
        raise ValueError(f"generate(use_mtp=True) does not support `{name}={value!r}`; drop it or use use_mtp=False")


@dataclass
class MTPCall:
    """The arguments of one generate(use_mtp=True) call that the speculative loop reads, checked."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    streamer: object | None
    draft_tokens: int  # k: drafts per step


def mtp_arguments(model, inputs, generation_config, kwargs: dict, draft_tokens: int | None) -> MTPCall:
    """generate(use_mtp=True)'s arguments, checked before anything is allocated. The generation settings among
    `kwargs` go into `generation_config` (the caller's own copy); any argument the loop does not implement raises,
    naming it, rather than being ignored."""
    model_kwargs = generation_config.update(**kwargs)
    input_ids = inputs if inputs is not None else model_kwargs.pop("input_ids", None)
    if input_ids is None:
        raise ValueError("generate(use_mtp=True) needs input_ids (the MTP module embeds each next token); "
                         "inputs_embeds alone is not supported")
    attention_mask = model_kwargs.pop("attention_mask", None)
    streamer = model_kwargs.pop("streamer", None)
    model_kwargs.pop("tokenizer", None)  # generate() takes it for stop_strings, which check_generation_config refuses
    check_generation_config(generation_config)
    for ignored in ("logits_processor", "stopping_criteria", "past_key_values", "cache", "use_cache"):
        if model_kwargs.pop(ignored, None) not in (None, True, [], ()):
            raise ValueError(f"generate(use_mtp=True) does not take `{ignored}`")
    if model_kwargs:
        raise ValueError(f"generate(use_mtp=True) got unexpected arguments: {sorted(model_kwargs)}")
    if model.config.num_nextn_predict_layers < 1:
        raise ValueError("generate(use_mtp=True) needs an MTP module: config.num_nextn_predict_layers is 0")
    k = model.config.num_nextn_predict_layers if draft_tokens is None else draft_tokens
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"`mtp_draft_tokens` must be a positive integer, got {k!r}")
    if streamer is not None and input_ids.shape[0] > 1:
        raise ValueError("generate(use_mtp=True, streamer=...) streams one sequence: pass a batch of size 1")
    return MTPCall(input_ids, attention_mask, streamer, k)


class _Sampler:
    """Turns logits into tokens and the probabilities speculative sampling compares."""

    def __init__(self, gc, ids):
        self.do_sample = gc.do_sample
        self.warpers = _warpers(gc)
        self.ids = ids

    def probs(self, logits_NV: torch.Tensor) -> torch.Tensor:
        return self.warpers(self.ids, logits_NV.float()).softmax(dim=-1)

    def pick(self, logits_BV: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.do_sample:
            return logits_BV.argmax(dim=-1), None
        p = self.probs(logits_BV)
        return torch.multinomial(p, 1).squeeze(-1), p


def slot_mask(valid_BS: torch.Tensor, T: int, dtype: torch.dtype, width: int | None = None) -> torch.Tensor:
    """Additive [B, 1, T, S] mask for queries in the last T of S cache slots: causal by slot, holes masked out.
    `width`: a static cache's size; the slots after the S written ones are masked too."""
    S = valid_BS.shape[1]
    causal_TS = torch.ones(T, S, dtype=torch.bool, device=valid_BS.device).tril(S - T)
    allowed = causal_TS[None, None] & valid_BS[:, None, None, :]
    if width is not None:
        allowed = F.pad(allowed, (0, width - S), value=False)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=valid_BS.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


@torch.no_grad()
def mtp_generate(model, call: MTPCall, generation_config, fp8_cache=False, caches=None):
    """Returns (sequences [B, P + new], MTPStats). `model` is a DeepseekForCausalLM with at least one MTP module;
    `call` comes from mtp_arguments, `generation_config` is the one it filled.
    `caches`: the (main, MTP) caches to fill, e.g. static ones; default two fresh DeepseekLatentCaches."""
    gc = generation_config
    input_ids, attention_mask, streamer, k = call.input_ids, call.attention_mask, call.streamer, call.draft_tokens
    decoder = model.model
    mtp: DeepseekMTPLayer = decoder.mtp_layers[0]
    B, P = input_ids.shape
    device, dtype = input_ids.device, model.dtype
    max_new = gc.max_new_tokens if gc.max_new_tokens is not None else gc.max_length - P
    eos = gc.eos_token_id
    eos_list = [eos] if isinstance(eos, int) else list(eos or [])
    pad = gc.pad_token_id if gc.pad_token_id is not None else (eos_list[0] if eos_list else 0)
    rows, slots_K1 = torch.arange(B, device=device), torch.arange(k + 1, device=device)

    valid_BS = (attention_mask if attention_mask is not None else torch.ones_like(input_ids)).bool()
    positions_BP = (valid_BS.long().cumsum(-1) - 1).clamp_min(0)
    main_cache, mtp_cache = caches or tuple(DeepseekLatentCache(model.config, fp8=fp8_cache) for _ in range(2))
    # A static cache attends over all of its slots: every forward gets a mask as wide as the cache.
    width = main_cache.max_cache_len if main_cache.is_compileable else None
    sampler = _Sampler(gc, input_ids)
    stats = MTPStats()

    def run_mtp(h_BTD, next_ids_BT, position_ids, valid, masked=True):
        embeds = decoder.embed_tokens(next_ids_BT)
        mask = slot_mask(valid, embeds.shape[1], dtype, width) if masked or width else None
        return mtp(h_BTD, embeds, attention_mask=mask, position_ids=position_ids,
                   cache=mtp_cache, position_embeddings=decoder.rotary_emb(embeds, position_ids),
                   use_cache=True)

    def draft(h_BD, normed_BD, bonus_pos_B, valid):
        """k drafts after the bonus token: the first from the MTP pair just computed (which ends at the bonus), the
        rest by chaining the module on itself at the bonus position and beyond."""
        tokens, probs = [], []
        for j in range(k):
            if j:
                h_BTD, normed_BTD = run_mtp(h_BD[:, None], tokens[-1][:, None], (bonus_pos_B + j - 1)[:, None],
                                            torch.cat([valid, valid.new_ones(B, j)], 1))
                h_BD, normed_BD = h_BTD[:, 0], normed_BTD[:, 0]
            token, prob = sampler.pick(model.lm_head(normed_BD))
            tokens.append(token)
            probs.append(prob)
        if k > 1:
            mtp_cache.crop(-(k - 1))  # chained slots held guesses; next step writes the true pairs there
        return torch.stack(tokens, 1), (torch.stack(probs, 1) if sampler.do_sample else None)

    # Prefill: the main model over the prompt, then the MTP module over (h_i, Emb(t_{i+1})) with t_P the first new token,
    # both in chunks of gc.prefill_chunk_size tokens when set (each chunk attends to the cache of the ones before).
    # Without padding the prompt is plain causal: no slot mask, so that the model picks its own mask-free kernels.
    chunk = gc.prefill_chunk_size or P
    spans = [(s, min(s + chunk, P)) for s in range(0, P, chunk)]
    padded = not bool(valid_BS.all())
    h_prompt = []
    for s, e in spans:
        mask = slot_mask(valid_BS[:, :e], e - s, dtype, width) if padded or width else None
        out = decoder(input_ids[:, s:e], attention_mask=mask,
                      position_ids=positions_BP[:, s:e], cache=main_cache, use_cache=True)
        h_prompt.append(out.last_hidden_state)
    bonus_B, _ = sampler.pick(model.lm_head(out.last_hidden_state[:, -1]))
    next_pos_B = positions_BP[:, -1] + 1  # position of the bonus token, not yet in the cache
    next_ids_BP = torch.cat([input_ids[:, 1:], bonus_B[:, None]], 1)
    for (s, e), h_BTD in zip(spans, h_prompt):
        h, normed = run_mtp(h_BTD, next_ids_BP[:, s:e], positions_BP[:, s:e], valid_BS[:, :e], masked=padded)
    drafts_BK, q_BKV = draft(h[:, -1], normed[:, -1], next_pos_B, valid_BS)

    new_tokens = [[t] for t in bonus_B.tolist()]
    done = [toks[0] in eos_list for toks in new_tokens]
    if streamer is not None:
        streamer.put(input_ids.cpu())
        streamer.put(bonus_B.cpu())

    while not all(d or len(t) >= max_new for d, t in zip(done, new_tokens)):
        step_ids = torch.cat([bonus_B[:, None], drafts_BK], 1)
        step_pos = next_pos_B[:, None] + slots_K1
        valid_BS = torch.cat([valid_BS, valid_BS.new_ones(B, k + 1)], 1)
        out = decoder(step_ids, attention_mask=slot_mask(valid_BS, k + 1, dtype, width), position_ids=step_pos,
                      cache=main_cache, use_cache=True)
        logits_BTV = model.lm_head(out.last_hidden_state)

        if sampler.do_sample:
            p_BTV = sampler.probs(logits_BTV.flatten(0, 1)).view(B, k + 1, -1)
            p_d = p_BTV[:, :k].gather(2, drafts_BK[..., None]).squeeze(-1)
            q_d = q_BKV.gather(2, drafts_BK[..., None]).squeeze(-1)
            ok_BK = torch.rand(B, k, device=device) * q_d < p_d  # u < p/q without dividing by a zero q
        else:
            pred_BT = logits_BTV.argmax(-1)
            ok_BK = pred_BT[:, :k] == drafts_BK
        n_acc_B = ok_BK.long().cumprod(1).sum(1)  # length of the accepted prefix, 0..k
        if sampler.do_sample:
            p_a = p_BTV[rows, n_acc_B]
            residual = (p_a - q_BKV[rows, n_acc_B.clamp(max=k - 1)]).clamp_min(0)
            keep_p = (n_acc_B == k)[:, None] | (residual.sum(-1, keepdim=True) <= 0)
            dist = torch.where(keep_p, p_a, residual)
            new_bonus_B = torch.multinomial(dist / dist.sum(-1, keepdim=True), 1).squeeze(-1)
        else:
            new_bonus_B = pred_BT[rows, n_acc_B]
        valid_BS[:, -k:] = slots_K1[1:][None] <= n_acc_B[:, None]  # rejected drafts become holes for good

        stats.steps += 1
        for r, (a, ds, nb) in enumerate(zip(n_acc_B.tolist(), drafts_BK.tolist(), new_bonus_B.tolist())):
            if done[r] or len(new_tokens[r]) >= max_new:
                continue
            stats.drafted += k
            stats.accepted += a
            kept = []  # what this step adds to the row: up to max_new_tokens, and nothing after an EOS
            for t in ds[:a] + [nb]:
                if len(new_tokens[r]) < max_new and not done[r]:
                    new_tokens[r].append(t)
                    kept.append(t)
                    done[r] = t in eos_list
            if streamer is not None and kept:
                streamer.put(torch.tensor(kept))

        # MTP over the same k+1 slots: slot j pairs h(slot j) with the token that now follows it.
        drafts_ext = torch.cat([drafts_BK, new_bonus_B[:, None]], 1)
        next_BT = torch.where(slots_K1[None] < n_acc_B[:, None], drafts_ext, new_bonus_B[:, None])
        h, normed = run_mtp(out.last_hidden_state, next_BT, step_pos, valid_BS)
        next_pos_B = next_pos_B + n_acc_B + 1
        drafts_BK, q_BKV = draft(h[rows, n_acc_B], normed[rows, n_acc_B], next_pos_B, valid_BS)
        bonus_B = new_bonus_B

    if streamer is not None:
        streamer.end()
    width = max(len(t) for t in new_tokens)
    new_BN = torch.full((B, width), pad, dtype=input_ids.dtype, device=device)
    for r, toks in enumerate(new_tokens):
        new_BN[r, : len(toks)] = torch.tensor(toks, device=device)
    return torch.cat([input_ids, new_BN], 1), stats
