"""Process-wide set-up for the entry points (`recipes/run.py`, `recipes/compare.py`), done before the ML libraries
are imported: how many CPU threads torch uses, bitsandbytes' CPU noise silenced at its logger, and the process group
closed at exit."""

from __future__ import annotations

import atexit
import gc
import logging
import os
import sys

from accelerate.utils import get_int_from_env, parse_flag_from_env

logger = logging.getLogger("sftkey_trl")


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity, at most the physical cores (torch's own default)."""
    import psutil

    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(available, psutil.cpu_count(logical=False) or available))


def threads_set_by_accelerate() -> bool:
    """True when OMP_NUM_THREADS=1 here is `accelerate launch`'s default rather than the user's choice: the launcher
    always writes it (its own value, else `--num_cpu_threads_per_process`, else 1), so it is the user's exactly when
    the launcher (our parent) had the variable or the flag."""
    import psutil

    if os.environ.get("OMP_NUM_THREADS") != "1" or "ACCELERATE_DYNAMO_BACKEND" not in os.environ:
        return False  # not 1, or not started by `accelerate launch` (which sets ACCELERATE_DYNAMO_BACKEND)
    try:
        launcher = psutil.Process().parent()
        environment, command = launcher.environ(), launcher.cmdline()
    except (psutil.Error, OSError, AttributeError):  # unreadable: assume the user chose
        return False
    if not any("accelerate" in part for part in command):
        return False
    chosen_by_flag = any(part.startswith("--num_cpu_threads_per_process") for part in command)
    return "OMP_NUM_THREADS" not in environment and not chosen_by_flag


def use_available_cores() -> int | None:
    """For the only process, on the CPU, undo `accelerate launch`'s OMP_NUM_THREADS=1 (never a user's) so torch uses
    the cores `python recipes/run.py` would; returns the threads set, or None."""
    if get_int_from_env(["WORLD_SIZE"], 1) != 1 or not threads_set_by_accelerate():
        return None  # several processes share the cores (accelerate splits them), or the value is the user's
    import torch

    on_cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.accelerator.is_available()
    if not on_cpu:
        return None
    threads = usable_cores()
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # for anything started from here
    return threads


def prepare_process() -> None:
    """Set up this process for one run of a recipe, before the recipe parser imports the ML libraries: a quiet console
    (`console.quiet_libraries`) and the CPU's threads. Every library stays importable: bitsandbytes serves 4-bit/8-bit
    models and the 8-bit optimizers (`optim: adamw_bnb_8bit`)."""
    from .console import quiet_libraries

    quiet_libraries()
    threads = use_available_cores()
    if threads is not None:
        logger.info(
            "training on the CPU with %d threads (accelerate launch's default is 1; set OMP_NUM_THREADS to choose)",
            threads,
        )


def close_process_group() -> None:
    """Destroy the default process group, if one was started, and free it while the interpreter still runs. A gloo
    worker thread that drops its last collective's tensors during the interpreter's teardown cannot take the GIL,
    and aborts a rank that finished its work (SIGABRT, "terminate called without an active exception"); the
    launcher then fails the whole run. `destroy_process_group` only unregisters the group: models and trainers
    still hold it, often in reference cycles, so the collection here is what frees it and joins its threads."""
    distributed = sys.modules.get("torch.distributed")  # never imported: no group to close, and no torch import
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()
        gc.collect()


def start_entry_point(as_program: bool) -> None:
    """What both entry points do first: plain log lines and, run as the program (not called from Python), the
    process set up by `prepare_process`, with its process group closed at exit (after a return, an error line or an
    exception alike)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if as_program:
        prepare_process()
        atexit.register(close_process_group)
