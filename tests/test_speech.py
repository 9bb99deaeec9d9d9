"""Synthesized keywords and the cochlea model: WAV reading, filterbank, level-crossing events on signals with
known answers; synthesis through espeak-ng/flite only where they are installed."""
import math
import os
import shutil
import wave

import numpy as np
import pytest
import torch

from snn_localrules.data import speech
from snn_localrules.data.speech import (
    Speaker,
    cochlea_events,
    level_crossing_events,
    load_keyword_events,
    mel_filterbank,
    read_wav,
    require_synthesizers,
    resample,
)


def _write_wav(path, samples, rate, width=2):
    ints = np.clip(np.round(samples * 32767), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(ints.tobytes())


def test_read_wav_and_resample(tmp_path):
    t = np.arange(2205) / 22050
    tone = 0.5 * np.sin(2 * np.pi * 440 * t)
    _write_wav(tmp_path / "a.wav", tone, 22050)
    audio, rate = read_wav(str(tmp_path / "a.wav"))
    assert rate == 22050 and audio.dtype == np.float32
    np.testing.assert_allclose(audio, tone, atol=1 / 32767)
    down = resample(audio, rate, 16000)
    assert len(down) == round(2205 * 16000 / 22050)
    # same tone at the new rate (interpolation error is small for 440 Hz)
    np.testing.assert_allclose(down, 0.5 * np.sin(2 * np.pi * 440 * np.arange(len(down)) / 16000), atol=0.02)


def test_level_crossing_counts_known_ramp():
    # band 0 rises by 3.5 thresholds then falls by 2.6; band 1 is flat
    levels = np.array([0.0, 1.0, 2.0, 3.5, 3.5, 0.9]) * 0.5
    log_energy = np.stack([levels, np.full(6, 2.0)], 1).astype(np.float32)
    ev = level_crossing_events(log_energy, threshold=0.5)
    assert ev.shape == (6, 2, 2)
    assert ev[:, 0, 0].tolist() == [0, 1, 1, 1, 0, 0]  # ON: 3 crossings (the half step is not one)
    # reference after the rise sits at 3.0 thresholds; falling to 0.9 crosses twice (2.1 below)
    assert ev[:, 1, 0].tolist() == [0, 0, 0, 0, 0, 2]
    assert ev[:, :, 1].sum() == 0
    with pytest.raises(ValueError, match="threshold"):
        level_crossing_events(log_energy, 0.0)


def test_mel_filterbank_shape_and_order():
    fb = mel_filterbank(16, 512, 16000, 100.0, 7000.0)
    assert fb.shape == (16, 257) and (fb >= 0).all()
    peaks = fb.argmax(1)
    assert (np.diff(peaks) > 0).all()  # centres rise with the band index
    with pytest.raises(ValueError, match="fmax"):
        mel_filterbank(16, 512, 16000, 100.0, 9000.0)


def test_cochlea_events_put_a_tone_in_its_band():
    rate, bands = 16000, 32
    t = np.arange(int(0.6 * rate)) / rate
    audio = np.zeros(rate, dtype=np.float32)
    audio[1600 : 1600 + len(t)] = np.sin(2 * np.pi * 1000 * t) * np.hanning(len(t))
    frames = cochlea_events(audio, T=10, bands=bands, threshold=0.7)
    assert frames.shape == (10, 2 * bands) and frames.dtype == torch.float32
    per_band = frames.view(10, 2, bands).sum((0, 1))
    fb = mel_filterbank(bands, 512, rate, 100.0, 7000.0)
    tone_band = int(np.argmax(fb[:, round(1000 * 512 / rate)]))
    assert int(per_band.argmax()) in (tone_band - 1, tone_band, tone_band + 1)
    on, off = frames.view(10, 2, bands)[:, 0].sum(), frames.view(10, 2, bands)[:, 1].sum()
    assert on > 0 and off > 0  # the burst rises and decays
    assert cochlea_events(np.zeros(rate, dtype=np.float32), T=10).sum() == 0  # silence: no events
    with pytest.raises(ValueError, match="T must be"):
        cochlea_events(audio, T=0)


def test_missing_synthesizer_names_the_install_command(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match="apt-get install -y espeak-ng flite"):
        require_synthesizers()
    assert speech.missing_synthesizers() == ["espeak-ng", "flite"]


needs_tts = pytest.mark.skipif(
    shutil.which("espeak-ng") is None or shutil.which("flite") is None,
    reason="espeak-ng and flite are not installed (apt-get install -y espeak-ng flite)",
)


@needs_tts
def test_synthesize_both_engines():
    for spk, rate, pitch in ((Speaker("espeak-ng", "en-us+f2", (160.0,), (50.0,)), 160.0, 50.0),
                             (Speaker("flite", "slt", (1.0,), (170.0,)), 1.0, 170.0)):
        audio = speech.synthesize("yes", spk, rate, pitch)
        assert audio.dtype == np.float32 and 0.2 * 16000 < len(audio) < 3 * 16000
        assert np.abs(audio).max() > 0.05
    slow = speech.synthesize("yes", Speaker("espeak-ng", "en", (90.0,), (50.0,)), 90.0, 50.0)
    fast = speech.synthesize("yes", Speaker("espeak-ng", "en", (250.0,), (50.0,)), 250.0, 50.0)
    assert len(slow) > len(fast)  # the rate argument reaches the synthesizer


@needs_tts
def test_load_keyword_events_and_cache(tmp_path):
    speakers = {"train": [Speaker("espeak-ng", "en+m1", (150.0,), (40.0, 60.0)),
                          Speaker("espeak-ng", "en-us+f2", (170.0,), (50.0,))],
                "new": [Speaker("flite", "slt", (1.0,), (170.0,))]}
    data = load_keyword_events(keywords=("yes", "no"), speakers=speakers, T=8, bands=16, cache_dir=str(tmp_path))
    assert data.x.shape == (2 * (2 + 1 + 1), 8, 32)
    assert data.y.tolist().count(0) == 4 and data.keywords == ("yes", "no")
    assert data.speakers == ["espeak-ng:en+m1", "espeak-ng:en-us+f2", "flite:slt"]
    x_new, y_new, spk_new = data.of_split("new")
    assert len(y_new) == 2 and spk_new.tolist() == [2, 2]
    assert data.x.sum() > 0
    files = os.listdir(os.path.join(tmp_path, "speech"))
    assert len(files) == 1
    again = load_keyword_events(keywords=("yes", "no"), speakers=speakers, T=8, bands=16, cache_dir=str(tmp_path))
    assert torch.equal(again.x, data.x) and list(again.split) == list(data.split)
    # the two words give different event patterns for the same voice
    yes, no = data.x[(data.y == 0) & (data.speaker == 0)][0], data.x[(data.y == 1) & (data.speaker == 0)][0]
    assert not torch.equal(yes, no)
    assert math.isfinite(float(data.x.mean()))


def test_a_voice_that_repeats_itself_is_refused():
    """flite's rms voice ignored the pitch setting: three of its renditions were the same audio, so its
    held-out samples copied its shots. Identical renditions of a word are refused, naming the voice."""
    from snn_localrules.data.speech import Speaker, _check_renditions_differ, default_speakers

    spk = Speaker("flite", "rms", (1.0,), (90.0, 120.0))
    same, other = np.ones(100, dtype=np.float32), np.zeros(100, dtype=np.float32)
    jobs = [(0, 0, "new", spk, 1.0, 90.0), (0, 0, "new", spk, 1.0, 120.0), (1, 0, "new", spk, 1.0, 90.0)]
    with pytest.raises(ValueError, match=r"flite:rms says 'yes' identically at \(rate, pitch\) \(1.0, 90.0\)"):
        _check_renditions_differ(jobs, [same, same, other], ["yes", "no"])
    _check_renditions_differ(jobs, [same, other, same], ["yes", "no"])  # another word may sound alike
    assert "rms" not in {s.voice for s in default_speakers()["new"]}

