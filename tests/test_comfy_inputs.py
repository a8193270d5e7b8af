"""The one translation of ComfyUI-side conditioning into the diffusers Wan backend's inputs, and the video set."""

import pytest
import torch

import train_data as td
from physmaster.backends.comfy_inputs import LatentNorm, resolve_latent_norm, wan_conditioning, wan21_latent_norm
from physmaster.errors import PhysMasterError, WidthMismatchError
from physmaster.videoset import VideoDataset, VideoSetError

C, T, H, W = td.C, td.T, td.H, td.W


def test_wan_i2v_inputs_follow_comfyui_concat_cond():
    context, extras = td.conditioning(0, clip=12)
    tensors = {"context": context, **extras}
    norm = LatentNorm(tuple(float(i) for i in range(C)), tuple(2.0 for _ in range(C)), "test")
    cond = wan_conditioning(tensors, in_channels=2 * C + 4, latent_shape=(C, T, H, W), norm=norm, image_dim=12)
    assert cond.image_cond.shape == (1, 4 + C, T, H, W)
    # mask: ComfyUI's concat_mask is 0 on the given frame; the model sees 1 - mask on 4 channels
    assert torch.all(cond.image_cond[:, :4, 0] == 1) and torch.all(cond.image_cond[:, :4, 1:] == 0)
    # the image latent goes through process_latent_in: (x - mean) / std per channel
    image = extras["cond.concat_latent_image"]
    expect = (image - torch.arange(C).float().view(1, C, 1, 1, 1)) / 2.0
    torch.testing.assert_close(cond.image_cond[:, 4:], expect)
    torch.testing.assert_close(cond.image_embeds, extras["clip_vision.penultimate_hidden_states"])
    torch.testing.assert_close(cond.features, extras["features"])
    torch.testing.assert_close(cond.context, context)
    # a T2V model takes no extra channels: no image condition at all
    assert wan_conditioning(tensors, in_channels=C, latent_shape=(C, T, H, W), norm=None).image_cond is None
    # no concat image on an I2V model: zeros in every extra channel, as ComfyUI feeds it
    bare = wan_conditioning({"context": context}, in_channels=2 * C + 4, latent_shape=(C, T, H, W), norm=None)
    assert bare.image_cond.shape == (1, 4 + C, T, H, W) and not bare.image_cond.any()


def test_conditioning_the_backend_cannot_reproduce_is_named():
    context, extras = td.conditioning(0)
    with pytest.raises(PhysMasterError, match="cond.time_dim_concat"):
        wan_conditioning({"context": context, **extras, "cond.time_dim_concat": torch.zeros(1)},
                         in_channels=2 * C + 4, latent_shape=(C, T, H, W), norm=None, where="group file g")
    with pytest.raises(WidthMismatchError, match="concat_latent_image is"):
        wan_conditioning({"context": context, **extras}, in_channels=2 * C + 4, latent_shape=(C, T, H + 2, W),
                         norm=None)
    with pytest.raises(WidthMismatchError, match="CLIP vision features are 12 wide"):
        wan_conditioning({"context": context, **td.conditioning(0, clip=12)[1]}, in_channels=2 * C + 4,
                         latent_shape=(C, T, H, W), norm=None, image_dim=1280)


def test_latent_norm_choices(tmp_path):
    wan = wan21_latent_norm()
    assert wan.channels == 16 and resolve_latent_norm("auto", 16) == wan
    assert resolve_latent_norm("none", 48) is None
    with pytest.raises(PhysMasterError, match="--latent-norm PATH"):
        resolve_latent_norm("auto", 48)
    (tmp_path / "config.json").write_text('{"latents_mean": [1, 2], "latents_std": [0.5, 4]}')
    norm = resolve_latent_norm(str(tmp_path), 2)
    torch.testing.assert_close(norm.to_model(torch.ones(1, 2, 1)), torch.tensor([[[0.0], [-0.25]]]))
    with pytest.raises(WidthMismatchError, match="has 2 channels"):
        resolve_latent_norm(str(tmp_path), 3)


def test_video_set_round_trip_and_checks(tmp_path):
    vs = td.write_videos(tmp_path, "clips", files=2, per_file=3)
    usable, problems = vs.read()
    assert sorted(usable.values()) == [3, 3] and problems == []
    again = VideoDataset.open(tmp_path, "clips")
    context, extras = td.conditioning(0, width=td.D + 1)
    with pytest.raises(VideoSetError, match="another model or resolution"):
        again.add_videos(torch.zeros(1, C, T, H, W), context, extras)
    bad = vs.file_path(vs.file_ids()[0])
    bad.write_bytes(bad.read_bytes()[:100])  # a torn file: named and skipped
    usable, problems = vs.read()
    assert len(usable) == 1 and f"videos/{bad.name} in video set 'clips' is unreadable" in problems[0]
    with pytest.raises(VideoSetError, match="not found"):
        VideoDataset.open(tmp_path, "nope")
