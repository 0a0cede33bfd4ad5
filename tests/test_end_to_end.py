"""End to end on the CPU: simclr.py trains on synthetic data and writes its
outputs (last.pt, backbone.pt, log.jsonl, args.json), evaluate.py reads them, a
run stopped by --max-steps or SIGTERM resumes to exactly the weights of an
uninterrupted run, and both scripts give the same results under torchrun."""
import json
import re
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import common
import simclr
from conftest import ENV, ROOT, run, torchrun

# 64 images in batches of 8: 8 optimizer steps per epoch, so 12 steps span two
# epochs and 5 steps stop in the middle of the first.
STEPS_PER_EPOCH = 8
TRAIN = ["simclr.py", "--data", "synthetic", "--arch", "resnet_small", "--workers", "0",
         "--batch-size", "8", "--subset", "64", "--knn-every", "1", "--log-every", "1"]
EVAL = ["evaluate.py", "--workers", "0", "--subset", "128", "--linear-epochs", "5"]
FINAL_LINE = re.compile(r"^knn_top1=(\d+\.\d+) linear_top1=(\d+\.\d+)$")


def run_both(*commands, launch=None):
    """Run independent commands two at a time, one thread each (2 x 2 threads on 2 cores is slower)."""
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(launch or (lambda command: run(command, threads=1)), commands))


def train(out, max_steps, extra=()):
    """simclr.py with the TRAIN flags into `out`, stopping after `max_steps` optimizer steps."""
    return run([*TRAIN, "--out", str(out), "--max-steps", str(max_steps), *extra])


def load(path):
    """A checkpoint file, loaded as a user would (weights_only=True)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def final_numbers(proc):
    """(knn_top1, linear_top1) from the last stdout line, which must match the contract's format."""
    last = proc.stdout.strip().splitlines()[-1]
    m = FINAL_LINE.match(last)
    assert m, f"final line {last!r} is not 'knn_top1=<float> linear_top1=<float>'"
    return float(m.group(1)), float(m.group(2))


def assert_same_training_state(a, b):
    """Model weights and optimizer state bit-identical (torch.equal), same step."""
    assert a["step"] == b["step"]
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"model tensor {k} differs"
    oa, ob = a["optimizer"], b["optimizer"]
    assert oa["param_groups"] == ob["param_groups"]
    assert oa["state"].keys() == ob["state"].keys() and len(oa["state"]) > 0
    for i in oa["state"]:
        assert oa["state"][i].keys() == ob["state"][i].keys()
        for name, value in oa["state"][i].items():
            if torch.is_tensor(value):
                assert torch.equal(value, ob["state"][i][name]), f"optimizer state {i}/{name} differs"
            else:
                assert value == ob["state"][i][name]


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    """An uninterrupted 12-step run (two epochs, the first complete): (out dir, stdout)."""
    out = tmp_path_factory.mktemp("run_a")
    proc = train(out, 12)
    return out, proc.stdout


@pytest.fixture(scope="module")
def evals(run_a, tmp_path_factory):
    """evaluate.py with --json on run A's last.pt, its backbone.pt, last.pt with --data and
    --image-size overridden, and a random backbone: {name: (proc, json)}."""
    out, _ = run_a
    where = tmp_path_factory.mktemp("evals")
    commands = {
        "last.pt": ["--ckpt", str(out / "last.pt")],
        "backbone.pt": ["--ckpt", str(out / "backbone.pt")],
        "override": ["--ckpt", str(out / "last.pt"), "--data", "synthetic", "--image-size", "48"],
        "random": ["--random-init", "--arch", "resnet_small", "--data", "synthetic"],
        "random_again": ["--random-init", "--arch", "resnet_small", "--data", "synthetic"],
    }
    procs = run_both(*([*EVAL, *extra, "--json", str(where / f"{name}.json")] for name, extra in commands.items()))
    return {name: (proc, json.loads((where / f"{name}.json").read_text())) for name, proc in zip(commands, procs)}


# ---------------------------------------------------------------------------
# Training outputs
# ---------------------------------------------------------------------------

def test_training_prints_progress_lines(run_a):
    """One start-up line, then a progress line per step (--log-every 1) with loss, img/s and eta."""
    _, stdout = run_a
    lines = stdout.splitlines()
    assert sum(line.startswith("simclr:") for line in lines) == 1
    progress = [line for line in lines if re.search(r"\bstep \d+/\d+", line)]
    assert len(progress) == 12
    for line in progress:
        assert "loss" in line and "img/s" in line and "eta" in line, line
    assert re.search(r"\bstep 12/", progress[-1])


def test_training_writes_the_output_files(run_a):
    """--out holds last.pt, backbone.pt, log.jsonl and args.json (the latter describing the run)."""
    out, _ = run_a
    for name in ("last.pt", "backbone.pt", "log.jsonl", "args.json"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "args.json").read_text())
    assert saved["arch"] == "resnet_small" and saved["data"] == "synthetic" and saved["batch_size"] == 8


def test_last_pt_is_a_plain_dict_with_everything_to_resume(run_a):
    """last.pt loads with weights_only=True and holds method, epoch, step (= --max-steps), args, model,
    optimizer, scaler and the backbone."""
    out, _ = run_a
    ckpt = load(out / "last.pt")
    for key in ("method", "epoch", "step", "args", "model", "optimizer", "scaler", "backbone"):
        assert key in ckpt, key
    assert ckpt["method"] == "simclr"
    assert ckpt["step"] == 12
    assert ckpt["epoch"] in (12 // STEPS_PER_EPOCH, 12 // STEPS_PER_EPOCH + 1)  # 0-based epoch in progress, or epochs begun
    assert isinstance(ckpt["args"], dict) and ckpt["args"]["arch"] == "resnet_small"
    model = simclr.SimCLR("resnet_small", 32, 128)
    model.load_state_dict(ckpt["model"], strict=True)


def test_backbone_pt_has_clean_keys_and_loads_strictly(run_a):
    """backbone.pt: no module./_orig_mod. prefixes; loads with strict=True into the common backbone
    and equals the backbone inside last.pt."""
    out, _ = run_a
    state = load(out / "backbone.pt")
    assert state and not any(k.startswith("module.") or "_orig_mod." in k for k in state)
    backbone, dim = common.resnet("resnet_small", 32)
    backbone.load_state_dict(state, strict=True)
    assert dim == 128
    inside = load(out / "last.pt")["backbone"]
    assert inside.keys() == state.keys()
    assert all(torch.equal(inside[k], state[k]) for k in state)


def test_log_jsonl_has_one_record_per_epoch_with_knn(run_a):
    """log.jsonl: JSON lines with loss, lr, images_per_s, time and the collapse indicator z_std
    (a standard deviation of unit vectors in 128-d: in (0, 1/sqrt(128)] up to sampling noise);
    the completed first epoch (--knn-every 1) carries a kNN top-1 between 0 and 100."""
    out, _ = run_a
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
    assert len(records) == 2
    for r in records:
        for key in ("loss", "lr", "images_per_s", "time", "z_std"):
            assert isinstance(r[key], (int, float)), key
        assert r["images_per_s"] > 0 and r["time"] > 0
        assert 0.0 < r["z_std"] < 1.2 / 128 ** 0.5
    assert "knn_top1" in records[0]
    assert 0.0 <= records[0]["knn_top1"] <= 100.0


# ---------------------------------------------------------------------------
# evaluate.py
# ---------------------------------------------------------------------------

def test_evaluate_prints_final_line_and_writes_the_same_json(evals):
    """The last stdout line is `knn_top1=.. linear_top1=..` and --json holds the same numbers."""
    for name, (proc, js) in evals.items():
        knn, linear = final_numbers(proc)
        assert 0.0 <= knn <= 100.0 and 0.0 <= linear <= 100.0
        assert knn == pytest.approx(js["knn_top1"], abs=0.005), name
        assert linear == pytest.approx(js["linear_top1"], abs=0.005), name
        assert js["arch"] == "resnet_small" and js["data"] == "synthetic", name
        assert js["train_images"] == 128 and js["test_images"] == 512, name


def test_evaluate_last_pt_and_backbone_pt_agree(evals):
    """backbone.pt, read with the args.json beside it, gives exactly the numbers of last.pt."""
    last, backbone = evals["last.pt"][1], evals["backbone.pt"][1]
    assert backbone["image_size"] == last["image_size"] == 32
    assert last["knn_top1"] == backbone["knn_top1"]
    assert last["linear_top1"] == backbone["linear_top1"]


def test_evaluate_overrides_data_and_image_size(evals):
    """--data and --image-size given on the command line win over the checkpoint's."""
    result = evals["override"][1]
    assert result["data"] == "synthetic" and result["image_size"] == 48
    assert result["ckpt"].endswith("last.pt")


def test_evaluate_random_init_baseline(evals):
    """--random-init with --arch and --data evaluates an untrained backbone."""
    result = evals["random"][1]
    assert result["ckpt"] is None and result["image_size"] == 32


def test_evaluate_random_init_is_the_same_network_every_run(evals):
    """The random backbone comes from --seed: two runs give the same figures (a baseline
    that changed from run to run would make every "gain over random init" noisy)."""
    first, again = evals["random"][1], evals["random_again"][1]
    assert first["knn_top1"] == again["knn_top1"] and first["linear_top1"] == again["linear_top1"]


# ---------------------------------------------------------------------------
# Resuming (model, optimizer, scaler and schedule position restored)
# ---------------------------------------------------------------------------

def test_resume_mid_epoch_is_bit_identical(run_a, tmp_path):
    """--resume none ignores a last.pt already in --out and starts from step 0; 5 steps (stopping
    mid-epoch), then the same command to 12 steps (--resume auto) ends with weights and optimizer
    state equal bit for bit to those of the uninterrupted 12-step run."""
    out_a, _ = run_a
    out_b = tmp_path / "b"
    out_b.mkdir()
    shutil.copy(out_a / "last.pt", out_b / "last.pt")  # a finished 12-step run that must be ignored
    first = train(out_b, 5, ["--resume", "none"])
    assert "from step 0" in first.stdout
    assert load(out_b / "last.pt")["step"] == 5
    second = train(out_b, 12)
    assert "from step 5" in second.stdout
    assert_same_training_state(load(out_a / "last.pt"), load(out_b / "last.pt"))
    assert load(out_b / "last.pt")["step"] == 12


def test_sigterm_saves_and_resumes_bit_identical(run_a, tmp_path):
    """SIGTERM after the first progress line: exit 0, 'stopped at step', a last.pt with 0 < step < 12;
    running the same command again ends bit-identical to the uninterrupted run."""
    out_a, _ = run_a
    out = tmp_path / "sig"
    args = [*TRAIN, "--out", str(out), "--max-steps", "12"]
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, bufsize=1)
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if re.search(r"\bstep \d+/\d+", line):
                proc.send_signal(signal.SIGTERM)
                break
        rest, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stdout = "".join(seen) + rest
    assert proc.returncode == 0, f"exit {proc.returncode}\n{stdout}\n{err}"
    assert "stopped at step" in stdout
    step = load(out / "last.pt")["step"]
    assert 0 < step < 12
    assert f"stopped at step {step}" in stdout

    resumed = run(args)
    assert f"from step {step}" in resumed.stdout
    assert_same_training_state(load(out_a / "last.pt"), load(out / "last.pt"))


# ---------------------------------------------------------------------------
# torchrun, two CPU processes
# ---------------------------------------------------------------------------

def test_torchrun_two_processes_train_and_evaluate(tmp_path):
    """Under torchrun with 2 processes: rank 0 alone prints, last.pt reaches --max-steps, and
    evaluate.py under torchrun counts every test image once, with the training features in two
    shards: the same kNN top-1 and linear-probe top-1 as one process."""
    out = tmp_path / "ddp"
    proc = torchrun(2, ["simclr.py", "--data", "synthetic", "--arch", "resnet_small", "--workers", "0",
                        "--batch-size", "32", "--subset", "128", "--max-steps", "4", "--knn-every", "0",
                        "--log-every", "1", "--out", str(out)])
    lines = proc.stdout.splitlines()
    startup = [line for line in lines if line.startswith("simclr:")]
    assert len(startup) == 1, proc.stdout
    assert "2 process(es)" in startup[0]
    assert sum(bool(re.search(r"\bstep 4/", line)) for line in lines) == 1, proc.stdout
    ckpt = load(out / "last.pt")
    assert ckpt["step"] == 4
    assert not any(k.startswith("module.") for k in ckpt["model"])

    # The same checkpoint under torchrun and in one process; the latter also names --data (an override).
    ddp_json, one_json = tmp_path / "ddp.json", tmp_path / "one.json"
    ddp_eval, one_eval = run_both(
        lambda: torchrun(2, [*EVAL, "--ckpt", str(out / "last.pt"), "--json", str(ddp_json)]),
        lambda: run([*EVAL, "--ckpt", str(out / "last.pt"), "--data", "synthetic", "--json", str(one_json)]),
        launch=lambda command: command())
    ddp, one = json.loads(ddp_json.read_text()), json.loads(one_json.read_text())
    assert ddp["test_images"] == one["test_images"] == 512
    assert ddp["train_images"] == one["train_images"] == 128
    assert final_numbers(ddp_eval)[0] == final_numbers(one_eval)[0]
    assert ddp["knn_top1"] == pytest.approx(one["knn_top1"], abs=1e-6)
    # The probe trains on the two shards of the training features, gradients summed: the one-process
    # head up to float rounding in the sums (scale_dist_check.py compares the heads themselves).
    assert ddp["linear_top1"] == pytest.approx(one["linear_top1"], abs=0.5)
    assert one["linear_top1"] > 20, one  # 10 classes: the probe learned something
    assert sum(bool(FINAL_LINE.match(line)) for line in ddp_eval.stdout.splitlines()) == 1


# ---------------------------------------------------------------------------
# The model (SimCLR Sec. 2.1)
# ---------------------------------------------------------------------------

def test_simclr_model_shapes_and_head_width():
    """SimCLR(arch, 32, 128) maps two [B, 3, 32, 32] batches to two [B, 128] projections; the head's
    hidden layer is as wide as the backbone's features (128 for resnet_small, 512 for resnet18)."""
    torch.manual_seed(0)
    model = simclr.SimCLR("resnet_small", 32, 128)
    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    z1, z2 = model(x1, x2)
    assert z1.shape == (4, 128) and z2.shape == (4, 128)
    assert not torch.equal(z1, z2)
    for arch, width in (("resnet_small", 128), ("resnet18", 512)):
        head = simclr.SimCLR(arch, 32, 128).projector
        linears = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
        assert len(linears) == 2
        assert (linears[0].in_features, linears[0].out_features) == (width, width)
        assert (linears[1].in_features, linears[1].out_features) == (width, 128)
