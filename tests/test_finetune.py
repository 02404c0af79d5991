"""Fine-tuning overlay (train.json + finetune.json): training starts from the shipped weights (the loss
of the first step is the shipped model's loss on that batch), ``resume`` switches the loader off, and
finetune_bundle.py writes a new version with a changelog entry without touching the source bundle."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import CONFIGS, ROOT, write_phantom_dataset
from ignite.engine import Events
from monai.bundle import ConfigParser
from monai.handlers import from_engine
from monai.utils import set_determinism

SHAPE = (20, 18, 8)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ft_data")
    write_phantom_dataset(root, 3, SHAPE, num_pairs=5, first_seed=20)
    return root


def _parser(files: list[str], tmp_path: Path, **override) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / f) for f in files])
    parser.update({
        "bundle_root": str(tmp_path), "ckpt_dir": str(tmp_path / "ckpt"), "output_dir": str(tmp_path / "runs"),
        "patch_size": [16, 16, 8], "batch_size": 2, "samples_per_series": 1, "cache_rate": 0.0,
        "max_epochs": 1, "val_interval": 100, "noise_level_prob": 0.0, **override,
    })  # fmt: skip
    return parser


def _first_step_loss(parser: ConfigParser) -> tuple[float, dict]:
    """Loss of the trainer's first iteration (computed before its optimiser step) and that batch."""
    set_determinism(seed=0)
    trainer = parser.get_parsed_content("train#trainer")
    seen: dict = {}

    @trainer.on(Events.ITERATION_COMPLETED(once=1))
    def _stop(engine):
        seen["loss"] = float(from_engine(["loss"], first=True)(engine.state.output))
        items = engine.state.batch  # decollated: one dict per sample
        seen["batch"] = {k: torch.stack([torch.as_tensor(i[k]) for i in items]) for k in ("image", "label")}
        engine.terminate()

    trainer.run()
    set_determinism(seed=None)
    return seen["loss"], seen["batch"]


def test_finetune_starts_from_the_shipped_weights(data, tmp_path):
    shipped = _parser(["train.json"], tmp_path).get_parsed_content("network_def")
    torch.manual_seed(123)
    for p in shipped.parameters():
        p.data.add_(0.05 * torch.randn_like(p))  # distinct from any fresh initialisation
    weights = tmp_path / "shipped.pt"
    torch.save(shipped.state_dict(), weights)
    overlay = _parser(["train.json", "finetune.json"], tmp_path, dataset_dir=str(data), initial_weights=str(weights))
    assert overlay["learning_rate"] == pytest.approx(1e-4) and overlay["target"] == "other"
    loss, batch = _first_step_loss(overlay)
    shipped.train()
    with torch.no_grad():
        expected = overlay.get_parsed_content("loss")(shipped(batch["image"]), batch["label"]).item()
    assert loss == pytest.approx(expected, rel=1e-5)
    assert Path(overlay.get_parsed_content("ckpt_dir")) == tmp_path / "ckpt"  # never the shipped models/
    # plain train.json starts from a fresh network: a different first loss on the same data
    plain, _ = _first_step_loss(_parser(["train.json"], tmp_path, dataset_dir=str(data)))
    assert plain != pytest.approx(expected, rel=1e-3)


def test_resume_switches_the_initial_weights_off(tmp_path):
    on = _parser(["train.json", "finetune.json"], tmp_path)
    off = _parser(["train.json", "finetune.json"], tmp_path, resume=True)
    index = next(i for i, h in enumerate(on["train#handlers"]) if h["_target_"] == "CheckpointLoader")
    assert on[f"train#handlers#{index}#load_path"] == "@initial_weights"
    assert on.get_parsed_content(f"train#handlers#{index}#_disabled_") is False
    assert off.get_parsed_content(f"train#handlers#{index}#_disabled_") is True


def test_finetune_bundle_metadata(tmp_path):
    spec = importlib.util.spec_from_file_location("finetune_bundle", ROOT / "scripts" / "finetune_bundle.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.bump_version("0.1.0") == "0.1.1" and module.bump_version("x") == "x-finetuned"
    bundle = tmp_path / "new_bundle"
    (bundle / "configs").mkdir(parents=True)
    shutil.copy2(CONFIGS / "metadata.json", bundle / "configs" / "metadata.json")
    base = json.loads((CONFIGS / "metadata.json").read_text())
    meta = module.update_metadata(bundle, "9.9.9", base["version"], Path("/site/data"), "site X long scans", [])
    written = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert written == meta and written["version"] == "9.9.9"
    assert list(written["changelog"])[0] == "9.9.9" and "site X long scans" in written["changelog"]["9.9.9"]
    assert "site X long scans" in written["data_source"]
    assert json.loads((CONFIGS / "metadata.json").read_text()) == base  # the source bundle is untouched


def _finetune_module():
    spec = importlib.util.spec_from_file_location("finetune_bundle", ROOT / "scripts" / "finetune_bundle.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_finetune_bundle_checks_before_writing(data, tmp_path, capsys):
    """A misspelt override or too few series to hold any out stops it with one line, nothing written."""
    module = _finetune_module()
    one = tmp_path / "one"
    write_phantom_dataset(one, 1, SHAPE, num_pairs=4, first_seed=30)
    cases = ((data, ["--max_epoch", "1"], "unknown setting(s) --max_epoch"), (one, [], "1 series; fine-tuning"))
    for dataset, overrides, says in cases:
        out = tmp_path / "bundle"
        with pytest.raises(SystemExit) as exc:
            module.main(["--dataset_dir", str(dataset), "--output_bundle", str(out), "--", *overrides])
        assert says in str(exc.value) and not out.exists() and not module.runs_dir(out).exists()


@pytest.mark.slow
def test_finetune_bundle_exports_its_own_model_ts(data, tmp_path):
    """The new bundle's model.ts holds the fine-tuned weights and the new version (Deploy loads model.ts)."""
    from monai.data import load_net_with_metadata

    module = _finetune_module()
    out = tmp_path / "site_bundle"
    argv = [
        "--dataset_dir",
        str(data),
        "--output_bundle",
        str(out),
        "--",
        "--max_epochs",
        "1",
        "--val_fraction",
        "0.34",
    ]
    assert module.main(argv) == 0
    net, meta, _ = load_net_with_metadata(str(out / "models" / "model.ts"), map_location="cpu")
    assert meta["version"] == json.loads((out / "configs" / "metadata.json").read_text())["version"]
    weights = torch.load(out / "models" / "model.pt", map_location="cpu")
    weights = weights.get("model", weights)
    scripted = dict(net.named_parameters())
    assert all(torch.equal(weights[name], scripted[name].detach()) for name in scripted)
    assert not (out / "models" / "finetune").exists() and (module.runs_dir(out) / "checkpoints").is_dir()
