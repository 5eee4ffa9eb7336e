"""One reader for the JSON documents a user hands the tools (a Hugging Face ``config.json``, a
bench result): errors name the file and say what it should have been; and one writer for the
JSON the tools hand back (strict JSON: no NaN or Infinity, which most parsers refuse)."""
from __future__ import annotations

import json
import math
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


def finite_or_null(value: Any) -> Any:
    """``value`` with every NaN or infinite float (in nested dicts, lists, tuples) made None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


def strict_json(value: Any, **kwargs) -> str:
    """``json.dumps`` that writes null for NaN and infinities instead of invalid JSON."""
    return json.dumps(finite_or_null(value), allow_nan=False, **kwargs)


__all__ = ["read_json_object", "finite_or_null", "strict_json"]
