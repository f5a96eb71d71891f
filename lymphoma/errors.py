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


def is_disk_full(err: BaseException | str) -> bool:
    """Whether an error (an OSError, or HDF5's, which carries the system's message, or a failed task's error text)
    is a full disk."""
    return getattr(err, "errno", None) == 28 or "No space left on device" in str(err)


def one_line(err: BaseException) -> str:
    """An error's message on one line: HDF5's back trace (a dozen lines of library frames) becomes its innermost
    reason, e.g. ``truncated file: eof = 1000000, ... stored_eof = 21213321``."""
    text = str(err)
    if "HDF5 error back trace" in text:
        reasons = [line.strip() for line in text.splitlines() if line.startswith("    ") and line.strip()]
        return reasons[-1] if reasons else text.strip().splitlines()[-1]
    return " ".join(text.split())
