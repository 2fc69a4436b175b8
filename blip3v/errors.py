"""User-facing errors.

Library code raises `Blip3vError` (or a subclass) for anything a user can fix: bad input,
missing or corrupt files, mismatched engines. The CLI turns it into one line on stderr and
exit code 2; anything else is a bug and keeps its traceback.
"""


class Blip3vError(Exception):
    """An error the user can act on; its message is printed as one line."""


class InputError(Blip3vError):
    """Bad user input: a video that cannot be read, a prompt too long, a bad option value."""


class CheckpointError(Blip3vError):
    """A checkpoint directory that is missing, incomplete, corrupt or does not fit the config."""


class EngineError(Blip3vError):
    """An engine directory that is missing, partial, tampered with or built for something else."""
