import pytest

from cllama_dist.errors import UserError
from cllama_dist.launch.config import minutes


@pytest.mark.parametrize("text,expected", [("90", 90), ("1:30", 2), ("1:30:00", 90), ("2-00:00:00", 2880),
                                           ("2-3", 3060), ("2-3:10", 3070), (45, 45)])
def test_slurm_time_limits_read_as_slurm_reads_them(text, expected):
    assert minutes(text) == expected


def test_bad_time_limit_is_refused():
    with pytest.raises(UserError, match="cannot read the time limit"):
        minutes("tomorrow")


def test_submit_parses_the_job_config_and_the_flags_after_a_lone_dash_dash(monkeypatch, tmp_path):
    from cllama_dist import cli
    import cllama_dist.launch.submit as submit

    seen = {}

    class FakeJob:
        job_id = "7"

    def fake_submit_train(cfg, job):
        seen.update(cfg=cfg, job=job)
        return FakeJob()

    monkeypatch.setattr(submit, "submit_train", fake_submit_train)
    run = tmp_path / "c.yaml"
    run.write_text("model:\n  config: {vocab_size: 10}\noptim:\n  lr: 3e-4\n  max_steps: 5\n")
    assert cli.main(["submit", "train", "--config", str(run), "--nodes", "2", "--device", "cpu", "--",
                     "--optim.lr", "1e-4", "--lora.rank", "4"]) == 0
    # The job carries a checked config object (YAML, then the flags after --), not argv to re-parse.
    cfg, job = seen["cfg"], seen["job"]
    assert (cfg.optim.lr, cfg.optim.max_steps, cfg.lora.rank, cfg.model.config) == (1e-4, 5, 4, {"vocab_size": 10})
    assert (job.nodes, job.device) == (2, "cpu")
    # A bad job setting is refused before anything is submitted.
    seen.clear()
    assert cli.main(["submit", "train", "--config", str(run), "--", "--lora.rank", "zero"]) == 2
    assert not seen
