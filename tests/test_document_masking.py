"""Document masking (--reset-attention-mask, --reset-position-ids): packed documents are computed
as if each were alone, with Megatron's document boundaries."""

import pytest
import torch
from distributed import FP32_RTOL

from an_megatron.data import document_ids
from an_megatron.model import GPTModel, ModelConfig
from an_megatron.model.attention import document_bias, visible_keys

SMALL = dict(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=128, seq_length=24)
EOD = 0
VARIANTS = [
    ("angpt", "gaussian"),
    ("angpt", "exact"),
    ("angpt", "dense"),
    ("ngpt", "gaussian"),
    ("gptplus", "gaussian"),
]


def test_document_ids_match_megatron_masks_and_positions():
    """Our O(s) document ids give exactly the mask and positions of megatron-core's GPTDataset."""
    from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids

    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 50, (64,), generator=gen)
    tokens[torch.tensor([0, 5, 6, 30, 63])] = EOD  # at the start, twice in a row, and at the end
    masked_out, _, positions = _get_ltor_masks_and_position_ids(tokens, EOD, True, True, False, True)
    docs = document_ids(tokens[None], EOD)
    assert torch.equal(torch.isinf(document_bias(docs, torch.float32))[0], masked_out)
    assert torch.equal(visible_keys(docs, 64, docs.device)[0] - 1, positions)


def _packed_and_alone(arch, nu_att, device):
    torch.manual_seed(0)
    model = GPTModel(ModelConfig(arch=arch, nu_att=nu_att, **SMALL)).to(device)
    gen = torch.Generator().manual_seed(1)
    first = torch.randint(1, 128, (15,), generator=gen)
    first[-1] = EOD
    second = torch.randint(1, 128, (9,), generator=gen)
    first, second = first.to(device), second.to(device)
    packed = torch.cat([first, second])[None]
    docs = document_ids(packed, EOD)
    positions = visible_keys(docs, packed.shape[1], packed.device) - 1
    with torch.no_grad():
        together = model(packed, position_ids=positions, document_ids=docs)[0]
        unmasked = model(packed)[0]
        alone = torch.cat([model(first[None])[0], model(second[None])[0]])
    return together, unmasked, alone


@pytest.mark.parametrize("arch,nu_att", VARIANTS)
def test_packed_documents_equal_documents_alone(single_process, device, arch, nu_att):
    together, unmasked, alone = _packed_and_alone(arch, nu_att, device)
    torch.testing.assert_close(together, alone, rtol=FP32_RTOL, atol=FP32_RTOL)
    # without the masks, the second document sees the first: other logits
    assert not torch.allclose(unmasked[15:], alone[15:], atol=1e-3)


def test_packed_loss_equals_per_document_losses(single_process, device):
    """The mean loss over a packed sequence is the token-weighted mean of each document's own."""
    torch.manual_seed(0)
    model = GPTModel(ModelConfig(arch="angpt", **SMALL)).to(device)
    gen = torch.Generator().manual_seed(2)
    docs_tokens = [torch.randint(1, 128, (n + 1,), generator=gen) for n in (10, 14)]
    for d in docs_tokens:
        d[-1] = EOD
    packed = torch.cat(docs_tokens)[None].to(device)
    inputs, labels = packed[:, :-1], packed[:, 1:]
    docs = document_ids(inputs, EOD)
    positions = visible_keys(docs, inputs.shape[1], inputs.device) - 1
    with torch.no_grad():
        loss = model.loss(inputs, labels, position_ids=positions, document_ids=docs)
        # document 1 alone: its 11 tokens predict the next 11 (the last label is document 2's first)
        first = model.loss(packed[:, :11], packed[:, 1:12])
        second = model.loss(packed[:, 11:-1], packed[:, 12:])
    torch.testing.assert_close(loss, (11 * first + 14 * second) / 25, rtol=FP32_RTOL, atol=1e-6)


@pytest.mark.gpu
def test_varlen_kernel_matches_mask_on_cuda():
    """On CUDA in bf16, documents run through the variable-length flash kernel (no mask); it
    must give what SDPA with the explicit document mask gives, forward and backward."""
    import torch.nn.functional as F

    from an_megatron.model.attention import attention

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 64, 32, generator=gen).cuda().bfloat16().requires_grad_() for _ in range(3))
    starts = torch.zeros(2, 64, dtype=torch.long)
    starts[0, [10, 11, 40]] = 1
    starts[1, [63]] = 1
    docs = starts.cumsum(1).cuda()
    out = attention(q, k, v, 0.2, docs)
    ref = F.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), scale=0.2, attn_mask=document_bias(docs, torch.float32)
    )
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.float(), r.float(), rtol=5e-2, atol=5e-2)
