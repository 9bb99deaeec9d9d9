"""Event data made offline: static images turned into event-camera streams, N-MNIST style.

N-MNIST (Orchard et al., 2015) was recorded by moving an ATIS event camera in three small saccades
(a triangle) in front of MNIST digits shown on a screen. Each pixel of such a sensor keeps a reference
log intensity; when the current log intensity moves more than a contrast threshold away from it, the pixel
emits an ON (brighter, polarity 1) or OFF (darker, polarity 0) event and its reference moves by one
threshold. :func:`saccade_events` simulates that sensor on any batch of images, fully vectorised in torch.

Conventions used throughout :mod:`snn_localrules.data`:

* **Channels**: channel 0 counts OFF events (polarity 0), channel 1 counts ON events (polarity 1).
* :func:`saccade_events` returns time-first ``[T, N, 2, size, size]`` (what SpikingJelly multi-step and
  snnTorch loops consume) unless ``time_first=False``.
* The dataset loaders (:func:`load_nmnist5k_events`, :func:`load_fashion_events`) store **sample-first**
  ``[N, T, 2, 34, 34]`` so that indexing and ``DataLoader`` work per sample; a training loop moves the
  time axis forward with ``x.transpose(0, 1)`` to get ``[T, B, 2, 34, 34]``.
* :func:`to_frames` bins a real recording (structured array with fields ``x, y, t, p``) into
  ``[T, 2, H, W]`` counts; it is what the readers in :mod:`snn_localrules.data.datasets` use.

Nothing here downloads anything. Fashion-MNIST comes from the Debian package ``dataset-fashion-mnist``
(or any directory holding the four IDX files).
"""
from __future__ import annotations

import glob
import gzip
import hashlib
import json
import math
import os
import uuid
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

Split = Tuple[torch.Tensor, torch.Tensor]

__all__ = [
    "saccade_events",
    "to_frames",
    "load_nmnist5k_events",
    "load_fashion_mnist",
    "load_fashion_events",
    "fashion_mnist_dir",
    "read_idx",
    "FASHION_MNIST_CLASSES",
]

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


# --------------------------------------------------------------------------------------------------------
# The saccade simulator
# --------------------------------------------------------------------------------------------------------
def _saccade_vertices(saccades: int, amplitude: float) -> torch.Tensor:
    """Corners of the closed saccade path: a regular polygon of radius ``amplitude`` pixels (a triangle
    for three saccades), first corner straight up. Returns ``[saccades, 2]`` offsets ``(dx, dy)``."""
    k = torch.arange(saccades, dtype=torch.float64)
    angle = -math.pi / 2 + 2 * math.pi * k / saccades
    return torch.stack([amplitude * torch.cos(angle), amplitude * torch.sin(angle)], dim=1)


def _path_offsets(saccades: int, amplitude: float, steps: int) -> torch.Tensor:
    """Offsets ``[steps + 1, 2]`` of the image along the closed saccade path at ``steps + 1`` equally
    spaced instants (index 0 is the start, before the first time bin; the last one is back at the start)."""
    if saccades < 1:
        raise ValueError(f"saccades must be >= 1, got {saccades}")
    verts = _saccade_vertices(saccades, amplitude)
    if saccades == 1:  # one saccade: there and back along a line
        verts = torch.cat([verts, -verts])
    n_seg = len(verts)
    u = torch.arange(steps + 1, dtype=torch.float64) * n_seg / steps
    seg = torch.clamp(u.floor().long(), max=n_seg - 1)
    frac = (u - seg).unsqueeze(1)
    start = verts[seg]
    end = verts[(seg + 1) % n_seg]
    return (start + frac * (end - start)).float()


def _as_images(images: Union[torch.Tensor, np.ndarray]) -> torch.Tensor:
    x = torch.as_tensor(images)
    if x.dim() == 4:
        if x.shape[1] != 1:
            raise ValueError(f"images [N, C, H, W] must have one channel, got shape {tuple(x.shape)}")
        x = x[:, 0]
    if x.dim() == 2:
        x = x.unsqueeze(0)
    if x.dim() != 3:
        raise ValueError(f"images must be [N, H, W] or [N, 1, H, W], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    return x.float()


def saccade_events(
    images: Union[torch.Tensor, np.ndarray],
    T: int = 10,
    size: int = 34,
    saccades: int = 3,
    threshold: float = 0.15,
    seed: int = 0,
    *,
    amplitude: Optional[float] = None,
    log_eps: float = 0.5,
    threshold_sigma: float = 0.02,
    noise: float = 1e-3,
    jitter: float = 0.0,
    steps_per_bin: Optional[int] = None,
    time_first: bool = True,
    dtype: torch.dtype = torch.float32,
    chunk_size: int = 1000,
    num_threads: Optional[int] = 1,
) -> torch.Tensor:
    """Simulate an event camera making ``saccades`` small saccades in front of each image (N-MNIST style).

    The image is centred on a ``size x size`` sensor and translated (bilinear, sub-pixel) along a closed
    polygon of ``saccades`` straight segments (a triangle by default) whose corners lie ``amplitude`` pixels
    from the centre (default: the margin ``(size - H) / 2``, 3 px for 28 -> 34). The path is sampled at
    ``T * steps_per_bin`` instants, spread evenly over the ``T`` time bins. Each pixel works like a DVS
    pixel: with ``L = log(I + log_eps)``, whenever ``L - ref >= k * theta_on`` it emits ``k`` ON events and
    ``ref += k * theta_on`` (OFF likewise with ``theta_off``). The sensor's per-pixel thresholds are
    ``threshold`` plus Gaussian mismatch (``threshold_sigma``); each sample starts with its reference
    randomly within +-theta/2 of the first view (so a static scene emits nothing), and independent
    background events (Poisson, mean ``noise`` per pixel, polarity and bin) are added. ``jitter`` adds a
    random per-sample offset (uniform in +-jitter px) to the whole path.

    :param images: ``[N, H, W]`` or ``[N, 1, H, W]``, float in [0, 1] (uint8 is divided by 255).
    :param seed: every random draw (mismatch, initial references, jitter, noise) comes from a
        ``torch.Generator`` seeded with it; the result does not depend on ``chunk_size``.
    :param time_first: ``True`` -> ``[T, N, 2, size, size]``; ``False`` -> ``[N, T, 2, size, size]``.
    :param dtype: dtype of the returned counts (``torch.uint8`` saves 4x memory; counts saturate at 255).
    :param num_threads: torch intra-op threads while simulating (restored afterwards). The default 1 is
        deliberate: the per-step tensors (``chunk_size x size x size``) are too small to gain from OpenMP,
        which made them 2-30x slower on 2-core machines. ``None`` keeps the current setting.
    :return: event counts per time bin, polarity (channel 0 OFF, 1 ON) and pixel.
    """
    previous = torch.get_num_threads()
    if num_threads is not None and num_threads != previous:
        torch.set_num_threads(num_threads)
    try:
        return _saccade_events(
            images, T, size, saccades, threshold, seed, amplitude, log_eps, threshold_sigma, noise, jitter,
            steps_per_bin, time_first, dtype, chunk_size,
        )
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


def _saccade_events(
    images, T, size, saccades, threshold, seed, amplitude, log_eps, threshold_sigma, noise, jitter,
    steps_per_bin, time_first, dtype, chunk_size,
) -> torch.Tensor:
    x = _as_images(images).clamp(min=0.0)
    n, h, w = x.shape
    if size < max(h, w):
        raise ValueError(f"size={size} is smaller than the images ({h}x{w})")
    if T < 1:
        raise ValueError(f"T must be >= 1, got {T}")
    if threshold <= 0:
        raise ValueError(f"threshold must be > 0, got {threshold}")
    if log_eps <= 0:
        raise ValueError(f"log_eps must be > 0, got {log_eps}")
    if amplitude is None:
        amplitude = (size - max(h, w)) / 2.0
    if steps_per_bin is None:
        steps_per_bin = max(1, math.ceil(max(48, 16 * saccades) / T))
    steps = T * steps_per_bin
    offsets = _path_offsets(saccades, float(amplitude), steps)  # [steps + 1, 2]

    gen = torch.Generator().manual_seed(int(seed))
    theta = threshold + threshold_sigma * torch.randn((2, size, size), generator=gen)
    theta = theta.clamp_(min=0.2 * threshold)  # [OFF, ON] thresholds of this sensor
    theta_off, theta_on = theta[0], theta[1]
    init_u = torch.rand((n, size, size), generator=gen) - 0.5
    shift = (torch.rand((n, 2), generator=gen) * 2 - 1) * jitter if jitter > 0 else None

    out_shape = (T, n, 2, size, size) if time_first else (n, T, 2, size, size)
    out = torch.empty(out_shape, dtype=dtype)  # every bin of every sample is written below
    integer_out = not dtype.is_floating_point
    top, left = (size - h) / 2.0, (size - w) / 2.0
    inv_on, inv_off = 1.0 / theta_on, 1.0 / theta_off
    pad = int(math.ceil(max(top, left) + float(offsets.abs().max()))) + 2
    rows = torch.arange(size, dtype=torch.float32)
    src_y = torch.arange(h, dtype=torch.float32)
    src_x = torch.arange(w, dtype=torch.float32)

    def hat(pos: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        # bilinear interpolation as a matrix: weight max(0, 1 - |pos - j|) of source pixel j
        return (1.0 - (pos.unsqueeze(-1) - src).abs()).clamp_(min=0.0)

    with torch.no_grad():
        for i0 in range(0, n, chunk_size):
            i1 = min(n, i0 + chunk_size)
            c = i1 - i0
            img = x[i0:i1]
            jit = shift[i0:i1].view(c, 2, 1) if shift is not None else None

            if shift is None:  # one offset for the whole chunk: bilinear shift by slicing a padded canvas
                padded = F.pad(img, (pad, pad, pad, pad))

                def log_view(k: int) -> torch.Tensor:
                    # sensor pixel i sees image coordinate i - top - dy, i.e. padded index i + by
                    by = pad - top - offsets[k, 1].item()
                    bx = pad - left - offsets[k, 0].item()
                    iy, ix = math.floor(by), math.floor(bx)
                    win = padded[:, iy : iy + size + 1, ix : ix + size + 1]
                    v = torch.lerp(win[:, :-1], win[:, 1:], by - iy)
                    v = torch.lerp(v[:, :, :-1], v[:, :, 1:], bx - ix)
                    return v.add_(log_eps).log_()

            else:  # per-sample jitter: bilinear interpolation matrices, one pair per sample

                def log_view(k: int) -> torch.Tensor:
                    dx, dy = offsets[k, 0].item(), offsets[k, 1].item()
                    ry = hat(rows - top - dy - jit[:, 1], src_y)  # [c, size, h]
                    rx = hat(rows - left - dx - jit[:, 0], src_x)  # [c, size, w]
                    v = torch.matmul(torch.matmul(ry, img), rx.transpose(-1, -2))
                    return v.clamp_(min=0.0).add_(log_eps).log_()

            # within +-theta_on/2 of the first view, and short of the OFF threshold (a pixel whose OFF
            # threshold is under half its ON one would otherwise fire at once, with nothing moving)
            ref = torch.minimum(init_u[i0:i1] * theta_on, theta_off * (1.0 - 1e-6))
            ref += log_view(0)
            buf = torch.empty((c, 2, size, size))
            n_on = torch.empty((c, size, size))
            n_off = torch.empty((c, size, size))
            for b in range(T):
                buf.zero_()
                for s in range(steps_per_bin):
                    diff = log_view(1 + b * steps_per_bin + s).sub_(ref)
                    torch.mul(diff, inv_on, out=n_on).floor_().clamp_(min=0.0)
                    torch.mul(diff, inv_off, out=n_off).neg_().floor_().clamp_(min=0.0)
                    ref.addcmul_(n_on, theta_on).addcmul_(n_off, theta_off, value=-1.0)
                    buf[:, 0] += n_off
                    buf[:, 1] += n_on
                if integer_out:
                    buf.clamp_(max=torch.iinfo(dtype).max)
                if time_first:
                    out[b, i0:i1] = buf
                else:
                    out[i0:i1, b] = buf

    if noise > 0:  # background events: Poisson with mean `noise` per pixel, polarity and bin
        k = 2 * size * size
        total = T * n * k
        count = int(torch.poisson(torch.tensor(float(noise) * total, dtype=torch.float64), gen))
        where = torch.randint(0, total, (count,), generator=gen)  # index into [T, N, 2, size, size]
        if not time_first:
            t_idx, rest = where // (n * k), where % (n * k)
            where = (rest // k) * (T * k) + t_idx * k + rest % k
        if integer_out:  # counts saturate (255 + 1 would wrap to 0): add in int64 where noise falls, clamp
            cells, extra = where.unique(return_counts=True)
            flat = out.view(-1)
            flat[cells] = (flat[cells].to(torch.int64) + extra).clamp_(max=torch.iinfo(dtype).max).to(dtype)
        else:
            out.view(-1).index_put_((where,), torch.ones(count, dtype=dtype), accumulate=True)
    return out


# --------------------------------------------------------------------------------------------------------
# Binning of real event streams
# --------------------------------------------------------------------------------------------------------
def _field(events: Any, name: str) -> np.ndarray:
    if isinstance(events, np.ndarray) and events.dtype.names is not None:
        return np.asarray(events[name])
    if isinstance(events, Mapping):
        return np.asarray(events[name])
    return np.asarray(getattr(events, name))


def _pair(v: Union[int, Sequence[int]]) -> Tuple[int, int]:
    if isinstance(v, (int, np.integer)):
        return int(v), int(v)
    h, w = v
    return int(h), int(w)


def time_bins(
    t: np.ndarray,
    T: int,
    *,
    t_start: Optional[float] = None,
    duration: Optional[float] = None,
    split_by: str = "time",
) -> Tuple[np.ndarray, np.ndarray]:
    """Time-bin index of each event. Returns ``(bin, keep)``: ``bin`` int64 for the kept events and the
    boolean mask ``keep`` over all events.

    ``split_by="time"``: ``T`` equal windows. With ``duration=None`` they span ``[t_start, t_last]`` (both
    included; ``t_start`` defaults to the first event); with a ``duration`` they are
    ``[t_start + k d, t_start + (k+1) d)``, ``d = duration / T``, and events outside are dropped.
    Integer timestamps are binned in exact integer arithmetic. ``split_by="number"``: the events of the same
    window (from ``t_start``, within ``duration`` when given) in time order, split as SpikingJelly's
    ``split_by='number'`` does: ``T`` groups of ``n // T`` events, the last one also taking the remainder
    (all of them when there are fewer than ``T``).
    """
    t = np.asarray(t)
    n = len(t)
    if split_by not in ("time", "number"):
        raise ValueError(f"split_by must be 'time' or 'number', got {split_by!r}")
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, bool)
    if split_by == "number":
        keep = np.ones(n, bool)
        if t_start is not None:
            keep &= t >= t_start
        if duration is not None:
            keep &= t < (t.min() if t_start is None else t_start) + duration
        kept = int(keep.sum())
        order = np.argsort(t[keep], kind="stable")
        per_group = kept // T
        rank = np.arange(kept, dtype=np.int64)
        bins = np.empty(kept, np.int64)
        bins[order] = np.minimum(rank // per_group, T - 1) if per_group else T - 1
        return bins, keep
    integer = np.issubdtype(t.dtype, np.integer)
    t0 = t.min() if t_start is None else t_start
    if duration is None:
        span = t.max() - t0
        keep = t >= t0
        last_inclusive = True
    else:
        span = duration
        keep = (t >= t0) & (t < t0 + duration)
        last_inclusive = False
    tk = t[keep]
    if span <= 0:
        return np.zeros(len(tk), np.int64), keep
    if integer and float(span).is_integer() and float(t0).is_integer():
        bins = ((tk.astype(np.int64) - int(t0)) * T) // int(span)
    else:
        bins = np.floor((tk.astype(np.float64) - float(t0)) * T / float(span)).astype(np.int64)
    if last_inclusive:
        bins = np.minimum(bins, T - 1)
    return np.clip(bins, 0, T - 1), keep


def to_frames(
    events: Any,
    T: int,
    size: Optional[Union[int, Sequence[int]]] = None,
    *,
    sensor_size: Optional[Union[int, Sequence[int]]] = None,
    t_start: Optional[float] = None,
    duration: Optional[float] = None,
    split_by: str = "time",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Bin events into frames ``[T, 2, H, W]``: counts per time bin, polarity and pixel.

    :param events: numpy structured array with fields ``x, y, t, p`` (tonic / N-MNIST style), or a mapping
        / object with those four arrays. ``p`` is 0 (OFF, channel 0) or 1 (ON, channel 1).
    :param size: output ``H`` (= ``W``) or ``(H, W)``; defaults to ``sensor_size``.
    :param sensor_size: the sensor's ``(H, W)``; defaults to ``size``, or to the largest coordinates + 1.
        If it differs from ``size`` the frames are resampled: by exact pixel binning (sums of ``k x k``
        blocks) where the sensor size is a multiple of ``size``, otherwise by conservative area resampling
        (e.g. 128 -> 48): each sensor pixel's count is shared among the output pixels its area overlaps, in
        proportion to the overlap, so every event counts once and the total count is kept.
    :param t_start, duration, split_by: time binning, see :func:`time_bins`.
    """
    x = _field(events, "x").astype(np.int64)
    y = _field(events, "y").astype(np.int64)
    t = _field(events, "t")
    p = _field(events, "p").astype(np.int64)
    if sensor_size is None and size is None:
        sensor_size = (int(y.max()) + 1 if len(y) else 1, int(x.max()) + 1 if len(x) else 1)
    sh, sw = _pair(sensor_size if sensor_size is not None else size)
    oh, ow = _pair(size if size is not None else (sh, sw))
    bins, keep = time_bins(t, T, t_start=t_start, duration=duration, split_by=split_by)
    x, y, p = x[keep], y[keep], (p[keep] > 0).astype(np.int64)
    inside = (x >= 0) & (x < sw) & (y >= 0) & (y < sh)
    x, y, p, bins = x[inside], y[inside], p[inside], bins[inside]
    area = not (sh % oh == 0 and sw % ow == 0)
    if not area:
        fh, fw = sh // oh, sw // ow
        y, x = y // fh, x // fw
        hh, ww = oh, ow
    else:
        hh, ww = sh, sw
    flat = ((bins * 2 + p) * hh + y) * ww + x
    counts = np.bincount(flat, minlength=T * 2 * hh * ww).astype(np.float32)
    frames = torch.from_numpy(counts).view(T, 2, hh, ww)
    if area:
        rows, cols = _area_weights(sh, oh), _area_weights(sw, ow)
        frames = torch.einsum("hy,tcyx,wx->tchw", rows, frames.double(), cols)
    return frames.to(dtype)


def _area_weights(n_in: int, n_out: int) -> torch.Tensor:
    """``[n_out, n_in]``: the share of input pixel ``j`` that falls in output pixel ``i`` when ``n_in``
    pixels are laid over ``n_out`` (each column sums to 1)."""
    edges = np.arange(n_in + 1, dtype=np.float64) * n_out / n_in  # input pixel edges, in output pixels
    out = np.arange(n_out, dtype=np.float64)[:, None]
    overlap = np.minimum(edges[None, 1:], out + 1) - np.maximum(edges[None, :-1], out)
    return torch.from_numpy(np.clip(overlap, 0.0, None) * n_in / n_out)


# --------------------------------------------------------------------------------------------------------
# MNIST-5k and Fashion-MNIST as event streams
# --------------------------------------------------------------------------------------------------------
def _cache_path(cache_dir: Optional[str], name: str, params: Dict[str, Any]) -> Optional[str]:
    if cache_dir is None:
        return None
    key = hashlib.sha1(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return os.path.join(os.path.expanduser(cache_dir), f"{name}_{key}.pt")


def _events_for_splits(
    train: Split, test: Split, T: int, seed: int, dtype: torch.dtype, sim_kwargs: Dict[str, Any]
) -> Tuple[Split, Split]:
    """Simulate train and test together (one sensor, one seed) and return sample-first views."""
    (x_tr, y_tr), (x_te, y_te) = train, test
    images = torch.cat([_as_images(x_tr), _as_images(x_te)])
    ev = saccade_events(images, T=T, seed=seed, time_first=False, dtype=dtype, **sim_kwargs)
    n_tr = len(x_tr)
    return (ev[:n_tr], y_tr), (ev[n_tr:], y_te)


def save_atomically(obj: Any, path: str) -> None:
    """``torch.save`` to ``path`` through a temporary file of this call's own in the same folder, then an
    atomic rename: processes (DDP ranks, DataLoader workers, a sweep) that fill one cache at the same time
    never read a half-written file, nor rename each other's temporary file away."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    # a name of its own (not mkstemp's file, which would keep mode 0600 through the rename: a cache shared by
    # a group must stay as readable as torch.save makes it)
    tmp = f"{path}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _cached(cache_file: Optional[str], make) -> Tuple[Split, Split]:
    if cache_file is not None and os.path.exists(cache_file):
        d = torch.load(cache_file)
        return (d["x_train"], d["y_train"]), (d["x_test"], d["y_test"])
    (x_tr, y_tr), (x_te, y_te) = make()
    if cache_file is not None:
        save_atomically({"x_train": x_tr, "y_train": y_tr, "x_test": x_te, "y_test": y_te}, cache_file)
    return (x_tr, y_tr), (x_te, y_te)


def load_nmnist5k_events(
    T: int = 10,
    seed: int = 0,
    test_fraction: float = 0.2,
    *,
    cache_dir: Optional[str] = None,
    dtype: torch.dtype = torch.float32,
    **sim_kwargs: Any,
) -> Tuple[Split, Split]:
    """MNIST-5k (see :func:`~snn_localrules.data.load_mnist5k`) turned into N-MNIST-like event frames.

    Both splits are simulated by one call of :func:`saccade_events` (same sensor; ``seed`` drives both the
    split and the simulator; ``sim_kwargs`` are passed on, e.g. ``threshold``, ``noise``).

    :param cache_dir: if given, the result is saved there (``nmnist5k_events_<hash>.pt``) and re-used;
        nothing is written anywhere otherwise.
    :return: ``((x_train, y_train), (x_test, y_test))``; **sample-first** event counts
        ``[N, T, 2, 34, 34]`` (channel 0 OFF, 1 ON; train and test are views of one tensor) and labels
        ``[N]`` int64. Default split: 4000 train, 1000 test, stratified by class. For a time-first batch
        use ``x[idx].transpose(0, 1)`` -> ``[T, B, 2, 34, 34]``.
    """
    from .offline import load_mnist5k

    params = dict(T=T, seed=seed, test_fraction=test_fraction, dtype=str(dtype), **sim_kwargs)
    cache_file = _cache_path(cache_dir, "nmnist5k_events", params)

    def make():
        train, test = load_mnist5k(test_fraction=test_fraction, seed=seed)
        return _events_for_splits(train, test, T, seed, dtype, sim_kwargs)

    return _cached(cache_file, make)


_FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_FASHION_DIRS = ("/usr/share/datasets/fashion-mnist", "/usr/share/fashion-mnist", "/usr/share/datasets/fashion_mnist")


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (the MNIST format: big-endian header ``0, 0, dtype, ndim``, ``ndim`` int32 sizes,
    then the data), gzip-compressed or not."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    codes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if raw[2] not in codes:
        raise ValueError(f"{path}: unknown IDX data type 0x{raw[2]:02x}")
    ndim = raw[3]
    shape = tuple(int(v) for v in np.frombuffer(raw, ">i4", count=ndim, offset=4))
    dt = np.dtype(codes[raw[2]])
    data = np.frombuffer(raw, dt, count=int(np.prod(shape)), offset=4 + 4 * ndim)
    return data.reshape(shape).astype(dt.newbyteorder("="))


def _find_idx(directory: str, stem: str) -> Optional[str]:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx") + ".gz", stem.replace("-idx", ".idx")):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    return None


def fashion_mnist_dir(root: Optional[str] = None) -> str:
    """Directory with the four Fashion-MNIST IDX files: ``root`` if given, else where the Debian package
    ``dataset-fashion-mnist`` puts them (``/usr/share/datasets/fashion-mnist``; ``/usr/share`` is searched).

    :raises FileNotFoundError: naming ``apt-get install dataset-fashion-mnist`` when they are missing.
    """
    names = ", ".join(f"{v}[.gz]" for v in _FASHION_FILES.values())
    if root is not None:
        candidates = [os.path.expanduser(root)]
    else:
        candidates = list(_FASHION_DIRS) + sorted(
            set(glob.glob("/usr/share/*/*fashion*mnist*")) | set(glob.glob("/usr/share/*fashion*mnist*"))
        )
    for d in candidates:
        if os.path.isdir(d) and all(_find_idx(d, s) for s in _FASHION_FILES.values()):
            return d
    where = f"in {root!r}" if root is not None else "under /usr/share (looked in " + ", ".join(_FASHION_DIRS) + ")"
    raise FileNotFoundError(
        f"Fashion-MNIST IDX files ({names}) not found {where}. Install them with "
        "`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu; files go to "
        "/usr/share/datasets/fashion-mnist), or download them from "
        "https://github.com/zalandoresearch/fashion-mnist and pass root=<that directory>."
    )


def _balanced_subset(labels: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` indices, as equal per class as possible, in random order."""
    classes = labels.unique()
    per, rest = divmod(n, len(classes))
    picks = []
    for i, c in enumerate(classes):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        picks.append(idx[: per + (1 if i < rest else 0)])
    out = torch.cat(picks)
    return out[torch.randperm(len(out), generator=gen)]


def load_fashion_mnist(
    root: Optional[str] = None,
    *,
    n_train: Optional[int] = None,
    n_test: Optional[int] = None,
    seed: int = 0,
) -> Tuple[Split, Split]:
    """Fashion-MNIST from IDX files (see :func:`fashion_mnist_dir`).

    :param n_train, n_test: if given, a class-balanced random subset (drawn with ``seed``) of that size;
        ``None`` keeps the full split (60000 / 10000).
    :return: ``((x_train, y_train), (x_test, y_test))``, images ``[N, 1, 28, 28]`` float in [0, 1],
        labels ``[N]`` int64 (class names in :data:`FASHION_MNIST_CLASSES`); same convention as
        :func:`~snn_localrules.data.load_mnist5k`.
    """
    d = fashion_mnist_dir(root)
    gen = torch.Generator().manual_seed(seed)
    splits = []
    for split, n in (("train", n_train), ("test", n_test)):
        imgs = read_idx(_find_idx(d, _FASHION_FILES[f"{split}_images"]))
        labs = read_idx(_find_idx(d, _FASHION_FILES[f"{split}_labels"]))
        if imgs.ndim != 3 or labs.ndim != 1 or len(imgs) != len(labs):
            raise ValueError(f"{d}: unexpected Fashion-MNIST {split} shapes {imgs.shape}, {labs.shape}")
        x = torch.from_numpy(imgs.astype(np.float32) / 255.0).unsqueeze(1)
        y = torch.from_numpy(labs.astype(np.int64))
        if n is not None and n < len(y):
            idx = _balanced_subset(y, n, gen)
            x, y = x[idx], y[idx]
        splits.append((x, y))
    return splits[0], splits[1]


def load_fashion_events(
    T: int = 10,
    seed: int = 0,
    *,
    n_train: Optional[int] = 4000,
    n_test: Optional[int] = 1000,
    root: Optional[str] = None,
    cache_dir: Optional[str] = None,
    dtype: torch.dtype = torch.float32,
    **sim_kwargs: Any,
) -> Tuple[Split, Split]:
    """Fashion-MNIST turned into N-MNIST-like event frames with :func:`saccade_events`.

    By default a class-balanced subset of 4000 train / 1000 test images (the MNIST-5k scale): the full set
    as float32 ``[60000, 10, 2, 34, 34]`` would need 5.5 GB (pass ``n_train=None`` and e.g.
    ``dtype=torch.uint8`` if you want it).

    :return: ``((x_train, y_train), (x_test, y_test))``, sample-first ``[N, T, 2, 34, 34]`` counts and
        ``[N]`` int64 labels, as :func:`load_nmnist5k_events`.
    :raises FileNotFoundError: if the IDX files are missing (``apt-get install dataset-fashion-mnist``).
    """
    d = fashion_mnist_dir(root)
    params = dict(T=T, seed=seed, n_train=n_train, n_test=n_test, root=d, dtype=str(dtype), **sim_kwargs)
    cache_file = _cache_path(cache_dir, "fashion_events", params)

    def make():
        train, test = load_fashion_mnist(d, n_train=n_train, n_test=n_test, seed=seed)
        return _events_for_splits(train, test, T, seed, dtype, sim_kwargs)

    return _cached(cache_file, make)
