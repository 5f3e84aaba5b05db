"""Sampling text from a trained model (the demo's last step)."""

from __future__ import annotations

import torch

from an_megatron.parallel import tp_group
from an_megatron.parallel.tensor_parallel import gather_tp_tensor


@torch.no_grad()
def sample(
    model,
    prompt_ids: list[int],
    max_new_tokens: int,
    seq_length: int,
    vocab_size: int,
    temperature: float = 0.8,
    top_k: int = 40,
    seed: int = 0,
    length_multiple: int = 1,
) -> list[int]:
    """Top-k sampling; every tensor-parallel rank draws the same tokens (same seed).
    ``length_multiple``: the model takes only sequences of a multiple of this length (sequence
    parallelism: the TP size); the context is padded on the right, which the causal model's
    logits at the last real token do not see."""
    gen = torch.Generator().manual_seed(seed)
    ids = list(prompt_ids)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    for _ in range(max_new_tokens):
        context = ids[-seq_length:]
        last = len(context) - 1
        context = torch.tensor([context + [context[-1]] * (-len(context) % length_multiple)], device=device)
        logits = gather_tp_tensor(model(context)[:, last], -1, 1, tp_group())[0, :vocab_size].float().cpu()
        logits = logits / temperature
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        probs = torch.softmax(logits.masked_fill(logits < kth, float("-inf")), dim=-1)
        ids.append(int(torch.multinomial(probs, 1, generator=gen)))
    model.train(was_training)
    return ids
