"""Text from a trained model: :func:`generate` (ids from a model) and :func:`sample` (text from a
checkpoint file or run directory; the ``modula-mhc sample`` command)."""
from __future__ import annotations

import math

import torch

from .checkpoint import CheckpointError, find_checkpoint, load_checkpoint
from .config import ConfigError, TrainConfig, build_model, resolve_device


@torch.no_grad()
def generate(model, prompt: torch.Tensor, n: int, context: int, generator: torch.Generator,
             temperature: float = 1.0) -> torch.Tensor:
    """Sample n ids autoregressively: next ~ softmax(logits(last ≤ context ids) / temperature)."""
    was_training = model.training
    model.eval()
    ids = prompt.reshape(1, -1)
    for _ in range(n):
        logits = model(ids[:, -context:])[0, -1].float()
        # shifted to max 0 first: a tiny temperature then sends the others to −inf (greedy), never
        # overflows to ±inf and a NaN softmax
        logits = (logits - logits.max()) / max(temperature, 1e-30)  # float32 holds 1e-30 (1e-300 is 0)
        probs = torch.softmax(logits, dim=-1).cpu()
        nxt = torch.multinomial(probs, 1, generator=generator).to(ids.device)
        ids = torch.cat([ids, nxt.reshape(1, 1)], dim=1)
    model.train(was_training)
    return ids[0, prompt.numel():]


def sample(checkpoint, chars: int = 500, prompt: str | None = None, temperature: float = 1.0, seed: int = 0,
           device: str = "auto") -> str:
    """``chars`` characters sampled from the model of a checkpoint file or run directory (after
    ``prompt``; default: a newline). Bad arguments raise ConfigError, a bad file CheckpointError."""
    if not isinstance(chars, int) or isinstance(chars, bool) or chars < 0:
        raise ConfigError("chars", f"must be a non-negative integer, got {chars!r}")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise ConfigError("temperature", f"must be a positive finite number, got {temperature!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2 ** 63:
        raise ConfigError("seed", f"must be a non-negative integer below 2**63, got {seed!r}")
    if device not in ("auto", "cpu", "cuda") or (device == "cuda" and not torch.cuda.is_available()):
        raise ConfigError("device", f"must be auto, cpu or cuda (with CUDA available), got {device!r}")
    path = find_checkpoint(checkpoint, None)
    ckpt = load_checkpoint(path)
    config = TrainConfig(**{k: v for k, v in ckpt["config"].items() if k in TrainConfig.__dataclass_fields__})
    vocab = ckpt["vocab"]
    prompt = ("\n" if "\n" in vocab else vocab[0]) if prompt is None else prompt
    unknown = sorted(set(prompt) - set(vocab))
    if not prompt or unknown:
        raise ConfigError("prompt", f"must be non-empty text in the checkpoint's vocabulary; {''.join(unknown)!r} "
                                    "is not" if unknown else "must not be empty")
    dev = resolve_device(device)
    with torch.random.fork_rng(devices=[]):
        model = build_model(config, len(vocab))
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path!r} does not fit its model: {str(e).splitlines()[0][:200]}") from None
    table = {ch: i for i, ch in enumerate(vocab)}
    ids = generate(model.to(dev), torch.tensor([table[c] for c in prompt], device=dev), chars, config.context,
                   torch.Generator().manual_seed(seed), temperature)
    return "".join(vocab[i] for i in ids.tolist())
