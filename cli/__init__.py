"""The glue only the command line needs; recipes never import it (they stay drop-in).

    flags       Config dataclass -> absl flags, the shared flags, --help, parse(argv)
    data        --dataset/--data_dir -> what a recipe's DATA asks for (through datasets/)
    distribute  --strategy -> a tf.distribute strategy
    runs        the run folder: flags.json, --resume, Ctrl-C, metrics.json, the summary

Helpers raise; main.py alone turns exceptions into exit codes (recipes/__init__.py
says which).
"""


class UsageError(ValueError):
    """Bad input found before any work: one line on stderr, exit code 2."""
