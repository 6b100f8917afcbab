"""The demo preset learns on the built-in corpus, and its log feeds the plot command."""

import pytest

from conftest import run_cli


@pytest.mark.slow
def test_demo_preset_learns_and_the_log_plots(tmp_path):
    data, run = tmp_path / "data", tmp_path / "run"
    prepared = run_cli("prepare", "--source", "demo", "--out", data)  # the corpus's own shard sizes
    assert prepared.returncode == 0, prepared.stderr
    assert sorted(p.name for p in data.glob("*.npy")) == ["demo_train_000001.npy", "demo_val_000000.npy"]
    trained = run_cli("train", "--preset", "demo", "--data", data, "--out", run, "--max-steps", "40",
                      "val_every=39", "sample_every=0", "checkpoint.every=0", env={"OMP_NUM_THREADS": "2"})
    assert trained.returncode == 0, trained.stderr[-3000:]
    val = {int(step): float(value) for step, stream, value in
           (line.split() for line in (run / "log.txt").read_text().splitlines()) if stream == "val"}
    assert sorted(val) == [0, 39]
    assert val[0] > 10.0  # ln(50304) = 10.83 at init
    assert val[39] < val[0] - 3.0, val

    plotted = run_cli("plot", "--log", run / "log.txt", "--sz", "124M", "--out", tmp_path / "plot.png")
    assert plotted.returncode == 0, plotted.stderr
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"{val[39]:.4f}"[:4] in plotted.stdout  # min val loss is reported


@pytest.mark.slow
def test_demo_command_leaves_log_checkpoint_plot_and_samples(tmp_path):
    # What `make demo` runs, shortened to 3 steps.
    out = tmp_path / "demo_out"
    result = run_cli("demo", "--out", out, "--max-steps", "3", env={"OMP_NUM_THREADS": "2"})
    assert result.returncode == 0, result.stderr[-3000:]
    streams = [line.split()[1] for line in (out / "log.txt").read_text().splitlines()]
    assert streams.count("train") == 3 and streams.count("val") == 2  # val at step 0 and at the end
    assert (out / "ckpt_000003" / "model.safetensors").is_file()
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = (out / "final_samples.txt").read_text()
    assert all(prompt in samples for prompt in ("The function", "In Python, a class", "The result of"))
    assert "demo finished" in result.stdout
