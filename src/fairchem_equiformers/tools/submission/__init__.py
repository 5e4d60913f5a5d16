"""Merge fairchem prediction files of the OC20/OC22 test splits into one EvalAI submission file.

Inputs are what fairchem 1.10 writes (``OCPTrainer.predict`` / ``run_relaxations`` and
``BaseTrainer.save_results``):

* S2EF, ``--mode predict``: ``results/<id>/<name>_predictions.npz`` where ``<name>`` is ``s2ef`` for
  the ``forces``/``equiformerv2_forces`` trainers and ``ocp`` for the default ``ocp`` trainer. Keys:
  ``ids`` (N,) str ``"<sid>_<fid>"`` sorted as strings; ``energy`` (N, 1) float16 (float32 with
  ``prediction_dtype: float32``); ``forces`` (M, 3) of the *free* atoms only, concatenated over
  systems; ``chunk_idx`` (N - 1,) int64, the split points ``cumsum(free_atoms)[:-1]``
  (``np.split(forces, chunk_idx)`` gives the per-system forces).
* IS2RE, ``--mode predict`` with an energy-only model (``is2re_predictions.npz`` for the
  ``energy``/``equiformerv2_energy`` trainers, ``ocp_predictions.npz`` for ``ocp``): ``ids`` (N,) str
  ``"<sid>"`` and ``energy`` (N, 1). Or, for IS2RE by relaxation, the ``relax_opt.traj_dir`` directory
  of ``<sid>.traj`` files written by ``--mode run-relaxations`` (fairchem 1.10 saves relaxed energies
  nowhere else); the last frame's energy is used.
* IS2RS, ``--mode run-relaxations`` with ``task.write_pos: True``: ``results/<id>/relaxed_positions.npz``
  with ``ids`` (N,) str ``"<sid>"``, ``pos`` (M, 3) float64 of *all* atoms (fixed ones included) and
  ``chunk_idx`` (N - 1,) int64 split points.

The submission holds, for every split ``s`` of the dataset (OC20: ``id``, ``ood_ads``, ``ood_cat``,
``ood_both``; OC22: ``id``, ``ood``), the task's arrays prefixed by the split name:

* S2EF: ``s_ids`` (N,) str, ``s_energy`` (N, 1) or (N,) float32 (the input's shape),
  ``s_forces`` (M, 3) float32, ``s_chunk_idx`` (N - 1,) int64;
* IS2RE: ``s_ids`` (N,) str, ``s_energy`` (N, 1) or (N,) float32;
* IS2RS: ``s_ids`` (N,) str, ``s_pos`` (M, 3) float32, ``s_chunk_idx`` (N - 1,) int64.

Rows keep the order of the input files. Every check failure raises :class:`SubmissionError` with a
one-line message naming the split; the command line prints it and exits with status 1.

Modules, by job: ``spec`` (tasks, datasets and their splits, the error types, one split's
predictions), ``read`` (reading prediction files), ``check`` (checking them), ``write`` (the
submission file and its summary) and ``cli`` (``fairchem-equiformers-submission``).
"""

from .check import read_expected_counts
from .cli import main
from .read import collect_predictions, load_split
from .spec import DATASET_SPLITS, TASKS, SplitPredictions, SubmissionError, SubmissionWarning
from .write import format_summary, make_submission, write_submission

__all__ = [
    "DATASET_SPLITS",
    "SplitPredictions",
    "SubmissionError",
    "SubmissionWarning",
    "TASKS",
    "collect_predictions",
    "format_summary",
    "load_split",
    "main",
    "make_submission",
    "read_expected_counts",
    "write_submission",
]
