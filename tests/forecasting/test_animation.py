"""The forecast job's animation: a real multi-frame GIF always, an MP4 when ffmpeg is there, both
shown by report.html."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageSequence

from sensorfleet.forecasting.animation import write_animation
from sensorfleet.forecasting.load import read_readings
from sensorfleet.forecasting.prepare import finish_prepare, resample


def test_the_forecast_job_writes_an_animated_gif_shown_in_the_report(forecast_out: Path) -> None:
    gif = forecast_out / "animation.gif"
    with Image.open(gif) as image:
        assert image.format == "GIF"
        frames = [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(image)]
    assert len(frames) >= 20
    # frames differ: the cone rolls forward (not one still image repeated)
    assert sum(not np.array_equal(frames[0], f) for f in frames[1:]) >= len(frames) // 2
    html = (forecast_out / "report.html").read_text()
    assert 'src="animation.gif"' in html
    metrics = json.loads((forecast_out / "metrics.json").read_text())
    assert metrics["animation"]["gif"] == "animation.gif"


@pytest.mark.skipif(shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None, reason="ffmpeg is installed by make test (hack/system-packages.txt)")
def test_with_ffmpeg_there_is_an_mp4_too(forecast_out: Path) -> None:
    mp4 = forecast_out / "animation.mp4"
    probe = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0", "-show_entries", "stream=codec_name,nb_read_frames", "-of", "json", str(mp4)],
                           capture_output=True, text=True, timeout=120, check=True)
    stream = json.loads(probe.stdout)["streams"][0]
    assert stream["codec_name"] == "h264" and int(stream["nb_read_frames"]) >= 20
    assert 'src="animation.mp4"' in (forecast_out / "report.html").read_text()


def test_without_ffmpeg_only_the_gif_is_written(tmp_path: Path, dataset: Path) -> None:
    readings = read_readings(str(dataset), 7, None)
    panel = finish_prepare(resample(readings, "1min"), len(readings), 60, 3).panel
    written = write_animation(tmp_path, panel, 0, 60, 95, frames=8, ffmpeg=None)
    assert written["mp4"] is None and not (tmp_path / "animation.mp4").exists()
    with Image.open(tmp_path / "animation.gif") as image:
        assert image.n_frames == 8
