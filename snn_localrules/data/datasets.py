"""Readers for real event datasets, for users who have the files: N-MNIST, SHD, DVS128 Gesture, CIFAR10-DVS.

Nothing is ever downloaded: a missing dataset raises :class:`FileNotFoundError` naming the expected
directory layout and where to get the files. The file formats are decoded here with numpy (and ``h5py``
for SHD); ``tonic`` is not needed.

Every dataset is a :class:`torch.utils.data.Dataset` of ``(frames, label)``:

* event cameras: ``frames`` is ``[T, 2, H, W]`` float32 event counts (channel 0 OFF, channel 1 ON);
* SHD: ``frames`` is ``[T, 700]`` float32 spike counts per channel;

with ``T`` time bins over each sample (its whole duration by default, or fixed windows of
``duration / T`` from the sample's start when ``duration`` is given; ``split_by="number"`` gives bins of
equal event counts instead). A ``DataLoader`` batches them sample-first, ``[B, T, ...]``; use
``x.transpose(0, 1)`` for the time-first ``[T, B, ...]`` SpikingJelly and snnTorch expect. Raw events
are available through ``dataset.events(i)`` (numpy structured array with fields ``x, y, t, p``;
``t`` in microseconds for the cameras).
"""
from __future__ import annotations

import collections
import csv
import glob
import hashlib
import json
import os
import re
import struct
import warnings
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from .events import _pair, save_atomically, time_bins, to_frames

__all__ = [
    "EVENT_DTYPE",
    "EventDataset",
    "NMNIST",
    "SHD",
    "DVSGesture",
    "CIFAR10DVS",
    "read_nmnist_bin",
    "read_aedat3",
    "read_aedat2",
    "read_gesture_labels",
    "spikes_to_frames",
    "DVS_GESTURE_CLASSES",
    "CIFAR10_DVS_CLASSES",
]

#: Structured dtype of decoded events (the field names tonic uses).
EVENT_DTYPE = np.dtype([("x", np.int16), ("y", np.int16), ("t", np.int64), ("p", np.int8)])

DVS_GESTURE_CLASSES = (
    "hand clapping", "right hand wave", "left hand wave", "right arm clockwise", "right arm counter clockwise",
    "left arm clockwise", "left arm counter clockwise", "arm roll", "air drums", "air guitar", "other gestures",
)
CIFAR10_DVS_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)


def _events(x, y, t, p) -> np.ndarray:
    ev = np.empty(len(t), dtype=EVENT_DTYPE)
    ev["x"], ev["y"], ev["t"], ev["p"] = x, y, t, p
    return ev


def _missing(name: str, root: str, layout: str, source: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{name} not found under {root!r}. Expected layout:\n{layout}\n"
        f"Nothing is downloaded automatically. Get the files from {source}, "
        "unpack them as shown and pass root=<that directory>."
    )


# --------------------------------------------------------------------------------------------------------
# Format readers
# --------------------------------------------------------------------------------------------------------
def read_nmnist_bin(path: str) -> np.ndarray:
    """Decode an N-MNIST / N-Caltech101 ``.bin`` file (Orchard et al.'s 40-bit ATIS event format).

    Each event is 5 bytes: ``x`` (byte 0), ``y`` (byte 1), polarity (MSB of byte 2; 1 = ON) and a 23-bit
    timestamp in microseconds (low 7 bits of byte 2, then bytes 3 and 4, big-endian). An event with
    ``y == 240`` is a timestamp-overflow marker: it is dropped and adds 2**13 us to every later event
    (as in the dataset's reference reader; plain N-MNIST files contain none).
    """
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size % 5:
        raise ValueError(f"{path}: size {raw.size} is not a multiple of 5 bytes (not an N-MNIST .bin file)")
    raw = raw.reshape(-1, 5)
    x, y = raw[:, 0], raw[:, 1]
    p = raw[:, 2] >> 7
    t = ((raw[:, 2].astype(np.int64) & 0x7F) << 16) | (raw[:, 3].astype(np.int64) << 8) | raw[:, 4]
    overflow = y == 240
    if overflow.any():
        t = t + (np.cumsum(overflow) << 13)
        keep = ~overflow
        x, y, t, p = x[keep], y[keep], t[keep], p[keep]
    return _events(x, y, t, p)


_AEDAT3_HEADER = struct.Struct("<hhiiiiii")  # type, source, size, tsOffset, tsOverflow, capacity, number, valid
# a packet that runs past the end of the file is taken for a cut-off recording only if its header is
# plausible (a libcaer event, a DAVIS frame included, is under 8 MB; a packet holds far fewer than 2**24);
# otherwise the header is corrupt and the rest of the file is not read as events
_AEDAT3_MAX_EVENT, _AEDAT3_MAX_CAPACITY = 1 << 23, 1 << 24


def read_aedat3(path: str) -> np.ndarray:
    """Polarity events of an AEDAT 3.1 file (e.g. DVS128 Gesture ``user*_*.aedat``).

    After the ASCII header (lines starting with ``#``, ending with ``#!END-HEADER\\r\\n``) come packets: a
    28-byte little-endian header (eventType int16, eventSource int16, eventSize int32, eventTSOffset
    int32, eventTSOverflow int32, eventCapacity int32, eventNumber int32, eventValid int32), then
    ``eventCapacity * eventSize`` bytes. Packets of type 1 (polarity) hold 8-byte events: uint32 data (bit
    0 valid, bit 1 polarity, bits 2-16 y, bits 17-31 x) and int32 timestamp; the full timestamp is
    ``eventTSOverflow << 31 | timestamp`` (microseconds). Invalid events and other packet types are skipped.
    A file cut off inside its last packet gives the events written completely, with a warning.
    """
    with open(path, "rb") as f:
        raw = f.read()
    _check_aedat_version(path, raw, 3, "read_aedat3 reads AEDAT 3.1 (DVS128 Gesture)")
    pos = 0
    if raw.startswith(b"#"):
        end = raw.find(b"#!END-HEADER")
        if end < 0:
            raise ValueError(f"{path}: AEDAT 3 header has no '#!END-HEADER' line")
        pos = raw.index(b"\n", end) + 1
    pol_dtype = np.dtype([("data", "<u4"), ("ts", "<i4")])
    pieces: List[Tuple[np.ndarray, int]] = []
    while pos + _AEDAT3_HEADER.size <= len(raw):
        etype, _src, esize, _tsoff, tsover, capacity, number, _valid = _AEDAT3_HEADER.unpack_from(raw, pos)
        pos += _AEDAT3_HEADER.size
        length = capacity * esize
        past_end = pos + length > len(raw)
        if esize <= 0 or capacity < 0 or number < 0 or (
                past_end and (esize > _AEDAT3_MAX_EVENT or capacity > _AEDAT3_MAX_CAPACITY)):
            raise ValueError(f"{path}: corrupt AEDAT 3 packet header at byte {pos - _AEDAT3_HEADER.size}")
        number = min(number, capacity)
        if past_end:
            # a recording cut off in its last packet (a full disk, a killed logger): keep the events that
            # were written completely, as other AEDAT readers do, and say so
            whole = (len(raw) - pos) // esize
            warnings.warn(
                f"{path}: the file ends inside its last AEDAT 3 packet ({min(whole, number)} of {number} events "
                f"complete); the complete ones are kept", stacklevel=2,
            )
            number = min(number, whole)
            length = len(raw) - pos
        if etype == 1 and number > 0:
            if esize != 8:
                raise ValueError(f"{path}: polarity events of {esize} bytes (expected 8)")
            ev = np.frombuffer(raw, dtype=pol_dtype, count=number, offset=pos)
            pieces.append((ev, tsover))
        pos += length
    if not pieces:
        return np.empty(0, dtype=EVENT_DTYPE)
    data = np.concatenate([e["data"] for e, _ in pieces])
    ts = np.concatenate([(np.int64(o) << 31) | e["ts"].astype(np.int64) for e, o in pieces])
    valid = (data & 1).astype(bool)
    data, ts = data[valid], ts[valid]
    return _events((data >> 17) & 0x7FFF, (data >> 2) & 0x7FFF, ts, (data >> 1) & 1)


_AEDAT2_SPECIAL = 0x8000 | 0x80000000  # jAER: a sync (external input) event, or a special event
_AEDAT_VERSION = re.compile(rb"#!AER-DAT(\d+)\.(\d+)")


def _check_aedat_version(path: str, raw: bytes, major: int, what: str) -> None:
    """Refuse a file whose first header line names an AEDAT major version other than ``major`` (a file
    without that line is taken as the expected version, as jAER and libcaer write it first)."""
    found = _AEDAT_VERSION.match(raw, 0, 32)
    if found is None or int(found.group(1)) == major:
        return
    version = f"{int(found.group(1))}.{int(found.group(2))}"
    hint = {
        2: "read it with read_aedat2",
        3: "read it with read_aedat3",
        4: "AEDAT 4 (the .aedat4 files of tonic's copy of CIFAR10-DVS, DV software recordings) is not "
           "supported: use the original AEDAT 2.0 release of the dataset, or convert the file with the "
           "DV software",
    }.get(int(found.group(1)), "this version is not supported")
    raise ValueError(f"{path}: the header says AEDAT {version}, but {what}; {hint}.")


def read_gesture_labels(path: str) -> np.ndarray:
    """``*_labels.csv`` of DVS128 Gesture: rows ``class, startTime_usec, endTime_usec`` (classes 1..11).
    Returns an int64 array ``[n, 3]`` with the class made 0-based."""
    rows = []
    with open(path, newline="") as f:
        for row in csv.reader(f):
            if not row or not row[0].strip().lstrip("-").isdigit():
                continue  # header line
            rows.append([int(row[0]) - 1, int(row[1]), int(row[2])])
    return np.asarray(rows, dtype=np.int64).reshape(-1, 3)


def read_aedat2(path: str, convention: str = "jaer") -> np.ndarray:
    """Events of a DVS128 AEDAT 2.0 file (e.g. CIFAR10-DVS): ASCII header lines starting with ``#``, then
    big-endian pairs (uint32 address, uint32 timestamp in microseconds).

    Raw DVS128 address bits: ``x = (addr >> 1) & 0x7F``, ``y = (addr >> 8) & 0x7F``, ``bit = addr & 1``;
    addresses with bit 15 or bit 31 set (jAER's sync and special events) are dropped. A file whose
    header names another AEDAT version is refused (AEDAT 4, as in tonic's copy of CIFAR10-DVS, is a
    different, compressed format). ``convention`` maps them:

    * ``"jaer"`` (default): as jAER's DVS128 extractor and the CAVIAR ``dat2mat.m`` read them:
      ``x = 127 - raw_x``, ``y = raw_y``, ``p = 1 - bit`` (the address bit is 0 for ON events);
    * ``"raw"``: the bits as they are, ``p = bit``;
    * ``"spikingjelly"``: SpikingJelly's CIFAR10-DVS orientation, ``x = 127 - raw_y``,
      ``y = 127 - raw_x``, ``p = 1 - bit`` (transposed and mirrored relative to ``"jaer"``).
    Some tools show CIFAR10-DVS mirrored; pick the convention that matches models you compare with.
    """
    with open(path, "rb") as f:
        raw = f.read()
    _check_aedat_version(path, raw, 2, "read_aedat2 reads AEDAT 2.0 (the CIFAR10-DVS files on figshare)")
    pos = 0
    while raw.startswith(b"#", pos):
        nl = raw.find(b"\n", pos)
        if nl < 0:
            raise ValueError(f"{path}: unterminated AEDAT 2 header line")
        pos = nl + 1
    n = (len(raw) - pos) // 8
    words = np.frombuffer(raw, dtype=">u4", count=2 * n, offset=pos).reshape(n, 2)
    addr, ts = words[:, 0].astype(np.int64), words[:, 1].astype(np.int64)
    keep = (addr & _AEDAT2_SPECIAL) == 0
    addr, ts = addr[keep], ts[keep]
    rx, ry, bit = (addr >> 1) & 0x7F, (addr >> 8) & 0x7F, addr & 1
    if convention == "raw":
        return _events(rx, ry, ts, bit)
    if convention == "jaer":
        return _events(127 - rx, ry, ts, 1 - bit)
    if convention == "spikingjelly":
        return _events(127 - ry, 127 - rx, ts, 1 - bit)
    raise ValueError(f"convention must be 'jaer', 'raw' or 'spikingjelly', got {convention!r}")


def spikes_to_frames(
    times: np.ndarray,
    units: np.ndarray,
    T: int,
    n_units: int = 700,
    *,
    t_start: float = 0.0,
    duration: Optional[float] = None,
    split_by: str = "time",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Bin spikes (``times``, channel ``units``) into counts ``[T, n_units]``. With ``duration=None`` the
    bins span ``[t_start, last spike]``; otherwise ``T`` windows of ``duration / T`` (later spikes dropped)."""
    units = np.asarray(units).astype(np.int64)
    bins, keep = time_bins(np.asarray(times), T, t_start=t_start, duration=duration, split_by=split_by)
    units = units[keep]
    ok = (units >= 0) & (units < n_units)
    counts = np.bincount(bins[ok] * n_units + units[ok], minlength=T * n_units).astype(np.float32)
    return torch.from_numpy(counts).view(T, n_units).to(dtype)


# --------------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------------
class EventDataset(Dataset):
    """Base class: ``(frames, label)`` per sample, frames binned on access.

    Subclasses set ``self.targets`` (list of int) and implement :meth:`events` and :meth:`frames`.
    ``cache_dir`` (optional) keeps each sample's frames as ``<cache_dir>/<name>_<hash>/<id>.pt`` after the
    first access, where ``hash`` names the binning settings and ``id`` the sample's source (its file, size,
    modification time, and the sample's place in it), so that a changed file or file list is never served
    another sample's frames; nothing is written to disk without it.
    """

    sensor_size: Tuple[int, int] = (0, 0)

    def __init__(
        self,
        T: int,
        duration: Optional[float],
        split_by: str,
        transform: Optional[Callable] = None,
        target_transform: Optional[Callable] = None,
        cache_dir: Optional[str] = None,
    ):
        if isinstance(T, bool) or not isinstance(T, (int, np.integer)) or T < 1:
            raise ValueError(f"T must be a positive int (time bins per sample), got {T!r}")
        if duration is not None and (isinstance(duration, bool) or not isinstance(duration, (int, float, np.number))
                                     or not 0 < duration < float("inf")):
            raise ValueError(f"duration must be a positive number (the window binned into T bins) or None, got "
                             f"{duration!r}")
        if split_by not in ("time", "number"):
            raise ValueError(f"split_by must be 'time' or 'number', got {split_by!r}")
        self.T = int(T)
        self.duration = duration
        self.split_by = split_by
        self.transform = transform
        self.target_transform = target_transform
        self.cache_dir = cache_dir
        self.targets: List[int] = []

    @property
    def frames_per_sample(self) -> int:
        return self.T

    def __len__(self) -> int:
        return len(self.targets)

    def events(self, i: int) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def frames(self, i: int) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _cache_key(self) -> dict:
        return {"T": self.T, "duration": self.duration, "split_by": self.split_by}

    def _source(self, i: int) -> Tuple[Optional[str], Any]:
        """Sample ``i``'s file and its place in that file (``None``: the whole file). A subclass without
        ``files`` gets ``(None, i)``, frames cached by index: override it to name each sample's source."""
        files = getattr(self, "files", None)
        return (files[i], None) if files is not None else (None, i)

    def _cache_file(self, i: int) -> Optional[str]:
        if self.cache_dir is None:
            return None
        key = dict(self._cache_key(), cls=type(self).__name__)
        digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
        path, place = self._source(i)
        source: List[Any] = [place]
        if path is not None:
            stat = os.stat(path)
            source += [os.path.abspath(path), stat.st_size, stat.st_mtime_ns]
        sample = hashlib.sha1(json.dumps(source, default=str).encode()).hexdigest()[:16]
        return os.path.join(os.path.expanduser(self.cache_dir), f"{type(self).__name__}_{digest}", f"{sample}.pt")

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, Any]:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        path = self._cache_file(i)
        if path is not None and os.path.exists(path):
            frames = torch.load(path)
        else:
            frames = self.frames(i)
            if path is not None:
                save_atomically(frames, path)
        label = self.targets[i]
        if self.transform is not None:
            frames = self.transform(frames)
        if self.target_transform is not None:
            label = self.target_transform(label)
        return frames, label


class _CameraDataset(EventDataset):
    """Shared binning for the event-camera sets: ``size`` output pixels (default: the sensor's)."""

    def __init__(self, T, size, duration, split_by, transform, target_transform, cache_dir):
        super().__init__(T, duration, split_by, transform, target_transform, cache_dir)
        self.size = _pair(size) if size is not None else tuple(self.sensor_size)
        if min(self.size) < 1:
            raise ValueError(f"size must be a positive output height (= width) or (H, W), got {size!r}")

    def _cache_key(self) -> dict:
        return dict(
            super()._cache_key(), size=self.size)

    def _bin(self, ev: np.ndarray, t_start=None, duration=None) -> torch.Tensor:
        return to_frames(
            ev, self.T, self.size, sensor_size=self.sensor_size, t_start=t_start,
            duration=duration, split_by=self.split_by,
        )

    def frames(self, i: int) -> torch.Tensor:
        return self._bin(self.events(i), duration=self.duration)


class NMNIST(_CameraDataset):
    """N-MNIST (Orchard et al., 2015): 34x34 ATIS recordings of MNIST digits, 60000 train / 10000 test.

    Layout: ``root/Train/<digit>/*.bin`` and ``root/Test/<digit>/*.bin`` (the unzipped ``Train.zip`` and
    ``Test.zip``). Files are read on access.

    :param T: time bins per sample (``frames_per_sample``).
    :param size: output ``H = W`` (or ``(H, W)``); default 34. Smaller sizes sum pixel blocks.
    :param duration: ``None``: ``T`` bins over each recording (first to last event); else fixed windows of
        ``duration / T`` microseconds from the first event.
    :return item: ``(frames [T, 2, H, W] float32, label int)``.
    """

    sensor_size = (34, 34)
    LAYOUT = "  <root>/Train/0/*.bin ... <root>/Train/9/*.bin\n  <root>/Test/0/*.bin ... <root>/Test/9/*.bin"
    SOURCE = "https://www.garrickorchard.com/datasets/n-mnist (Train.zip, Test.zip)"

    def __init__(
        self,
        root: str,
        train: bool = True,
        T: int = 10,
        size: Optional[Union[int, Sequence[int]]] = None,
        duration: Optional[float] = None,
        split_by: str = "time",
        transform: Optional[Callable] = None,
        target_transform: Optional[Callable] = None,
        cache_dir: Optional[str] = None,
    ):
        super().__init__(T, size, duration, split_by, transform, target_transform, cache_dir)
        self.root = os.path.expanduser(root)
        self.train = bool(train)
        split = "Train" if train else "Test"
        base = next(
            (os.path.join(self.root, s) for s in (split, split.lower()) if os.path.isdir(os.path.join(self.root, s))),
            None,
        )
        self.files: List[str] = []
        if base is not None:
            for digit in range(10):
                found = sorted(glob.glob(os.path.join(base, str(digit), "*.bin")))
                self.files += found
                self.targets += [digit] * len(found)
        if not self.files:
            raise _missing(f"N-MNIST {split} set", self.root, self.LAYOUT, self.SOURCE)

    def events(self, i: int) -> np.ndarray:
        return read_nmnist_bin(self.files[i])


class SHD(EventDataset):
    """Spiking Heidelberg Digits (Cramer et al., 2020): 700-channel spike trains of spoken digits, 20
    classes (8156 train / 2264 test). Loaded into memory from ``root/shd_train.h5`` / ``root/shd_test.h5``
    (``spikes/times`` in seconds and ``spikes/units`` per sample, ``labels``); needs ``h5py``.

    :param duration: ``None``: ``T`` bins over ``[0, last spike]`` of each sample; else ``T`` windows of
        ``duration / T`` seconds from 0 (e.g. ``duration=1.0``; later spikes are dropped).
    :param file: another file name in ``root`` of the same format (e.g. ``ssc_train.h5`` with
        ``n_units=700`` for the Spiking Speech Commands).
    :return item: ``(frames [T, 700] float32 spike counts, label int)``.
    """

    LAYOUT = "  <root>/shd_train.h5\n  <root>/shd_test.h5"
    SOURCE = (
        "https://zenkelab.org/resources/spiking-heidelberg-datasets-shd/ "
        "(shd_train.h5 and shd_test.h5, each packed as .zip or .gz)"
    )

    def __init__(
        self,
        root: str,
        train: bool = True,
        T: int = 100,
        duration: Optional[float] = None,
        n_units: int = 700,
        split_by: str = "time",
        transform: Optional[Callable] = None,
        target_transform: Optional[Callable] = None,
        cache_dir: Optional[str] = None,
        file: Optional[str] = None,
    ):
        super().__init__(T, duration, split_by, transform, target_transform, cache_dir)
        self.root = os.path.expanduser(root)
        self.n_units = int(n_units)
        self.path = os.path.join(self.root, file or ("shd_train.h5" if train else "shd_test.h5"))
        if not os.path.isfile(self.path):
            raise _missing(f"SHD ({os.path.basename(self.path)})", self.root, self.LAYOUT, self.SOURCE)
        try:
            import h5py
        except ImportError as e:  # pragma: no cover - h5py is in install.sh
            raise ImportError("Reading SHD needs h5py: pip install snn-localrules[data] (or h5py)") from e
        try:
            with h5py.File(self.path, "r") as f:
                self.times = [np.asarray(a) for a in f["spikes"]["times"][:]]
                self.units = [np.asarray(a) for a in f["spikes"]["units"][:]]
                self.targets = [int(v) for v in np.asarray(f["labels"][:])]
        except (OSError, KeyError) as error:
            raise ValueError(
                f"{self.path} is not an SHD HDF5 file with spikes/times, spikes/units and labels ({error}); if "
                "it is still packed (.gz, .zip), unpack it first."
            ) from error
        if not len(self.times) == len(self.units) == len(self.targets):
            raise ValueError(f"{self.path}: spikes/times, spikes/units and labels differ in length")

    def _cache_key(self) -> dict:
        return dict(super()._cache_key(), n_units=self.n_units)

    def _source(self, i: int) -> Tuple[str, Any]:
        return self.path, i

    def events(self, i: int) -> np.ndarray:
        """Spikes of sample ``i`` as a structured array with fields ``t`` (seconds) and ``unit``."""
        ev = np.empty(len(self.times[i]), dtype=[("t", np.float64), ("unit", np.int64)])
        ev["t"], ev["unit"] = self.times[i], self.units[i]
        return ev

    def frames(self, i: int) -> torch.Tensor:
        return spikes_to_frames(
            self.times[i], self.units[i], self.T, self.n_units, t_start=0.0,
            duration=self.duration, split_by=self.split_by,
        )


class DVSGesture(_CameraDataset):
    """DVS128 Gesture (Amir et al., 2017): 11 hand gestures by 29 subjects, 128x128 DVS128, AEDAT 3.1.

    Layout (the unpacked ``DvsGesture.tar.gz``): ``root/user01_fluorescent.aedat`` with
    ``root/user01_fluorescent_labels.csv`` (``class, startTime_usec, endTime_usec``) and so on, plus
    ``trials_to_train.txt`` / ``trials_to_test.txt``; without those lists users 1-23 are train and 24-29
    test. ``root`` may also be the folder that contains ``DvsGesture/``. One sample per row of the label
    files (the paper counts 1342 gesture instances; SpikingJelly's loader, one sample per row too, counts
    1176 train and 288 test samples); a file's events are parsed on access and the last ``cache_files``
    files kept.

    :param size: output ``H = W``; default 128, e.g. 32 sums 4x4 pixel blocks (any size works; sizes that
        do not divide 128 are area-resized, see :func:`~snn_localrules.data.events.to_frames`).
    :param duration: ``None``: ``T`` bins over the labelled interval ``[start, end)``; else ``T`` windows
        of ``duration / T`` us from its start.
    :return item: ``(frames [T, 2, size, size] float32, label int 0..10)``.
    """

    sensor_size = (128, 128)
    LAYOUT = (
        "  <root>/user01_fluorescent.aedat, <root>/user01_fluorescent_labels.csv, ... (user01..user29)\n"
        "  <root>/trials_to_train.txt, <root>/trials_to_test.txt (optional)"
    )
    SOURCE = "https://research.ibm.com/interactive/dvsgesture/ (DvsGesture.tar.gz)"

    def __init__(
        self,
        root: str,
        train: bool = True,
        T: int = 16,
        size: Optional[Union[int, Sequence[int]]] = None,
        duration: Optional[float] = None,
        split_by: str = "time",
        transform: Optional[Callable] = None,
        target_transform: Optional[Callable] = None,
        cache_dir: Optional[str] = None,
        cache_files: int = 2,
    ):
        super().__init__(T, size, duration, split_by, transform, target_transform, cache_dir)
        root = os.path.expanduser(root)
        if not glob.glob(os.path.join(root, "user*_*.aedat")) and os.path.isdir(os.path.join(root, "DvsGesture")):
            root = os.path.join(root, "DvsGesture")
        self.root = root
        self.train = bool(train)
        trial_list = os.path.join(root, "trials_to_train.txt" if train else "trials_to_test.txt")
        if os.path.isfile(trial_list):
            with open(trial_list) as f:
                names = [ln.strip() for ln in f if ln.strip()]
        else:
            names = []
            for path in sorted(glob.glob(os.path.join(root, "user*_*.aedat"))):
                m = re.match(r"user(\d+)_", os.path.basename(path))
                if m and (int(m.group(1)) <= 23) == train:
                    names.append(os.path.basename(path))
        self.samples: List[Tuple[str, int, int]] = []  # (file, start_us, end_us)
        absent = []
        for name in names:
            path = os.path.join(root, name)
            labels = path[: -len(".aedat")] + "_labels.csv"
            if not (os.path.isfile(path) and os.path.isfile(labels)):
                absent.append(name)
                continue
            for cls, start, end in read_gesture_labels(labels):
                self.samples.append((path, int(start), int(end)))
                self.targets.append(int(cls))
        if not self.samples:
            split = "train" if train else "test"
            raise _missing(f"DVS128 Gesture ({split} trials)", root, self.LAYOUT, self.SOURCE)
        if absent:  # a partly unpacked archive
            warnings.warn(
                f"DVS128 Gesture: {len(absent)} of the {len(names)} trials listed are missing their .aedat or "
                f"_labels.csv file under {root!r} (e.g. {absent[0]}) and are left out; unpack the whole "
                "DvsGesture.tar.gz to use them.", UserWarning, stacklevel=2,
            )
        self.cache_files = max(1, int(cache_files))
        self._file_cache: "collections.OrderedDict[str, np.ndarray]" = collections.OrderedDict()

    def _file_events(self, path: str) -> np.ndarray:
        if path in self._file_cache:
            self._file_cache.move_to_end(path)
            return self._file_cache[path]
        ev = read_aedat3(path)
        self._file_cache[path] = ev
        while len(self._file_cache) > self.cache_files:
            self._file_cache.popitem(last=False)
        return ev

    def _source(self, i: int) -> Tuple[str, Any]:
        path, start, end = self.samples[i]
        return path, (start, end)

    def events(self, i: int) -> np.ndarray:
        path, start, end = self.samples[i]
        ev = self._file_events(path)
        return ev[(ev["t"] >= start) & (ev["t"] < end)]

    def frames(self, i: int) -> torch.Tensor:
        _, start, end = self.samples[i]
        duration = self.duration if self.duration is not None else end - start
        return self._bin(self.events(i), t_start=start, duration=duration)


class CIFAR10DVS(_CameraDataset):
    """CIFAR10-DVS (Li et al., 2017): 10000 CIFAR-10 images (1000 per class) recorded by a moving DVS128,
    AEDAT 2.0 files, 128x128, 10 classes. There is no official split: ``train=None`` gives all samples,
    ``train=True`` the first ``train_fraction`` of each class (files in numeric order), ``False`` the rest.

    Layout: ``root/<class>/*.aedat`` with the classes ``airplane automobile bird cat deer dog frog horse
    ship truck`` (the unzipped per-class archives; ``root`` may also contain ``CIFAR10-DVS/``).

    :param size: output ``H = W``; default 128; ``48`` for the VGG-9 setting (128 -> 48 is not an integer
        factor, so the full-resolution counts are area-resampled: each event counts once, the total is kept).
    :param convention: address decoding, see :func:`read_aedat2` (default ``"jaer"``).
    :return item: ``(frames [T, 2, size, size] float32, label int 0..9)``.
    """

    sensor_size = (128, 128)
    LAYOUT = "  <root>/airplane/*.aedat, <root>/automobile/*.aedat, ..., <root>/truck/*.aedat"
    SOURCE = "https://figshare.com/articles/dataset/CIFAR10-DVS_New/4724671 (one zip per class)"

    def __init__(
        self,
        root: str,
        train: Optional[bool] = None,
        T: int = 10,
        size: Optional[Union[int, Sequence[int]]] = None,
        duration: Optional[float] = None,
        split_by: str = "time",
        train_fraction: float = 0.9,
        convention: str = "jaer",
        transform: Optional[Callable] = None,
        target_transform: Optional[Callable] = None,
        cache_dir: Optional[str] = None,
    ):
        super().__init__(T, size, duration, split_by, transform, target_transform, cache_dir)
        if not 0.0 < train_fraction <= 1.0:
            raise ValueError(f"train_fraction must be in (0, 1], got {train_fraction!r}")
        if convention not in ("jaer", "raw", "spikingjelly"):
            raise ValueError(f"convention must be 'jaer', 'raw' or 'spikingjelly', got {convention!r}")
        root = os.path.expanduser(root)
        if not os.path.isdir(os.path.join(root, CIFAR10_DVS_CLASSES[0])):
            for sub in ("CIFAR10-DVS", "CIFAR10DVS", "cifar10-dvs"):
                if os.path.isdir(os.path.join(root, sub, CIFAR10_DVS_CLASSES[0])):
                    root = os.path.join(root, sub)
                    break
        self.root = root
        self.train = train
        self.convention = convention
        self.files: List[str] = []
        missing = []

        def number(path: str):
            digits = re.findall(r"\d+", os.path.basename(path))
            return (int(digits[-1]) if digits else -1, os.path.basename(path))

        for label, cls in enumerate(CIFAR10_DVS_CLASSES):
            found = sorted(glob.glob(os.path.join(root, cls, "*.aedat")), key=number)
            if not found:
                missing.append(cls)
                continue
            n_train = int(round(train_fraction * len(found)))
            if train is True:
                found = found[:n_train]
            elif train is False:
                found = found[n_train:]
            self.files += found
            self.targets += [label] * len(found)
        if missing:
            if glob.glob(os.path.join(root, "*", "*.aedat4")):
                raise ValueError(
                    f"CIFAR10-DVS under {root!r} holds .aedat4 files (AEDAT 4, the copy tonic downloads), "
                    f"which this reader does not decode. Get the original AEDAT 2.0 files from "
                    f"{self.SOURCE} and unpack them as:\n{self.LAYOUT}"
                )
            raise _missing(
                f"CIFAR10-DVS (no .aedat files for {', '.join(missing)})", root, self.LAYOUT, self.SOURCE
            )

    def _cache_key(self) -> dict:
        return dict(super()._cache_key(), convention=self.convention)

    def events(self, i: int) -> np.ndarray:
        return read_aedat2(self.files[i], self.convention)
