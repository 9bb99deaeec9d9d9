"""Spoken keywords synthesized offline, turned into spike events by a simple cochlea model.

Keyword spotting on a device is the Traces Propagation paper's use of few-shot fine-tuning (a pretrained
network adapted to one new speaker). Google Speech Commands is not shipped with any package, so this module
*synthesizes* a small keyword set with the text-to-speech programs Debian ships (``espeak-ng`` and
``flite``, called through :mod:`subprocess`; nothing is downloaded). Each *speaker* is one synthesizer voice
(an espeak-ng voice with a variant such as ``en-us+f2``, or a flite voice such as ``slt``); each speaker says
every keyword several times at different speeds and pitches. WAV files are read with the standard library's
:mod:`wave` module.

**Cochlea model** (:func:`cochlea_events`): the audio is split into ``bands`` mel-spaced frequency bands
(short-time Fourier transform, 25 ms windows every 10 ms, triangular mel filters), each band's log energy is
followed by a level-crossing (delta) modulator that emits an ON event each time the log energy rises by
``threshold`` above its last reference level and an OFF event each time it falls by ``threshold`` below it
(the way silicon cochleas and event cameras encode change), and the events are counted in ``T`` equal
time bins over a fixed ``duration``. A sample is ``[T, 2 * bands]`` event counts (ON events of every band,
then OFF events). Energies more than ``dynamic_range_db`` below the loudest are clipped (a hearing
threshold, so faint noise makes no events), and the window starts just before the word's onset.

These are synthetic voices, not people: speakers differ much less than real ones, and a model trained on them
says nothing about real keyword-spotting accuracy. They are a stand-in that needs no download, with speakers
as groups that a held-out speaker can be told apart by.

Example::

    from snn_localrules.data.speech import load_keyword_events, require_synthesizers
    require_synthesizers()                        # clear error naming apt-get install espeak-ng flite
    data = load_keyword_events(T=20)              # train speakers: espeak-ng voices; new: flite voices
    x, y = data.x[data.split == "train"], data.y[data.split == "train"]     # [N, 20, 64], [N]
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import wave
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .events import save_atomically

#: the ten core keywords of Google Speech Commands (the keyword-spotting set of the TP paper)
SPEECH_COMMANDS_10 = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
#: the ten digits, an alternative keyword set
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

SAMPLE_RATE = 16000
PROGRAMS = ("espeak-ng", "flite")


@dataclass(frozen=True)
class Speaker:
    """One synthetic speaker: a synthesizer voice and the prosody grid it says every keyword with.

    :ivar engine: ``"espeak-ng"`` or ``"flite"``.
    :ivar voice: espeak-ng ``-v`` argument (``"en-us+f2"``) or flite ``-voice`` name (``"slt"``).
    :ivar rates: espeak-ng words per minute, or flite duration stretch factors (> 1 is slower).
    :ivar pitches: espeak-ng pitch 0..99, or flite mean F0 targets in Hz.
    """

    engine: str
    voice: str
    rates: Tuple[float, ...]
    pitches: Tuple[float, ...]

    @property
    def name(self) -> str:
        return f"{self.engine}:{self.voice}"

    def renditions(self) -> List[Tuple[float, float]]:
        return [(r, p) for r in self.rates for p in self.pitches]


_ESPEAK_VOICES = ("en+m1", "en+f1", "en-us+m3", "en-us+f2", "en+m7", "en-gb-scotland+f4",
                  "en-029+m2", "en-gb-x-rp+f3", "en-us+m6", "en+f5")
# flite voices that follow int_f0_target_mean (rms does not: its three pitches gave the same audio)
_FLITE_VOICES = (("slt", 175.0), ("awb", 105.0), ("kal", 105.0), ("kal16", 110.0))


def default_speakers(quick: bool = False) -> Dict[str, List[Speaker]]:
    """The speaker sets of :func:`load_keyword_events`.

    ``"train"``: espeak-ng voices (10, or 4 with ``quick``), each saying every keyword at 3 speeds x 3
    pitches (2 x 2 with ``quick``). ``"new"``: flite voices (``slt``, ``awb``, ``kal``, ``kal16``; 2 with
    ``quick``) -- a different synthesizer, so a speaker the model has never heard -- each at 5 duration
    stretches x 3 F0 targets (3 x 2 with ``quick``): enough renditions for 5 shots per keyword plus held-out
    ones.
    """
    if quick:
        train = [Speaker("espeak-ng", v, (140.0, 190.0), (35.0, 70.0)) for v in _ESPEAK_VOICES[:4]]
        new = [Speaker("flite", v, (0.85, 1.0, 1.2), (f0 * 0.9, f0 * 1.1)) for v, f0 in _FLITE_VOICES[:2]]
    else:
        train = [Speaker("espeak-ng", v, (130.0, 165.0, 200.0), (30.0, 55.0, 80.0)) for v in _ESPEAK_VOICES]
        new = [Speaker("flite", v, (0.8, 0.9, 1.0, 1.15, 1.3), (f0 * 0.85, f0, f0 * 1.15)) for v, f0 in _FLITE_VOICES]
    return {"train": train, "new": new}


# ----------------------------------------------------------------------------------------------------
# synthesis
# ----------------------------------------------------------------------------------------------------
def missing_synthesizers(engines: Sequence[str] = PROGRAMS) -> List[str]:
    """The programs among ``engines`` that are not on ``PATH``."""
    return [e for e in engines if shutil.which(e) is None]


def require_synthesizers(engines: Sequence[str] = PROGRAMS) -> None:
    """Raise a ``FileNotFoundError`` naming the missing programs and how to install them."""
    missing = missing_synthesizers(engines)
    if missing:
        raise FileNotFoundError(
            f"the speech data needs the text-to-speech program(s) {', '.join(missing)}, which are not on PATH. "
            f"Install them (Debian/Ubuntu: sudo apt-get install -y {' '.join(missing)}), or use the image data "
            "(e.g. --data digits in examples/tp_fewshot.py)."
        )


def read_wav(path: str) -> Tuple[np.ndarray, int]:
    """A PCM WAV file as float32 samples in [-1, 1] (channels averaged) and its sample rate."""
    with wave.open(path, "rb") as w:
        rate, width, channels, n = w.getframerate(), w.getsampwidth(), w.getnchannels(), w.getnframes()
        raw = w.readframes(n)
    if width == 1:
        audio = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        audio = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    elif width == 4:
        audio = np.frombuffer(raw, dtype="<i4").astype(np.float32) / 2147483648.0
    else:
        raise ValueError(f"{path}: {8 * width}-bit PCM is not supported (8, 16 or 32 bit).")
    if channels > 1:
        audio = audio.reshape(-1, channels).mean(1)
    return audio, rate


def resample(audio: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """Linear-interpolation resampling (enough for band energies up to a few kHz)."""
    if rate == target or len(audio) == 0:
        return audio.astype(np.float32)
    n_out = int(round(len(audio) * target / rate))
    t_out = np.arange(n_out) * (rate / target)
    return np.interp(t_out, np.arange(len(audio)), audio).astype(np.float32)


def synthesize(word: str, speaker: Speaker, rate: float, pitch: float) -> np.ndarray:
    """One keyword said by ``speaker`` at ``rate``/``pitch`` (see :class:`Speaker`), as float32 audio at
    16 kHz ``[n]``. Runs the synthesizer program in a subprocess."""
    require_synthesizers((speaker.engine,))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "word.wav")
        if speaker.engine == "espeak-ng":
            cmd = ["espeak-ng", "-v", speaker.voice, "-s", str(int(rate)), "-p", str(int(pitch)), "-w", path, word]
        elif speaker.engine == "flite":
            cmd = ["flite", "-voice", speaker.voice, "--setf", f"duration_stretch={rate}",
                   "--setf", f"int_f0_target_mean={pitch}", "-t", word, "-o", path]
        else:
            raise ValueError(f"unknown engine {speaker.engine!r}; use one of {PROGRAMS}.")
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60)
        if done.returncode != 0 or not os.path.exists(path):
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()[:300]}")
        audio, sr = read_wav(path)
    return resample(audio, sr)


# ----------------------------------------------------------------------------------------------------
# cochlea model
# ----------------------------------------------------------------------------------------------------
def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)


def mel_filterbank(bands: int, n_fft: int, sample_rate: int, fmin: float, fmax: float) -> np.ndarray:
    """Triangular filters ``[bands, n_fft // 2 + 1]`` with centres equally spaced on the mel scale."""
    if not 0 <= fmin < fmax <= sample_rate / 2:
        raise ValueError(f"need 0 <= fmin < fmax <= sample_rate / 2, got fmin={fmin}, fmax={fmax}, rate={sample_rate}.")
    edges = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), bands + 2))
    freqs = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    fb = np.zeros((bands, len(freqs)))
    for b in range(bands):
        lo, mid, hi = edges[b], edges[b + 1], edges[b + 2]
        rising = (freqs - lo) / max(mid - lo, 1e-9)
        falling = (hi - freqs) / max(hi - mid, 1e-9)
        fb[b] = np.clip(np.minimum(rising, falling), 0.0, None)
    return fb


def log_band_energies(
    audio: np.ndarray, sample_rate: int = SAMPLE_RATE, bands: int = 32, window_s: float = 0.025,
    hop_s: float = 0.010, fmin: float = 100.0, fmax: float = 7000.0, floor: float = 1e-6,
) -> np.ndarray:
    """Log mel-band energies ``[frames, bands]`` (25 ms Hann windows every 10 ms by default)."""
    win, hop = int(round(window_s * sample_rate)), int(round(hop_s * sample_rate))
    n_fft = 1 << (win - 1).bit_length()
    if len(audio) < win:
        audio = np.pad(audio, (0, win - len(audio)))
    frames = 1 + (len(audio) - win) // hop
    idx = np.arange(win)[None, :] + hop * np.arange(frames)[:, None]
    spec = np.abs(np.fft.rfft(audio[idx] * np.hanning(win)[None, :], n=n_fft, axis=1)) ** 2
    energy = spec @ mel_filterbank(bands, n_fft, sample_rate, fmin, fmax).T
    return np.log(energy + floor).astype(np.float32)


def level_crossing_events(log_energy: np.ndarray, threshold: float) -> np.ndarray:
    """Delta modulation of each band: ``[frames, 2, bands]`` counts of ON (channel 0) and OFF (channel 1)
    events. The reference starts at the first frame's level; each crossing moves it by ``threshold``."""
    if threshold <= 0:
        raise ValueError(f"threshold must be > 0, got {threshold}.")
    frames, bands = log_energy.shape
    out = np.zeros((frames, 2, bands), dtype=np.float32)
    ref = log_energy[0].astype(np.float64).copy()
    for f in range(1, frames):
        diff = log_energy[f] - ref
        up = np.floor(np.clip(diff, 0.0, None) / threshold)
        down = np.floor(np.clip(-diff, 0.0, None) / threshold)
        out[f, 0], out[f, 1] = up, down
        ref += (up - down) * threshold
    return out


def speech_onset(audio: np.ndarray, sample_rate: int = SAMPLE_RATE, below_peak_db: float = 30.0,
                 lead_s: float = 0.05) -> int:
    """Sample index ``lead_s`` before the first 10 ms frame whose energy is within ``below_peak_db`` of the
    loudest frame (a simple voice-activity onset)."""
    hop = int(0.01 * sample_rate)
    frames = len(audio) // hop
    if frames == 0:
        return 0
    power = (audio[: frames * hop].reshape(frames, hop) ** 2).mean(1) + 1e-12
    loud = np.nonzero(10 * np.log10(power / power.max()) > -below_peak_db)[0]
    return max(0, int(loud[0]) * hop - int(lead_s * sample_rate)) if len(loud) else 0


def cochlea_events(
    audio: np.ndarray, T: int = 20, bands: int = 32, duration: float = 1.0, threshold: float = 0.7,
    sample_rate: int = SAMPLE_RATE, normalize: bool = True, dynamic_range_db: float = 40.0,
    align_onset: bool = True,
) -> torch.Tensor:
    """Audio -> spike-event frames ``[T, 2 * bands]``: filterbank log energies, level-crossing events,
    counts in ``T`` equal bins over ``duration`` seconds (shorter audio is padded with silence, longer
    audio cut).

    :param normalize: scale the audio to unit peak first, so loudness does not matter.
    :param dynamic_range_db: log energies are clipped at this many dB below the loudest band value, as a
        cochlea's hearing threshold: background noise far below the word then makes no events.
    :param align_onset: start the window 50 ms before the word's onset (:func:`speech_onset`), as keyword
        spotting data sets cut their clips around the word.
    """
    if not isinstance(T, int) or T < 1:
        raise ValueError(f"T must be a positive int, got {T!r}.")
    audio = np.asarray(audio, dtype=np.float32)
    if normalize and np.abs(audio).max() > 0:
        audio = audio / np.abs(audio).max()
    if align_onset:
        audio = audio[speech_onset(audio, sample_rate):]
    n = int(round(duration * sample_rate))
    audio = np.pad(audio[:n], (0, max(0, n - len(audio))))
    log_energy = log_band_energies(audio, sample_rate, bands)
    log_energy = np.maximum(log_energy, log_energy.max() - dynamic_range_db * np.log(10.0) / 10.0)
    events = level_crossing_events(log_energy, threshold)
    frames = events.shape[0]
    bin_of = np.minimum((np.arange(frames) * T) // frames, T - 1)
    binned = np.zeros((T, 2, bands), dtype=np.float32)
    np.add.at(binned, bin_of, events)
    return torch.from_numpy(binned.reshape(T, 2 * bands))


# ----------------------------------------------------------------------------------------------------
# the data set
# ----------------------------------------------------------------------------------------------------
@dataclass
class KeywordEvents:
    """Synthesized keywords as event frames.

    :ivar x: ``[N, T, 2 * bands]`` event counts (sample-first; ``x[idx].transpose(0, 1)`` is time-first).
    :ivar y: ``[N]`` keyword indices into ``keywords``.
    :ivar speaker: ``[N]`` speaker indices into ``speakers``.
    :ivar split: ``[N]`` numpy array of ``"train"`` (pretraining speakers) or ``"new"`` (held-out speakers).
    :ivar keywords: the words, in label order.
    :ivar speakers: speaker names (``"engine:voice"``).
    """

    x: torch.Tensor
    y: torch.Tensor
    speaker: torch.Tensor
    split: np.ndarray
    keywords: Tuple[str, ...]
    speakers: List[str] = field(default_factory=list)

    def of_split(self, split: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x, y, speaker)`` of the ``"train"`` or ``"new"`` speakers."""
        mask = torch.from_numpy(self.split == split)
        return self.x[mask], self.y[mask], self.speaker[mask]


def default_cache_dir() -> str:
    """``$SNN_LOCALRULES_CACHE``, else ``$XDG_CACHE_HOME/snn_localrules``, else ``~/.cache/snn_localrules``."""
    if os.environ.get("SNN_LOCALRULES_CACHE"):
        return os.environ["SNN_LOCALRULES_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "snn_localrules")


def _check_renditions_differ(jobs: List[tuple], audios: List[np.ndarray], keywords: Sequence[str]) -> None:
    """Refuse a speaker whose renditions of a word are the same audio (a voice that ignores the pitch or
    rate setting): its held-out samples would be copies of its shots."""
    seen: Dict[tuple, tuple] = {}
    for (w_idx, s_idx, _split, spk, rate, pitch), audio in zip(jobs, audios):
        key = (s_idx, w_idx, hashlib.sha1(np.ascontiguousarray(audio).tobytes()).hexdigest())
        if key in seen:
            raise ValueError(
                f"speaker {spk.name} says {keywords[w_idx]!r} identically at (rate, pitch) {seen[key]} and "
                f"{(rate, pitch)}: this voice ignores one of the settings, so its renditions would repeat each "
                "other across the shots and the held-out set. Use another voice, or vary only what it follows."
            )
        seen[key] = (rate, pitch)


def load_keyword_events(
    keywords: Sequence[str] = SPEECH_COMMANDS_10,
    speakers: Optional[Dict[str, List[Speaker]]] = None,
    T: int = 20,
    bands: int = 32,
    duration: float = 1.0,
    threshold: float = 0.7,
    noise_db: Optional[float] = 30.0,
    seed: int = 0,
    quick: bool = False,
    cache_dir: Optional[str] = "default",
    workers: int = 4,
) -> KeywordEvents:
    """Synthesize every keyword for every speaker and rendition, and turn it into event frames.

    :param keywords: the words (label ``i`` is ``keywords[i]``).
    :param speakers: ``{"train": [...], "new": [...]}`` of :class:`Speaker`; default
        :func:`default_speakers` (``quick`` picks its small version).
    :param T, bands, duration, threshold: of :func:`cochlea_events`.
    :param noise_db: white noise added to every rendition at this signal-to-noise ratio (dB, drawn from
        ``seed``), so silence is not perfectly silent; ``None`` for none.
    :param cache_dir: where the result is kept and re-used (``"default"``: :func:`default_cache_dir`;
        ``None``: no cache). The key covers every argument above.
    :param workers: synthesizer processes run at once.
    :return: :class:`KeywordEvents`.
    :raises FileNotFoundError: a synthesizer program is missing (the message says how to install it).
    """
    speakers = speakers if speakers is not None else default_speakers(quick)
    groups = [(split, spk) for split in ("train", "new") for spk in speakers.get(split, [])]
    require_synthesizers(sorted({spk.engine for _, spk in groups}))
    params = dict(keywords=list(keywords), speakers=[(s, spk.name, spk.rates, spk.pitches) for s, spk in groups],
                  T=T, bands=bands, duration=duration, threshold=threshold, noise_db=noise_db, seed=seed, v=3)
    cache_file = None
    if cache_dir is not None:
        root = default_cache_dir() if cache_dir == "default" else os.path.expanduser(cache_dir)
        key = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
        cache_file = os.path.join(root, "speech", f"keywords_{key}.pt")
        if os.path.exists(cache_file):
            d = torch.load(cache_file)
            return KeywordEvents(d["x"], d["y"], d["speaker"], np.asarray(d["split"]), tuple(d["keywords"]),
                                 list(d["speakers"]))
    jobs = []  # (word index, speaker index, split, speaker, rate, pitch)
    for s_idx, (split, spk) in enumerate(groups):
        for rate, pitch in spk.renditions():
            for w_idx, word in enumerate(keywords):
                jobs.append((w_idx, s_idx, split, spk, rate, pitch))
    # subprocesses release the GIL, so threads are enough to keep several synthesizers busy
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        audios = list(pool.map(lambda j: synthesize(keywords[j[0]], j[3], j[4], j[5]), jobs))
    _check_renditions_differ(jobs, audios, keywords)
    rng = np.random.default_rng(seed)
    xs = []
    for audio in audios:
        if noise_db is not None and len(audio):
            power = float(np.mean(audio ** 2)) + 1e-12
            audio = audio + rng.normal(0.0, np.sqrt(power / 10 ** (noise_db / 10)), len(audio)).astype(np.float32)
        xs.append(cochlea_events(audio, T=T, bands=bands, duration=duration, threshold=threshold))
    data = KeywordEvents(
        x=torch.stack(xs),
        y=torch.tensor([j[0] for j in jobs], dtype=torch.long),
        speaker=torch.tensor([j[1] for j in jobs], dtype=torch.long),
        split=np.array([j[2] for j in jobs]),
        keywords=tuple(keywords),
        speakers=[spk.name for _, spk in groups],
    )
    if cache_file is not None:
        save_atomically(dict(x=data.x, y=data.y, speaker=data.speaker, split=[str(v) for v in data.split],
                             keywords=list(data.keywords), speakers=data.speakers), cache_file)
    return data
