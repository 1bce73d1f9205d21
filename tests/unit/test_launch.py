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


def _train_config(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("model:\n  config: {vocab_size: 10, hidden_size: 8, num_hidden_layers: 1, num_attention_heads: 1, "
                 "intermediate_size: 8}\n")
    return f


def test_a_rendezvous_port_in_use_is_refused_in_one_line_before_anything_starts(tmp_path, capsys):
    import socket

    from cllama_dist import cli

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        assert cli.main(["train", "--config", str(_train_config(tmp_path)), "--output-dir", str(tmp_path / "run"),
                         "--nproc-per-node", "2", "--master-port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"cllama train: error: rendezvous port {port} is already in use") and "--master-port" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "run").exists()


def test_a_port_taken_after_the_check_is_still_one_line(tmp_path):
    """The race the check cannot close: torchrun's own bind fails (its 47-line traceback), translated."""
    import socket
    import subprocess
    import sys

    from cllama_dist.launch.local import environment

    script = ("import sys\nfrom cllama_dist import cli\nfrom cllama_dist.launch import local\n"
              "local.require_free_port = lambda port: None\nsys.exit(cli.main(sys.argv[1:]))\n")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        proc = subprocess.run([sys.executable, "-c", script, "train", "--config", str(_train_config(tmp_path)),
                               "--nproc-per-node", "2", "--master-port", str(port)],
                              capture_output=True, text=True, timeout=300, env=environment(cpu=True, nproc=2))
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert err.startswith(f"cllama train: error: rendezvous port {port} is already in use") and "--master-port" in err
    assert len(err.splitlines()) == 1, err
