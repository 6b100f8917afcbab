"""``eval harness``: lm-evaluation-harness tasks on our models (``eval.harness_lm.GPTLM``), through
lm-eval's own Python API; lm-eval is an optional extra, imported after a check that names it.
Names are looked up in ``--include-path`` first: if all are there, lm-eval's ~14,000 task files are
not indexed (~15 s on a small CPU); otherwise both are, the include path winning on equal names.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import json
import logging
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

from gpt2repro.errors import UserError


def require_lm_eval() -> None:
    try:
        import lm_eval.api.model  # noqa: F401
    except ImportError as e:
        raise UserError(f"eval harness needs lm-evaluation-harness, which is not installed ({e}); "
                        "pip install 'gpt2repro[lm-eval]'") from None


def parse_tasks(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise UserError(f"--tasks {text!r}: no task names; pass a comma list such as hellaswag,lambada_openai")
    return names


def check_include_path(include_path: str | None) -> Path | None:
    if include_path is None:
        return None
    path = Path(include_path)
    if not path.is_dir():
        what = "is a file, not a folder" if path.exists() else "no such folder"
        raise UserError(f"--include-path {include_path}: {what}; pass the folder that holds your task YAML files")
    return path


def _unknown(names: Sequence[str], known: Sequence[str]) -> list[str]:
    return [name for name in names if not fnmatch.filter(known, name)]


def task_manager(names: Sequence[str], include_path: Path | None):
    """lm-eval's ``TaskManager`` that knows every name (or glob) in ``names``."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if not _unknown(names, local.all_tasks):
            return local
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    if unknown := _unknown(names, manager.all_tasks):
        where = f"--include-path {include_path} or " if include_path else ""
        raise UserError(f"--tasks: no task named {', '.join(unknown)} in {where}lm-eval's tasks; `lm_eval ls tasks` "
                        "lists lm-eval's, and --include-path DIR adds your own YAML tasks")
    return manager


def _git_hash() -> str | None:
    """lm-eval's ``git_hash``, without git's "fatal: not a git repository" on stderr."""
    try:
        return subprocess.check_output(["git", "describe", "--always"], stderr=subprocess.DEVNULL).decode().strip()
    except (subprocess.CalledProcessError, OSError):
        return None


@contextlib.contextmanager
def quiet(progress_bars: bool) -> Iterator[None]:
    """Silence lm-eval's INFO/WARNING notes, huggingface_hub's retry line per attempt when offline,
    git's complaint outside a repository, and unless ``progress_bars`` the bars of datasets and of
    lm-eval's request building (they write to stderr even when nobody watches)."""
    import datasets
    import lm_eval.api.task
    import lm_eval.evaluator

    with contextlib.ExitStack() as restore:
        for logger in map(logging.getLogger, ("lm_eval", "huggingface_hub")):
            restore.callback(logger.setLevel, logger.level)
            logger.setLevel(logging.ERROR)
        if not datasets.are_progress_bars_disabled():
            restore.callback(datasets.enable_progress_bars)
        for module, name in ((lm_eval.evaluator, "get_git_commit_hash"), (lm_eval.api.task, "tqdm")):
            restore.callback(setattr, module, name, getattr(module, name))
        lm_eval.evaluator.get_git_commit_hash = _git_hash
        if not progress_bars:
            datasets.disable_progress_bars()
            lm_eval.api.task.tqdm = functools.partial(lm_eval.api.task.tqdm, disable=True)
        yield


def evaluate_tasks(lm, names: Sequence[str], manager, *, limit: int | None = None, num_fewshot: int | None = None,
                   log_samples: bool = False, progress_bars: bool = False) -> dict | None:
    """lm-eval's ``simple_evaluate`` on ``names`` (names or globs): the results on rank 0, else None."""
    import lm_eval

    names = sorted({match for name in names for match in fnmatch.filter(manager.all_tasks, name)})
    try:
        with quiet(progress_bars):
            return lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit,
                                           num_fewshot=num_fewshot, log_samples=log_samples)
    except ConnectionError as e:  # datasets: a hub dataset that is neither cached nor reachable
        raise UserError(f"--tasks {','.join(names)}: lm-eval could not fetch a task's data ({e}); run where the "
                        "Hugging Face hub is reachable, or write a local task over a local copy of the data "
                        "(--include-path)") from None
    except FileNotFoundError as e:  # datasets: a local task's data_files that are not there
        raise UserError(f"--tasks {','.join(names)}: a task's data is missing ({e}); fix the data_files of its "
                        "YAML file") from None


def _format(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)  # NaN prints as nan


def table_lines(results: dict) -> list[str]:
    """task, metric, value, stderr: a line per metric of every task and group."""
    rows = [("task", "metric", "value", "stderr")]
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")
            if not filter_name or metric.endswith("_stderr"):
                continue  # alias, sample counts, and the stderr that goes beside its metric
            name = metric if filter_name == "none" else f"{metric} ({filter_name})"
            rows.append((task, name, _format(value), _format(metrics.get(f"{metric}_stderr,{filter_name}", "N/A"))))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


def json_text(results: dict, model: str) -> str:
    """JSON without per-sample logs, MODEL as given; the rest (numpy numbers, functions) as lm-eval writes it."""
    from lm_eval.utils import handle_non_serializable

    record = {k: v for k, v in results.items() if k != "samples"}
    record["config"] = {**record.get("config", {}), "model": model}
    return json.dumps(record, indent=2, default=handle_non_serializable) + "\n"
