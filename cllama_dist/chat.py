"""Chat with an instruction-tuned model, its prompts formatted exactly as training formatted them.

    cllama chat --model out/merged                                   interactive, multi-turn, streaming
    cllama chat --model base/ --adapter out/adapter --message "..."   scripted: each answer printed
    echo "把这句话倒过来：我爱北京。" | cllama chat --model out/merged      one message a line from stdin

The prompt of every turn is ``sft.encode.encode_prompt`` of the conversation so far: the very ids the
trainer saw before the answer to that message (segment by segment, BOS and EOS by id), not a
tokenization of the rendered string. For the paper's templates single-turn, and for ``llama2``
multi-turn, the two are the same and stock ``tokenizer.apply_chat_template`` gives these ids too; for a
multi-turn ``alpaca`` history whose answer starts with a whitespace-only piece only this encoding is
what training saw (sft/encode.py explains why).

The template is the model's own (``chat_template`` in the tokenizer_config.json that ``cllama export``
writes from the run's data manifest) unless ``--template`` names another; a model without one is
refused, since guessing a format would silently give the model prompts it never saw.

Answers are streamed as they are generated, never a partial character (inference/generate.py); the
streamed text is what goes into the history of the next turn. The model, tokenizer and adapter load
as eval loads them (inference/load.py).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, TextIO

from .chat_config import ChatConfig
from .errors import UserError
from .inference.generate import Sampling, StreamDecoder, generate_ids
from .sft.encode import encode_prompt, user_turn
from .sft.templates import Template, own_template, pick_template, template_folders

RESET = "/reset"
EXIT = "/exit"

# --------------------------------------------------------------------------------------------------
# A conversation.


@dataclass
class Turn:
    user: str
    assistant: str
    stop: str  # "eos", "max_new_tokens" or "interrupted" (an interrupted answer is not kept in the history)
    prompt_ids: list[int]
    answer_ids: list[int]
    dropped_turns: int = 0  # oldest turns left out of this prompt to fit the model's context
    seconds: float = 0.0

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(prompt_tokens=len(self.prompt_ids), new_tokens=len(self.answer_ids))
        return d


@dataclass
class Session:
    """The state of a chat: the history it formats each prompt from, and every turn so far."""

    model: object
    sp: object
    template: Template
    device: object
    sampling: Sampling
    system: str | None = None
    max_positions: int | None = None  # the model's context; a prompt that leaves no room for the answer is cut
    history: list[tuple[str, str]] = field(default_factory=list)
    conversations: list[list[Turn]] = field(default_factory=lambda: [[]])
    notes: Callable[[str], None] = lambda s: None

    def prompt(self, text: str) -> tuple[list[int], int, int]:
        """(prompt ids, history turns dropped, tokens the answer may have) for the user's ``text``.

        The oldest turns are left out (for good) while the prompt and a full answer would not fit the
        model's context; with no history left, the answer gets the room there is.
        """
        dropped = 0
        while True:
            ids = encode_prompt(user_turn(text, self.history, self.system), self.template, self.sp)
            room = self.max_positions - len(ids) if self.max_positions else self.sampling.max_new_tokens
            if room >= self.sampling.max_new_tokens or not self.history:
                break
            self.history.pop(0)
            dropped += 1
        if room < 1:
            raise UserError(f"the message is too long: its prompt is {len(ids):,} tokens and the model's context "
                            f"{self.max_positions:,}")
        if dropped:
            self.notes(f"note: left the oldest {dropped} turn(s) out of the history to fit the model's context of "
                       f"{self.max_positions:,} tokens")
        return ids, dropped, min(room, self.sampling.max_new_tokens)

    def answer(self, text: str, on_text: Callable[[str], None] = lambda s: None) -> Turn:
        """Answer the user's ``text``, streaming the answer's text through ``on_text``; Ctrl-C stops the answer
        (the turn says "interrupted" and stays out of the history)."""
        ids, dropped, budget = self.prompt(text)
        dec = StreamDecoder(self.sp)
        t0 = time.perf_counter()

        def shown(token: int) -> None:
            piece = dec.push(token)
            if piece:
                on_text(piece)

        try:
            new, stop = generate_ids(self.model, ids, self.sp.eos_id(),
                                     dataclasses.replace(self.sampling, max_new_tokens=budget), self.device, shown)
        except KeyboardInterrupt:
            new, stop = list(dec.ids), "interrupted"
        rest = dec.finish()
        if rest:
            on_text(rest)
        if new != dec.ids:  # the streamer saw every id generate() returned; a difference is a bug
            raise RuntimeError(f"streamed ids {dec.ids[:8]}... differ from the generated ids {new[:8]}...")
        turn = Turn(text, dec.text, stop, ids, new, dropped, time.perf_counter() - t0)
        if stop != "interrupted":
            self.history.append((text, turn.assistant))
        self.conversations[-1].append(turn)
        return turn

    def reset(self) -> None:
        self.history = []
        if self.conversations[-1]:
            self.conversations.append([])


# --------------------------------------------------------------------------------------------------
# The command.


def _lines(stream: TextIO) -> Iterator[str]:
    """Messages, one a line; a line ending with a backslash continues on the next (the backslash becomes a newline)."""
    pending = ""
    for line in stream:
        line = line.rstrip("\r\n")
        if line.endswith("\\"):
            pending += line[:-1] + "\n"
            continue
        yield pending + line
        pending = ""
    if pending:
        yield pending.rstrip("\n")


def _typed(err: TextIO) -> Iterator[str]:
    """Messages typed at the terminal; EOF (Ctrl-D) or Ctrl-C at the prompt ends the chat."""
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    while True:
        try:
            line = input(">>> ")
            while line.endswith("\\"):
                line = line[:-1] + "\n" + input("... ")
        except (EOFError, KeyboardInterrupt):
            print(file=err)
            return
        yield line


def _describe_system(system: str | None) -> str:
    if system is None:
        return "the template's default"
    return "none" if system == "" else repr(system if len(system) <= 40 else system[:40] + "...")


def transcript(session: Session, what: str, tokenizer_path: str, cfg: ChatConfig, device) -> dict:
    return {"model": what, "tokenizer": tokenizer_path, "template": session.template.describe(), "system": cfg.system,
            "sampling": dataclasses.asdict(session.sampling) | {"seed": cfg.seed}, "device": str(device),
            "conversations": [[t.as_dict() for t in conv] for conv in session.conversations if conv]}


def chat(cfg: ChatConfig, stdin: TextIO | None = None, stdout: TextIO | None = None,
         stderr: TextIO | None = None) -> dict:
    """Run a chat (interactive, scripted by ``cfg.message``, or from a non-terminal stdin); returns the transcript.

    Answers go to ``stdout`` as they are generated, one newline after each; the banner, notes and (when
    not interactive) the user's messages go to ``stderr``.
    """
    from .files import check_file_output, check_not_input, write_atomic

    stdin = stdin if stdin is not None else sys.stdin
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    if cfg.json_out:
        check_file_output(cfg.json_out, "chat transcript")
        check_not_input(cfg.json_out, {"model": cfg.model, "adapter": cfg.adapter, "tokenizer": cfg.tokenizer},
                        "chat transcript")
    # The template first: a model without one is refused before minutes of loading.
    template = pick_template(cfg.template, cfg.model, cfg.adapter, cfg.tokenizer, required=True)
    if cfg.template:
        own = own_template(template_folders(cfg.model, cfg.adapter, cfg.tokenizer))
        if own is not None and own.sha256 != template.sha256:
            print(f"note: --template {cfg.template} is not the model's own chat template ({own.origin}); the model "
                  "was most likely tuned with its own", file=err)

    from .inference.load import load_model

    model, tokenizer, what, device = load_model(cfg)
    if tokenizer.sp is None:
        raise UserError(f"cllama chat needs a SentencePiece tokenizer (tokenizer.model) in {tokenizer.path}: prompts "
                        "are encoded as training encoded them; pass --tokenizer")
    if tokenizer.sp.eos_id() < 0:
        raise UserError(f"the tokenizer {tokenizer.path} has no EOS token: an answer could never end")
    import torch

    torch.manual_seed(cfg.seed)
    config = getattr(model, "config", None)
    session = Session(model, tokenizer.sp, template, device,
                      Sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_p), cfg.system,
                      getattr(config, "max_position_embeddings", None) or None,
                      notes=lambda s: print(s, file=err, flush=True))
    interactive = not cfg.message and stdin.isatty()
    sampling = "greedy" if cfg.temperature == 0 else f"temperature {cfg.temperature}, top-p {cfg.top_p}"
    print(f"cllama chat: {what}; template {template.name} ({template.origin}, sha256 {template.sha256[:12]}); "
          f"system prompt: {_describe_system(cfg.system)}; {sampling}, at most {cfg.max_new_tokens} tokens an "
          "answer", file=err, flush=True)
    if interactive:
        print(f"type a message; {RESET} clears the history, {EXIT} or Ctrl-D ends; Ctrl-C stops an answer; end a "
              "line with \\ to continue it on the next", file=err, flush=True)
    messages = iter(cfg.message) if cfg.message else (_typed(err) if interactive else _lines(stdin))

    def save() -> dict:
        t = transcript(session, what, str(tokenizer.path), cfg, device)
        if cfg.json_out:
            write_atomic(cfg.json_out, json.dumps(t, indent=2, ensure_ascii=False) + "\n")
        return t

    def show(piece: str) -> None:
        out.write(piece)
        out.flush()

    for text in messages:
        command = text.strip()
        if command == EXIT:
            break
        if command == RESET:
            session.reset()
            print("(history cleared)", file=err, flush=True)
            continue
        if not command:
            continue
        if not interactive:
            print(f">>> {text}", file=err, flush=True)
        try:
            turn = session.answer(text, show)
        except UserError as exc:
            if not interactive:
                raise
            print(f"error: {exc}", file=err, flush=True)
            continue
        show("\n")
        save()
        if turn.stop == "interrupted":
            print("[answer interrupted: left out of the history]", file=err, flush=True)
            if not interactive:
                break
    return save()
