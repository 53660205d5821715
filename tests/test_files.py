"""The small shared pieces: quoting an exception in one line, atomic writes, checkpoint state by name."""

import json

import pytest

from ddpm_hf.checkpoints import NamedState
from ddpm_hf.errors import cause_line, first_line
from ddpm_hf.files import atomic_path, write_json


class _Unprintable(Exception):
    def __str__(self):
        raise RuntimeError("no text")


def test_first_line_never_raises():
    assert first_line(ValueError("\n  first\nsecond")) == "first"
    assert first_line(KeyError()) == "KeyError"  # an empty message: the type's name, not an IndexError
    assert first_line(OSError("")) == "OSError"
    assert first_line(_Unprintable()) == "_Unprintable"


def test_an_atomic_write_that_fails_leaves_the_old_file_and_no_partial(tmp_path):
    path = tmp_path / "stats.json"
    write_json(str(path), {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(str(path)) as partial, open(partial, "w") as f:
            f.write('{"a": ')
            raise RuntimeError("the disk filled up")
    assert json.loads(path.read_text()) == {"a": 1} and sorted(p.name for p in tmp_path.iterdir()) == ["stats.json"]


def test_an_atomic_folder_replaces_the_old_one_whole(tmp_path):
    folder = tmp_path / "best"
    folder.mkdir()
    (folder / "old.txt").write_text("old")
    with atomic_path(str(folder)) as partial:
        (tmp_path / ".tmp-best").mkdir()
        assert partial == str(tmp_path / ".tmp-best")
        (tmp_path / ".tmp-best" / "new.txt").write_text("new")
    assert sorted(p.name for p in folder.iterdir()) == ["new.txt"] and not (tmp_path / ".tmp-best").exists()


class _Counter:
    def __init__(self, value=0):
        self.value = value

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = state["value"]


def test_checkpoint_state_is_saved_and_loaded_by_name():
    saved = NamedState(progress=_Counter(3), ema=_Counter(7)).state_dict()
    assert saved == {"progress": {"value": 3}, "ema": {"value": 7}}
    progress, ema = _Counter(), _Counter()
    NamedState(ema=ema, progress=progress).load_state_dict(saved)  # the order of registration does not matter
    assert (progress.value, ema.value) == (3, 7)
    with pytest.raises(ValueError, match="no sampler"):
        NamedState(progress=_Counter(), sampler=_Counter()).load_state_dict(saved)


def test_a_dataloader_workers_error_is_quoted_by_its_own_exception_line():
    relayed = RuntimeError("Caught HfHubHTTPError in DataLoader worker process 1.\nOriginal Traceback (most recent call last):\n"
                           '  File "x.py", line 1, in f\nhuggingface_hub.errors.HfHubHTTPError: Server error \'500\' for url \'u\'\n'
                           "For more information check: https://example.org\n\nthe server's own message")
    assert cause_line(relayed) == "Server error '500' for url 'u'"
    assert cause_line(ValueError("a plain error\nwith detail")) == "a plain error"
    assert cause_line(RuntimeError("Caught KeyError in DataLoader worker process 0.")) == "Caught KeyError in DataLoader worker process 0."
