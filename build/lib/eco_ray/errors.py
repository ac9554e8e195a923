"""The one base class of every error eco-ray reports to a user as a message rather than a traceback."""


class EcoRayError(ValueError):
    """Bad input: a config value, a file, a model URI. The message names it."""
