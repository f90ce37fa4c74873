"""README.md's Python example runs as written, saved as a script (Dask's workers re-import it)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from survey_engine import open_mosaic, read_catalog

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    """The contents of the fenced ```python blocks of a Markdown text, in order."""
    return re.findall(r"^```python\n(.*?)^```$", text, flags=re.MULTILINE | re.DOTALL)


def test_python_blocks_are_found():
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 1
    assert all("import survey_engine as se" in b for b in blocks[:1])
    # the workers of a LocalCluster import the script again: the work must sit under the guard
    assert 'if __name__ == "__main__":' in blocks[0]


@pytest.mark.slow
def test_readme_python_example_runs_as_a_script(tmp_path):
    script = tmp_path / "readme_example.py"
    script.write_text("\n\n".join(python_blocks(README.read_text())))
    # what a failed first try leaves behind must not block the next one
    (tmp_path / "field.zarr").mkdir()
    (tmp_path / "field.zarr" / "zarr.json").write_text("{}")
    (tmp_path / "out").mkdir()
    proc = subprocess.run(
        [sys.executable, script.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    assert proc.stdout.startswith("(3, 512, 512) ('g', 'r', 'i') 0.2")
    assert "catalog vs truth:" in proc.stdout
    for name in (
        "truth.parquet",
        "out/catalog.parquet",
        "out/segmentation.zarr/zarr.json",
        "plots/completeness.png",
        "img_g.fits",
        "wht_r.fits",
    ):
        assert (tmp_path / name).is_file(), name
    field = open_mosaic(str(tmp_path / "field.zarr"))
    assert field.shape == (3, 512, 512)
    cat = read_catalog(tmp_path / "out" / "catalog.parquet")
    assert len(cat) > 50
    real = open_mosaic(str(tmp_path / "real.zarr"))
    assert real.bands == ("g", "r")
    assert real.zero_points == {b: field.zero_points[b] for b in ("g", "r")}
    good = np.isfinite(field.variance[1]) & (field.mask[1] == 0)
    np.testing.assert_array_equal(real.image[1][good], field.image[1][good])
