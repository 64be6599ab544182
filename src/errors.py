"""Errors that mean "the input is wrong" (one line, no traceback) and the run-stopping errors."""


class ConfigError(ValueError):
    """A config value is invalid; the message names the key and the allowed values."""


class InputError(RuntimeError):
    """A file or download the run needs is missing or unusable (a dataset, pretrained weights);
    the message names the config key to change."""


class AllClientsFailedError(RuntimeError):
    """Every sampled client of a round failed: the run stops (its last checkpoint stays usable)."""


class ClientError(RuntimeError):
    """A client raised while it trained (a bug, not an injected fault): the run stops. The
    message names the round and the client; the original exception is the cause."""


class RunInterrupted(RuntimeError):
    """SIGTERM or SIGINT: the run stops at the next client boundary, keeping its checkpoint."""

    def __init__(self, signal_name: str, exit_code: int):
        super().__init__(signal_name)
        self.signal_name, self.exit_code = signal_name, exit_code


def user_error(error: BaseException | None) -> BaseException | None:
    """The user-facing error behind `error` (Hydra's instantiate wraps the ones its targets raise)."""
    while error is not None:
        if isinstance(error, (ConfigError, InputError, AllClientsFailedError)):
            return error
        error = error.__cause__
    return None
