"""The check's report: a table on stdout and the same figures in check.json; exit status 0 only
when every exactness check held on every rank."""

from __future__ import annotations

import json
from pathlib import Path

from trainer.core import atomic


def _gib(value) -> str:
    return "-" if value is None else f"{value / 2**30:.2f} GiB"


def _seconds(value) -> str:
    if value is None:
        return "-"
    if value < 0.1:
        return f"{value * 1e3:.1f} ms"
    if value >= 3600:
        return f"{value / 3600:.1f} h"
    return f"{value / 60:.1f} min" if value >= 120 else f"{value:.2f} s"


def _budget(cost: dict) -> str:
    if not cost["chunk_tokens"] and not cost["chunk_size"]:
        return "no chunking (grad_cache.chunk_size and chunk_tokens unset: one pass per step)"
    probed = [r["probed_chunk_rows"] for r in cost["ranks"] if r["probed_chunk_rows"] is not None]
    picked = f"; each rank's probe: {', '.join(map(str, probed))} rows" if probed else ""
    return f"{cost['chunk_tokens'] or '-'} tokens / {cost['chunk_size'] or '-'} rows a chunk{picked}"


def table(report: dict) -> str:
    """The report as the lines a user reads first."""
    e, cost, fabric = report["exactness"], report["cost"], report["fabric"]
    lines = [f"trainer.check: {report['world_size']} rank(s), {report['backend']}, {report['precision']}, "
             f"{report['device']}", ""]
    rows = [
        ("gradient vs reference (re-embedded)", f"{e['difference_re-embedded']:.2e}"),
        ("gradient vs reference (kept graphs)", f"{e['difference_kept']:.2e}"),
        ("tolerance", f"{e['tolerance']:.1e}  ({e['tolerance_reason']})"),
        ("rows per rank, chunk", f"{e['rows_per_rank']} rows, chunks of {e['chunk_rows']} text(s) "
                                 f"({e['chunks_re-embedded']} chunks)"),
        ("reductions per step", "plain {plain}, re-embedded {re-embedded}, kept {kept}".format(**e["reductions"])),
        ("gather gradient factor", "-" if e.get("gather_gradient_factor") is None
         else f"{e['gather_gradient_factor']:.4g} (expected {report['world_size']})"),
        ("replay with dropout", f"twice {e['replay_difference']:.1e}, vs kept {e['replay_kept_difference']:.1e}"
                                + ("" if e["replay_dropout"] else " (the model has no dropout)")),
        ("ranks agree", "yes" if not report["disagreements"] else f"no ({len(report['disagreements'])})"),
    ]
    if fabric.get("ranks"):
        slow = fabric["ranks"][fabric["slowest_rank"]]
        rows += [("all-gather (slowest rank)", f"{slow['gather_s'] * 1e3:.2f} ms, {slow['gather_gbps']:.2f} GB/s, "
                                               f"rank {fabric['slowest_rank']}"),
                 ("all-reduce (slowest rank)", f"{slow['reduce_s'] * 1e3:.2f} ms, {slow['reduce_gbps']:.2f} GB/s")]
    mfu = [r["mfu"] for r in cost["ranks"] if r["mfu"] is not None]
    rows += [
        ("chunk budget", _budget(cost)),
        ("peak memory (largest rank)", _gib(max((r["peak_bytes"] for r in cost["ranks"] if r["peak_bytes"] is not None),
                                                default=None))),
        ("step at batch " + str(cost["batch_size"]), f"{_seconds(cost['step_s'])}: {cost['pairs_per_s']:.1f} pairs/s, "
                                                    f"{cost['tokens_per_s']:.0f} tokens/s"
                                                    + (f", MFU {min(mfu):.1%}" if mfu else "")),
        ("input path", f"{_seconds(cost['input_s_per_batch'])} a batch in one process "
                       f"({cost['input_s_per_batch'] / cost['step_s']:.2f}x the step; data.num_workers={cost['num_workers']})"),
        ("projected run", f"{_seconds(cost['projected_s'])}: {cost['total_steps']} steps"
                          + (f" + {cost['evaluations']} evaluations of ~{_seconds(cost['evaluation_s'])}"
                             if cost["evaluations"] else "")),
    ]
    width = max(len(name) for name, _ in rows)
    lines += [f"  {name:<{width}}  {value}" for name, value in rows]
    lines.append("")
    lines += [f"FAIL {line}" for line in report["failures"]] or ["OK: the gather, the chunking and the reduction are exact here"]
    return "\n".join(lines)


def write(report: dict, output: str | Path) -> Path:
    return atomic.write_text(output, json.dumps(report, indent=2, default=str) + "\n")
