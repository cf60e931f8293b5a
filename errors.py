"""The project's exceptions: library code raises them with the file or flag in the message, and each script turns them into one line for its user."""


class Error(Exception):
    """Anything a user can cause and mend: the message alone says what is wrong and where."""


class DataError(Error, ValueError):
    """A problem with one input file (labels, image, video, .pts): the message names the file, `reason` names
    the kind, so that --skip-bad can count what it skipped."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason


class WeightsError(Error):
    """A weights or model file that is missing, unreadable, altered, or not for this network."""


class UsageError(Error):
    """Options that cannot work together, found only once the data or the weights are read."""
