"""The run folder: made fresh or found for --resume, flags.json, signals, metrics.json.

    <logdir>/<recipe>/<UTC timestamp>/   flags.json at the start, metrics.json at the end

Only the chief of a multi-worker job writes there; other workers get a
temporary folder, removed when they finish. Once the recipe has started, the
folder and all it holds are kept, whatever happens.
"""
import contextlib
import dataclasses
import datetime
import json
import os
import pathlib
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback

from cli import UsageError
from cli.flags import SHARED_FLAGS


@dataclasses.dataclass
class Run:
    dir: pathlib.Path
    chief: bool  # False: a multi-worker job's other worker, whose folder is temporary


def write_atomically(path, text):
    """Temp file + os.replace: readers never see a half-written file."""
    path = pathlib.Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_json_atomically(path, payload):
    write_atomically(path, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def check_writable(folder):
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UsageError(f"--logdir is not writable: {folder} ({e.strerror or e})") from None


# What must match for --resume to continue a run: the recipe's Config, the dataset and
# the shared flags, but not where the runs go, --resume itself or how often and how long
# it may take to save.
NOT_COMPARED = ("resume", "logdir", "grace_s", "checkpoint_every_steps")


def run_settings(command, dataset):
    """What flags.json records of a command, as JSON would give it back."""
    fv = command.values
    return json.loads(json.dumps({
        "recipe": command.name, "dataset": dataset, "argv": command.argv[1:],
        "config": dataclasses.asdict(command.config),
        "flags": {name: fv[name].value for name in SHARED_FLAGS}}, default=str))


def differences(saved, wanted):
    """`name: there vs here` for each setting that differs between two flags.json payloads."""
    out = []
    for section in ("config", "flags"):
        for name in sorted(set(saved.get(section, {})) | set(wanted[section])):
            if name in NOT_COMPARED:
                continue
            there, here = saved.get(section, {}).get(name), wanted[section].get(name)
            if there != here:
                out.append(f"{name}: {there} there, {here} here")
    if saved.get("dataset") != wanted["dataset"]:
        out.append(f"dataset: {saved.get('dataset')} there, {wanted['dataset']} here")
    return out


def find_resumable(recipe_dir, wanted):
    """The newest run folder of this recipe that has no metrics.json yet, or None.

    UsageError when that run was started with other settings: continuing it
    under this command's would mix two experiments in one folder.
    """
    for run_dir in sorted(recipe_dir.iterdir(), reverse=True):
        if (run_dir / "metrics.json").exists():
            continue
        try:
            saved = json.loads((run_dir / "flags.json").read_text())
        except (OSError, ValueError):
            continue
        changed = differences(saved, wanted)
        if changed:
            raise UsageError(f"--resume: the unfinished run {run_dir} was started with other "
                             f"settings ({'; '.join(changed[:3])}): run its command again "
                             "(its flags.json has it), or leave out --resume to start anew")
        return run_dir
    return None


def make_run_dir(recipe_dir):
    """<logdir>/<recipe>/<UTC timestamp>, suffixed -2, -3... within one second."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    for attempt in range(1, 1000):
        run_dir = recipe_dir / (stamp if attempt == 1 else f"{stamp}-{attempt}")
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            continue
    raise UsageError(f"could not create a fresh run folder under {recipe_dir}")


def prepare(command, dataset, chief):
    """The Run for this command: fresh, the one --resume continues, or a worker's temp dir.

    Called last before training, once every input check has passed, so a bad
    input never leaves a folder behind.
    """
    if not chief:
        return Run(pathlib.Path(tempfile.mkdtemp(prefix=f"{command.name}-worker-")), False)
    fv = command.values
    recipe_dir = pathlib.Path(fv.logdir) / command.name
    check_writable(recipe_dir)
    settings = run_settings(command, dataset)
    if fv.resume:  # flags.parse has checked that the recipe is RESUMABLE
        run_dir = find_resumable(recipe_dir, settings)
        if run_dir is not None:
            print(f"Resuming {run_dir}")
            (run_dir / "INTERRUPTED").unlink(missing_ok=True)
            return Run(run_dir, True)
        print("Nothing to resume for this command: starting a new run")
    run_dir = make_run_dir(recipe_dir)
    write_json_atomically(run_dir / "flags.json", settings)
    return Run(run_dir, True)


def mark_interrupted(run, text):
    """The folder's INTERRUPTED marker: what stopped the run, where, and how to go on."""
    write_atomically(run.dir / "INTERRUPTED", text + "\nrun the same command with --resume to "
                     "continue it\n")


def leave_now(run, signum, why):
    """Marks the folder, says so in one line and ends the process at once (the exit code
    is 128 + the signal's number). Every file the run writes is written to a temporary
    name and renamed, so leaving at any moment keeps the last whole checkpoint."""
    name = signal.Signals(signum).name
    with contextlib.suppress(OSError):
        mark_interrupted(run, f"{name}: {why}")
    sys.stdout.flush()
    print(f"error: interrupted; run folder kept: {run.dir} ({name}: {why})", file=sys.stderr,
          flush=True)
    os._exit(128 + signum)


@contextlib.contextmanager
def save_on_signal(run, grace_s):
    """While it is entered, SIGTERM (a spot machine's notice, a Kubernetes eviction, Slurm's
    preemption) and Ctrl-C stop the run where a checkpoint can be saved, within grace_s.

    The handler only sets experiments.scale_out.STOP: the checkpoint callback of the
    running fit saves at the end of the step in progress and raises Preempted, which
    main.py hands to stopped() (exit 143 for SIGTERM, 130 for Ctrl-C). With no training
    running there is nothing newer to save, and a second signal means now: the process
    leaves at once. A thread woken by the signal itself (set_wakeup_fd: even while a long
    step holds the main thread) leaves when grace_s is up, the last whole checkpoint kept.
    The handler never raises: a KeyboardInterrupt inside a TensorFlow step can abort the
    process (heap corruption, seen here as free() errors).
    """
    from experiments.scale_out import STOP

    if not run.chief:  # a multi-worker job's other worker: no folder, no resume
        yield
        return

    def handler(signum, frame):
        if STOP.signum is not None:
            leave_now(run, signum, "a second signal: the last whole checkpoint is kept")
        if not STOP.training:
            leave_now(run, signum, "not training: the last whole checkpoint is kept")
        STOP.signum = signum

    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)

    def deadline():
        while (signum := os.read(read_end, 1)[0]) not in (signal.SIGTERM, signal.SIGINT, 0):
            pass
        if signum:
            time.sleep(max(grace_s - 0.5, 0.1))
            leave_now(run, signum, f"the step and its checkpoint did not finish within "
                                   f"--grace_s={grace_s:g}: the last whole checkpoint is kept")
        os.close(read_end)

    threading.Thread(target=deadline, daemon=True, name="grace_s").start()
    before = {signum: signal.signal(signum, handler) for signum in (signal.SIGTERM, signal.SIGINT)}
    wakeup_before = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    try:
        yield
    finally:  # back as it was (main() may run again in one process, as tests do)
        signal.set_wakeup_fd(wakeup_before)
        for signum, previous in before.items():
            signal.signal(signum, previous)
        os.write(write_end, b"\0")
        os.close(write_end)


def stopped(run, preempted):
    """After a Preempted (its checkpoint saved): the marker, one line; the exit code."""
    name = signal.Signals(preempted.signum).name
    mark_interrupted(run, f"{name} at {preempted.where}: checkpoint {preempted.checkpoint}")
    sys.stdout.flush()
    print(f"error: interrupted; run folder kept: {run.dir} ({name} at {preempted.where}: "
          "checkpoint saved; run the same command with --resume)", file=sys.stderr, flush=True)
    return 128 + preempted.signum


def finish(run, metrics, headline, logdir):
    """metrics.json (atomically), then the folder, the headline metrics and how to see them."""
    if not run.chief:
        shutil.rmtree(run.dir, ignore_errors=True)
        return
    write_json_atomically(run.dir / "metrics.json", metrics)
    shown = [k for k in headline if k in metrics] or sorted(metrics)
    print(f"\nRun folder: {run.dir}")
    width = max(map(len, shown), default=0)
    for key in shown:
        value = metrics[key]
        shown_value = f"{value:.4g}" if isinstance(value, float) else value
        print(f"  {key:<{width}} {shown_value}")
    print(f"See it: tensorboard --logdir {logdir}")


def is_out_of_memory(error):
    return (type(error).__name__ == "ResourceExhaustedError"
            or "out of memory" in str(error).lower())


def keep_after_failure(run, error):
    """Keeps the folder, with the traceback in its error.txt; says where it is."""
    if not run.chief:
        shutil.rmtree(run.dir, ignore_errors=True)
        return "this worker writes no run folder: see the chief's"
    try:
        (run.dir / "error.txt").write_text("".join(traceback.format_exception(error)))
    except OSError as e:  # the disk that failed the run may fail this too
        return f"run folder kept: {run.dir}; its error.txt could not be written: {e.strerror}"
    return f"run folder kept: {run.dir}"
