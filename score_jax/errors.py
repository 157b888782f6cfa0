"""The project's error types: bad input, as opposed to bugs.

`python -m score_jax.main` prints a `ScoreError` as one line (`score_jax: error: ...`) and exits
non-zero; every other exception keeps its traceback, because it is a bug, not bad input. Each is
also a `ValueError`, so callers that catch ValueError keep working.
"""


class ScoreError(ValueError):
    """Bad input: the message is one line naming the field, flag or file at fault."""


class ConfigError(ScoreError):
    """A config field (or a flag) has a bad value, or fields contradict each other."""


class DataError(ScoreError):
    """A dataset or data file is missing, malformed or fails its integrity check."""


class CheckpointError(ScoreError):
    """A checkpoint or export is missing, corrupt, or belongs to another run."""


class WorkdirError(ScoreError):
    """The workdir cannot be used: not writable, or in use by another run."""


class DivergedError(ScoreError):
    """Training diverged: a step's loss, gradient or updated state is not finite."""


def one_line(e: BaseException, limit: int = 300) -> str:
    """`e`'s message on one line (whitespace collapsed, at most `limit` characters), or its type's
    name if it has none: the cause inside a one-line error."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
