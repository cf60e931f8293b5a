"""The project's exceptions: library code raises them with the file or parameter in the message, and each script turns them into one line for its user, naming the flag where the library named a parameter."""


class Error(Exception):
    """Anything a user can cause and mend: the message alone says what is wrong and where. A message about a
    parameter starts `name=value: ...` and gives `parameter`, so that a script can say `--name value: ...`."""

    def __init__(self, message: str, parameter: str | None = None):
        super().__init__(message)
        self.parameter = parameter

    def __reduce__(self):  # across worker processes with its parameter and reason, not only its message
        return rebuild, (type(self), str(self), vars(self))

    def for_flags(self, flags: dict[str, str] | None = None) -> str:
        """The message as a script says it: `box=1,2,3,4: ...` becomes `--box 1,2,3,4: ...`, or names the flag
        `flags` maps the parameter to."""
        message, name = str(self), self.parameter
        if name and message.startswith(f"{name}="):
            flag = (flags or {}).get(name, f"--{name.replace('_', '-')}")
            return f"{flag} {message[len(name) + 1:]}"
        return message


def rebuild(kind: type, message: str, attributes: dict) -> Error:
    error = kind.__new__(kind)
    Exception.__init__(error, message)
    error.__dict__.update(attributes)
    return error


class DataError(Error, ValueError):
    """A problem with one input file (labels, image, video, .pts): the message names the file, `reason` names
    the kind, so that --skip-bad can count what it skipped."""

    def __init__(self, message: str, reason: str = "", parameter: str | None = None):
        super().__init__(message, parameter)
        self.reason = reason


class WeightsError(Error):
    """A weights or model file that is missing, unreadable, altered, or not for this network."""


class UsageError(Error):
    """Options that cannot work together, or a value a parameter does not take."""


class OutputError(Error):
    """An output that cannot be written (a full disk, a folder taken away or made read-only): the message names
    the folder, and what was written before stays whole, for --resume."""
