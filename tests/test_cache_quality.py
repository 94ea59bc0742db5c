"""benchmarks/cache_quality.py end to end on its random tiny model (3 steps, 1 clip per class):
every row runs, the diffusers loop on the converted weights reproduces fmrt's full CFG, block
counts follow the plans, and the table, JSON and plot are written."""
import json
import math

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("matplotlib")

from benchmarks.cache_quality import main  # noqa: E402


def test_cache_quality_tiny(tmp_path):
    out, png = tmp_path / "cq", tmp_path / "cq.png"
    assert main(["--tiny", "--steps", "4", "--per-class", "1", "--out", str(out),
                 "--plot", str(png)]) == 0
    doc = json.loads((tmp_path / "cq.json").read_text())
    rows = {(r["policy"], r["settings"]): r for r in doc["results"]}
    full = doc["results"][0]
    assert full["policy"] == "Euler 4" and math.isinf(full["psnr_db"])
    assert full["block_evals"] == pytest.approx(2 * 4 * 3)   # 2 branches x 4 steps x 3 blocks
    wan = rows[("diffusers Wan loop", "4 steps")]
    assert wan["psnr_db"] > 60 and wan["pct_blocks"] == pytest.approx(100)
    # static reuse every 2 (first 1): uncond forwards at steps 0 and 2 -> 6 of 8 calls
    assert rows[("guidance reuse (static)", "every 2, first 1, last 0")]["pct_blocks"] == \
        pytest.approx(75)
    assert rows[("apply_taylorseer_cache", "defaults (no hook matches Wan)")]["psnr_db"] > 60
    assert len(doc["results"]) > 30 and "verdict" in doc
    assert (tmp_path / "cq.md").read_text().count("\n| ") == len(doc["results"]) + 1
    assert png.stat().st_size > 1000
