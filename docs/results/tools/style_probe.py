"""How much of the style can a linear classifier read off the condition? (docs/RESULTS.md §8)

    PYTHONPATH=. python docs/results/tools/style_probe.py CHECKPOINT [--data data/emojiprefs]

Every EmojiPrefs image of the first 600 train-split concepts (7 styles each) is encoded as serving
encodes it (`serving_condition`: the tokenizer in eval mode, the condition adapter); a multinomial
logistic regression (Adam, 300 steps, L2 1e-3, standardised features) is fitted per feature on the
dataset's style labels and scored on the first 150 val-split concepts. Features: the flattened
prompt_embeds, the pooled embedding, the mean of prompt_embeds over the queries, the flattened VAE
latents (the image itself, for scale) and the mean of the kept codes' unit vectors. Chance is 1/7.
No evaluation network is involved.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from pigeon.checkpoint import load_checkpoint
from pigeon.data.emojiprefs import load_emojiprefs
from pigeon.training.frozen import image_latents
from pigeon.training.objectives import encoder_input, serving_condition


@torch.no_grad()
def features(model, dataset, split: str, n: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    idx = dataset.split_index[split][:n]
    size = model.config.image_size
    rgb = torch.from_numpy(dataset.rgb[idx]).flatten(0, 1)  # (concepts * styles, S, S, 3)
    images = rgb.permute(0, 3, 1, 2).float() / 255
    if images.shape[-1] != size:
        images = F.interpolate(images, size=(size, size), mode="area")
    labels = torch.arange(len(dataset.styles)).repeat(len(idx))
    parts: dict[str, list[torch.Tensor]] = {}
    for i in range(0, len(images), 256):
        x = images[i : i + 256]
        prompt, pooled = serving_condition(model, x)
        ids, keep = model.history_encoder(encoder_input(model, x))
        codes = model.history_encoder.quantizer.code_vectors(ids) * keep[..., None]
        row = {
            "prompt_embeds": prompt.flatten(1),
            "pooled_embeds": pooled,
            "mean_prompt_embeds": prompt.mean(1),
            "vae_latents": image_latents(model, x).flatten(1),
            "mean_codes": codes.sum(1) / keep.sum(1, keepdim=True).clamp(min=1),
        }
        for k, v in row.items():
            parts.setdefault(k, []).append(v)
    return {k: torch.cat(v) for k, v in parts.items()}, labels


def probe(train: torch.Tensor, y: torch.Tensor, val: torch.Tensor, y_val: torch.Tensor, k: int):
    mean, std = train.mean(0), train.std(0) + 1e-6
    train, val = (train - mean) / std, (val - mean) / std
    weight = torch.zeros(train.shape[1], k, requires_grad=True)
    bias = torch.zeros(k, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=1e-2)
    for _ in range(300):
        loss = F.cross_entropy(train @ weight + bias, y) + 1e-3 * (weight**2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return float(((val @ weight + bias).argmax(1) == y_val).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--data", default="data/emojiprefs")
    args = parser.parse_args()
    model = load_checkpoint(args.checkpoint).model.eval()
    dataset = load_emojiprefs(args.data)
    train, y = features(model, dataset, "train", 600)
    val, y_val = features(model, dataset, "val", 150)
    for name in train:
        acc = probe(train[name], y, val[name], y_val, len(dataset.styles))
        print(f"{name:20s} dim {train[name].shape[1]:6d}  val style accuracy {acc:.3f}")


if __name__ == "__main__":
    main()
