"""The one exception type the command line turns into a single line on stderr."""


class UserError(Exception):
    """Bad input a user can fix: a wrong path, a corrupt file, a config that does not add up."""


def first_line(error: BaseException, with_type: bool = True) -> str:
    """The first line of an error's message (`TypeName: ...` with_type), for one-line reports of
    errors raised by libraries."""
    lines = str(error).strip().splitlines()
    if not lines:
        return type(error).__name__
    return f"{type(error).__name__}: {lines[0]}" if with_type else lines[0]
