"""Merging LoRA adapters into a state dict: the export's merged model.

peft's merge_and_unload() merges in place, into the module: exporting that way means a second
copy of the model where the module lives (the accelerator), so that training's module stays
unmerged, and under ZeRO-3, where each rank holds a shard of each weight, the whole model put
back into the module on every rank at once. Merging a state dict works on a CPU copy, or on the
whole state dict that ZeRO-3 gathers onto rank 0 one layer at a time (trainer/run/deepspeed_backend.py).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

PEFT_PREFIX = "base_model.model."
"""What peft puts before the wrapped model's own parameter names."""


def merged_state_dict(peft_model: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The wrapped model's state dict with every LoRA Linear's update folded into its weight:
    W + scaling * (B @ A) (transposed for fan_in_fan_out layers), the sum peft's merge computes,
    in float32 and cast back to W's dtype. `state` has peft's names (peft_model.state_dict()'s);
    the result has the wrapped model's (what merge_and_unload().state_dict() has)."""
    merged = dict(state)
    for name, module in mergeable_layers(peft_model):
        weight = f"{name}.base_layer.weight"
        result = merged[weight].to(torch.float32, copy=True)  # never add into the caller's tensors
        for adapter in module.active_adapters:
            lora_a, lora_b = merged.pop(f"{name}.lora_A.{adapter}.weight"), merged.pop(f"{name}.lora_B.{adapter}.weight")
            delta = lora_b.float() @ lora_a.float()
            result += (delta.T if module.fan_in_fan_out else delta) * module.scaling[adapter]
        merged[weight] = result.to(state[weight].dtype)
    leftovers = [key for key in merged if ".lora_" in key]
    if leftovers:
        raise ValueError(f"model.lora: adapter weights of no active adapter in the state dict: {leftovers[:3]}")
    return {_base_name(key): value for key, value in merged.items()}


def mergeable_layers(peft_model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's LoRA layers, all of which merged_state_dict can merge, or one clear error (what
    add_lora checks, so that a run learns it before training, not at export)."""
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    layers = [(name, module) for name, module in peft_model.named_modules() if isinstance(module, LoraLayer)]
    for name, module in layers:
        if not isinstance(module, LoraLinear) or any(module.use_dora.values()):
            raise ValueError(
                f"model.lora: {name} ({type(module).__name__}) is not a linear layer; the export merges "
                "adapters on linear layers only: set model.lora.target_modules to linear layers"
            )
    return layers


def _base_name(key: str) -> str:
    return key.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")
