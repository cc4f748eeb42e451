"""Model FLOPs of a step and the device's peak: what `mfu` in every run's metrics divides.

Per real token, a forward costs 2 x the non-embedding parameters (one multiply-add per weight)
plus attention: 4 x layers x attention width x the text's length (scores and the weighted sum).
A backward costs twice a forward. So a chunk GradCache re-embeds costs 4 forwards (no-grad
forward, forward, backward), a kept one 3, a plain step's 3 (StepWork counts them). Padding is
not counted: MFU is useful work over what the chip could do. (LoRA's frozen weights need no
weight gradient, so its backward costs less than counted: its MFU reads high.)
"""

from __future__ import annotations

import torch
from torch import nn

from trainer.core.gradcache import StepWork

PEAK_TFLOPS = {
    # Dense bf16/fp16 tensor-core peaks from the vendors' data sheets (SXM parts where a PCIe one
    # differs), matched against torch.cuda.get_device_name() in this order.
    "H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "H800": 989.0, "GH200": 989.0, "B200": 2250.0,
    "A100": 312.0, "A800": 312.0, "L40S": 362.0, "L40": 181.0, "L4": 121.0, "A10G": 70.0, "A10": 125.0,
    "A6000": 155.0, "RTX 4090": 165.0, "RTX 3090": 71.0, "V100": 125.0, "T4": 65.0,
}


def device_peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    """The device's dense bf16 peak in TFLOP/s: `override` if given, else the table's entry for
    this GPU, else None (a CPU, or a GPU the table does not know: then no MFU is reported)."""
    if override:
        return float(override)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


class ModelFlops:
    """FLOPs of an encoder's work (model.Encoder, or the transformer itself), from the
    transformer's config and parameters."""

    def __init__(self, encoder: nn.Module) -> None:
        backbone = getattr(encoder, "backbone", encoder)
        config = backbone.config
        embedding = {id(p) for m in backbone.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
        # peft's adapters are parameters too (trained, so they count); a peft wrapper's base model
        # is the same module tree, so nothing counts twice.
        self.parameters = sum(p.numel() for p in backbone.parameters() if id(p) not in embedding)
        heads = getattr(config, "num_attention_heads", 1)
        width = getattr(config, "head_dim", None)
        self.attention_width = heads * width if width else config.hidden_size
        self.layers = config.num_hidden_layers

    def of(self, work: StepWork) -> float:
        return 2.0 * self.parameters * work.token_passes + 4.0 * self.layers * self.attention_width * work.attention_passes
