"""Bad input to the `fmrt` command: one line on stderr, exit 2, before any work; what is absurd is
bounded; large --num runs in batches whose results equal one batch's."""
import numpy as np
import pytest
import torch

from fmrt import cli
from tests.cli_run import assert_one_line_error, run_fmrt

FAST = ["--steps", "1", "--no-progress"]


@pytest.mark.parametrize("argv, needles", [
    (["sample", "--seed", "-1"], ["--seed", "must be in [0, 2^63 - 1]"]),
    (["sample", "--seed", str(2 ** 64)], ["--seed", "2^63"]),
    (["sample", "--seed", str(2 ** 63)], ["--seed"]),
    (["train", "--seed", "9" * 400], ["--seed", "..."]),
    (["sample", "--device", "meta"], ["--device", "'meta'"]),
    (["eval", "--device", "mps"], ["--device", "'mps'"]),
    (["reflow", "--device", "cuda:x"], ["--device"]),
    (["train", "--device", "xla"], ["--device"]),
    (["sample", "--steps", "1000000000"], ["--steps", "<= 1000"]),
    (["eval", "--steps", "1", "5000"], ["--steps", "<= 1000"]),
    (["reflow", "--steps", "1001"], ["--steps"]),
    (["train", "--steps", "1000000000"], ["--steps", "<= 10000000"]),
    (["sample", "--num", "20000"], ["--num", "<= 1024"]),
    (["reflow", "--num", "10000000"], ["--num"]),
    (["eval", "--num-per-class", "100000"], ["--num-per-class"]),
    (["sample", "--batch-size", "0"], ["--batch-size"]),
    (["sample", "--checkpoint", "{tmp}"], ["is a directory", "--checkpoint"]),
    (["eval", "--classifier", "{tmp}"], ["is a directory", "--classifier"]),
    (["train", "--lora-rank", "4", "--out-dir", "{tmp}/o"], ["--lora-rank", "--init"]),
])
def test_bad_arguments_one_line(argv, needles, tmp_path):
    r = run_fmrt(*[a.format(tmp=tmp_path) for a in argv], cwd=tmp_path)
    err = assert_one_line_error(r, *needles)
    assert len(err) < 400
    assert sorted(p.name for p in tmp_path.iterdir()) == []      # nothing written


def test_cuda_without_cuda(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert cli.main(["sample", "--device", "cuda", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "CUDA is not available" in err
    assert not list(tmp_path.iterdir())


def test_train_on_a_folder_of_model_files_is_a_short_line(tmp_path, capsys):
    data = tmp_path / "models"
    data.mkdir()
    src = cli.DEFAULT_CHECKPOINT
    for i in range(3):
        (data / f"m{i}.safetensors").write_bytes(open(src, "rb").read())
    code = cli.main(["train", "--data", str(data), "--out-dir", str(tmp_path / "o"),
                     "--steps", "1", "--no-progress", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err[:500]
    assert "m0.safetensors" in err and len(err) <= len("fmrt train: error: ") + 301, err


def test_long_messages_are_capped():
    line = cli._one_line(ValueError("x" * 5000 + "\nsecond line"))
    assert len(line) == cli.MAX_ERROR_CHARS and line.endswith("...") and "\n" not in line
    assert cli._one_line(RuntimeError("boom")) == "RuntimeError: boom"


def test_largest_seed_runs(tmp_path, capsys):
    out = tmp_path / "s.npy"
    assert cli.main(["sample", "--seed", str(2 ** 63 - 1), "--num", "1", "--out", str(out),
                     *FAST]) == 0
    assert np.isfinite(np.load(out)).all()


def test_reflow_refuses_couplings_larger_than_memory(tmp_path, capsys, monkeypatch):
    real = cli.os.sysconf
    monkeypatch.setattr(cli.os, "sysconf", lambda name: 2 ** 18 if name == "SC_PHYS_PAGES"
                        else real(name))     # 1 GiB of 4 KiB pages
    out = tmp_path / "c.safetensors"
    assert cli.main(["reflow", "--num", "100000", "--out", str(out), *FAST]) == 2
    err = capsys.readouterr().err
    assert "GiB of memory" in err and "--num 100000" in err and not out.exists()


# -- batches: any --batch-size gives the clips of one batch ---------------------------------------
# The noise is the same for every batch size; the model's CPU kernels are not batch invariant
# bit for bit (a DiT forward on 2 of 10 clips differs from the 10-clip forward by ~2e-6), so the
# clips agree to float rounding (~2e-5 measured), far below one 8-bit pixel level (4e-3).
ROUNDING = 1e-4

@pytest.mark.parametrize("solver, guidance", [("euler", "2"), ("heun", "1"), ("unipc", "3")])
def test_sample_batches_equal_one_batch(tmp_path, capsys, solver, guidance):
    def run(batch_size):
        out = tmp_path / f"b{batch_size}.npy"
        assert cli.main(["sample", "--num", "5", "--steps", "2", "--solver", solver,
                         "--guidance-scale", guidance, "--seed", "7", "--batch-size",
                         str(batch_size), "--out", str(out), "--no-progress"]) == 0
        return np.load(out)
    one = run(64)
    assert one.shape == (5, 4, 16, 16, 3) and one.std() > 0.01
    for bs in (1, 2):
        np.testing.assert_allclose(run(bs), one, rtol=0, atol=ROUNDING)


def test_euler_maruyama_first_batch_equals_one_batch():
    """The SDE's step noise: batch 0 keeps --seed (so its clips are one batch's), later batches
    get their own seeds (documented)."""
    from fmrt.train import load_model
    model, meta = load_model(cli.DEFAULT_CHECKPOINT)
    labels = torch.arange(4) % 6
    kw = dict(seed=3, progress=False, desc="", steps=2, solver="euler_maruyama",
              guidance_scale=1.0)
    with torch.no_grad():
        one = cli.generate_batched(model, meta, labels, batch_size=4, **kw)
        two = cli.generate_batched(model, meta, labels, batch_size=2, **kw)
    torch.testing.assert_close(two[:2], one[:2], rtol=0, atol=ROUNDING)
    assert (two[2:] - one[2:]).abs().max() > 10 * ROUNDING    # other step noise


def test_reflow_batches_equal_one_batch(tmp_path, capsys):
    from safetensors.torch import load_file
    paths = []
    for bs in (3, 8):
        paths.append(tmp_path / f"c{bs}.safetensors")
        assert cli.main(["reflow", "--num", "7", "--steps", "2", "--guidance-scale", "1",
                         "--batch-size", str(bs), "--out", str(paths[-1]),
                         "--no-progress"]) == 0
    a, b = (load_file(str(p)) for p in paths)
    assert a.keys() == b.keys() == {"noise", "sample", "cond"}
    assert torch.equal(a["noise"], b["noise"]) and torch.equal(a["cond"], b["cond"])
    torch.testing.assert_close(a["sample"], b["sample"], rtol=0, atol=ROUNDING)
