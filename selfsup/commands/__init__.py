"""``selfsup eval / embed / neighbors / predict / export / table``: use and judge a trained
encoder, one module per command (``common`` holds what they share).

``eval`` runs the papers' protocols on a labeled dataset (the pre-training data, or another one
with other classes: transfer) and writes ``eval_<data>_<protocol>.json`` into the run directory
plus one line per number to a results CSV (with ``--save-classifiers``, also the classifiers it
trained, under ``classifiers/``, which ``predict`` applies to new images); ``table`` turns that
CSV into a runs x protocols table. Accuracies are fractions in [0, 1].

Importing this package imports no torch: each command imports what it uses when it runs, so
that ``selfsup --help`` and argument errors stay fast.
"""

from __future__ import annotations

from selfsup.cli import register
from selfsup.commands import embed, export, neighbors, predict, table
from selfsup.commands import eval as eval_command
from selfsup.commands.embed import embed_dataset
from selfsup.commands.eval import evaluate_encoder, format_eval_table
from selfsup.commands.neighbors import nearest_neighbors
from selfsup.commands.predict import predict_dataset
from selfsup.commands.table import append_results, results_table

for _name, _module in (
    ("eval", eval_command),
    ("embed", embed),
    ("neighbors", neighbors),
    ("predict", predict),
    ("export", export),
    ("table", table),
):
    register(_name, _module.add_arguments, _module.handle)

__all__ = [
    "append_results",
    "embed_dataset",
    "evaluate_encoder",
    "format_eval_table",
    "nearest_neighbors",
    "predict_dataset",
    "results_table",
]
