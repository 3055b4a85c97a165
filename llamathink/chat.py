"""The ``llamathink-chat`` terminal chat with a (finetuned) LlamaThink model.

The conversation format (template, tokenization, history trimming) is :mod:`llamathink.chat_format`; the
finetuning data is :mod:`llamathink.data.chat`.

The ``llamathink-chat`` command
-------------------------------

::

    llamathink-chat runs/quickstart/chat/final                      # interactive
    llamathink-chat runs/quickstart/chat/final -p "Hi! Any plans?"  # one shot: prints the reply and exits
    echo "Why is the sky blue?" | llamathink-chat MODEL -p -        # one shot, message from stdin

Replies stream to stdout as they are generated; notices go to stderr. The history is kept while it
fits the model's context window minus the room kept for the reply (``--max-new-tokens``, at most half the window);
beyond that the oldest messages are dropped first (the system prompt stays). ``/reset`` clears the history,
``/exit``, ``/quit`` or Ctrl-D (EOF) leave; Ctrl-C stops a reply being generated (the exchange is discarded) and
leaves when pressed at the prompt.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Sequence, TextIO

from llamathink.chat_format import (
    TemplateRenderTimeout,
    check_content,
    check_fits,
    is_llamathink_template,
    looks_like_llamathink_template,
    prompt_ids,
    render_deadline,
    set_chat_template,
    storable_text,
    trim_history,
)
from llamathink.cli import tolerant_output

# ---------------------------------------------------------------------------------------------------------------
# Chatting: streaming generation, the session
# ---------------------------------------------------------------------------------------------------------------


# a SentencePiece byte-fallback token (Llama's <0xE2>)
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class _StreamPrinter:
    """A ``generate()`` streamer (BaseStreamer interface) that writes the reply as it grows, exactly as
    `ChatSession.reply` returns it (`reply_text`, whose text of a token prefix only grows): the reply's tokens are
    added to a `_ReplyDecoder` as they come and its text is written as it grows, holding back an incomplete UTF-8
    character and trailing whitespace."""

    def __init__(self, tokenizer, out: TextIO):
        self.out = out
        self.reply = _ReplyDecoder(tokenizer)
        self.printed = 0
        self.prompt_seen = False

    def _write_up_to(self, text: str):
        if len(text) > self.printed:
            self.out.write(text[self.printed :])
            self.out.flush()
            self.printed = len(text)

    def put(self, value):
        if not self.prompt_seen:  # generate() first hands over the prompt
            self.prompt_seen = True
            return
        self.reply.add(value.reshape(-1).tolist())
        self._write_up_to(self.reply.text().rstrip("\ufffd").rstrip())

    def end(self):
        self._write_up_to(self.reply.text())
        self.out.flush()


class _ReplyDecoder:
    """The reply tokens added so far (`add`), and their text (`text`) as `reply_text` reads them: special tokens
    dropped, each run of byte-fallback tokens replaced by the byte tokens of its text as Python's UTF-8 decoder reads
    it (valid, so the tokenizer's decoder keeps every character). A token is looked at once, when added."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.skipped = set(tokenizer.all_special_ids)
        self.kept: list[int] = []  # the tokens before the open byte run, runs made valid
        self.run, self.run_ids = bytearray(), []  # the open byte run: its bytes and tokens

    def add(self, ids: list[int]) -> None:
        for i, token in zip(ids, self.tokenizer.convert_ids_to_tokens(ids)):
            if i in self.skipped:  # (dropped by the decode: the byte runs on either side join)
                continue
            byte = _BYTE_TOKEN.fullmatch(token) if isinstance(token, str) else None
            if byte is not None:
                self.run.append(int(byte.group(1), 16))
                self.run_ids.append(i)
                continue
            self.kept += self._valid_run()
            self.run.clear()
            self.run_ids.clear()
            self.kept.append(i)

    def _valid_run(self) -> list[int]:
        if not self.run:
            return []
        valid = bytes(self.run).decode("utf-8", "replace").encode("utf-8")
        ids = self.tokenizer.convert_tokens_to_ids([f"<0x{b:02X}>" for b in valid])
        # (a vocabulary without all 256 byte tokens under these names: the run as it came)
        return list(self.run_ids) if None in ids or self.tokenizer.unk_token_id in ids else ids

    def text(self) -> str:
        ids = self.kept + self._valid_run()
        return storable_text(self.tokenizer.decode(ids, skip_special_tokens=True).strip())


def reply_text(tokenizer, ids: list[int]) -> str:
    """The text of the reply tokens `ids` as the chat shows and keeps it: decoded without special tokens, stripped,
    with what `check_content` would refuse in the next turn's history (U+FDD0) made U+FFFD, since sampling may make
    any bytes (`storable_text`).

    A run of byte-fallback tokens (<0xE2>, SentencePiece's) that is not valid UTF-8 reads as Python's
    ``bytes.decode("utf-8", "replace")`` reads it: one U+FFFD per invalid sequence, the valid characters kept. The
    tokenizer's own decoder makes every byte of such a run U+FFFD, the ASCII ones too, so a later byte could change
    text already streamed; here the text of a prefix of `ids` is a prefix of the text of `ids`, up to an
    incomplete last character and trailing whitespace (`_ReplyDecoder`)."""
    reply = _ReplyDecoder(tokenizer)
    reply.add(list(ids))
    return reply.text()


MIN_TEMPERATURE = 1e-3  # below it sampling is greedy in all but name, and float32 logits / t overflow


def temperature_is_valid(t) -> bool:
    """0 (greedy) or a finite number >= MIN_TEMPERATURE: logits / t overflows float32 for tiny temperatures (inf,
    then NaN probabilities deep inside sampling)."""
    return isinstance(t, (int, float)) and math.isfinite(t) and (t == 0 or t >= MIN_TEMPERATURE)


@dataclass
class GenerationSettings:
    """How a :class:`ChatSession` samples its replies (the command's ``--max-new-tokens``, ``--temperature``,
    ``--top-k``, ``--top-p``)."""

    max_new_tokens: int = 256
    temperature: float = 0.7  # 0: greedy
    top_k: int = 50  # 0: off
    top_p: float = 0.9  # 1.0: off

    def __post_init__(self):
        if not temperature_is_valid(self.temperature):
            raise ValueError(
                f"temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE}, got {self.temperature!r}"
            )


class ChatSession:
    """A conversation with a model: ``reply(text)`` adds a user message, trims the history to the context window,
    generates (streaming to ``stream`` if given) and records the reply. On any interruption (Ctrl-C included) the
    history is left as it was before the call."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        system: str | None = None,
        settings: GenerationSettings | None = None,
        max_context: int | None = None,
        notices: TextIO | None = None,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.system = system if system and system.strip() else None  # blank: no system block, as in training data
        self.settings = settings or GenerationSettings()
        window = getattr(model.config, "max_position_embeddings", None)
        if max_context is not None and window is not None and max_context > window:  # history would never be cut
            raise ValueError(
                f"--max-context: max_context={max_context} exceeds the model's context window ({window} positions)"
            )
        self.max_context = int(max_context or window or 2048)
        self.notices = notices
        if self.system:  # refused once here, not at every turn (as "message 0" or "the message is too long")
            check_content(0, self.system, "the system prompt")
            check_fits(tokenizer, self.system, self.max_context - self.reserve, "the system prompt")
            first = [{"role": "system", "content": self.system}, {"role": "user", "content": ""}]
            taken = len(prompt_ids(tokenizer, first))
            if taken > self.max_context - self.reserve:
                raise ValueError(
                    f"the system prompt takes {taken} tokens with the chat template; the context window holds "
                    f"{self.max_context}, {self.reserve} of them kept for the reply: shorten it (or lower "
                    "--max-new-tokens)"
                )
        # ids of a larger (padded) model vocabulary that the tokenizer has no text for: never sampled (an empty
        # reply otherwise); run.c's chat leaves out the same ids
        vocab = getattr(model.config, "vocab_size", None)
        self.textless_ids = list(range(len(tokenizer), vocab)) if vocab and vocab > len(tokenizer) else []
        if self.textless_ids and notices is not None:
            notices.write(
                f"[note: the model's vocabulary has {len(self.textless_ids)} ids past the tokenizer's {len(tokenizer)}; "
                "they have no text and are never sampled]\n"
            )
        self.messages: list[dict] = []
        self.reset()

    def reset(self):
        """Forget the conversation: the history holds the system message alone (or nothing)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    @property
    def reserve(self) -> int:
        """Tokens kept free for the reply: max_new_tokens, at most half of the context window."""
        return max(1, min(self.settings.max_new_tokens, self.max_context // 2))

    def reply(self, text: str, stream: TextIO | None = None) -> str:
        """The assistant's answer to the user's `text` (also written to `stream` as it is generated), with both
        added to the history; the oldest messages are dropped (and `notices` told) where the history no longer fits
        the context with room for the reply. Raises ValueError for text the chat template cannot carry (U+FDD0,
        a lone surrogate: `check_content`); on any error the history is left as it was."""
        import torch

        check_content(len(self.messages), text, "your message")  # named as the user knows it, not by index
        before = list(self.messages)
        try:
            msgs, dropped = trim_history(
                self.tokenizer, before + [{"role": "user", "content": text}], self.max_context - self.reserve
            )
            if dropped and self.notices is not None:
                self.notices.write(
                    f"[dropped the {dropped} oldest message{'s' if dropped > 1 else ''} to fit the "
                    f"{self.max_context}-token context window]\n"
                )
                self.notices.flush()
            ids = prompt_ids(self.tokenizer, msgs)
            max_new = min(self.settings.max_new_tokens, self.max_context - len(ids))
            device = next(self.model.parameters()).device
            input_ids = torch.tensor([ids], dtype=torch.long, device=device)
            s = self.settings
            kwargs: dict[str, Any] = dict(
                max_new_tokens=max_new,
                eos_token_id=self.tokenizer.eos_token_id,
                pad_token_id=self.tokenizer.pad_token_id,
                attention_mask=torch.ones_like(input_ids),
            )
            if s.temperature > 0:
                kwargs.update(
                    do_sample=True,
                    temperature=s.temperature,
                    top_k=max(0, int(s.top_k)),
                    top_p=min(1.0, float(s.top_p)),
                )
            else:
                kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)
            if self.textless_ids:
                kwargs["suppress_tokens"] = self.textless_ids
            if stream is not None:
                kwargs["streamer"] = _StreamPrinter(self.tokenizer, stream)
            with torch.no_grad(), _own_generation_config(self.model):
                out = self.model.generate(input_ids, **kwargs)
            answer = reply_text(self.tokenizer, out[0, len(ids) :].tolist())
            self.messages = msgs + [{"role": "assistant", "content": answer}]
            return answer
        except BaseException:
            self.messages = before
            raise


@contextlib.contextmanager
def _own_generation_config(model):
    """While the block runs, `model.generation_config` is transformers' defaults alone: generate() fills every
    setting the caller leaves unset from the model's own, so a saved folder's generation_config.json (beams, a time
    limit, penalties, forced or suppressed tokens, output formats) would shape the chat's replies unseen."""
    from transformers import GenerationConfig

    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


# ---------------------------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------------------------

HELP = "/reset clears the history, /exit or Ctrl-D quits, Ctrl-C stops a reply (and quits at the prompt)"


def _read_line(stdin: TextIO, prompt: str) -> str | None:
    """One line of input, or None at EOF. On a terminal ``input()`` gives line editing."""
    if stdin is sys.stdin and stdin.isatty():
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        try:
            return input(prompt)
        except EOFError:
            return None
    line = stdin.readline()
    return None if line == "" else line


class _BestEffort:
    """A stream of notices whose write failures are dropped (stderr closed, or redirected to a full disk): the
    replies on stdout go on without them, where the first notice used to end the chat with status 1 and no word."""

    def __init__(self, stream: TextIO | None):
        self.stream = stream

    def write(self, text: str) -> int:
        with contextlib.suppress(OSError, ValueError, AttributeError):  # (ValueError: closed; None: no stderr)
            self.stream.write(text)
        return len(text)

    def flush(self) -> None:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            self.stream.flush()


def run_interactive(
    session: ChatSession, stdin: TextIO | None = None, stdout: TextIO | None = None, stderr: TextIO | None = None
) -> int:
    """The interactive loop: read a line, stream the reply, repeat until EOF, ``/exit`` or Ctrl-C at the prompt.
    Notices go to `stderr` as far as it can be written (`_BestEffort`)."""
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, _BestEffort(stderr or sys.stderr)
    tty = stdin is sys.stdin and stdin.isatty()
    stderr.write(f"[{HELP}]\n")
    stderr.flush()
    while True:
        try:
            line = _read_line(stdin, "> " if tty else "")
        except KeyboardInterrupt:
            stderr.write("\n")
            return 0
        if line is None:
            if tty:
                stderr.write("\n")
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            session.reset()
            stderr.write("[history cleared]\n")
            continue
        if text == "/help":
            stderr.write(f"[{HELP}]\n")
            continue
        try:
            session.reply(text, stream=stdout)
            stdout.write("\n")
            stdout.flush()
        except KeyboardInterrupt:
            stdout.write("\n")
            stderr.write("[interrupted; this exchange is not kept]\n")
        except ValueError as err:  # ContextOverflow, or a message the template refuses (U+FDD0)
            stderr.write(f"[{err}]\n")
        except OSError as err:  # the reader went away (a closed pipe), or the disk under a redirected stdout is full
            return _output_failed(err, stdout, stderr)
        stderr.flush()


def _output_failed(err: OSError, stdout: TextIO, stderr: TextIO) -> int:
    """The exit status when the reply cannot be written: 0 for a closed pipe (e.g. piped into `head`: stop
    quietly, as other command-line tools do), 1 with a one-line error for anything else (a full disk)."""
    if stdout is sys.stdout:  # the interpreter's final flush would raise again at exit
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    if isinstance(err, BrokenPipeError):
        return 0
    stderr.write(f"llamathink-chat: error: cannot write the reply: {err}\n")
    stderr.flush()
    return 1


def load_chat_model(
    path: str,
    *,
    tokenizer: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
):
    """Model (eval mode) and tokenizer for chatting. A tokenizer without a chat template gets LlamaThink's.
    Raises ValueError for weights with NaN or infinite values (in `dtype`) or that give non-finite logits, a
    tokenizer larger than the model's vocabulary or with another end-of-sequence id, a chat template that cannot
    render a message or leaves it out, and what `load_saved_model` and `load_tokenizer` raise."""
    import torch
    from transformers.utils import logging as hf_logging

    import llamathink  # noqa: F401  (registers LlamaThink with the Auto classes)
    from llamathink.data import check_vocab
    from llamathink.tokenizer_utils import load_tokenizer

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    from llamathink.train.checkpoint import load_saved_model

    hf_logging.disable_progress_bar()  # no "Loading weights" bar in front of the chat
    # (weights with NaN or infinite values in `dtype` are refused there: sampling would fail deep inside
    # torch.multinomial, greedy decoding print nothing)
    model = load_saved_model(path, "model", getattr(torch, dtype), auto=True, trust_remote_code=trust_remote_code)
    model.to(device).eval()
    tok = load_tokenizer(tokenizer or path)
    check_vocab(len(tok), model.config.vocab_size)
    model_eos = model.config.eos_token_id
    model_eos = set(model_eos) if isinstance(model_eos, (list, tuple)) else {model_eos} - {None}
    if tok.eos_token_id is None or (model_eos and tok.eos_token_id not in model_eos):
        raise ValueError(
            f"the tokenizer's end-of-sequence token is {tok.eos_token!r} (id {tok.eos_token_id}), the model's is id "
            f"{', '.join(map(str, sorted(model_eos))) or 'unset'}: replies would not stop where the model ends them "
            "(is this the model's own tokenizer?)"
        )
    model_bos = model.config.bos_token_id
    if model_bos is not None and tok.bos_token_id is not None and tok.bos_token_id != model_bos:
        raise ValueError(
            f"the tokenizer's beginning-of-sequence token is {tok.bos_token!r} (id {tok.bos_token_id}), the model's is "
            f"id {model_bos}: every prompt would start with a token the model did not learn to start with (is this "
            "the model's own tokenizer, its tokenizer_config.json or special_tokens_map.json edited?)"
        )
    template = getattr(tok, "chat_template", None)
    if not template:
        print(f"[{tokenizer or path}: the tokenizer has no chat template; using LlamaThink's]", file=sys.stderr)
        set_chat_template(tok)
    elif is_llamathink_template(template):
        set_chat_template(tok)  # an older checkpoint's copy of the format: the current one, content guarded
    else:  # another template (or an edited copy of ours): render a probe now rather than fail at the first message
        if looks_like_llamathink_template(template):
            print(
                f"[{tokenizer or path}: the chat template is an edited copy of LlamaThink's; it is used as written]",
                file=sys.stderr,
            )
        probe = [{"role": "user", "content": "Hello, how are you?"}]
        try:
            prompt_ids(tok, probe)
            with render_deadline():
                rendered = tok.apply_chat_template(probe, add_generation_prompt=True, tokenize=False)
        except TemplateRenderTimeout:
            raise
        except ValueError as err:  # (prompt_ids turns what the template raises into a ValueError)
            cause = err.__cause__ or err  # jinja2's syntax and undefined-variable errors, a template that raises
            raise ValueError(
                f"its tokenizer's chat template (chat_template.jinja or tokenizer_config.json) cannot render a "
                f"conversation ({type(cause).__name__}: {cause})"
            ) from cause
        if probe[0]["content"] not in rendered:  # e.g. it prints an undefined variable: jinja2 renders ""
            raise ValueError(
                f"its tokenizer's chat template leaves the message out of the prompt: {probe[0]['content']!r} "
                f"renders as {rendered[:200]!r} (does it print a variable that transformers does not pass?)"
            )
    _check_forward_is_finite(model, tok, dtype)
    return model, tok


def _check_forward_is_finite(model, tokenizer, dtype: str) -> None:
    """Raise ValueError when a short probe gives NaN or +inf logits, a position without a finite logit, or an
    RMSNorm input whose squares overflow float32 (values above about 1e19: the norm then outputs zeros, and every
    logit after it is the same finite number): finite weights too large for `dtype`'s arithmetic would otherwise
    print garbage or nothing. A -inf logit alone (a masked vocabulary id) is fine. Norms are found by class name
    (`...RMSNorm`), so a model loaded through `trust_remote_code` is probed alike."""
    import torch

    ids = [tokenizer.bos_token_id or 0, *tokenizer("Hello", add_special_tokens=False)["input_ids"]]
    device = next(model.parameters()).device
    overflow = []  # (norm's name, largest |input|) of the first norm whose input's squares overflow

    def check_input(name):
        def hook(module, args):
            x = args[0] if args and isinstance(args[0], torch.Tensor) else None
            # finite values whose squares overflow (NaN or inf inputs are the logits check's to name)
            if (
                x is not None
                and not overflow
                and bool(torch.isfinite(x).all())
                and not bool(torch.isfinite(x.float().square().sum(-1)).all())
            ):
                overflow.append((name, x.detach().float().abs().max().item()))

        return hook

    hooks = [
        module.register_forward_pre_hook(check_input(name))
        for name, module in model.named_modules()
        if type(module).__name__.endswith("RMSNorm")
    ]
    try:
        with torch.no_grad():
            logits = model(torch.tensor([ids], device=device)).logits
    finally:
        for hook in hooks:
            hook.remove()
    # -inf is a masked token (some models mask unused vocabulary ids); NaN, +inf or no finite logit at all is not
    if (
        not overflow
        and not (bool(torch.isnan(logits).any()) or bool(torch.isposinf(logits).any()))
        and bool(torch.isfinite(logits).any(dim=-1).all())
    ):
        return
    name, largest = max(((n, p.detach().abs().max().item()) for n, p in model.named_parameters()), key=lambda x: x[1])
    where = (
        f"the input of {overflow[0][0]} reaches |x| = {overflow[0][1]:.3g}, whose squares overflow float32"
        if overflow
        else f"its forward pass gives NaN or infinite logits in {dtype}"
    )
    raise ValueError(
        f"{where} (largest weight: {name}, |w| = {largest:.3g}): the weights are out of the range this model can "
        "compute with (saved from a run that diverged?)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """The ``llamathink-chat`` command (``argv`` defaults to ``sys.argv[1:]``); returns the exit status: 0, 1 when
    the message is refused or too long for the context window, 130 on Ctrl-C during a one-shot reply."""
    ap = argparse.ArgumentParser(
        prog="llamathink-chat",
        description="Chat with a (finetuned) LlamaThink model in "
        "the terminal; replies stream as they are generated. " + HELP + ".",
    )
    ap.add_argument("model", help="a save_pretrained directory (e.g. runs/quickstart/chat/final) or a Hub id")
    ap.add_argument(
        "-p", "--prompt", help="one-shot: send this message ('-' reads it from stdin), print the reply and exit"
    )
    ap.add_argument("--system", help="system prompt")
    ap.add_argument("--tokenizer", help="tokenizer (default: the model's)")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.7, help="0 for greedy decoding")
    ap.add_argument("--top-k", type=int, default=50, help="0 turns it off")
    ap.add_argument("--top-p", type=float, default=0.9, help="1.0 turns it off")
    ap.add_argument("--greedy", action="store_true", help="greedy decoding (same as --temperature 0)")
    ap.add_argument("--seed", type=int, help="random seed for sampling")
    ap.add_argument("--max-context", type=int, help="context window in tokens (default: the model's)")
    ap.add_argument("--no-stream", action="store_true", help="print each reply when complete")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    ap.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="load the model code stored with the checkpoint instead of this package's (not needed to load one)",
    )
    args = ap.parse_args(argv)
    if sys.stdout is None:  # started with standard output closed (`>&-`): replies would vanish, status 0
        print(
            "llamathink-chat: error: standard output is closed: there is nowhere to write the replies", file=sys.stderr
        )
        return 2
    if args.max_new_tokens < 1:
        ap.error("--max-new-tokens must be at least 1")
    # float() takes "nan" and "inf": a NaN temperature would silently mean greedy decoding
    if not temperature_is_valid(args.temperature):
        ap.error(f"--temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE} (got {args.temperature})")
    if not 0 <= args.top_p <= 1:  # also refuses NaN
        ap.error(f"--top-p must be in [0, 1] (got {args.top_p})")
    if args.top_k < 0:
        ap.error(f"--top-k must be >= 0 (got {args.top_k})")
    if args.max_context is not None and args.max_context < 2:  # 0 would silently mean the model's window
        ap.error(f"--max-context must be at least 2 (got {args.max_context})")
    if args.seed is not None and not -(2**63) <= args.seed < 2**64:  # what torch.manual_seed takes
        ap.error(f"--seed must be in [-2^63, 2^64) (got {args.seed})")
    import torch

    if args.device != "auto":
        try:
            device = torch.device(args.device)
        except RuntimeError:
            ap.error(f"--device {args.device}: not a device name (auto, cpu, cuda, cuda:N, mps, ...)")
        backend = getattr(torch, device.type, None)
        if device.type == "meta":
            ap.error("--device meta: meta tensors hold no values, there is nothing to generate with")
        elif device.type == "cuda" and not torch.cuda.is_available():
            ap.error(f"--device {args.device}: this machine has no CUDA device (use --device cpu or auto)")
        elif device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            ap.error(f"--device {args.device}: this machine has CUDA devices 0 to {torch.cuda.device_count() - 1}")
        elif device.type != "cpu" and not (backend and getattr(backend, "is_available", bool)()):
            ap.error(f"--device {args.device}: this machine has no {device.type} device (use --device cpu or auto)")
    if hasattr(sys.stdin, "reconfigure"):  # invalid UTF-8 in: a clear refusal per message, not a traceback
        sys.stdin.reconfigure(errors="surrogateescape")
    tolerant_output()  # a reply the terminal's encoding cannot hold: shown with "?", not lost
    if args.seed is not None:
        torch.manual_seed(args.seed)
    try:
        model, tokenizer = load_chat_model(
            args.model,
            tokenizer=args.tokenizer,
            device=args.device,
            dtype=args.dtype,
            trust_remote_code=args.trust_remote_code,
        )
    except (OSError, ValueError) as err:  # not a saved model, no such folder, offline Hub lookups, ...
        print(f"llamathink-chat: error: cannot load {args.model}: {err}", file=sys.stderr)
        return 2
    settings = GenerationSettings(args.max_new_tokens, 0.0 if args.greedy else args.temperature, args.top_k, args.top_p)
    try:
        session = ChatSession(
            model,
            tokenizer,
            system=args.system,
            settings=settings,
            max_context=args.max_context,
            notices=_BestEffort(sys.stderr),
        )
    except ValueError as err:  # --max-context beyond the model's window, a --system prompt that cannot fit
        print(f"llamathink-chat: error: {err}", file=sys.stderr)
        return 2
    if args.prompt is None:
        return run_interactive(session)
    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not text.strip():  # (interactive mode skips empty lines the same way)
        print("error: the message is empty", file=sys.stderr)
        return 1
    try:
        if args.no_stream:
            print(session.reply(text))
        else:
            session.reply(text, stream=sys.stdout)
            print()
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except ValueError as err:  # ContextOverflow, or a message the template refuses (U+FDD0)
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # a closed pipe (e.g. piped into `head`), a full disk under a redirected stdout
        return _output_failed(err, sys.stdout, sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
