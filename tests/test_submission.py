"""The EvalAI submission command: merging fairchem prediction files and rejecting bad ones.

The prediction files are written by fairchem 1.10's own code: ``OCPTrainer.predict`` (with
``BaseTrainer.save_results``) and ``OCPTrainer.run_relaxations`` (with ``ml_relax``, LBFGS and its
trajectory writer) run unmodified as methods of a minimal stand-in trainer whose model is a small
analytic potential, on OC20-like slabs batched by a torch ``DataLoader`` with fairchem's collater. The
files are therefore in fairchem's exact format (names, keys, dtypes, shapes, id order).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
from ase.build import add_adsorbate, fcc100, fcc111
from ase.constraints import FixAtoms
from fairchem.core.datasets import data_list_collater
from fairchem.core.preprocessing import AtomsToGraphs
from fairchem.core.trainers import OCPTrainer

from fairchem_equiformers.tools.submission import (
    DATASET_SPLITS,
    SubmissionError,
    SubmissionWarning,
    collect_predictions,
    load_split,
    main,
    make_submission,
)

CLI = Path(sys.executable).parent / "fairchem-equiformers-submission"
OC20 = DATASET_SPLITS["oc20"]
OC22 = DATASET_SPLITS["oc22"]
SYSTEMS_PER_SPLIT = {"id": 5, "ood_ads": 4, "ood_cat": 3, "ood_both": 1, "ood": 3}  # 1: chunk_idx is empty
ENERGY_AND_FORCES = {"energy": {"level": "system"}, "forces": {"level": "atom"}}


# ------------------------------------------------------------------------ fairchem-written predictions


class AnalyticPotential(torch.nn.Module):
    """E = sum_i (k/2 |r_i - c|^2 - 1), F = -k (r_i - c): smooth, so fairchem's LBFGS relaxes it."""

    def forward(self, batch):
        d = batch.pos - torch.tensor([1.0, 1.5, 9.0], dtype=batch.pos.dtype)
        per_atom = 0.05 * (d * d).sum(-1) - 1.0
        energy = torch.zeros(batch.natoms.numel(), dtype=d.dtype).index_add(0, batch.batch, per_atom)
        return {"energy": energy, "forces": -0.1 * d}


class StandInTrainer:
    """Just the state that fairchem's predict/relaxation methods read; the methods are fairchem's own."""

    predict = OCPTrainer.predict
    run_relaxations = OCPTrainer.run_relaxations
    save_results = OCPTrainer.save_results
    _forward = OCPTrainer._forward
    _denorm_preds = OCPTrainer._denorm_preds

    def __init__(self, name: str, outputs: dict, results_dir: Path, task: dict | None = None):
        self.name = name  # the CLI sets it from the trainer: s2ef (forces), is2re (energy) or ocp
        self.model = self._unwrapped_model = AnalyticPotential()
        self.is_debug, self.ema, self.scaler = False, None, None
        self.device = torch.device("cpu")
        self.normalizers, self.elementrefs = {}, {}
        self.output_targets = outputs
        self.config = {"outputs": outputs, "task": task or {}, "cmd": {"results_dir": str(results_dir)}}
        results_dir.mkdir(parents=True, exist_ok=True)  # fairchem's setup creates it


def oc20_like_systems(n: int, sids: list[int], seed: int, with_fid: bool) -> list:
    """Slabs with an adsorbate, bottom layer fixed, as fairchem's AtomsToGraphs makes them."""
    a2g = AtomsToGraphs(r_edges=False, r_pbc=True, r_energy=False, r_forces=False)
    data = []
    for i in range(n):
        build = (fcc111, fcc100)[i % 2]
        slab = build(("Cu", "Pt", "Ag")[i % 3], size=(2, 2, 2 + i % 2), vacuum=6.0)
        add_adsorbate(slab, ("O", "C", "N")[i % 3], 1.8, "ontop")
        z = slab.positions[:, 2]
        slab.set_tags(np.where(z < z.min() + 0.1, 0, 1))
        slab.set_constraint(FixAtoms(mask=z < z.min() + 0.1))
        slab.rattle(0.05, seed=seed + i)
        d = a2g.convert(slab)
        d.sid = sids[i]
        if with_fid:
            d.fid = 3 * i + 1
        data.append(d)
    return data


def loader(data: list, batch_size: int = 2):
    return torch.utils.data.DataLoader(data, batch_size=batch_size, collate_fn=data_list_collater)


@pytest.fixture(scope="module")
def predictions(tmp_path_factory) -> dict:
    """Prediction files per task and split, written by fairchem: {kind: {split: path}} plus the inputs."""
    root = tmp_path_factory.mktemp("fairchem_predictions")
    rng = np.random.default_rng(0)
    sids = rng.choice(np.arange(1, 3_000_000), size=40, replace=False).tolist()
    sids[:3] = [7, 12, 100]  # fairchem sorts ids as strings: "100" < "12" < "7"
    out: dict = {kind: {} for kind in ("s2ef", "is2re", "is2rs", "is2re_traj", "oc22_s2ef", "oc22_is2re")}
    out["natoms"], out["free"] = {}, {}
    start = 0
    for k, split in enumerate(OC20):
        n = SYSTEMS_PER_SPLIT[split]
        split_sids = sids[start : start + n]
        start += n
        d = root / split
        s2ef_data = oc20_like_systems(n, split_sids, seed=10 * k, with_fid=True)
        StandInTrainer("s2ef", ENERGY_AND_FORCES, d).predict(
            loader(s2ef_data), results_file="predictions", disable_tqdm=True
        )
        out["s2ef"][split] = d / "s2ef_predictions.npz"
        is2re_data = oc20_like_systems(n, split_sids, seed=10 * k, with_fid=False)
        StandInTrainer("is2re", {"energy": {"level": "system"}}, d).predict(
            loader(is2re_data), results_file="predictions", disable_tqdm=True
        )
        out["is2re"][split] = d / "is2re_predictions.npz"
        relax = {
            "write_pos": True,
            "relaxation_steps": 3,
            "relaxation_fmax": 0.02,
            "relax_opt": {"traj_dir": str(d / "trajs")},
        }
        trainer = StandInTrainer("s2ef", ENERGY_AND_FORCES, d / "relax", task=relax)
        trainer.relax_dataset, trainer.relax_loader = is2re_data, loader(is2re_data)
        trainer.run_relaxations()
        out["is2rs"][split] = d / "relax" / "relaxed_positions.npz"
        out["is2re_traj"][split] = d / "trajs"
        out["natoms"][split] = {str(x.sid): int(x.natoms) for x in is2re_data}
        out["free"][split] = {str(x.sid): int((x.fixed == 0).sum()) for x in is2re_data}
    for k, split in enumerate(OC22):
        n = SYSTEMS_PER_SPLIT[split]
        split_sids = sids[start : start + n]
        start += n
        d = root / f"oc22_{split}"
        # the default `ocp` trainer names the file ocp_predictions.npz; oc22_lmdb predicts in float32
        StandInTrainer("ocp", ENERGY_AND_FORCES, d, task={"dataset": "oc22_lmdb"}).predict(
            loader(oc20_like_systems(n, split_sids, seed=100 + k, with_fid=True)),
            results_file="predictions",
            disable_tqdm=True,
        )
        out["oc22_s2ef"][split] = d / "ocp_predictions.npz"
        is2re_dir = d / "is2re"
        StandInTrainer(
            "is2re", {"energy": {"level": "system", "prediction_dtype": "float32"}}, is2re_dir
        ).predict(
            loader(oc20_like_systems(n, split_sids, seed=100 + k, with_fid=False)),
            results_file="predictions",
            disable_tqdm=True,
        )
        out["oc22_is2re"][split] = is2re_dir / "is2re_predictions.npz"
    return out


def npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {key: f[key] for key in f.files}


def corrupt(src: Path, dst: Path, **changes) -> Path:
    """Copy a prediction file with some arrays replaced (None: removed)."""
    arrays = npz(src)
    for key, value in changes.items():
        if value is None:
            arrays.pop(key)
        else:
            arrays[key] = value
    dst.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(dst, **arrays)
    return dst


# ------------------------------------------------------------------------------------ fairchem's format


def test_fairchem_prediction_files_have_the_expected_layout(predictions):
    s2ef = npz(predictions["s2ef"]["id"])
    n, free = SYSTEMS_PER_SPLIT["id"], predictions["free"]["id"]
    assert sorted(s2ef) == ["chunk_idx", "energy", "forces", "ids"]
    assert s2ef["energy"].dtype == np.float16 and s2ef["energy"].shape == (n, 1)
    assert s2ef["forces"].dtype == np.float16 and s2ef["forces"].shape == (sum(free.values()), 3)
    assert s2ef["ids"].dtype.kind == "U" and list(s2ef["ids"]) == sorted(s2ef["ids"])
    assert all(i.split("_")[0] in free for i in s2ef["ids"])
    # chunk_idx holds the N - 1 split points cumsum(free atoms)[:-1], not N cumulative counts
    sids = [i.split("_")[0] for i in s2ef["ids"]]
    assert s2ef["chunk_idx"].dtype == np.int64
    np.testing.assert_array_equal(s2ef["chunk_idx"], np.cumsum([free[s] for s in sids])[:-1])
    assert npz(predictions["s2ef"]["ood_both"])["chunk_idx"].shape == (0,)

    is2re = npz(predictions["is2re"]["id"])
    assert sorted(is2re) == ["energy", "ids"] and is2re["energy"].shape == (n, 1)
    assert list(is2re["ids"]) == sorted(predictions["natoms"]["id"])  # "<sid>", sorted as strings
    order = list(is2re["ids"])
    assert order.index("100") < order.index("12") < order.index("7")  # string order, not numeric

    is2rs = npz(predictions["is2rs"]["id"])
    natoms = predictions["natoms"]["id"]
    assert sorted(is2rs) == ["chunk_idx", "ids", "pos"]
    assert is2rs["pos"].dtype == np.float64 and is2rs["pos"].shape == (sum(natoms.values()), 3)  # all atoms
    np.testing.assert_array_equal(is2rs["chunk_idx"], np.cumsum([natoms[s] for s in is2rs["ids"]])[:-1])
    assert sorted(p.name for p in predictions["is2re_traj"]["id"].iterdir()) == sorted(
        f"{s}.traj" for s in natoms
    )
    oc22 = npz(predictions["oc22_s2ef"]["id"])
    assert oc22["energy"].dtype == np.float32 and oc22["forces"].dtype == np.float32


# ---------------------------------------------------------------------------------------------- merges


def test_s2ef_merge_equals_the_inputs_in_float32(predictions, tmp_path):
    with pytest.warns(SubmissionWarning, match=r"predicted in float16") as caught:
        out = make_submission("s2ef", predictions["s2ef"], tmp_path / "s2ef_submission.npz")
    assert [str(w.message).split(":")[0] for w in caught] == [f"split {s}" for s in OC20]
    assert out == tmp_path / "s2ef_submission.npz"
    merged = npz(out)
    assert sorted(merged) == sorted(
        f"{s}_{k}" for s in OC20 for k in ("ids", "energy", "forces", "chunk_idx")
    )
    for split in OC20:
        source = npz(predictions["s2ef"][split])
        np.testing.assert_array_equal(merged[f"{split}_ids"], source["ids"])
        assert merged[f"{split}_energy"].dtype == merged[f"{split}_forces"].dtype == np.float32
        np.testing.assert_array_equal(merged[f"{split}_energy"], source["energy"].astype(np.float32))
        np.testing.assert_array_equal(merged[f"{split}_forces"], source["forces"].astype(np.float32))
        np.testing.assert_array_equal(merged[f"{split}_chunk_idx"], source["chunk_idx"])
        per_system = np.split(merged[f"{split}_forces"], merged[f"{split}_chunk_idx"])
        free = predictions["free"][split]
        assert [len(f) for f in per_system] == [free[i.split("_")[0]] for i in merged[f"{split}_ids"]]


def test_is2re_merge_from_predict_files(predictions, tmp_path):
    with pytest.warns(SubmissionWarning, match="float16"):
        merged = npz(make_submission("is2re", predictions["is2re"], tmp_path / "is2re.npz"))
    assert sorted(merged) == sorted(f"{s}_{k}" for s in OC20 for k in ("ids", "energy"))
    for split in OC20:
        source = npz(predictions["is2re"][split])
        np.testing.assert_array_equal(merged[f"{split}_ids"], source["ids"])
        np.testing.assert_array_equal(merged[f"{split}_energy"], source["energy"].astype(np.float32))


def test_is2re_merge_from_relaxation_trajectories(predictions, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", SubmissionWarning)
        merged = npz(make_submission("is2re", predictions["is2re_traj"], tmp_path / "is2re_relaxed.npz"))
    for split in OC20:
        ids = sorted(predictions["natoms"][split])
        np.testing.assert_array_equal(merged[f"{split}_ids"], ids)
        last = [ase.io.read(predictions["is2re_traj"][split] / f"{i}.traj", -1) for i in ids]
        expected = np.array([a.get_potential_energy() for a in last], dtype=np.float32)
        np.testing.assert_array_equal(merged[f"{split}_energy"], expected)


def test_is2rs_merge_equals_the_inputs(predictions, tmp_path):
    merged = npz(make_submission("is2rs", predictions["is2rs"], tmp_path / "is2rs.npz"))
    assert sorted(merged) == sorted(f"{s}_{k}" for s in OC20 for k in ("ids", "pos", "chunk_idx"))
    for split in OC20:
        source = npz(predictions["is2rs"][split])
        np.testing.assert_array_equal(merged[f"{split}_ids"], source["ids"])
        assert merged[f"{split}_pos"].dtype == np.float32
        np.testing.assert_array_equal(merged[f"{split}_pos"], source["pos"].astype(np.float32))
        np.testing.assert_array_equal(merged[f"{split}_chunk_idx"], source["chunk_idx"])


@pytest.mark.parametrize("task", ["s2ef", "is2re"])
def test_oc22_merge_uses_id_and_ood(predictions, tmp_path, task):
    paths = predictions[f"oc22_{task}"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", SubmissionWarning)  # float32 predictions: nothing to warn about
        merged = npz(make_submission(task, paths, tmp_path / "oc22", dataset="oc22"))
    assert (tmp_path / "oc22.npz").is_file()  # .npz appended
    keys = ("ids", "energy", "forces", "chunk_idx") if task == "s2ef" else ("ids", "energy")
    assert sorted(merged) == sorted(f"{s}_{k}" for s in OC22 for k in keys)
    for split in OC22:
        source = npz(paths[split])
        for key in keys:
            np.testing.assert_array_equal(merged[f"{split}_{key}"], source[key])


def test_expected_counts_of_systems_and_atoms_pass(predictions, tmp_path):
    expected = {
        split: {"systems": SYSTEMS_PER_SPLIT[split], "atoms": sum(predictions["free"][split].values())}
        for split in OC20
    }
    expected["id"] = SYSTEMS_PER_SPLIT["id"]
    with pytest.warns(SubmissionWarning):
        splits = collect_predictions("s2ef", predictions["s2ef"], expected_counts=expected)
    assert {s: p.n_systems for s, p in splits.items()} == {s: SYSTEMS_PER_SPLIT[s] for s in OC20}


# ---------------------------------------------------------------------------------------- failures


def failure_cases(predictions, tmp: Path) -> dict[str, tuple[str, dict, dict, str]]:
    """name -> (task, split paths, make_submission kwargs, regex the one-line error must match)."""
    s2ef, is2re, is2rs = predictions["s2ef"], predictions["is2re"], predictions["is2rs"]
    src = npz(s2ef["ood_cat"])

    def with_file(paths: dict, split: str, path: Path) -> dict:
        return {**paths, split: path}

    nan_energy = src["energy"].copy()
    nan_energy[1, 0] = np.nan
    inf_forces = src["forces"].astype(np.float32)
    inf_forces[-1, 2] = np.inf
    dup_ids = src["ids"].copy()
    dup_ids[1] = dup_ids[0]
    bad_ids = np.array([i.split("_")[0] for i in src["ids"]])
    is2re_src = npz(is2re["id"])
    is2rs_src = npz(is2rs["ood_ads"])
    return {
        "missing split": (
            "s2ef",
            {k: v for k, v in s2ef.items() if k != "ood_both"},
            {},
            r"^split ood_both: no ",
        ),
        "missing file": (
            "s2ef",
            with_file(s2ef, "ood_ads", tmp / "nope.npz"),
            {},
            r"^split ood_ads: file not found: .*nope\.npz$",
        ),
        "not an npz": (
            "is2re",
            with_file(is2re, "id", tmp / "notes.txt"),
            {},
            r"^split id: .* not an npz archive",
        ),
        "missing key": (
            "s2ef",
            with_file(s2ef, "ood_cat", corrupt(s2ef["ood_cat"], tmp / "nokey.npz", forces=None)),
            {},
            r"^split ood_cat: .* lacks key\(s\) forces \(has: chunk_idx, energy, ids\)",
        ),
        "is2re given s2ef file": (
            "is2re",
            with_file(is2re, "id", s2ef["id"]),
            {},
            r"^split id: .*S2EF-style",
        ),
        "duplicate id": (
            "s2ef",
            with_file(s2ef, "ood_cat", corrupt(s2ef["ood_cat"], tmp / "dup.npz", ids=dup_ids)),
            {},
            rf"^split ood_cat: 1 duplicated id\(s\), e\.g\. '{dup_ids[0]}' appears 2 times$",
        ),
        "s2ef id form": (
            "s2ef",
            with_file(s2ef, "ood_cat", corrupt(s2ef["ood_cat"], tmp / "sid_only.npz", ids=bad_ids)),
            {},
            r"^split ood_cat: 3 id\(s\) not of the form '<sid>_<fid>'",
        ),
        "nan energy": (
            "s2ef",
            with_file(s2ef, "ood_cat", corrupt(s2ef["ood_cat"], tmp / "nan.npz", energy=nan_energy)),
            {},
            r"^split ood_cat: energy has 1 non-finite value\(s\) \(NaN or inf\), "
            rf"first in system '{src['ids'][1]}'$",
        ),
        "inf forces": (
            "s2ef",
            with_file(s2ef, "ood_cat", corrupt(s2ef["ood_cat"], tmp / "inf.npz", forces=inf_forces)),
            {},
            rf"^split ood_cat: forces has 1 non-finite value\(s\).*first in system '{src['ids'][-1]}'$",
        ),
        "forces rows vs chunk_idx": (
            "s2ef",
            with_file(s2ef, "ood_cat", corrupt(s2ef["ood_cat"], tmp / "rows.npz", forces=src["forces"][:3])),
            {},
            r"^split ood_cat: forces has 3 rows but chunk_idx splits after row \d+ \(shape mismatch\)$",
        ),
        "chunk_idx with the total": (
            "s2ef",
            with_file(
                s2ef,
                "ood_cat",
                corrupt(
                    s2ef["ood_cat"],
                    tmp / "total.npz",
                    chunk_idx=np.append(src["chunk_idx"], len(src["forces"])),
                ),
            ),
            {},
            r"^split ood_cat: chunk_idx has 3 entries for 3 systems; expected 2; it ends with the total",
        ),
        "energy count vs ids": (
            "is2re",
            with_file(is2re, "id", corrupt(is2re["id"], tmp / "short.npz", energy=is2re_src["energy"][:-1])),
            {},
            r"^split id: energy has 4 values but ids has 5 \(shape mismatch\)$",
        ),
        "pos shape": (
            "is2rs",
            with_file(
                is2rs, "ood_ads", corrupt(is2rs["ood_ads"], tmp / "pos.npz", pos=is2rs_src["pos"][:, :2])
            ),
            {},
            r"^split ood_ads: pos has shape \(\d+, 2\); expected \(M, 3\)$",
        ),
        "wrong count": (
            "s2ef",
            s2ef,
            {"expected_counts": {"ood_ads": 4, "ood_cat": 30}},
            r"^split ood_cat: 3 systems, expected 30 \(wrong count\)$",
        ),
        "wrong atom count": (
            "is2rs",
            is2rs,
            {"expected_counts": {"id": {"systems": 5, "atoms": 1}}},
            r"^split id: \d+ atoms, expected 1 \(wrong count\)$",
        ),
        "unknown split in counts": (
            "is2re",
            is2re,
            {"expected_counts": {"ood-ads": 4}},
            r"^expected counts: unknown split 'ood-ads' for OC20",
        ),
        "same file twice": (
            "is2re",
            with_file(is2re, "ood_cat", is2re["ood_ads"]),
            {},
            r"^split ood_cat: same file as split ood_ads",
        ),
        "same predictions twice": (
            "is2re",
            with_file(is2re, "ood_cat", corrupt(is2re["ood_ads"], tmp / "copy.npz")),
            {},
            r"^split ood_cat: the same ids as split ood_ads",
        ),
        "oc22 split for oc20": (
            "s2ef",
            {**s2ef, "ood": s2ef["id"]},
            {},
            r"^split ood: not a split of OC20 .*use --dataset oc22",
        ),
        "is2rs on oc22": ("is2rs", predictions["oc22_s2ef"], {"dataset": "oc22"}, r"^OC22 has no IS2RS task"),
        "results directory": (
            "s2ef",
            with_file(s2ef, "id", s2ef["id"].parent),
            {},
            r"^split id: .* is a directory \(it holds is2re_predictions\.npz, s2ef_predictions\.npz\)",
        ),
    }


def test_every_failure_raises_a_one_line_error_naming_the_problem(predictions, tmp_path):
    (tmp_path / "notes.txt").write_text("not an npz\n")
    for name, (task, paths, kwargs, pattern) in failure_cases(predictions, tmp_path).items():
        out = tmp_path / f"{name.replace(' ', '_')}.npz"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SubmissionWarning)
            with pytest.raises(SubmissionError) as info:
                make_submission(task, paths, out, **kwargs)
        message = str(info.value)
        assert "\n" not in message, name
        assert re.search(pattern, message), f"{name}: {message}"
        assert not out.exists(), name


def test_load_split_names_the_source_and_counts(predictions):
    with pytest.warns(SubmissionWarning, match="float16"):
        split = load_split("s2ef", "id", predictions["s2ef"]["id"])
    assert split.n_systems == SYSTEMS_PER_SPLIT["id"]
    assert split.n_atoms == sum(predictions["free"]["id"].values())
    assert set(split.arrays()) == {"id_ids", "id_energy", "id_forces", "id_chunk_idx"}


# ------------------------------------------------------------------------------------------ command line


def run_cli(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(CLI), *map(str, args)], capture_output=True, text=True, timeout=300)


def split_args(paths: dict) -> list[str]:
    return [arg for split, path in paths.items() for arg in (f"--{split.replace('_', '-')}", str(path))]


def test_cli_writes_the_submission_and_prints_a_summary(predictions, tmp_path):
    counts = tmp_path / "counts.json"
    counts.write_text(json.dumps({s: n for s, n in SYSTEMS_PER_SPLIT.items() if s in OC20}))
    out = tmp_path / "sub" / "submission.npz"
    result = run_cli("s2ef", *split_args(predictions["s2ef"]), "--out-path", out, "--expected-counts", counts)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "S2EF submission for OC20"
    assert lines[1].split() == ["split", "systems", "free", "atoms"]
    for line, split in zip(lines[2:6], OC20):
        assert line.split() == [
            split,
            str(SYSTEMS_PER_SPLIT[split]),
            str(sum(predictions["free"][split].values())),
        ]
    assert lines[6].split()[:2] == ["total", "13"]
    assert lines[7].startswith(
        f"wrote {out.resolve()} (keys: id_ids, id_energy, id_forces, id_chunk_idx, ood_ads_ids"
    )
    assert result.stderr.count("warning: split ") == 4 and "float16" in result.stderr
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SubmissionWarning)
        expected = npz(make_submission("s2ef", predictions["s2ef"], tmp_path / "api.npz"))
    merged = npz(out)
    assert sorted(merged) == sorted(expected)
    for key in merged:
        np.testing.assert_array_equal(merged[key], expected[key])


def test_cli_is2rs_and_oc22(predictions, tmp_path):
    result = run_cli("is2rs", *split_args(predictions["is2rs"]), "--out-path", tmp_path / "is2rs")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1].split() == ["split", "systems", "atoms"]
    assert (tmp_path / "is2rs.npz").is_file() and result.stderr == ""
    result = run_cli(
        "IS2RE", "--dataset", "oc22", *split_args(predictions["oc22_is2re"]), "--out-path", tmp_path / "x.npz"
    )
    assert result.returncode == 0, result.stderr
    assert [line.split()[0] for line in result.stdout.splitlines()[2:4]] == ["id", "ood"]


@pytest.mark.slow  # each run starts a Python that imports the package (torch, fairchem): ~10 s
@pytest.mark.parametrize(
    "name",
    [
        "missing split",
        "duplicate id",
        "nan energy",
        "forces rows vs chunk_idx",
        "energy count vs ids",
        "wrong count",
    ],
)
def test_cli_failures_exit_nonzero_with_one_error_line(predictions, tmp_path, name):
    task, paths, kwargs, pattern = failure_cases(predictions, tmp_path)[name]
    args = [task, *split_args(paths), "--out-path", tmp_path / "out.npz"]
    if "expected_counts" in kwargs:
        (tmp_path / "counts.json").write_text(json.dumps(kwargs["expected_counts"]))
        args += ["--expected-counts", tmp_path / "counts.json"]
    result = run_cli(*args)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and re.search(pattern, errors[0][len("error: ") :]), result.stderr
    assert all(line.startswith(("error: ", "warning: ")) for line in result.stderr.splitlines())
    assert not (tmp_path / "out.npz").exists()


def test_main_in_process_reports_bad_expected_counts_file(predictions, tmp_path, capsys):
    bad = tmp_path / "counts.json"
    bad.write_text("{id: 5}")
    args = ["is2re", *split_args(predictions["is2re"]), "--out-path", str(tmp_path / "o.npz")]
    status = main([*args, "--expected-counts", str(bad)])
    assert status == 1
    err = capsys.readouterr().err
    assert err.startswith("error: expected counts: ") and "not valid JSON" in err
