"""What `charrnn train` shows on stderr: a tqdm bar on a terminal, plain log lines elsewhere.

Batch jobs, pipes and CI get one line per logged step and no carriage returns.
"""
from __future__ import annotations

import math
import sys

import click
from tqdm import tqdm

from charrnn import errors


def _fmt(x, spec=".4f") -> str:
    return "-" if x is None else format(x, spec)


class Reporter:
    """The train() report callback; a context manager so the bar is closed on every exit."""

    def __init__(self, stream=None, bar: bool | None = None):
        self.stream = stream or sys.stderr
        self.use_bar = self.stream.isatty() if bar is None else bar
        self.bar = None
        self.last_val = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def echo(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            click.echo(line, file=self.stream)

    def __call__(self, kind: str, r: dict) -> None:
        getattr(self, f"on_{kind}", lambda r: None)(r)

    def on_start(self, r):
        self.echo(f"run {r['run_dir']}: {r['objective']} model, {r['params']:,} parameters, vocabulary {r['vocab']}, "
                  f"{r['train_chars']:,} training / {r['val_chars']:,} validation characters"
                  f"{' (cached encoding)' if r['cached'] else ''}, batch {r['batch_size']}")
        if self.use_bar:
            self.bar = tqdm(total=r["max_steps"], initial=r["step"], file=self.stream, dynamic_ncols=True,
                            unit="step", desc="train")

    def on_warning(self, r):
        self.echo(f"warning: {errors.render(r['message'], 'cli')}")  # advice in command-line terms

    def on_step0(self, r):
        self.echo(f"step 0 loss {r['loss']:.4f} (ln V = {r['ln_v']:.4f}, the loss of a uniform guess)")

    def on_step(self, r):
        if self.bar is not None:
            self.bar.update(1)

    def on_log(self, r):
        if "val_loss" in r:
            self.last_val = r["val_loss"]
        if self.bar is not None:
            self.bar.set_postfix(loss=_fmt(r["train_loss"]), val=_fmt(self.last_val),
                                 cps=_fmt(r["chars_per_sec"], ",.0f"), refresh=False)
            if "val_loss" in r:
                self.echo(f"step {r['step']}: val loss {r['val_loss']:.4f} nats/char ({r['val_bpc']:.4f} bits/char)")
            return
        line = (f"step {r['step']} | loss {_fmt(r['train_loss'])} | lr {r['lr']:.2e} | grad norm {_fmt(r['grad_norm'], '.3f')}"
                f" | {_fmt(r['chars_per_sec'], ',.0f')} chars/s | {r['elapsed_s']:.0f}s")
        if "val_loss" in r:
            line += f" | val {r['val_loss']:.4f} nats/char ({r['val_bpc']:.4f} bits/char)"
        self.echo(line)

    def on_sample(self, r):
        pass  # samples are written to the run's samples/ directory

    def summary(self, s) -> None:
        best = (f"best val loss {s.best_val_loss:.4f} nats/char ({s.best_val_loss / math.log(2):.4f} bits/char) "
                f"at step {s.best_step}"
                if s.best_val_loss is not None else "no validation")
        self.echo(f"done: {s.steps} steps, {s.chars_seen:,} characters in {s.elapsed_s:.0f}s "
                  f"({s.chars_per_sec:,.0f} chars/s this session); {best} [{s.objective}]")
        self.echo(f"checkpoints: {s.last_checkpoint}" + (f", {s.best_checkpoint}" if s.best_checkpoint else ""))
        if s.objective == "next-char":
            self.echo(f"sample:   charrnn sample {s.run_dir} --length 500")
        else:
            self.echo(f"infill:   charrnn sample {s.run_dir} --infill 'Th_ qu_ck br__n f_x'")
        self.echo(f"evaluate: charrnn eval {s.run_dir}")
        self.echo(f"inspect:  charrnn plot {s.run_dir} -o {s.run_dir}/plot.png; charrnn diagnose {s.run_dir}")
