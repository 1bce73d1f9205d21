import pytest

from cllama_dist.errors import UserError
from cllama_dist.launch.submit import minutes


@pytest.mark.parametrize("text,expected", [("90", 90), ("1:30", 2), ("1:30:00", 90), ("2-00:00:00", 2880),
                                           ("2-3", 3060), ("2-3:10", 3070), (45, 45)])
def test_slurm_time_limits_read_as_slurm_reads_them(text, expected):
    assert minutes(text) == expected


def test_bad_time_limit_is_refused():
    with pytest.raises(UserError, match="cannot read the time limit"):
        minutes("tomorrow")


def test_submit_passes_flags_after_a_lone_dash_dash_to_the_job(monkeypatch):
    from cllama_dist import cli
    import cllama_dist.launch.submit as submit

    seen = {}

    class FakeJob:
        job_id = "7"

    def fake_submit_train(argv, **kw):
        seen.update(argv=argv, **kw)
        return FakeJob()

    monkeypatch.setattr(submit, "submit_train", fake_submit_train)
    assert cli.main(["submit", "train", "--config", "c.yaml", "--nodes", "2", "--device", "cpu", "--",
                     "--lr", "1e-4", "--nodes"]) == 0
    assert seen["argv"] == ["--config", "c.yaml", "--lr", "1e-4", "--nodes"]
    assert seen["nodes"] == 2 and seen["device"] == "cpu"
