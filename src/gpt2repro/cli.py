"""The ``gpt2repro`` command: parse arguments, call the module that does the work.

Heavy imports (torch, datasets, matplotlib) happen inside each command so that
``--help`` stays instant. A ``UserError`` becomes one line on stderr and exit
code 2; ``--debug`` shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from gpt2repro.errors import UserError

PLOT_SIZES = ("124M", "350M", "774M", "1558M")


def _add_device_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto | cuda | cuda:N | mps | cpu")
    p.add_argument("--dtype", default="auto", help="auto | bfloat16 | float16 | float32")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpt2repro",
        description="Pretrain GPT-2 from scratch and show it matches OpenAI's checkpoint.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    # --debug is accepted after the subcommand too; SUPPRESS keeps a leading --debug intact.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("prepare", parents=[common], help="tokenize a corpus into GPT-2 token shards")
    p.add_argument("--source", default="fineweb-edu",
                   help="fineweb-edu | demo | a .txt/.jsonl/.parquet file, directory or glob")
    p.add_argument("--out", required=True, help="output directory for the .npy shards")
    p.add_argument("--name", default="sample-10BT", help="FineWeb-edu config (default sample-10BT)")
    p.add_argument("--streaming", action="store_true",
                   help="stream FineWeb-edu instead of downloading its parquet files first")
    p.add_argument("--shard-tokens", type=int, default=None,
                   help="tokens per shard (default 100M; the demo corpus: 1M, val 65,536)")
    p.add_argument("--val-tokens", type=int, default=None,
                   help="tokens in the val shard (default: one full shard)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizer processes")
    p.add_argument("--max-tokens", type=int, default=None, help="stop after this many tokens")
    p.add_argument("--prefix", default=None, help="shard file prefix (default from the source)")

    p = sub.add_parser("train", parents=[common], help="pretrain a model (one process, or under torchrun)")
    p.add_argument("--preset", default="gpt2-124m-10b", help="training preset (see README)")
    p.add_argument("--data", default=None, help="directory of token shards")
    p.add_argument("--out", default=None, help="run directory: log, checkpoints, samples")
    p.add_argument("--max-steps", type=int, default=None, help="length of the LR schedule")
    p.add_argument("--stop-at-step", type=int, default=None,
                   help="checkpoint and exit after this step, without changing the schedule")
    p.add_argument("--micro-batch", default=None, help="sequences per rank per micro-step, or 'auto'")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p.add_argument("--parallel", default=None,
                   help="ddp (default: a replica per rank) or fsdp (FSDP2: shards weights, grads, optimizer state)")
    p.add_argument("--compile", dest="compile", action="store_true", default=None)
    p.add_argument("--no-compile", dest="compile", action="store_false")
    _add_device_flags(p)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, e.g. optim.max_lr=3e-4 or eval.val_every=100")

    p = sub.add_parser("eval", parents=[common], help="evaluate a model")
    eval_sub = p.add_subparsers(dest="task", metavar="TASK", required=True)
    e = eval_sub.add_parser("hellaswag", parents=[common], help="HellaSwag val accuracy, two scorings")
    e.add_argument("--model", required=True, help="our checkpoint/run dir, a Hugging Face dir, or a hub name")
    e.add_argument("--data", default=None, help="hellaswag jsonl (default: download the official val file)")
    e.add_argument("--limit", type=int, default=None, help="evaluate only the first N items")
    e.add_argument("--batch-size", type=int, default=32, help="items per forward pass")
    e.add_argument("--json", default=None, help="also write the results to this file")
    _add_device_flags(e)

    p = sub.add_parser("plot", parents=[common], help="plot loss and HellaSwag curves from training logs")
    p.add_argument("--log", action="append", required=True, help="log.txt (repeat to overlay runs)")
    p.add_argument("--sz", default="124M", choices=PLOT_SIZES, help="model size, for baselines")
    p.add_argument("--out", default="plot.png", help="output PNG")
    p.add_argument("--x", default="step", choices=("step", "tokens"),
                   help="horizontal axis: optimizer steps, or tokens seen (runs of different batch sizes)")
    p.add_argument("--tokens-per-step", type=int, default=524_288,
                   help="with --x tokens, for a log without the run's config.json beside it")
    p.add_argument("--show", action="store_true", help="also open a window")

    p = sub.add_parser("sample", parents=[common], help="generate text from a model")
    p.add_argument("--model", required=True)
    p.add_argument("--prompt", default="Hello, I'm a language model,")
    p.add_argument("--num", type=int, default=5, help="number of samples")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--no-kv-cache", action="store_true", help="recompute the prefix each token")
    _add_device_flags(p)

    p = sub.add_parser("export", parents=[common], help="write a checkpoint as a Hugging Face GPT-2 directory")
    p.add_argument("--model", required=True, help="our checkpoint or run directory")
    p.add_argument("--out", required=True, help="output directory")

    p = sub.add_parser("bench", parents=[common], help="benchmarks: fast path against a plain baseline, same run")
    bench_sub = p.add_subparsers(dest="what", metavar="WHAT", required=True)
    b = bench_sub.add_parser("train", parents=[common], help="training tokens/s, MFU, step time, memory")
    b.add_argument("--preset", default="gpt2-124m-10b")
    b.add_argument("--micro-batch", type=int, default=None)
    b.add_argument("--seq-len", type=int, default=None)
    b.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    b.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    b.add_argument("--variants", default="auto", help="comma list, or auto for the device's set")
    _add_device_flags(b)
    b = bench_sub.add_parser("eval", parents=[common], help="HellaSwag items/s, batched vs one at a time")
    b.add_argument("--model", default="tiny", help="a model preset name or MODEL")
    b.add_argument("--data", default=None, help="hellaswag jsonl (default: synthetic items)")
    b.add_argument("--limit", type=int, default=200)
    b.add_argument("--batch-size", type=int, default=32)
    _add_device_flags(b)
    b = bench_sub.add_parser("tokenize", parents=[common], help="prepare's tokenizer path vs a per-document Pool loop")
    b.add_argument("--source", default="demo", help="demo or a local corpus path")
    b.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    b.add_argument("--max-docs", type=int, default=None)

    b = bench_sub.add_parser("recipe", parents=[common],
                             help="quality per token: demo vs demo-modern on the built-in corpus, optional ablation")
    b.add_argument("--out", default="runs/bench-recipe", help="a new folder for the runs, the data and the plot")
    b.add_argument("--data", default=None, help="token shards (default: prepare the built-in corpus into OUT/data)")
    b.add_argument("--seeds", default="1,2,3", help="comma list of seeds")
    b.add_argument("--max-steps", type=int, default=500, help="steps per run (the demo preset's 500)")
    b.add_argument("--val-every", type=int, default=25)
    b.add_argument("--ablation", action="store_true", help="also each lever added alone / removed alone")

    b = bench_sub.add_parser("memory", parents=[common], help="estimated per-rank memory: sizes × DDP/FSDP × ranks")
    b.add_argument("--presets", default="gpt2-124m-10b,gpt2-350m-10b,gpt2-774m-10b,gpt2-1558m-10b")
    b.add_argument("--ranks", default="2,4,8", help="FSDP world sizes")

    p = sub.add_parser("demo", parents=[common], help="prepare the built-in corpus, train a small model, plot, sample")
    p.add_argument("--out", default="demo_out", help="folder for everything the demo writes")
    p.add_argument("--max-steps", type=int, default=None, help="training steps (default: the demo preset's)")
    return parser


def train_config(args: argparse.Namespace):
    """The preset, then the named flags, then KEY=VALUE overrides (last wins)."""
    from gpt2repro.config import apply_overrides, get_preset

    cfg = get_preset(args.preset)
    flags = {"data.path": args.data, "out_dir": args.out, "optim.max_steps": args.max_steps,
             "data.micro_batch": args.micro_batch, "runtime.compile": args.compile, "runtime.parallel": args.parallel,
             "runtime.device": None if args.device == "auto" else args.device,
             "runtime.dtype": None if args.dtype == "auto" else args.dtype}
    named = [f"{key}={value}" for key, value in flags.items() if value is not None]
    return apply_overrides(cfg, named + list(args.overrides))


def sample_command(args: argparse.Namespace) -> list[str]:
    """Print ``--num`` continuations of ``--prompt``."""
    from gpt2repro.data.tokenizer import decode, encode
    from gpt2repro.device import autocast
    from gpt2repro.load import load_for_inference
    from gpt2repro.model.generate import generate

    for flag, value, low in (("--num", args.num, 1), ("--max-new-tokens", args.max_new_tokens, 0),
                             ("--top-k", args.top_k, 0)):
        if value < low:
            raise UserError(f"{flag} {value}: must be at least {low}")
    if not args.temperature >= 0:
        raise UserError(f"--temperature {args.temperature}: must be 0 (greedy) or more")
    net = load_for_inference(args.model, args.device, args.dtype)
    with autocast(net.device, net.autocast_dtype):
        samples = generate(net.model, encode(args.prompt), num_samples=args.num, max_new_tokens=args.max_new_tokens,
                           top_k=args.top_k or None, temperature=args.temperature, seed=args.seed,
                           kv_cache=not args.no_kv_cache, device=net.device)
    texts = [args.prompt + decode(tokens) for tokens in samples]
    for i, text in enumerate(texts):
        print(f"sample {i}: {text}")
    return texts


def evaluate_hellaswag_command(args: argparse.Namespace) -> dict:
    """HellaSwag on one process, or on every rank under torchrun (items spread over ranks)."""
    import json

    from gpt2repro.atomic import atomic_write
    from gpt2repro.data.tokenizer import encode
    from gpt2repro.distributed import init_distributed, shutdown_distributed
    from gpt2repro.eval.hellaswag import OFFICIAL_URL, evaluate_hellaswag, load_items, summary_lines
    from gpt2repro.load import load_for_inference

    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: must be at least 1")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit {args.limit}: must be at least 1 (leave it out for all items)")
    items = load_items(args.data, args.limit)
    net = load_for_inference(args.model, args.device, args.dtype, int(os.environ.get("LOCAL_RANK", "0")))
    encode("")  # build the BPE tables now, so the first scoring's items/s does not include them
    info = init_distributed(net.device.type)
    try:
        results = evaluate_hellaswag(net.model, items, batch_size=args.batch_size, device=net.device,
                                     autocast_dtype=net.autocast_dtype, rank=info.rank, world_size=info.world_size)
    finally:
        shutdown_distributed()
    if info.is_main:
        for line in summary_lines(results):
            print(line)
        if args.json:
            record = {"model": args.model, "data": str(args.data) if args.data else OFFICIAL_URL, **results}
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            atomic_write(args.json, json.dumps(record, indent=2) + "\n")
    return results


def run(args: argparse.Namespace) -> int:
    if args.command == "prepare":
        from gpt2repro.data.prepare import prepare

        prepare(source=args.source, out_dir=args.out, name=args.name, streaming=args.streaming,
                shard_tokens=args.shard_tokens, val_tokens=args.val_tokens, workers=args.workers,
                max_tokens=args.max_tokens, prefix=args.prefix)
    elif args.command == "train":
        cfg = train_config(args)  # config errors surface before torch is imported
        from gpt2repro.train.trainer import train

        train(cfg, resume=args.resume, stop_at_step=args.stop_at_step)
    elif args.command == "eval":
        evaluate_hellaswag_command(args)
    elif args.command == "plot":
        from gpt2repro.report.plot import plot_logs

        plot_logs(args.log, size=args.sz, out=args.out, show=args.show, x=args.x,
                  default_tokens_per_step=args.tokens_per_step)
    elif args.command == "sample":
        sample_command(args)
    elif args.command == "export":
        from gpt2repro.load import load_model
        from gpt2repro.model.hf import export_hf

        out = export_hf(load_model(args.model), args.out)
        print(f"wrote a Hugging Face GPT-2 directory: {out}")
    elif args.command == "bench":
        from gpt2repro import bench

        bench.run(args)
    elif args.command == "demo":
        from gpt2repro.demo import run_demo

        run_demo(out_dir=args.out, max_steps=args.max_steps)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except UserError as e:
        if args.debug:
            raise
        print(f"gpt2repro {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"gpt2repro {args.command}: interrupted", file=sys.stderr)
        return 130
