"""The autotuner on a CPU with an injected timer: deterministic fake times decide every choice."""
import json
import os
import pathlib
import threading

import pytest
import torch

from moce_kernels import autotune
from moce_kernels.autotune import Tuner

KEY = ("channel_attention", "NVIDIA H200", ("bf16",), (1, 48, 256))


class Fake:
    """Candidates whose 'time' is given; counts how often each ran (the timer calls the thunk once)."""

    def __init__(self, **times_ms):
        self.times = times_ms
        self.calls = {name: 0 for name in times_ms}

    def thunk(self, name):
        def run():
            self.calls[name] += 1
            if self.times[name] is None:
                raise RuntimeError(f"{name} cannot run these inputs\nsecond line")
            return self.times[name]
        return run

    def candidates(self):
        return [(name, self.thunk(name)) for name in self.times]


def timer(fn):
    """The fake timer: the thunk returns its own time."""
    return fn()


@pytest.fixture
def tuner(tmp_path):
    return Tuner(path=tmp_path / "table.json", timer=timer)


def test_picks_the_fastest_and_reuses_it(tuner):
    fake = Fake(reference=3.0, triton=1.0, cuda=2.0)
    assert tuner.choose(KEY[0], KEY, fake.candidates()) == "triton"
    assert fake.calls == {"reference": 1, "triton": 1, "cuda": 1}, "every candidate timed, the reference too"
    for _ in range(3):
        assert tuner.choose(KEY[0], KEY, fake.candidates()) == "triton"
    assert fake.calls == {"reference": 1, "triton": 1, "cuda": 1}, "a known key times nothing"
    other = KEY[:3] + ((1, 48, 512),)
    fake.times.update(reference=1.0, triton=5.0)
    assert tuner.choose(KEY[0], other, fake.candidates()) == "reference", "a new shape class is timed anew"
    entry = next(e for e in tuner.table()["entries"] if e["key"] == ["channel_attention", "NVIDIA H200", ["bf16"],
                                                                      [1, 48, 256]])
    assert entry["times_ms"] == {"reference": 3.0, "triton": 1.0, "cuda": 2.0} and entry["op"] == KEY[0]


def test_ties_keep_the_earlier_candidate(tuner):
    assert tuner.choose("op", ("op", 1), Fake(reference=1.0, triton=1.0).candidates()) == "reference"


def test_a_raising_candidate_is_skipped_with_its_reason(tuner):
    fake = Fake(reference=2.0, triton=None, cuda=4.0)
    assert tuner.choose("op", ("op", 1), fake.candidates()) == "reference"
    assert tuner.failures(("op", 1)) == {"triton": "RuntimeError: triton cannot run these inputs"}
    assert tuner.table()["entries"][0]["errors"] == {"triton": "RuntimeError: triton cannot run these inputs"}


def test_all_failing_returns_the_first_unrecorded(tuner):
    fake = Fake(reference=None, triton=None)
    assert tuner.choose("op", ("op", 1), fake.candidates()) == "reference"
    assert tuner.table()["entries"] == [] and set(tuner.failures(("op", 1))) == {"reference", "triton"}
    fake.times.update(triton=1.0, reference=2.0)
    assert tuner.choose("op", ("op", 1), fake.candidates()) == "triton", "tried again on the next call"


def test_a_remembered_choice_no_longer_offered_is_retuned(tuner):
    tuner.preseed({("op", 1): "gone"})
    fake = Fake(reference=2.0, triton=1.0)
    assert tuner.choose("op", ("op", 1), fake.candidates()) == "triton"
    assert fake.calls == {"reference": 1, "triton": 1}


def test_disabled_returns_the_first_and_times_nothing(tmp_path):
    tuner = Tuner(path=tmp_path / "t.json", timer=timer)
    tuner.disable()
    fake = Fake(reference=5.0, triton=1.0)
    assert tuner.choose("op", ("op", 1), fake.candidates()) == "reference"
    assert fake.calls == {"reference": 0, "triton": 0} and not (tmp_path / "t.json").exists()
    tuner.enable()
    assert tuner.choose("op", ("op", 1), fake.candidates()) == "triton"


def test_never_times_inside_a_graph_capture(tuner, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    fake = Fake(reference=5.0, triton=1.0)
    assert tuner.choose("op", ("op", 1), fake.candidates()) == "reference"
    assert fake.calls == {"reference": 0, "triton": 0} and tuner.table()["entries"] == []
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert tuner.choose("op", ("op", 1), fake.candidates()) == "triton"
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert tuner.choose("op", ("op", 1), fake.candidates()) == "triton", "a known choice holds in a capture"


def test_persists_per_gpu_and_versions_and_round_trips(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    first = Tuner(timer=timer)
    assert first.choose(KEY[0], KEY, Fake(reference=3.0, triton=1.0).candidates()) == "triton"
    path = first.path
    assert path.startswith(str(tmp_path / "cache" / "moce_kernels" / "autotune-cpu-")) and path.endswith(".json")
    stored = json.loads(open(path).read())
    assert stored["gpu"] == "cpu" and stored["versions"] == autotune.versions()
    assert stored["versions"]["torch"] == torch.__version__
    fake = Fake(reference=1.0, triton=9.0)
    second = Tuner(timer=timer)  # a new process, in effect
    assert second.choose(KEY[0], KEY, fake.candidates()) == "triton", "read back, not measured again"
    assert fake.calls == {"reference": 0, "triton": 0}
    assert second.table() == first.table()
    monkeypatch.setattr(autotune, "versions", lambda: dict(stored["versions"], torch="9.9"))
    third = Tuner(timer=timer)
    assert third.path != path, "other versions: another table"
    assert third.choose(KEY[0], KEY, fake.candidates()) == "reference"


def test_written_atomically(tuner, monkeypatch):
    writes = []
    real = autotune.write_atomic
    monkeypatch.setattr(autotune, "write_atomic", lambda path, data: (writes.append(path), real(path, data)))
    tuner.choose("op", ("op", 1), Fake(reference=1.0).candidates())
    assert writes == [tuner.path]
    assert [p.name for p in pathlib.Path(tuner.path).parent.iterdir()] == ["table.json"], "no temporary left"


def test_loaded_lazily_once(tmp_path, monkeypatch):
    path = tmp_path / "t.json"
    seeded = Tuner(path=path, timer=timer)
    seeded.preseed({("op", 1): "triton"})
    reads = []
    real = Tuner._read
    monkeypatch.setattr(Tuner, "_read", lambda self, p: (reads.append(p), real(self, p))[1])
    tuner = Tuner(path=path, timer=timer)
    assert reads == [], "nothing read at construction"
    for _ in range(3):
        assert tuner.choose("op", ("op", 1), Fake(reference=1.0, triton=2.0).candidates()) == "triton"
    assert reads == [str(path)]


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe", b'{"format": 99, "entries": []}',
                                     b'{"format": 1, "entries": [{"nokey": 1}]}', b"[1, 2]"])
def test_a_corrupt_file_warns_and_is_ignored(tmp_path, content):
    path = tmp_path / "t.json"
    path.write_bytes(content)
    tuner = Tuner(path=path, timer=timer)
    with pytest.warns(RuntimeWarning, match=f"autotune table {path} is unreadable and is ignored"):
        assert tuner.choose("op", ("op", 1), Fake(reference=2.0, triton=1.0).candidates()) == "triton"
    assert json.loads(path.read_text())["entries"][0]["choice"] == "triton", "replaced by a valid table"


def test_preseed_from_a_dict_or_a_committed_table(tmp_path):
    tuner = Tuner(path=tmp_path / "a.json", timer=timer)
    assert tuner.preseed({KEY: "cuda", ("op", 2): "triton"}) == 2
    fake = Fake(reference=1.0, triton=2.0, cuda=3.0)
    assert tuner.choose(KEY[0], KEY, fake.candidates()) == "cuda"
    assert fake.calls == {"reference": 0, "triton": 0, "cuda": 0}
    committed = tmp_path / "benchmarks_results_autotune.json"
    committed.write_text(json.dumps(tuner.table()))
    other = Tuner(path=tmp_path / "b.json", timer=timer)
    assert other.preseed(committed) == 2
    assert other.choose("op", ("op", 2), fake.candidates()) == "triton"
    assert fake.calls == {"reference": 0, "triton": 0, "cuda": 0}
    with pytest.raises(TypeError, match=r"key\[1\] = torch.float32"):
        other.preseed({("op", torch.float32): "triton"})


def test_clear_forgets_and_removes_the_file(tuner):
    tuner.choose("op", ("op", 1), Fake(reference=1.0, triton=2.0).candidates())
    assert tuner.table()["entries"]
    tuner.clear()
    assert tuner.table()["entries"] == [] and not os.path.exists(tuner.path)
    fake = Fake(reference=3.0, triton=2.0)
    assert tuner.choose("op", ("op", 1), fake.candidates()) == "triton" and fake.calls["reference"] == 1


def test_bad_keys_and_no_candidates(tuner):
    with pytest.raises(TypeError, match=r"key\[2\] = torch.bfloat16"):
        tuner.choose("op", ("op", "cpu", torch.bfloat16), Fake(reference=1.0).candidates())
    with pytest.raises(ValueError, match="no candidates"):
        tuner.choose("op", ("op", 1), [])


def test_concurrent_first_calls_time_once(tuner):
    fake = Fake(reference=2.0, triton=1.0)
    barrier = threading.Barrier(8)
    got = []

    def worker():
        barrier.wait()
        got.append(tuner.choose("op", ("op", 1), fake.candidates()))
    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == ["triton"] * 8 and fake.calls == {"reference": 1, "triton": 1}


def test_the_default_instance_and_timers(monkeypatch, tmp_path):
    monkeypatch.setattr(autotune, "DEFAULT", Tuner(path=tmp_path / "d.json", timer=timer))
    assert autotune.choose("op", ("op", 1), Fake(reference=2.0, triton=1.0).candidates()) == "triton"
    calls = []
    ms = autotune.wall_clock_timer(lambda: calls.append(1), warmup=2, repeats=3)
    assert len(calls) == 5 and 0 <= ms < 1e3
    assert autotune.capturing() is False, "no CUDA here: never capturing"


def test_a_candidate_that_dispatches_inner_ops_is_tuned_without_deadlock(tuner):
    inner = Fake(reference=2.0, triton=1.0)

    def outer_triton():
        tuner.choose("inner", ("inner", 1), inner.candidates())  # a fused op built on other ops
        return 1.0
    outer = [("reference", lambda: 3.0), ("triton", outer_triton)]
    assert tuner.choose("outer", ("outer", 1), outer) == "triton"
    assert tuner.choose("inner", ("inner", 1), inner.candidates()) == "triton"
    assert inner.calls == {"reference": 1, "triton": 1}
