"""The --save directory on a bad day: damaged checkpoints are found and skipped, the newest
complete one is chosen, leftovers and old checkpoints are removed, a second run is locked
out (pure Python, no training)."""

import json
import os
import subprocess
import sys

import pytest

from megatron_ext.training.checkpoint_dir import (MANIFEST, CheckpointDir, CheckpointDirError,
                                                  resolve_load_path)

FILES = {"common.pt": 100, ".metadata": 50, "__0_0.distcp": 400, "__1_0.distcp": 400,
         "rank_00000.pt": 20, "rank_00001.pt": 20}


def _checkpoint(root, iteration, files=FILES):
    d = CheckpointDir(str(root))
    path = d.iteration_dir(iteration)
    os.makedirs(path)
    for name, size in files.items():
        with open(os.path.join(path, name), "wb") as f:
            f.write(b"x" * size)
    d.write_manifest(path, iteration, world_size=2)
    d.mark_latest(iteration)
    return path


DAMAGE = {
    "missing shard": lambda p: os.remove(os.path.join(p, "__1_0.distcp")),
    "truncated shard": lambda p: os.truncate(os.path.join(p, "__0_0.distcp"), 10),
    "missing common.pt": lambda p: os.remove(os.path.join(p, "common.pt")),
    "missing .metadata": lambda p: os.remove(os.path.join(p, ".metadata")),
    "missing rank file": lambda p: os.remove(os.path.join(p, "rank_00001.pt")),
    "garbage manifest": lambda p: open(os.path.join(p, MANIFEST), "w").write("{not json"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_latest_falls_back_to_the_newest_complete(tmp_path, damage):
    _checkpoint(tmp_path, 10)
    latest = _checkpoint(tmp_path, 20)
    DAMAGE[damage](latest)
    path, notes = resolve_load_path(str(tmp_path), None)
    assert path == CheckpointDir(str(tmp_path)).iteration_dir(10)
    assert len(notes) == 2 and "iter_0000020 is damaged" in notes[0]
    assert "resuming from iter_0000010" in notes[1]


@pytest.mark.parametrize("marker", ["", "garbage", "999"])
def test_the_latest_marker_is_not_trusted(tmp_path, marker):
    _checkpoint(tmp_path, 10)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text(marker)
    assert resolve_load_path(str(tmp_path), None)[0].endswith("iter_0000010")


def test_a_deleted_iteration_directory_is_just_absent(tmp_path):
    _checkpoint(tmp_path, 10)
    import shutil

    shutil.rmtree(_checkpoint(tmp_path, 20))
    assert resolve_load_path(str(tmp_path), None)[0].endswith("iter_0000010")


def test_nothing_complete_is_one_error(tmp_path):
    DAMAGE["missing shard"](_checkpoint(tmp_path, 10))
    with pytest.raises(CheckpointDirError, match="only damaged checkpoints"):
        resolve_load_path(str(tmp_path), None)


def test_auto_resume_starts_fresh_only_in_its_own_save_dir(tmp_path):
    save = str(tmp_path / "run")
    assert resolve_load_path(save, save)[0] is None  # missing: the job's first run
    os.makedirs(save)
    path, notes = resolve_load_path(save, save)
    assert path is None and "starting fresh" in notes[0]
    with pytest.raises(CheckpointDirError, match="no checkpoint"):
        resolve_load_path(save, str(tmp_path / "elsewhere"))  # --load of an empty dir


def test_load_may_name_one_iteration_directory(tmp_path):
    ten = _checkpoint(tmp_path, 10)
    _checkpoint(tmp_path, 20)
    assert resolve_load_path(ten, None) == (ten, [])
    DAMAGE["truncated shard"](ten)
    with pytest.raises(CheckpointDirError, match="damaged"):
        resolve_load_path(ten, None)


def test_checkpoints_without_manifest_from_format_1_count_when_common_and_metadata_exist(tmp_path):
    legacy = _checkpoint(tmp_path, 10)
    os.remove(os.path.join(legacy, MANIFEST))  # what f891bde wrote
    assert CheckpointDir.verify(legacy) is None


def test_retention_and_leftovers(tmp_path):
    d = CheckpointDir(str(tmp_path))
    for it in (10, 20, 30, 40):
        _checkpoint(tmp_path, it)
    DAMAGE["missing shard"](d.iteration_dir(40))
    os.makedirs(d.iteration_dir(50) + ".tmp")
    assert d.clean_leftovers() == ["iter_0000050.tmp"]
    assert d.retain(2) == ["iter_0000040", "iter_0000010"]  # damaged ones go too
    assert d.iterations() == [30, 20]
    assert d.retain(None) == []


def test_manifest_records_every_file(tmp_path):
    path = _checkpoint(tmp_path, 10)
    files = json.load(open(os.path.join(path, MANIFEST)))["files"]
    assert files == FILES


def test_a_second_run_is_locked_out(tmp_path):
    d = CheckpointDir(str(tmp_path / "run"))
    d.lock()
    code = ("import sys; from megatron_ext.training.checkpoint_dir import CheckpointDir\n"
            "try:\n    CheckpointDir(sys.argv[1]).lock()\nexcept ValueError as e:\n"
            "    print(e); sys.exit(3)\n")
    other = subprocess.run([sys.executable, "-c", code, d.root], capture_output=True, text=True)
    assert other.returncode == 3
    assert "in use by another run (pid" in other.stdout and str(os.getpid()) in other.stdout


def test_space_check_uses_the_size_of_the_newest_checkpoint(tmp_path):
    d = CheckpointDir(str(tmp_path))
    assert d.space_problem(free_bytes=0) is None  # nothing to compare with yet
    _checkpoint(tmp_path, 10)
    size = sum(FILES.values()) + os.path.getsize(os.path.join(d.iteration_dir(10), MANIFEST))
    assert d.space_problem(free_bytes=int(size * 1.1) + 1) is None
    assert "GiB free where a checkpoint needs" in d.space_problem(free_bytes=size)
