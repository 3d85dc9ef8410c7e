"""advise's backend probe: the same model on every installed Keras backend, each in its own process.

Keras 3 runs one model on TensorFlow, JAX and PyTorch, and the backend is chosen once per
process (KERAS_BACKEND), so each backend gets a worker subprocess of its own. The parent
saves the model (.keras) and the in-memory training examples (.npz) once; every worker
loads both, compiles your baseline setting and the advised one, warms them up, and then
waits. The parent asks them in turn for one measurement each (who goes first alternating),
--repeats times, so that the backends are timed alternately, as advise times everything,
and never fight for the cores. The current backend runs in a worker too: every backend is
timed the same way. A backend whose worker fails (not installed, your custom layers not
importable there) is reported with why, and left out.

Run as a worker: python -c "...; from experiments.advise_backend import worker; worker(JOB)".
"""
import dataclasses
import importlib.util
import json
import os
import select
import subprocess
import sys
import tempfile
import time

import keras
import numpy as np

from experiments.errors import named_line

BACKENDS = ("tensorflow", "jax", "torch")
MARK = b"ADVISE_BACKEND "  # what starts a worker's answer on its stdout (the rest is noise)
READY_TIMEOUT_S = 600  # importing, loading and compiling one backend, on a busy machine
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = ("import sys; sys.path.insert(0, sys.argv[1]); "
          "from experiments.advise_backend import worker; worker(sys.argv[2])")


BACKEND_SHARE = 0.15  # of --budget_s: what --backends=auto may spend
START_S = 20  # starting one worker: importing its backend, loading, compiling (2 CPU cores)


def wanted(config):
    """(the backends to time, why none when none): --backends=auto is every installed one
    (torch only if it is), when its share of --budget_s covers starting their workers."""
    if config.backends == "none":
        return [], "--backends=none"
    if config.backends != "auto":
        return [b.strip() for b in config.backends.split(",") if b.strip()], ""
    installed = [b for b in BACKENDS if importlib.util.find_spec(b) is not None]
    if BACKEND_SHARE * config.budget_s < START_S:
        return [], (f"--budget_s={config.budget_s:g} leaves {BACKEND_SHARE:.0%} for starting a "
                    f"process per backend, ~{START_S} s each: name them with "
                    f"--backends={','.join(installed)} to time them anyway")
    return installed, ""


# --- the worker: one backend, in its own process -------------------------------------------

def answer(payload):
    sys.stdout.buffer.write(MARK + json.dumps(payload).encode() + b"\n")
    sys.stdout.flush()


def worker(job_file):
    """Loads the model and examples, compiles each setting, says it is ready, then times one
    measurement of every setting per `measure` line on stdin, until `quit`."""
    from experiments import advise  # under this process's KERAS_BACKEND
    job = json.loads(open(job_file).read())
    try:
        trials = prepared_trials(advise, job)
    except Exception as error:  # reported by the parent as this backend's failure
        answer({"error": named_line(error)})
        return
    answer({"ready": keras.backend.backend(),
            "compile_s": {name: t.compile_s for name, t in trials.items()}})
    for repeat, line in enumerate(sys.stdin):
        if line.strip() != "measure":
            break
        names = list(trials) if repeat % 2 == 0 else list(trials)[::-1]  # who goes first
        answer({name: trials[name].seconds_per_example() for name in names})


def prepared_trials(advise, job):
    """{name: warmed-up Trial} for the job's settings, on its arrays fed to fit."""
    arrays = np.load(job["arrays"])
    x, y = arrays["x"], arrays["y"]
    config = advise.Config(**job["config"])
    # Our own copy of the model the parent already holds: its layers are no one else's code.
    reference = keras.models.load_model(job["model"], safe_mode=False)
    data = advise.Data(((x, y), (x[:64], y[:64])), config, reference)
    models = advise.Models(reference, job["num_classes"], config)
    trials = {}
    for name, fields in job["settings"].items():
        setting = advise.Setting(**fields)
        trials[name] = advise.Trial(setting, models.compiled(setting),
                                    data.yours(setting.batch_size)).warm_up(job["measure_s"])
    return trials


# --- the parent ------------------------------------------------------------------------------

class Worker:
    """One backend's worker process, spoken to line by line."""

    def __init__(self, backend, job_file, log_path):
        env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONUNBUFFERED": "1",
               "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
               # Several processes share one GPU: none may take all of its memory.
               "XLA_PYTHON_CLIENT_PREALLOCATE": "false", "TF_FORCE_GPU_ALLOW_GROWTH": "true"}
        self.backend, self.log_path = backend, log_path
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER, REPO, job_file],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, env=env, cwd=os.path.dirname(job_file),
                                     bufsize=0)

    def read(self, timeout_s):
        """The next answer (a dict), or {'error': why} on exit or timeout."""
        deadline, line = time.monotonic() + timeout_s, b""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return {"error": f"no answer in {timeout_s:.0f} s (log {self.log_path})"}
            if not select.select([self.proc.stdout], [], [], left)[0]:
                continue
            byte = self.proc.stdout.read(1)
            if not byte:
                return {"error": f"the worker exited ({self.proc.wait()}; log {self.log_path})"}
            line += byte
            if byte == b"\n":
                if line.startswith(MARK):
                    return json.loads(line[len(MARK):])
                line = b""

    def ask(self, timeout_s):
        self.proc.stdin.write(b"measure\n")
        self.proc.stdin.flush()
        return self.read(timeout_s)

    def close(self):
        try:
            self.proc.stdin.write(b"quit\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def write_job(folder, probes, settings):
    """The model, the in-memory examples and what to time, as files a worker reads."""
    model = os.path.join(folder, "model.keras")
    probes.models.reference.save(model)
    arrays = os.path.join(folder, "arrays.npz")
    np.savez(arrays, x=probes.pool_x, y=probes.pool_y)
    job = {"model": model, "arrays": arrays, "config": dataclasses.asdict(probes.config),
           "num_classes": probes.data.num_classes, "measure_s": probes.measure_s,
           "settings": {name: dataclasses.asdict(s) for name, s in settings.items()}}
    path = os.path.join(folder, "job.json")
    with open(path, "w") as f:
        json.dump(job, f)
    return path


def time_backends(backends, job_file, log_dir, repeats):
    """{backend: {setting name: [seconds per example, one per repeat]}} for the workers that
    came up, and {backend: why} for those that did not."""
    workers = {b: Worker(b, job_file, os.path.join(log_dir, f"backend_{b}.log"))
               for b in backends}
    times, failed = {}, {}
    try:
        for b, w in workers.items():
            ready = w.read(READY_TIMEOUT_S)
            if "ready" in ready:
                times[b] = {}
            else:
                failed[b] = ready["error"]
        order = list(times)
        for r in range(repeats if len(order) > 1 else 0):
            for b in (list(order) if r % 2 == 0 else order[::-1]):
                got = workers[b].ask(READY_TIMEOUT_S)
                if "error" in got:
                    failed[b] = got["error"]
                    order.remove(b)
                    times.pop(b)
                    continue
                for name, s in got.items():
                    times[b].setdefault(name, []).append(s)
    finally:
        for w in workers.values():
            w.close()
    return times, failed


def probe(probes, advised, config, run_dir):
    """The backend Finding (None when only this backend is there to time) and its metrics."""
    current, (backends, why) = keras.backend.backend(), wanted(config)
    if not [b for b in backends if b != current]:
        print(f"backend: not timed: {why or f'only {current} is installed'}")
        return None, {}
    settings = {"baseline": probes.base, "advised": dataclasses.replace(advised, pipeline="yours")}
    with tempfile.TemporaryDirectory(prefix="advise_backend_") as folder:
        job = write_job(folder, probes, settings)
        times, failed = time_backends(sorted(set(backends) | {current}), job, run_dir,
                                      config.repeats)
    for b, why in failed.items():
        print(f"backend {b}: not timed: {why}")
    if current not in times or len(times) < 2:
        return None, {"backends_failed": failed}
    return backend_finding(current, times, failed, probes, config)


def backend_finding(current, times, failed, probes, config):
    """The fastest other backend as a change, measured against this one."""
    from experiments.advise import Comparison, Finding  # (advise imports this module)
    rate = {b: 1 / float(np.median(t["baseline"])) for b, t in times.items()}
    advised_rate = {b: 1 / float(np.median(t["advised"])) for b, t in times.items()}
    best = max((b for b in times if b != current), key=rate.get)
    ours, theirs = times[current]["baseline"], times[best]["baseline"]
    measured = Comparison([o / t for o, t in zip(ours, theirs)], float(np.median(ours)),
                          float(np.median(theirs)))
    hold = advised_rate[best] / rate[best]
    listing = ", ".join(f"{b} {rate[b]:,.0f}" for b in sorted(rate, key=rate.get, reverse=True))
    print(f"backend: your baseline in examples/s: {listing}; KERAS_BACKEND={best} "
          f"{measured.speedup:.2f}x {current}; the advised changes together {hold:.2f}x there, "
          f"{advised_rate[current] / rate[current]:.2f}x on {current}")
    finding = Finding(
        f"backend {best} (this run: {current})", f"KERAS_BACKEND={best} python your_script.py",
        measured, "end to end",
        f"the advised changes together {hold:.2f}x there ("
        f"{'they hold' if hold >= 1 + config.noise else 'they do not pay there'}); with them, "
        f"{advised_rate[best] / rate[current]:.2f}x your baseline; tf.data, tf.* ops and custom "
        "layers must run on it", f"backend probe: each backend in its own process from the "
        f"saved model, {len(probes.pool_x):,} in-memory examples, batch {probes.base.batch_size},"
        f" {len(ours)} alternating repeats; examples/s: {listing}", {"backend": best},
        end_to_end=measured.speedup)
    together = [o / t for o, t in zip(ours, times[best]["advised"])]
    finding.proof = (f"on KERAS_BACKEND={best}, with the advised changes: "
                     f"{np.median(together):.2f}x your baseline here (the backend probe's "
                     f"processes, {len(together)} alternating repeats)")
    metrics = {"backend_examples_per_sec": rate, "backend_advised_examples_per_sec": advised_rate,
               "fastest_backend": max(rate, key=rate.get), "backend_speedup": measured.speedup,
               "backend_combined_speedup": float(np.median(together)),
               "backends_failed": failed}
    return finding, metrics
