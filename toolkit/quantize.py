"""The quantization probe's model change: each decoder linear weight
replaced by its bitsandbytes-quantized value (8-bit row-wise, 4-bit NF4)."""

from __future__ import annotations

import torch

from toolkit.losses import decoder_and_head
from toolkit.names import QUANT_BITS


def quantizable_linears(model) -> list[tuple[str, torch.nn.Linear]]:
    """The decoder's linear layers; embeddings and the LM head stay in full
    precision, as in bitsandbytes' own 8- and 4-bit loading."""
    decoder, _ = decoder_and_head(model)
    return [(n, m) for n, m in decoder.named_modules() if isinstance(m, torch.nn.Linear)]


@torch.no_grad()
def quantize_weights(model, bits: int, blocksize: int = 64) -> int:
    """Replace each decoder linear weight by its bitsandbytes-quantized value:
    8 bits row-wise absmax (LLM.int8's weights), 4 bits NF4 in blocks of
    `blocksize` (QLoRA's). The model then computes what the quantized model
    computes, on any device. Returns the number of weights quantized."""
    import bitsandbytes.functional as bnbf

    if bits not in QUANT_BITS:
        raise ValueError(f"bits={bits} is not allowed; use one of {QUANT_BITS}")
    count = 0
    for _, linear in quantizable_linears(model):
        weight = linear.weight.data
        full = weight.float()
        if bits == 8:
            quantized, row_absmax, _ = bnbf.int8_vectorwise_quant(full.to(torch.float16))
            restored = quantized.float() * row_absmax.float().unsqueeze(1) / 127
        else:
            packed, state = bnbf.quantize_4bit(full, blocksize=blocksize, quant_type="nf4")
            restored = bnbf.dequantize_4bit(packed, state).float()
        weight.copy_(restored.reshape(weight.shape).to(weight.dtype))
        count += weight.numel()
    return count
