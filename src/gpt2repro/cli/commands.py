"""The commands of more than one step: settings, train, sample, the evaluations, export.
Heavy imports (torch, datasets, lm-eval) stay inside each function, so that ``--help`` is instant."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import sys
from pathlib import Path

from gpt2repro.cli.parser import train_config
from gpt2repro.config import MAX_SAMPLE_TOKENS
from gpt2repro.errors import UserError, print0
from gpt2repro.files import LOCK_FILE, atomic_write, folder_target, writing


def settings_command(args: argparse.Namespace) -> list[str]:
    """Print every setting of ``--preset``, overrides applied, as it declares itself."""
    from gpt2repro.config.presets import get_preset
    from gpt2repro.config.settings import apply_overrides, describe

    def shown(value) -> str:
        return str(value).lower() if isinstance(value, bool) else repr(value) if value == "" else str(value)

    rows = [(s.key, shown(s.value), s.allowed, s.unit, s.help)
            for s in describe(apply_overrides(get_preset(args.preset), list(args.overrides)).validate())]
    if args.markdown:
        lines = ["| key | value | takes | unit | meaning |", "|---|---|---|---|---|"]
        lines += ["| " + " | ".join(f"`{c}`" if i < 2 and c else c.replace("|", "\\|")
                                    for i, c in enumerate(row)) + " |" for row in rows]
    else:
        width = max(len(row[0]) + len(row[1]) for row in rows) + 3
        lines = [f"{key} = {value}".ljust(width) + f"{takes}{' ' + unit if unit else ''}: {meaning}"
                 for key, value, takes, unit, meaning in rows]
    print("\n".join(lines))
    return lines


def chosen_model_settings(args: argparse.Namespace, cfg) -> dict[str, str]:
    """Model keys the command line chose, each with how: a ``model.*`` override, or a switch of a ``--preset``
    named on it (not its size: --init-from's MODEL has one)."""
    from gpt2repro.config.presets import get_preset
    from gpt2repro.config.settings import parse_overrides

    chosen = {}
    if any(a == "--preset" or a.startswith("--preset=") for a in getattr(args, "argv", None) or []):
        for key, value in get_preset(args.preset).model.switches().items():
            chosen[key] = f"--preset {args.preset}'s model.{key}={value}"
    for dotted, _ in parse_overrides(cfg, list(args.overrides)):
        if dotted.startswith("model."):
            key = dotted.removeprefix("model.")
            chosen[key] = f"{dotted}={getattr(cfg.model, key)}"
    return chosen


def train_command(args: argparse.Namespace) -> int:
    """Train from scratch, from ``--init-from``'s weights, or on from this run's checkpoint."""
    cfg = train_config(args)  # config errors surface before torch is imported
    if cfg.init_from and args.resume:
        raise UserError(f"--init-from {cfg.init_from} starts a new run from that model's weights and "
                        "--resume continues this run from its own checkpoint: pass one of them")
    import torch.distributed

    from gpt2repro.train.start import load_init, resumed_config, start_from
    from gpt2repro.train.trainer import train

    init = load_init(cfg.init_from) if cfg.init_from else None
    if init:
        cfg = start_from(cfg, init, chosen_model_settings(args, cfg), log=print0)
    elif args.resume:
        cfg = resumed_config(cfg)
    try:
        metrics = train(cfg, resume=args.resume, stop_at_step=args.stop_at_step, overwrite=args.overwrite,
                        init_weights=init.weights if init else None)
    except (RuntimeError, torch.distributed.DistError) as e:
        marks = ("Connection closed by peer", "Connection reset by peer", "NCCL", "[gloo")
        if not isinstance(e, torch.distributed.DistError) and not any(mark in str(e) for mark in marks):
            raise  # not a collective failed by another rank gone (killed, crashed, its node lost)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        reason = re.sub(r"^\[[^\]]*\]\s*", "", first).split(". ")[0]  # gloo's source line off
        raise UserError(f"another rank of this run stopped ({reason[:160]}); "
                        f"{how_to_go_on(cfg.out_dir, args.argv, ' (it resumes exactly)')}") from e
    if metrics.get("stopped_early"):
        print0(f"continue with: {resume_command(getattr(args, 'argv', None))}")
        if metrics.get("stopped_by") == "SIGINT":
            return 130  # interrupted, as a shell expects from Ctrl-C, though the run is saved
    return 0


def sample_command(args: argparse.Namespace) -> list[str]:
    """Print ``--num`` continuations of ``--prompt`` as ``sample i: TEXT`` lines; one alone streams as generated."""
    from gpt2repro.data.tokenizer import StreamDecoder, decode, encode
    from gpt2repro.device import autocast, free_memory_bytes
    from gpt2repro.model.generate import generate, sampling_bytes
    from gpt2repro.model.load import load_for_inference

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


@contextlib.contextmanager
def on_every_rank(args: argparse.Namespace, total_of=None, desc: str = ""):
    """Yields (MODEL loaded on this rank's device, rank info, a bar over ``total_of(info, net)`` of rank 0's
    work when a person watches); joins the process group under torchrun, and leaves it however this ends."""
    from tqdm import tqdm

    from gpt2repro.device import init_distributed, shutdown_distributed
    from gpt2repro.model.load import load_for_inference

    net = load_for_inference(args.model, args.device, args.dtype, int(os.environ.get("LOCAL_RANK", "0")))
    info = init_distributed(net.device.type)
    bar = tqdm(total=total_of(info, net) if total_of else None, desc=desc, unit="item",
               disable=total_of is None or info.rank != 0 or not sys.stderr.isatty())
    try:
        yield net, info, bar
    finally:
        bar.close()
        shutdown_distributed()


def evaluate_hellaswag_command(args: argparse.Namespace) -> dict:
    """HellaSwag on one process, or on every rank under torchrun (items spread over ranks)."""
    from gpt2repro.data.tokenizer import encode
    from gpt2repro.eval.hellaswag import OFFICIAL_URL, SCORINGS, evaluate_hellaswag, load_items, summary_lines
    from gpt2repro.eval.output import check_output_file, write_json

    if args.json:
        check_output_file(args.json, inputs=[args.data, args.model])  # now, not after the evaluation
    items = load_items(args.data, args.limit)
    encode("")  # build the BPE tables now, so the first scoring's items/s does not include them
    with on_every_rank(args, lambda info, _: len(SCORINGS) * len(items[::info.world_size]), "hellaswag") as (
            net, info, bar):
        results = evaluate_hellaswag(net.model, items, batch_size=args.batch_size, device=net.device, rank=info.rank,
                                     autocast_dtype=net.autocast_dtype, world_size=info.world_size, progress=bar.update)
    if info.is_main:
        print("\n".join(summary_lines(results)))
        if args.json:
            write_json(args.json, {"model": args.model, "data": str(args.data) if args.data else OFFICIAL_URL,
                                   **results})
    return results


def evaluate_loss_command(args: argparse.Namespace) -> dict:
    """Loss and bits per byte of MODEL on a split of DIR, on one process or every rank under torchrun."""
    from gpt2repro.eval.loss import count_windows, evaluate_loss, open_split, summary_line, window_length
    from gpt2repro.eval.output import check_output_file, write_json

    if args.json:
        check_output_file(args.json, inputs=[args.data, args.model])  # now, not after the evaluation
    where = f"{args.data}: the {args.split} split"
    n_stream = len(open_split(args.data, args.split))  # a missing folder or split, before the model loads
    if args.seq_len:
        count_windows(n_stream, args.seq_len, args.tokens, where)

    def windows_of_rank0(info, net) -> int:
        windows = count_windows(n_stream, window_length(args.seq_len, net.model.config.block_size), args.tokens, where)
        return len(range(info.rank, windows, info.world_size))

    with on_every_rank(args, windows_of_rank0, "eval loss") as (net, info, bar):
        result = evaluate_loss(net.model, args.data, split=args.split, seq_len=args.seq_len, n_tokens=args.tokens,
                               batch_size=args.batch_size, device=net.device, autocast_dtype=net.autocast_dtype,
                               rank=info.rank, world_size=info.world_size, progress=bar.update)
    if info.is_main:
        print(summary_line(result))
        if args.json:
            write_json(args.json, {"model": args.model, "data": str(args.data), **result})
    return result


def evaluate_harness_command(args: argparse.Namespace) -> dict | None:
    """lm-evaluation-harness tasks on MODEL through lm-eval's own API; the results on rank 0."""
    from gpt2repro.eval import harness
    from gpt2repro.eval.output import check_output_file

    if args.json:
        check_output_file(args.json, inputs=[args.include_path, args.model])  # now, not after the evaluation
    names = harness.parse_tasks(args.tasks)
    include_path = harness.check_include_path(args.include_path)
    harness.require_lm_eval()
    manager = harness.task_manager(names, include_path)  # an unknown task, before the model loads
    from gpt2repro.eval.harness_lm import GPTLM

    with on_every_rank(args) as (net, info, _):
        lm = GPTLM(net.model, device=net.device, autocast_dtype=net.autocast_dtype, batch_size=args.batch_size,
                   rank=info.rank, world_size=info.world_size, name=args.model)
        results = harness.evaluate_tasks(lm, names, manager, limit=args.limit, num_fewshot=args.num_fewshot,
                                         progress_bars=info.rank == 0 and sys.stderr.isatty())
    if info.is_main and results is not None:
        print("\n".join(harness.table_lines(results)))
        if args.json:
            atomic_write(args.json, harness.json_text(results, args.model), make_parents=True)
    return results


def interrupted_hint(args: argparse.Namespace) -> str:
    """What to do after a command was stopped at once (a second signal): how a run or a demo goes on."""
    if args.command == "demo":
        steps = f" --max-steps {args.max_steps}" if args.max_steps else ""
        return f"; continue it with: gpt2repro demo --out {shlex.quote(str(args.out))}{steps} --resume"
    if args.command != "train":
        return ""
    from gpt2repro.config.presets import get_preset

    try:
        out = args.settings["out_dir"][1] if "out_dir" in args.settings else get_preset(args.preset).out_dir
    except UserError:
        return ""
    return "; " + how_to_go_on(out, args.argv)


def how_to_go_on(out_dir: str, argv: list[str] | None, note: str = "") -> str:
    """How a stopped run goes on: from its newest checkpoint, or with none, from the start."""
    from gpt2repro.model.checkpoint import list_checkpoints

    if newest := list_checkpoints(out_dir):
        return f"the last checkpoint, {newest[0]}, is intact: continue with: {resume_command(argv)}{note}"
    return "it stopped before its first checkpoint: start it again with --overwrite"


def resume_command(argv: list[str] | None) -> str:
    """The command that continues a stopped run: its own arguments with --resume, never --overwrite."""
    if argv is None:
        return "the same command with --resume"
    args = [a for a in argv if a != "--overwrite"] + ([] if "--resume" in argv else ["--resume"])
    launcher = "torchrun <the same torchrun options> -m gpt2repro" if os.environ.get("WORLD_SIZE", "1") != "1" \
        else "gpt2repro"
    return f"{launcher} {shlex.join(args)}"


def export_command(args: argparse.Namespace) -> Path:
    """MODEL as a Hugging Face GPT-2 directory ``--out``: never into a folder of ours (files that runs read would
    be replaced) nor inside a checkpoint (checkpoint.keep deletes it); a failed write leaves no new folder."""
    import shutil

    from safetensors import SafetensorError

    from gpt2repro.model.checkpoint import META_FILE
    from gpt2repro.model.hf import export_hf
    from gpt2repro.model.load import load_model

    out = folder_target(args.out, "--out")
    if out.is_dir() and (what := describe_ours(out)) is not None:
        raise UserError(f"--out {out}: is {what}; export into a new folder, e.g. {out}-hf")
    for parent in out.parents:
        if (parent / META_FILE).is_file():
            raise UserError(f"--out {out}: is inside the checkpoint {parent}, which checkpoint.keep may delete; "
                            f"export next to it instead, e.g. {parent}-hf")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise UserError(f"--out {out}: is not empty; pass --overwrite to write the export into it (files of "
                        "the same names are replaced), or choose a new folder")
    model = load_model(args.model)
    created = not out.exists()
    try:
        with writing(out):
            export_hf(model, out)
            for weights in out.glob("*.safetensors"):  # created 0600 by safetensors: give them the umask's mode
                shutil.copymode(out / "config.json", weights)
    except BaseException as e:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        if isinstance(e, SafetensorError):  # safetensors' writer reports a full disk as its own error type
            raise UserError(f"{out}: cannot write the export ({str(e).splitlines()[0]}); free disk space or "
                            "choose a writable folder") from e
        raise
    print(f"wrote a Hugging Face GPT-2 directory: {out}")
    return out


def describe_ours(folder: Path) -> str | None:
    """What a gpt2repro command keeps in ``folder`` (a checkpoint, a run, shards), or None."""
    from gpt2repro.data.prepare import holds_shards
    from gpt2repro.model.checkpoint import META_FILE, read_config
    from gpt2repro.train.rundir import existing_run

    if (folder / META_FILE).is_file():
        return "a gpt2repro checkpoint"
    with contextlib.suppress(UserError):  # an unreadable config.json is not ours to protect
        if read_config(folder) is not None:
            return "a gpt2repro model directory"
    if existing_run(folder):
        return "a gpt2repro training run"
    if holds_shards(folder):
        return "a folder of token shards"
    if (folder / LOCK_FILE).exists():
        return "a folder that a gpt2repro command is writing right now"
    return None
