"""The one exception type users catch."""


class SalcompileError(Exception):
    """Bad input or an unsupported configuration.

    The message always says what was wrong and what to do about it.
    """
