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

Answers are decoded with SentencePiece (byte-fallback pieces become the characters they spell) and
streamed as they are generated: a piece is printed as soon as the text it ends with is complete
characters. A character that falls back to bytes arrives as several tokens (one per UTF-8 byte); the
bytes are held back until the character is whole, so a partial character (U+FFFD) or a piece name
such as ``<0xE4>`` is never printed. What is streamed is, concatenated, exactly ``sp.decode`` of the
answer's ids (tested), and that text is what goes into the history of the next turn.

Nothing here imports torch at module level: the template helpers are used by light callers too.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, TextIO

from .chat_config import ChatConfig
from .errors import UserError
from .sft import templates
from .sft.encode import encode_prompt
from .sft.templates import Template

RESET = "/reset"
EXIT = "/exit"

# --------------------------------------------------------------------------------------------------
# Which template a model folder carries.


def template_folders(model: str | Path, adapter: str | Path = "", tokenizer: str | Path = "") -> list[Path]:
    """Folders that may carry the model's chat template, in the order they are looked at: the tokenizer's
    (the folder of a .model file), the adapter's, the model's."""
    out: list[Path] = []
    for p in (tokenizer, adapter, model):
        if not p:
            continue
        d = Path(p)
        d = d.parent if d.is_file() else d
        if d not in out:
            out.append(d)
    return out


def has_template(folder: Path) -> bool:
    """Whether a folder holds a chat template (chat_template.jinja, or tokenizer_config.json's chat_template)."""
    if (folder / "chat_template.jinja").is_file():
        return True
    cfg = folder / "tokenizer_config.json"
    if not cfg.is_file():
        return False
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # from_tokenizer names the problem when this folder is the one asked for
    return isinstance(data, dict) and bool(data.get("chat_template"))


def own_template(folders: list[Path]) -> Template | None:
    """The first chat template found in ``folders``, or None."""
    for d in folders:
        if has_template(d):
            t = templates.from_tokenizer(d)
            for name, source in templates.BUILTIN.items():  # name a built-in by its text, for messages and records
                if source == t.source:
                    return Template(name, source, t.origin)
            return t
    return None


def no_template(folders: list[Path]) -> UserError:
    where = ", ".join(str(d) for d in folders)
    verb = "holds" if len(folders) == 1 else "hold"
    return UserError(f"no chat template: {where} {verb} no chat_template in tokenizer_config.json (a model exported from "
                     "a pre-training run, or an instruction-tuned model from elsewhere?); give the template the model "
                     "was instruction-tuned with: --template alpaca (or llama2, or a .jinja file)")


def pick_template(spec: str, model: str | Path, adapter: str | Path = "", tokenizer: str | Path = "", *,
                  required: bool = True) -> Template | None:
    """The template to format prompts with.

    ``spec``: "" or "auto": the model's own (None when it has none and not ``required``; refused when
    ``required``); "none": None; else a built-in name (alpaca, llama2), "tokenizer" or a Jinja file.
    """
    folders = template_folders(model, adapter, tokenizer)
    if spec in ("", "auto"):
        t = own_template(folders)
        if t is None and required:
            raise no_template(folders)
        return t
    if spec == "none":
        if required:
            raise UserError("--template none: this needs a chat template (alpaca, llama2 or a .jinja file)")
        return None
    return templates.resolve(spec, folders[0] if folders else None)


def user_turn(text: str, history: list[tuple[str, str]] = (), system: str | None = None) -> list[dict]:
    """The messages of a conversation so far ending with the user's ``text``: the shape encode_prompt takes."""
    out = [] if system is None else [{"role": "system", "content": system}]
    for user, assistant in history:
        out += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    out.append({"role": "user", "content": text})
    return out


# --------------------------------------------------------------------------------------------------
# Streaming decode.


def _byte_value(sp, token: int) -> int:
    return int(sp.id_to_piece(token)[1:-1], 16)  # "<0xE4>" -> 0xE4


class StreamDecoder:
    """The text of generated ids, handed out piece by piece, never a partial character.

    ``push`` returns the text that became final with a token: the decoding of all ids so far, less the
    trailing byte-fallback pieces that are the start of a character not yet complete (those wait for the
    rest of their bytes). ``finish`` returns what is left (a character cut by the end of generation comes
    out as SentencePiece decodes it, U+FFFD). The pieces concatenated equal ``sp.decode(ids)``.
    """

    def __init__(self, sp):
        self.sp = sp
        self.ids: list[int] = []
        self.shown = ""

    def _pending(self) -> int:
        """How many trailing ids are the leading bytes of an incomplete UTF-8 character."""
        run: list[int] = []
        for t in reversed(self.ids):
            if not self.sp.is_byte(t):
                break
            run.append(t)
        if not run:
            return 0
        dec = codecs.getincrementaldecoder("utf-8")("replace")
        dec.decode(bytes(_byte_value(self.sp, t) for t in reversed(run)), final=False)
        return len(dec.getstate()[0])  # bytes the decoder holds: a character's start, waiting for the rest

    def _emit(self, text: str) -> str:
        if not text.startswith(self.shown):
            return ""  # not seen with SentencePiece's decoding; what is shown can never be taken back
        new, self.shown = text[len(self.shown):], text
        return new

    def push(self, token: int) -> str:
        self.ids.append(token)
        pending = self._pending()
        return self._emit(self.sp.decode(self.ids[:len(self.ids) - pending]))

    def finish(self) -> str:
        return self._emit(self.sp.decode(self.ids))

    @property
    def text(self) -> str:
        return self.sp.decode(self.ids)


# --------------------------------------------------------------------------------------------------
# Generation.


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0


def generate_ids(model, prompt_ids: list[int], eos_id: int, sampling: Sampling, device,
                 on_token: Callable[[int], None] | None = None) -> tuple[list[int], str]:
    """The ids generated after ``prompt_ids`` (without the final EOS) and why generation stopped: "eos" or
    "max_new_tokens". ``on_token`` is called with each new id but EOS as soon as it is chosen."""
    import torch
    from transformers import GenerationConfig
    from transformers.generation.streamers import BaseStreamer

    class Streamer(BaseStreamer):
        # generate() hands the streamer the prompt first, then each new token.
        def __init__(self):
            self.prompt_seen = False

        def put(self, value):
            if not self.prompt_seen:
                self.prompt_seen = True
                return
            for t in value.reshape(-1).tolist():
                if t != eos_id and on_token is not None:
                    on_token(int(t))

        def end(self):
            pass

    if sampling.temperature > 0:
        gc = GenerationConfig(max_new_tokens=sampling.max_new_tokens, do_sample=True,
                              temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
    else:
        gc = GenerationConfig(max_new_tokens=sampling.max_new_tokens, do_sample=False)
    gc.eos_token_id = eos_id
    gc.pad_token_id = eos_id
    gc.use_cache = True
    x = torch.tensor([prompt_ids], device=device)
    with torch.no_grad():
        y = model.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=gc,
                           streamer=Streamer() if on_token is not None else None)
    new = y[0, len(prompt_ids):].tolist()
    if new and new[-1] == eos_id:
        return new[:-1], "eos"
    return new, "max_new_tokens"


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

    from .eval.run import load

    model, tokenizer, what, device = load(cfg)
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
