"""Files shipped inside the package: the trained demo model, its exported engine and a sample clip.

`demo-engine` is `blip3v export --model blip3v/assets/demo-model --out blip3v/assets/demo-engine`
(fp32, GroupQueryAttention decoder, split visual graphs): what `blip3v ask` runs when neither
--model nor --engine is given, torch-free. tests/test_session.py checks that it answers as the
demo model does.
"""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
DEMO_MODEL = ASSETS / "demo-model"
DEMO_ENGINE = ASSETS / "demo-engine"
SAMPLE_CLIP = ASSETS / "sample.mp4"
