class DataError(ValueError):
    """Bad or missing data: main.py prints the message as one line and exits 2."""
