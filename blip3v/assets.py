"""Files shipped inside the package: the trained demo model and a sample clip."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
DEMO_MODEL = ASSETS / "demo-model"
SAMPLE_CLIP = ASSETS / "sample.mp4"
