"""Document masking and the sliding window: three kernels, one rule."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

from conftest import run_cli
from gpt2repro.model import attention
from gpt2repro.model.attention import LocalMask, document_ids, flex_block_mask, local_attention

EOT = 50256


def random_documents(batch, length, boundaries, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, EOT, (batch, length), generator=g)
    for row in tokens:
        row[torch.randint(0, length, (boundaries,), generator=g)] = EOT
    return tokens


def rule(docs, blocks, block, length):
    """The rule, written out token by token: causal, same document, key block among the query's
    last ``blocks`` blocks."""
    q = torch.arange(length)[:, None]
    k = torch.arange(length)[None, :]
    allowed = (q >= k)[None]
    if blocks:
        allowed = allowed & (q // block - k // block < blocks)
    if docs is not None:
        allowed = allowed & (docs[:, :, None] == docs[:, None, :])
    return allowed[:, None]


CASES = [(blocks, with_docs) for blocks in (0, 1, 3, 40) for with_docs in (False, True)]


@pytest.mark.parametrize("blocks, with_docs", CASES)
def test_chunked_sdpa_and_flex_equal_sdpa_with_the_dense_mask(blocks, with_docs, monkeypatch):
    B, H, T, D, block = 2, 2, 640, 16, 64
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, H, T, D, generator=g) for _ in range(3))
    docs = document_ids(random_documents(B, T, 5)) if with_docs else None
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=rule(docs, blocks, block, T))
    monkeypatch.setattr(attention, "QUERY_CHUNK", 96)  # several chunks, none aligned to a block
    chunked = local_attention(q, k, v, LocalMask(0, docs, blocks, block))
    assert (chunked - expected).abs().max() <= 1e-5
    with warnings.catch_warnings():  # uncompiled FlexAttention warns that it is slow; it is a reference here
        warnings.simplefilter("ignore")
        flexed = flex_attention(q, k, v, block_mask=flex_block_mask(docs, blocks, block, B, T, "cpu"))
    assert (flexed - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("blocks, with_docs", CASES)
def test_flex_block_lists_are_the_blocks_the_rule_sees(blocks, with_docs):
    """Compiled FlexAttention computes only the listed key blocks and skips the token mask in
    the 'full' ones; uncompiled it reads the token mask alone. So the lists are checked here on
    their own: partial = some but not all tokens visible, full = all visible."""
    B, T, block = 2, 1024, 64
    docs = document_ids(random_documents(B, T, 6, seed=2)) if with_docs else None
    mask = flex_block_mask(docs, blocks, block, B, T, "cpu")
    tokens = rule(docs, blocks, block, T)[:, 0].expand(B, T, T).reshape(B, T // block, block, T // block, block)
    visible = tokens.sum(dim=(2, 4))
    listed = mask.to_dense()[:, 0].bool()  # partial and full blocks together
    assert torch.equal(listed, visible > 0)
    full = torch.zeros_like(listed)
    n = T // block
    for b in range(B):
        for i in range(n):
            count = int(mask.full_kv_num_blocks[b, 0, i])
            full[b, i, mask.full_kv_indices[b, 0, i, :count].long()] = True
    assert torch.equal(full, visible == block * block)


def test_a_long_sequence_never_builds_a_quadratic_mask(monkeypatch):
    """65,536 tokens with documents and the record's final window: each SDPA call's mask covers
    one chunk of queries and only the keys within its window."""
    T, block, blocks = 65_536, 128, 14
    tokens = random_documents(1, T, 40)
    q = k = v = torch.randn(1, 1, T, 8)
    largest = []
    sdpa = F.scaled_dot_product_attention

    def recording(*args, attn_mask=None, **kwargs):
        largest.append(attn_mask.numel())
        return sdpa(*args, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", recording)
    local_attention(q, k, v, LocalMask(0, document_ids(tokens), blocks, block))
    assert len(largest) == T // attention.QUERY_CHUNK
    assert max(largest) <= attention.QUERY_CHUNK * (attention.QUERY_CHUNK + blocks * block)


def test_rotary_tables_follow_a_device_block_that_no_longer_reaches_linspace():
    """transformers patches torch.linspace while it loads a model; if the process's first
    `with torch.device(...)` block runs then, later blocks no longer reach linspace (torch caches
    its list of constructors). A model built on the meta device must still build. In a new process:
    the list is cached in this one."""
    code = """
import torch
original = torch.linspace
torch.linspace = lambda *args, **kwargs: original(*args, **kwargs)  # as transformers' loading does
with torch.device("meta"):
    torch.empty(0)  # the process's first call in a device block: torch lists its constructors now
torch.linspace = original
from gpt2repro.model.attention import rotary_tables
with torch.device("meta"):
    print(*{t.device.type for t in rotary_tables(16, 64, 10000.0, "rope-half")})
"""
    result = run_cli("-c", code, module=None)
    assert result.returncode == 0 and result.stdout.split() == ["meta"], result.stderr[-2000:]


def test_the_growing_window_never_recompiles_flex(monkeypatch):
    """Over the record's whole window schedule (1 to 14 blocks), FlexAttention builds one graph: by
    itself (the uncompiled model's path: evaluation replicas, micro-batch probes) and inside a
    compiled model (the trainer's path), where the window comes as a 0-d tensor. With the window a
    Python number each new window was a new graph, and after 8 Dynamo fell back to unfused flex,
    which materialises B·H·T² scores (about 103 GB at the record's shape)."""
    import dataclasses

    from torch._dynamo.utils import counters

    from gpt2repro.config.presets import get_preset
    from gpt2repro.model.gpt import GPT

    record = get_preset("gpt2-124m-modern")
    schedule = attention.window_schedule(record.model, record.optim.max_steps)
    assert schedule == list(range(1, 15))
    T, block = 512, 128
    tokens = random_documents(1, T, 3)
    q = k = v = torch.randn(1, 2, T, 16)
    graphs = counters["stats"]["unique_graphs"]
    with torch.no_grad():
        for blocks in schedule:
            mask = flex_block_mask(document_ids(tokens), blocks, block, 1, T, "cpu")
            attention.compiled_flex_attention()(q, k, v, block_mask=mask)
    assert counters["stats"]["unique_graphs"] - graphs <= 2

    # The compiled model, its flex path taken on the CPU: only Dynamo's guards count here, so the
    # graphs run eagerly (Inductor's CPU flex kernel cannot take a mask built inside the graph).
    monkeypatch.setattr(attention, "FLEX_DEVICE_TYPES", ("cuda", "cpu"))
    cfg = dataclasses.replace(get_preset("tiny-modern").model, block_size=T, window_block=block,
                              window_start=block, window_end=14 * block)
    model = torch.compile(GPT(cfg).eval(), backend="aot_eager")
    graphs = counters["stats"]["unique_graphs"]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unfused flex, on purpose
        for blocks in schedule:
            model(tokens, window=torch.tensor(blocks))
    assert counters["stats"]["unique_graphs"] - graphs <= 2


def test_flex_refuses_a_block_its_kernels_cannot_tile_at_start_up(shards, tmp_path, monkeypatch):
    """FlexAttention's CUDA kernels tile blocks of 128 tokens: a 16-token window block (demo-modern's)
    would fail to compile at the first step. The rule is checked where CUDA trains, with one line;
    the CPU's chunked SDPA takes any block."""
    from conftest import assert_one_line_error, one_line_user_error, run_main
    from gpt2repro.config.presets import get_preset

    cuda = torch.device("cuda")  # a device object needs no GPU
    attention.check_flex(get_preset("gpt2-124m-modern").model, 65536, cuda)  # the record fits
    attention.check_flex(get_preset("demo-modern").model, 128, torch.device("cpu"))
    one_line_user_error(lambda: attention.check_flex(get_preset("demo-modern").model, 128, cuda),
                        "model.window_block=16", "multiple of 128")
    one_line_user_error(lambda: attention.check_flex(get_preset("gpt2-124m-modern").model, 1000, cuda),
                        "data.seq_len=1000", "whole blocks of model.window_block=128")
    # through the trainer's own call, before anything is built or written
    monkeypatch.setattr(attention, "FLEX_DEVICE_TYPES", ("cuda", "cpu"))
    result = run_main("train", "--preset", "tiny-modern", "--data", shards, "--out", tmp_path / "run")
    assert_one_line_error(result, "model.window_block=16", "FlexAttention on cpu")
    assert not (tmp_path / "run").exists()


def test_chunked_sdpa_builds_its_masks_once_per_forward_pass(monkeypatch):
    """The fallback's masks (and the one host read each needs, where a document starts) are built
    for the first layer and reused by the others: on a GPU every host read stalls the queue."""
    from conftest import CountHostReads
    from gpt2repro.config.presets import get_preset
    from gpt2repro.model.gpt import GPT

    monkeypatch.setattr(attention, "QUERY_CHUNK", 16)
    cfg = get_preset("tiny-modern").model  # 4 layers, 3 with attention, documents and a window
    model = GPT(cfg).eval()
    tokens = random_documents(2, 64, 3)
    with torch.no_grad(), CountHostReads() as reads:
        model(tokens)
    assert len(reads.calls) <= 64 // 16, reads.calls  # one per chunk, not one per chunk and layer
