"""A run folder's life: new, unfinished (resumable), finished; and one writer at a time.

Every run command (fit-head, finetune, fit-ridge) goes through `RunFolder`: it names the folder's
state, takes an OS lock on it so that a second process writing the same run is refused instead of
interleaving its files, and clears it for `--overwrite` or for a `--resume` of a run that stopped
before its first checkpoint (so no folder is left that neither a rerun nor --resume accepts).
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

from blobenc.errors import ConfigError
from blobenc.files import read_json

# Files a folder may hold and still count as empty: the CLI's log (written from the first line).
KEEP = frozenset({"log.txt"})


class RunFolder:
    """The folder `out` of one run. `state()`: "absent", "empty", "unfinished" or "finished" (run.json
    records the end). `claim()` makes it and locks it for this process until `release()` or exit."""

    def __init__(self, out: Path | str):
        self.out = Path(out)
        self._fd: int | None = None

    def state(self) -> str:
        from blobenc.train.checkpoint import RunSpec  # checkpoint imports the heads: not for a state

        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"--out {self.out}: is a file; expected a run folder (new, or one to --resume)")
        if not self.out.exists():
            return "absent"
        if not any(p.name not in KEEP for p in self.out.iterdir()):
            return "empty"
        run = self.out / "run.json"
        if run.is_file():
            try:
                if RunSpec.read(run).finished:
                    return "finished"
            except ConfigError:
                pass  # a damaged run.json: unfinished, which --resume checks and --overwrite replaces
        try:  # runs from before run.json recorded the end: the run's summary gets its time at the end
            if "seconds" in read_json(self.out / "summary.json"):
                return "finished"
        except ConfigError:
            pass
        return "unfinished"

    def check(self, resume: bool, overwrite: bool) -> str:
        """What this run will do with the folder: "new" (also a --resume of a run that made nothing
        yet), "restart" (cleared: --overwrite, or a --resume with no checkpoint to go on from),
        "continue" or "finished" (--resume of a run that ended: left as it is). Refuses a rerun into
        an unfinished or finished run without an option."""
        if resume and overwrite:
            raise ConfigError("--resume and --overwrite: choose one (continue the run, or replace it)")
        state = self.state()
        if overwrite:
            return "restart" if state in ("unfinished", "finished") else "new"
        if resume:
            if state in ("absent", "empty"):  # killed before it made anything: a job script's --resume starts it
                return "new"
            if state == "finished":
                return "finished"
            return "continue" if self.has_checkpoint() else "restart"
        if state == "unfinished":
            raise ConfigError(
                f"--out {self.out}: holds an unfinished run; --resume continues it, --overwrite starts it over, "
                "or choose a new --out"
            )
        if state == "finished":
            raise ConfigError(f"--out {self.out}: holds a finished run; --overwrite replaces it, or choose a new --out")
        return "new"

    def has_checkpoint(self) -> bool:
        """Whether training state was written (a trial's state.safetensors, in the folder or a sweep's trials)."""
        return (self.out / "state.safetensors").is_file() or any(self.out.glob("*/state.safetensors"))

    def claim(self, clear: bool = False) -> None:
        """Make the folder and lock it for this process (refused while another holds it); with
        `clear`, remove what an earlier run left (its log excepted: it goes on)."""
        if self._fd is None:
            self.out.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.out, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise ConfigError(
                    f"--out {self.out}: another blobenc process is writing this run; wait for it to end or choose "
                    "another --out"
                ) from None
            self._fd = fd
        if clear:
            for p in self.out.iterdir():
                if p.name not in KEEP:
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None

    def __del__(self):
        self.release()
