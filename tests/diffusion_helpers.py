"""A tiny Stable Diffusion pipeline for CPU tests, built from small configs (no weights are downloaded), and a toy
set it is briefly trained on so that its text conditioning matters."""

import gzip
import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

TOY_PROMPTS = ("a photo of a zebra", "a photo of a tulip")  # what the UNet learns each toy class under


def clip_tokenizer_files(out: Path) -> None:
    """vocab.json and merges.txt of CLIP's BPE tokenizer, from the BPE file open_clip ships."""
    import open_clip
    from open_clip.tokenizer import bytes_to_unicode

    path = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    merges = [tuple(m.split()) for m in gzip.open(path).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]]
    base = list(bytes_to_unicode().values())
    vocab = base + [v + "</w>" for v in base] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")


def toy_images(root: Path, per_class: int = 6) -> Path:
    """Two classes of 16x16 images (dark with light rows, light with dark columns), a little pixel noise each."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(("rows", "columns")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            base = np.full((16, 16, 3), 40.0 if c == 0 else 215.0)
            if c == 0:
                base[::4] = 215
            else:
                base[:, ::4] = 40
            Image.fromarray(np.clip(base + rng.normal(0, 4, base.shape), 0, 255).astype(np.uint8)).save(
                root / name / f"{i}.png")
    return root


def tiny_toy_pipeline(out: Path, images: Path, steps: int = 400) -> Path:
    """Build a tiny pipeline, scale its latents to unit variance on the toy set (as SD's scaling factor does for
    its data) and train its UNet a little on the toy classes under TOY_PROMPTS; saved with save_pretrained."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from fewvision.diffusion.gcpl import latents, noise_errors
    from fewvision.diffusion.pipeline import to_pixels

    torch.manual_seed(0)
    tok_dir = out.parent / f"{out.name}-tokenizer"
    tok_dir.mkdir(parents=True)
    clip_tokenizer_files(tok_dir)
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=77)
    # 16 px images, 8 x 8 latents, attention (self and cross) at the 4 x 4 level only: 0.065 s per training step
    # on one thread, against 0.16 s for 32 px images (and 0.33 s with attention at 16 x 16).
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=32)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), latent_channels=4,
                        sample_size=16, norm_num_groups=32)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                        num_hidden_layers=2, max_position_embeddings=77, bos_token_id=49406,
                                        eos_token_id=49407, pad_token_id=49407))
    with torch.no_grad():  # words far apart (random init leaves them all near zero), so a prompt can carry a class
        text.get_input_embeddings().weight.mul_(25.0)
    # DDPM's linear schedule: at its last steps almost no image is left, so the prompt has to carry the class.
    scheduler = DDPMScheduler(beta_start=1e-4, beta_end=0.02, beta_schedule="linear", num_train_timesteps=1000,
                              clip_sample=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    paths = sorted(images.glob("*/*.png"))
    labels = torch.tensor([0 if p.parent.name == "rows" else 1 for p in paths])
    z0 = latents(pipe, to_pixels(pipe, [Image.open(p) for p in paths]))
    vae.register_to_config(scaling_factor=float(vae.config.scaling_factor / z0.std()))
    z0 = latents(pipe, to_pixels(pipe, [Image.open(p) for p in paths]))
    ids = tokenizer(list(TOY_PROMPTS), padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        cond = text(ids)[0]
    optimiser = torch.optim.AdamW(unet.parameters(), lr=5e-3)  # at 2e-3 the 'columns' prompt barely led (0.1 nats)
    generator = torch.Generator().manual_seed(0)
    unet.train()
    for _ in range(steps):
        batch = torch.randint(0, len(z0), (8,), generator=generator)
        t = torch.randint(0, 1000, (8,), generator=generator)
        noise = torch.randn(z0[batch].shape, generator=generator)
        loss = noise_errors(pipe, z0[batch], t, noise, cond[labels[batch]]).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    unet.eval()
    pipe.save_pretrained(str(out))
    return out
