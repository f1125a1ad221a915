"""The one exception type the command line turns into a clean, one-line message."""


class UserError(Exception):
    """A problem with the user's input (config, file, model path) and how to fix it.

    `python -m selfinterp` prints ``error: <message>`` and exits with status 2 instead of
    a traceback, so the message must say what is wrong and what to do.
    """
