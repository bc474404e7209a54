"""Self-speculative decoding with the model's own MTP module (DeepSeek-V3 section 5.4.3).

Each step the MTP module drafts one token from the main model's last hidden state, and one main-model forward over
[last token, draft] both verifies the draft and yields the token after it:

    main([b, d]) -> logits at b (verifies d) and at d (the bonus token if d is accepted)
    greedy:    accept d iff it is the main model's argmax, so the output is token-for-token plain greedy decoding
    sampling:  accept d with probability min(1, p(d) / q(d)), else resample from norm(max(0, p - q)): the standard
               speculative-sampling rule, which leaves the output distributed exactly as the main model's p

Rows of a batch accept different numbers of tokens. Instead of cropping each row's cache to its own length, every
step appends the same two slots to every row and a rejected draft's slot is switched off in the attention mask
from then on (a "hole"). Position ids count only the valid slots, so RoPE and the attention pattern are exactly
those of the compact sequence. Left padding is the same mechanism: the prompt's padding slots are holes from the
start. The MTP module keeps its own latent cache whose slots line up one-to-one with the main cache's.

The MTP module at position i reads the main model's pre-norm hidden state at i and the embedding of token i+1, so
it runs once per step over the same two slots, after the main model has decided which tokens they hold.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.masking_utils import create_causal_mask

from .cache import DeepseekLatentCache
from .mtp import DeepseekMTPLayer

# GenerationConfig options this loop implements; any other non-default option is refused by name.
_UNSUPPORTED = {
    "num_beams": 1, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "num_return_sequences": 1,
    "bad_words_ids": None, "force_words_ids": None, "constraints": None, "typical_p": 1.0, "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0, "penalty_alpha": None, "min_new_tokens": None, "begin_suppress_tokens": None,
    "suppress_tokens": None, "sequence_bias": None, "min_length": 0,
}


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


def check_generation_config(gc) -> None:
    for name, default in _UNSUPPORTED.items():
        value = getattr(gc, name, default)
        if value not in (default, None) and not (name == "min_length" and value == 0):
            raise ValueError(f"generate(use_mtp=True) does not support `{name}={value!r}`; drop it or use use_mtp=False")


class _Sampler:
    """Turns logits into tokens and the probabilities speculative sampling compares."""

    def __init__(self, gc, ids):
        self.do_sample = gc.do_sample
        self.warpers = _warpers(gc)
        self.ids = ids

    def probs(self, logits_BV: torch.Tensor) -> torch.Tensor:
        return self.warpers(self.ids, logits_BV.float()).softmax(dim=-1)

    def pick(self, logits_BV: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.do_sample:
            return logits_BV.argmax(dim=-1), None
        p = self.probs(logits_BV)
        return torch.multinomial(p, 1).squeeze(-1), p


@torch.no_grad()
def mtp_generate(model, input_ids, attention_mask, generation_config, streamer=None, fp8_cache=False):
    """Returns (sequences [B, P + new], MTPStats). `model` is a DeepseekForCausalLM with at least one MTP module."""
    gc = generation_config
    check_generation_config(gc)
    if model.config.num_nextn_predict_layers < 1:
        raise ValueError("generate(use_mtp=True) needs an MTP module: config.num_nextn_predict_layers is 0")
    decoder = model.model
    mtp: DeepseekMTPLayer = decoder.mtp_layers[0]
    B, P = input_ids.shape
    device = input_ids.device
    max_new = gc.max_new_tokens if gc.max_new_tokens is not None else gc.max_length - P
    eos = gc.eos_token_id
    eos_ids = torch.tensor([eos] if isinstance(eos, int) else (eos or []), device=device)
    pad = gc.pad_token_id if gc.pad_token_id is not None else (eos_ids[0].item() if len(eos_ids) else 0)

    valid_BS = (attention_mask if attention_mask is not None else torch.ones_like(input_ids)).bool()
    positions_BP = (valid_BS.long().cumsum(-1) - 1).clamp_min(0)
    main_cache, mtp_cache = DeepseekLatentCache(fp8=fp8_cache), DeepseekLatentCache(fp8=fp8_cache)
    sampler = _Sampler(gc, input_ids)
    stats = MTPStats()

    def run_mtp(h_BTD, next_ids_BT, position_ids):
        embeds = decoder.embed_tokens(next_ids_BT)
        mask = create_causal_mask(
            config=model.config, inputs_embeds=embeds, attention_mask=valid_BS.long(),
            past_key_values=mtp_cache, position_ids=position_ids, layer_idx=mtp.layer_idx,
        )
        _, h1_normed = mtp(h_BTD, embeds, attention_mask=mask, position_ids=position_ids, past_key_values=mtp_cache,
                           position_embeddings=decoder.rotary_emb(embeds, position_ids), use_cache=True)
        return model.lm_head(h1_normed)

    # Prefill: the main model over the prompt, then the MTP module over (h_i, Emb(t_{i+1})) with t_P the first new token.
    out = decoder(input_ids, attention_mask=valid_BS.long(), position_ids=positions_BP, past_key_values=main_cache,
                  use_cache=True)
    bonus_B, _ = sampler.pick(model.lm_head(out.last_hidden_state[:, -1]))
    draft_logits = run_mtp(out.pre_norm_hidden_state, torch.cat([input_ids[:, 1:], bonus_B[:, None]], 1),
                           positions_BP)[:, -1]
    draft_B, q_BV = sampler.pick(draft_logits)

    new_tokens = [[t] for t in bonus_B.tolist()]
    done_B = torch.isin(bonus_B, eos_ids)
    next_pos_B = positions_BP[:, -1] + 1  # position of the bonus token, not yet in the cache
    if streamer is not None:
        streamer.put(input_ids.cpu())
        streamer.put(bonus_B.cpu())

    while min(len(t) for t in new_tokens) < max_new and not bool(done_B.all()):
        step_ids = torch.stack([bonus_B, draft_B], 1)
        step_pos = torch.stack([next_pos_B, next_pos_B + 1], 1)
        valid_BS = torch.cat([valid_BS, torch.ones(B, 2, dtype=torch.bool, device=device)], 1)
        out = decoder(step_ids, attention_mask=valid_BS.long(), position_ids=step_pos, past_key_values=main_cache,
                      use_cache=True)
        logits_B2V = model.lm_head(out.last_hidden_state)

        if sampler.do_sample:
            p_BV = sampler.probs(logits_B2V[:, 0])
            p_d = p_BV.gather(1, draft_B[:, None]).squeeze(1)
            q_d = q_BV.gather(1, draft_B[:, None]).squeeze(1)
            accept_B = torch.rand(B, device=device) * q_d < p_d  # u < p/q without dividing by a zero q
            residual = (p_BV - q_BV).clamp_min(0)
            residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_BV)
            corrected_B = torch.multinomial(residual / residual.sum(-1, keepdim=True), 1).squeeze(-1)
            bonus_after_B, _ = sampler.pick(logits_B2V[:, 1])
        else:
            corrected_B = logits_B2V[:, 0].argmax(-1)
            accept_B = corrected_B == draft_B
            bonus_after_B = logits_B2V[:, 1].argmax(-1)
        new_bonus_B = torch.where(accept_B, bonus_after_B, corrected_B)
        valid_BS[:, -1] = accept_B  # a rejected draft's slot becomes a hole for every later step

        live = ~done_B
        stats.steps += 1
        stats.drafted += int(live.sum())
        stats.accepted += int((accept_B & live).sum())
        for r, (acc, d, nb) in enumerate(zip(accept_B.tolist(), draft_B.tolist(), new_bonus_B.tolist())):
            if done_B[r]:
                continue
            emitted = [d, nb] if acc else [nb]
            for t in emitted:
                if len(new_tokens[r]) < max_new and not done_B[r]:
                    new_tokens[r].append(t)
                    if t in eos_ids.tolist():
                        done_B[r] = True
            if streamer is not None and B == 1:
                streamer.put(torch.tensor(emitted))

        # MTP over the same two slots: slot 0 pairs h(b) with the token after b, slot 1 pairs h(d) with the new bonus.
        slot0_next_B = torch.where(accept_B, draft_B, new_bonus_B)
        mtp_logits_B2V = run_mtp(out.pre_norm_hidden_state, torch.stack([slot0_next_B, new_bonus_B], 1), step_pos)
        draft_B, q_BV = sampler.pick(torch.where(accept_B[:, None], mtp_logits_B2V[:, 1], mtp_logits_B2V[:, 0]))
        next_pos_B = next_pos_B + 1 + accept_B.long()
        bonus_B = new_bonus_B

    if streamer is not None:
        streamer.end()
    width = max(len(t) for t in new_tokens)
    new_BN = torch.full((B, width), pad, dtype=input_ids.dtype, device=device)
    for r, toks in enumerate(new_tokens):
        new_BN[r, : len(toks)] = torch.tensor(toks, device=device)
    return torch.cat([input_ids, new_BN], 1), stats
