"""Built-in demo data: a small synthetic voxaug library, so training runs with nothing downloaded.

    python -m frame_transformer.synth OUT_DIR [--sr 16000] [--tracks 16] [--seconds 8] [--seed 0]

writes ``OUT_DIR/instrumentals/*.wav`` (harmonic instrument tones with chord progressions, a bass line and
percussion: kick, snare, hi-hat; steady pitch) and ``OUT_DIR/vocals/*.wav`` (voice-like signals: a glottal
harmonic source shaped by moving vowel formants, vibrato, portamento, syllable envelopes, consonant
noise bursts and breath), plus ``OUT_DIR/val/{instrumentals,vocals}`` drawn from other seeds. Everything is
seeded, so the same arguments produce the same files.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Optional

import numpy as np

# vowel formants (F1, F2, F3) in Hz, roughly a/e/i/o/u
VOWELS = np.array([[800, 1200, 2500], [400, 2000, 2600], [300, 2300, 3000], [500, 900, 2400],
                   [350, 800, 2300], [600, 1700, 2500]], dtype=np.float64)
MAJOR = [0, 2, 4, 5, 7, 9, 11]
MINOR = [0, 2, 3, 5, 7, 8, 10]


def _midi_hz(m):
    return 440.0 * 2.0 ** ((np.asarray(m, dtype=np.float64) - 69.0) / 12.0)


def _env(n: int, sr: int, attack: float, release: float) -> np.ndarray:
    t = np.arange(n) / sr
    a = np.clip(t / max(attack, 1e-4), 0, 1)
    r = np.clip((n / sr - t) / max(release, 1e-4), 0, 1)
    return a * r


def _harmonic_tone(f0: float, n: int, sr: int, rng, rolloff: float = 1.5, decay: float = 0.0) -> np.ndarray:
    t = np.arange(n) / sr
    out = np.zeros(n)
    k_max = int((sr / 2 - 200) // f0)
    phase0 = rng.uniform(0, 2 * np.pi, size=max(k_max, 1))
    for k in range(1, k_max + 1):
        amp = k ** (-rolloff)
        if decay > 0:
            amp = amp * np.exp(-t * decay * (1 + 0.3 * k))
        out += amp * np.sin(2 * np.pi * k * f0 * t + phase0[k - 1])
    return out


def instrumental(seconds: float, sr: int, seed: int) -> np.ndarray:
    """Stereo (2, N) instrumental: chords (pad or plucked), bass, drums."""
    rng = np.random.default_rng([seed, 1])
    n = int(seconds * sr)
    out = np.zeros((2, n))
    bpm = rng.uniform(85, 150)
    beat = 60.0 / bpm
    scale = MAJOR if rng.random() < 0.5 else MINOR
    key = int(rng.integers(48, 60))
    plucked = rng.random() < 0.5
    rolloff = rng.uniform(1.0, 2.2)
    chord_len = beat * int(rng.choice([2, 4]))
    pan_chord = rng.uniform(0.3, 0.7)
    t0 = 0.0
    while t0 < seconds:
        degree = int(rng.integers(0, 7))
        notes = [key + scale[(degree + i) % 7] + 12 * ((degree + i) // 7) for i in (0, 2, 4)]
        if rng.random() < 0.4:
            notes.append(notes[0] + 12)
        s0, s1 = int(t0 * sr), min(n, int((t0 + chord_len) * sr))
        m = s1 - s0
        if m <= 0:
            break
        chord = np.zeros(m)
        for note in notes:
            tone = _harmonic_tone(float(_midi_hz(note)), m, sr, rng, rolloff, decay=3.0 if plucked else 0.0)
            chord += tone
        chord *= _env(m, sr, 0.005 if plucked else 0.08, 0.05) * 0.12
        out[0, s0:s1] += chord * (1 - pan_chord) * 2
        out[1, s0:s1] += chord * pan_chord * 2
        # bass: root two octaves down, on each beat
        bt = t0
        while bt < t0 + chord_len - 1e-6 and bt < seconds:
            b0, b1 = int(bt * sr), min(n, int((bt + beat * 0.9) * sr))
            if b1 > b0:
                bass = _harmonic_tone(float(_midi_hz(notes[0] - 24)), b1 - b0, sr, rng, 1.0, decay=2.0)
                bass *= _env(b1 - b0, sr, 0.01, 0.05) * 0.25
                out[:, b0:b1] += bass
            bt += beat
        t0 += chord_len
    # drums
    eighth = beat / 2
    i = 0
    t0 = 0.0
    while t0 < seconds:
        s0 = int(t0 * sr)
        if i % 4 == 0:  # kick: falling sine sweep
            m = min(n - s0, int(0.25 * sr))
            tt = np.arange(m) / sr
            f = 50 + 90 * np.exp(-tt * 30)
            kick = np.sin(2 * np.pi * np.cumsum(f) / sr) * np.exp(-tt * 18) * 0.6
            out[:, s0:s0 + m] += kick
        if i % 8 == 4:  # snare: noise + tone
            m = min(n - s0, int(0.2 * sr))
            tt = np.arange(m) / sr
            snare = (rng.standard_normal(m) * 0.5 + np.sin(2 * np.pi * 190 * tt)) * np.exp(-tt * 25) * 0.35
            out[:, s0:s0 + m] += snare
        # hi-hat: differenced noise (high-passed), short
        m = min(n - s0, int(0.05 * sr))
        if m > 1:
            hh = np.diff(rng.standard_normal(m + 1)) * np.exp(-np.arange(m) / sr * 80) * 0.08
            pan = rng.uniform(0.3, 0.7)
            out[0, s0:s0 + m] += hh * (1 - pan) * 2
            out[1, s0:s0 + m] += hh * pan * 2
        i += 1
        t0 += eighth
    return (out / max(np.abs(out).max(), 1e-6) * rng.uniform(0.5, 0.9)).astype(np.float32)


def vocal(seconds: float, sr: int, seed: int) -> np.ndarray:
    """Stereo (2, N) voice-like stem: sung syllables with formants, vibrato, envelopes; gaps between phrases."""
    rng = np.random.default_rng([seed, 2])
    n = int(seconds * sr)
    t = np.arange(n) / sr
    base = float(rng.choice([48, 55, 60, 65]))  # low voice .. high voice (midi)
    f0_midi = np.full(n, base)
    gate = np.zeros(n)
    vowel_idx = np.zeros(n, dtype=np.int64)
    onsets = []
    pos = rng.uniform(0.0, 0.5)
    while pos < seconds:
        phrase_end = pos + rng.uniform(1.0, 3.0)
        while pos < min(phrase_end, seconds):
            dur = rng.uniform(0.15, 0.6)
            s0, s1 = int(pos * sr), min(n, int((pos + dur) * sr))
            f0_midi[s0:s1] = base + rng.integers(-5, 8)
            vowel_idx[s0:s1] = rng.integers(0, len(VOWELS))
            gate[s0:s1] = 1.0
            onsets.append(s0)
            pos += dur + rng.uniform(0.0, 0.08)
        pos += rng.uniform(0.2, 0.8)
    # portamento (one-pole smoothing of the note contour), vibrato after note onsets, jitter
    from scipy.signal import lfilter

    a = np.exp(-1.0 / (0.04 * sr))
    f0_midi = lfilter([1 - a], [1, -a], f0_midi - base) + base
    vib_rate = rng.uniform(4.5, 6.5)
    vib_depth = rng.uniform(0.25, 0.7)
    f0_midi = f0_midi + vib_depth * np.sin(2 * np.pi * vib_rate * t + rng.uniform(0, 6.28))
    jitter = lfilter([1 - 0.999], [1, -0.999], rng.standard_normal(n)) * 3.0
    f0 = _midi_hz(f0_midi + jitter)
    # formant tracks, smoothed between syllables
    fm = VOWELS[vowel_idx] * rng.uniform(0.9, 1.15)
    b = np.exp(-1.0 / (0.03 * sr))
    fm = lfilter([1 - b], [1, -b], fm - fm[0], axis=0) + fm[0]
    bws = np.array([80.0, 110.0, 160.0])
    gains = np.array([1.0, 0.6, 0.3])
    phase = 2 * np.pi * np.cumsum(f0) / sr
    src_roll = rng.uniform(0.8, 1.3)
    out = np.zeros(n)
    k_max = int((sr / 2 - 300) // f0.min())
    for k in range(1, k_max + 1):
        fk = k * f0
        amp = sum(g / (1 + ((fk - fm[:, j]) / bw) ** 2) for j, (g, bw) in enumerate(zip(gains, bws)))
        amp = amp * k ** (-src_roll) * (fk < sr / 2 - 300)
        out += amp * np.sin(k * phase)
    # syllable envelope (smoothed gate) and loudness variation
    c = np.exp(-1.0 / (0.025 * sr))
    env = lfilter([1 - c], [1, -c], gate)
    env *= 1 + 0.3 * np.sin(2 * np.pi * rng.uniform(0.3, 1.0) * t)
    out *= env
    # consonant noise bursts at some onsets, breath noise in the gaps
    for s0 in onsets:
        if rng.random() < 0.5:
            m = min(n - s0, int(rng.uniform(0.02, 0.06) * sr))
            burst = np.diff(rng.standard_normal(m + 1)) * np.exp(-np.arange(m) / sr * 60)
            out[s0:s0 + m] += burst * 0.15 * np.abs(out).max() if np.abs(out).max() > 0 else 0
    out += np.diff(rng.standard_normal(n + 1)) * 0.003 * (1 - gate)
    stereo = np.stack([out, out * rng.uniform(0.8, 1.0)])
    return (stereo / max(np.abs(stereo).max(), 1e-6) * rng.uniform(0.4, 0.8)).astype(np.float32)


def make_library(out_dir: str, sr: int = 16000, tracks: int = 16, seconds: float = 8.0, seed: int = 0,
                 val_tracks: Optional[int] = None, verbose: bool = True) -> dict:
    """Write the synthetic library (skipped when ``out_dir`` already holds one made with the same settings).

    Returns {"instrumentals", "vocals", "val_instrumentals", "val_vocals"} folder paths.
    """
    import soundfile as sf

    val_tracks = max(2, tracks // 4) if val_tracks is None else val_tracks
    settings = dict(sr=sr, tracks=tracks, seconds=seconds, seed=seed, val_tracks=val_tracks, version=1)
    paths = dict(instrumentals=os.path.join(out_dir, "instrumentals"), vocals=os.path.join(out_dir, "vocals"),
                 val_instrumentals=os.path.join(out_dir, "val", "instrumentals"),
                 val_vocals=os.path.join(out_dir, "val", "vocals"))
    marker = os.path.join(out_dir, "synth.json")
    if os.path.exists(marker):
        try:
            with open(marker) as f:
                if json.load(f) == settings:
                    return paths
        except (OSError, ValueError):
            pass
    for p in paths.values():
        os.makedirs(p, exist_ok=True)
    if verbose:
        print(f"synthesising demo library into {out_dir} ({tracks}+{val_tracks} instrumental and vocal tracks, "
              f"{seconds:g} s at {sr} Hz)")
    for i in range(tracks + val_tracks):
        s = seed * 100003 + i
        folder_i = paths["instrumentals"] if i < tracks else paths["val_instrumentals"]
        folder_v = paths["vocals"] if i < tracks else paths["val_vocals"]
        sf.write(os.path.join(folder_i, f"inst_{i:03d}.wav"), instrumental(seconds, sr, s).T, sr, subtype="PCM_16")
        sf.write(os.path.join(folder_v, f"vocal_{i:03d}.wav"), vocal(seconds, sr, s).T, sr, subtype="PCM_16")
    with open(marker, "w") as f:
        json.dump(settings, f)
    return paths


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--sr", type=int, default=16000)
    p.add_argument("--tracks", type=int, default=16)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(make_library(a.out_dir, a.sr, a.tracks, a.seconds, a.seed))


if __name__ == "__main__":
    main()
