"""The error every converter raises for a checkpoint it cannot read or that does not fit the
model."""


class ConversionError(ValueError):
    """A checkpoint that does not fit the model: the message names every offending key and both
    shapes."""
