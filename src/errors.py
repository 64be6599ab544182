"""Errors that mean "the input is wrong", not "the code is wrong": shown as one line, no traceback."""


class ConfigError(ValueError):
    """A config value is invalid; the message names the key and the allowed values."""


class AllClientsFailedError(RuntimeError):
    """Every sampled client of a round failed: the run stops (its last checkpoint stays usable)."""


def user_error(error: BaseException | None) -> BaseException | None:
    """The user-facing error behind `error` (Hydra's instantiate wraps the ones its targets raise)."""
    from src.data import DatasetNotFoundError
    from src.models.vit import ModelLoadError

    while error is not None:
        if isinstance(
            error, (ConfigError, DatasetNotFoundError, ModelLoadError, AllClientsFailedError)
        ):
            return error
        error = error.__cause__
    return None
