"""The run folder: its file names, writes that never leave a half-written file, one writer at a
time, and the data it was trained on pinned by a fingerprint."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import hashlib
import json
import math
import os
import shutil
import socket
import threading
import zipfile
from pathlib import Path

import yaml

from imgcls.errors import UserError, first_line

CONFIG = "config.yaml"  # the run plan: the TrainConfig with every value resolved
PLAN = "plan.json"  # how the plan was decided: the machine, which values were measured, their timings
DATASET = "dataset.json"  # classes, image size, normalisation, split fingerprint
METRICS = "metrics.jsonl"  # one line per finished epoch
SUMMARY = "summary.json"  # written when training ends
LAST = "last.pt"  # full training state, for --resume
BEST = "best.pt"  # weights of the epoch with the best validation score (--monitor)
TEST_PREDICTIONS = "test_predictions.npz"  # labels and probabilities of best.pt on test, per image
LOCK = ".lock"  # held (flock) by the process training the run
CALIBRATION = "calibration.json"  # imgcls calibrate: the scaling fitted on val; eval and predict apply it
REPORT_DIR = "report"  # imgcls report: figures, galleries and report.html
ANALYSIS_JSON, ANALYSIS_NPZ = "analysis.json", "analysis.npz"  # in REPORT_DIR: what the report shows
REPORT_HTML = "report.html"  # in REPORT_DIR of a run, or at the top of a comparison folder
# What a run folder holds before its first checkpoint: nothing a user could lose by starting over.
UNSTARTED_FILES = {CONFIG, PLAN, DATASET, METRICS, LOCK}
TMP_MARK = ".tmp-"
EXCLUDED = "excluded.json"  # train --exclude: the names as the run read them, so a later edit of the list is seen
RUN_FILES = {CONFIG, PLAN, DATASET, METRICS, SUMMARY, LAST, BEST, TEST_PREDICTIONS, LOCK, CALIBRATION, EXCLUDED}


def file_digest(path: Path) -> str:
    """The sha256 of a file's bytes, read a MiB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cache_dir() -> Path:
    """Where imgcls keeps what it measured or computed for reuse across runs (kernel timings, cached
    features): $IMGCLS_CACHE_DIR, else ~/.cache/imgcls."""
    root = os.environ.get("IMGCLS_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "imgcls"


# What an export folder holds (export/ and inference/exported.py name them; test_trust checks the two agree)
COMPARISON_RESULTS = "results.json"  # what marks a folder as imgcls compare's
COMPARISON_FILES = {COMPARISON_RESULTS, "results.csv", "results.md", "accuracy_per_epoch.png", "accuracy_vs_time.png",
                    REPORT_HTML}
EXPORT_FILES = {"model.onnx", "model.int8.onnx", "model.safetensors", "model.json", "parity.json", "MODEL_CARD.md"}


def refuse_run_file(out: str | Path, flag: str = "--out", inputs: tuple = (), within: tuple = ()) -> None:
    """A user's output never lands on a file imgcls reads: one a run owns (its checkpoints, plan, metrics,
    calibration, eval results), one of an export, one in imgcls's cache, one of the command's own `inputs`
    (a --list file), or anything inside the folders in `within` (the image folder a command reads, where a
    PNG would become a training image): `predict --out RUN/metrics.jsonl` would destroy the run's record,
    however whole the write."""
    target = Path(os.path.realpath(out))
    for folder in (*within, cache_dir()):
        if folder and target.is_relative_to(os.path.realpath(folder)):
            raise UserError(f"{flag} {out} lies inside {folder}, which this command reads"
                            f"{'' if folder in within else ' (imgcls cache)'}; write elsewhere")
    owned = target.name in RUN_FILES or (target.name.startswith("eval-") and target.suffix == ".json")
    if owned and is_run(target.parent):
        raise UserError(f"{flag} {out} is {target.name} of the run {target.parent}; write elsewhere, e.g. "
                        f"{flag} {target.parent.parent / target.name}")
    if target.parent.name == REPORT_DIR and is_run(target.parent.parent):
        raise UserError(f"{flag} {out} lies in the report folder of the run {target.parent.parent}, which imgcls "
                        "report writes; write elsewhere")
    if target.name in COMPARISON_FILES and (target.parent / COMPARISON_RESULTS).is_file():
        raise UserError(f"{flag} {out} is {target.name} of the comparison {target.parent}; write elsewhere")
    if target.name in EXPORT_FILES and any((target.parent / name).is_file() for name in EXPORT_FILES - {target.name}):
        raise UserError(f"{flag} {out} is {target.name} of the export {target.parent}; write elsewhere")
    if target.exists() and any(target == Path(os.path.realpath(p)) for p in inputs if p):
        raise UserError(f"{flag} {out} is one of this command's inputs, which the output would replace; write "
                        "elsewhere")


@contextlib.contextmanager
def atomic_path(path: Path):
    """A temporary path beside `path` to write to; renamed over `path` (after an fsync) when the block
    ends normally, removed otherwise. Readers see the old file or the new one, never a part of one, and
    of two writers at once the last to finish wins whole. A full disk is reported in one line. A symbolic link
    is followed: the file it points to is replaced and the link kept, as a shell's `>` would. Only a regular
    file is ever replaced (a device, FIFO or socket is refused), and what killed writers of `path` left
    beside it is removed first."""
    path = writable_target(path)
    remove_stale_temps(path)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}-{threading.get_ident()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        kept = f"the previous {path.name}, if any, is intact"
        _raise_if_disk_full(e, path, kept)
        if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM) and str(e.filename) in (str(tmp), str(path)):
            raise UserError(f"cannot write {path} ({e.strerror}); {kept}: choose another --out") from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


def writable_target(path: Path) -> Path:
    """The file a write to `path` lands in (a link followed), refused in one line when it cannot be one: a
    link loop, a link to a file of another kind (l.csv -> x.png), a folder, a device, FIFO or socket
    (renaming a file over /dev/null is not writing to it), or a folder that does not exist."""
    path = Path(path)
    if path.is_symlink():
        link = path
        try:
            path = Path(os.path.realpath(path, strict=True))
        except FileNotFoundError:  # a dangling link: its target is created, as a shell's > would
            path = Path(os.path.realpath(path))
        except OSError:
            raise UserError(f"cannot write {path}: it is a symbolic-link loop; name a file or fix the link") from None
        if path.suffix.lower() != link.suffix.lower() and path.exists():  # l.csv -> a training image
            raise UserError(f"cannot write {link}: it is a link to {path}, a file of another kind, which the "
                            f"{link.suffix or 'output'} would replace; name a file")
    if path.is_dir():
        raise UserError(f"cannot write {path}: it is a folder; name a file")
    if path.exists() and not path.is_file():
        raise UserError(f"cannot write {path}: it is not a regular file (a device, FIFO or socket); name a file")
    if not path.parent.is_dir():
        raise UserError(f"cannot write {path}: the folder {path.parent} does not exist; create it or name another")
    return path


def remove_stale_temps(path: Path) -> None:
    """Temporary files and staging folders of earlier writers of `path` whose process is gone (kill -9)."""
    prefix = f".{path.name}{TMP_MARK}"
    for p in path.parent.glob(f"{glob.escape(prefix)}*"):
        pid = p.name[len(prefix):].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "w", **kwargs):
    """An open file that lands at `path` whole when the block ends (see `atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """`data` at `path`, whole or not at all (see `atomic_path`)."""
    with atomic_file(path, "wb") as f:
        f.write(data)


def _raise_if_disk_full(e: OSError, path: Path, kept: str) -> None:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        again = ("continue with imgcls train --resume (a run that had no checkpoint yet is removed: start it again)"
                 if path.name in (LAST, BEST, METRICS, CONFIG, PLAN, DATASET) else "run the command again")
        raise UserError(f"no space left on the device to write {path}; {kept}: free some space, then {again}") from e


def _finite_or_null(obj):
    """NaN and infinities (an empty reliability bin, a metric of no images) as null: valid JSON for any reader."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite_or_null(v) for v in obj]
    return obj


def write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(_finite_or_null(obj), indent=2, allow_nan=False) + "\n").encode())


SEAL = "sha256"  # of the rest of a sealed record, as canonical JSON


def _seal_of(record: dict) -> str:
    body = {k: v for k, v in record.items() if k != SEAL}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_sealed_json(path: Path, record: dict) -> None:
    """write_json with a digest of the content, so that a hand edit that keeps every value in bounds (a
    temperature, say) is still found: read_sealed_json refuses it."""
    record = _finite_or_null(record)
    write_json(path, {**record, SEAL: _seal_of(record)})


def read_sealed_json(path: Path, fix: str) -> dict:
    """A record write_sealed_json wrote, refused in one line when its content no longer matches its seal."""
    record = read_json(path)
    if not isinstance(record, dict) or record.get(SEAL) != _seal_of(record):
        raise UserError(f"{path} was edited after imgcls wrote it (its {SEAL} no longer matches its content) or "
                        f"was written by an older imgcls; {fix}")
    return record


def _unique_keys(pairs: list[tuple]) -> dict:
    keys = [k for k, _ in pairs]
    repeated = next((k for k in keys if keys.count(k) > 1), None)
    if repeated is not None:
        raise ValueError(f"the key {repeated!r} is given twice")
    return dict(pairs)


def strict_json(text: str):
    """json.loads, except that an object may not give a key twice (json keeps the last one, silently, where
    another reader may keep the first) and nesting too deep is a ValueError, not a RecursionError."""
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def npz_problem(path: Path) -> str | None:
    """What makes an .npz unsafe to load (None: nothing): a member whose .npy header promises more (or less)
    data than the member holds, which np.load would trust and try to allocate (3.6 TiB seen)."""
    import numpy as np

    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            with archive.open(info) as member:
                version = np.lib.format.read_magic(member)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                shape, _, dtype = read_header(member)
                data = info.file_size - member.tell()
            if dtype.hasobject or math.prod(shape) * dtype.itemsize != data:
                return f"{info.filename} promises {shape} {dtype} but holds {data} bytes of data"
    return None


def read_text(path: Path, where: str, limit: int, hint: str) -> str:
    """A UTF-8 text file a user gave (a byte-order mark dropped), refused in one line naming it as `where` when
    it is over `limit` bytes or not UTF-8 (`hint`: what it should be)."""
    if path.stat().st_size > limit:
        raise UserError(f"{where} is over {limit >> 20} MiB; {hint}")
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{where} is not UTF-8 text; {hint}") from None


def read_json(path: Path):
    path = Path(path)
    try:
        return strict_json(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} is missing; the run folder is incomplete (train it again)") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({first_line(e)}); restore it or train the run again") from None


def read_plan(run: Path) -> dict | None:
    """plan.json of a run (None for runs of older imgcls versions, which have none)."""
    path = Path(run) / PLAN
    if not path.is_file():
        return None
    plan = read_json(path)
    if not (isinstance(plan, dict) and isinstance(plan.get("machine"), str) and isinstance(plan.get("measured"), list)
            and all(isinstance(f, str) for f in plan["measured"])):
        raise UserError(f"{path} is damaged (it needs 'machine' and a 'measured' list); restore it, or delete it to "
                        "use the recorded kernels as they are")
    return plan


def read_metrics(run: Path) -> list[dict]:
    path = Path(run) / METRICS
    if not path.exists():
        return []
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{path} is not text; restore it or train the run again") from None
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = strict_json(line)
        except ValueError as e:
            raise UserError(f"{path} has a damaged line {n} ({e}); restore it or train the run again") from None
        if not isinstance(record, dict) or record.get(SEAL) != _seal_of(record):
            raise UserError(f"{path} line {n} was edited after imgcls wrote it (its {SEAL} no longer matches) or was "
                            "written by an older imgcls; restore it or train the run again")
        records.append({k: v for k, v in record.items() if k != SEAL})
    return records


def sealed_line(record: dict) -> str:
    """A metrics.jsonl line: the record with a digest of it, as the JSON files are sealed (an edited epoch is found)."""
    record = _finite_or_null(record)
    return json.dumps({**record, SEAL: _seal_of(record)}, allow_nan=False) + "\n"


def append_metrics(run: Path, record: dict) -> None:
    """One epoch's line, appended (a torn last line from a kill is dropped on resume)."""
    path = Path(run) / METRICS
    try:
        with open(path, "a") as f:
            f.write(sealed_line(record))
    except OSError as e:
        _raise_if_disk_full(e, path, "the epochs before are intact")
        raise


def keep_metrics(run: Path, epochs: int) -> None:
    """Keep the lines of the first `epochs` epochs: those after the checkpoint are redone on resume."""
    path = Path(run) / METRICS
    lines = path.read_text().splitlines() if path.exists() else []
    kept, seen = [], set()
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line torn by a kill mid-write
            continue
        if isinstance(record, dict) and record.get("epoch", epochs + 1) <= epochs and record["epoch"] not in seen:
            seen.add(record["epoch"])  # a line written twice (a kill between log and checkpoint) is kept once
            kept.append(line + "\n")
    atomic_write_bytes(path, "".join(kept).encode())


def folders(*paths: str | None) -> tuple[str, ...]:
    """The folders of `paths` (a dataset's images, --data-dir; a manifest's folder, which holds its images; the
    folder of a brace pattern of shards): what an output may not land in."""
    def pattern(p: str) -> bool:
        return "{" in Path(p).name and Path(p).parent.is_dir()

    return tuple(p if Path(p).is_dir() else str(Path(p).parent) for p in paths
                 if p and (Path(p).is_dir() or Path(p).is_file() or pattern(p)))


def run_exclusions(run: Path, cfg) -> list[str] | None:
    """The names a run trained without (train --exclude), from its own copy: the user's list may have been
    edited, moved or overwritten since (a new audit); None for a run without --exclude."""
    if not getattr(cfg, "exclude", None):
        return None
    path = Path(run) / EXCLUDED
    if not path.is_file():
        raise UserError(f"{run} was trained with --exclude but lacks {EXCLUDED}, its copy of the list; restore it, or "
                        "train again")
    names = read_sealed_json(path, "restore it, or train again").get("names")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise UserError(f"{path} is damaged; restore it, or train again")
    return names


def is_run(path: Path) -> bool:
    return (Path(path) / CONFIG).is_file()


def require_run(path: str | Path) -> Path:
    path = Path(path)
    if not is_run(path):
        raise UserError(f"{path} is not an imgcls run (no {CONFIG}); pass a folder made by imgcls train")
    return path


def is_unstarted(path: Path) -> bool:
    """A run folder imgcls made (its .lock is there, and its config names this folder) that never wrote a
    checkpoint, killed early, and that no process is training. A user's own folder is never one."""
    path = Path(path)
    names = {p.name for p in path.iterdir() if TMP_MARK not in p.name}
    if not (LOCK in names and names <= UNSTARTED_FILES) or RunLock(path).held_elsewhere():
        return False
    if CONFIG not in names:
        return True
    try:
        out = (yaml.safe_load((path / CONFIG).read_text()) or {}).get("out")
    except (OSError, yaml.YAMLError, AttributeError):
        return False
    return out is not None and Path(str(out)).resolve() == path.resolve()


def refuse_existing(out: str | Path) -> None:
    """An explicit --out that already holds files is refused, never overwritten (a run that never reached
    its first checkpoint is the one exception: it holds nothing to lose, and is cleared)."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} is a file; choose a folder for --out")
    if path.exists() and any(path.iterdir()) and not is_unstarted(path):
        raise UserError(
            f"{path} already exists and is not empty; choose another --out, "
            f"or continue a run there with imgcls train --resume {path}"
        )


def auto_resume_target(out: str | Path, options: dict) -> Path | None:
    """`train --resume auto --out RUN`, the rule for a cluster that restarts the same command line: None to
    start RUN as a new run (it does not exist, or is empty, or never reached its first checkpoint), RUN to
    continue it (or to find it finished) when it was begun with the same `options` (config_record of the
    options as given), else a one-line refusal. Its data is checked afterwards, as for every resume."""
    path = Path(out)
    if not path.exists() or (path.is_dir() and (not any(path.iterdir()) or is_unstarted(path))):
        return None
    if not is_run(path):
        raise UserError(f"--resume auto: {path} holds other files, not an imgcls run; choose another --out")
    recorded = (read_plan(path) or {}).get("options")
    if not isinstance(recorded, dict):
        raise UserError(f"--resume auto: {path} has no record of the options it was started with (an older run); "
                        f"continue it with imgcls train --resume {path}")
    changed = sorted(k for k in recorded.keys() | options.keys() if recorded.get(k) != options.get(k))
    if changed:
        said = "; ".join(f"--{k.replace('_', '-')} {recorded.get(k)} there, {options.get(k)} now" for k in changed[:4])
        raise UserError(f"--resume auto: {path} was started with other options ({said}"
                        f"{f'; {len(changed) - 4} more' if len(changed) > 4 else ''}); give its options, or another "
                        "--out for a new run")
    return path


def new_run_dir(out: str | None, data: str, model: str) -> Path:
    """The folder for a new run: --out if free, else runs/<data>-<model> with a numeric suffix if taken."""
    if out:
        refuse_existing(out)
        path = Path(out)
        if path.exists() and any(path.iterdir()):  # an unstarted run: start over
            shutil.rmtree(path)
    else:
        base = Path("runs") / f"{Path(data).name}-{model.replace('/', '_')}"
        path, n = base, 1
        while path.exists():
            n += 1
            path = base.with_name(f"{base.name}-{n}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the run folder {path} ({e.strerror}); choose another --out") from None
    return path


def remove_temp_files(path: Path) -> None:
    """Temporary files of a save that was killed half-way (the real file is intact)."""
    for p in Path(path).glob(f".*{TMP_MARK}*"):
        p.unlink(missing_ok=True)


# The run locks this process holds. A forked child (a DataLoader worker) closes its inherited copy at
# once: a flock belongs to the open file, so a worker that outlived a killed trainer would hold it on.
_HELD_LOCKS: set[int] = set()


def _drop_inherited_locks() -> None:
    for fd in _HELD_LOCKS:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


class RunLock:
    """An exclusive flock on RUN/.lock while a process trains the run. The kernel drops it when the
    process dies, however it dies (its forked workers hold no copy), so a stale lock file from a killed
    run never blocks anyone."""

    def __init__(self, run: Path):
        self.path = Path(run) / LOCK
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UserError(f"{self.path.parent} is being trained by {holder}; wait for it to finish or stop it "
                            "(Ctrl-C), then resume") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"process {os.getpid()} on {socket.gethostname()}".encode())
        self._fd = fd
        _HELD_LOCKS.add(fd)

    def release(self) -> None:
        if self._fd is not None:
            _HELD_LOCKS.discard(self._fd)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def holder(self) -> str:
        """Who holds the lock, as its holder wrote it ("process 123 on host")."""
        try:
            return self.path.read_text(errors="replace").strip() or "another process"
        except OSError:
            return "another process"

    def held_elsewhere(self) -> bool:
        if self._fd is not None or not self.path.exists():
            return False
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)


# ---------------------------------------------------------------- the data a run was trained on


FINGERPRINT_NAMES = {"content_sha256": "image content", "labels_sha256": "labels", "source": "data location",
                     "img_size": "image size", "val_fraction": "validation fraction", "split_seed": "split seed"}


def data_changes(recorded: dict, current: dict) -> list[str]:
    """What differs between a run's recorded data fingerprint and the data found now. A key only one of them
    has is a difference too: a record that lost its content hash must not pass for any content."""
    changes = []
    old, new = recorded.get("sizes", {}), current.get("sizes", {})
    changes += [f"{s} split {old.get(s, 0)} -> {new.get(s, 0)} images" for s in sorted(set(old) | set(new))
                if old.get(s) != new.get(s)]
    for key in sorted((set(recorded) | set(current)) - {"sizes"}):
        if key not in recorded or key not in current:
            where = "the run's record" if key not in recorded else "the data now"
            changes.append(f"{FINGERPRINT_NAMES.get(key, key)} is missing from {where}")
        elif recorded[key] != current[key]:
            changes.append(f"{FINGERPRINT_NAMES.get(key, key)} differs")
    return changes


def check_same_data(run: Path, recorded: dict, current: dict, allow_change: bool) -> None:
    """Refuse to use `run` with data other than it was trained on, unless the user says so."""
    changes = data_changes(recorded, current)
    if changes and not allow_change:
        raise UserError(f"the data of {run} changed since it was trained ({'; '.join(changes)}); restore it, or "
                        "pass --allow-data-change to use the data as it is now")


class RunFolder:
    """A run folder opened for training: created or reopened, locked against a second writer while
    open, and removed whole when a run fails before it holds anything worth keeping."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.lock = RunLock(self.path)

    @classmethod
    def create(cls, out: str | None, data: str, model: str) -> RunFolder:
        folder = cls(new_run_dir(out, data, model))
        folder.lock.acquire()
        return folder

    @classmethod
    def reopen(cls, path: str | Path) -> RunFolder:
        folder = cls(require_run(path))
        if (folder.path / SUMMARY).exists():
            raise UserError(f"{folder.path} already finished training; evaluate it with imgcls eval {folder.path}")
        folder.lock.acquire()
        remove_temp_files(folder.path)  # we hold the lock: no other save is under way
        return folder

    def check_data(self, current: dict, allow_change: bool) -> None:
        info = self.path / DATASET
        if info.exists():
            check_same_data(self.path, read_json(info).get("fingerprint", {}), current, allow_change)
        elif (self.path / LAST).exists():  # a checkpoint without the record of its data: nothing to check against
            raise UserError(f"{self.path} holds {LAST} but no {DATASET}, the record of the data it trained on; "
                            "restore it from a backup, or train a new run")

    def remove(self) -> None:
        self.release()
        shutil.rmtree(self.path, ignore_errors=True)

    def finish(self) -> None:
        """Training is over (its summary written): the lock file goes, unlinked while still held, so that
        no reader can find a finished run with the file but nobody holding it (an unstarted run's mark)."""
        self.lock.path.unlink(missing_ok=True)
        self.release()

    def release(self) -> None:
        self.lock.release()
