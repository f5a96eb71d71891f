"""Errors a user can act on: each message names the file or key and what to do."""


class InputError(ValueError):
    """Bad user input (image, manifest, folder, setting); the message says how to fix it."""


class ImageError(InputError):
    """One image cannot be used; the job skips it unless strict mode is on."""

    def __init__(self, path: object, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")
