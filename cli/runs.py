"""The run folder: made fresh or found for --resume, flags.json, Ctrl-C, metrics.json.

    <logdir>/<recipe>/<UTC timestamp>/   flags.json at the start, metrics.json at the end

Only the chief of a multi-worker job writes there; other workers get a
temporary folder, removed when they finish. Once the recipe has started, the
folder and all it holds are kept, whatever happens.
"""
import dataclasses
import datetime
import json
import os
import pathlib
import shutil
import signal
import sys
import tempfile
import traceback

from cli import UsageError
from cli.flags import SHARED_FLAGS


@dataclasses.dataclass
class Run:
    dir: pathlib.Path
    chief: bool  # False: a multi-worker job's other worker, whose folder is temporary


def write_json_atomically(path, payload):
    """Temp file + os.replace: readers never see a half-written file."""
    path = pathlib.Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2, sort_keys=True, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def check_writable(folder):
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UsageError(f"--logdir is not writable: {folder} ({e.strerror or e})") from None


# What must match for --resume to continue a run: the recipe's Config, the dataset and
# the shared flags, but not where the runs go or --resume itself.
NOT_COMPARED = ("resume", "logdir")


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


def exit_on_interrupt(run):
    """Ctrl-C marks the run folder INTERRUPTED and leaves at once, exit code 130.

    A KeyboardInterrupt raised inside a TensorFlow step can abort the process
    (heap corruption, seen here as free() errors), so the handler does not
    unwind: every artifact is written to a temp name and renamed, so leaving
    now keeps the last finished epoch whole, as a kill would.
    """
    def handler(signum, frame):
        (run.dir / "INTERRUPTED").write_text("interrupted by Ctrl-C; its last finished epoch "
                                             "is kept: run the same command with --resume\n")
        sys.stdout.flush()
        print(f"error: interrupted; run folder kept: {run.dir}", file=sys.stderr, flush=True)
        os._exit(130)

    if run.chief:
        signal.signal(signal.SIGINT, handler)


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
    (run.dir / "error.txt").write_text("".join(traceback.format_exception(error)))
    return f"run folder kept: {run.dir}"
