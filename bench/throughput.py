"""Training throughput: `forgetless train` against a bare PyTorch loop, side by side in one process.

Same model, same packed token blocks, same steps, same optimizer (AdamW, fp32 master weights) and the
same compute (bf16 autocast where this CPU runs it fast, else fp32; --precision), for full fine-tuning and LoRA. Prints
tokens/s of both and the ratio, and writes bench/results/throughput.json (with a `provenance` block: commit, versions,
CPU, the precision path both loops ran at, allocator) and throughput.md, rendered from the JSON alone. Target:
forgetless >= 0.95x the bare loop. The two loops alternate (bare, forgetless, bare, ...; --repeats pairs): each
pair's ratio is in the JSON and the table, and the headline is the ratio of the means. Each method starts with
an untimed WARMUP_STEPS-step run of both loops. The bench re-executes itself under the allocator the `forgetless`
command uses (forgetless.allocator: tcmalloc where installed), so both loops run as a user's training does.

    python bench/throughput.py                       # smollm2-135m-instruct, 8 x 256 tokens, 12 steps
    python bench/throughput.py --model stories260k --steps 50
    python bench/throughput.py --render bench/results/throughput.json   # only re-render the markdown
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from forgetless import precision, provenance
from forgetless.data import build_examples
from forgetless.data.loading import Record
from forgetless.io import atomic_write_json, atomic_write_text
from forgetless.models import resolve_model
from forgetless.recipe import DataConfig, recipe_from_dict
from forgetless.testing import WORDS
from forgetless.train import train
from forgetless.train.model import load_tokenizer, pick_device, prepare_model
from forgetless.train.run import setup_torch

RESULTS = Path(__file__).resolve().parent / "results"
TARGET = 0.95
WARMUP_STEPS = 1  # untimed steps of both loops before each method's pairs
SUSPECT = 1.10  # forgetless cannot beat a loop doing the same work by more than noise: past this, the two differ


def make_text(n_docs: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"text": " ".join(rng.choice(WORDS) for _ in range(300))} for _ in range(n_docs)]


def bare_loop(model_path: str, method: dict, blocks: list[dict], steps: int, batch: int, lr: float, bf16: bool) -> dict:
    """The baseline: a hand-written loop with the same model preparation, optimizer and autocast."""
    r = recipe_from_dict({"model": model_path, "data": {"train": "unused"}, "method": method})
    torch.manual_seed(0)
    model = prepare_model(model_path, r.model, r.method, pick_device("cpu"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    tokens = 0
    t0 = time.perf_counter()
    for step in range(steps):
        chunk = blocks[(step * batch) % len(blocks) : (step * batch) % len(blocks) + batch]
        ids = torch.tensor([b["input_ids"] for b in chunk])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += ids.numel()
    dt = time.perf_counter() - t0
    return {"tokens": tokens, "seconds": dt, "tokens_per_s": tokens / dt, "final_loss": loss.item()}


def forgetless_run(model_path: str, method: dict, data_file: Path, steps: int, batch: int, seq: int, lr: float,
                   out: Path, bf16: bool) -> dict:
    r = recipe_from_dict({
        "name": "throughput",
        "model": model_path,
        "data": {"train": str(data_file), "format": "text", "max_length": seq, "packing": True},
        "method": method,
        "optim": {"lr": lr, "max_steps": steps, "batch_size": batch, "warmup_steps": 0, "schedule": "constant"},
        "train": {"output_dir": str(out), "save_steps": None, "logging_steps": max(1, steps // 4), "progress": False,
                  "bf16": bf16},
    })
    s = train(r, overwrite=True, quiet=True).summary
    return {"tokens": s["tokens_seen"], "seconds": s["wall_time_s"], "tokens_per_s": s["tokens_per_s"],
            "final_loss": s["final_train_loss"], "precision": s.get("precision")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--methods", default="full,lora")
    ap.add_argument("--repeats", type=int, default=2, help="alternate bare/forgetless runs this many times each")
    ap.add_argument("--out", type=Path, default=RESULTS / "throughput.json")
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                    help="compute of both loops (auto: bf16 only where this CPU runs it fast)")
    ap.add_argument("--render", type=Path, default=None,
                    help="only re-render the markdown of this saved JSON result (beside it) and exit")
    args = ap.parse_args()
    if args.render:
        from _saved_result import rerender

        rerender(args.render, render_md)
        return

    from forgetless.allocator import reexec

    reexec()  # both loops under the allocator the `forgetless` command runs with (tcmalloc where installed)
    setup_torch()
    resolved = resolve_model(args.model)
    # both loops run the resolved compute (the bare loop's autocast by hand, forgetless with train.bf16 set to it)
    prec = precision.resolve(args.precision, "cpu", widths=precision.config_widths(resolved.path))
    prov = provenance.collect(prec, device="cpu")
    tok = load_tokenizer(resolved.path)
    tmp = Path(tempfile.mkdtemp(prefix="fl-bench-"))
    docs = make_text(args.steps * args.batch)
    data_file = tmp / "text.jsonl"
    data_file.write_text("".join(json.dumps(d) + "\n" for d in docs))
    records = [Record(d, str(data_file), i + 1) for i, d in enumerate(docs)]
    blocks, _ = build_examples(records,
                               DataConfig(train=str(data_file), format="text", max_length=args.seq, packing=True), tok)
    blocks = [b for b in blocks if len(b["input_ids"]) == args.seq]

    methods = {"full": {"name": "full"}, "lora": {"name": "lora", "r": 16}}
    rows = []
    for name in args.methods.split(","):
        method, lr = methods[name], (2e-5 if name == "full" else 2e-4)
        bare, ours = [], []
        # untimed warm-up of both loops: the first run in a process pays one-off costs (imports, oneDNN primitive
        # creation, first reads of the weights) that would otherwise land on whichever loop goes first
        print(f"[{name}] warm-up ({WARMUP_STEPS} step(s) of each loop, not timed) ...", file=sys.stderr, flush=True)
        bare_loop(resolved.path, method, blocks, WARMUP_STEPS, args.batch, lr, prec.bf16)
        forgetless_run(resolved.path, method, data_file, WARMUP_STEPS, args.batch, args.seq, lr, tmp / f"warm-{name}",
                       prec.bf16)
        for i in range(args.repeats):
            print(f"[{name}] repeat {i + 1}/{args.repeats}: bare loop ...", file=sys.stderr, flush=True)
            bare.append(bare_loop(resolved.path, method, blocks, args.steps, args.batch, lr, prec.bf16))
            print(f"[{name}] repeat {i + 1}/{args.repeats}: forgetless train ...", file=sys.stderr, flush=True)
            ours.append(forgetless_run(resolved.path, method, data_file, args.steps, args.batch, args.seq, lr,
                                       tmp / f"run-{name}", prec.bf16))
        b = sum(x["tokens_per_s"] for x in bare) / len(bare)
        f = sum(x["tokens_per_s"] for x in ours) / len(ours)
        rows.append({"method": name, "bare_tokens_per_s": round(b, 1), "forgetless_tokens_per_s": round(f, 1),
                     "ratio": round(f / b, 3),
                     "pair_ratios": [round(o["tokens_per_s"] / x["tokens_per_s"], 3)
                                     for x, o in zip(bare, ours, strict=True)],
                     "bare_runs": bare, "forgetless_runs": ours})

    print(f"\nthroughput, {args.model}, batch {args.batch} x {args.seq} tokens, {args.steps} steps, {prec.dtype} "
          "compute + fp32 master weights")
    print(f"{'method':<8}{'bare tok/s':>12}{'forgetless tok/s':>18}{'ratio':>8}")
    for r in rows:
        print(f"{r['method']:<8}{r['bare_tokens_per_s']:>12.1f}{r['forgetless_tokens_per_s']:>18.1f}{r['ratio']:>8.3f}")
    result = {
        "bench": "throughput",
        "model": args.model,
        "model_path": resolved.path,
        "steps": args.steps,
        "batch": args.batch,
        "seq": args.seq,
        "repeats": args.repeats,
        "warmup_steps": WARMUP_STEPS,
        "machine": {"platform": platform.platform(), "cpus": torch.get_num_threads(), "torch": torch.__version__},
        "target": f"forgetless >= {TARGET}x bare loop",
        "target_ratio": TARGET,
        "rows": rows,
    }
    prov = provenance.finish(prov)
    seen = sorted({(r.get("precision") or {}).get("dtype") for row in rows for r in row["forgetless_runs"]} - {None})
    prov["precision"] = {**prov["precision"],
                         "observed": {"bare loop": f"{prec.dtype} (autocast enabled={prec.bf16})",
                                      "forgetless train (summary.json)": seen}}
    result["provenance"] = prov
    atomic_write_json(args.out, result)
    atomic_write_text(args.out.with_suffix(".md"), render_md(result))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


def render_md(result: dict) -> str:
    """The markdown table, from the JSON result alone."""
    prov = result.get("provenance") or {}
    compute = provenance.compute_of(result)
    target = result.get("target_ratio", TARGET)
    lines = [f"# throughput: {result['model']}, {result['batch']} x {result['seq']} tokens, {result['steps']} steps",
             "",
             f"`forgetless train` against a bare PyTorch loop doing the same work (same model preparation, packed "
             f"blocks, AdamW with fp32 master weights, {compute}), alternating, {result['repeats']} pair(s) "
             "per method. Tokens/s is the mean over the pairs; each pair's ratio is shown. "
             + (f"Each method's pairs follow an untimed {result['warmup_steps']}-step run of both loops."
                if result.get("warmup_steps") else "No untimed warm-up: the first pair's bare loop paid the "
                "process's one-off costs."), "",
             provenance.provenance_line(result), "",
             "| method | bare tok/s | forgetless tok/s | ratio | each pair | verdict |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        pairs = r.get("pair_ratios") or [round(o["tokens_per_s"] / x["tokens_per_s"], 3)
                                         for x, o in zip(r["bare_runs"], r["forgetless_runs"], strict=True)]
        if not prov:
            verdict = "not judged (no provenance)"
        elif r["ratio"] > SUSPECT:
            verdict = f"SUSPECT: faster than a loop doing the same work (> {SUSPECT}x)"
        else:
            verdict = f"{'PASS' if r['ratio'] >= target else 'FAIL'} (target >= {target}x)"
        lines.append(f"| {r['method']} | {r['bare_tokens_per_s']:.1f} | {r['forgetless_tokens_per_s']:.1f} | "
                     f"{r['ratio']:.3f}x | {', '.join(f'{x:.3f}' for x in pairs)} | {verdict} |")
    if not prov:
        lines += ["", "Without provenance the two loops' precision paths cannot be shown to be the same: this result "
                  "does not support a ratio claim."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
