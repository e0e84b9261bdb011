"""Command-line interface: parse options, call the library, turn its errors into exit codes.

Exit codes: 0 success; 1 failure (missing or broken file, non-finite training, disk error);
2 usage or config error; 130 interrupted by SIGINT; 141 stdout closed by its reader (`| head`);
143 stopped by SIGTERM.
Results go to stdout (sample text, eval numbers); progress and messages go to stderr.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import stat
import sys
from pathlib import Path

import click
import numpy as np

from charrnn import __version__, api, config, dataset, distributed, evaluate
from charrnn.errors import CharRNNError, DataError, UsageError
from charrnn.output import Output

SIGNAL_EXIT = {"SIGINT": 130, "SIGTERM": 143}
SIGPIPE_EXIT = 141  # stdout closed by its reader
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _fail(e: CharRNNError) -> None:
    if not distributed.quiet_here(e):  # an error every rank of a parallel run has is rank 0's to report
        click.echo(f"error: {e.render('cli')}", err=True)
    if distributed.parallel():
        distributed.leave(e.exit_code)  # MPI_Finalize would wait for ranks that may be gone
    sys.exit(e.exit_code)


def _one_line(e: click.ClickException, fallback: str) -> str:
    """A click usage error as one line, with where to read the usage (`fallback`: the command
    path when click raised the error before it had a context for the command)."""
    message = "; ".join(part.strip() for part in e.format_message().splitlines() if part.strip())
    if isinstance(e, click.UsageError):
        ctx = getattr(e, "ctx", None)
        message += f" (see '{ctx.command_path if ctx is not None else fallback} --help')"
    return message


def _out() -> Output:
    return Output()


def _print(text: str, out: Output | None = None) -> None:
    """A whole result, as one line (or block) on stdout, written out completely or reported."""
    out = out or _out()
    out.line(text)
    out.flush()


class Group(click.Group):
    """Turns library errors raised inside any command into one line and the right exit code.

    Ctrl-C (outside training, which saves first) exits 130 like any interrupted Unix tool, not
    click's "Aborted!" with 1. A reader that stops early (`charrnn sample RUN | head`) is not an
    error: the rest of the output goes nowhere and the exit is 141 (128 + SIGPIPE), as for `cat`.
    """

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """click's own error report is several lines ("Usage: ...", "Error: ..."); charrnn's
        promise is one line starting with `error:`, so click runs in non-standalone mode and its
        usage errors are reported here."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, False, **extra)
        except click.exceptions.NoArgsIsHelpError as e:
            e.show()  # plain `charrnn`: the help text is the useful answer
            sys.exit(e.exit_code)
        except click.ClickException as e:
            words = list(sys.argv[1:] if args is None else args)
            command = [prog_name or "charrnn"] + [w for w in words[:1] if w in self.commands]
            click.echo(f"error: {_one_line(e, ' '.join(command))}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:  # Ctrl-C or end of input while click itself was reading
            click.echo("\ncharrnn: interrupted", err=True)
            sys.exit(SIGNAL_EXIT["SIGINT"])
        sys.exit(rv if isinstance(rv, int) else 0)  # an int here is the code of click's Exit (--help: 0)

    def invoke(self, ctx):
        """Run a command, turning what it raises into one line and an exit code."""
        try:
            return super().invoke(ctx)
        except CharRNNError as e:
            _fail(e)
        except MemoryError:
            click.echo("error: out of memory; use a smaller model, batch or option value", err=True)
            sys.exit(1)
        except BrokenPipeError:
            # what Python's signal docs advise: point stdout at devnull so that the flush at exit
            # does not raise again and print a traceback
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno() if sys.stdout else 1)
            sys.exit(SIGPIPE_EXIT)
        except OSError as e:
            # the last line of defence for a file error the library did not foresee: one line,
            # not a traceback
            where = f"{e.filename}: " if e.filename else ""
            click.echo(f"error: {where}{e.strerror or e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("\ncharrnn: interrupted", err=True)
            sys.exit(SIGNAL_EXIT["SIGINT"])


@click.group(cls=Group, context_settings=CONTEXT)
@click.version_option(__version__, "--version", prog_name="charrnn")
def cli():
    """Character-level RNN language models on numpy: train, sample, eval; diagnose, plot, runs."""


# ---- train ------------------------------------------------------------------------------------

class _Stopper:
    """First SIGINT/SIGTERM: finish the step, save, exit 130/143. Second SIGINT: exit now.

    Batch schedulers (Slurm, SGE, Kubernetes) send SIGTERM some time before SIGKILL; that lead
    time must cover one step, an evaluation if one is due, and writing last.npz.
    """

    def __init__(self):
        self.reason = None

    def __call__(self):
        return self.reason

    def handle(self, signum, frame):
        """The signal handler: note the reason, or leave at once on a second Ctrl-C."""
        name = signal.Signals(signum).name
        if self.reason is not None:
            if name == "SIGINT":
                os._exit(130)  # second Ctrl-C: leave at once, touching no files
            return
        # set before anything else: a second signal can run this handler again at any bytecode
        self.reason = name
        # os.write, not click.echo: a handler may run while the main thread is inside a
        # buffered write to stderr, and re-entering that buffer raises RuntimeError
        again = "; Ctrl-C again quits at once without saving" if name == "SIGINT" else ""
        if distributed.parallel() and distributed.world().rank != 0:
            return  # rank 0 says it for all: the ranks stop at the same step
        try:
            os.write(2, f"\ncharrnn: {name} received: finishing this step and saving last.npz{again}\n".encode())
        except OSError:
            pass

    def install(self):
        """Handle SIGINT and SIGTERM from now on."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.handle)


@cli.command(context_settings=CONTEXT)
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              help="YAML config file (default: the built-in defaults, as in configs/default.yaml).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override one config key, e.g. --set train.lr=3e-3 (repeatable).")
@click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Run directory (default: runs/<name>-<timestamp>).")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Continue the run in this directory from its last.npz.")
@click.option("--init-from", type=click.Path(dir_okay=False, path_type=Path),
              help="Start a new run from this checkpoint's weights.")
@click.option("--list-keys", is_flag=True, help="List every config key with its default and exit.")
def train(config_path, sets, run_dir, resume_dir, init_from, list_keys):
    """Train a model; writes config, metrics, checkpoints and samples into a run directory."""
    if list_keys:
        _print(config.describe_keys())
        return
    if resume_dir and (config_path or init_from or (run_dir and run_dir != resume_dir)):
        raise UsageError("--resume takes the run's own config: do not combine it with -c, --init-from or --run-dir")
    stopper = _Stopper()
    stopper.install()
    summary = api.train(config_path, resume_dir or run_dir, resume=bool(resume_dir), init_from=init_from,
                        progress=True, sets=sets, stop=stopper)
    if summary.interrupted:
        if distributed.parallel() and distributed.world().rank != 0:
            sys.exit(SIGNAL_EXIT[summary.interrupted])
        click.echo(f"stopped by {summary.interrupted} at step {summary.steps}; last.npz saved. Continue with:\n"
                   f"  charrnn train --resume {shlex.quote(str(summary.run_dir))}", err=True)
        sys.exit(SIGNAL_EXIT[summary.interrupted])


# ---- sample -----------------------------------------------------------------------------------

@cli.command(context_settings=CONTEXT)
@click.argument("target", type=click.Path(path_type=Path))
@click.option("-l", "--length", type=click.IntRange(min=0), default=500, show_default=True, help="Characters to generate.")
@click.option("-t", "--temperature", type=click.FloatRange(0, min_open=True), default=1.0, show_default=True,
              help="Divides the logits: < 1 is more conservative, > 1 more random.")
@click.option("--top-k", type=click.IntRange(min=1), default=None, help="Sample only among the K most likely characters.")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True,
              help="Nucleus sampling: the smallest set of characters with this much probability.")
@click.option("--prime", default="", help="Text to start from (printed before the generated text).")
@click.option("--seed", type=click.IntRange(min=0), default=None,
              help="Random seed; the same seed gives the same text. Default: random (printed to stderr).")
@click.option("--greedy", is_flag=True, help="Always take the most likely character.")
@click.option("-n", "--num-samples", "n", type=click.IntRange(min=1), default=1, show_default=True,
              help="Independent samples, generated as one batch, separated by a line '---'.")
@click.option("--stop", default=None, help="Stop a sample after this string appears in it.")
@click.option("--infill", default=None, metavar="TEMPLATE", help="Bidirectional models: fill every mask character in TEMPLATE.")
@click.option("--mask", default="_", show_default=True, help="The mask character for --infill.")
def sample(target, length, temperature, top_k, top_p, prime, seed, greedy, n, stop, infill, mask):
    """Generate text from a checkpoint or run directory (its best.npz, else last.npz)."""
    from charrnn.sample import Knobs, check_objective

    if len(mask) != 1:
        raise click.BadParameter("must be exactly one character", param_hint="--mask")
    # before any file is read: NaN, overflowing and underflowing values are refused
    Knobs(temperature, top_k or 0, top_p, greedy).check()
    model = api.load(target)
    check_objective(model.spec, infill is not None)  # before a seed is printed for a request that is refused
    if seed is None:
        seed = int(np.random.SeedSequence().entropy % 2**32)
        if not greedy:  # greedy output does not depend on the seed: printing one would suggest it does
            click.echo(f"seed {seed}", err=True)
    out = _out()
    knobs = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed, "greedy": greedy}
    if infill is not None:
        _print(model.infill(infill, mask, **knobs), out)
    elif n > 1:  # a batch is printed when done
        _print("\n---\n".join(model.sample(length, prime, n=n, stop=stop, **knobs)), out)
    else:  # one sample is streamed as it is generated, a line at a time
        for piece in model.stream(length, prime, stop=stop, **knobs):
            out.write(piece)
            if piece.endswith("\n"):
                out.flush()
        _print("", out)


def _run_config(model: api.Model) -> config.Config | None:
    """The config.yaml of the run directory holding this checkpoint, if it is a regular file the
    user owns; else None.

    A checkpoint's meta is written by whoever made the file, so it never chooses what eval or
    diagnose read or where they write (a downloaded checkpoint could name any file and any cache
    directory). The run's own config.yaml, which the user's `charrnn train` wrote, may.
    """
    path = model.path
    if path.parent.name != "checkpoints":
        return None
    own = path.parent.parent / "config.yaml"
    try:
        st = os.lstat(own)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        return None
    return config.load(own)


def _scratch(run_cfg) -> Path:
    """Where eval and diagnose put the ids of a --corpus file (memory-mapped, deleted at once):
    the user's cache (their run's data.cache_dir, else the environment's), never one named by a
    checkpoint."""
    from charrnn.corpus import cache_root

    return cache_root(run_cfg.data.cache_dir if run_cfg else None) / "scratch"


def _run_text(model: api.Model, run_cfg, what: str):
    """The run's own corpus (from its config.yaml), checked against the checkpoint."""
    if run_cfg is None:
        raise UsageError(f"{model.path} is not in a run directory of yours (no config.yaml you own next to its "
                         f"checkpoints/), so it cannot say which text to read; give the text to {what} with --corpus FILE")
    data = dataset.load(run_cfg.data)
    if data.vocab != _vocab(model):
        raise DataError(f"the run's corpus {data.source} changed since the checkpoint was written; "
                        f"{what} a file with --corpus")
    recorded = model.meta.get("corpus_sha256")
    if isinstance(recorded, str) and recorded != data.sha256:
        click.echo(f"warning: the run's corpus {data.source} changed since the checkpoint was written "
                   "(same characters, other text); the numbers are for the text as it is now", err=True)
    return data


def _check_corpus(corpus: Path) -> None:
    if not corpus.exists():
        raise DataError(f"--corpus {corpus}: no such file")


def _vocab(model: api.Model):
    from charrnn.vocab import Vocab

    return Vocab(model.vocab, model.unk)


# ---- eval -------------------------------------------------------------------------------------

@cli.command(name="eval", context_settings=CONTEXT)
@click.argument("target", type=click.Path(path_type=Path))
@click.option("--corpus", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Score this text file instead of a split of the training corpus.")
@click.option("--split", type=click.Choice(["val", "train"]), default="val", show_default=True,
              help="Which part of the run's own corpus to score.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def eval_(target, corpus, split, as_json):
    """Score a checkpoint on text: loss (nats/char), bits/char, perplexity."""
    if corpus is not None and click.get_current_context().get_parameter_source("split").name == "COMMANDLINE":
        raise UsageError("give either --corpus FILE or --split, not both")
    out = _out()
    model = api.load(target)
    run_cfg = _run_config(model)
    if corpus is not None:
        _check_corpus(corpus)
        res = model.score_file(corpus, scratch_dir=_scratch(run_cfg))
    else:
        data = _run_text(model, run_cfg, "score")
        ids = data.val if split == "val" else data.train
        if ids is None:
            raise UsageError("the run has no validation text (data.val_fraction = 0); use --split train or --corpus FILE")
        res = model._score_ids(ids)
    if res["unk_rate"] == 1.0:
        click.echo("warning: every character of the text is outside the model's vocabulary (unk_rate 100%): "
                   "the score says nothing about the text; is it in the script the model was trained on?", err=True)
    if as_json:
        _print(json.dumps(res), out)
        return
    _print(f"objective   {res['objective']}\nloss        {res['loss']:.4f} nats/char\nbpc         {res['bpc']:.4f}\n"
           f"perplexity  {res['perplexity']:.3f}\nchars       {res['chars']:,}\nunk_rate    {res['unk_rate']:.4%}", out)


# ---- diagnose, plot, runs ----------------------------------------------------------------------

def _text_ids(model: api.Model, corpus: Path | None) -> tuple[np.ndarray, str]:
    """Ids of --corpus, else of the run's validation text (its training text if it has none)."""
    run_cfg = _run_config(model)
    if corpus is not None:
        _check_corpus(corpus)
        encoding = model.config["data"]["encoding"]
        return evaluate.encode_file(corpus, _vocab(model), encoding, _scratch(run_cfg))[0], str(corpus)
    data = _run_text(model, run_cfg, "take windows from")
    if data.val is None:
        return data.train, f"{data.source} (training text: the run has no validation text)"
    return data.val, f"{data.source} (validation text)"


@cli.command(name="diagnose", context_settings=CONTEXT)
@click.argument("targets", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--corpus", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Take the windows from this text file instead of each run's validation text "
                   "(give it to compare models on the same text).")
@click.option("-k", "--windows", type=click.IntRange(min=1), default=32, show_default=True,
              help="Windows (evenly spaced over the text) to average the gradient norms over.")
@click.option("-T", "--length", type=click.IntRange(min=2), default=None,
              help="Characters per window, i.e. the farthest distance measured (default: the run's train.seq_len).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also draw the profiles into this PNG file (needs matplotlib).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per checkpoint instead of the tables.")
def diagnose_(targets, corpus, windows, length, plot_path, as_json):
    """Vanishing or exploding gradients: ||dL/dh_t|| against distance from the loss, per layer.

    Give several checkpoints or runs (e.g. an rnn and an lstm trained on the same text) to see
    their profiles one after the other, summed up side by side, and drawn together with --plot."""
    from charrnn import diagnose

    out, named = _out(), []
    for target in targets:
        model = api.load(target)
        ids, source = _text_ids(model, corpus)
        prof = diagnose.profile(model.spec, model.params, ids, windows, length or model.config["train"]["seq_len"])
        named.append((model, source, prof))
    if plot_path is not None:
        from charrnn.plot import plot_profiles

        labels = [str(target) if len(targets) > 1 else "" for target in targets]
        plot_profiles([(label, prof) for label, (_, _, prof) in zip(labels, named)], plot_path,
                      "" if len(targets) > 1 else f"gradient flow: {named[0][0].path} (step {named[0][0].step})")
        click.echo(f"wrote {plot_path}", err=True)
    for i, (model, source, prof) in enumerate(named):
        if as_json:
            out.line(json.dumps({"checkpoint": str(model.path), "step": model.step, "text": source,
                                 **diagnose.profile_dict(prof)}))
            continue
        out.line(("\n" if i else "") + f"checkpoint {model.path} (step {model.step}); windows from {source}")
        out.line(diagnose.format_profile(prof))
    if len(named) > 1 and not as_json:
        out.line("\n" + diagnose.format_comparison([(str(model.path), prof) for model, _, prof in named]))
    out.flush()


@cli.command(name="plot", context_settings=CONTEXT)
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=Path("plot.png"),
              show_default=True, help="PNG file to write.")
@click.option("--x", "x_axis", type=click.Choice(["step", "chars", "time"]), default="step", show_default=True,
              help="Horizontal axis: optimizer steps, characters seen or training time.")
def plot_(run_dirs, output, x_axis):
    """Loss (bits/char), gradient norm, learning rate and sigma_max(W_hh) of runs, overlaid (needs matplotlib)."""
    from charrnn.plot import plot_runs

    path, skipped = plot_runs(list(run_dirs), output, x_axis)
    for name in skipped:
        click.echo(f"warning: {name} has no metrics yet; left out of the plot", err=True)
    _print(str(path))


@cli.command(name="runs", context_settings=CONTEXT)
@click.argument("directory", required=False, default=Path("runs"), type=click.Path(file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, one object per run.")
def runs_(directory, as_json):
    """Table of the runs under DIRECTORY (default: runs/), best validation bits/char first."""
    from charrnn.runs import format_table, list_runs

    infos = list_runs(directory)
    if as_json:
        _print(json.dumps([r.as_dict() for r in infos]))
    elif infos:
        _print(format_table(infos))
    else:
        click.echo(f"no runs under {directory}", err=True)


# ---- bench ------------------------------------------------------------------------------------

@cli.command(context_settings=CONTEXT)
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), help="YAML config file.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override one config key (repeatable).")
@click.option("--steps", type=click.IntRange(min=1), default=30, show_default=True, help="Training steps timed after warm-up.")
@click.option("--seconds", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Keep timing steps until this many seconds have passed (at least --steps steps).")
@click.option("--warmup", type=click.IntRange(min=0), default=5, show_default=True, help="Untimed steps first.")
@click.option("--vocab", "vocab_size", type=click.IntRange(min=2, max=1_000_000), default=None,
              help="Synthetic random ids with this vocabulary size instead of the config's corpus.")
@click.option("--sample-chars", type=click.IntRange(min=10), default=3000, show_default=True,
              help="Characters sampled for the sampling rate.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def bench(config_path, sets, steps, seconds, warmup, vocab_size, sample_chars, as_json):
    """Measure training and sampling speed, peak memory and the share of the GEMM rate reached."""
    from charrnn import bench as benchmark

    r = benchmark.run(config.load(config_path, sets), steps, warmup, vocab_size, sample_chars, seconds=seconds)
    if as_json:
        _print(json.dumps(r))
        return
    out = _out()
    c = r["config"]
    kind = "bidirectional" if c["bidirectional"] else "vanilla" if c["num_layers"] == 1 else "stacked"
    out.line(f"model        {kind} {c['num_layers']} x {c['hidden_size']}, V = {c['vocab']}, N x T = "
               f"{c['batch_size']} x {c['seq_len']}, {c['optimizer']}, {c['dtype']}")
    out.line(f"train        {r['train_chars_per_sec']:,.0f} chars/s (median of {r['steps_timed']} steps; "
               f"range {r['train_chars_per_sec_min']:,.0f}-{r['train_chars_per_sec_max']:,.0f}), {r['step_ms']:.1f} ms/step")
    if r["sample_chars_per_sec"] is not None:
        many = next(k for k in r if k.startswith("sample_") and k.endswith("_streams_chars_per_sec"))
        out.line(f"sample       {r['sample_chars_per_sec']:,.0f} chars/s one stream, {r[many]:,.0f} chars/s "
                   f"with {many.split('_')[1]} streams")
    out.line(f"GEMM         {r['gemm_gflops']:.1f} GFLOP/s measured; training reaches {r['gemm_fraction']:.1%} of it")
    out.line(f"peak RSS     {r['peak_rss_mib']:.0f} MiB")
    out.flush()


def main():
    """The `charrnn` console script."""
    cli(prog_name="charrnn")

