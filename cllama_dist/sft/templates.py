"""Prompt templates for instruction tuning: the paper's two, any Jinja chat template, and how they split.

A template is a Jinja text written in Hugging Face's ``chat_template`` conventions (``messages``,
``bos_token``, ``eos_token``, ``add_generation_prompt``, ``raise_exception``). The same text is used
twice: the offline preprocessor renders training examples through it, and it is written into the
exported tokenizer's ``tokenizer_config.json`` so that ``tokenizer.apply_chat_template`` formats
inference prompts with it. One text, one sha256: the manifest can name exactly what training saw.

Rendering a conversation gives segments, not a string: text marked as prompt or target (assistant)
text, and the places where BOS and EOS go. Special tokens are never spelled out as text and tokenized
(a response that happens to contain "</s>" must not end the sequence): the template is rendered with
private sentinel strings for ``bos_token`` / ``eos_token`` and split at them. Which text is target is
found by rendering growing prefixes of the conversation: what an assistant message adds to the
rendering is target, what a user message (with the generation prompt) adds is prompt; in a template
that marks assistant text with transformers' ``{% generation %}`` blocks, only their text is target.

The paper's templates (character for character):

- v1, Chinese-Alpaca: ymcui/Chinese-LLaMA-Alpaca, scripts/training/build_dataset.py, PROMPT_TEMPLATE
  ``"Below is an instruction that describes a task. Write a response that appropriately completes the
  request.\\n\\n### Instruction:\\n{instruction}\\n\\n### Response: "`` (trailing space included).
- v2, Chinese-Alpaca-2: ymcui/Chinese-LLaMA-Alpaca-2, scripts/training/build_dataset.py, PROMPT_TEMPLATE
  ``"[INST] <<SYS>>\\nYou are a helpful assistant. 你是一个乐于助人的助手。\\n<</SYS>>\\n\\n{instruction}
  [/INST]"``; the system prompt is DEFAULT_SYSTEM_PROMPT of scripts/inference/inference_hf.py (same
  text), whose TEMPLATE has ``{system_prompt}`` in its place.

(v1's scripts/inference/inference_hf.py formats prompts with a variant, "### Instruction:\\n\\n{instruction}
\\n\\n### Response:\\n\\n", "slightly different from the one used in training"; here inference uses the
training text, so that it sees what training saw.)

In both, the paper's target is ``f"{output}{tokenizer.eos_token}"``, tokenized on its own with
``add_special_tokens=False``: SentencePiece puts its dummy-prefix "▁" before the response. The
templates below therefore render the response as ``" " + content``: that space is the paper's dummy
prefix written out, and :mod:`cllama_dist.sft.encode` tokenizes it exactly as the paper did (see there).

Multi-turn. The paper trains single-turn only (both build_dataset.py files read instruction / input /
output). v2's inference code defines the multi-turn prompt (scripts/inference/gradio_demo.py and
scripts/openai_server_demo/openai_api_server.py: ``generate_prompt(...) + " " + response + "</s>"``,
then ``"<s>" + "[INST] {instruction} [/INST]"``, the system block in the first turn only); ``llama2``
follows it: ``<s>[INST] <<SYS>>..<</SYS>>\\n\\nu1 [/INST] a1</s><s>[INST] u2 [/INST] a2</s>``. v1 has
no multi-turn training format; its gradio demo joins turns into one un-terminated instruction, which
training can never have produced. ``alpaca`` extends v1 the Llama-2 way without a second header:
``<s>HEADER\\n\\n### Instruction:\\nu1\\n\\n### Response:  a1</s>### Instruction:\\nu2\\n\\n### Response:  a2</s>``.
Prefer ``llama2`` for multi-turn data: because v1's prompt ends with a space, a v1 history whose
answer starts with a whitespace-only token cannot be reproduced by tokenizing a string, so stock
``apply_chat_template`` then differs from training (encode.py explains; ``encode_prompt`` is exact).

System prompt. A system message replaces the template's default system text (v1: the "Below is an
instruction ..." header; v2: DEFAULT_SYSTEM_PROMPT); an empty one removes the system part (v2 then
gives ``[INST] {instruction} [/INST]``, the paper's TEMPLATE_WITHOUT_SYSTEM_PROMPT).

Which template formats a model's prompts at inference (``pick_template``, used by chat, eval and export):
the model's own, found in its tokenizer, adapter or model folder (``chat_template`` in
tokenizer_config.json, which ``cllama export`` writes), unless a built-in or a file is named.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

from ..errors import UserError

PROMPT: Literal["prompt"] = "prompt"
TARGET: Literal["target"] = "target"
Kind = Literal["prompt", "target"]

ALPACA_HEADER = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
LLAMA2_DEFAULT_SYSTEM = "You are a helpful assistant. 你是一个乐于助人的助手。"

# Both templates spell out every newline and space as string literals inside {{- ... -}}, so that the
# rendering does not depend on the Jinja environment's trim_blocks / lstrip_blocks settings.
_ROLE_CHECK = (
    "{%- if m['role'] not in ['user', 'assistant'] or ((m['role'] == 'user') != (loop.index0 % 2 == 0)) -%}"
    "{{- raise_exception('after an optional leading system message, roles must alternate user, "
    "assistant, user, ... starting with user') -}}"
    "{%- endif -%}"
)

ALPACA_JINJA = (
    "{#- Chinese-Alpaca v1 (ymcui/Chinese-LLaMA-Alpaca, scripts/training/build_dataset.py); "
    "cllama-dist: the response follows the paper's 'Response: ' after one more space, "
    "SentencePiece's dummy prefix written out. -#}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system = '" + ALPACA_HEADER + "' -%}{%- set turns = messages -%}"
    "{%- endif -%}"
    "{{- bos_token -}}"
    "{%- if system -%}{{- system + '\\n\\n' -}}{%- endif -%}"
    "{%- for m in turns -%}" + _ROLE_CHECK +
    "{%- if m['role'] == 'user' -%}"
    "{{- '### Instruction:\\n' + m['content'] + '\\n\\n### Response: ' -}}"
    "{%- else -%}"
    "{{- ' ' + m['content'] + eos_token -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

LLAMA2_JINJA = (
    "{#- Chinese-Alpaca-2 (ymcui/Chinese-LLaMA-Alpaca-2, scripts/training/build_dataset.py; multi-turn "
    "as scripts/inference/gradio_demo.py). -#}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system = '" + LLAMA2_DEFAULT_SYSTEM + "' -%}{%- set turns = messages -%}"
    "{%- endif -%}"
    "{%- for m in turns -%}" + _ROLE_CHECK +
    "{%- if m['role'] == 'user' -%}"
    "{{- bos_token + '[INST] ' -}}"
    "{%- if loop.first and system -%}{{- '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' -}}{%- endif -%}"
    "{{- m['content'] + ' [/INST]' -}}"
    "{%- else -%}"
    "{{- ' ' + m['content'] + eos_token -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

BUILTIN = {"alpaca": ALPACA_JINJA, "llama2": LLAMA2_JINJA}

# Stand-ins for bos_token / eos_token while rendering for training: characters from Unicode's private
# use area, which no text is expected to hold (a message that does is refused, not mis-split).
_SENTINEL = {"bos": "\ue000cllama-bos\ue001", "eos": "\ue000cllama-eos\ue001",
             "gen": "\ue000cllama-gen\ue001", "/gen": "\ue000cllama-/gen\ue001"}
_SPLIT = re.compile("(" + "|".join(map(re.escape, _SENTINEL.values())) + ")")
_SPECIAL_OF = {v: k for k, v in _SENTINEL.items()}
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


@dataclass(frozen=True)
class Segment:
    """A piece of a rendered conversation: text, or a special token ("bos" / "eos"), and its kind."""

    kind: Kind
    text: str = ""
    special: Literal["bos", "eos"] | None = None


@dataclass(frozen=True)
class Template:
    """A chat template: its name, the Jinja text it was built from, where that came from."""

    name: str
    source: str
    origin: str = "builtin"

    @property
    def sha256(self) -> str:
        """sha256 of the UTF-8 template text: what a shard manifest records."""
        return hashlib.sha256(self.source.encode("utf-8")).hexdigest()

    @property
    def chat_template(self) -> str:
        """The Jinja string for tokenizer_config.json's ``chat_template``."""
        return self.source

    def describe(self) -> dict:
        return {"name": self.name, "sha256": self.sha256, "origin": self.origin}

    def _render(self, messages: list[dict], add_generation_prompt: bool, bos: str, eos: str) -> str:
        import jinja2

        try:
            return _compile(self.source, bos == _SENTINEL["bos"]).render(
                messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos, eos_token=eos
            )
        except jinja2.TemplateError as exc:
            raise UserError(f"chat template {self.name} ({self.origin}): {exc}") from None

    def render_text(self, conversation, *, add_generation_prompt: bool = False, bos_token: str = "<s>",
                    eos_token: str = "</s>") -> str:
        """The plain string the template renders, as transformers' apply_chat_template(tokenize=False) would."""
        return self._render(to_messages(conversation), add_generation_prompt, bos_token, eos_token)

    def segments(self, conversation) -> list[Segment]:
        """Prompt / target segments of a conversation (a Conversation or a list of messages).

        A conversation that ends with a user message ends with the generation prompt: what the model
        is given at inference to answer it.
        """
        messages = to_messages(conversation)
        check_roles(messages)
        for m in messages:
            if "\ue000" in m["content"]:
                raise UserError(f"a {m['role']} message holds U+E000, a private-use character reserved by the template renderer")
        out: list[Segment] = []
        prev = ""
        marked = bool(_GENERATION_TAG.search(self.source))
        for i, m in enumerate(messages):
            if m["role"] == "system":
                continue
            user = m["role"] == "user"
            text = self._render(messages[: i + 1], user, _SENTINEL["bos"], _SENTINEL["eos"])
            if not text.startswith(prev):
                raise UserError(
                    f"chat template {self.name} ({self.origin}) is not prefix-stable: rendering message {i + 1} "
                    "changes the text rendered for the messages before it, so prompt and response cannot be "
                    "told apart"
                )
            out.extend(_split(text[len(prev):], PROMPT if user else TARGET, marked))
            prev = text
        return out


@functools.lru_cache(maxsize=32)
def _compile(source: str, marks: bool = False):
    """Compile in an environment like transformers' own (sandboxed, trim_blocks, lstrip_blocks).

    With ``marks``, the body of each {% generation %} block is wrapped in sentinels, so that
    segments() can tell the assistant text a template marks from the rest of its turn.
    """
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        # transformers' {% generation %} ... {% endgeneration %}: the assistant text that carries loss.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return _SENTINEL["gen"] + caller() + _SENTINEL["/gen"] if marks else caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


def _split(text: str, kind: Kind, marked: bool) -> list[Segment]:
    """Segments of what one message added to the rendering. In a template with {% generation %}
    blocks only their text is target (transformers' convention); otherwise all an assistant
    message adds is."""
    out = []
    inside = False
    for part in _SPLIT.split(text):
        if not part:
            continue
        special = _SPECIAL_OF.get(part)
        if special in ("gen", "/gen"):
            inside = special == "gen"
            continue
        k: Kind = (TARGET if inside else PROMPT) if marked else kind
        out.append(Segment(k, "", special) if special else Segment(k, part))  # type: ignore[arg-type]
    return out


def to_messages(conversation) -> list[dict]:
    """A Conversation (anything with ``messages()``) or a list of {"role", "content"} dicts, as dicts."""
    if hasattr(conversation, "messages") and callable(conversation.messages):
        return conversation.messages()
    return [{"role": m["role"], "content": m["content"]} for m in conversation]


def check_roles(messages: Sequence[dict]) -> None:
    """An optional leading system message, then user / assistant alternating, starting with user."""
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not body:
        raise UserError("a conversation needs at least one user message")
    for i, m in enumerate(body):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            raise UserError(f"message {i + 1 + len(messages) - len(body)} has role {m['role']!r} where {want!r} belongs")
        if not isinstance(m["content"], str):
            raise UserError(f"message {i + 1 + len(messages) - len(body)} has non-string content")
    if messages and messages[0]["role"] == "system" and not isinstance(messages[0]["content"], str):
        raise UserError("the system message has non-string content")


# --------------------------------------------------------------------------------------------------
# Where templates come from.

def builtin(name: str) -> Template:
    if name not in BUILTIN:
        raise UserError(f"unknown template {name!r}: built-ins are {', '.join(BUILTIN)}; or give a .jinja file "
                        "or 'tokenizer' for the tokenizer's own chat_template")
    return Template(name, BUILTIN[name], "builtin")


def from_jinja(source: str, name: str = "custom", origin: str = "string") -> Template:
    """A template from Jinja text; fails now, with the template's origin, if it does not compile."""
    import jinja2

    try:
        _compile(source)
    except jinja2.TemplateError as exc:
        raise UserError(f"chat template {origin} does not compile: {exc}") from None
    return Template(name, source, origin)


def from_file(path: str | os.PathLike) -> Template:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"chat template file not found: {p}")
    try:
        source = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"chat template {p} is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    return from_jinja(source, name=p.stem, origin=str(p))


def from_tokenizer(folder: str | os.PathLike) -> Template:
    """The tokenizer folder's own chat template: tokenizer_config.json's ``chat_template``, or
    chat_template.jinja (how transformers >= 4.43 saves it)."""
    d = Path(folder)
    cfg_path = d / "tokenizer_config.json"
    jinja_path = d / "chat_template.jinja"
    if jinja_path.is_file():
        t = from_file(jinja_path)
        return Template("tokenizer", t.source, str(jinja_path))
    if not cfg_path.is_file():
        raise UserError(f"{d} has no tokenizer_config.json (nor chat_template.jinja): no chat template to use")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{cfg_path} is not valid JSON: {exc}") from None
    tmpl = cfg.get("chat_template") if isinstance(cfg, dict) else None
    if isinstance(tmpl, list):  # the older named-templates form: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in tmpl if isinstance(t, dict)}
        tmpl = named.get("default")
    if not isinstance(tmpl, str) or not tmpl:
        raise UserError(f"{cfg_path} has no chat_template: pass a built-in template (alpaca, llama2) or a .jinja file")
    return from_jinja(tmpl, name="tokenizer", origin=str(cfg_path))


def resolve(spec: str, tokenizer: str | os.PathLike | None = None) -> Template:
    """A template named on the command line: a built-in name, 'tokenizer', or a Jinja file."""
    if spec in BUILTIN:
        return builtin(spec)
    if spec == "tokenizer":
        if tokenizer is None:
            raise UserError("template 'tokenizer' needs a tokenizer folder")
        return from_tokenizer(tokenizer)
    if os.path.exists(spec) or spec.endswith((".jinja", ".j2", ".txt")):
        return from_file(spec)
    return builtin(spec)  # the error lists the choices


def install_chat_template(folder: str | os.PathLike, template: Template) -> Path:
    """Write ``template`` as the chat_template of the tokenizer folder's tokenizer_config.json."""
    cfg_path = Path(folder) / "tokenizer_config.json"
    if not cfg_path.is_file():
        raise UserError(f"{folder} has no tokenizer_config.json to add a chat template to")
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["chat_template"] = template.chat_template
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return cfg_path


# --------------------------------------------------------------------------------------------------
# Which template a model folder carries (chat, eval and export choose through these).


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
            t = from_tokenizer(d)
            for name, source in BUILTIN.items():  # name a built-in by its text, for messages and records
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
    return resolve(spec, folders[0] if folders else None)
