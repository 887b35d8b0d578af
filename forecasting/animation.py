"""Stage 6c, animation: one series played forward — live values, the forecast cone rolling with the
origin, and the anomaly detector's flags marked as they are raised.

Every frame is a forecast made from that frame's origin with data before it only (the default
Harmonic model, refitted per frame on this one series) and flags from the causal detector
(`sensorfleet.detection`), so the film shows what an operator would have seen live. Written as a
GIF (matplotlib's Pillow writer) always and as an MP4 when ffmpeg is on PATH; never a placeholder.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import animation as mpl_animation  # noqa: E402

from sensorfleet.forecasting.prepare import Panel  # noqa: E402

GIF, MP4 = "animation.gif", "animation.mp4"
FRAMES, FPS, DPI = 36, 6, 72


def rolling_forecasts(panel: Panel, row: int, origins: np.ndarray, horizon: int, level: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(mean, lo, hi) of the default model from each origin, fitted on steps before it."""
    from sensorfleet.forecasting.models import HarmonicRegression

    one = panel.subset(np.array([row]))
    model = HarmonicRegression()
    out = []
    for origin in origins:
        block, _ = model.fit_predict(one, int(origin), horizon, level)
        out.append((block.mean[0], block.lo[0], block.hi[0]))
    return out


def detector_flags(values: np.ndarray) -> np.ndarray:
    """Causal flags of the streaming ensemble on the series as collected."""
    from sensorfleet.detection.detectors import detect_series, to_score
    from sensorfleet.detection.run import DEFAULT_THRESHOLD

    return to_score(detect_series(values)["ensemble"]) >= DEFAULT_THRESHOLD


def fault_counts(panel: Panel, horizon: int) -> np.ndarray:
    """Injected faults of each series in the animated stretch."""
    history = min(panel.n_steps // 2, max(3 * horizon, 240))
    return (panel.truth[:, max(0, panel.n_steps - 2 * history) :] != 0).sum(axis=1)


def pick_series(panel: Panel, horizon: int) -> int:
    """The series with the most injected faults in the animated stretch (else the first): a film
    of a quiet series shows no flag."""
    return int(np.argmax(fault_counts(panel, horizon))) if panel.n_series else 0


def write_animation(out: Path, panel: Panel, row: int, horizon: int, level: int, frames: int = FRAMES, ffmpeg: str | None = "auto") -> dict[str, str | None]:
    """Write OUT/animation.gif (and OUT/animation.mp4 with ffmpeg); returns the file names."""
    out = Path(out)
    n = panel.n_steps
    history = min(n // 2, max(3 * horizon, 240))
    first = max(horizon, n - history - horizon)  # origins sweep the last `history` steps
    origins = np.unique(np.linspace(first, n, frames).astype(int))
    cones = rolling_forecasts(panel, row, origins, horizon, level)
    raw = panel.raw[row]
    flags = detector_flags(raw)
    truth = panel.truth[row] != 0
    times = panel.times(0, n + horizon).tz_convert(None)
    ids = panel.ids.iloc[row]
    shown = raw[max(0, first - history) :]
    finite = np.concatenate([shown[np.isfinite(shown)], *(c[1][np.isfinite(c[1])] for c in cones), *(c[2][np.isfinite(c[2])] for c in cones)])
    lo_y, hi_y = (float(np.min(finite)), float(np.max(finite))) if len(finite) else (0.0, 1.0)
    pad = 0.15 * (hi_y - lo_y or 1.0)

    fig, ax = plt.subplots(figsize=(8.0, 3.2))

    def draw(i: int) -> None:
        ax.clear()
        origin = int(origins[i])
        lo = max(0, origin - history)
        seen = np.arange(lo, origin)
        ax.plot(times[seen], raw[seen], color="#333333", lw=0.8, label="live values")
        mean, low, high = cones[i]
        ahead = times[origin : origin + horizon]
        ax.fill_between(ahead, low, high, color="#55a868", alpha=0.25, label=f"forecast {level}% cone")
        ax.plot(ahead, mean, color="#55a868", lw=1.2, label="forecast")
        marked = seen[flags[seen]]
        ax.scatter(times[marked], raw[marked], marker="x", color="#c44e52", s=28, zorder=3, label="detector flag")
        labelled = seen[truth[seen]]
        ax.scatter(times[labelled], np.nan_to_num(raw[labelled], nan=lo_y), facecolors="none", edgecolors="#8172b3", s=40, zorder=2, label="injected fault")
        ax.axvline(times[origin], color="#999999", lw=0.6, ls="--")
        ax.set_xlim(times[lo], times[min(origin + horizon, len(times) - 1)])
        ax.set_ylim(lo_y - pad, hi_y + pad)
        ax.set_title(f"{ids['unique_id']} [{ids['unit']}] — now {times[origin]:%Y-%m-%d %H:%M}", fontsize=9, loc="left")
        ax.legend(loc="upper left", fontsize=6, ncol=3)
        ax.tick_params(labelsize=7)

    film = mpl_animation.FuncAnimation(fig, draw, frames=len(origins), interval=1000 / FPS)
    film.save(out / GIF, writer=mpl_animation.PillowWriter(fps=FPS), dpi=DPI)
    written: dict[str, str | None] = {"gif": GIF, "mp4": None, "frames": str(len(origins))}
    binary = shutil.which("ffmpeg") if ffmpeg == "auto" else ffmpeg
    if binary:
        plt.rcParams["animation.ffmpeg_path"] = binary
        film.save(out / MP4, writer=mpl_animation.FFMpegWriter(fps=FPS, codec="libx264", extra_args=["-pix_fmt", "yuv420p"]), dpi=DPI)
        written["mp4"] = MP4
    plt.close(fig)
    return written
