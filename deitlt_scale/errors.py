"""The one exception type for bad user input: printed as a single line, never a traceback."""


class UserError(Exception):
    """A problem with the user's input (file, recipe, flag); the message names it and the fix."""
