"""The project's own models, built locally rather than found: `demo:tiny-llama` (`tiny.py`) and
`local:smollm2-135m-instruct` (`smollm2.py`)."""

from __future__ import annotations

from ..errors import SFTKeyError
from ..files import DEMO_PREFIX

DEMO_MODEL = DEMO_PREFIX + "tiny-llama"
LOCAL_PREFIX = "local:"
LOCAL_NAME = LOCAL_PREFIX + "smollm2-135m-instruct"
MODEL_TYPES = {DEMO_MODEL: "llama", LOCAL_NAME: "llama"}  # their architectures, known before they are built


def check_model_name(name: str) -> None:
    """The project's own models (`demo:`, `local:`) are named exactly: they are built, not found."""
    if name.startswith(DEMO_PREFIX) and name != DEMO_MODEL:
        raise SFTKeyError(f"`model_name_or_path: {name}` is not a known demo model; use `{DEMO_MODEL}`")
    if name.startswith(LOCAL_PREFIX) and name != LOCAL_NAME:
        raise SFTKeyError(f"`model_name_or_path: {name}` is not a known local model; use `{LOCAL_NAME}`")
