"""Tokenizer and processor for the Janus models, built locally for the debug preset.

Real checkpoints carry their own tokenizer (loaded with the weights). The debug preset and the
random-init real-shape presets need one too, and nothing may be downloaded, so a small
byte-level BPE is trained here from a fixed corpus at build time. Training is deterministic, so
the same ids come out on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import JanusImageProcessorPil, JanusProcessor, PreTrainedTokenizerFast

# Token strings as the released Janus-Pro tokenizer spells them, so prompts built for the debug
# model read the same as prompts for the real one.
BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
PAD_TOKEN = "<｜▁pad▁｜>"
IMAGE_TOKEN = "<image_placeholder>"
BOI_TOKEN = "<begin_of_image>"
EOI_TOKEN = "<end_of_image>"
ROLE_TOKENS = ("<|User|>", "<|Assistant|>")
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, IMAGE_TOKEN, BOI_TOKEN, EOI_TOKEN, *ROLE_TOKENS)

# Janus normalises pixels to [-1, 1] (mean = std = 0.5), not with CLIP's statistics.
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)

_CORPUS_WORDS = """
a an the of and with on in under over above below beside next to near behind in front of
red orange yellow green blue purple pink brown black white gray grey gold silver cyan magenta
circle square triangle star heart ring cross stripe dot line shape shapes background foreground
small large big tiny huge medium bright dark light pale vivid striped dotted plain solid empty
make turn change replace remove add put move rotate flip enlarge shrink recolor paint draw
generate create image picture photo photograph painting sketch scene style render realistic
cat dog bird horse car house tree flower mountain river sea sky cloud sun moon city street
person woman man child people face hand table chair cup book window door road bridge boat
left right top bottom center middle corner edge side two three four five many one single
into onto from by at as is are be make it them this that these those its their there here
please keep same but only more less very quite slightly much color colour size position
""".split()


@dataclass(frozen=True)
class SpecialTokenIds:
    """Ids of the tokens the sequence layout is built from (docs/design.md, "Sequence layout")."""

    bos: int
    eos: int
    pad: int
    image: int
    boi: int
    eoi: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "SpecialTokenIds":
        """Reads the ids from a tokenizer carrying the Janus special tokens.

        The pad id is the vocabulary id of `PAD_TOKEN`, as DeepSeek's processor looks it up,
        whatever `tokenizer.pad_token` says: it builds CFG's unconditional rows and the text
        drop, so a tokenizer that pads with another token would silently change both.

        Raises:
            ValueError: one of the tokens is missing from the vocabulary, or the tokenizer's
                `pad_token` is set to a token other than `PAD_TOKEN`.
        """
        vocab = tokenizer.get_vocab()  # added tokens included, like DeepSeek's `tokenizer.vocab`
        ids = {}
        for name, token in (
            ("bos", tokenizer.bos_token),
            ("eos", tokenizer.eos_token),
            ("pad", PAD_TOKEN),
            ("image", getattr(tokenizer, "image_token", IMAGE_TOKEN)),
            ("boi", getattr(tokenizer, "boi_token", BOI_TOKEN)),
            ("eoi", getattr(tokenizer, "eoi_token", EOI_TOKEN)),
        ):
            token_id = vocab.get(token) if token is not None else None
            if token_id is None:
                raise ValueError(f"tokenizer has no {name} token ({token!r}); is this a Janus tokenizer?")
            ids[name] = int(token_id)
        if tokenizer.pad_token is not None and tokenizer.pad_token_id != ids["pad"]:
            raise ValueError(
                f"tokenizer.pad_token is {tokenizer.pad_token!r} (id {tokenizer.pad_token_id}) but Janus pads with "
                f"{PAD_TOKEN!r} (id {ids['pad']}), the id DeepSeek's processor builds CFG's unconditional rows and "
                f"the text drop from; set tokenizer.pad_token = {PAD_TOKEN!r} and save the tokenizer again")
        return cls(**ids)


def build_debug_tokenizer(vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Trains a small byte-level BPE with the Janus special tokens.

    Args:
        vocab_size: target vocabulary size, special tokens included.

    Returns:
        A fast tokenizer that adds BOS, pads on the left and knows the image tokens.
    """
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Every word both bare and after a space, so common prompt words become single tokens.
    lines = [" ".join(_CORPUS_WORDS[i : i + 12]) for i in range(0, len(_CORPUS_WORDS), 12)]
    lines += ["<|User|>: make the circle red\n\n<|Assistant|>:"] * 4
    backend.train_from_iterator(lines * 8, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=list(ROLE_TOKENS),
        extra_special_tokens={"image_token": IMAGE_TOKEN, "boi_token": BOI_TOKEN, "eoi_token": EOI_TOKEN},
        padding_side="left",
        model_max_length=16384,
    )
    return tokenizer


def build_processor(tokenizer, image_size: int, num_image_tokens: int) -> JanusProcessor:
    """Wraps a tokenizer and a Janus image processor at the model's image side.

    The PIL image processor is used because torchvision is not a dependency here.
    """
    image_processor = JanusImageProcessorPil(
        size={"height": image_size, "width": image_size},
        image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD),
    )
    return JanusProcessor(image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=num_image_tokens)
