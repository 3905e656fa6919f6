"""Text to speech with Piper, on an onnxruntime session we build ourselves
(``PiperVoice.load`` would let onnxruntime take every core)."""
from __future__ import annotations

import json
import os
from typing import Iterator

# onnxruntime (1.32 on Linux) sends usage telemetry to mobile.events.data.microsoft.com unless this is
# set before its environment starts: nothing may leave the box (tests/test_offline.py catches it).
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")


class PiperTTS:
    def __init__(self, model: str, config: str, threads: int = 1, length_scale: float | None = None):
        import onnxruntime
        from piper.config import PiperConfig, SynthesisConfig
        from piper.voice import PiperVoice
        opts = onnxruntime.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        session = onnxruntime.InferenceSession(str(model), sess_options=opts, providers=["CPUExecutionProvider"])
        with open(config, encoding="utf-8") as f:
            cfg = PiperConfig.from_dict(json.load(f))
        self.voice = PiperVoice(session=session, config=cfg)
        self.rate = cfg.sample_rate
        self.syn = SynthesisConfig(length_scale=length_scale)

    def synthesize(self, text: str) -> Iterator[bytes]:
        """Mono s16le chunks at ``self.rate``, one per sentence Piper finds in ``text``."""
        for chunk in self.voice.synthesize(text, self.syn):
            yield chunk.audio_int16_bytes
