"""``gpt2repro bench gpu``: the 10-minute check, on a GPU, of what the CPU tests cannot run.

FlexAttention against SDPA and over the record's window schedule, and the modern model's dtypes under
CUDA autocast; then each preset trains ``--steps`` steps (the faithful 124M once more under FSDP2, a
group of one): median tokens/s, MFU, every step's loss, and HellaSwag items/s of the modern model. The
report goes to ``OUT/gpu_check.md`` and, with ``--docs FILE``, between FILE's ``bench gpu`` markers.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from gpt2repro.bench import data_folder, machine_name, quiet_overrides
from gpt2repro.bench.eval import synthetic_items
from gpt2repro.config.presets import get_preset
from gpt2repro.config.settings import apply_overrides
from gpt2repro.data.tokenizer import EOT_TOKEN
from gpt2repro.device import DistInfo, Runtime, peak_flops, pick_autocast_dtype
from gpt2repro.errors import UserError
from gpt2repro.eval.hellaswag import evaluate_hellaswag
from gpt2repro.files import atomic_write, folder_target
from gpt2repro.model import attention
from gpt2repro.model import gpt as gpt_module
from gpt2repro.model.gpt import GPT
from gpt2repro.model.load import load_model
from gpt2repro.runlog import LOG_FILE, read_log
from gpt2repro.train.console import mfu, percent
from gpt2repro.train.parallel import Parallel
from gpt2repro.train.trainer import train

START, END = "<!-- bench gpu: start -->", "<!-- bench gpu: end -->"
UNTIMED_STEPS = 3  # compilation and allocator growth
FSDP_STEPS = 20  # enough to time; the 10-minute budget is the whole check's


def flex_checks(device: torch.device) -> list[str]:
    """FlexAttention forward and backward over the record's window sizes, counting Dynamo's graphs (one expected:
    a graph per window ends in unfused flex past the recompile limit), then its largest window against SDPA."""
    if device.type != "cuda":
        return ["FlexAttention: not run (no CUDA device)"]
    from torch._dynamo.utils import counters

    record = get_preset("gpt2-124m-modern")
    schedule = attention.window_schedule(record.model, record.optim.max_steps)
    g = torch.Generator(device=device).manual_seed(0)
    B, H, T, D = 1, 6, 16384, 128
    tokens = torch.randint(0, EOT_TOKEN, (B, T), device=device, generator=g)
    tokens[:, ::3000] = EOT_TOKEN
    docs = attention.document_ids(tokens)
    q, k, v = (torch.randn(B, H, T, D, device=device, generator=g, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    graphs = counters["stats"]["unique_graphs"]
    for blocks in schedule:
        y_flex = attention.compiled_flex_attention()(q, k, v, block_mask=attention.flex_block_mask(
            docs, blocks, 128, B, T, device))
        grads_flex = torch.autograd.grad(y_flex.float().square().sum(), (q, k, v))
    built = counters["stats"]["unique_graphs"] - graphs
    y_ref = attention.local_attention(q, k, v, attention.LocalMask(0, docs, schedule[-1], 128))
    grads_ref = torch.autograd.grad(y_ref.float().square().sum(), (q, k, v))
    out = (y_flex - y_ref).abs().max().item()
    grad = max(F.l1_loss(a.float(), b.float()).item() for a, b in zip(grads_flex, grads_ref))
    return [f"FlexAttention over the record's {len(schedule)} window sizes (forward and backward, {T:,} tokens): "
            f"{built} graph{'s' * (built != 1)} built (one expected)",
            f"FlexAttention at {schedule[-1]} blocks vs SDPA (bf16): max |Δ out| {out:.2e}, mean |Δ grad| {grad:.2e}"]


def compute_dtypes(model: GPT, rt: Runtime, tokens: torch.Tensor) -> dict[str, set[torch.dtype]]:
    """The dtypes one forward under ``rt``'s autocast gives the residual stream (into and out of each
    block), x0, q and k: the record keeps them all bf16."""
    seen: dict[str, set] = {"residual": set(), "x0": set(), "q": set(), "k": set()}
    hooks = []
    for block in model.transformer.h:
        hooks.append(block.register_forward_pre_hook(
            lambda m, a: seen["residual"].add(a[0].dtype) or seen["x0"].add(a[4].dtype)))
        hooks.append(block.register_forward_hook(lambda m, a, out: seen["residual"].add(out.dtype)))
    real = gpt_module.attention_for

    def recording(*args, **kwargs):
        attend = real(*args, **kwargs)

        def wrapped(q, k, v):
            seen["q"].add(q.dtype)
            seen["k"].add(k.dtype)
            return attend(q, k, v)
        return wrapped

    gpt_module.attention_for = recording
    try:
        with torch.no_grad(), rt.autocast():
            model.hidden(tokens)
    finally:
        gpt_module.attention_for = real
        for hook in hooks:
            hook.remove()
    return seen


def residual_dtype_check(device: torch.device) -> str:
    """The dtypes of the modern model's residual stream, x0, q and k under CUDA's own autocast."""
    if device.type != "cuda":
        return "residual stream dtype: not checked (no CUDA device)"
    cfg = get_preset("gpt2-124m-modern")
    rt = Runtime(DistInfo(), device, torch.bfloat16, False, False, 0)
    model = GPT(cfg.model).to(device)
    Parallel(model, cfg, rt)  # the trainer's set-up: bf16 tables
    seen = compute_dtypes(model, rt, torch.randint(0, EOT_TOKEN, (1, 8192), device=device))
    found = ", ".join(f"{name} {'/'.join(str(d).removeprefix('torch.') for d in sorted(kinds, key=str))}"
                      for name, kinds in seen.items())
    return f"gpt2-124m-modern under CUDA bf16 autocast: {found} (the record's: all bfloat16)"


def hellaswag_check(run_dir: Path, device: torch.device) -> str:
    """HellaSwag items/s on the modern model a run trained (random-word items: only speed is read)."""
    model = load_model(str(run_dir), str(device))
    n = 1000 if device.type == "cuda" else 100  # --allow-cpu: the machinery, quickly
    result = evaluate_hellaswag(model, synthetic_items(n), scorings=("completion",), device=device,
                                autocast_dtype=pick_autocast_dtype("auto", device))
    return f"HellaSwag on {run_dir.name}'s model: {result['items_per_s']:,.0f} items/s ({n:,} synthetic items)"


def run_preset(name: str, data: Path, out: Path, steps: int, device: torch.device, *overrides: str) -> dict:
    """Train preset ``name`` quietly for ``steps`` steps: its median tokens/s, MFU and every step's loss."""
    cfg = apply_overrides(get_preset(name), quiet_overrides(data, out, *overrides))
    with contextlib.redirect_stdout(io.StringIO()):
        metrics = train(cfg, stop_at_step=steps)
    seconds = metrics["step_seconds"]
    first = UNTIMED_STEPS if len(seconds) > UNTIMED_STEPS else 0
    tokens_per_s = cfg.optim.total_batch_tokens / statistics.median(seconds[first:])
    # FLOPs at the window of the middle step timed: the record's grows over its run, so not the final one
    window = attention.window_blocks(cfg.model, (first + len(seconds) - 1) // 2 / cfg.optim.max_steps)
    with torch.device("meta"):
        flops = GPT(cfg.model).flops_per_token(cfg.data.seq_len, window)
    peak = peak_flops(device)
    return {"preset": " ".join([name, *overrides]), "tokens_per_s": tokens_per_s, "mfu": mfu(tokens_per_s, flops, peak),
            "losses": [value for _, value in read_log(out / LOG_FILE)[0].get("train", [])], "cfg": cfg}


def report(results: list[dict], checks: list[str], device: str) -> str:
    lines = [f"Measured {datetime.date.today().isoformat()} on one {machine_name(device)} with `gpt2repro bench gpu`, "
             f"torch {torch.__version__}.", "", *(f"- {check}" for check in checks), "",
             "| preset | tokens/step | tokens/s (median) | MFU | loss at step 0 → last |", "|---|---|---|---|---|"]
    lines += [f"| `{r['preset']}` | {r['cfg'].optim.total_batch_tokens:,} | {r['tokens_per_s']:,.0f} | "
              f"{percent(r['mfu'])} | {r['losses'][0]:.3f} → {r['losses'][-1]:.3f} |" for r in results]
    for r in results:
        lines += ["", f"`{r['preset']}` loss per step: " + ", ".join(f"{v:.3f}" for v in r["losses"])]
    return "\n".join(lines) + "\n"


def around_markers(path: Path) -> tuple[str, str]:
    """``path``'s text before START and after END, refused unless it holds each once, START first."""
    try:
        current = path.read_text()
    except OSError as e:
        raise UserError(f"--docs {path}: cannot read it ({e.strerror or e})") from None
    if current.count(START) != 1 or current.count(END) != 1 or current.index(START) > current.index(END):
        raise UserError(f"--docs {path}: needs one line {START} and, after it, one line {END}; add them where "
                        "the results should go")
    before, rest = current.split(START)
    return before, rest.split(END)[1]


def bench_gpu(args: argparse.Namespace) -> list[dict]:
    if args.steps <= UNTIMED_STEPS:
        raise UserError(f"--steps {args.steps}: needs more than the {UNTIMED_STEPS} untimed steps, e.g. --steps 50")
    if not torch.cuda.is_available() and not args.allow_cpu:
        raise UserError("bench gpu: no CUDA device here; run it on a GPU machine (or --allow-cpu with small "
                        "--presets, to try the command)")
    out = folder_target(args.out, "--out")
    if out.exists():
        raise UserError(f"--out {out}: already exists; pass a new folder")
    if args.docs:
        around_markers(Path(args.docs))  # before the runs, not after them
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    checks = [*flex_checks(device), residual_dtype_check(device)]
    print("\n".join(checks), flush=True)
    data = data_folder(args.data, out)
    presets = args.presets.split(",")
    results = []
    for name in presets:
        print(f"training {name} for {args.steps} steps ...", flush=True)
        results.append(run_preset(name, data, out / name, args.steps, device))
        if results[-1]["cfg"].optim.optimizer == "muon":
            checks.append(hellaswag_check(out / name, device))
            print(checks[-1], flush=True)
    first = presets[0]
    if results[0]["cfg"].optim.optimizer == "adamw":  # FSDP2's path on this one GPU, a group of one
        steps = FSDP_STEPS if device.type == "cuda" else args.steps
        print(f"training {first} under --parallel fsdp for {steps} steps ...", flush=True)
        results.append(run_preset(first, data, out / f"{first}-fsdp", steps, device, "runtime.parallel=fsdp"))
    text = report(results, checks, str(device))
    print(text, end="")
    atomic_write(out / "gpu_check.md", text)
    if args.docs:
        before, after = around_markers(Path(args.docs))  # read again: only what stands between them changes
        atomic_write(Path(args.docs), f"{before}{START}\n{text}{END}{after}")
        print(f"written into {args.docs}")
    return results
