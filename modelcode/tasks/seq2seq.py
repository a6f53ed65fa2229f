"""Decoding an encoder-decoder model: greedy and beam search, with a KV cache.

The source is encoded once; the decoder then runs one token per step, feeding only the newest token
(its cache holds the earlier target positions and the encoder's cross-attention keys/values).

The rules are transformers' `generate` for encoder-decoders, so that results agree token for token:
scores pass through the checkpoint's processors (banned tokens, EOS forced at the last step, optional
renormalization), a finished greedy sequence is padded, and beam search keeps the same book as
transformers' vectorized implementation (2 * beams candidates per step, finished hypotheses scored
by log-probability / length ** length_penalty, the same early-stopping rules).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from modelcode.models.transformer import Transformer

NEG = -1.0e9  # transformers' "impossible" score: added, not assigned, so the sums match its own


@dataclass
class SearchSettings:
    max_new_tokens: int
    eos_id: int
    pad_id: int
    decoder_start_id: int
    num_beams: int = 1
    length_penalty: float = 1.0  # finished beams are ranked by sum(log p) / length ** length_penalty
    early_stopping: bool | str = False  # True: stop at num_beams finished; "never": the textbook rule
    bad_ids: tuple[int, ...] = ()  # tokens never generated (Marian bans its pad token)
    forced_eos_ids: tuple[int, ...] = ()  # the last step may only end (forced_eos_token_id)
    renormalize: bool = False  # log-softmax again after the processors (renormalize_logits)


def process(scores: torch.Tensor, step: int, s: SearchSettings) -> torch.Tensor:
    """The logits processors, on scores (N, vocab) for the token at 0-based `step`."""
    if s.bad_ids:
        scores = scores.index_fill(-1, torch.tensor(s.bad_ids, device=scores.device), -torch.inf)
    if s.forced_eos_ids and step == s.max_new_tokens - 1:
        forced = torch.tensor(s.forced_eos_ids, device=scores.device)
        scores = torch.full_like(scores, -torch.inf).index_fill(-1, forced, 0)
    return F.log_softmax(scores, dim=-1) if s.renormalize else scores


def _next_logits(model: Transformer, tokens: torch.Tensor, memory, src_mask, step: int, cache) -> torch.Tensor:
    """Feed the newest target token (N,) at position `step`: next-token logits (N, vocab), float32."""
    positions = torch.full((tokens.shape[0], 1), step, device=tokens.device)
    return model.decode(tokens[:, None], memory, src_mask, positions, cache)[:, -1].float()


def _trim(tokens: list[int], eos_id: int) -> list[int]:
    return tokens[: tokens.index(eos_id) + 1] if eos_id in tokens else tokens


@torch.inference_mode()
def greedy_search(model: Transformer, src: torch.Tensor, src_mask: torch.Tensor, s: SearchSettings) -> list[list[int]]:
    """The most probable token at every step. src (B, S), src_mask (B, S) -> B token lists (EOS kept)."""
    B = src.shape[0]
    memory, cache = model.encode(src, src_mask), model.new_cache()
    token = torch.full((B,), s.decoder_start_id, device=src.device)
    done = torch.zeros(B, dtype=torch.bool, device=src.device)
    out = []
    for step in range(s.max_new_tokens):
        scores = process(_next_logits(model, token, memory, src_mask, step, cache), step, s)
        token = torch.where(done, s.pad_id, scores.argmax(-1))  # a finished sequence only pads
        out.append(token)
        done |= token == s.eos_id
        if done.all():
            break
    return [_trim(row, s.eos_id) for row in torch.stack(out, dim=1).tolist()]


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, K, ...) indexed along the beam dim by index (B, K') -> (B, K', ...)."""
    return torch.take_along_dim(x, index.view(*index.shape, *[1] * (x.dim() - 2)), dim=1)


@torch.inference_mode()
def beam_search(model: Transformer, src: torch.Tensor, src_mask: torch.Tensor, s: SearchSettings) -> list[list[int]]:
    """Keep the `num_beams` best partial translations per source; return the best finished one of each."""
    B, K, L = src.shape[0], s.num_beams, s.max_new_tokens
    dev = src.device
    memory = model.encode(src, src_mask).repeat_interleave(K, dim=0)  # (B*K, S, dim): one copy per beam
    src_mask, cache = src_mask.repeat_interleave(K, dim=0), model.new_cache()

    running = torch.full((B, K, L), s.pad_id, device=dev)  # tokens of the live beams
    running_scores = torch.zeros(B, K, device=dev)  # sum of log-probs of each live beam
    running_scores[:, 1:] = NEG  # all beams start equal: let only the first one expand at step 0
    finished = torch.full((B, K, L), s.pad_id, device=dev)  # best finished hypotheses so far
    finished_scores = torch.full((B, K), NEG, device=dev)  # their length-normalized scores
    is_finished = torch.zeros(B, K, dtype=torch.bool, device=dev)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=dev)  # can a live beam still beat them?
    token = torch.full((B * K,), s.decoder_start_id, device=dev)
    top_k_mask = torch.arange(2 * K, device=dev) < K

    for step in range(L):
        log_probs = process(F.log_softmax(_next_logits(model, token, memory, src_mask, step, cache), -1), step, s)
        V = log_probs.shape[-1]
        scores = (log_probs.view(B, K, V) + running_scores[..., None]).view(B, K * V)
        # 2K candidates: even if K of them end with EOS, K remain to go on with.
        cand_scores, flat = scores.topk(2 * K)  # (B, 2K)
        parent, cand_token = flat // V, flat % V
        cand = _gather(running, parent)  # (B, 2K, L), a new tensor
        cand[:, :, step] = cand_token
        ends = (cand_token == s.eos_id) | (step + 1 == L)

        # The live beams for the next step: the K best candidates that did not end.
        live_scores = cand_scores + ends.float() * NEG
        keep = live_scores.topk(K).indices
        running, running_scores, parent = _gather(cand, keep), _gather(live_scores, keep), _gather(parent, keep)

        # Finished hypotheses: candidates among the top K that ended, if they beat the kept ones.
        new_finished = ends & top_k_mask
        normed = cand_scores / (step + 1) ** s.length_penalty
        normed = normed + (is_finished.all(-1, keepdim=True) & (s.early_stopping is True)).float() * NEG
        normed = normed + (~improvable).float() * NEG
        normed = normed + (~new_finished).float() * NEG
        best = torch.cat((finished_scores, normed), dim=1).topk(K).indices
        finished = _gather(torch.cat((finished, cand), dim=1), best)
        finished_scores = _gather(torch.cat((finished_scores, normed), dim=1), best)
        is_finished = _gather(torch.cat((is_finished, new_finished), dim=1), best)

        # Each live beam goes on from the cache of the beam it extends.
        cache.reorder((parent + K * torch.arange(B, device=dev)[:, None]).view(-1))
        token = running[:, :, step].reshape(-1)

        # Could the best live beam still beat the worst finished one? transformers' heuristic takes its
        # current length (or, with early_stopping="never" and a positive penalty, the longest possible).
        length = L if s.early_stopping == "never" and s.length_penalty > 0 else step + 1
        worst = torch.where(is_finished, finished_scores.min(-1, keepdim=True).values, NEG)
        improvable = improvable & (running_scores[:, :1] / length ** s.length_penalty > worst).any(-1, keepdim=True)
        if not improvable.any() or (is_finished.all() and s.early_stopping is True) or ends.all():
            break
    return [_trim(row, s.eos_id) for row in finished[:, 0].tolist()]
