"""The ``gpt2repro`` command: parse arguments, call the module that does the work.

Heavy imports (torch, datasets, matplotlib) happen inside each command so that
``--help`` stays instant. A ``UserError`` becomes one line on stderr and exit
code 2; ``--debug`` shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from gpt2repro.argtypes import Parser, count, count_list, number
from gpt2repro.config import MAX_SAMPLE_TOKENS
from gpt2repro.errors import UserError
from gpt2repro.presets import PRESET_ALIASES, TRAIN_PRESETS

PLOT_SIZES = ("124M", "350M", "774M", "1558M")
# More new tokens than this in one `sample` run is a typo, not a request: hours of generation.


def _add_device_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto | cuda | cuda:N | mps | cpu")
    p.add_argument("--dtype", default="auto", help="autocast dtype: auto | bfloat16 | float16 | float32")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
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
                   help="fineweb-edu | fineweb | demo | a .txt/.jsonl/.parquet file, directory or glob")
    p.add_argument("--out", required=True, help="output directory for the .npy shards")
    p.add_argument("--name", default="sample-10BT", help="FineWeb-edu config")
    p.add_argument("--streaming", action="store_true",
                   help="stream FineWeb-edu instead of downloading its parquet files first")
    p.add_argument("--shard-tokens", type=count(1), default=None,
                   help="tokens per shard (default 100M; the demo corpus: 1M, val 65,536)")
    p.add_argument("--val-tokens", type=count(1), default=None,
                   help="tokens in the val shard (default: one full shard)")
    p.add_argument("--workers", type=count(1), default=os.cpu_count() or 1, help="tokenizer processes")
    p.add_argument("--max-tokens", type=count(1), default=None, help="stop after this many tokens (default: all)")
    p.add_argument("--prefix", default=None, help="shard file prefix (default from the source)")

    p = sub.add_parser("train", parents=[common], help="pretrain a model (one process, or under torchrun)")
    p.add_argument("--preset", default="gpt2-124m-10b", metavar="NAME",
                   help=f"training preset: {', '.join(TRAIN_PRESETS)}; or a size alias: "
                        f"{', '.join(f'{a} = {p}' for a, p in PRESET_ALIASES.items())}")
    p.add_argument("--data", default=None, help="directory of token shards (default: the preset's data.path)")
    p.add_argument("--out", default=None, help="run directory: log, checkpoints, samples (default: the preset's)")
    p.add_argument("--max-steps", type=count(1), default=None,
                   help="length of the LR schedule, in optimizer steps (default: the preset's)")
    p.add_argument("--stop-at-step", type=count(1), default=None,
                   help="checkpoint and exit after this step, without changing the schedule")
    p.add_argument("--micro-batch", default=None, help="sequences per rank per micro-step, or 'auto'")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p.add_argument("--init-from", default=None, metavar="MODEL",
                   help="start from MODEL's weights (our checkpoint or run, a Hugging Face GPT-2 folder, a hub name "
                        "such as gpt2) with a fresh optimizer and schedule: fine-tuning, continued pretraining")
    p.add_argument("--overwrite", action="store_true",
                   help="start over: delete the run already in --out (checkpoints, log, samples, config) first")
    p.add_argument("--parallel", default=None,
                   help="ddp (default: a replica per rank) or fsdp (FSDP2: shards weights, grads, optimizer state)")
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="torch.compile the training model (default: on CUDA only)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="never torch.compile")
    _add_device_flags(p)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, e.g. optim.max_lr=3e-4 or eval.val_every=100")

    p = sub.add_parser("eval", parents=[common], help="evaluate a model")
    eval_sub = p.add_subparsers(dest="task", metavar="TASK", required=True)
    e = eval_sub.add_parser("hellaswag", parents=[common], help="HellaSwag val accuracy, two scorings")
    e.add_argument("--model", required=True, help="our checkpoint/run dir, a Hugging Face dir, or a hub name")
    e.add_argument("--data", default=None, help="hellaswag jsonl (default: download the official val file)")
    e.add_argument("--limit", type=count(1), default=None, help="evaluate only the first N items (default: all)")
    e.add_argument("--batch-size", type=count(1), default=32, help="items per forward pass")
    e.add_argument("--json", default=None, help="also write the results to this file")
    _add_device_flags(e)
    e = eval_sub.add_parser("loss", parents=[common],
                            help="mean next-token loss and bits per byte on a split of token shards")
    e.add_argument("--model", required=True, help="our checkpoint/run dir, a Hugging Face dir, or a hub name")
    e.add_argument("--data", required=True, help="a folder of token shards (ours, build-nanogpt's or llm.c's .bin)")
    e.add_argument("--split", default="val", choices=("val", "train"), help="which shards to measure")
    e.add_argument("--tokens", type=count(1), default=None,
                   help="measure the first TOKENS // seq-len windows (default: the whole split)")
    e.add_argument("--seq-len", type=count(1), default=None,
                   help="tokens per window, non-overlapping (default: 1024, or the model's block if shorter)")
    e.add_argument("--batch-size", type=count(1), default=8, help="windows per forward pass")
    e.add_argument("--json", default=None, help="also write the results to this file")
    _add_device_flags(e)
    e = eval_sub.add_parser("harness", parents=[common],
                            help="lm-evaluation-harness tasks (pip install 'gpt2repro[lm-eval]')")
    e.add_argument("--model", required=True, help="our checkpoint/run dir, a Hugging Face dir, or a hub name")
    e.add_argument("--tasks", required=True, help="comma list of lm-eval task names (globs allowed)")
    e.add_argument("--include-path", default=None, help="a folder of your own task YAML files")
    e.add_argument("--limit", type=count(1), default=None, help="only the first N documents of each task")
    e.add_argument("--batch-size", type=count(1), default=32, help="requests per forward pass")
    e.add_argument("--num-fewshot", type=count(0), default=None, help="few-shot examples (default: the task's)")
    e.add_argument("--json", default=None, help="also write the results to this file")
    _add_device_flags(e)

    p = sub.add_parser("plot", parents=[common], help="plot loss and HellaSwag curves from training logs")
    p.add_argument("--log", action="append", required=True, help="log.txt (repeat to overlay runs)")
    p.add_argument("--sz", default="124M", choices=PLOT_SIZES, help="model size, for baselines")
    p.add_argument("--out", default="plot.png", help="output image; its suffix picks the format (.png, .pdf, .svg)")
    p.add_argument("--x", default="step", choices=("step", "tokens"),
                   help="horizontal axis: optimizer steps, or tokens seen (runs of different batch sizes)")
    p.add_argument("--tokens-per-step", type=count(1), default=524_288,
                   help="with --x tokens, for a log without the run's config.json beside it")
    p.add_argument("--show", action="store_true", help="also open a window")

    p = sub.add_parser("sample", parents=[common], help="generate text from a model")
    p.add_argument("--model", required=True, help="our checkpoint/run dir, a Hugging Face dir, or a hub name")
    p.add_argument("--prompt", default="Hello, I'm a language model,", help="the text every sample continues")
    p.add_argument("--num", type=count(1), default=5, help="number of samples (one is printed as it is generated)")
    p.add_argument("--max-new-tokens", type=count(0), default=64,
                   help="tokens generated per sample; past the model's block size the context slides")
    p.add_argument("--top-k", type=count(0), default=50,
                   help="draw from the K most likely tokens; 0 draws from the whole vocabulary")
    p.add_argument("--temperature", type=number(0), default=1.0,
                   help="divides the logits; 0 is greedy (always the most likely token)")
    p.add_argument("--seed", type=count(0, 2**64 - 1), default=42, help="same seed, same samples")
    p.add_argument("--no-kv-cache", action="store_true", help="recompute the prefix each token")
    _add_device_flags(p)

    p = sub.add_parser("export", parents=[common], help="write a checkpoint as a Hugging Face GPT-2 directory")
    p.add_argument("--model", required=True, help="our checkpoint or run directory")
    p.add_argument("--out", required=True, help="output directory (new, or empty)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty --out, replacing files of the same names")

    p = sub.add_parser("bench", parents=[common], help="benchmarks: fast path against a plain baseline, same run")
    bench_sub = p.add_subparsers(dest="what", metavar="WHAT", required=True)
    b = bench_sub.add_parser("train", parents=[common], help="training tokens/s, MFU, step time, memory")
    b.add_argument("--preset", default="gpt2-124m-10b", help="training preset whose model and batch to time")
    b.add_argument("--micro-batch", type=count(1), default=None, help="sequences per step (default: the preset's)")
    b.add_argument("--seq-len", type=count(1), default=None, help="tokens per sequence (default: the preset's)")
    b.add_argument("--steps", type=count(1), default=10, help="timed steps (median reported)")
    b.add_argument("--warmup", type=count(0), default=3, help="untimed steps first")
    b.add_argument("--variants", default="auto", help="comma list, or auto for the device's set")
    b.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides of the preset")
    _add_device_flags(b)
    b = bench_sub.add_parser("eval", parents=[common], help="HellaSwag items/s, batched vs one at a time")
    b.add_argument("--model", default="tiny", help="a model preset name or MODEL")
    b.add_argument("--data", default=None, help="hellaswag jsonl (default: synthetic items)")
    b.add_argument("--limit", type=count(1), default=200, help="items to score")
    b.add_argument("--batch-size", type=count(1), default=32, help="items per forward pass (packed path)")
    _add_device_flags(b)
    b = bench_sub.add_parser("tokenize", parents=[common], help="prepare's tokenizer path vs a per-document Pool loop")
    b.add_argument("--source", default="demo", help="demo or a local corpus path")
    b.add_argument("--workers", type=count(1), default=os.cpu_count() or 1, help="tokenizer processes")
    b.add_argument("--max-docs", type=count(1), default=None, help="documents to tokenize (default: all)")

    b = bench_sub.add_parser("recipe", parents=[common],
                             help="quality per token: demo vs demo-modern on the built-in corpus, optional ablation")
    b.add_argument("--out", default="runs/bench-recipe", help="a new folder for the runs, the data and the plot")
    b.add_argument("--data", default=None, help="token shards (default: prepare the built-in corpus into OUT/data)")
    b.add_argument("--seeds", type=count_list(0, 2**32 - 1), default="1,2,3", help="comma list of seeds")
    b.add_argument("--max-steps", type=count(2), default=500, help="steps per run (the demo preset's 500)")
    b.add_argument("--val-every", type=count(1), default=25, help="steps between val loss measurements")
    b.add_argument("--fractions", default="0.5",
                   help="shorter modern budgets to try, as fractions of the faithful run's tokens")
    b.add_argument("--ablation", action="store_true", help="also each lever added alone / removed alone")
    b.add_argument("--levers", default=None, help="with --ablation: a comma list of levers (default: all)")

    b = bench_sub.add_parser("gpu", parents=[common],
                             help="the GPU check: FlexAttention's backward, tokens/s, MFU and losses of each preset")
    b.add_argument("--presets", default="gpt2-124m-10b,gpt2-124m-modern", help="comma list of training presets")
    b.add_argument("--steps", type=count(1), default=50, help="steps of each preset's own schedule")
    b.add_argument("--out", default="runs/bench-gpu", help="a new folder for the runs, the data and gpu_check.md")
    b.add_argument("--data", default=None, help="token shards (default: prepare the built-in corpus into OUT/data)")
    b.add_argument("--docs", default=None, help="also write the results between the bench-gpu markers of this file")
    b.add_argument("--allow-cpu", action="store_true", help="run without CUDA (small presets: to try the command)")

    b = bench_sub.add_parser("memory", parents=[common], help="estimated per-rank memory: sizes × DDP/FSDP × ranks")
    b.add_argument("--presets", default="gpt2-124m-10b,gpt2-350m-10b,gpt2-774m-10b,gpt2-1558m-10b",
                   help="comma list of training presets")
    b.add_argument("--ranks", type=count_list(1), default="2,4,8", help="comma list of FSDP world sizes")

    p = sub.add_parser("demo", parents=[common], help="prepare the built-in corpus, train a small model, plot, sample")
    p.add_argument("--out", default="demo_out", help="folder for everything the demo writes")
    p.add_argument("--max-steps", type=count(1), default=None, help="training steps (default: the demo preset's)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier demo in --out (its data is kept)")
    return parser


def train_config(args: argparse.Namespace):
    """The preset, then the named flags, then KEY=VALUE overrides (last wins)."""
    from gpt2repro.config import apply_overrides
    from gpt2repro.presets import get_preset

    cfg = get_preset(args.preset)
    flags = {"data.path": args.data, "out_dir": args.out, "optim.max_steps": args.max_steps,
             "data.micro_batch": args.micro_batch, "runtime.compile": args.compile, "runtime.parallel": args.parallel,
             "init_from": args.init_from,
             "runtime.device": None if args.device == "auto" else args.device,
             "runtime.dtype": None if args.dtype == "auto" else args.dtype}
    named = [f"{key}={value}" for key, value in flags.items() if value is not None]
    return apply_overrides(cfg, named + list(args.overrides)).validate()


def train_command(args: argparse.Namespace) -> int:
    """Train from scratch, from ``--init-from``'s weights, or on from this run's checkpoint."""
    cfg = train_config(args)  # config errors surface before torch is imported
    if cfg.init_from and args.resume:
        raise UserError(f"--init-from {cfg.init_from} starts a new run from that model's weights and "
                        "--resume continues this run from its own checkpoint: pass one of them")
    from gpt2repro.load import load_init, start_from
    from gpt2repro.train.trainer import train

    is_main = os.environ.get("RANK", "0") == "0"
    init = load_init(cfg.init_from) if cfg.init_from else None
    if init:
        cfg = start_from(cfg, init, log=print if is_main else lambda *a: None)
    metrics = train(cfg, resume=args.resume, stop_at_step=args.stop_at_step, overwrite=args.overwrite,
                    init_weights=init.weights if init else None)
    if metrics.get("stopped_early") and is_main:
        print(f"continue with: {resume_command(getattr(args, 'argv', None))}")
        if metrics.get("stopped_by") == "SIGINT":
            return 130  # interrupted, as a shell expects from Ctrl-C, though the run is saved
    return 0


def sample_command(args: argparse.Namespace) -> list[str]:
    """Print ``--num`` continuations of ``--prompt``, as ``sample i: TEXT`` lines; a single
    sample is printed token by token as it is generated."""
    from gpt2repro.data.tokenizer import StreamDecoder, decode, encode
    from gpt2repro.device import autocast, free_memory_bytes
    from gpt2repro.load import load_for_inference
    from gpt2repro.model.generate import generate, sampling_bytes

    total = args.num * args.max_new_tokens
    if total > MAX_SAMPLE_TOKENS:
        raise UserError(f"--num {args.num} × --max-new-tokens {args.max_new_tokens} = {total:,} new tokens, more "
                        f"than one sample run makes ({MAX_SAMPLE_TOKENS:,}); lower --num or --max-new-tokens")
    net = load_for_inference(args.model, args.device, args.dtype)
    length = len(encode(args.prompt)) + args.max_new_tokens
    need, free = sampling_bytes(net.model.config, args.num, length), free_memory_bytes(net.device)
    if free is not None and need > free:
        fits = max(1, free * args.num // need)
        raise UserError(f"--num {args.num}: that many samples need about {need / 2**30:,.1f} GiB on {net.device} "
                        f"(KV cache and activations of this model), more than the {free / 2**30:,.1f} GiB free; "
                        f"lower --num (about {fits:,} fit)")
    on_token = None
    if args.num == 1:
        stream = StreamDecoder()
        print(f"sample 0: {args.prompt}", end="", flush=True)

        def on_token(tokens: list[int]) -> None:
            print(stream.push(tokens[0]), end="", flush=True)

    with autocast(net.device, net.autocast_dtype):
        samples = generate(net.model, encode(args.prompt), num_samples=args.num, max_new_tokens=args.max_new_tokens,
                           top_k=args.top_k or None, temperature=args.temperature, seed=args.seed,
                           kv_cache=not args.no_kv_cache, device=net.device, on_token=on_token)
    texts = [args.prompt + decode(tokens) for tokens in samples]
    if args.num == 1:
        print(stream.flush(), flush=True)
    else:
        for i, text in enumerate(texts):
            print(f"sample {i}: {text}")
    return texts


def evaluate_hellaswag_command(args: argparse.Namespace) -> dict:
    """HellaSwag on one process, or on every rank under torchrun (items spread over ranks)."""
    import json

    from tqdm import tqdm

    from gpt2repro.atomic import atomic_write, writing
    from gpt2repro.data.tokenizer import encode
    from gpt2repro.distributed import init_distributed, shutdown_distributed
    from gpt2repro.eval.hellaswag import OFFICIAL_URL, SCORINGS, evaluate_hellaswag, load_items, summary_lines
    from gpt2repro.load import load_for_inference
    from gpt2repro.outdir import file_target

    if args.json:
        file_target(args.json, "--json")  # now, not after the evaluation
    items = load_items(args.data, args.limit)
    net = load_for_inference(args.model, args.device, args.dtype, int(os.environ.get("LOCAL_RANK", "0")))
    encode("")  # build the BPE tables now, so the first scoring's items/s does not include them
    info = init_distributed(net.device.type)
    # Rank 0's share of the items, once per scoring; a bar only for a person watching a terminal.
    bar = tqdm(total=len(SCORINGS) * len(items[::info.world_size]), desc="hellaswag", unit="item",
               disable=info.rank != 0 or not sys.stderr.isatty())
    try:
        results = evaluate_hellaswag(net.model, items, batch_size=args.batch_size, device=net.device,
                                     autocast_dtype=net.autocast_dtype, rank=info.rank, world_size=info.world_size,
                                     progress=bar.update)
    finally:
        bar.close()
        shutdown_distributed()
    if info.is_main:
        for line in summary_lines(results):
            print(line)
        if args.json:
            record = {"model": args.model, "data": str(args.data) if args.data else OFFICIAL_URL, **results}
            with writing(Path(args.json).parent):
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            atomic_write(args.json, json.dumps(record, indent=2) + "\n")
    return results


def evaluate_loss_command(args: argparse.Namespace) -> dict:
    """Loss and bits per byte of MODEL on a split of DIR, on one process or every rank under torchrun."""
    from tqdm import tqdm

    from gpt2repro.distributed import init_distributed, shutdown_distributed
    from gpt2repro.eval.loss import count_windows, evaluate_loss, open_split, summary_line, window_length
    from gpt2repro.eval.output import check_json_target, write_json
    from gpt2repro.load import load_for_inference

    if args.json:
        check_json_target(args.json)  # now, not after the evaluation
    where = f"{args.data}: the {args.split} split"
    n_stream = len(open_split(args.data, args.split))  # a missing folder or split, before the model loads
    if args.seq_len:
        count_windows(n_stream, args.seq_len, args.tokens, where)
    net = load_for_inference(args.model, args.device, args.dtype, int(os.environ.get("LOCAL_RANK", "0")))
    seq_len = window_length(args.seq_len, net.model.config.block_size)
    windows = count_windows(n_stream, seq_len, args.tokens, where)
    info = init_distributed(net.device.type)
    bar = tqdm(total=len(range(info.rank, windows, info.world_size)), desc="eval loss", unit="window",
               disable=info.rank != 0 or not sys.stderr.isatty())
    try:
        result = evaluate_loss(net.model, args.data, split=args.split, seq_len=seq_len, n_tokens=args.tokens,
                               batch_size=args.batch_size, device=net.device, autocast_dtype=net.autocast_dtype,
                               rank=info.rank, world_size=info.world_size, progress=bar.update)
    finally:
        bar.close()
        shutdown_distributed()
    if info.is_main:
        print(summary_line(result))
        if args.json:
            write_json(args.json, {"model": args.model, "data": str(args.data), **result})
    return result


def evaluate_harness_command(args: argparse.Namespace) -> dict | None:
    """lm-evaluation-harness tasks on MODEL through lm-eval's own API; the results on rank 0."""
    from gpt2repro.eval.harness import (
        check_include_path,
        evaluate_tasks,
        json_text,
        parse_tasks,
        require_lm_eval,
        table_lines,
        task_manager,
    )
    from gpt2repro.eval.output import check_json_target, write_json_text

    if args.json:
        check_json_target(args.json)  # now, not after the evaluation
    names = parse_tasks(args.tasks)
    include_path = check_include_path(args.include_path)
    require_lm_eval()
    manager = task_manager(names, include_path)  # an unknown task, before the model loads

    from gpt2repro.distributed import init_distributed, shutdown_distributed
    from gpt2repro.eval.harness_lm import GPTLM
    from gpt2repro.load import load_for_inference

    net = load_for_inference(args.model, args.device, args.dtype, int(os.environ.get("LOCAL_RANK", "0")))
    info = init_distributed(net.device.type)
    lm = GPTLM(net.model, device=net.device, autocast_dtype=net.autocast_dtype, batch_size=args.batch_size,
               rank=info.rank, world_size=info.world_size, name=args.model)
    try:
        results = evaluate_tasks(lm, names, manager, limit=args.limit, num_fewshot=args.num_fewshot,
                                 progress_bars=info.rank == 0 and sys.stderr.isatty())
    finally:
        shutdown_distributed()
    if info.is_main and results is not None:
        for line in table_lines(results):
            print(line)
        if args.json:
            write_json_text(args.json, json_text(results, args.model))
    return results


def run(args: argparse.Namespace) -> int:
    if args.command == "prepare":
        from gpt2repro.data.prepare import prepare

        prepare(source=args.source, out_dir=args.out, name=args.name, streaming=args.streaming,
                shard_tokens=args.shard_tokens, val_tokens=args.val_tokens, workers=args.workers,
                max_tokens=args.max_tokens, prefix=args.prefix)
    elif args.command == "train":
        return train_command(args)
    elif args.command == "eval":
        {"hellaswag": evaluate_hellaswag_command, "loss": evaluate_loss_command,
         "harness": evaluate_harness_command}[args.task](args)
    elif args.command == "plot":
        from gpt2repro.report.plot import plot_logs

        plot_logs(args.log, size=args.sz, out=args.out, show=args.show, x=args.x,
                  default_tokens_per_step=args.tokens_per_step)
    elif args.command == "sample":
        sample_command(args)
    elif args.command == "export":
        from gpt2repro.load import export_model

        out = export_model(args.model, args.out, overwrite=args.overwrite)
        print(f"wrote a Hugging Face GPT-2 directory: {out}")
    elif args.command == "bench":
        from gpt2repro import bench

        bench.run(args)
    elif args.command == "demo":
        from gpt2repro.demo import run_demo

        run_demo(out_dir=args.out, max_steps=args.max_steps, overwrite=args.overwrite)
    return 0


def resume_command(argv: list[str] | None) -> str:
    """The command that continues a stopped run: its own arguments with --resume, never --overwrite."""
    if argv is None:
        return "the same command with --resume"
    args = [a for a in argv if a != "--overwrite"] + ([] if "--resume" in argv else ["--resume"])
    launcher = "torchrun <the same torchrun options> -m gpt2repro" if os.environ.get("WORLD_SIZE", "1") != "1" \
        else "gpt2repro"
    return f"{launcher} {shlex.join(args)}"


def parse(argv: list[str]) -> argparse.Namespace:
    """The command line, with KEY=VALUE overrides anywhere among the flags, in their order
    (argparse alone takes only the first run of them)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and (not hasattr(args, "overrides") or any(a.startswith("-") or "=" not in a for a in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    args.argv = argv  # for the --resume command printed when a run stops early
    try:
        return run(args)
    except UserError as e:
        if args.debug:
            raise
        print(f"gpt2repro {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        why = f" by a second {e}" if str(e) else ""
        hint = f"; the last checkpoint is intact, continue with: {resume_command(argv)}" \
            if args.command == "train" else ""
        print(f"gpt2repro {args.command}: interrupted{why}{hint}", file=sys.stderr)
        return 130
