"""Errors that end a run before any work starts, with a one-line message that names the fix."""


class ConfigError(ValueError):
    """A configuration value that cannot work.

    Messages follow one shape so users can act on them without reading code:
    ``"<config.key>=<value>: <what is wrong>. Fix: <what to do>"``.
    """

    def __init__(self, key: str, value: object, problem: str, fix: str) -> None:
        self.key = key
        self._args = (key, value, problem, fix)
        super().__init__(f"{key}={value!r}: {problem}. Fix: {fix}")

    def __reduce__(self) -> tuple:
        # A cluster launcher (submitit) pickles a job's exception back to the sweep; the default
        # would call __init__ with the message alone and fail with a TypeError instead.
        return (self.__class__, self._args)


class BudgetError(ValueError):
    """The privacy budget cannot be met by a plan, or recording an event would exceed it."""
