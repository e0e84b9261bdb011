"""Figures: training curves of one or several runs, and the diagnose gradient-flow profile.

matplotlib is an optional extra (pip install 'charrnn[plot]'); it is imported only when a figure
is drawn, and its absence is a MissingDependencyError with that command in the message.
Figures are drawn on a matplotlib.figure.Figure with the Agg canvas, never through pyplot, so no
GUI backend or global figure state is involved.
"""
from __future__ import annotations

import math
from pathlib import Path

from charrnn import atomic, runlog
from charrnn.errors import MissingDependencyError, RunDirError, UsageError

X_AXES = ("step", "chars", "time")
INSTALL_HINT = "matplotlib is not installed: pip install 'charrnn[plot]' (or pip install matplotlib)"


def _figure(**kwargs):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingDependencyError(INSTALL_HINT) from None
    return Figure(**kwargs)


def _save(fig, out: Path) -> Path:
    """Write the figure through atomic.write: a link or FIFO planted at `out` is replaced, never
    written through, and the file gets the umask's mode."""
    out = Path(out)
    kind = out.suffix.lstrip(".").lower() or "png"
    if kind not in fig.canvas.get_supported_filetypes():
        raise UsageError(f"cannot write {out}: .{kind} is not an image format matplotlib writes; "
                         "use .png, .svg or .pdf")
    try:
        atomic.write(out, lambda f: fig.savefig(f, format=kind, dpi=110, bbox_inches="tight"))
    except OSError as e:
        raise RunDirError(f"cannot write {out}: {e.strerror or e}") from None
    return out


# ---- training curves ---------------------------------------------------------------------------
# Records and config.yaml may have been written by anyone: runlog.read_metrics keeps only records
# with a valid step, and every other value is taken through runlog.as_real (None if not a finite number).

def _clip_norm(run: runlog.RunDir) -> float | None:
    value = runlog.as_real(_mapping(runlog.read_config(run).get("train")).get("clip_norm"))
    return value if value is not None and value > 0 else None


def _mapping(value) -> dict:
    return value if isinstance(value, dict) else {}


def _metrics(run: runlog.RunDir) -> list[dict]:
    try:
        return runlog.read_metrics(run.metrics)
    except OSError as e:
        raise RunDirError(f"cannot read {run.metrics}: {e.strerror or e}") from None


def _names(dirs: list[Path]) -> list[str]:
    """Directory names, or the full paths where two runs share a name."""
    names = [d.name for d in dirs]
    return [str(d) if names.count(d.name) > 1 else d.name for d in dirs]


def _x(record: dict, x: str) -> float | None:
    return runlog.as_real(record.get({"step": "step", "chars": "chars_seen", "time": "elapsed_s"}[x]))


def _points(records, x, get) -> tuple[list, list]:
    """(xs, ys) of the records where both the x value and get(record) are finite numbers."""
    pairs = [(xv, yv) for r in records if (xv := _x(r, x)) is not None and (yv := runlog.as_real(get(r))) is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _series(ax, records, x, scale, key, transform=lambda v: v, **style):
    """Plot records[key] against x, skipping records without a (numeric) value."""
    xs, ys = _points(records, x, lambda r: r.get(key))
    if xs:
        ax.plot([v / scale for v in xs], [transform(v) for v in ys], **style)
    return xs


def _sigma_panel(ax, records, x, scale, color, name):
    rows = [r for r in records if isinstance(r.get("w_hh_sigma"), dict)]
    layers = sorted({k for r in rows for k in r["w_hh_sigma"]})  # JSON object keys are always strings
    drawn = False
    for i, layer in enumerate(layers):
        xs, ys = _points(rows, x, lambda r, layer=layer: r["w_hh_sigma"].get(layer))
        if xs:
            ax.plot([v / scale for v in xs], ys, color=color, marker="o", ms=3, ls=("-", "--", ":", "-.")[i % 4],
                    label=f"{name} {layer}" if len(layers) > 1 else name)
            drawn = True
    return drawn


def plot_runs(run_dirs: list, out: str | Path, x: str = "step") -> tuple[Path, list[str]]:
    """Loss (bits/char), gradient norm, learning rate and sigma_max(W_hh) of runs, overlaid.

    Returns the written path and the names of runs left out because they have no metrics yet.
    """
    if x not in X_AXES:
        raise ValueError(f"x must be one of {X_AXES}, got {x!r}")
    dirs = [Path(d) for d in run_dirs]
    for d in dirs:
        if not d.is_dir():
            raise RunDirError(f"{d}: no such run directory")
    runs = [(name, runlog.RunDir(d), _metrics(runlog.RunDir(d))) for name, d in zip(_names(dirs), dirs)]
    skipped = [name for name, _, records in runs if not records]
    runs = [r for r in runs if r[2]]
    if not runs:
        raise RunDirError(f"nothing to plot: no metrics.jsonl records in {', '.join(map(str, dirs))}")
    fig = _figure(figsize=(13, 8.5), layout="constrained")
    (loss, gnorm), (lr, sigma) = fig.subplots(2, 2, sharex=True)
    scale, xlabel = _x_axis(x, runs)
    any_sigma = False
    for i, (name, run, records) in enumerate(runs):
        color = f"C{i % 10}"
        # one legend entry per run: the panel title says which line style is which split
        _series(loss, records, x, scale, "train_loss", lambda v: v / math.log(2), color=color, lw=1.2, alpha=0.8,
                label=name)
        _series(loss, records, x, scale, "val_bpc", color=color, lw=1.8, ls="--", marker="o", ms=4)
        _series(gnorm, records, x, scale, "grad_norm", color=color, lw=1.0, alpha=0.9, label=name)
        clip = _clip_norm(run)
        if clip:
            gnorm.axhline(clip, color=color, ls=":", lw=1.2)
        _series(lr, records, x, scale, "lr", color=color, lw=1.5, label=name)
        any_sigma |= _sigma_panel(sigma, records, x, scale, color, name)
    _style(loss, gnorm, lr, sigma, xlabel, any_sigma)
    fig.suptitle("charrnn: " + " vs ".join(name for name, _, _ in runs), fontsize=12)
    return _save(fig, out), skipped


def _x_axis(x: str, runs) -> tuple[float, str]:
    if x == "step":
        return 1.0, "optimizer step"
    if x == "chars":
        return 1.0, "characters seen"
    longest = max((runlog.as_real(r.get("elapsed_s")) or 0.0) for _, _, records in runs for r in records)
    return (60.0, "training time (minutes)") if longest > 300 else (1.0, "training time (seconds)")


def _style(loss, gnorm, lr, sigma, xlabel: str, any_sigma: bool) -> None:
    from matplotlib.ticker import EngFormatter

    loss.set(title="loss (solid: training, dashed: validation)", ylabel="bits per character")
    values = [v for line in loss.get_lines() for v in line.get_ydata() if v > 0]
    if values and max(values) / min(values) > 20:  # a diverged run would flatten every other curve
        loss.set(yscale="log", ylabel="bits per character (log scale)")
    gnorm.set(title="global gradient norm before clipping (dotted: clip_norm)", ylabel="L2 norm (log scale)",
              yscale="log")
    lr.set(title="learning rate", ylabel="learning rate")
    lo, hi = lr.get_ylim()
    if lo > 0 and hi / lo > 10:
        lr.set_yscale("log")  # a schedule spanning decades
    else:
        lr.set_ylim(0, hi * 1.1)  # a constant or gently decaying rate, seen against zero
        lr.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    sigma.set(title="largest singular value of W_hh (grey: 1)", ylabel="sigma_max(W_hh)")
    if any_sigma:
        sigma.axhline(1.0, color="0.5", lw=0.8)
        lo, hi = sigma.get_ylim()
        if hi > 10:  # saturated runs reach sigma of 50 and more; keep 1 and 3 apart
            sigma.set_yscale("log")
    else:
        sigma.text(0.5, 0.5, "no evaluations with W_hh spectra yet", ha="center", va="center", transform=sigma.transAxes)
    for ax in (loss, gnorm, lr, sigma):
        ax.grid(True, which="major", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
    for ax in (lr, sigma):
        ax.set_xlabel(xlabel)
        if xlabel == "characters seen":
            ax.xaxis.set_major_formatter(EngFormatter())


# ---- the gradient-flow profile ----------------------------------------------------------------

def plot_profile(prof, out: str | Path, title: str = "") -> Path:
    """Mean ||dL/dh|| against distance on a log scale, one line per layer, with the fitted rate."""
    return plot_profiles([("", prof)], out, title)


def plot_profiles(named: list, out: str | Path, title: str = "") -> Path:
    """Several models' profiles on one set of axes: named is [(label, Profile)], labels prefix
    each layer's line (e.g. an rnn and an lstm trained on the same text, side by side)."""
    import numpy as np

    from charrnn.diagnose import fit_line

    fig = _figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    lines = [(f"{label} {prof.cell} {name}".strip(), f) for label, prof in named for name, f in prof.layers.items()]
    for i, (name, f) in enumerate(lines):
        k = np.arange(len(f.norms))
        ax.plot(k, f.norms, color=f"C{i}", marker="o", ms=3, label=f"{name}: sigma_max(W_hh) = {f.sigma:.3f}")
        slope, intercept = fit_line(f.norms)
        if math.isfinite(slope):
            ax.plot(k, np.exp(intercept + slope * k), color=f"C{i}", ls="--", lw=1,
                    label=f"{name} fit: x{math.exp(slope):.3f} per step")
    prof = named[0][1]
    ax.set(yscale="log", xlabel="distance back from the loss position (steps)", ylabel="mean ||dL/dh_t|| (log scale)",
           title=title or f"gradient flow over {prof.windows} windows of {prof.length} characters")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out)
