"""charrnn: character-level RNN language models on numpy.

The public API (the names in __all__; README "Use from Python"), stable between versions:

    charrnn.load(path_or_run_dir) -> Model
        Model.sample(length=500, prime="", temperature=1.0, top_k=None, top_p=1.0, seed=None,
                     n=None, stop=None, greedy=False) -> str | list[str]
        Model.stream(length=500, prime="", temperature=1.0, top_k=None, top_p=1.0, seed=None,
                     stop=None, greedy=False) -> Iterator[str]
        Model.infill(template, mask="_", seed=None, temperature=1.0, top_k=None, top_p=1.0,
                     greedy=False) -> str
        Model.score(text) -> dict;  Model.score_file(path, encoding=None, scratch_dir=None) -> dict
        Model.path, .step, .objective, .vocab, .unk, .config, .params, .meta, .spec
    charrnn.train(config=None, run_dir=None, resume=False, init_from=None, progress=False, *,
                  sets=(), stop=None) -> RunSummary
    charrnn.errors: CharRNNError and its subclasses (also importable from charrnn itself)
    charrnn.__version__

Everything else (the other modules and the names in them) is internal: the command line and
the tests use it, and it may change in any version.
"""

__version__ = "0.1.0"

# first, before anything imports numpy: under an MPI launcher, one BLAS thread count per rank
from charrnn.distributed import set_thread_defaults as _set_thread_defaults  # imports nothing heavy

_set_thread_defaults()

import inspect as _inspect
import sys as _sys
import types as _types

from charrnn import errors
from charrnn.api import Model, RunSummary, load
from charrnn.api import train as _train
from charrnn.errors import (CharRNNError, CheckpointError, ConfigError, DataError, MissingDependencyError,
                            NumericalError, OutputError, RunDirError, TrainingError, UsageError)

__all__ = ["CharRNNError", "CheckpointError", "ConfigError", "DataError", "MissingDependencyError", "Model",
           "NumericalError", "OutputError", "RunDirError", "RunSummary", "TrainingError", "UsageError",
           "__version__", "errors", "load", "train"]


class _CallableModule(_types.ModuleType):
    """charrnn.train is two things: the API's function and the module charrnn/train.py
    (charrnn.train.train, resume_config). Importing a submodule binds its name on the package to
    the module, replacing whatever was there, so a function named train defined here would be
    lost the first time anything imported charrnn.train. Instead the module itself is callable:
    charrnn.train(config, ...) is charrnn.api.train(config, ...)."""

    __signature__ = _inspect.signature(_train)

    def __call__(self, *args, **kwargs) -> RunSummary:
        return _train(*args, **kwargs)

    __call__.__doc__ = _train.__doc__


train = _sys.modules[f"{__name__}.train"]  # imported by charrnn.api
train.__class__ = _CallableModule
