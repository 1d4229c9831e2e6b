"""The one exception type users catch."""


class SalcompileError(Exception):
    """Bad input or an unsupported configuration.

    The message always says what was wrong and what to do about it.
    """


class NonFiniteGradient(SalcompileError):
    """A check_finite guard (SALConfig(check_finite=True)) saw NaN/inf in a gradient during the
    backward. fp16 training (salcompile.training.fit) takes it as the loss scaler's overflow while
    the loss scale is above 1."""
