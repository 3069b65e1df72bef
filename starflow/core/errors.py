"""The one user-facing exception type: bad input, bad files, unsupported options."""


class StarflowError(ValueError):
    """Raised for anything a user can fix: a bad config key, a wrong shape, a broken file.

    It subclasses ValueError so callers that only know the standard library can still catch it.
    The CLI turns it into a one-line message and a non-zero exit code.
    """
