import json
import math

import pytest

from conftest import assert_one_line_error, run_cli, run_main
from gpt2repro.errors import UserError
from gpt2repro.report.plot import plot_logs, smooth
from gpt2repro.runlog import read_log as parse_log

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_log(path, steps=60, offset=0.0, hella=True, junk=()):
    lines = []
    for step in range(steps):
        lines.append(f"{step} train {10.0 / (1 + step) + 3.0 + offset:.6f}")
        if step % 10 == 0:
            lines.append(f"{step} val {10.0 / (1 + step) + 3.2 + offset:.4f}")
            if hella:
                lines.append(f"{step} hella {0.25 + step / 1000:.4f}")
    lines[3:3] = list(junk)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_parse_log_counts_malformed_lines(tmp_path):
    log = write_log(tmp_path / "log.txt", steps=20, junk=["garbage", "5 train", "x val 3.0", "", "7 val 3.1 extra"])
    streams, malformed = parse_log(log)
    assert malformed == 4  # the blank line is not malformed
    assert len(streams["train"]) == 20 and len(streams["val"]) == 2 and len(streams["hella"]) == 2
    assert streams["val"][1] == (10, pytest.approx(10 / 11 + 3.2, abs=1e-4))


def test_smooth_is_a_trailing_mean():
    assert smooth([1.0, 3.0, 5.0, 7.0], 2).tolist() == [1.0, 2.0, 4.0, 6.0]


def test_plot_writes_a_png_with_both_panels(tmp_path, capsys):
    ours = write_log(tmp_path / "ours" / "log.txt", junk=["oops"])
    theirs = write_log(tmp_path / "theirs" / "log.txt", offset=0.5, hella=False)
    out = tmp_path / "plots" / "runs.png"
    fig = plot_logs([str(ours), str(theirs)], size="350M", out=str(out))
    assert out.read_bytes()[:8] == PNG_MAGIC
    loss_ax, hella_ax = fig.axes
    assert loss_ax.get_yscale() == "log"
    loss_labels = [line.get_label() for line in loss_ax.get_lines()]
    assert "ours train loss (mean of 3)" in loss_labels and "theirs val loss" in loss_labels
    assert not any("checkpoint val loss" in label for label in loss_labels)  # known for 124M only
    hella_lines = {line.get_label(): line for line in hella_ax.get_lines()}
    assert "ours HellaSwag acc_norm" in hella_lines
    assert hella_lines["OpenAI GPT-2 (350M) checkpoint"].get_ydata()[0] == 0.375224
    assert hella_lines["OpenAI GPT-3 (350M) checkpoint"].get_ydata()[0] == 0.436
    printed = capsys.readouterr().out
    assert f"min train loss {10 / 60 + 3:.4f} (step 59)" in printed
    assert f"min val loss {10 / 51 + 3.2:.4f} (step 50)" in printed
    assert "max HellaSwag 0.3000 (step 50)" in printed
    assert "skipped 1 malformed line" in printed


def test_a_log_without_hellaswag_gets_no_hellaswag_panel(tmp_path):
    (loss_ax,) = plot_logs([str(write_log(tmp_path / "log.txt", hella=False))], size="124M",
                           out=str(tmp_path / "p.png")).axes
    assert loss_ax.get_title() == "Loss"
    with_hella = plot_logs([str(write_log(tmp_path / "h.txt"))], size="124M", out=str(tmp_path / "h.png"))
    assert [ax.get_title() for ax in with_hella.axes] == ["Loss", "HellaSwag eval"]


def run_on(tmp_path, name, manifest=None, shard=None):
    """A run folder whose config.json points at a shard folder with ``manifest`` or ``shard`` in it."""
    data = tmp_path / f"{name}-data"
    data.mkdir()
    if manifest is not None:
        (data / "manifest.json").write_text(json.dumps(manifest))
    if shard is not None:
        (data / shard).write_bytes(b"")
    log = write_log(tmp_path / name / "log.txt", hella=False)
    (log.parent / "config.json").write_text(json.dumps({"data": {"path": str(data)}}))
    return str(log)


def val_lines(fig):
    return [line.get_label() for line in fig.axes[0].get_lines() if "checkpoint val loss" in line.get_label()]


def test_gpt2s_val_line_only_over_fineweb_edu_val(tmp_path, capsys):
    edu = run_on(tmp_path, "edu", {"source": "HuggingFaceFW/fineweb-edu/sample-10BT"})
    nanogpt = run_on(tmp_path, "nanogpt", shard="edufineweb_val_000000.npy")  # build-nanogpt's own shards
    demo = run_on(tmp_path, "demo", {"source": "demo"})
    fineweb = run_on(tmp_path, "fineweb", {"source": "HuggingFaceFW/fineweb/sample-10BT"})
    bare = str(write_log(tmp_path / "bare" / "log.txt", hella=False))  # no config.json: corpus unknown
    out = str(tmp_path / "p.png")
    assert val_lines(plot_logs([edu, nanogpt], size="124M", out=out)) == [
        "OpenAI GPT-2 (124M) checkpoint val loss (FineWeb-edu)"]
    for others in ([demo], [fineweb], [bare], [edu, demo]):
        capsys.readouterr()
        assert val_lines(plot_logs(others, size="124M", out=out)) == []
        assert "no GPT-2 val loss line" in capsys.readouterr().out


def test_a_log_that_is_not_a_file_is_refused_before_reading(tmp_path):
    result = run_main("plot", "--log", "/dev/zero", "--out", tmp_path / "p.png")
    assert_one_line_error(result, "/dev/zero", "not a regular file")
    with open(tmp_path / "huge.txt", "wb") as f:
        f.truncate(300 << 20)  # sparse: no disk used
    assert_one_line_error(run_main("plot", "--log", tmp_path / "huge.txt", "--out", tmp_path / "p.png"),
                          "huge.txt", "larger than 256 MiB")


def test_plot_cli_with_the_124m_baseline(tmp_path):
    log = write_log(tmp_path / "run" / "log.txt")
    result = run_cli("plot", "--log", log, "--sz", "124M", "--out", tmp_path / "p.png")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "p.png").read_bytes()[:8] == PNG_MAGIC
    assert "min val loss" in result.stdout


def test_log_with_nothing_to_plot(tmp_path):
    (tmp_path / "log.txt").write_text("hello\nthis is not a log\n")
    with pytest.raises(UserError, match="2 malformed"):
        plot_logs([str(tmp_path / "log.txt")], out=str(tmp_path / "p.png"))
    result = run_main("plot", "--log", tmp_path / "log.txt", "--out", tmp_path / "p.png")
    assert_one_line_error(result, "log.txt", "no lines like")
    assert not (tmp_path / "p.png").exists()


def test_missing_log_file(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        parse_log(tmp_path / "absent.txt")


def test_nonfinite_values_do_not_break_the_summary(tmp_path, capsys):
    log = tmp_path / "log.txt"
    log.write_text("0 train 5.0\n1 train nan\n2 train 4.0\n")
    plot_logs([str(log)], out=str(tmp_path / "p.png"))
    assert "min train loss 4.0000 (step 2)" in capsys.readouterr().out
    assert math.isnan(parse_log(log)[0]["train"][1][1])


def test_tokens_on_the_x_axis_overlay_runs_of_different_batch_sizes(tmp_path):
    small = write_log(tmp_path / "small" / "log.txt", steps=40)
    (tmp_path / "small" / "config.json").write_text(json.dumps({"optim": {"total_batch_tokens": 512}}))
    nanogpt = write_log(tmp_path / "nanogpt" / "log.txt", steps=20)  # no config.json: --tokens-per-step
    fig = plot_logs([str(small), str(nanogpt)], out=str(tmp_path / "p.png"), x="tokens",
                    default_tokens_per_step=2048)
    loss_ax, hella_ax = fig.axes
    lines = {line.get_label(): line for line in loss_ax.get_lines()}
    assert lines["small val loss"].get_xdata().tolist() == [0, 10 * 512, 20 * 512, 30 * 512]
    assert lines["nanogpt val loss"].get_xdata().tolist() == [0, 10 * 2048]
    assert lines["small train loss (mean of 2)"].get_xdata()[-1] == 39 * 512
    assert loss_ax.get_xlabel() == "tokens" and hella_ax.get_xlabel() == "tokens"
    by_step = plot_logs([str(small)], out=str(tmp_path / "q.png"))
    val_line = {ln.get_label(): ln for ln in by_step.axes[0].get_lines()}["val loss"]
    assert val_line.get_xdata().tolist() == [0, 10, 20, 30]
    result = run_main("plot", "--log", small, "--x", "tokens", "--out", tmp_path / "r.png")
    assert result.returncode == 0 and "512 tokens per step (from" in result.stdout
