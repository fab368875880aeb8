"""The one exception type raised by every converter for input it cannot convert."""


class ConversionError(ValueError):
    """A bad conversion input: the message names the problem in one line."""
