"""``gpt2repro demo``: the whole pipeline in a few minutes on a CPU, with no network: prepare (the
built-in corpus) -> train (the demo preset) -> plot -> sample, all into one folder."""

from __future__ import annotations

import os
from pathlib import Path

from gpt2repro.config.presets import get_preset, shortened
from gpt2repro.data.prepare import prepare
from gpt2repro.data.tokenizer import decode, encode
from gpt2repro.errors import UserError
from gpt2repro.files import FolderLock, atomic_write, record_written
from gpt2repro.model.generate import generate
from gpt2repro.model.load import load_model
from gpt2repro.report.plot import plot_logs
from gpt2repro.runlog import LOG_FILE
from gpt2repro.train.rundir import check_new_run_folder, existing_run, names_written
from gpt2repro.train.trainer import train

DEMO_PROMPTS = ("The function", "In Python, a class", "The result of")
DEMO_FILES = ("plot.png", "final_samples.txt")  # what the demo writes besides the run and the data


def run_demo(out_dir: str | Path = "demo_out", max_steps: int | None = None, overwrite: bool = False,
             resume: bool = False) -> Path:
    """The demo into ``out_dir``; an earlier one there is refused, or replaced (``overwrite``: its prepared
    corpus is kept), or continued (``resume``). Files it did not write are refused, or with ``overwrite`` kept."""
    out = Path(out_dir)
    if resume and overwrite:
        raise UserError("--resume continues the demo in --out and --overwrite replaces it; choose one")
    with FolderLock(out):  # for the whole demo: a second one is refused at once, not halfway through
        found = existing_run(out)
        if found and not (overwrite or resume):
            raise UserError(f"{out}: holds an earlier demo ({', '.join(found[:2])}); replace it with "
                            f"`gpt2repro demo --out {out} --overwrite`, or pass a new --out")
        if not resume:
            check_new_run_folder(out, overwrite, writes=(*names_written(get_preset("demo")), *DEMO_FILES))
        return _run(out, max_steps, overwrite, resume)


def _run(out: Path, max_steps: int | None, overwrite: bool, resume: bool) -> Path:
    cfg = get_preset("demo")
    cfg.data.path = str(out / "data")
    cfg.out_dir = str(out)
    if max_steps is not None:
        shortened(cfg, max_steps)

    print(f"[1/4] preparing the built-in corpus into {cfg.data.path}")
    prepare(source="demo", out_dir=cfg.data.path, workers=os.cpu_count() or 1)

    print(f"[2/4] training the demo preset ({cfg.optim.max_steps} steps) into {out}")
    if train(cfg, overwrite=overwrite, resume=resume).get("stopped_early"):
        steps = f" --max-steps {max_steps}" if max_steps is not None else ""
        print(f"training was stopped; continue with: gpt2repro demo --out {out}{steps} --resume")
        return out

    print("[3/4] plotting the log")
    record_written(out, DEMO_FILES)  # ours from now on: a later --overwrite replaces them
    plot_logs([str(out / LOG_FILE)], size="124M", out=str(out / "plot.png"))

    print("[4/4] sampling from the final checkpoint")
    model = load_model(str(out))
    lines = [f"{prompt}{decode(tokens)}" for prompt in DEMO_PROMPTS
             for tokens in generate(model, encode(prompt), num_samples=2, max_new_tokens=40, seed=0)]
    atomic_write(out / "final_samples.txt", "\n\n".join(lines) + "\n")
    print("\n\n".join(lines))

    print(f"\ndemo finished; everything is in {out}/:")
    print(f"  log.txt            train/val loss per step (plot it: gpt2repro plot --log {out}/log.txt)")
    print("  plot.png           the loss curve")
    newest = sorted(out.glob("ckpt_*"))[-1].name
    print(f"  {newest}/       the final checkpoint (gpt2repro sample --model {out})")
    print("  samples.txt        samples written during training")
    print("  final_samples.txt  samples from the final model")
    return out
