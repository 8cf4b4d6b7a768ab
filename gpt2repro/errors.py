"""The one exception type the command line turns into a single line on stderr."""


class UserError(Exception):
    """Bad input a user can fix: a wrong path, a corrupt file, a config that does not add up."""
