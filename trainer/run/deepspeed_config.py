"""Which backend a run uses, and the DeepSpeed engine's config built from three sources that must
agree: our Hydra keys (deepspeed.*, trainer.*, data.batch_size), a user's DeepSpeed JSON file
(deepspeed.config) and the flags of `accelerate launch --use_deepspeed` (which arrive as
ACCELERATE_* environment variables).

Rules, so that nothing is overridden silently:
  * zero_stage and offload_optimizer may come from any source; every source that sets one must
    give the same value (unset everywhere: stage 2, no offload).
  * Batch size, gradient accumulation, clipping, optimizer, scheduler and precision belong to
    the trainer: GradCache takes exactly one optimizer step per global batch, and precision is
    autocast over fp32 weights as on the DDP path. The JSON may leave them out or say "auto";
    any other value is an error naming the file, line and key.
  * Everything else in the JSON (bucket sizes, overlap_comm, stage-3 thresholds, ...) is used
    as written.
Pure functions of their inputs: no DeepSpeed import, so they run (and are tested) anywhere.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

DEFAULT_ZERO_STAGE = 2

# Accelerate's spelling of precision -> ours.
_ACCELERATE_PRECISION = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}


class DeepSpeedConfigError(ValueError):
    """The DeepSpeed settings contradict each other or cannot be read."""


def resolve_backend(backend: str | None, precision: str, environ: Mapping[str, str] = os.environ) -> str:
    """'ddp' or 'deepspeed': trainer.backend if set, else DeepSpeed when `accelerate launch
    --use_deepspeed` started us, else ddp. Also rejects an accelerate mixed-precision flag that
    disagrees with trainer.precision (the trainer, not Accelerate, runs autocast)."""
    asked_by_accelerate = environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    if backend == "ddp" and asked_by_accelerate:
        raise DeepSpeedConfigError(
            "trainer.backend=ddp, but `accelerate launch --use_deepspeed` asked for DeepSpeed: drop one of the two"
        )
    mixed = environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if mixed != "no" and _ACCELERATE_PRECISION.get(mixed) != precision:
        raise DeepSpeedConfigError(
            f"accelerate launch --mixed_precision {mixed} disagrees with trainer.precision={precision}: "
            f"set trainer.precision (the trainer runs autocast itself) and launch with --mixed_precision no"
        )
    return backend or ("deepspeed" if asked_by_accelerate else "ddp")


def build_config(
    *,
    zero_stage: int | None,
    offload_optimizer: bool | None,
    config_file: str | None,
    micro_batch_size: int,
    world_size: int,
    max_grad_norm: float,
    precision: str,
    environ: Mapping[str, str] = os.environ,
) -> dict[str, Any]:
    """The config dict for deepspeed.initialize (see the module docstring for the rules).

    zero_stage / offload_optimizer / config_file: the deepspeed.* Hydra keys (None = not set).
    micro_batch_size: pairs per rank per step; world_size: ranks; max_grad_norm: 0 = no clipping.
    """
    if precision == "fp16":
        raise DeepSpeedConfigError(
            "trainer.precision=fp16 is not supported with trainer.backend=deepspeed (its loss scaling does "
            "not compose with GradCache's cached gradients): use bf16 or fp32"
        )
    accelerate_file = environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or None
    if config_file and accelerate_file and Path(config_file).resolve() != Path(accelerate_file).resolve():
        raise DeepSpeedConfigError(
            f"deepspeed.config={config_file} but accelerate launch --deepspeed_config_file {accelerate_file}: drop one"
        )
    config_file = config_file or accelerate_file
    user, text = _read_json(config_file) if config_file else ({}, "")
    where = _Locator(config_file, text)

    zero = dict(user.get("zero_optimization") or {})
    stage, offload, file_device = _zero_settings(zero, where, zero_stage, offload_optimizer, environ)
    owned = _owned_keys(user, where, micro_batch_size, world_size, max_grad_norm)

    if offload and file_device is None:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if not offload:
        zero.pop("offload_optimizer", None)
    zero["stage"] = stage
    merged = {k: v for k, v in user.items() if k not in ("fp16", "bf16")}
    merged.update(owned)
    merged["zero_optimization"] = zero
    # Our AdamW is a plain torch optimizer; DeepSpeed asks for this to accept one under ZeRO.
    merged.setdefault("zero_allow_untested_optimizer", True)
    merged.setdefault("steps_per_print", 2**31 - 1)  # the trainer logs progress itself
    return merged

def _zero_settings(zero: dict, where, zero_stage: int | None, offload_optimizer: bool | None,
                   environ: Mapping[str, str]) -> tuple[int, bool, str | None]:
    """(ZeRO stage, optimizer offload, the file's offload device) agreed between the Hydra keys,
    the user's file and accelerate's environment (a conflict is an error naming both)."""
    stage = _agree(
        "zero stage",
        [
            ("deepspeed.zero_stage", zero_stage),
            (where("stage"), zero.get("stage")),
            ("accelerate launch --zero_stage", _int_or_none(environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE"))),
        ],
        default=DEFAULT_ZERO_STAGE,
    )
    if stage not in (1, 2, 3):
        raise DeepSpeedConfigError(f"the ZeRO stage must be 1, 2 or 3 (GradCache needs ZeRO's coalesced reduction), got {stage}")
    file_device = (zero.get("offload_optimizer") or {}).get("device")
    accelerate_device = environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE")
    offload = _agree(
        "optimizer offload",
        [
            ("deepspeed.offload_optimizer", offload_optimizer),
            (where("offload_optimizer"), None if file_device is None else file_device != "none"),
            ("accelerate launch --offload_optimizer_device", None if accelerate_device is None else accelerate_device != "none"),
        ],
        default=False,
    )
    return stage, offload, file_device


def _owned_keys(user: dict, where, micro_batch_size: int, world_size: int, max_grad_norm: float) -> dict:
    """The keys the trainer sets itself (a user's file may say "auto" or the same value), after
    refusing the sections the trainer builds (optimizer, schedule, mixed precision)."""
    owned = {
        "train_batch_size": micro_batch_size * world_size,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": float(max_grad_norm),
    }
    reasons = {
        "train_batch_size": "set data.batch_size",
        "train_micro_batch_size_per_gpu": "set data.batch_size (the global batch)",
        "gradient_accumulation_steps": "GradCache takes one optimizer step per batch (use grad_cache.chunk_size)",
        "gradient_clipping": "set trainer.max_grad_norm",
    }
    for key, value in owned.items():
        given = user.get(key, "auto")
        if given != "auto" and given != value:
            raise DeepSpeedConfigError(f"{where(key)}: {key} is {given!r}, but the trainer uses {value!r}; {reasons[key]} or write \"auto\"")
    for key in ("optimizer", "scheduler"):
        if key in user:
            raise DeepSpeedConfigError(
                f"{where(key)}: remove \"{key}\"; the trainer builds AdamW and its schedule from trainer.lr, "
                "trainer.weight_decay, trainer.warmup_steps and trainer.schedule"
            )
    for key in ("fp16", "bf16"):
        if (user.get(key) or {}).get("enabled") not in (None, False, "auto"):
            raise DeepSpeedConfigError(
                f"{where(key)}: {key}.enabled must be false or \"auto\"; set trainer.precision instead (autocast over fp32 weights)"
            )
    return owned



def offloads_optimizer(config: Mapping[str, Any]) -> bool:
    device = (config.get("zero_optimization", {}).get("offload_optimizer") or {}).get("device", "none")
    return device != "none"


def _agree(what: str, sources: list[tuple[str, Any]], default: Any) -> Any:
    given = [(name, value) for name, value in sources if value is not None]
    if len({json.dumps(value) for _, value in given}) > 1:
        listed = ", ".join(f"{name} = {json.dumps(value)}" for name, value in given)
        raise DeepSpeedConfigError(f"the {what} is set differently in two places ({listed}); set it once")
    return given[0][1] if given else default


def _int_or_none(value: str | None) -> int | None:
    return None if value in (None, "") else int(value)


def _read_json(path: str) -> tuple[dict, str]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise DeepSpeedConfigError(f"{file}: DeepSpeed config file not found")
    text = file.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DeepSpeedConfigError(f"{file}: line {err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(data, dict):
        raise DeepSpeedConfigError(f"{file}: line 1: a DeepSpeed config must be a JSON object")
    return data, text


class _Locator:
    """Names 'FILE: line N: "key"' for error messages (the first line that mentions the key)."""

    def __init__(self, path: str | None, text: str) -> None:
        self.path, self.lines = path, text.splitlines()

    def __call__(self, key: str) -> str:
        line = next((i for i, text in enumerate(self.lines, 1) if f'"{key}"' in text), None)
        return f"{self.path}: line {line}: \"{key}\"" if line else f"{self.path}: \"{key}\""
