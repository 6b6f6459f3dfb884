"""Does the UNet use its condition? (docs/RESULTS.md §4)

    PYTHONPATH=. python docs/results/tools/condition_finetune.py [STEPS]

Fine-tunes the condition adapter + UNet of checkpoints/small (tokenizer frozen) for STEPS steps, once
as trained and once with unit-scaled (LayerNorm) condition outputs, and every 100 steps prints, on a
fixed batch of 64 EmojiPrefs images: the loss with the images' own tokens, the gain over a zeroed
condition, the gain over another image's tokens, and the condition's mean magnitude.
"""

import copy
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from pigeon.checkpoint import load_checkpoint
from pigeon.diffusion.scheduler import alphas_cumprod
from pigeon.models.pigeon import to_tensor
from pigeon.training.data import EmojiPrefsData
from pigeon.training.frozen import image_latents
from pigeon.training.objectives import denoising_loss, encoder_input

BATCH = 32


def condition(model, images, unit_scale: bool):
    with torch.no_grad():
        tok = model.history_encoder.tokenize(encoder_input(model, images))
    prompt_embeds, pooled, _ = model.condition_adapter(tok.quantized, tok.token_keep)
    if unit_scale:
        prompt_embeds = F.layer_norm(prompt_embeds, prompt_embeds.shape[-1:])
        pooled = F.layer_norm(pooled, pooled.shape[-1:])
    return prompt_embeds, pooled


def main() -> None:
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    torch.manual_seed(0)
    base = load_checkpoint("checkpoints/small").model.float()
    cfg = base.config
    ac = torch.from_numpy(alphas_cumprod(cfg.scheduler)).float()
    data = EmojiPrefsData("demo/data/emojiprefs", cfg.image_size)
    val_images = to_tensor(data.images(np.random.default_rng(123), 64)[0])
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        val_latents = image_latents(base, val_images)
    val_noise = torch.randn(val_latents.shape, generator=g)
    val_t = torch.randint(0, len(ac), (64,), generator=g)

    def report(model, unit_scale: bool) -> list[float]:
        model.eval()
        with torch.no_grad():
            pe, pooled = condition(model, val_images, unit_scale)
            args = (model, val_latents, val_noise, val_t, ac)
            own = denoising_loss(*args, pe, pooled).item()
            zero = denoising_loss(*args, pe * 0, pooled * 0).item()
            other = torch.roll(torch.arange(64), 1)
            swapped = denoising_loss(*args, pe[other], pooled[other]).item()
        model.train()
        return [round(x, 5) for x in (own, zero - own, swapped - own, pe.abs().mean().item())]

    print("columns: own-token loss, gain vs zeroed condition, gain vs another image's, |condition|")
    for unit_scale in (False, True):
        model = copy.deepcopy(base)
        model.history_encoder.eval().requires_grad_(False)
        model.vae.requires_grad_(False)
        params = [*model.condition_adapter.parameters(), *model.unet.parameters()]
        optimizer = torch.optim.AdamW(params, lr=2e-4)
        print(f"unit_scale={unit_scale} step 0: {report(model, unit_scale)}", flush=True)
        rng, start = np.random.default_rng(0), time.time()
        for step in range(1, steps + 1):
            images = to_tensor(data.images(rng, BATCH)[0])
            pe, pooled = condition(model, images, unit_scale)
            drop = (torch.rand(BATCH) < 0.1).float()  # CFG: zeroed negatives, as in training
            pe, pooled = pe * (1 - drop)[:, None, None], pooled * (1 - drop)[:, None]
            with torch.no_grad():
                latents = image_latents(model, images)
            t = torch.randint(0, len(ac), (BATCH,))
            loss = denoising_loss(model, latents, torch.randn_like(latents), t, ac, pe, pooled)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % 100 == 0:
                elapsed = time.time() - start
                print(
                    f"unit_scale={unit_scale} step {step} ({elapsed:.0f}s): "
                    f"{report(model, unit_scale)}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
