"""Silero VAD's 1-D conv encoder (pretrained, from the ``silero-vad`` wheel) as a model on its own,
and synthetic voiced audio to calibrate and evaluate it.

The full model takes a recurrent state whose batch axis is not the first, so only the part a
low-rank tool can act on is cut out: raw audio -> STFT (a 1-D conv with a fixed basis) ->
magnitude -> four 1-D convs with ReLU (the encoder), using onnx's own ``extract_model``. The audio
is no speech corpus: voiced segments (a glottal-like harmonic series on a wandering pitch, shaped
by three moving formant resonances) and pauses with background noise, 16 kHz. Calibration and
evaluation use different seeds.

    pip install silero-vad==6.2.3 --no-deps
    python tools/silero_encoder.py /tmp/silero-encoder.onnx --audio /tmp/audio-calib.npz --count 300 --seed 1
    python tools/silero_encoder.py /tmp/silero-encoder.onnx --audio /tmp/audio-eval.npz --count 120 --seed 2
"""

from __future__ import annotations

import argparse
from importlib import resources

import numpy as np
import onnx.utils
import scipy.signal

RATE = 16000
ENCODER_OUTPUT = "/model/encoder/3/activation/Relu_output_0"


def voiced_audio(rng: np.random.Generator, seconds: float = 1.0) -> np.ndarray:
    samples = int(RATE * seconds)
    t = np.arange(samples) / RATE
    pitch = rng.uniform(90, 250) * (1 + 0.15 * np.sin(2 * np.pi * rng.uniform(0.5, 3) * t))
    phase = 2 * np.pi * np.cumsum(pitch) / RATE
    source = sum(np.sin(k * phase) / k for k in range(1, 30))
    signal = np.zeros(samples)
    for formant, width in ((rng.uniform(300, 900), 80), (rng.uniform(900, 2500), 120), (rng.uniform(2400, 3500), 160)):
        b, a = scipy.signal.iirpeak(formant, formant / width, fs=RATE)
        signal += scipy.signal.lfilter(b, a, source)
    envelope = np.zeros(samples)
    start = 0
    while start < samples:  # syllables and pauses
        length = int(rng.uniform(0.08, 0.3) * RATE)
        if rng.random() < 0.7:
            envelope[start:start + length] = np.hanning(min(length, samples - start) + 2)[1:-1]
        start += length
    audio = signal * envelope / (np.abs(signal).max() + 1e-9) * rng.uniform(0.1, 0.9)
    return (audio + rng.normal(0, rng.uniform(0.001, 0.02), samples)).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="where to write the encoder .onnx")
    parser.add_argument("--audio", help=".npz of 1-second clips to write (key 'input')")
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    source = resources.files("silero_vad") / "data" / "silero_vad_16k_op15.onnx"
    onnx.utils.extract_model(str(source), args.model, ["input"], [ENCODER_OUTPUT])
    if args.audio:
        rng = np.random.default_rng(args.seed)
        np.savez(args.audio, input=np.stack([voiced_audio(rng) for _ in range(args.count)]))
    print(f"wrote {args.model}" + (f" and {args.count} clips to {args.audio}" if args.audio else ""))


if __name__ == "__main__":
    main()
