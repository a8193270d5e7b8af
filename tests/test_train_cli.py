"""`python -m physmaster train-sft / train-dpo` on a tiny WanTransformer3DModel written with save_pretrained."""

import json

import pytest
import torch
from safetensors.torch import save_file

from physmaster.backends.diffusers_wan import make_tiny_wan
from physmaster.cli import main
from physmaster.encoder import load_encoder, read_metadata

C, T, H, W, D = 3, 2, 8, 8, 32


@pytest.fixture()
def model_dir(tmp_path):
    path = tmp_path / "tiny-wan"
    make_tiny_wan(0, latent_channels=C, text_dim=D).save_pretrained(path)
    return path


def write_videos(folder, n=2):
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        save_file({"latent": torch.randn(C, T, H, W, generator=g), "context": torch.randn(4, D, generator=g),
                   "features": torch.randn(5, 24, generator=g),
                   "first_frame_latent": torch.randn(C, H, W, generator=g)}, str(folder / f"v{i}.safetensors"))
    return folder


def write_pairs(folder):
    folder.mkdir()
    g = torch.Generator().manual_seed(1)
    save_file({"latents": torch.randn(3, C, T, H, W, generator=g), "context": torch.randn(4, D, generator=g),
               "features": torch.randn(5, 24, generator=g),
               "first_frame_latent": torch.randn(C, H, W, generator=g)}, str(folder / "g0.safetensors"))
    lines = [json.dumps({"group": "g0", "winner": 0, "loser": 1, "source": "judge", "margin": 0.3}),
             json.dumps({"group": "g0", "winner": 2, "loser": 1, "source": "human"}),
             '{"group": "g0", "winn',  # a torn line: reported and skipped
             json.dumps({"group": "../x", "winner": 0, "loser": 1})]
    (folder / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_train_sft_then_dpo(tmp_path, model_dir, capsys):
    videos = write_videos(tmp_path / "videos")
    out = tmp_path / "sft"
    rc = main(["train-sft", "--model", str(model_dir), "--videos", str(videos), "--out", str(out), "--steps", "2",
               "--tokens", "2", "--head-width", "16", "--lora-rank", "2", "--seed", "3", "--checkpoint-every", "1"])
    assert rc == 0
    enc = load_encoder(out / "encoder.safetensors")
    assert enc.config.in_dim == 24 and enc.config.context_dim == D and enc.config.num_tokens == 2
    (stage,) = enc.provenance["stages"]
    assert stage["stage"] == "sft" and stage["steps"] == 2 and stage["seed"] == 3 and stage["lr"] == 1e-4
    assert stage["dataset"] == "videos" and stage["dataset_size"] == 2
    assert enc.provenance["base_model"] == "tiny-wan"
    lora_meta = read_metadata(out / "lora.safetensors")
    assert json.loads(lora_meta["physmaster.lora"])["rank"] == 2
    assert (out / "checkpoints").is_dir()

    # running it again resumes (nothing left to do) and does not retrain
    assert main(["train-sft", "--model", str(model_dir), "--videos", str(videos), "--out", str(out), "--steps",
                 "2", "--tokens", "2", "--head-width", "16", "--lora-rank", "2", "--seed", "3"]) == 0
    assert "resuming sft from step 2" in capsys.readouterr().out

    pairs = write_pairs(tmp_path / "prefs")
    out3 = tmp_path / "dpo"
    rc = main(["train-dpo", "--model", str(model_dir), "--pairs", str(pairs), "--out", str(out3), "--steps", "2",
               "--stage", "head", "--encoder", str(out / "encoder.safetensors"), "--lora",
               str(out / "lora.safetensors"), "--beta", "100"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "line 3" in err and "line 4" in err
    enc3 = load_encoder(out3 / "encoder.safetensors")
    assert [s["stage"] for s in enc3.provenance["stages"]] == ["sft", "dpo-head"]
    assert enc3.provenance["stages"][1]["beta"] == 100.0 and enc3.provenance["stages"][1]["dataset_size"] == 2

    out2 = tmp_path / "dpo-lora"
    assert main(["train-dpo", "--model", str(model_dir), "--pairs", str(pairs), "--out", str(out2), "--steps", "2",
                 "--stage", "lora", "--encoder", str(out / "encoder.safetensors"), "--lora",
                 str(out / "lora.safetensors")]) == 0
    assert (out2 / "lora.safetensors").is_file()


def test_cli_errors_are_clear(tmp_path, model_dir, capsys):
    videos = write_videos(tmp_path / "videos")
    rc = main(["train-sft", "--model", str(model_dir), "--videos", str(videos), "--out", str(tmp_path / "o"),
               "--steps", "1", "--lora-targets", "to_qq"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "to_qq" in err and "attn1.to_q" in err
    rc = main(["train-sft", "--model", str(tmp_path), "--videos", str(videos), "--out", str(tmp_path / "o")])
    assert rc == 2 and "config.json" in capsys.readouterr().err
    empty = tmp_path / "prefs"
    empty.mkdir()
    (empty / "pairs.jsonl").write_text("")
    rc = main(["train-dpo", "--model", str(model_dir), "--pairs", str(empty), "--out", str(tmp_path / "o")])
    assert rc == 2 and "no usable pairs" in capsys.readouterr().err


def test_hostile_pair_lines_are_skipped_not_raised(tmp_path, capsys):
    from physmaster.train_cli import read_preference_folder

    folder = write_pairs(tmp_path / "prefs")
    with open(folder / "pairs.jsonl", "a") as f:
        f.write("[" * 100_000 + "\n")
        f.write('{"group": "g0", "winner": 1e999, "loser": 1}\n')
        f.write('{"group": "g0", "winner": 2.7, "loser": 1}\n')
        f.write('{"group": "g0", "winner": true, "loser": 1}\n')
        f.write('{"group": ["g0"], "winner": 0, "loser": 1}\n')
    data = read_preference_folder(folder)
    assert len(data) == 2
    err = capsys.readouterr().err
    assert all(f"line {n}" in err for n in (3, 4, 5, 6, 7, 8, 9)) and "nested too deeply" in err
