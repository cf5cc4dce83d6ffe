"""How the bundled sample clips were made (kept for the record; `make demo` uses the committed files).

Two synthetic speakers from espeak-ng (Debian package `espeak-ng`), saved as 22.05 kHz FLAC so the
demo exercises resampling; one longer recording is referenced by start/end windows.
Run from this directory: python make_sample_data.py
"""
import csv
import json
import subprocess
from pathlib import Path

import numpy as np
import soundfile as sf

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello there, how are you today?",
    "I am fine, thank you for asking.",
    "What time is it right now?",
    "It is half past nine in the morning.",
    "She sells sea shells by the sea shore.",
    "Peter Piper picked a peck of pickled peppers.",
    "Speech synthesis turns text into sound.",
    "A conversational model listens before it speaks.",
    "The weather is lovely this afternoon.",
    "Please close the door behind you.",
    "We will meet again next week.",
    "Numbers like one, two and three are easy.",
    "The train leaves at seven o'clock.",
    "Could you pass me the salt, please?",
    "Reading a good book is relaxing.",
    "The children played in the garden.",
    "My favourite colour is green.",
    "Turn left at the next corner.",
    "Thank you very much for your help.",
]
VAL = [
    "Good evening and welcome to the show.",
    "The coffee is still too hot to drink.",
    "Let us begin with a short story.",
    "Rain is expected later tonight.",
]
VOICES = {0: "en-us", 1: "en+f3"}


def speak(text, voice, path):
    wav = path.with_suffix(".wav")
    subprocess.run(["espeak-ng", "-v", voice, "-s", "165", "-w", str(wav), text], check=True)
    audio, sr = sf.read(wav)
    wav.unlink()
    sf.write(path, audio, sr, format="FLAC")
    return len(audio) / sr


def main():
    clips = Path("clips")
    clips.mkdir(exist_ok=True)
    train_rows = []
    for i, text in enumerate(SENTENCES):
        speaker = i % 2
        speak(text, VOICES[speaker], clips / f"train_{i:02d}.flac")
        train_rows.append({"path": f"clips/train_{i:02d}.flac", "text": text, "speaker": speaker})
    # One longer recording of three sentences with silence between; rows point at windows of it.
    parts, windows, t, sr = [], [], 0.0, None
    for j, text in enumerate(VAL[:3]):
        tmp = clips / f"_part{j}.flac"
        speak(text, VOICES[0], tmp)
        audio, sr = sf.read(tmp)
        tmp.unlink()
        gap = np.zeros(int(0.5 * sr))
        windows.append((round(t, 3), round(t + len(audio) / sr, 3), text))
        parts += [audio, gap]
        t += (len(audio) + len(gap)) / sr
    sf.write(clips / "long_recording.flac", np.concatenate(parts), sr, format="FLAC")
    val_rows = [{"path": "clips/long_recording.flac", "text": text, "start": s, "end": e, "speaker": 0}
                for s, e, text in windows]
    speak(VAL[3], VOICES[1], clips / "val_03.flac")
    val_rows.append({"path": "clips/val_03.flac", "text": VAL[3], "speaker": 1})
    with open("train.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "text", "speaker"])
        w.writeheader()
        w.writerows(train_rows)
    Path("val.json").write_text(json.dumps(val_rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
