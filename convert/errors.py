"""The converter's error type: bad input (checkpoint, config, options); the message names the problem."""


class ConversionError(Exception):
    pass
