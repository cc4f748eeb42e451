"""What every rank must agree on before a long job: the same world, seed, data, weights, library
versions and hardware. Each rank states its facts; a rank that differs from rank 0 is named."""

from __future__ import annotations

import hashlib
import platform
from importlib import metadata

import torch

from trainer.core import distributed
from trainer.run.build import Run


def parameter_hash(run: Run) -> str:
    """SHA-256 of every parameter's fp32 values in name order (whole, also under ZeRO-3)."""
    digest = hashlib.sha256()
    engine_partitioned = run.backend.partitions_parameters
    for name, p in sorted(run.encoder.named_parameters()):
        if engine_partitioned:
            from deepspeed.utils import safe_get_full_fp32_param

            value = safe_get_full_fp32_param(p)
        else:
            value = p
        digest.update(name.encode())
        digest.update(value.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _nccl_version() -> str | None:
    if not torch.distributed.is_nccl_available():
        return None
    version = torch.cuda.nccl.version()  # a tuple in recent torch releases, an int in older ones
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def facts(run: Run) -> dict:
    device = run.device
    cuda = device.type == "cuda"
    return {
        "world_size": run.env.world_size,
        "seed": run.cfg.trainer.seed,
        "data": [folder.name for table in run.inputs.data.tables for folder in table.folders],
        "model": parameter_hash(run),
        "versions": {name: _version(name) for name in ("torch", "transformers", "deepspeed", "contrastive-trainer")},
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu ({platform.machine()})",
        "nccl": _nccl_version() if cuda else None,
        "host": platform.node(),
    }


# Facts that may differ between ranks without harm (several nodes have several names).
MAY_DIFFER = ("host",)


def disagreements(every_rank: list[dict]) -> list[tuple[int, str]]:
    """(rank, what it says unlike rank 0) for each fact that differs."""
    out = []
    for rank, mine in enumerate(every_rank[1:], start=1):
        for key, value in mine.items():
            if key not in MAY_DIFFER and value != every_rank[0][key]:
                out.append((rank, f"{key} is {value!r} where rank 0 has {every_rank[0][key]!r}"))
    return out


def check_agreement(run: Run) -> tuple[list[dict], list[tuple[int, str]]]:
    """(every rank's facts, disagreements) on every rank (a collective)."""
    every_rank = distributed.all_gather_object(facts(run))
    return every_rank, disagreements(every_rank)
