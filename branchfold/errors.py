"""User-facing errors: one readable message naming the cause and what to do."""


class BranchfoldError(Exception):
    """Base class: the CLI prints these as one line and exits with status 2."""


class CaptureError(BranchfoldError):
    """The model could not be captured as a graph by the chosen method."""


class InputError(BranchfoldError):
    """A bad argument, path or file."""
