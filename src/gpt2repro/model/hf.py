"""Hugging Face interop: OpenAI's GPT-2 into our model, and our model out as a GPT2LMHeadModel.

OpenAI's checkpoint stores the four projection matrices as ``Conv1D`` weights,
(in, out) rather than ``nn.Linear``'s (out, in): they are transposed both ways.
Its vocabulary is the real 50,257 tokens. Imported models keep exactly that size
(no padding rows that would change the softmax); exported models are cut back
to it from our padded 50,304.
"""

from __future__ import annotations

import pickle
import shutil
import sys
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError

from gpt2repro.config import GPT2_VOCAB_SIZE, ModelConfig
from gpt2repro.data.tokenizer import EOT_TOKEN, bpe_files
from gpt2repro.errors import UserError
from gpt2repro.model.checkpoint import load_state_strict
from gpt2repro.model.gpt import GPT

CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
HF_ONLY_BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of old checkpoints


def from_hf_model(hf_model) -> GPT:
    """Our GPT with the weights of a ``transformers`` GPT2LMHeadModel."""
    c = hf_model.config
    if c.vocab_size < GPT2_VOCAB_SIZE:
        raise UserError(f"{getattr(c, 'name_or_path', '') or 'this model'}: its vocabulary has {c.vocab_size:,} "
                        f"tokens; gpt2repro reads GPT-2 token ids, so a model needs GPT-2's {GPT2_VOCAB_SIZE:,}")
    cfg = ModelConfig(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, block_size=c.n_positions,
                      vocab_size=c.vocab_size, tie_embeddings=bool(getattr(c, "tie_word_embeddings", True)))
    model = GPT(cfg)
    state = {}
    for key, value in hf_model.state_dict().items():
        if key.endswith(HF_ONLY_BUFFERS):
            continue
        state[key] = value.t() if key.endswith(CONV1D_WEIGHTS) else value
    load_state_strict(model, state, getattr(c, "name_or_path", "Hugging Face model"))
    return model


HUB_TIMEOUT_S = 10  # the one request that decides whether the hub is reachable


def quiet_transformers() -> None:
    """transformers' and the hub's progress bars and warnings stay out of our commands' output:
    it is either the model, or one line saying why not."""
    from huggingface_hub.utils import disable_progress_bars
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as transformers_logging

    hub_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    disable_progress_bars()


def from_pretrained(name_or_path: str) -> GPT:
    """OpenAI's GPT-2 (``gpt2``, ``gpt2-medium``, ...) or a local Hugging Face GPT-2 directory.

    A hub name is read from the local cache when it is there, with no network at all;
    otherwise one short request asks the hub for it, so that no network or no such model
    is one line within seconds, not a minute of retries per file."""
    from transformers import GPT2LMHeadModel

    quiet_transformers()
    local = Path(name_or_path).is_dir()

    def load(**options):
        with warnings.catch_warnings():  # e.g. torch.load's note on an old pickle protocol
            warnings.simplefilter("ignore")
            return GPT2LMHeadModel.from_pretrained(name_or_path, torch_dtype=torch.float32, **options)

    try:
        if local:
            hf_model = load()
        else:
            try:
                hf_model = load(local_files_only=True)
            except OSError:
                _check_hub(name_or_path)
                print(f"downloading {name_or_path} from the Hugging Face hub (once: it is cached)",
                      file=sys.stderr, flush=True)
                hf_model = load()
    except pickle.UnpicklingError as e:
        reason = next((ln for ln in str(e).splitlines() if "GLOBAL" in ln), str(e).splitlines()[0]).strip()
        raise UserError(f"{name_or_path}: refused to load its pytorch_model.bin, a pickle that holds more than "
                        f"tensors ({reason[:120]}); loading it could run code: use a model.safetensors copy of "
                        "these weights") from None
    except RuntimeError:  # transformers' refusal of weights whose shapes its config does not give
        raise UserError(f"{name_or_path}: its weights do not fit its config.json (a tensor's shape differs from "
                        "the one the config gives); pass a Hugging Face GPT-2 directory whose config.json "
                        "describes its weights") from None
    except (OSError, ValueError, SafetensorError) as e:  # a truncated model.safetensors is a SafetensorError
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{name_or_path}: could not load a Hugging Face GPT-2 ({first[:200]}); "
                        "pass a GPT-2 directory with config.json and model.safetensors") from None
    return from_hf_model(hf_model)


def _check_hub(name: str) -> None:
    """One request with a short timeout: is ``name`` a model on the hub, and is the hub reachable?"""
    from huggingface_hub import constants, model_info
    from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError

    where = f"{name}: no such local directory"
    if constants.HF_HUB_OFFLINE:
        raise UserError(f"{where}, and not in the Hugging Face cache while HF_HUB_OFFLINE is set; "
                        "pass a local directory, or unset HF_HUB_OFFLINE to download it")
    try:
        model_info(name, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        raise UserError(f"{name}: a gated model on the Hugging Face hub; accept its terms on the hub "
                        "and log in (hf auth login)") from None
    except RepositoryNotFoundError:
        raise UserError(f"{where}, and no model of that name on the Hugging Face hub; pass a checkpoint, "
                        "run or Hugging Face directory, or a hub name such as gpt2") from None
    except Exception as e:  # the HTTP client's own errors: DNS, refused, timeout, proxy
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{where}, and the Hugging Face hub is unreachable ({reason[:120]}); "
                        "pass a local directory, or check the network") from None


def hf_config(cfg: ModelConfig):
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=GPT2_VOCAB_SIZE, n_positions=cfg.block_size, n_embd=cfg.n_embd,
        n_layer=cfg.n_layer, n_head=cfg.n_head, activation_function="gelu_new",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
        bos_token_id=EOT_TOKEN, eos_token_id=EOT_TOKEN, tie_word_embeddings=cfg.tie_embeddings,
        architectures=["GPT2LMHeadModel"],
    )


def to_hf_model(model: GPT):
    """A ``transformers`` GPT2LMHeadModel with our weights, vocabulary cut to 50,257."""
    from transformers import GPT2LMHeadModel

    # An untied head is still GPT-2 to transformers; the other switches are not, and a GPT-2
    # config would load such weights without complaint and compute something else.
    refused = [s for s in model.config.non_gpt2_switches() if not s.startswith("model.tie_embeddings=")]
    if refused:
        raise UserError(f"this model is not GPT-2's architecture ({', '.join(refused)}); transformers' "
                        "GPT2LMHeadModel cannot run it, so there is no Hugging Face export: use "
                        "gpt2repro eval/sample with the checkpoint itself")
    if model.config.vocab_size < GPT2_VOCAB_SIZE:
        raise UserError(f"model vocab_size {model.config.vocab_size} is smaller than GPT-2's {GPT2_VOCAB_SIZE}")
    hf_model = GPT2LMHeadModel(hf_config(model.config))
    state = {}
    for key, value in model.state_dict().items():
        value = value.detach().float().cpu()
        if key in ("transformer.wte.weight", "lm_head.weight"):
            value = value[:GPT2_VOCAB_SIZE]
        state[key] = value.t().contiguous() if key.endswith(CONV1D_WEIGHTS) else value
    missing, unexpected = hf_model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith(HF_ONLY_BUFFERS) for k in missing), (missing, unexpected)
    if model.config.tie_embeddings:
        hf_model.tie_weights()
    return hf_model.eval()


def export_hf(model: GPT, out_dir: Path) -> Path:
    """Write a directory that ``AutoModelForCausalLM``/``AutoTokenizer`` and lm-eval's ``hf`` model load:
    config.json, model.safetensors and the GPT-2 tokenizer files."""
    from transformers import GPT2TokenizerFast

    quiet_transformers()
    hf_model = to_hf_model(model)  # refuses a model it cannot express before anything is written
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(out_dir, safe_serialization=True)
    # OpenAI's two files under the names transformers looks for, in every version.
    encoder_json, vocab_bpe = bpe_files()
    shutil.copyfile(encoder_json, out_dir / "vocab.json")
    shutil.copyfile(vocab_bpe, out_dir / "merges.txt")
    tokenizer = GPT2TokenizerFast.from_pretrained(out_dir)
    tokenizer.model_max_length = model.config.block_size
    tokenizer.save_pretrained(out_dir)
    return out_dir
