"""The command line's grammar: one ``argparse`` parser per command with its flags and their help, and
argument types that check a value where it enters. What a flag does is in ``commands`` and below."""

from __future__ import annotations

import argparse
import math
import os
import textwrap
import typing
from typing import Literal

from gpt2repro.config import RuntimeConfig, TrainConfig
from gpt2repro.config.presets import PRESET_ALIASES, RECIPE_PAIRS, TRAIN_PRESETS, get_preset
from gpt2repro.config.settings import choices, declared, flags, parse_int, parse_overrides, parse_value, set_values
from gpt2repro.errors import UserError

MODEL_HELP = "our checkpoint/run dir, a Hugging Face dir, or a hub name"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's default in --help, but an empty one (None, an unset switch): its help says what then."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default in (None, False) else super()._get_help_string(action)

    def _split_lines(self, text: str, width: int) -> list[str]:
        # Preset names hold hyphens; a name split over two lines cannot be copied.
        text = self._whitespace_matcher.sub(" ", text).strip()
        return textwrap.wrap(text, width, break_on_hyphens=False)


class Parser(argparse.ArgumentParser):
    """A bad flag is one line, like every other error: no usage block above it."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def count(low: int = 1, high: int | None = None):
    """An argparse type: a whole number in [``low``, ``high``], written 100000, 100_000 or 1e5."""
    def parse(text: str) -> int:
        try:
            value = parse_int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number (e.g. 1000, 1_000 or 1e3)") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{text} is below the minimum, {low}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{text} is above the maximum, {high:,}")
        return value
    return parse


def number(low: float = 0.0):
    """An argparse type: a finite number >= ``low``."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not low <= value < float("inf"):
            raise argparse.ArgumentTypeError(f"{text} is outside [{low:g}, inf)")
        return value
    return parse


def fraction_list(text: str) -> list[float]:
    """An argparse type: a comma list of numbers strictly between 0 and 1, sorted; empty means none."""
    fractions = [number()(part) for part in text.split(",")] if text.strip() else []
    if any(not 0 < f < 1 for f in fractions):
        raise argparse.ArgumentTypeError(f"{text}: each must lie strictly between 0 and 1, e.g. 0.5,0.75")
    return sorted(fractions)


def count_list(low: int = 1, high: int | None = None):
    """An argparse type: a comma list of whole numbers in [``low``, ``high``]."""
    one = count(low, high)

    def parse(text: str) -> list[int]:
        values = []
        for part in text.split(","):
            if not part.strip().isdigit():  # plain digits: no 1e3 among seeds and world sizes
                raise argparse.ArgumentTypeError(f"{text!r}: {part.strip()!r} is not a whole number; write "
                                                 "numbers separated by commas, e.g. 1,2,3")
            values.append(one(part))
        return values
    return parse


def _add_device_flags(p: argparse.ArgumentParser) -> None:
    for name in ("device", "dtype"):
        annotation, f = declared(RuntimeConfig, name)
        p.add_argument(f"--{name}", default="auto", choices=choices(annotation) or None, help=f.metadata["help"])


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="gpt2repro",
                    description="Pretrain GPT-2 from scratch and show it matches OpenAI's checkpoint.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    # --debug is accepted after the subcommand too; SUPPRESS keeps a leading --debug intact.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add_command in (_prepare, _train, _settings, _eval, _plot, _sample, _export, _bench, _demo):
        add_command(sub, common)
    return parser


def _prepare(sub, common: argparse.ArgumentParser) -> None:
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


def _train(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("train", parents=[common], help="pretrain a model (one process, or under torchrun)")
    p.add_argument("--preset", default="gpt2-124m-10b", metavar="NAME",
                   help=f"training preset: {', '.join(TRAIN_PRESETS)}; or a size alias: "
                        f"{', '.join(f'{a} = {p}' for a, p in PRESET_ALIASES.items())}")
    for flag, key, annotation, f in flags(TrainConfig):  # declared beside their settings (config/)
        add_setting_flag(p, flag, key, annotation, f)
    p.add_argument("--stop-at-step", type=count(1), default=None,
                   help="checkpoint and exit after this step, without changing the schedule")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="start over: delete the run already in --out (checkpoints, log, samples, config) first")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, e.g. optim.max_lr=3e-4 or eval.val_every=100; every key, its range and "
                        "its meaning: gpt2repro settings")
    p.set_defaults(settings={})


class SetSetting(argparse.Action):
    """A setting's flag: ``args.settings[key]`` gets its typed value and the flag (to refuse a setting set twice)."""

    def __call__(self, parser, namespace, values, option_string=None):
        value = self.const if self.nargs == 0 else values
        namespace.settings = {**namespace.settings, self.dest: (option_string, value)}


def add_setting_flag(p: argparse.ArgumentParser, flag: str, key: str, annotation, f) -> None:
    """``flag`` for the setting ``key``, parsed as the setting parses its values (a switch also gets
    ``--no-...``), with the setting's help; the preset's value is its default."""
    help_text, allowed = f.metadata["help"], f.metadata["range"]
    if True in choices(annotation):  # a switch: --flag and --no-flag
        p.add_argument(flag, dest=key, action=SetSetting, nargs=0, const=True, default=argparse.SUPPRESS,
                       help=f"{help_text} (default: the preset's)")
        p.add_argument(f"--no-{flag[2:]}", dest=key, action=SetSetting, nargs=0, const=False,
                       default=argparse.SUPPRESS, help=f"the opposite of {flag}")
        return
    if annotation is int and allowed is not None:
        kind = count(int(allowed.low), None if allowed.high == math.inf else int(allowed.high))
    else:
        def kind(text: str):
            try:
                return parse_value(text, annotation, key, allowed)
            except UserError as e:
                raise argparse.ArgumentTypeError(str(e)) from None
    literal = typing.get_origin(annotation) is Literal
    p.add_argument(flag, dest=key, action=SetSetting, type=kind, default=argparse.SUPPRESS,
                   choices=choices(annotation) if literal else None,
                   metavar=None if literal else key.rsplit(".", 1)[-1].upper(),
                   help=f"{help_text} (the preset's by default; setting {key})")


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The preset, then the flags, then KEY=VALUE overrides; one setting given both ways is refused."""
    cfg = get_preset(args.preset)
    overrides = [item for item in args.overrides if "=" in item]
    typed = parse_overrides(cfg, list(args.overrides))  # other items are refused here, as they are
    for item, (key, _) in zip(overrides, typed):
        if key in args.settings:
            raise UserError(f"{args.settings[key][0]} and {item.strip()} both set {key}; pass one of them")
    values = {key: value for key, (_, value) in args.settings.items()}
    return set_values(cfg, values | dict(typed)).validate()


def _settings(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("settings", parents=[common],
                       help="every config key a preset sets: its value, what it takes, its unit and meaning")
    p.add_argument("--preset", default="gpt2-124m-10b", metavar="NAME", help="the training preset to show")
    p.add_argument("--markdown", action="store_true", help="a Markdown table (docs/settings.md is one)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, shown applied")


def _eval(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("eval", parents=[common], help="evaluate a model")
    eval_sub = p.add_subparsers(dest="task", metavar="TASK", required=True)
    tasks = [eval_sub.add_parser(name, parents=[common], help=help) for name, help in (
        ("hellaswag", "HellaSwag val accuracy, two scorings"),
        ("loss", "mean next-token loss and bits per byte on a split of token shards"),
        ("harness", "lm-evaluation-harness tasks (pip install 'gpt2repro[lm-eval]')"))]
    for e in tasks:
        e.add_argument("--model", required=True, help=MODEL_HELP)
    e = tasks[0]
    e.add_argument("--data", default=None, help="hellaswag jsonl (default: download the official val file)")
    e.add_argument("--limit", type=count(1), default=None, help="evaluate only the first N items (default: all)")
    e.add_argument("--batch-size", type=count(1), default=32, help="items per forward pass")
    e = tasks[1]
    e.add_argument("--data", required=True, help="a folder of token shards (ours, build-nanogpt's or llm.c's .bin)")
    e.add_argument("--split", default="val", choices=("val", "train"), help="which shards to measure")
    e.add_argument("--tokens", type=count(1), default=None,
                   help="measure the first TOKENS // seq-len windows (default: the whole split)")
    e.add_argument("--seq-len", type=count(1), default=None,
                   help="tokens per window, non-overlapping (default: 1024, or the model's block if shorter)")
    e.add_argument("--batch-size", type=count(1), default=8, help="windows per forward pass")
    e = tasks[2]
    e.add_argument("--tasks", required=True, help="comma list of lm-eval task names (globs allowed)")
    e.add_argument("--include-path", default=None, help="a folder of your own task YAML files")
    e.add_argument("--limit", type=count(1), default=None, help="only the first N documents of each task")
    e.add_argument("--batch-size", type=count(1), default=32, help="requests per forward pass")
    e.add_argument("--num-fewshot", type=count(0), default=None, help="few-shot examples (default: the task's)")
    for e in tasks:  # last in each task's --help
        e.add_argument("--json", default=None, help="also write the results to this file")
        _add_device_flags(e)


def _plot(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("plot", parents=[common], help="plot loss and HellaSwag curves from training logs")
    p.add_argument("--log", action="append", required=True, help="log.txt (repeat to overlay runs)")
    p.add_argument("--sz", default="124M", choices=("124M", "350M", "774M", "1558M"), help="model size, for baselines")
    p.add_argument("--out", default="plot.png", help="output image; its suffix picks the format (.png, .pdf, .svg)")
    p.add_argument("--x", default="step", choices=("step", "tokens"),
                   help="horizontal axis: optimizer steps, or tokens seen (runs of different batch sizes)")
    p.add_argument("--tokens-per-step", type=count(1), default=524_288,
                   help="with --x tokens, for a log without the run's config.json beside it")
    p.add_argument("--show", action="store_true", help="also open a window")


def _sample(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("sample", parents=[common], help="generate text from a model")
    p.add_argument("--model", required=True, help=MODEL_HELP)
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


def _export(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("export", parents=[common], help="write a checkpoint as a Hugging Face GPT-2 directory")
    p.add_argument("--model", required=True, help="our checkpoint or run directory")
    p.add_argument("--out", required=True, help="output directory (new, or empty)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty --out, replacing files of the same names")


def _bench(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("bench", parents=[common], help="benchmarks: fast path against a plain baseline, same run")
    bench_sub = p.add_subparsers(dest="what", metavar="WHAT", required=True)
    b = bench_sub.add_parser("train", parents=[common], help="training tokens/s, MFU, step time, memory")
    b.add_argument("--preset", default="gpt2-124m-10b", help="training preset whose model and batch to time")
    b.add_argument("--micro-batch", type=count(1), default=None, help="sequences per step (default: the preset's)")
    b.add_argument("--seq-len", type=count(1), default=None, help="tokens per sequence (default: the preset's)")
    b.add_argument("--steps", type=count(1, 1000), default=10, help="timed steps (median reported)")
    b.add_argument("--warmup", type=count(0, 100), default=3, help="untimed steps first")
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
    b.add_argument("--pair", default="demo", choices=RECIPE_PAIRS,
                   help="the faithful preset, against its -modern twin: demo (128-token context) or demo-long "
                        "(1,024 tokens: room for documents and a sliding window)")
    b.add_argument("--data", default=None, help="token shards (default: prepare the built-in corpus into OUT/data)")
    b.add_argument("--seeds", type=count_list(0, 2**32 - 1), default="1,2,3", help="comma list of seeds")
    b.add_argument("--max-steps", type=count(2), default=500, help="steps per run (the demo preset's 500)")
    b.add_argument("--val-every", type=count(1), default=25, help="steps between val loss measurements")
    b.add_argument("--fractions", type=fraction_list, default="0.5",
                   help="shorter modern budgets to try, as fractions of the faithful run's tokens")
    b.add_argument("--ablation", action="store_true", help="also each lever added alone / removed alone")
    b.add_argument("--levers", default=None, help="with --ablation: a comma list of levers (default: all)")
    b.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides for every run, e.g. eval.val_tokens=1024")
    b = bench_sub.add_parser("gpu", parents=[common],
                             help="the GPU check: FlexAttention's backward, tokens/s, MFU and losses of each preset")
    b.add_argument("--presets", default="gpt2-124m-10b,gpt2-124m-modern", help="comma list of training presets")
    b.add_argument("--steps", type=count(1), default=50, help="steps of each preset's own schedule")
    b.add_argument("--out", default="runs/bench-gpu", help="a new folder for the runs, the data and gpu_check.md")
    b.add_argument("--data", default=None, help="token shards (default: prepare the built-in corpus into OUT/data)")
    b.add_argument("--docs", default=None, help="also write the results between the bench-gpu markers of this file")
    b.add_argument("--allow-cpu", action="store_true", help="run without CUDA (small presets: to try the command)")
    b = bench_sub.add_parser("memory", parents=[common], help="estimated per-rank memory: sizes × DDP/FSDP × ranks")
    b.add_argument("--presets", default="gpt2-124m-10b,gpt2-350m-10b,gpt2-774m-10b,gpt2-1558m-10b,gpt2-124m-modern",
                   help="comma list of training presets")
    b.add_argument("--ranks", type=count_list(1), default="2,4,8", help="comma list of FSDP world sizes")


def _demo(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("demo", parents=[common], help="prepare the built-in corpus, train a small model, plot, sample")
    p.add_argument("--out", default="demo_out", help="folder for everything the demo writes")
    p.add_argument("--max-steps", type=count(1), default=None, help="training steps (default: the demo preset's)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier demo in --out (its data is kept)")
    p.add_argument("--resume", action="store_true", help="continue a stopped demo from its checkpoint, then plot "
                                                         "and sample")
