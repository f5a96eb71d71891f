"""Errors a user can act on: each message names the file or key and what to do."""


class InputError(ValueError):
    """Bad user input (image, manifest, folder, setting); the message says how to fix it."""


class ImageError(InputError):
    """One image cannot be used; the job skips it unless strict mode is on."""

    def __init__(self, path: object, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class DiskFullError(OSError):
    """The disk under an output folder is full; the message names the folder, what is free and what is needed."""

    def __init__(self, folder: object, needed_bytes: float | None, free_bytes: float, what: str = "it",
                 elsewhere: str = "set run.root to a disk with room") -> None:
        need = f"; {what}: about {max(needed_bytes / 2**20, 0.1):.1f} MiB needed" if needed_bytes else ""
        super().__init__(28, f"no space left in {folder} ({free_bytes / 2**20:.1f} MiB free){need}: free space there "
                             f"or {elsewhere}, then rerun the same command (finished work is kept)")

    def __str__(self) -> str:
        return str(self.strerror)


def is_disk_full(err: BaseException) -> bool:
    """Whether an error (an OSError, or HDF5's, which carries the system's message) is a full disk."""
    return getattr(err, "errno", None) == 28 or "No space left on device" in str(err)
