"""Exceptions whose message is written for the person who made the mistake.

Each says what is wrong, where (file, line, field, tensor) and what to do. The command line prints the
message as one ``error:`` line and exits with status 2; a notebook shows it as is.
"""


class UserInputError(ValueError):
    """Bad input from the user: a file, a flag or a value. Never a bug in gptlib."""


class DataError(UserInputError):
    """A data file that cannot be used as it is."""


class CheckpointError(UserInputError):
    """A checkpoint file that cannot be read into a model."""


class OutputError(UserInputError):
    """An output that cannot be written: a missing or read-only folder, a full disk, or a file in use."""


class TrainingDiverged(UserInputError):
    """Training met a non-finite loss or gradient, almost always from a learning rate that is too high."""
