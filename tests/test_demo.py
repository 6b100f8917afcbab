"""`make demo` end to end, shortened: the built-in corpus, a demo model that learns, its log,
checkpoint, plot and samples."""

import pytest

from conftest import run_cli, run_main


@pytest.mark.slow
def test_demo_learns_and_leaves_log_checkpoint_plot_and_samples(tmp_path):
    # What `make demo` runs, shortened to 40 of its 500 steps (val at step 0, before the last update as
    # build-nanogpt measures it, and on the final weights).
    out = tmp_path / "demo_out"
    result = run_cli("demo", "--out", out, "--max-steps", "40", env={"OMP_NUM_THREADS": "2"})
    assert result.returncode == 0, result.stderr[-3000:]
    data = out / "data"
    assert sorted(p.name for p in data.glob("*.npy")) == ["demo_train_000001.npy", "demo_val_000000.npy"]
    rows = [line.split() for line in (out / "log.txt").read_text().splitlines()]
    assert [s for s, k, _ in rows if k == "train"] == [str(i) for i in range(40)]
    val = {int(s): float(v) for s, k, v in rows if k == "val"}
    assert sorted(val) == [0, 39, 40]
    assert val[0] > 10.0  # ln(50304) = 10.83 at init
    assert val[40] < val[0] - 3.0, val  # it learns
    assert f"final val loss {val[40]:.4f} (step 40)" in result.stdout
    assert (out / "ckpt_000040" / "model.safetensors").is_file()
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = (out / "final_samples.txt").read_text()
    assert all(prompt in samples for prompt in ("The function", "In Python, a class", "The result of"))
    assert "demo finished" in result.stdout

    plotted = run_cli("plot", "--log", out / "log.txt", "--sz", "124M", "--out", tmp_path / "plot.png")
    assert plotted.returncode == 0, plotted.stderr
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"min val loss {min(val.values()):.4f}" in plotted.stdout
    assert "no GPT-2 val loss line" in plotted.stdout  # the demo's corpus is not FineWeb-edu


@pytest.mark.slow
def test_a_stopped_demo_continues_with_demo_resume_to_its_plot_and_samples(tmp_path, monkeypatch):
    import os
    import signal

    from gpt2repro.data.loader import TokenLoader

    real, calls = TokenLoader.next_batch, [0]

    def next_batch(self):
        calls[0] += 1
        if calls[0] == 3:  # Ctrl-C during step 2
            os.kill(os.getpid(), signal.SIGINT)
        return real(self)

    out = tmp_path / "demo_out"
    with monkeypatch.context() as patch:
        patch.setattr(TokenLoader, "next_batch", next_batch)
        stopped = run_main("demo", "--out", out, "--max-steps", "6")
    assert f"continue with: gpt2repro demo --out {out} --max-steps 6 --resume" in stopped.stdout
    assert not (out / "plot.png").exists()
    resumed = run_main("demo", "--out", out, "--max-steps", "6", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout and "demo finished" in resumed.stdout
    assert (out / "ckpt_000006").is_dir() and (out / "plot.png").is_file() and (out / "final_samples.txt").is_file()
