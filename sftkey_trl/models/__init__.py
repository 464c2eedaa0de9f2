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
    for prefix, known, kind in ((DEMO_PREFIX, DEMO_MODEL, "demo"), (LOCAL_PREFIX, LOCAL_NAME, "local")):
        if name.startswith(prefix) and name != known:
            raise SFTKeyError(f"`model_name_or_path: {name}` is not a known {kind} model; use `{known}`")
