"""A run's folders (the run folder; the save folder) and their locks: rank 0 creates them and takes each one's
:class:`mptkit.train.lock.RunLock` before anything is written there, the other ranks learn the outcome; the
locks are checked before each write and released at the end; a set-up that fails removes again the folders
it created while they are still empty."""

from __future__ import annotations

import contextlib
from pathlib import Path

from mptkit.errors import TrainError
from mptkit.train.distributed import DistInfo, broadcast_object
from mptkit.utils.outputs import check_writable


class RunFolders:
    """The locks rank 0 holds on a run's folders (``locks``) and the folders it created (``created``)."""

    def __init__(self) -> None:
        self.locks: list = []
        self.created: list[Path] = []

    def take(self, run_folder: Path, save_folder: Path | None, dist: DistInfo) -> None:
        """Rank 0 creates ``run_folder`` and ``save_folder`` and locks them; a folder another run holds is a
        TrainError naming the holder. The other ranks wait for the outcome and raise the same error."""
        from mptkit.train.lock import RunLock

        err: BaseException | None = None
        if dist.is_main:
            folders = [run_folder] + ([save_folder] if save_folder is not None else [])
            for f in folders:
                self.created += missing_dirs(f)
            try:
                for f, key in zip(folders, ("run_folder", "save_folder")):
                    try:  # made here (RunLock would), so that a file in the way is named as such
                        f.mkdir(parents=True, exist_ok=True)
                    except OSError as e:
                        raise TrainError(
                            f"{key} {f} is not writable ({e.strerror or e}); choose another {key}"
                        ) from None
                    check_writable(f, key, TrainError)
                for f in dict.fromkeys(p.resolve() for p in folders):
                    self.locks.append(RunLock(f).acquire())
            except Exception as e:  # noqa: BLE001 - any failure is broadcast first, or the other ranks would wait
                err = e
        msg = broadcast_object(None if err is None else str(err), dist)
        if err is not None:
            raise err
        if msg is not None:
            raise TrainError(f"rank 0 could not take the run's folders: {msg}")

    def assert_held(self, dist: DistInfo) -> None:
        """Before writing a checkpoint: every rank raises if rank 0's lock was taken over (collective)."""
        lost = next((lk for lk in self.locks if lk.lost), None)
        msg = broadcast_object(lost.lost if lost is not None else None, dist)
        if lost is not None:
            lost.check()
        if msg is not None:
            raise TrainError(f"rank 0 lost the lock on the run's folder ({msg}); stopping without writing")

    def check(self) -> None:
        """Rank 0, before each metrics line and the export: raise :class:`TrainError` naming the lock and its
        new holder if another run took one of the folders over (``lost`` is set by the heartbeat thread: a
        plain attribute read, free). The other ranks stop when rank 0 exits (torchrun ends the job)."""
        for lk in self.locks:
            lk.check()

    def release(self) -> None:
        for lk in self.locks:
            lk.release()
        self.locks = []

    def abandon(self) -> None:
        """After a failed set-up: release the locks, remove the folders it created while still empty."""
        self.release()
        for d in reversed(self.created):  # deepest first; only what is still empty
            with contextlib.suppress(OSError):
                d.rmdir()
        self.created = []


def missing_dirs(folder: Path) -> list[Path]:
    """``folder`` and those of its parents that do not exist yet, outermost first."""
    out: list[Path] = []
    p = Path(folder).absolute()
    while not p.exists() and p != p.parent:
        out.append(p)
        p = p.parent
    return out[::-1]
