"""The tiny preset's tokenizer: one token per character, built with `tokenizers` and saved with the run.

One vocabulary serves every task (digits for Sudoku, amino-acid letters, Python source): printable ASCII plus
newline and tab. The special ids match DiffusionGemma's defaults (pad 0, eos 1, bos 2). It carries DiffusionGemma's
own chat template and that template's special tokens (`<|turn>`, `<turn|>`, ...), each one token, so the tiny
preset lays examples out exactly as the real model does: chat-templated prompt, canvas closed by `<turn|>`.
"""

from __future__ import annotations

import importlib.resources
import string

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
SPECIALS = (PAD, EOS, BOS, UNK)  # ids 0..3, in DiffusionGemma's order
CHARS = string.printable.replace("\x0b", "").replace("\x0c", "").replace("\r", "")
# The markers DiffusionGemma's chat template writes (turns, tool calls, thinking channel, media); ids after the
# characters, so a character keeps the id it had before the chat format.
CHAT_SPECIALS = (
    "<|turn>",
    "<turn|>",
    '<|"|>',
    "<|tool>",
    "<tool|>",
    "<|tool_call>",
    "<tool_call|>",
    "<|tool_response>",
    "<tool_response|>",
    "<|channel>",
    "<channel|>",
    "<|think|>",
    "<|image|>",
    "<|audio|>",
    "<|video|>",
)


def diffusion_gemma_chat_template() -> str:
    """The chat template google/diffusiongemma-26B-A4B-it ships, as TRL packages it (`trl/chat_templates/
    diffusion_gemma.jinja`, also `trl.chat_template_utils.diffusion_gemma_chat_template`). Read as a package file:
    importing `trl.chat_template_utils` costs seconds."""
    return (importlib.resources.files("trl") / "chat_templates" / "diffusion_gemma.jinja").read_text(encoding="utf-8")


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in CHARS:
        vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Every character is its own pre-token, whitespace included; the decoder glues tokens back without spaces.
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    # Added tokens are matched before pre-tokenization, so `<turn|>` in a rendered chat is one token.
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CHAT_SPECIALS])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        eos_token=EOS,
        bos_token=BOS,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
    )
    tok.model_max_length = 1 << 20
    tok.chat_template = diffusion_gemma_chat_template()
    return tok
