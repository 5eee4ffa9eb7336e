"""One reader for the JSON documents a user hands the tools (a Hugging Face ``config.json``, a
bench result): errors name the file and say what it should have been."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import ConfigError


def read_json_object(path: str | Path, what: str, error: type = ConfigError) -> dict[str, Any]:
    """path -> the JSON object in it; ``error`` (naming ``path`` and ``what`` it should hold) when
    it cannot be read, is not JSON, or is not an object."""
    path = Path(path)
    try:
        values = json.loads(path.read_text())
    except OSError as exc:
        raise error(f"{path}: cannot read the {what}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise error(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(values, dict):
        raise error(f"{path}: must hold a JSON object ({what})")
    return values


__all__ = ["read_json_object"]
