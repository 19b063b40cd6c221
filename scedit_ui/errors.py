"""The one error type shown to users: raised where the problem is known, displayed once at the edge."""


class UserInputError(ValueError):
    """Bad input or a missing resource, with a message that tells the user what to do.

    The CLI prints it on one line and exits with code 2; the UI shows it as a toast.
    """
