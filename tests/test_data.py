"""Offline event data: the saccade simulator, binning, and the readers of real event-dataset formats.

The real formats are tested on small files written here by writers that follow the format descriptions
directly (byte packing by hand), independently of the readers under test.
"""
import gzip
import os
import struct
from collections import Counter

import numpy as np
import pytest
import torch

from snn_localrules.data import (
    CIFAR10DVS,
    DVSGesture,
    NMNIST,
    SHD,
    load_nmnist5k_events,
    read_aedat2,
    read_aedat3,
    read_nmnist_bin,
    saccade_events,
    to_frames,
)
from snn_localrules.data.events import (
    fashion_mnist_dir,
    load_fashion_events,
    load_fashion_mnist,
    read_idx,
    time_bins,
)


def expected_frames(xs, ys, ps, bins, T, H, W, scale=1):
    """Counts by plain Python loops: [T, 2, H, W]."""
    out = torch.zeros(T, 2, H, W)
    for x, y, p, b in zip(xs, ys, ps, bins):
        out[b, p, y // scale, x // scale] += 1
    return out


# --------------------------------------------------------------------------------------------------------
# saccade simulator
# --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    from snn_localrules.data import load_mnist5k

    (x, y), _ = load_mnist5k()
    return x[:64], y[:64]


def test_saccade_shape_counts_polarities(digits):
    x, _ = digits
    ev = saccade_events(x, T=10)
    assert ev.shape == (10, 64, 2, 34, 34) and ev.dtype == torch.float32
    assert (ev >= 0).all() and torch.equal(ev, ev.round())
    per_sample = ev.sum(dim=(0, 2, 3, 4))
    assert (per_sample > 500).all()
    assert ev[:, :, 0].sum() > 0.2 * ev.sum() and ev[:, :, 1].sum() > 0.2 * ev.sum()  # OFF and ON
    assert (ev.sum(dim=(1, 2, 3, 4)) > 0).all()  # every time bin has events
    # [N, 1, H, W] input and sample-first output give the same counts
    ev_nt = saccade_events(x.unsqueeze(1) if x.dim() == 3 else x, T=10, time_first=False)
    assert torch.equal(ev_nt, ev.transpose(0, 1))


def test_saccade_events_follow_edges():
    img = torch.zeros(1, 28, 28)
    img[0, 6:22, 6:22] = 1.0  # bright square: edges move, its interior and the background do not change
    ev = saccade_events(img, T=8, noise=0.0)[:, 0].sum(dim=(0, 1))  # [34, 34] events per pixel
    inside = ev[3 + 11 : 3 + 17, 3 + 11 : 3 + 17]  # more than 3 px (the saccade amplitude) from any edge
    background = ev[:4, :]
    edge_band = ev[3 + 4 : 3 + 9, 3 + 8 : 3 + 20]  # straddles the top edge of the square
    assert inside.sum() == 0 and background.sum() == 0
    assert edge_band.mean() > 3


def test_saccade_deterministic_and_seeded(digits):
    x, _ = digits
    a = saccade_events(x[:16], T=6, seed=3)
    assert torch.equal(a, saccade_events(x[:16], T=6, seed=3))
    assert torch.equal(a, saccade_events(x[:16], T=6, seed=3, chunk_size=5))  # independent of chunking
    b = saccade_events(x[:16], T=6, seed=4)
    assert not torch.equal(a, b)
    assert abs(a.sum().item() - b.sum().item()) < 0.1 * a.sum().item()  # same statistics
    u8 = saccade_events(x[:16], T=6, seed=3, dtype=torch.uint8)
    assert u8.dtype == torch.uint8 and torch.equal(u8.float(), a)


def test_a_still_image_emits_nothing_even_with_strong_threshold_mismatch(digits):
    """A pixel whose OFF threshold is under half its ON one must not fire at the first step (it did: 1090
    OFF events, no ON, from 64 still digits at threshold_sigma=0.04)."""
    x, _ = digits
    for seed in (0, 3):
        assert saccade_events(x, T=10, amplitude=0, noise=0.0, threshold_sigma=0.04, seed=seed).sum() == 0


def test_uint8_counts_saturate_with_background_noise(digits):
    x, _ = digits
    options = dict(T=10, threshold=0.002, noise=0.5, seed=1)
    counts = saccade_events(x[:8], **options)
    assert (counts > 255).any()  # this setting does exceed a byte
    assert torch.equal(saccade_events(x[:8], dtype=torch.uint8, **options).float(), counts.clamp(max=255))


def test_saccade_blank_image():
    blank = torch.zeros(4, 28, 28)
    ev = saccade_events(blank, T=10)
    assert ev.sum() <= 0.01 * ev.numel()  # only the sparse background noise
    assert saccade_events(blank, T=10, noise=0.0).sum() == 0
    grey = torch.full((2, 28, 28), 0.5)  # a uniform image moving inside a dark frame: events at borders only
    ev = saccade_events(grey, T=5, noise=0.0)[:, 0].sum(dim=(0, 1))
    assert ev[12:22, 12:22].sum() == 0 and ev.sum() > 0


def test_saccade_jitter_changes_paths(digits):
    x, _ = digits
    a = saccade_events(x[:8], T=4, noise=0.0, jitter=1.0, seed=1)
    b = saccade_events(x[:8], T=4, noise=0.0, seed=1)
    assert a.shape == b.shape and not torch.equal(a, b)
    assert abs(a.sum().item() - b.sum().item()) < 0.2 * b.sum().item()


def test_load_nmnist5k_events_splits():
    (x_tr, y_tr), (x_te, y_te) = load_nmnist5k_events()
    assert x_tr.shape == (4000, 10, 2, 34, 34) and x_te.shape == (1000, 10, 2, 34, 34)
    assert y_tr.shape == (4000,) and y_te.shape == (1000,) and y_tr.dtype == torch.int64
    assert Counter(y_tr.tolist()) == {c: 400 for c in range(10)}
    assert Counter(y_te.tolist()) == {c: 100 for c in range(10)}
    assert (x_tr[:50].sum(dim=(1, 2, 3, 4)) > 0).all() and (x_te[-50:].sum(dim=(1, 2, 3, 4)) > 0).all()


# --------------------------------------------------------------------------------------------------------
# binning
# --------------------------------------------------------------------------------------------------------
def test_time_bins_and_to_frames():
    t = np.array([0, 50, 100], dtype=np.int64)
    assert time_bins(t, 2)[0].tolist() == [0, 1, 1]  # last event is in the last bin
    b, keep = time_bins(t, 2, duration=100)
    assert b.tolist() == [0, 1] and keep.tolist() == [True, True, False]
    assert time_bins(np.arange(10), 5, split_by="number")[0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    # SpikingJelly's grouping: n // T events a group, the remainder in the last; the same window as "time"
    assert time_bins(np.arange(10), 4, split_by="number")[0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 3, 3]
    assert time_bins(np.arange(3), 4, split_by="number")[0].tolist() == [3, 3, 3]
    b, keep = time_bins(np.array([5, 1, 9, 3, 7]), 2, t_start=2, duration=6, split_by="number")
    assert keep.tolist() == [True, False, False, True, True] and b.tolist() == [1, 0, 1]
    ev = {"x": np.array([0, 3, 3, 2]), "y": np.array([1, 0, 0, 3]), "t": np.array([0, 10, 11, 39]),
          "p": np.array([1, 0, 0, 1])}
    fr = to_frames(ev, 4, 4)
    assert torch.equal(fr, expected_frames(ev["x"], ev["y"], ev["p"], [0, 1, 1, 3], 4, 4, 4))
    fr2 = to_frames(ev, 4, 2, sensor_size=4)
    assert torch.equal(fr2, expected_frames(ev["x"], ev["y"], ev["p"], [0, 1, 1, 3], 4, 2, 2, scale=2))
    fr3 = to_frames(ev, 4, 3, sensor_size=4)  # not an integer factor: area resampling
    assert fr3.shape == (4, 2, 3, 3)
    # every event counts once, shared by overlap: of 4 sensor rows laid over 3, row 1 spans [0.75, 1.5),
    # a third in output row 0 and two thirds in row 1; column 0 spans [0, 0.75), all in output column 0
    assert abs(fr3.sum().item() - 4) < 1e-6
    want = torch.tensor([[1 / 3, 0, 0], [2 / 3, 0, 0], [0, 0, 0]])
    assert torch.allclose(fr3[0, 1], want, atol=1e-7) and fr3[0, 0].sum() == 0
    one = {"x": np.array([5]), "y": np.array([2]), "t": np.array([0]), "p": np.array([1])}
    for x in range(128):  # 128 -> 48: each pixel's event sums to exactly one
        one["x"][0] = x
        assert abs(to_frames(one, 1, 48, sensor_size=128).sum().item() - 1) < 1e-5
    assert to_frames({k: v[:0] for k, v in ev.items()}, 3, 4).sum() == 0


# --------------------------------------------------------------------------------------------------------
# N-MNIST
# --------------------------------------------------------------------------------------------------------
def write_nmnist(path, xs, ys, ps, ts):
    with open(path, "wb") as f:
        for x, y, p, t in zip(xs, ys, ps, ts):
            f.write(bytes([x, y, (p << 7) | ((t >> 16) & 0x7F), (t >> 8) & 0xFF, t & 0xFF]))


def random_events(rng, n, size, t_max):
    xs = rng.integers(0, size, n).tolist()
    ys = rng.integers(0, size, n).tolist()
    ps = rng.integers(0, 2, n).tolist()
    ts = sorted(rng.integers(0, t_max, n).tolist())
    return xs, ys, ps, ts


def test_nmnist_reader_and_dataset(tmp_path):
    rng = np.random.default_rng(0)
    samples = {}
    for split, digit, name in [("Train", 3, "00001.bin"), ("Train", 7, "00002.bin"), ("Test", 0, "00003.bin")]:
        os.makedirs(tmp_path / split / str(digit), exist_ok=True)
        xs, ys, ps, ts = random_events(rng, 500, 34, 300_000)
        ts[0], ts[-1] = 0, 299_999  # duration exactly 300 ms
        ts[100] = 5_000_000  # beyond 16 bits: uses the high timestamp bits
        ts = sorted(ts)
        write_nmnist(tmp_path / split / str(digit) / name, xs, ys, ps, ts)
        samples[(split, digit)] = (xs, ys, ps, ts)

    xs, ys, ps, ts = samples[("Train", 3)]
    ev = read_nmnist_bin(str(tmp_path / "Train" / "3" / "00001.bin"))
    assert ev["x"].tolist() == xs and ev["y"].tolist() == ys and ev["p"].tolist() == ps and ev["t"].tolist() == ts

    ds = NMNIST(str(tmp_path), train=True, T=10, duration=300_000)
    assert len(ds) == 2 and ds.targets == [3, 7] and ds.frames_per_sample == 10
    frames, label = ds[0]
    assert label == 3 and frames.shape == (10, 2, 34, 34)
    keep = [i for i, t in enumerate(ts) if t < 300_000]
    want = expected_frames([xs[i] for i in keep], [ys[i] for i in keep], [ps[i] for i in keep],
                           [ts[i] // 30_000 for i in keep], 10, 34, 34)
    assert torch.equal(frames, want)
    # default: T bins over the whole recording; and 2x2 pixel binning
    frames = NMNIST(str(tmp_path), train=True, T=4, size=17)[0][0]
    span = ts[-1] - ts[0]
    want = expected_frames(xs, ys, ps, [min(3, (t - ts[0]) * 4 // span) for t in ts], 4, 17, 17, scale=2)
    assert torch.equal(frames, want)
    test = NMNIST(str(tmp_path), train=False, T=5)
    assert len(test) == 1 and test[0][1] == 0 and test[0][0].sum() == 500
    # optional per-sample frame cache, only where asked
    cached = NMNIST(str(tmp_path), train=False, T=5, cache_dir=str(tmp_path / "cache"))
    first = cached[0][0]
    files = [f for _, _, fs in os.walk(tmp_path / "cache") for f in fs]
    assert len(files) == 1 and torch.equal(cached[0][0], first) and torch.equal(first, test[0][0])
    # a file added to the set moves the others' indices: each is still served its own frames
    train = NMNIST(str(tmp_path), train=True, T=5, cache_dir=str(tmp_path / "cache"))
    seen = [train[i][0] for i in range(len(train))]
    os.makedirs(tmp_path / "Train" / "5", exist_ok=True)
    write_nmnist(tmp_path / "Train" / "5" / "00004.bin", [1, 2], [3, 4], [0, 1], [0, 10])
    again = NMNIST(str(tmp_path), train=True, T=5, cache_dir=str(tmp_path / "cache"))
    plain = NMNIST(str(tmp_path), train=True, T=5)
    assert again.targets == [3, 5, 7] and torch.equal(again[2][0], seen[1])
    assert all(torch.equal(again[i][0], plain[i][0]) for i in range(3))


def test_event_dataset_subclass_without_files_caches_by_index(tmp_path):
    """EventDataset's docstring asks a subclass for targets, events() and frames() only."""
    from snn_localrules.data import EventDataset

    class Synthetic(EventDataset):
        def __init__(self):
            super().__init__(T=4, duration=None, split_by="time", cache_dir=str(tmp_path))
            self.targets = [0, 1, 0]

        def events(self, i):
            rng = np.random.default_rng(i)
            return {"x": rng.integers(0, 8, 50), "y": rng.integers(0, 8, 50),
                    "t": np.sort(rng.integers(0, 1000, 50)), "p": rng.integers(0, 2, 50)}

        def frames(self, i):
            return to_frames(self.events(i), self.T, 8, sensor_size=8)

    ds = Synthetic()
    frames, label = ds[1]
    assert frames.shape == (4, 2, 8, 8) and label == 1 and torch.equal(ds[1][0], ds.frames(1))
    assert len([f for _, _, fs in os.walk(tmp_path) for f in fs]) == 1


def test_processes_filling_one_cache_at_once_do_not_collide(tmp_path):
    """Every writer had the same temporary name (<file>.tmp): a second writer's rename found it moved
    away (FileNotFoundError in 28 of 40 concurrent reads, four processes sharing an SHD cache). Threads
    race the same way."""
    import shutil
    import threading

    write_nmnist(tmp_path / "d.bin", [1, 2, 3], [4, 5, 6], [0, 1, 0], [0, 10, 20])
    os.makedirs(tmp_path / "Test" / "0")
    shutil.copy(tmp_path / "d.bin", tmp_path / "Test" / "0" / "a.bin")
    errors = []
    for _ in range(10):
        cache = tmp_path / "cache"
        shutil.rmtree(cache, ignore_errors=True)
        ds = NMNIST(str(tmp_path), train=False, T=2, cache_dir=str(cache))

        def read():
            try:
                ds[0]
            except Exception as error:  # noqa: BLE001 - collected for the assertion
                errors.append(error)

        threads = [threading.Thread(target=read) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not [f for _, _, fs in os.walk(cache) for f in fs if f.endswith(".tmp")]
    assert not errors, errors[:2]
    # as readable as torch.save makes a file (mkstemp's 0600 had kept a group's shared cache from the group)
    torch.save(torch.zeros(1), tmp_path / "plain.pt")
    cached = next(os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "cache") for f in fs)
    assert os.stat(cached).st_mode & 0o777 == os.stat(tmp_path / "plain.pt").st_mode & 0o777


def test_dataset_settings_that_cannot_work_are_refused_at_construction(tmp_path):
    """They had given all-zero frames (duration 0), a ZeroDivisionError at the first item (size 0), a
    silently truncated T (2.5) and h5py's bare 'file signature not found' for a still-packed SHD file."""
    write_nmnist(tmp_path / "x.bin", [1], [2], [0], [5])
    os.makedirs(tmp_path / "Test" / "0")
    os.replace(tmp_path / "x.bin", tmp_path / "Test" / "0" / "x.bin")
    for bad, message in ((dict(duration=0), "duration must be a positive number"),
                         (dict(duration=-5), "duration must be a positive number"),
                         (dict(size=0), "size must be a positive"), (dict(T=2.5), "T must be a positive int")):
        with pytest.raises(ValueError, match=message):
            NMNIST(str(tmp_path), train=False, **bad)
    pytest.importorskip("h5py")
    (tmp_path / "shd_test.h5").write_bytes(b"\x1f\x8b\x08 not unpacked")
    with pytest.raises(ValueError, match=r"shd_test.h5 is not an SHD HDF5 file.*unpack it first"):
        SHD(str(tmp_path), train=False)


def test_nmnist_overflow_marker(tmp_path):
    write_nmnist(tmp_path / "o.bin", [1, 0, 2], [2, 240, 3], [1, 0, 0], [10, 0, 20])
    ev = read_nmnist_bin(str(tmp_path / "o.bin"))
    assert ev["y"].tolist() == [2, 3] and ev["t"].tolist() == [10, 20 + 2**13]


# --------------------------------------------------------------------------------------------------------
# SHD
# --------------------------------------------------------------------------------------------------------
def test_shd(tmp_path):
    h5py = pytest.importorskip("h5py")
    rng = np.random.default_rng(1)
    times, units, labels = [], [], [4, 19, 0]
    for n in (300, 50, 1):
        k = rng.integers(0, 10, n)  # the bin of each spike with duration=1.0, T=10: mid-bin times
        times.append(np.sort(k * 0.1 + 0.05).astype(np.float32))
        units.append(rng.integers(0, 700, n).astype(np.uint16))
    with h5py.File(tmp_path / "shd_train.h5", "w") as f:
        sp = f.create_group("spikes")
        sp.create_dataset("times", data=np.array(times, dtype=object), dtype=h5py.vlen_dtype(np.float32))
        sp.create_dataset("units", data=np.array(units, dtype=object), dtype=h5py.vlen_dtype(np.uint16))
        f.create_dataset("labels", data=np.array(labels, dtype=np.uint16))
    ds = SHD(str(tmp_path), train=True, T=10, duration=1.0)
    assert len(ds) == 3 and ds.targets == labels
    for i in range(3):
        frames, label = ds[i]
        assert frames.shape == (10, 700) and label == labels[i]
        want = torch.zeros(10, 700)
        for t, u in zip(times[i], units[i]):
            want[int(round(t * 10 - 0.5)), u] += 1
        assert torch.equal(frames, want)
    assert SHD(str(tmp_path), T=7)[1][0].sum() == 50  # default: bins over [0, last spike]
    with pytest.raises(FileNotFoundError, match="shd_test.h5"):
        SHD(str(tmp_path), train=False)


# --------------------------------------------------------------------------------------------------------
# DVS128 Gesture (AEDAT 3.1)
# --------------------------------------------------------------------------------------------------------
def aedat3_packet(etype, events, overflow=0):
    """events: list of (x, y, p, valid, ts) for polarity packets, raw 8-byte records otherwise."""
    body = b""
    for e in events:
        if etype == 1:
            x, y, p, valid, ts = e
            body += struct.pack("<Ii", (x << 17) | (y << 2) | (p << 1) | valid, ts)
        else:
            body += e
    n = len(events)
    return struct.pack("<hhiiiiii", etype, 1, 8, 4, overflow, n, n, n) + body


def write_aedat3(path, packets):
    header = b"#!AER-DAT3.1\r\n#Format: RAW\r\n#Source 1: DVS128\r\n#Start-Time: 2017-01-01\r\n#!END-HEADER\r\n"
    with open(path, "wb") as f:
        f.write(header + b"".join(packets))


def test_aedat3_reader(tmp_path):
    pol = [(5, 7, 1, 1, 100), (127, 0, 0, 1, 200), (3, 3, 1, 0, 250), (0, 127, 0, 1, 300)]
    special = [struct.pack("<Ii", 0xFFFF, 150)]
    write_aedat3(tmp_path / "a.aedat", [aedat3_packet(1, pol), aedat3_packet(0, special),
                                        aedat3_packet(1, [(1, 2, 1, 1, 5)], overflow=1)])
    ev = read_aedat3(str(tmp_path / "a.aedat"))
    assert ev["x"].tolist() == [5, 127, 0, 1] and ev["y"].tolist() == [7, 0, 127, 2]
    assert ev["p"].tolist() == [1, 0, 0, 1] and ev["t"].tolist() == [100, 200, 300, 2**31 + 5]


def test_aedat3_reader_keeps_the_complete_events_of_a_cut_off_file(tmp_path):
    pol = [(5, 7, 1, 1, 100), (6, 8, 0, 1, 200), (7, 9, 1, 1, 300)]
    write_aedat3(tmp_path / "a.aedat", [aedat3_packet(1, pol[:1]), aedat3_packet(1, pol[1:])])
    whole = (tmp_path / "a.aedat").read_bytes()
    (tmp_path / "cut.aedat").write_bytes(whole[:-5])  # the last event's record is incomplete
    with pytest.warns(UserWarning, match="1 of 2 events complete"):
        ev = read_aedat3(str(tmp_path / "cut.aedat"))
    assert ev["x"].tolist() == [5, 6] and ev["t"].tolist() == [100, 200]
    (tmp_path / "bad.aedat").write_bytes(whole[:-(8 + 8 + 28)] + struct.pack("<hhiiiiii", 1, 1, 0, 4, 0, 2, 2, 2))
    with pytest.raises(ValueError, match="corrupt AEDAT 3 packet header"):
        read_aedat3(str(tmp_path / "bad.aedat"))
    # a corrupt header in the middle (an absurd capacity) is no cut-off recording: the rest is not events
    (tmp_path / "mid.aedat").write_bytes(whole[:-(16 + 28)] + struct.pack("<hhiiiiii", 1, 1, 8, 4, 0, 2**30, 2, 2)
                                         + bytes(16))
    with pytest.raises(ValueError, match="corrupt AEDAT 3 packet header"):
        read_aedat3(str(tmp_path / "mid.aedat"))


def test_aedat_readers_refuse_other_versions(tmp_path):
    write_aedat3(tmp_path / "gesture.aedat", [aedat3_packet(1, [(1, 2, 1, 1, 5)])])
    with pytest.raises(ValueError, match=r"AEDAT 3\.1, but read_aedat2 .*read it with read_aedat3"):
        read_aedat2(str(tmp_path / "gesture.aedat"))
    write_aedat2(tmp_path / "cifar.aedat", [1], [2], [0], [5])
    with pytest.raises(ValueError, match=r"AEDAT 2\.0, but read_aedat3 .*read it with read_aedat2"):
        read_aedat3(str(tmp_path / "cifar.aedat"))
    (tmp_path / "new.aedat").write_bytes(b"#!AER-DAT4.0\r\n" + bytes(64))
    with pytest.raises(ValueError, match="AEDAT 4.0.*not supported"):
        read_aedat2(str(tmp_path / "new.aedat"))
    # files without a version line are read as the version asked for
    (tmp_path / "bare.aedat").write_bytes(struct.pack(">II", (2 << 8) | (1 << 1), 5))
    assert read_aedat2(str(tmp_path / "bare.aedat"), convention="raw")["x"].tolist() == [1]


def test_dvs_gesture(tmp_path):
    rng = np.random.default_rng(2)
    written = {}
    for user, name in ((1, "fluorescent"), (2, "led"), (25, "natural")):
        xs, ys, ps, ts = random_events(rng, 400, 128, 3000)
        events = [(x, y, p, 1, t) for x, y, p, t in zip(xs, ys, ps, ts)]
        events.insert(10, (9, 9, 1, 0, ts[10]))  # invalid: must be ignored
        write_aedat3(tmp_path / f"user{user:02d}_{name}.aedat", [aedat3_packet(1, events)])
        with open(tmp_path / f"user{user:02d}_{name}_labels.csv", "w") as f:
            f.write("class,startTime_usec,endTime_usec\n2,0,1000\n11,1000,3000\n")
        written[user] = (xs, ys, ps, ts)
    train = DVSGesture(str(tmp_path), train=True, T=5)  # no trial lists: users 1-23 train
    test = DVSGesture(str(tmp_path), train=False, T=5)
    assert len(train) == 4 and len(test) == 2 and train.targets == [1, 10, 1, 10] and test.targets == [1, 10]
    xs, ys, ps, ts = written[1]
    sel = [i for i, t in enumerate(ts) if 1000 <= t < 3000]
    frames, label = train[1]
    assert label == 10 and frames.shape == (5, 2, 128, 128)
    want = expected_frames([xs[i] for i in sel], [ys[i] for i in sel], [ps[i] for i in sel],
                           [(ts[i] - 1000) * 5 // 2000 for i in sel], 5, 128, 128)
    assert torch.equal(frames, want)
    small = DVSGesture(str(tmp_path), train=True, T=5, size=32)[1][0]
    assert small.shape == (5, 2, 32, 32)
    assert torch.equal(small, expected_frames([xs[i] for i in sel], [ys[i] for i in sel], [ps[i] for i in sel],
                                              [(ts[i] - 1000) * 5 // 2000 for i in sel], 5, 32, 32, scale=4))
    ev = train.events(0)
    assert sorted(ev["t"].tolist()) == sorted(t for t in ts if t < 1000)
    # trial lists, when present, decide the split
    (tmp_path / "trials_to_train.txt").write_text("user25_natural.aedat\n")
    assert len(DVSGesture(str(tmp_path), train=True)) == 2


# --------------------------------------------------------------------------------------------------------
# CIFAR10-DVS (AEDAT 2.0)
# --------------------------------------------------------------------------------------------------------
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_aedat2(path, xs, ys, bits, ts, special=()):
    with open(path, "wb") as f:
        f.write(b"#!AER-DAT2.0\r\n# This is a raw AE data file - do not edit\r\n# Data format is int32 address\r\n")
        for x, y, b, t in zip(xs, ys, bits, ts):
            f.write(struct.pack(">II", (y << 8) | (x << 1) | b, t))
        for addr, t in special:
            f.write(struct.pack(">II", addr, t))


def test_aedat2_reader(tmp_path):
    write_aedat2(tmp_path / "e.aedat", [0, 5, 127], [1, 100, 0], [1, 0, 1], [7, 8, 9],
                 special=[(0x8000, 10), (0x80000000, 11), (0x80000000 | (3 << 8) | (4 << 1), 12)])
    raw = read_aedat2(str(tmp_path / "e.aedat"), convention="raw")
    assert raw["x"].tolist() == [0, 5, 127] and raw["y"].tolist() == [1, 100, 0]
    assert raw["p"].tolist() == [1, 0, 1] and raw["t"].tolist() == [7, 8, 9]
    j = read_aedat2(str(tmp_path / "e.aedat"))  # jAER / dat2mat: x mirrored, address bit 0 = ON
    assert j["x"].tolist() == [127, 122, 0] and j["y"].tolist() == [1, 100, 0] and j["p"].tolist() == [0, 1, 0]
    sj = read_aedat2(str(tmp_path / "e.aedat"), convention="spikingjelly")
    assert sj["x"].tolist() == [126, 27, 127] and sj["y"].tolist() == [127, 122, 0]


def test_cifar10_dvs(tmp_path):
    rng = np.random.default_rng(3)
    written = {}
    for c, cls in enumerate(CLASSES):
        os.makedirs(tmp_path / cls)
        for k in range(2):
            xs, ys, bits, ts = random_events(rng, 200, 128, 10_000)
            write_aedat2(tmp_path / cls / f"cifar10_{cls}_{k}.aedat", xs, ys, bits, ts)
            written[(c, k)] = (xs, ys, bits, ts)
    everything = CIFAR10DVS(str(tmp_path), T=4, convention="raw")
    assert len(everything) == 20 and everything.targets == [c for c in range(10) for _ in range(2)]
    train = CIFAR10DVS(str(tmp_path), train=True, train_fraction=0.5, T=4, convention="raw")
    test = CIFAR10DVS(str(tmp_path), train=False, train_fraction=0.5, T=4, convention="raw")
    assert len(train) == len(test) == 10 and train.files[3].endswith("cat_0.aedat")
    frames, label = train[3]
    xs, ys, bits, ts = written[(3, 0)]
    span = ts[-1] - ts[0]
    want = expected_frames(xs, ys, bits, [min(3, (t - ts[0]) * 4 // span) for t in ts], 4, 128, 128)
    assert label == 3 and torch.equal(frames, want)
    small = CIFAR10DVS(str(tmp_path), T=4, size=48)[0][0]
    assert small.shape == (4, 2, 48, 48) and abs(small.sum().item() - 200) < 20
    os.remove(tmp_path / "truck" / "cifar10_truck_0.aedat")
    os.remove(tmp_path / "truck" / "cifar10_truck_1.aedat")
    with pytest.raises(FileNotFoundError, match="truck"):
        CIFAR10DVS(str(tmp_path))
    # tonic's copy is AEDAT 4: say so rather than "not found"
    aedat4 = tmp_path / "aedat4"
    for cls in CLASSES:
        os.makedirs(aedat4 / cls)
        (aedat4 / cls / "cifar10_0.aedat4").write_bytes(b"#!AER-DAT4.0\r\n")
    with pytest.raises(ValueError, match=r"(?s)\.aedat4 files \(AEDAT 4.*figshare"):
        CIFAR10DVS(str(aedat4))


# --------------------------------------------------------------------------------------------------------
# missing files
# --------------------------------------------------------------------------------------------------------
def test_missing_dataset_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)Train/0/\*\.bin.*garrickorchard"):
        NMNIST(str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"(?s)shd_train\.h5.*zenkelab"):
        SHD(str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"(?s)user01_fluorescent_labels\.csv.*dvsgesture"):
        DVSGesture(str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"(?s)airplane/\*\.aedat.*figshare"):
        CIFAR10DVS(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist_dir(str(tmp_path))


# --------------------------------------------------------------------------------------------------------
# Fashion-MNIST (IDX)
# --------------------------------------------------------------------------------------------------------
def write_idx(path, array, compress):
    a = np.asarray(array, dtype=np.uint8)
    data = bytes([0, 0, 0x08, a.ndim]) + b"".join(struct.pack(">i", d) for d in a.shape) + a.tobytes()
    with (gzip.open if compress else open)(path, "wb") as f:
        f.write(data)


def test_idx_reader_and_root_override(tmp_path):
    rng = np.random.default_rng(4)
    imgs = rng.integers(0, 256, (20, 28, 28))
    labels = np.arange(20) % 10
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", imgs, True)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels, True)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", imgs[:10], False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels[:10], False)
    assert np.array_equal(read_idx(str(tmp_path / "train-images-idx3-ubyte.gz")), imgs)
    (x_tr, y_tr), (x_te, y_te) = load_fashion_mnist(str(tmp_path))
    assert x_tr.shape == (20, 1, 28, 28) and x_te.shape == (10, 1, 28, 28)
    assert torch.allclose(x_tr[:, 0] * 255, torch.from_numpy(imgs).float()) and y_te.tolist() == list(range(10))
    (x_tr, y_tr), _ = load_fashion_mnist(str(tmp_path), n_train=10)
    assert sorted(y_tr.tolist()) == list(range(10))
    cache = tmp_path / "cache"
    (e_tr, l_tr), (e_te, l_te) = load_fashion_events(T=3, n_train=10, n_test=5, root=str(tmp_path),
                                                     cache_dir=str(cache))
    assert e_tr.shape == (10, 3, 2, 34, 34) and e_te.shape == (5, 3, 2, 34, 34) and len(os.listdir(cache)) == 1
    (c_tr, k_tr), _ = load_fashion_events(T=3, n_train=10, n_test=5, root=str(tmp_path), cache_dir=str(cache))
    assert torch.equal(c_tr, e_tr) and torch.equal(k_tr, l_tr)


def _system_fashion():
    try:
        return fashion_mnist_dir()
    except FileNotFoundError:
        return None


@pytest.mark.skipif(_system_fashion() is None, reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_system_package():
    (x_tr, y_tr), (x_te, y_te) = load_fashion_mnist()
    assert x_tr.shape == (60000, 1, 28, 28) and x_te.shape == (10000, 1, 28, 28)
    assert 0 <= x_tr.min() and x_tr.max() <= 1 and set(y_te.tolist()) == set(range(10))
    (e_tr, l_tr), (e_te, l_te) = load_fashion_events(T=4, n_train=40, n_test=20)
    assert e_tr.shape == (40, 4, 2, 34, 34) and e_te.shape == (20, 4, 2, 34, 34)
    assert Counter(l_tr.tolist()) == {c: 4 for c in range(10)} and e_tr.sum() > 0
