"""The project's own adversarial suite (issue 38): hypothesis's stateful testing over one run folder, drawing what a
user does by mistake or bad luck, in any order: run, run in a process and kill it at a drawn moment, start two runs
into the folder together, break a file or folder of the run, change a key, merge into a drawn folder.

After every step the invariant holds: a command exits 0 and the folder holds the uninterrupted result of the recipe
it was given (a reference run, made once per session: the same metrics and training records, losses and weights
within tests/real_launches.py's tolerances), or it exits non-zero with exactly one `error: ...` line and no
traceback. At no moment, a kill's included, does results.json report a stage whose weights are missing or the
manifest call such a stage trained or done; a user's files beside and inside the run folder stay byte-identical.
docs/development.md ("The adversarial suite") lists what it draws, its sizes and what it found.

Runs are in this process (`sftkey_trl.run.cli.main`) except where processes matter: kills and concurrent runs are
recipes/run.py run as the program in processes forked from a server that imported the package once
(`real_launches.run_as_program`)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, Phase, note, seed, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from real_launches import LOSS_RTOL, WEIGHT_TOL, run_as_program
from safetensors.torch import load_file

from sftkey_trl.run.cli import main
from sftkey_trl.run.plan import missing_weights

pytestmark = [pytest.mark.adversarial, pytest.mark.e2e]

NAMES = ("sft", "key")
# Two LoRA stages of 4 optimizer steps each (14 training rows, batch 4), a checkpoint and a log line every step. No
# keep_best: in 4 steps the tiny model never beats its incoming weights, so a kept stage would hold the previous
# stage's weights and its own would go unchecked (tests/run/test_reliability.py kills and resumes keep_best)
STAGES = "[{name: sft, loss_on: completion, num_train_epochs: 1}, {name: key, loss_on: key, num_train_epochs: 1%s}]"
RECIPE = [
    "--max_train_samples", "16", "--max_eval_samples", "4", "--num_train_epochs", "1", "--max_new_tokens", "8",
    "--save_strategy", "steps", "--save_steps", "1", "--logging_steps", "1", "--per_device_train_batch_size", "4",
    "--use_peft", "true", "--lora_dropout", "0",
]  # fmt: skip
# The key a step may change: the key stage's learning rate (a finished key stage must then be restarted)
CONFIGS = {"base": STAGES % "", "changed": STAGES % ", learning_rate: 5.0e-3"}
RUN_SPECIFIC = {"train_seconds", "tokens_per_second", "resumed_from"}  # what differs between equal runs
LOG_LINES = 8  # the trainer's log lines in a whole run: one per optimizer step
# Drawn sequences: one hypothesis seed each (an example of its own, not a mutation of another's). The full suite
# draws a few; SFTKEY_ADVERSARIAL_SEQUENCES=N draws N (docs/development.md gives a longer run's numbers)
SEQUENCES = int(os.environ.get("SFTKEY_ADVERSARIAL_SEQUENCES", "6"))
SIZES = {"max_examples": 2, "stateful_step_count": 10}  # per seed: the simplest sequence (cheap) and a drawn one
DRAWN = {"sequences": 0, "steps": 0, "processes": 0, "kills": 0, "refusals": 0}  # the docs' numbers
TRACE: list[str] = []  # every step and its outcome, printed at the end


def recipe(config: str) -> list[str]:
    return [*RECIPE, "--stages", CONFIGS[config]]


def call(argv: list[str]) -> tuple[int, str]:
    """recipes/run.py's main in this process: its exit status and stderr. An exception other than the one-line exit
    is the traceback a user would see: it fails the step."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            code = main(argv)
        except SystemExit as exit_:
            code = exit_.code
    return code, stderr.getvalue()


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def one_line_or_success(code: int, stderr: str, what: str) -> str | None:
    """The rule for every command: exit 0, or exit 2 with exactly one `error:` line; never a traceback. Returns the
    error line (None: exit 0)."""
    assert "Traceback" not in stderr, f"{what}: a traceback\n{stderr[-4000:]}"
    if code == 0:
        return None
    errors = error_lines(stderr)
    assert code == 2 and len(errors) == 1, f"{what}: exit {code}, error lines {errors}\n{stderr[-4000:]}"
    DRAWN["refusals"] += 1
    return errors[0]


def files(folder: Path) -> dict[str, tuple[int, int]]:
    """Every path under `folder` with a file's modification time and size (what a refusal must leave as it was);
    the lock file aside (a refused merge takes and releases the output folder's lock)."""
    found = {}
    for path in folder.rglob("*"):
        if path.name != ".sftkey.lock":
            found[str(path.relative_to(folder))] = (
                (path.stat().st_mtime_ns, path.stat().st_size) if path.is_file() else 0
            )
    return found


def digest(folder: Path) -> dict[str, str]:
    """The bytes of every file under `folder`."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file()
    }


def outcome(out: Path) -> tuple[dict, dict]:
    """What a finished run is judged by: results.json's stages without what differs between equal runs, and each
    stage's weights."""
    results = json.loads((out / "results.json").read_text())["stages"]
    for entry in results.values():
        entry.pop("per_example", None)
        for key in RUN_SPECIFIC:
            entry.get("training", {}).pop(key, None)
    return results, {name: load_file(out / name / "adapter_model.safetensors") for name in NAMES}


def assert_same_result(out: Path, reference: Path, what: str) -> None:
    """The folder holds the uninterrupted result: both stages done, the same metrics and training records (losses
    within LOSS_RTOL) and the same weights (within WEIGHT_TOL of each tensor's largest value)."""
    manifest = json.loads((out / "manifest.json").read_text())
    assert [manifest["stages"][name]["status"] for name in NAMES] == ["done", "done"], what
    (results, weights), (expected, expected_weights) = outcome(out), outcome(reference)
    assert results.keys() == expected.keys(), what
    for name in NAMES:
        training, expected_training = results[name].pop("training"), expected[name].pop("training")
        loss = training.pop("train_loss")
        assert loss == pytest.approx(expected_training.pop("train_loss"), rel=LOSS_RTOL), (what, name)
        assert training == expected_training, (what, name)
        assert results[name] == expected[name], (what, name)
        assert weights[name].keys() == expected_weights[name].keys(), (what, name)
        for key, tensor in expected_weights[name].items():
            difference = (weights[name][key] - tensor).abs().max().item()
            assert difference <= WEIGHT_TOL * tensor.abs().max().item(), (what, name, key)


def read_stages(path: Path) -> dict:
    """The `stages` of manifest.json or results.json as they are on disk now ({} when unreadable)."""
    try:
        stages = json.loads(path.read_text()).get("stages")
    except (OSError, ValueError, AttributeError):
        return {}
    return stages if isinstance(stages, dict) else {}


def claim(path: Path, name: str):
    """What the record at `path` says of stage `name`: the manifest's status, results.json's training record."""
    entry = read_stages(path).get(name) or {}
    return entry.get("status") if path.name == "manifest.json" else entry.get("training")


def inconsistency(out: Path) -> str | None:
    """What the folder claims that its files do not hold: a stage results.json reports, or the manifest calls
    trained or done, whose weights are missing or incomplete. The records are read before and after the weights,
    so that a run writing meanwhile (weights first, then the record) is never blamed for an order it keeps."""
    records = [out / "manifest.json", out / "results.json"]
    before = {(path, name): claim(path, name) for path in records for name in NAMES}
    gone = {name: missing_weights(out / name) for name in NAMES}
    for (path, name), said in before.items():
        if gone[name] and said not in (None, "running", "discarding") and claim(path, name) == said:
            what = (
                f"the manifest calls {name} {said}" if path.name == "manifest.json" else f"results.json reports {name}"
            )
            return f"{what} but {gone[name]}"
    return None


def assert_consistent(out: Path, what: str) -> None:
    found = inconsistency(out)
    assert found is None, f"{what}: {found}"


SERVER = multiprocessing.get_context("forkserver")


class Launch:
    """recipes/run.py as the program in a forked process (`real_launches.run_as_program`), its output in a file."""

    def __init__(self, argv: list[str], output_path: Path):
        self.output_path = output_path
        self.process = SERVER.Process(target=run_as_program, args=(argv, str(output_path)), daemon=True)
        self.process.start()
        self.killed_at = None
        self.ended_at: float | None = None
        DRAWN["processes"] += 1

    @property
    def output(self) -> str:
        try:
            return self.output_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def running(self) -> bool:
        return self.process.exitcode is None

    def kill(self, point: tuple) -> None:
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.join()
        self.killed_at, self.ended_at = point, time.time()
        DRAWN["kills"] += 1


def reached(point: tuple, launch: Launch, out: Path) -> bool:
    kind, where = point
    if kind == "log_lines":  # the trainer's per-step log line
        return len(re.findall(r"^step \d+/\d+: loss ", launch.output, flags=re.M)) >= where
    if kind == "stage_start":
        return f"stage {where}: loss on" in launch.output
    if kind == "evaluation":  # a finished stage's, on the test split
        return f"{where}: generating" in launch.output
    if kind == "checkpoint_save":  # a checkpoint folder written but not its trainer_state.json (written last)
        checkpoints = (out / where / "checkpoints").glob("checkpoint-*")
        return any(not (p / "trainer_state.json").exists() for p in checkpoints)
    raise AssertionError(point)


def watch(launches: list[Launch], out: Path, point: tuple | None, consistent: bool, timeout: float = 300) -> None:
    """Wait for the launches to end, SIGKILLing the one that reaches `point` first. While they run, with
    `consistent` (the folder was, before they started), the folder must stay so at every moment a kill could land."""
    deadline = time.time() + timeout
    while any(launch.running for launch in launches):
        assert time.time() < deadline, f"the runs did not end in {timeout} s"
        for launch in launches:
            if point is not None and launch.running and reached(point, launch, out):
                launch.kill(point)
                point = None  # one kill a step
            if launch.ended_at is None and not launch.running:
                launch.ended_at = time.time()
        if consistent and (found := inconsistency(out)):
            for launch in launches:
                launch.process.kill()
            raise AssertionError(f"a kill at this moment leaves {found}")
        time.sleep(0.005)
    for launch in launches:
        launch.ended_at = launch.ended_at or time.time()


KILL_POINTS = st.one_of(
    st.tuples(st.just("log_lines"), st.integers(1, LOG_LINES)),
    st.tuples(st.just("stage_start"), st.sampled_from(NAMES)),
    st.tuples(st.just("evaluation"), st.sampled_from(NAMES)),
    st.tuples(st.just("checkpoint_save"), st.sampled_from(NAMES)),
)
# How a run is asked for: the recipe the folder's run followed or the other one (a changed key), and the flags
RECIPES = ["the folder's recipe", "the other recipe"]
FLAGS = ["", "--overwrite_output_dir true", "--restart_from sft", "--restart_from key"]
# What a user or bad luck breaks, relative to the run folder ("*": the stage's newest checkpoint)
TARGETS = [
    "manifest.json", "results.json", "sft", "key", "sft/checkpoints/*", "key/checkpoints/*",
    "sft/adapter_model.safetensors", "key/adapter_model.safetensors", "key/adapter_config.json",
    "sft/checkpoints/*/optimizer.pt", "key/checkpoints/*/adapter_model.safetensors",
    "sft/checkpoints/*/trainer_state.json", "sft/log_history.json", "key/log_history.json", "key/predictions.jsonl",
    ".sftkey.lock", ".sftkey", "key/.sftkey",
]  # fmt: skip
MERGE_INTO = ["new folder", "new folder in the run", "output folder", "stage folder", "user's folder", "earlier merge",
              "default"]  # fmt: skip


class RunFolder(RuleBasedStateMachine):
    """One run folder `<work>/run` beside a user's files, through a drawn sequence of steps."""

    references: dict[str, Path] = {}  # recipe -> a finished uninterrupted run of it (set by the test)
    scratch: Path

    def __init__(self):
        super().__init__()
        DRAWN["sequences"] += 1
        TRACE.append(f"sequence {DRAWN['sequences']}")
        self.work = Path(self.scratch) / f"sequence-{DRAWN['sequences']}"
        self.out = self.work / "run"
        self.logs = Path(self.scratch) / "outputs"
        self.logs.mkdir(exist_ok=True)
        self.config = "base"  # the recipe the folder's run follows
        self.damaged = False  # a step broke the folder: a refusal (one line) is then a fair answer to any run
        self.mixed = False  # a killed run followed the other recipe: a refusal naming --restart_from is fair
        self.merges: list[Path] = []
        self.launches: list[Launch] = []

    @initialize(start=st.sampled_from(["an empty folder", "a finished run"]))
    def a_users_files(self, start):
        """A user's files beside the run folder and in it (an output_dir may be a folder the user made); the folder
        empty, or holding a finished run of the base recipe (a copy of the reference)."""
        (self.work / "mine" / "data").mkdir(parents=True)
        (self.work / "notes.txt").write_text("a user's notes\n")
        (self.work / "mine" / "data" / "rows.jsonl").write_bytes(b'{"question": "q"}\n' * 3)
        (self.work / "mine" / "weights.safetensors").write_bytes(bytes(range(256)))
        if start == "a finished run":
            shutil.copytree(self.references["base"], self.out, symlinks=True)
        self.out.mkdir(exist_ok=True)
        (self.out / "my_notes.md").write_text("what I am trying\n")
        self.theirs = self.users_files()
        self.log(f"start: {start}")

    def users_files(self) -> tuple:
        mine, notes, in_run = self.work / "mine", self.work / "notes.txt", self.out / "my_notes.md"
        return digest(mine), notes.read_bytes(), in_run.read_bytes()

    def teardown(self):
        for launch in self.launches:
            if launch.running:
                launch.process.kill()
                launch.process.join()

    @invariant()
    def a_users_files_are_untouched(self):
        if hasattr(self, "theirs"):
            assert self.users_files() == self.theirs

    def log(self, line: str) -> None:
        TRACE.append(f"  {line}")
        note(line)

    def asked(self, recipe_of: str, flags: str) -> tuple[str, list[str], str]:
        """The recipe, the command line and the words of a run."""
        config = self.config if recipe_of == RECIPES[0] else "changed" if self.config == "base" else "base"
        words = f"run {recipe_of}{' ' + flags if flags else ''}"
        return config, ["--output_dir", str(self.out), *recipe(config), *flags.split()], words

    def judge_run(self, code: int, stderr: str, what: str, config: str, busy: bool = False, last: bool = True):
        """A run's outcome: the uninterrupted result of `config` (where it is the `last` to change the folder), or
        one line. A refusal only where a step broke the folder, where the run would mix recipes (the line names
        `--restart_from`), or (`busy`) where another run held the folder (the line names it)."""
        DRAWN["steps"] += 1
        error = one_line_or_success(code, stderr, what)
        self.log(f"{what} ({config}): {error or 'exit 0'}")
        if error is None:
            if last:
                assert_same_result(self.out, self.references[config], what)
                self.config, self.damaged, self.mixed = config, False, False
            return
        restarting = "--restart_from" in what or "--overwrite_output_dir" in what
        mixing = (config != self.config or self.mixed) and not restarting and "--restart_from " in error
        assert self.damaged or mixing or busy and "in use by another run" in error, f"{what}: refused\n{error}"
        if not self.damaged:
            assert_consistent(self.out, what)

    # -- the steps (the first rule's simplest draw is what hypothesis tries first: a cheap one) ---------------------

    @precondition(lambda self: any(self.out.iterdir()) if self.out.is_dir() else False)
    @rule(part=st.sampled_from(TARGETS), how=st.sampled_from(["delete", "truncate"]))
    def break_a_file(self, part, how):
        """Delete or truncate a file or folder of the run (a folder is deleted either way)."""
        if "*" in part:
            stage_dir, _, rest = part.partition("/checkpoints/*")
            found = sorted((self.out / stage_dir / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name[11:]))
            if not found:
                return
            path = found[-1] / rest.lstrip("/") if rest else found[-1]
        else:
            path = self.out / part
        if not path.exists():
            return
        self.log(f"{how} {path.relative_to(self.out)}")
        self.damaged = True
        if path.is_dir():
            shutil.rmtree(path)
        elif how == "delete":
            path.unlink()
        else:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    @rule(recipe_of=st.sampled_from(RECIPES), flags=st.sampled_from(FLAGS))
    def run(self, recipe_of, flags):
        """Run to the end, in this process."""
        config, argv, what = self.asked(recipe_of, flags)
        self.judge_run(*call(argv), what, config)

    @rule(
        recipe_of=st.sampled_from(RECIPES), flags=st.sampled_from(FLAGS), point=st.none() | KILL_POINTS,
        second=st.booleans(),
    )  # fmt: skip
    def run_in_a_process(self, recipe_of, flags, point, second):
        """Run in a process, with (`second`) a plain rerun started at the same moment: one runs and the other is
        refused in one line naming it, or they run one after the other. The one that reaches `point` is SIGKILLed
        there; at no moment may the folder claim what it does not hold."""
        consistent = not self.damaged
        runs = [self.asked(recipe_of, flags)] + ([self.asked(RECIPES[0], "")] if second else [])
        started = [
            (what, config, Launch(argv, self.logs / f"output-{DRAWN['processes']}")) for config, argv, what in runs
        ]
        self.launches += [launch for _, _, launch in started]
        watch([launch for _, _, launch in started], self.out, point, consistent)
        changed = [launch for _, _, launch in started if launch.killed_at is not None or launch.process.exitcode == 0]
        last = max(changed, key=lambda launch: launch.ended_at, default=None)  # the last to change the folder
        for what, config, launch in sorted(started, key=lambda item: item[2].ended_at):
            if launch.killed_at is not None:
                DRAWN["steps"] += 1
                self.log(f"{what} ({config}) killed at {launch.killed_at}")
                self.mixed = self.mixed or config != self.config
                continue
            self.judge_run(launch.process.exitcode, launch.output, what, config, busy=second, last=launch is last)
        if second and not any(launch.killed_at for _, _, launch in started):  # never both refused for each other
            assert not all("in use by another run" in launch.output for _, _, launch in started)
        if consistent:
            assert_consistent(self.out, "after the launches")

    @rule(stage=st.sampled_from(NAMES), into=st.sampled_from(MERGE_INTO))
    def merge(self, stage, into):
        """`--merge STAGE --merge_dir X`: into a new folder or an earlier merge it is done (when the stage is
        trained) or refused in one line; into the output folder, a stage folder or a user's folder it is refused
        and nothing is deleted."""
        DRAWN["steps"] += 1
        folder = {
            "new folder": self.work / f"merged-{len(self.merges)}",
            "new folder in the run": self.out / f"merged-{len(self.merges)}",
            "output folder": self.out,
            "stage folder": self.out / stage,
            "user's folder": self.work / "mine",
            "earlier merge": self.merges[-1] if self.merges else self.work / "merged-first",
            "default": self.out / stage / "merged",
        }[into]
        before = files(self.work)
        extra = [] if into == "default" else ["--merge_dir", str(folder)]
        code, stderr = call(["--output_dir", str(self.out), *recipe(self.config), "--merge", stage, *extra])
        what = f"merge {stage} into the {into} {folder.relative_to(self.work)}"
        error = one_line_or_success(code, stderr, what)
        self.log(f"{what}: {error or 'exit 0'}")
        if into in ("output folder", "stage folder", "user's folder"):
            assert code == 2 and files(self.work) == before, what
            return
        if error is None:
            assert not missing_weights(folder) and json.loads((folder / ".sftkey").read_text())["kind"] == "merge"
            merged = str(folder.relative_to(self.work))
            after = {k: v for k, v in files(self.work).items() if not k.startswith(merged)}
            assert after == {k: v for k, v in before.items() if not k.startswith(merged)}, what
            if into != "default":
                self.merges.append(folder)
        else:
            assert files(self.work) == before, what
            status = claim(self.out / "manifest.json", stage)
            assert self.damaged or status != "done" or missing_weights(self.out / stage), what


@pytest.fixture(scope="module")
def one_thread():
    """As the launched processes: in-process runs then train with the same arithmetic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def references(tmp_path_factory, one_thread) -> dict[str, Path]:
    """An uninterrupted run of each recipe the suite draws, in this process."""
    found = {}
    for config in CONFIGS:
        out = tmp_path_factory.mktemp("reference") / config
        code, stderr = call(["--output_dir", str(out), *recipe(config)])
        assert code == 0, stderr[-3000:]
        found[config] = out
    return found


@pytest.fixture(scope="module")
def server():
    """The fork server, started once with the package imported."""
    SERVER.set_forkserver_preload(["real_launches", "sftkey_trl.run.pipeline"])
    warm = SERVER.Process(target=time.sleep, args=(0,))
    warm.start()
    warm.join()


@pytest.mark.parametrize("drawn", range(SEQUENCES))
def test_a_run_folder_through_drawn_mistakes_and_bad_luck(drawn, references, server, tmp_path, capsys):
    RunFolder.references, RunFolder.scratch = references, tmp_path
    TRACE.clear()
    started = time.time()
    try:
        run_state_machine_as_test(
            seed(drawn)(RunFolder),
            settings=settings(
                derandomize=False,  # each sequence is drawn from its seed
                database=None,
                deadline=None,
                phases=[Phase.generate],  # no shrinking: the drawn sequence, reproducible by its seed, is the report
                suppress_health_check=list(HealthCheck),
                **SIZES,
            ),
        )
    except BaseException:
        print("\n".join(TRACE))  # the failing sequence, step by step, in pytest's report of the failure
        raise
    if "SFTKEY_ADVERSARIAL_SEQUENCES" in os.environ:  # a run asked for by name prints what it drew
        with capsys.disabled():
            print("\n" + "\n".join(TRACE) + f"\nadversarial suite: {DRAWN} after {time.time() - started:.0f} s")
