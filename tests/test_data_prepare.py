"""prepare: shards hold exactly the tiktoken stream, resume is byte-identical, bad input is one line."""

import json
import random

import numpy as np
import pytest

from conftest import assert_one_line_error, run_cli
from gpt2repro.data import encode, sources
from gpt2repro.data import prepare as prep
from gpt2repro.data.shards import list_shards, open_shard
from gpt2repro.data.tokenizer import EOT_TOKEN, gpt2_encoding
from gpt2repro.errors import UserError
from gpt2repro.files import temporary_name

WORDS = ["the", "cat", "naïve", "café", "東京", "😀", "def f(x):", "    return x", "<|endoftext|>",
         "don't", "12345", "3.14", "\t", "  ", "!!", "Hello", "world", "über", "—", "a\u00a0b"]


def make_documents(n: int, seed: int = 0, mean_words: int = 60) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, 2 * mean_words))]
        lines = [" ".join(words[i:i + 8]) for i in range(0, len(words), 8)]
        docs.append("\n".join(lines) + rng.choice(["", "\n", "\n\n", " "]))
    return docs


def write_jsonl(path, docs):
    path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def expected_stream(docs: list[str]) -> np.ndarray:
    enc = gpt2_encoding()
    out = []
    for doc in docs:
        out.append(EOT_TOKEN)
        out.extend(enc.encode_ordinary(doc))
    return np.array(out, dtype=np.uint16)


def read_stream(out_dir) -> np.ndarray:
    shards = list_shards(out_dir, "val") + list_shards(out_dir, "train")
    return np.concatenate([np.asarray(open_shard(p)) for p in shards])


def shard_bytes(out_dir) -> dict:
    return {p.name: p.read_bytes() for p in sorted(out_dir.glob("*.npy"))}


@pytest.fixture
def small_tasks(monkeypatch):
    # Many small tasks and document pieces, so that a small corpus exercises the cuts.
    monkeypatch.setattr(encode, "TASK_CHARS", 3000)
    monkeypatch.setattr(encode, "SEGMENT_CHARS", 700)


# ---------------------------------------------------------------------------
# the token stream


@pytest.mark.parametrize("workers", [1, 2])
def test_shards_hold_the_tiktoken_stream(tmp_path, small_tasks, workers):
    docs = make_documents(150)
    long_doc = "\n".join(make_documents(40, seed=1))  # one document cut into many pieces
    (tmp_path / "corpus").mkdir()
    write_jsonl(tmp_path / "corpus" / "a.jsonl", docs[:100])
    (tmp_path / "corpus" / "b.txt").write_text(long_doc)
    write_jsonl(tmp_path / "corpus" / "c.jsonl", docs[100:])
    out = tmp_path / "out"

    manifest = prep.prepare(str(tmp_path / "corpus"), out, shard_tokens=2000, val_tokens=1500,
                            workers=workers)

    expected = expected_stream(docs[:100] + [long_doc] + docs[100:])
    assert np.array_equal(read_stream(out), expected)
    names = [s["file"] for s in manifest["shards"]]
    assert names[0] == "corpus_val_000000.npy" and names[1] == "corpus_train_000001.npy"
    assert [s["tokens"] for s in manifest["shards"][:-1]] == [1500] + [2000] * (len(names) - 2)
    # Documents span shards: some shard does not start with <|endoftext|>.
    assert any(open_shard(out / name)[0] != EOT_TOKEN for name in names[1:])
    assert manifest["documents"] == len(docs) + 1
    for shard in manifest["shards"]:
        assert shard["documents"] == int((open_shard(out / shard["file"]) == EOT_TOKEN).sum())
    assert manifest["tokenizer"]["encoder.json"].startswith("1961396")
    assert not list(out.glob("*.tmp")) and not (out / prep.PROGRESS).exists()


def test_cut_documents_encode_like_the_whole():
    rng = random.Random(3)
    pieces = ["word", " word", "\n", "\n\n", " \n", "\r\n", "\u3000\n", "\t", "x\ny", "😀", "'s", "12",
              "\u00a0", "  ", ".\n", "\n ", "é"]
    enc = gpt2_encoding()
    for _ in range(200):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 120)))
        parts = encode.split_document(text, max_chars=rng.randint(1, 12))
        assert "".join(parts) == text
        assert sum((enc.encode_ordinary(p) for p in parts), []) == enc.encode_ordinary(text), parts


def test_max_tokens_stops_exactly(tmp_path):
    docs = make_documents(100)
    manifest = prep.prepare(str(write_jsonl(tmp_path / "d.jsonl", docs)), tmp_path / "out",
                            shard_tokens=1000, val_tokens=500, max_tokens=2222, workers=1)
    assert manifest["tokens"] == 2222
    assert np.array_equal(read_stream(tmp_path / "out"), expected_stream(docs)[:2222])


def test_fineweb_path_through_datasets(tmp_path, monkeypatch):
    # The real load_dataset call is replaced by the same call on a local jsonl file.
    import datasets

    docs = make_documents(120)
    data = write_jsonl(tmp_path / "fw.jsonl", docs)
    calls = []

    def local_fineweb(repo, name, streaming):
        calls.append((repo, name, streaming))
        return datasets.load_dataset("json", data_files=str(data), split="train", streaming=streaming,
                                     cache_dir=str(tmp_path / "hf"))

    monkeypatch.setattr(sources, "load_fineweb", local_fineweb)
    for streaming in (False, True):
        out = tmp_path / f"out{streaming}"
        prep.prepare("fineweb-edu", out, name="sample-10BT", streaming=streaming,
                     shard_tokens=1500, val_tokens=1000, workers=1)
        assert (out / "edufineweb_val_000000.npy").is_file()
        assert (out / "edufineweb_train_000001.npy").is_file()
        assert np.array_equal(read_stream(out), expected_stream(docs))
    assert calls == [("HuggingFaceFW/fineweb-edu", "sample-10BT", False),
                     ("HuggingFaceFW/fineweb-edu", "sample-10BT", True)]


def test_fineweb_source_is_hf_fineweb_with_llm_c_names(tmp_path, monkeypatch):
    # modded-nanogpt's corpus: the same datasets path, its own repo, llm.c's shard names.
    import datasets

    docs = make_documents(120)
    calls = []

    def local_fineweb(repo, name, streaming):
        calls.append((repo, name, streaming))
        return datasets.Dataset.from_dict({"text": docs, "id": list(range(len(docs)))})

    monkeypatch.setattr(sources, "load_fineweb", local_fineweb)
    out = tmp_path / "out"
    manifest = prep.prepare("fineweb", out, shard_tokens=1500, val_tokens=1000, workers=1)
    assert calls == [("HuggingFaceFW/fineweb", "sample-10BT", False)]
    assert manifest["source"] == "HuggingFaceFW/fineweb/sample-10BT" and manifest["prefix"] == "fineweb"
    names = sorted(p.name for p in out.glob("*.npy"))
    assert names[0] == "fineweb_train_000001.npy" and names[-1] == "fineweb_val_000000.npy" and len(names) > 2
    assert np.array_equal(read_stream(out), expected_stream(docs))


def test_unknown_source_name_is_one_line(tmp_path, monkeypatch, capsys):
    from gpt2repro import cli

    monkeypatch.setattr(sources, "load_fineweb", lambda *a: pytest.fail(f"{a} went to the hub"))
    for typo in ("fineweb10B", "fineweb_edu", "FineWeb"):
        code = cli.main(["prepare", "--source", typo, "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert f"--source {typo}: no such file or directory; give fineweb-edu, fineweb, demo" in err
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------
# resume


def _interrupt_after(monkeypatch, n_shards):
    real_save = prep.write_shard
    saved = []

    def save_then_stop(path, tokens):
        if len(saved) == n_shards:
            temporary_name(path).write_bytes(b"half a shard")  # as if killed mid-write
            raise KeyboardInterrupt
        real_save(path, tokens)
        saved.append(path)

    monkeypatch.setattr(prep, "write_shard", save_then_stop)
    return saved


@pytest.mark.parametrize("source_kind", ["jsonl", "fineweb-streaming"])
def test_interrupted_prepare_resumes_byte_identical(tmp_path, monkeypatch, small_tasks, source_kind):
    docs = make_documents(200)
    data = write_jsonl(tmp_path / "d.jsonl", docs)
    source = str(data)
    if source_kind == "fineweb-streaming":
        import datasets

        source = "fineweb-edu"
        monkeypatch.setattr(sources, "load_fineweb", lambda repo, name, streaming: datasets.load_dataset(
            "json", data_files=str(data), split="train", streaming=True, cache_dir=str(tmp_path / "hf")))
    settings = dict(shard_tokens=1700, val_tokens=1100, workers=2)
    prep.prepare(source, tmp_path / "full", **settings)

    with monkeypatch.context() as m:
        saved = _interrupt_after(m, 3)
        with pytest.raises(KeyboardInterrupt):
            prep.prepare(source, tmp_path / "resumed", **settings)
    out = tmp_path / "resumed"
    assert len(saved) == 3 and not (out / prep.MANIFEST).exists()
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in saved}

    prep.prepare(source, out, **settings)

    assert shard_bytes(out) == shard_bytes(tmp_path / "full")
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in saved} == before  # kept, not redone
    assert not list(out.glob(".*.tmp"))
    full = json.loads((tmp_path / "full" / prep.MANIFEST).read_text())
    assert json.loads((out / prep.MANIFEST).read_text())["shards"] == full["shards"]


def test_raising_max_tokens_extends_the_shards(tmp_path, monkeypatch):
    data = str(write_jsonl(tmp_path / "d.jsonl", make_documents(150)))
    prep.prepare(data, tmp_path / "full", shard_tokens=1000, val_tokens=800, workers=1)
    prep.prepare(data, tmp_path / "grown", shard_tokens=1000, val_tokens=800, max_tokens=3500, workers=1)
    with monkeypatch.context() as m:  # stopped before its first new shard: the folder still vouches for its own
        m.setattr(prep, "tokenize_documents", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            prep.prepare(data, tmp_path / "grown", shard_tokens=1000, val_tokens=800, workers=1)
    prep.prepare(data, tmp_path / "grown", shard_tokens=1000, val_tokens=800, workers=1)
    assert shard_bytes(tmp_path / "grown") == shard_bytes(tmp_path / "full")


def test_rerun_of_a_finished_prepare_changes_nothing(tmp_path, capsys):
    data = str(write_jsonl(tmp_path / "d.jsonl", make_documents(60)))
    prep.prepare(data, tmp_path / "out", shard_tokens=1000, val_tokens=500, workers=1)
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}
    prep.prepare(data, tmp_path / "out", shard_tokens=1000, val_tokens=500, workers=1)
    assert "nothing to do" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()} == stamps


# ---------------------------------------------------------------------------
# the demo corpus


def test_demo_corpus_is_real_prose_and_large_enough():
    from gpt2repro.data import demo_corpus

    enc = gpt2_encoding()
    tokens, documents = 0, 0
    for doc in demo_corpus.documents():
        tokens += len(enc.encode_ordinary(doc)) + 1
        documents += 1
        if tokens >= 100_000:
            break
    assert tokens >= 100_000 and documents > 20
    first = next(demo_corpus.documents())
    assert first == demo_corpus._all_documents.__wrapped__()[0]  # deterministic: built again, uncached
    assert sum(c.isalpha() for c in first) > 0.5 * len(first)


SITECUSTOMIZE = """
import os, socket
def _refuse(*args, **kwargs):
    raise OSError("network is off in this test")
socket.socket.connect = _refuse
socket.socket.connect_ex = _refuse
socket.create_connection = _refuse
socket.getaddrinfo = _refuse
open(os.environ["NETWORK_OFF_MARKER"], "a").write("on\\n")
"""


def test_prepare_demo_works_with_the_network_off(tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    marker = tmp_path / "marker"
    env = {"PYTHONPATH": str(tmp_path / "site"), "NETWORK_OFF_MARKER": str(marker),
           "HF_HUB_OFFLINE": "1", "TIKTOKEN_CACHE_DIR": str(tmp_path / "empty-cache")}
    out = tmp_path / "demo"
    result = run_cli("prepare", "--source", "demo", "--out", out, "--shard-tokens", 20000,
                     "--val-tokens", 10000, "--max-tokens", 60000, "--workers", 2, env=env)
    assert result.returncode == 0, result.stderr
    assert marker.read_text().startswith("on")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokens"] == 60000 and manifest["source"] == "demo"
    assert [p.name for p in list_shards(out, "val")] == ["demo_val_000000.npy"]
    assert len(list_shards(out, "train")) == 3


# ---------------------------------------------------------------------------
# bad input: one line naming the file and the fix, non-zero exit, good shards untouched


def test_empty_corpus(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run_cli("prepare", "--source", tmp_path / "empty", "--out", tmp_path / "o"),
                          str(tmp_path / "empty"), "empty corpus")
    (tmp_path / "blank.txt").write_text("")
    assert_one_line_error(run_cli("prepare", "--source", tmp_path / "blank.txt", "--out", tmp_path / "o"),
                          "blank.txt", "empty corpus")
    assert not (tmp_path / "o").exists()


def test_jsonl_line_without_text_keeps_finished_shards(tmp_path):
    docs = make_documents(1500)  # more text than one worker task, so shards are written first
    lines = [json.dumps({"text": d}) for d in docs] + [json.dumps({"body": "no text here"})]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    result = run_cli("prepare", "--source", bad, "--out", out, "--shard-tokens", 20000,
                     "--val-tokens", 20000, "--workers", 2)
    assert_one_line_error(result, f"bad.jsonl:{len(docs) + 1}", '"text"')
    # The shards finished before the bad line are whole, valid and exactly the stream's start.
    written = sorted(out.glob("*.npy"))
    assert len(written) >= 2 and not list(out.glob(".*.tmp")) and not (out / "manifest.json").exists()
    assert np.array_equal(read_stream(out), expected_stream(docs)[:20000 * len(written)])


def test_other_bad_sources(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["a document"]}), tmp_path / "t.parquet")
    assert_one_line_error(run_cli("prepare", "--source", tmp_path / "t.parquet", "--out", tmp_path / "o"),
                          "t.parquet", '"text" column', "content")
    (tmp_path / "notjson.jsonl").write_text('{"text": "fine"}\n{oops\n')
    assert_one_line_error(run_cli("prepare", "--source", tmp_path / "notjson.jsonl", "--out", tmp_path / "o"),
                          "notjson.jsonl:2", "not valid JSON")
    assert_one_line_error(run_cli("prepare", "--source", tmp_path / "missing.jsonl", "--out", tmp_path / "o"),
                          "missing.jsonl", "no such file")
    small = write_jsonl(tmp_path / "small.jsonl", make_documents(3))
    assert_one_line_error(run_cli("prepare", "--source", small, "--out", tmp_path / "o"),
                          "small.jsonl", "--val-tokens")
    assert_one_line_error(run_cli("prepare", "--source", small, "--out", tmp_path / "o",
                                  "--val-tokens", 100, "--max-tokens", 50), "--max-tokens 50")
    assert not list((tmp_path / "o").glob("*.npy"))


def test_prepare_into_a_directory_of_other_shards_touches_nothing(tmp_path):
    first = write_jsonl(tmp_path / "first.jsonl", make_documents(60, seed=1))
    out = tmp_path / "out"
    prep.prepare(str(first), out, shard_tokens=1000, val_tokens=500, workers=1)
    before = shard_bytes(out)
    second = write_jsonl(tmp_path / "second.jsonl", make_documents(60, seed=2))
    for prefix in ("first", "second"):
        result = run_cli("prepare", "--source", second, "--out", out, "--shard-tokens", 1000,
                         "--val-tokens", 500, "--prefix", prefix)
        assert_one_line_error(result, str(out), "different prepare", "new --out")
    assert shard_bytes(out) == before
    # Shards without a manifest (e.g. build-nanogpt's) are never mixed with ours either.
    (out / "manifest.json").unlink()
    result = run_cli("prepare", "--source", second, "--out", out, "--shard-tokens", 1000,
                     "--val-tokens", 500)
    assert_one_line_error(result, str(out), "other shards", "new --out")
    assert shard_bytes(out) == before


def test_bench_tokenize_reports_both_paths(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", make_documents(60))
    result = run_cli("bench", "tokenize", "--source", data, "--workers", 2, "--max-docs", 50)
    assert result.returncode == 0, result.stderr
    assert "identical tokens" in result.stdout
    rows = [ln for ln in result.stdout.splitlines() if ln.startswith("| ") and "tokens/s" not in ln]
    assert len(rows) == 2 and "Pool per document" in rows[0] and "prepare" in rows[1]
    assert rows[0].split("|")[2] == rows[1].split("|")[2]  # same token count


def test_a_damaged_shard_is_redone_and_a_smaller_max_tokens_refused(tmp_path):
    data = str(write_jsonl(tmp_path / "d.jsonl", make_documents(150)))
    settings = dict(shard_tokens=1000, val_tokens=800, workers=1)
    prep.prepare(data, tmp_path / "full", **settings)
    prep.prepare(data, tmp_path / "out", **settings)
    damaged = tmp_path / "out" / "d_train_000002.npy"
    damaged.write_bytes(damaged.read_bytes()[:500])
    prep.prepare(data, tmp_path / "out", **settings)
    assert shard_bytes(tmp_path / "out") == shard_bytes(tmp_path / "full")
    with pytest.raises(UserError, match="already holds"):
        prep.prepare(data, tmp_path / "out", max_tokens=2000, **settings)
