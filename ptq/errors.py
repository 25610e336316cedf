"""Exceptions users can cause. Each message names the key / file / layer / shape at fault and the fix."""


class PtqError(Exception):
    """Base class of every error ptq raises for bad input."""


class QuantSpecError(PtqError, ValueError):
    """A quantization spec or a tensor handed to a quantizer is invalid."""


class RecipeError(PtqError, ValueError):
    """A recipe (TOML or dict) is invalid; the message names the file and key path."""


class PassUnavailableError(PtqError):
    """A recipe asks for a pass this version of ptq does not provide."""


class CheckpointError(PtqError):
    """A checkpoint or cache does not belong to this run (stale fingerprint, gap, corrupt file)."""


class ModelError(PtqError):
    """The model (or one of its modules) cannot be handled as asked."""
