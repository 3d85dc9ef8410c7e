"""Benchmark: preemptible training. SIGTERM is a save; a SIGKILL loses at most N steps.

    .venv/bin/python benchmarks/preempt.py [--data=PATH] [--epochs=3] [--every=200] [--seed=0]

`--recipe=batch` at batch 32 on Fashion-MNIST (PATH: the four IDX files, default
../shared/data/fashion-mnist), deterministic ops, in fresh processes of main.py
as a scheduler runs them. Measured in one run:
  - an unbroken run, against the same run sent SIGTERM at five random steps and
    resumed each time with the same command plus --resume: per signal the step it
    stopped at, the step the next run resumed at, the steps done twice (at most one
    per signal), the seconds from the signal to the exit; the final accuracy of both
    and the total overhead (wall time, start-ups included);
  - the same run with --checkpoint_every_steps=N, sent SIGKILL at three random steps
    and resumed: the steps lost per kill (at most N);
  - the cost of checkpointing, as a share of training time: at the default interval
    on the default `--recipe=batch` run and on this one, and every N steps.
Each process prints the step it finished (a callback wrapped around the recipe's
checkpoint callback), so the step a signal lands on is known to the step (for a
SIGKILL, the last one read before it: steps lost may read one or two short).
"""
import argparse
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "fashion-mnist"
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_DETERMINISTIC_OPS": "1",
       "TF_CPP_MIN_LOG_LEVEL": "2"}

# main.py, with each finished training step printed, and the checkpoints' time at the end.
TRACED_MAIN = """
import sys
sys.path.insert(0, {repo!r})
import main
from experiments import scale_out

original = scale_out.EpochCheckpoint.on_train_batch_end

def traced(self, batch, logs=None):
    print(f"@step {{self.epoch * self.steps + self.first + batch + 1}}", flush=True)
    original(self, batch, logs)

scale_out.EpochCheckpoint.on_train_batch_end = traced
code = main.main(sys.argv)
print(f"@checkpoints {{len(scale_out.SAVE_SECONDS)}} {{sum(scale_out.SAVE_SECONDS)}}", flush=True)
sys.exit(code)
"""


class Run:
    """One process of main.py, its stdout read by a thread: the last step it finished."""

    def __init__(self, args):
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, "-c", TRACED_MAIN.format(repo=str(REPO)), *args], cwd=REPO,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        self.step, self.lines, self.checkpoints = None, [], (0, 0.0)
        self.first_step_s = None  # from the start to the first step finished: start-up
        self.stderr = []
        self.reader = threading.Thread(target=self.read, daemon=True)
        self.reader.start()
        threading.Thread(target=lambda: self.stderr.extend(self.process.stderr),
                         daemon=True).start()

    def read(self):
        for line in self.process.stdout:
            if line.startswith("@step "):
                self.step = int(line.split()[1])
                if self.first_step_s is None:
                    self.first_step_s = time.monotonic() - self.started
            elif line.startswith("@checkpoints "):
                count, seconds = line.split()[1:]
                self.checkpoints = (int(count), float(seconds))
            else:
                self.lines.append(line)

    def wait_for_step(self, step, timeout=600):
        deadline = time.monotonic() + timeout
        while (self.step or 0) < step:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the run ended before step {step}: "
                                   + "".join(self.stderr[-5:]))
            time.sleep(0.001)

    def finish(self, timeout=900):
        code = self.process.wait(timeout=timeout)
        self.reader.join(timeout=30)
        self.wall_s = time.monotonic() - self.started
        return code

    def resumed_at(self, steps):
        """The global step the run's `Resuming batch size ... at epoch E, step S` names."""
        for line in self.lines:
            if line.startswith("Resuming batch size"):
                words = line.replace(",", "").split()
                epoch, step = int(words[words.index("epoch") + 1]), int(
                    words[words.index("step") + 1])
                return (epoch - 1) * steps + step
        return 0


def run_dir(logdir):
    return next((pathlib.Path(logdir) / "batch").iterdir())


def metrics(logdir):
    return json.loads((run_dir(logdir) / "metrics.json").read_text())


def stopped_and_resumed(args, signum, targets, steps):
    """Runs `args` to the end, sending `signum` when each target step is done and
    resuming after each; returns (per-signal rows, the runs)."""
    rows, runs, resume = [], [], []
    for target in targets:
        run = Run([*args, *resume])
        run.wait_for_step(target)
        reached = run.step
        run.process.send_signal(signum)
        sent = time.monotonic()
        code = run.finish()
        rows.append({"target": target, "reached": reached, "code": code,
                     "exit_s": time.monotonic() - sent, "run": run})
        runs.append(run)
        resume = ["--resume"]
    last = Run([*args, "--resume"])
    if last.finish() != 0:
        raise RuntimeError("the last resumed run failed: " + "".join(last.stderr[-5:]))
    runs.append(last)
    for row, following in zip(rows, runs[1:]):
        row["resumed"] = following.resumed_at(steps)
        row["reached"] = max(row["reached"], row["run"].step or 0)
    return rows, runs


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--every", type=int, default=200, help="--checkpoint_every_steps N")
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args()
    rng = random.Random(options.seed)
    work = pathlib.Path(tempfile.mkdtemp(prefix="preempt-"))
    batch = 32
    steps = 60000 // batch
    total = options.epochs * steps
    base = ["--recipe=batch", "--dataset=fashion_mnist", f"--data_dir={options.data}",
            f"--batch_sizes={batch}", f"--epochs={options.epochs}", "--warmup_steps=5"]

    print(f"--recipe=batch, batch {batch}, {options.epochs} epochs of {steps} steps "
          f"({total} steps), Fashion-MNIST; work folder {work}", flush=True)
    unbroken = Run([*base, f"--logdir={work / 'unbroken'}"])
    assert unbroken.finish() == 0, "".join(unbroken.stderr[-5:])
    print(f"unbroken: {unbroken.wall_s:.1f} s", flush=True)

    targets = sorted(rng.sample(range(50, total - 50), 5))
    term_rows, term_runs = stopped_and_resumed([*base, f"--logdir={work / 'sigterm'}"],
                                               signal.SIGTERM, targets, steps)
    kill_targets = sorted(rng.sample(range(50, total - 50), 3))
    kill_rows, kill_runs = stopped_and_resumed(
        [*base, f"--checkpoint_every_steps={options.every}", f"--logdir={work / 'sigkill'}"],
        signal.SIGKILL, kill_targets, steps)
    default_run = Run([f"--logdir={work / 'default'}", "--recipe=batch"])
    assert default_run.finish() == 0, "".join(default_run.stderr[-5:])

    print("\nSIGTERM at 5 random steps, resumed with the same command plus --resume")
    print(f"{'sent after step':>16} {'stopped at':>11} {'resumed at':>11} {'done twice':>11} "
          f"{'exit':>5} {'s to exit':>10}")
    for row in term_rows:
        print(f"{row['target']:>16} {row['reached']:>11} {row['resumed']:>11} "
              f"{row['reached'] - row['resumed']:>11} {row['code']:>5} {row['exit_s']:>10.2f}")
    print(f"\nSIGKILL at 3 random steps with --checkpoint_every_steps={options.every}")
    print(f"{'killed after step':>17} {'resumed at':>11} {'steps lost':>11}")
    for row in kill_rows:
        print(f"{row['reached']:>17} {row['resumed']:>11} {row['reached'] - row['resumed']:>11}")

    interrupted_wall = sum(run.wall_s for run in term_runs)
    a, b = metrics(work / "unbroken"), metrics(work / "sigterm")
    print(f"\n{'':<32} {'unbroken':>10} {'5 x SIGTERM':>12}")
    print(f"{'val_accuracy':<32} {a['val_accuracy_b32']:>10.4f} {b['val_accuracy_b32']:>12.4f}")
    print(f"{'wall time, start-ups included s':<32} {unbroken.wall_s:>10.1f} "
          f"{interrupted_wall:>12.1f}")
    startup = [run.first_step_s for run in term_runs if run.first_step_s is not None]
    print(f"{'processes':<32} {1:>10} {len(term_runs):>12}")
    print(f"{'start-up to the first step s':<32} {unbroken.first_step_s:>10.1f} "
          f"{sum(startup):>12.1f}")
    print(f"{'the rest (training, saving) s':<32} {unbroken.wall_s - unbroken.first_step_s:>10.1f} "
          f"{interrupted_wall - sum(startup):>12.1f}")
    overhead = interrupted_wall / unbroken.wall_s - 1
    print(f"total overhead of 5 preemptions: {overhead:+.1%} "
          f"({(interrupted_wall - unbroken.wall_s) / 5:.1f} s a preemption, of which start-up "
          f"{(sum(startup) - unbroken.first_step_s) / 5:.1f} s: Python, TensorFlow, the data, "
          "tracing)")

    def cost(run, label, train_s):
        count, seconds = run.checkpoints
        share = seconds / train_s
        print(f"  {label:<44} {count:>4} checkpoints {seconds:>6.2f} s of {train_s:>6.1f} s "
              f"training: {share:.1%}")
        return share

    print("\ncheckpoint cost, as a share of training time (the sweep's wall time per batch size)")
    default_metrics = metrics(work / "default")
    default_train = sum(v for k, v in default_metrics.items() if k.startswith("wall_time_s_b"))
    shares = [cost(default_run, "default --recipe=batch (auto interval)", default_train),
              cost(unbroken, f"this run, {total} steps (auto interval)", a["wall_time_s_b32"])]
    cost(kill_runs[-1], f"last SIGKILL resume, every {options.every} steps",
         metrics(work / "sigkill")["wall_time_s_b32"])
    redone = max(row["reached"] - row["resumed"] for row in term_rows)
    lost = max(row["reached"] - row["resumed"] for row in kill_rows)
    print(f"\nsteps done twice per SIGTERM: max {redone} (target <= 1); steps lost per SIGKILL: "
          f"max {lost} (target <= {options.every}); checkpoint cost at the default interval: "
          f"{max(shares):.1%} (target <= 5%); same accuracy: "
          f"{a['val_accuracy_b32'] == b['val_accuracy_b32']}")


if __name__ == "__main__":
    main()
