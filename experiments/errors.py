"""An exception as the one line that explains it: the CLI's failure line, and an export's
error in a table or metrics.json."""
import re

# What TensorFlow puts before the line that explains an error raised in traced code.
WRAPPERS = ("in user code:", "Graph execution error:")
CAUSE = re.compile(r"^(\w+\.)*\w*(Error|Exception): ")


def one_line(error):
    """The line that explains an error: its first, or, where TensorFlow wrapped it
    ("in user code:" and a stack), the cause it names last."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if lines[0].strip() not in WRAPPERS:  # less TensorFlow's "{{function_node ...}}" prefix
        return re.sub(r"^\{\{function_node [^}]*\}\}\s*", "", lines[0].strip())
    causes = [line.strip() for line in lines if CAUSE.match(line.strip())]
    plain = [line.strip() for line in lines[1:] if not line[0].isspace()
             and not line.lstrip().startswith(("[[", "Detected at node"))]
    return (causes or plain or lines)[-1].strip()


def named_line(error, limit=None):
    """one_line with the exception's type in front, unless the line names its own cause;
    the message cut to `limit` characters where one is given."""
    line = one_line(error)
    if CAUSE.match(line):
        return line[:limit]
    return f"{type(error).__name__}: {line[:limit]}"
