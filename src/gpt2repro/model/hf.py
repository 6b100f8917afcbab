"""Hugging Face interop: OpenAI's GPT-2 into our model, and our model out as a GPT2LMHeadModel.
Imported models keep its 50,257-token vocabulary (padding rows would change the softmax)."""

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

CONV1D_WEIGHTS = (  # OpenAI's (in, out) Conv1D weights: transposed both ways
    "attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
HF_ONLY_BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of old checkpoints


def from_hf_model(hf_model) -> GPT:
    c = hf_model.config
    if c.vocab_size < GPT2_VOCAB_SIZE:
        raise UserError(f"{getattr(c, 'name_or_path', '') or 'this model'}: its vocabulary has {c.vocab_size:,} "
                        f"tokens; gpt2repro reads GPT-2 token ids, so a model needs GPT-2's {GPT2_VOCAB_SIZE:,}")
    model = GPT(ModelConfig(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, block_size=c.n_positions,
                            vocab_size=c.vocab_size, tie_embeddings=bool(getattr(c, "tie_word_embeddings", True))))
    state = {key: value.t() if key.endswith(CONV1D_WEIGHTS) else value
             for key, value in hf_model.state_dict().items() if not key.endswith(HF_ONLY_BUFFERS)}
    load_state_strict(model, state, getattr(c, "name_or_path", "Hugging Face model"))
    return model


def quiet_transformers() -> None:
    from huggingface_hub.utils import disable_progress_bars
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as transformers_logging

    hub_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    disable_progress_bars()


def from_pretrained(name_or_path: str) -> GPT:
    """OpenAI's GPT-2 (``gpt2``, ...) or a Hugging Face GPT-2 directory; a hub name from the cache if there."""
    from transformers import GPT2LMHeadModel

    quiet_transformers()

    def load(**options):
        with warnings.catch_warnings():  # e.g. torch.load's note on an old pickle protocol
            warnings.simplefilter("ignore")
            return GPT2LMHeadModel.from_pretrained(name_or_path, torch_dtype=torch.float32, **options)

    try:
        if Path(name_or_path).is_dir():
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
        model_info(name, timeout=10)  # seconds: this one request decides whether the hub is reachable
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


def to_hf_model(model: GPT):
    """A ``transformers`` GPT2LMHeadModel with our weights, vocabulary cut to 50,257."""
    from transformers import GPT2Config, GPT2LMHeadModel

    # an untied head is still GPT-2; with other switches a GPT-2 config would silently compute something else
    cfg = model.config
    if refused := [s for s in cfg.non_gpt2_switches() if not s.startswith("model.tie_embeddings=")]:
        raise UserError(f"this model is not GPT-2's architecture ({', '.join(refused)}); transformers' "
                        "GPT2LMHeadModel cannot run it, so there is no Hugging Face export: use "
                        "gpt2repro eval/sample with the checkpoint itself")
    hf_model = GPT2LMHeadModel(GPT2Config(
        vocab_size=GPT2_VOCAB_SIZE, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        layer_norm_epsilon=1e-5, bos_token_id=EOT_TOKEN, eos_token_id=EOT_TOKEN,
        tie_word_embeddings=cfg.tie_embeddings, architectures=["GPT2LMHeadModel"]))
    state = {key: value.detach().float().cpu() for key, value in model.state_dict().items()}
    for key in ("transformer.wte.weight", "lm_head.weight"):
        state[key] = state[key][:GPT2_VOCAB_SIZE]
    state = {key: value.t().contiguous() if key.endswith(CONV1D_WEIGHTS) else value for key, value in state.items()}
    missing, unexpected = hf_model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith(HF_ONLY_BUFFERS) for k in missing), (missing, unexpected)
    if cfg.tie_embeddings:
        hf_model.tie_weights()
    return hf_model.eval()


def export_hf(model: GPT, out_dir: Path) -> Path:
    """A directory that ``AutoModelForCausalLM``/``AutoTokenizer`` and lm-eval's ``hf`` model load."""
    from transformers import GPT2TokenizerFast

    quiet_transformers()
    hf_model = to_hf_model(model)  # refuses a model it cannot express before anything is written
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(out_dir, safe_serialization=True)
    # OpenAI's two files under the names transformers looks for, in every version
    encoder_json, vocab_bpe = bpe_files()
    shutil.copyfile(encoder_json, out_dir / "vocab.json")
    shutil.copyfile(vocab_bpe, out_dir / "merges.txt")
    tokenizer = GPT2TokenizerFast.from_pretrained(out_dir)
    tokenizer.model_max_length = model.config.block_size
    tokenizer.save_pretrained(out_dir)
    return out_dir
