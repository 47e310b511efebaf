"""The one exception type that means "the user asked for something we cannot do"."""


class UserError(Exception):
    """Bad input (config, recipe, data, checkpoint): the CLI prints the message and exits 2."""
