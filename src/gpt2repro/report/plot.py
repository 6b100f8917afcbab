"""Training curves from ``log.txt`` (``<step> <stream> <value>`` lines; build-nanogpt's logs too):
loss, plus HellaSwag and val bits per byte panels when some log has them. Unparsable lines are
counted and reported; a log with nothing to draw is an error.

``x="tokens"`` puts tokens trained on on the x axis, so runs of different batch sizes overlay
honestly (tokens per step from the run's ``config.json``, else ``default_tokens_per_step``).
Baselines are drawn only where they apply: GPT-2's val loss (known for 124M) when every run's
val split is FineWeb-edu, and GPT-2's and GPT-3's HellaSwag acc_norm; val bpb has none yet.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from gpt2repro.data.prepare import MANIFEST as SHARDS_MANIFEST
from gpt2repro.data.sources import FINEWEB_EDU, FINEWEB_PREFIX
from gpt2repro.errors import UserError
from gpt2repro.files import atomic_open, file_target, writing
from gpt2repro.runlog import DEFAULT_TOKENS_PER_STEP, LOG_FILE, read_log, tokens_per_step

PLOTTED_STREAMS = ("train", "val", "hella", "val_bpb")
GPT2_VAL_LOSS = {"124M": 3.2924}
HELLASWAG_BASELINES = {  # size: (GPT-2, GPT-3) acc_norm
    "124M": (0.294463, 0.337),
    "350M": (0.375224, 0.436),
    "774M": (0.431986, 0.510),
    "1558M": (0.488946, 0.547),
}
# What each stream's values can be; anything else is a broken log line, reported and not drawn.
VALID = {"train": (0.0, math.inf), "val": (0.0, math.inf), "val_bpb": (0.0, math.inf), "hella": (0.0, 1.0)}
CURVES = (  # stream, panel, best value, its name in the summary, legend
    ("train", "loss", "min", "train loss", "train loss"),
    ("val", "loss", "min", "val loss", "val loss"),
    ("hella", "hella", "max", "HellaSwag", "HellaSwag acc_norm"),
    ("val_bpb", "bpb", "min", "val bpb", "val bits per byte"),
)
AXES = {"loss": {"ylabel": "loss", "title": "Loss", "yscale": "log"},
        "hella": {"ylabel": "accuracy", "title": "HellaSwag eval"},
        "bpb": {"ylabel": "bits per byte", "title": "Val bits per byte"}}


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over ``window`` points (shorter at the start)."""
    csum = np.cumsum(np.insert(values, 0, 0.0))
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    ends = np.arange(1, len(values) + 1)
    return (csum[ends] - csum[ends - counts]) / counts


def _names(logs: list[str]) -> list[str]:
    """A short label per log: RUN for ``.../RUN/log.txt``, else the file name; full paths if not unique."""
    names = [Path(p).parent.name if Path(p).name == LOG_FILE and Path(p).parent.name else Path(p).name for p in logs]
    return names if len(set(names)) == len(names) else [str(p) for p in logs]


def _valid(stream: str, value: float) -> bool:
    low, high = VALID.get(stream, (-math.inf, math.inf))
    return math.isfinite(value) and low <= value <= high


def val_is_fineweb_edu(log: str | Path) -> bool:
    """Whether the run that wrote ``log`` measured val on FineWeb-edu (``config.json`` names its shard
    folder, whose manifest names the corpus, or whose shards carry build-nanogpt's names)."""
    try:
        data = Path(json.loads(Path(log).with_name("config.json").read_text())["data"]["path"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    try:
        return json.loads((data / SHARDS_MANIFEST).read_text())["source"].startswith(FINEWEB_EDU + "/")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return any(data.glob(f"{FINEWEB_PREFIX}_val_*.npy"))


def plot_logs(logs: list[str], size: str = "124M", out: str = "plot.png", show: bool = False,
              x: str = "step", default_tokens_per_step: int = DEFAULT_TOKENS_PER_STEP):
    """Draw every log into one figure, save it as ``out``, print the key numbers; returns the Figure.
    ``size`` (a ``HELLASWAG_BASELINES`` key) and ``x`` (step or tokens) are the command line's choices."""
    import matplotlib

    if not show:
        matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    from matplotlib.backend_bases import FigureCanvasBase

    out_path = file_target(out)
    formats = FigureCanvasBase.get_supported_filetypes()
    suffix = out_path.suffix.lower().removeprefix(".")
    if suffix not in formats:  # checked before any drawing
        what = f"unsupported suffix .{suffix}" if suffix else "no file suffix"
        raise UserError(f"--out {out}: {what}; end the name with one of "
                        f"{', '.join('.' + f for f in sorted(formats))}, e.g. plot.png")
    if any(Path(p).resolve() == out_path.resolve() for p in logs):
        raise UserError(f"--out {out}: is also a --log file, which the plot would replace; pass e.g. --out plot.png")
    parsed = [read_log(p) for p in logs]
    for path, (streams, malformed) in zip(logs, parsed):
        if not any(streams.get(s) for s in PLOTTED_STREAMS):
            raise UserError(f"{path}: no lines like '<step> train|val|hella|val_bpb <value>' "
                            f"({malformed} malformed); pass the log.txt of a training run")
    for path, (streams, _) in zip(logs, parsed):
        bad = [f"{stream} {value:g} (step {step})" for stream in PLOTTED_STREAMS
               for step, value in streams.get(stream, []) if not _valid(stream, value)]
        if bad:
            print(f"warning: {path}: {len(bad)} value(s) outside their stream's range, not drawn: "
                  f"{', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}")

    def holds(stream: str) -> bool:
        return any(_valid(stream, value) for streams, _ in parsed for _step, value in streams.get(stream, []))

    panels = ["loss"] + [name for name, stream in (("hella", "hella"), ("bpb", "val_bpb")) if holds(stream)]
    fig, axes = plt.subplots(1, len(panels), figsize=(8 * len(panels), 6), squeeze=False)
    ax_of = dict(zip(panels, axes[0]))
    for name, path, (streams, malformed) in zip(_names(logs), logs, parsed):
        label = f"{name} " if len(logs) > 1 else ""
        summary = []
        per_step = 1
        if x == "tokens":
            per_step, source = tokens_per_step(path, default_tokens_per_step)
            print(f"{path}: {per_step:,} tokens per step (from {source})")
        for stream, panel, best, what, legend in CURVES:
            points = [(s, v) for s, v in streams.get(stream, []) if _valid(stream, v)]
            if not points:
                continue
            ax = ax_of[panel]
            steps, values = map(np.array, zip(*points))
            # tokens trained on before the value: s steps' worth at step s (step s's val and
            # HellaSwag run before it; its train loss is on its own batch)
            xs = steps * per_step
            if stream == "train":  # noisy: a faint raw curve under its trailing mean
                raw = ax.plot(xs, values, alpha=0.25, linewidth=0.8)[0]
                window = max(1, min(100, len(values) // 20))
                ax.plot(xs, smooth(values, window), color=raw.get_color(), label=f"{label}{legend} (mean of {window})")
            else:
                ax.plot(xs, values, label=f"{label}{legend}")
            i = int(values.argmin() if best == "min" else values.argmax())
            summary.append(f"{best} {what} {values[i]:.4f} (step {steps[i]})")
        print(f"{path}: {', '.join(summary)}")
        if malformed:
            print(f"{path}: skipped {malformed} malformed line{'s' * (malformed != 1)}")

    if size in GPT2_VAL_LOSS and holds("val"):
        if all(val_is_fineweb_edu(p) for p, (streams, _) in zip(logs, parsed) if streams.get("val")):
            ax_of["loss"].axhline(GPT2_VAL_LOSS[size], color="r", linestyle="--",
                                  label=f"OpenAI GPT-2 ({size}) checkpoint val loss (FineWeb-edu)")
        else:
            print(f"no GPT-2 val loss line: {GPT2_VAL_LOSS[size]} is measured on FineWeb-edu's val, and not every "
                  "run here measured val on it (its config.json and shard manifest say which corpus it used)")
    if "hella" in ax_of:
        for value, color, model in zip(HELLASWAG_BASELINES[size], "rg", ("GPT-2", "GPT-3")):
            ax_of["hella"].axhline(value, color=color, linestyle="--", label=f"OpenAI {model} ({size}) checkpoint")
    for panel, ax in ax_of.items():
        ax.set(xlabel=x, **AXES[panel])
        ax.legend()
    fig.tight_layout()
    # a full disk leaves the previous plot, not half a new one
    with writing(out_path), atomic_open(out_path, make_parents=True) as f:
        fig.savefig(f, dpi=100, format=suffix)
    print(f"wrote {out_path}")
    if show:
        plt.show()
    plt.close(fig)
    return fig
