"""Speech and language engines (STT, LLM, TTS) behind small interfaces."""
