"""A small byte-level BPE tokenizer trained on text our own environments produce.

    build_tokenizer(vocab_size=2048, seed=0) -> transformers.PreTrainedTokenizerFast

The corpus (`tokenizer_corpus(seed)`) is the envs' prompts and observations with noisy oracle
demonstrations (frozenlake, sokoban, python_math), a few dozen lines of basic Python, and numbers.
Digits are split one per token (arithmetic stays learnable), and so are the cells of the grid
games' maps (`_`, `#`, `√`, and capital letters not starting a word), so a map row of n cells is
n tokens and a small model can find a cell by position. Any byte sequence still encodes, so
text the corpus never saw (TextWorld, a user's prompt) round-trips, just in more tokens.

Special tokens (ids 0-3): `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, `<|pad|>`. The chat
template is ChatML and `<|im_end|>` is the eos token, so an engine stops a turn on it.
Same vocab_size and seed -> the same tokenizer.json.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, PAD)

GRID_CELL_PATTERN = r"[A-Z](?![a-z])|[_#√]"

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_PYTHON_BASICS = """\
print("hello world")
x = 1
y = x + 2 * 3 - 4 // 5 % 6
print(x, y)
for i in range(10):
    print(i ** 2)
while n > 0:
    n -= 1
if a == b and c != d or not e:
    pass
elif a < b <= c >= d > e:
    continue
else:
    break
def f(n: int) -> int:
    return n * (n + 1) // 2
lst = [k for k in range(1, 101) if k % 3 == 0]
total = sum(lst)
squares = {k: k * k for k in range(5)}
import math
from fractions import Fraction
import itertools
import functools
print(math.gcd(12, 18), math.lcm(4, 6), math.isqrt(99), math.comb(10, 3), math.factorial(7))
print(math.sqrt(2), math.pi, math.e, math.log(10), math.floor(2.5), math.ceil(2.5))
print(pow(3, 200, 1000003), abs(-5), min(1, 2), max(3, 4), round(2.675, 2))
print(len(str(2 ** 100)), sorted([3, 1, 2]), list(reversed(range(3))))
print(sum(map(int, str(123456))))
a, b = 0, 1
for _ in range(100):
    a, b = b, a + b
s = bytearray([1]) * n
primes = [p for p in range(2, n) if all(p % q for q in range(2, int(p ** 0.5) + 1))]
result = Fraction(1, 3) + Fraction(1, 6)
print(result.numerator, result.denominator)
for x, y in itertools.product(range(3), repeat=2):
    count += 1
try:
    value = int("42")
except ValueError as err:
    print(err)
class Point:
    def __init__(self, x, y):
        self.x = x
        self.y = y
print(f"{total} {x:.3f}")
Traceback (most recent call last):
  File "<string>", line 1, in <module>
NameError: name 'foo' is not defined
ZeroDivisionError: division by zero
SyntaxError: invalid syntax
TypeError: unsupported operand type(s)
True False None
"""

_ENGLISH = """\
You are in a kitchen. There is a fridge, a counter and a stove here. You see a red apple.
You take the knife. You open the door. The recipe says: slice the carrot, then cook it.
Your inventory is empty. You are carrying a yellow potato. Exits: north, south, east, west.
Let me think step by step. First, I will look at the map. The goal is to the right.
Let's compute the answer with Python and check it. The answer is 12. I am not sure.
"""


def tokenizer_corpus(seed: int = 0) -> Iterator[str]:
    """Training texts for the tokenizer: env transcripts, Python, numbers, a little English."""
    from spear_ray.models.demos import generate_demos

    grid_settings = [
        ("frozenlake", {}, 200),
        ("frozenlake", {"max_turns": 8}, 400),
        ("frozenlake", {"size": 6, "hole_prob": 0.25}, 100),
        ("frozenlake", {"size": 8, "slip_prob": 0.3, "max_turns": 30}, 60),
        ("frozenlake", {"fixed_corners": True, "include_instructions": False}, 60),
        ("sokoban", {}, 200),
        ("sokoban", {"size": 7, "num_boxes": 2, "max_turns": 40}, 60),
        ("sokoban", {"max_actions_per_turn": 5}, 30),
    ]
    for env_name, options, count in grid_settings:
        for demo in generate_demos(env_name, range(count), options, noise=0.3, seed=seed):
            yield _render(demo.messages)
    for levels, count in (((1,), 150), ((2,), 150), ((3,), 50), ((4,), 30)):
        # (levels 3-4 are few: the generator computes their answers slowly)
        demos = generate_demos("python_math", range(count), {"levels": levels}, 0.3, seed)
        for demo in demos:
            yield _render(demo.messages)
    rng = random.Random(f"tokenizer-corpus:{seed}")
    for _ in range(20):
        yield _PYTHON_BASICS
        yield _ENGLISH
    for _ in range(300):
        yield " ".join(str(rng.randint(0, 10 ** rng.randint(1, 12))) for _ in range(20))


def _render(messages: list[dict[str, str]]) -> str:
    # the chat layout without its special tokens (they are never merged with other text)
    return "".join(f"{m['role']}\n{m['content']}\n" for m in messages)


def train_tokenizer(texts, vocab_size: int = 2048):
    """A `tokenizers.Tokenizer`: byte-level BPE with single-digit pre-splitting."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            # one token per grid cell: "_", "#", "√" and capitals not starting a word ("G", "OO")
            pre_tokenizers.Split(Regex(GRID_CELL_PATTERN), behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def wrap_tokenizer(tok):
    """The `tokenizers.Tokenizer` as a transformers fast tokenizer with the ChatML template."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=ENDOFTEXT,
        eos_token=IM_END,
        pad_token=PAD,
        unk_token=None,
        additional_special_tokens=[IM_START],
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
        padding_side="left",
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def save_tokenizer(tokenizer, path) -> None:
    """`save_pretrained`, then make tokenizer_config.json loadable by transformers 4.x and 5.x
    (and so by any vLLM): transformers 5 writes its own class name (TokenizersBackend), a list
    under `extra_special_tokens` (a dict in 4.x) and the template only in chat_template.jinja."""
    import json
    from pathlib import Path

    tokenizer.save_pretrained(str(path))
    config_path = Path(path) / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config.pop("extra_special_tokens", None)
    config["additional_special_tokens"] = [IM_START]
    config["chat_template"] = CHAT_TEMPLATE
    for key in ("backend", "is_local", "local_files_only"):  # 5.x bookkeeping of this save
        config.pop(key, None)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def build_tokenizer(vocab_size: int = 2048, seed: int = 0):
    """Train the tokenizer on `tokenizer_corpus(seed)` and wrap it for transformers."""
    if vocab_size < 512:
        raise ValueError(f"vocab_size must be at least 512 (256 bytes + merges), got {vocab_size}")
    return wrap_tokenizer(train_tokenizer(list(tokenizer_corpus(seed)), vocab_size))
