"""Outside training: Ctrl-C exits 130 with one line, and a reader that closes the pipe early
(`charrnn sample RUN | head`) ends the sampler quietly with 141, as `cat` would. Real processes."""
from __future__ import annotations

import signal

TEXT = "the quick brown fox jumps over the lazy dog.\n" * 40


def test_ctrl_c_while_sampling_exits_130_with_one_line(faults, shared_run):
    run = shared_run(TEXT)
    child = faults.Child("sample", run, "--length", "100000000", "--seed", "3")
    # text on stdout: the sampler is generating (a signal sent at "seed" could land before the first step)
    assert len(child.proc.stdout.read(200)) == 200
    child.proc.send_signal(signal.SIGINT)
    rc, err = child.finish()
    assert rc == 130, err
    assert err.rstrip().endswith("charrnn: interrupted") and "Traceback" not in err and "Aborted" not in err


def test_a_reader_that_stops_early_ends_the_sampler_quietly(faults, shared_run):
    run = shared_run(TEXT)
    child = faults.Child("sample", run, "--length", "100000000", "--seed", "3")
    assert len(child.proc.stdout.read(200)) == 200  # it streams: output arrives long before the end
    child.proc.stdout.close()
    rc, err = child.finish()
    assert rc == 141, err
    assert err == "", err
