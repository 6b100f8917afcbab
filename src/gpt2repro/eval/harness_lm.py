"""Our models inside lm-evaluation-harness: an ``lm_eval.api.model.LM`` over our inference path.

It follows lm-eval's ``hf`` model wherever a choice changes a number, so a faithful model gives what
``lm_eval --model hf`` gives on its export (docs/evaluation.md lists each choice). Imports ``lm_eval``
at the top: ``eval.harness`` checks the extra first.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from gpt2repro.data.tokenizer import EOT_TOKEN, decode, gpt2_encoding
from gpt2repro.device import autocast
from gpt2repro.errors import UserError
from gpt2repro.eval.continuations import score_requests
from gpt2repro.model.generate import generate

EOT_TEXT = "<|endoftext|>"


class _Stop(Exception):
    """From ``generate``'s per-token callback: a stop string or <|endoftext|> has appeared."""


class GPTLM(TemplateLM):
    """lm-eval's view of one of our models (a ``GPT`` on ``device``, in eval mode)."""

    def __init__(self, model, *, device, autocast_dtype: torch.dtype | None = None, batch_size: int = 32,
                 rank: int = 0, world_size: int = 1, name: str = "gpt2repro", show_progress: bool = True):
        super().__init__()
        self.model = model
        self._device = torch.device(device)
        self.autocast_dtype = autocast_dtype
        self.batch_size = batch_size
        self._rank, self._world_size = rank, world_size
        self.name = name
        self.show_progress = show_progress and rank == 0
        self.max_length = model.config.block_size
        self.max_gen_toks = 256  # lm-eval's hf model's default

    @property
    def eot_token_id(self) -> int:
        return EOT_TOKEN

    @property
    def tokenizer_name(self) -> str:
        return "gpt2"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return gpt2_encoding().encode(string, allowed_special={EOT_TEXT})

    def tok_decode(self, tokens: list[int]) -> str:
        return decode([t for t in tokens if t != EOT_TOKEN])

    def _bar(self, total: int, what: str):
        return tqdm(total=total, desc=what, unit="req", disable=not (self.show_progress and sys.stderr.isatty()))

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        with self._bar(len(requests), "loglikelihood") as bar:
            return score_requests(self.model, [(ctx, cont) for _, ctx, cont in requests], batch_size=self.batch_size,
                                  device=self._device, autocast_dtype=self.autocast_dtype, progress=bar.update)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return super().loglikelihood(requests, disable_tqdm=True)  # our own bar, not its tokenizing one

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, request in enumerate(requests):
            (text,) = request.args
            for context, continuation in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=EOT_TOKEN, max_seq_len=self.max_length,
                    context_len=1)):
                windows.append((None, context, continuation))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[i] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        with self._bar(len(requests), "generate_until") as bar:
            for request in requests:
                out.append(self.generate_one(*request.args))  # context, gen_kwargs
                self.cache_hook.add_partial("generate_until", request.args, out[-1])
                bar.update(1)
        return out

    def generate_one(self, context: str, gen_kwargs: dict) -> str:
        """Greedy continuation of ``context`` up to ``max_gen_toks`` tokens, cut at the first stop string."""
        kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
        if kwargs.get("do_sample"):
            raise UserError(f"a task asks for sampled generations ({gen_kwargs}); eval harness generates greedily "
                            "only: use a task with do_sample false")
        until = handle_stop_sequences(kwargs.pop("until", None), eos=EOT_TEXT)
        max_gen_toks = int(kwargs.pop("max_gen_toks"))
        prompt = self.tok_encode(context)[-max(1, self.max_length - max_gen_toks):]
        new: list[int] = []

        def on_token(tokens: list[int]) -> None:
            new.append(tokens[0])
            text = decode(new)
            if tokens[0] == EOT_TOKEN or any(stop and stop in text for stop in until):
                raise _Stop

        try:
            with autocast(self._device, self.autocast_dtype):
                generate(self.model, prompt, num_samples=1, max_new_tokens=max_gen_toks, temperature=0.0,
                         device=self._device, on_token=on_token)
        except _Stop:
            pass
        return postprocess_generated_text(self.tok_decode(new), stop=until, think_end_token=None)  # drops the EOT

    # Under torchrun lm-eval gives each rank every W-th document and gathers on rank 0 through these.
    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._world_size == 1:
            return tensor
        flat = tensor.reshape(1) if tensor.dim() == 0 else tensor
        parts = [torch.empty_like(flat) for _ in range(self._world_size)]
        dist.all_gather(parts, flat)
        return torch.cat(parts)

    def gather_object(self, obj, dst: int = 0):
        if self._world_size == 1:
            return [obj]
        gathered = [None] * self._world_size if self._rank == dst else None
        dist.gather_object(obj, gathered, dst=dst)
        return gathered

    def barrier(self) -> None:
        if self._world_size > 1:
            dist.barrier()

    def get_model_info(self) -> dict:
        cfg = self.model.config
        return {"model_name": self.name, "model_num_parameters": self.model.num_params(),
                "block_size": cfg.block_size, "n_layer": cfg.n_layer, "n_embd": cfg.n_embd}
