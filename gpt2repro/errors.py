"""The one exception type the command line turns into a single line on stderr."""


class UserError(Exception):
    """Bad input a user can fix: a wrong path, a corrupt file, a config that does not add up."""


def first_line(error: BaseException) -> str:
    """`TypeName: first line of the message`, for one-line reports of errors raised by libraries."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
