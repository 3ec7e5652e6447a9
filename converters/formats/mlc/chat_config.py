"""``mlc-chat-config.json``: what MLC's engines and apps read beside the weights.

Fields (mlc-llm's ``protocol/mlc_chat_config.py``, version "0.1.0"): model_type, quantization,
model_config, vocab_size, context_window_size, sliding_window_size, prefill_chunk_size,
attention_sink_size, tensor_parallel_shards, pipeline_parallel_stages, active_vocab_size, sampling
defaults (temperature, presence/frequency/repetition penalty, top_p: generation_config.json's values,
else MLC's system defaults), tokenizer_files, tokenizer_info, conv_template, pad/bos/eos token ids,
model_task.

``conv_template`` is MLC's conversation protocol (system_template with ``{system_message}``, roles,
seps, role_content_sep, role_empty_sep, stop_str, stop_token_ids), derived here from the checkpoint's
own Jinja chat template: the template is rendered on marker messages and the text between the markers
is cut into MLC's pieces; :func:`render` (MLC's prompt assembly) must then reproduce the template's own
output on a conversation with a system message, or the derivation is refused. What MLC's protocol cannot
say (no system turn without a system message, ``| trim``, today's date) is named by :func:`differences`,
which convert prints as warnings.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from edgekit.errors import InputError

VERSION = "0.1.0"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "vocab.json", "merges.txt", "added_tokens.json",
                   "tokenizer_config.json")
SYSTEM_DEFAULTS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "temperature": 1.0,
                   "presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0, "top_p": 1.0}
_M = {k: f"EdgekitMark{k.upper()}Q" for k in ("sys", "u1", "a1", "u2")}
REPLY_PREFIX = "edgekit_reply_prefix"  # derive()'s think block of a reasoning template (kept out of the file)
_SPECIAL_TAIL = re.compile(r"(<\|?[^<>\s]{1,40}?\|?>|\[[A-Z_/]{2,20}\])$")


class Clock:
    """``strftime_now`` for rendering at convert time: one fixed moment, and the dates the template asked for
    (an MLC conversation template is text, so a date in it is the conversion's)."""

    def __init__(self) -> None:
        from datetime import datetime

        self.now = datetime.now()
        self.dates: list[str] = []

    def __call__(self, fmt: str) -> str:
        text = self.now.strftime(fmt)
        if text not in self.dates:
            self.dates.append(text)
        return text


def jinja_render(template: str, messages: list[dict[str, str]], bos: str = "", eos: str = "",
                 clock: Clock | None = None) -> str:
    """``template``'s prompt for ``messages`` as the runtimes render it (transformers' environment), the date
    being ``clock``'s. InputError when it cannot; its ``__cause__`` is the template's own error."""
    from edgekit.chat_template import make_renderer

    return make_renderer(template, {"bos_token": bos, "eos_token": eos}, strftime_now=clock or Clock())(messages)


def _common_suffix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return a[len(a) - n:]


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def _split_sep(common: str) -> tuple[str, str]:
    """The turn separator and the role prefix both turns share (``<|im_end|>\\n`` + ``<|im_start|>``):
    the prefix is the special token the common part ends with; without one, a line break ends the sep."""
    m = _SPECIAL_TAIL.search(common)
    if m and m.start() > 0:
        return common[: m.start()], m.group(0)
    if "\n" in common:
        i = common.rindex("\n") + 1
        return common[:i], common[i:]
    return common, ""


def derive(template: str, bos: str = "", eos: str = "", stop_ids: list[int] | None = None,
           clock: Clock | None = None) -> dict[str, Any]:
    """MLC's conversation template of a Jinja chat ``template`` (see the module doc)."""
    from jinja2.exceptions import TemplateSyntaxError

    clock = clock or Clock()
    msgs = [{"role": "system", "content": _M["sys"]}, {"role": "user", "content": _M["u1"]},
            {"role": "assistant", "content": _M["a1"]}, {"role": "user", "content": _M["u2"]}]
    try:
        text = jinja_render(template, msgs, bos, eos, clock=clock)
        bare = jinja_render(template, [{"role": "user", "content": _M["u1"]}], bos, eos, clock=clock)
    except InputError as exc:
        cause = exc.__cause__
        if isinstance(cause, TemplateSyntaxError):
            raise InputError(f"the chat template does not parse ({cause.message}, line {cause.lineno}); fix it in "
                             "tokenizer_config.json / chat_template.jinja") from cause
        # a valid template may refuse what MLC needs (Mistral's rejects system messages): nothing to fix in it
        raise InputError(f"MLC's conversation protocol is built from a system message followed by user and "
                         f"assistant turns, which this chat template refuses ({cause or exc}); convert --to gguf "
                         "or --to onnx, which apply the chat template itself") from cause
    parts = re.split("|".join(re.escape(m) for m in _M.values()), text)
    if len(parts) != 5 or any(m not in text for m in _M.values()):
        raise InputError("the chat template does not place system, user and assistant messages in order; "
                         "MLC's conversation protocol cannot express it")
    p0, p1, p2, p3, p4 = parts
    role_content_sep = _common_suffix(p2, p3)
    p2c, p3c = p2[: len(p2) - len(role_content_sep)], p3[: len(p3) - len(role_content_sep)]
    common = _common_prefix(p2c, p3c)
    sep_u, role_head = _split_sep(common)
    assistant = p2c[len(sep_u):]
    user = p3c[len(sep_u):]
    sep_a = sep_u  # one separator after every message unless the two turns end differently
    if not p1.endswith(user + role_content_sep):
        raise InputError("the chat template's system turn is not followed by a user turn MLC can express")
    system_template = p0 + "{system_message}" + p1[: len(p1) - len(user) - len(role_content_sep)]
    if not p4.startswith(sep_u):
        raise InputError("the chat template's generation prompt does not follow its user turns")
    reply_prefix = ""
    if p4[len(sep_u): len(sep_u) + len(assistant)] == assistant:
        role_empty_sep = p4[len(sep_u) + len(assistant):]
    else:
        gen, past = p4[len(sep_u):], assistant + role_content_sep
        if not (role_content_sep and gen.endswith(role_content_sep) and len(past) > len(gen)
                and past.startswith(gen)):
            raise InputError("the chat template writes past assistant turns otherwise than the reply it asks for "
                             f"({gen!r} opens a reply, {assistant!r} a past one), which MLC's conversation protocol "
                             "cannot express; convert --to gguf or --to onnx, which apply the chat template itself")
        # a reasoning template (Qwen3's): a past reply is re-rendered with a think block the reply prompt leaves
        # to the model. MLC keeps a reply as the model wrote it, think block included, which renders the same
        # (checked below with replies that carry one)
        reply_prefix = past[len(gen):]
        assistant, role_empty_sep = gen[: len(gen) - len(role_content_sep)], role_content_sep
    default_system = ""
    head, _, tail = system_template.partition("{system_message}")
    bare_head = bare.split(_M["u1"])[0]
    if head and bare_head.startswith(head) and tail and tail in bare_head:
        default_system = bare_head[len(head): bare_head.index(tail, len(head))]
    stop = sep_a.strip()
    conv = {
        "name": "edgekit_derived",
        "system_template": system_template,
        "system_message": default_system,
        "add_role_after_system_message": True,
        "roles": {"user": user, "assistant": assistant, "tool": user},
        "role_templates": {"user": "{user_message}", "assistant": "{assistant_message}", "tool": "{tool_message}"},
        "messages": [],
        "seps": [sep_u] if sep_u == sep_a else [sep_u, sep_a],
        "role_content_sep": role_content_sep,
        "role_empty_sep": role_empty_sep,
        "stop_str": [stop] if stop else [],
        "stop_token_ids": list(stop_ids or []),
        "function_string": "",
        "use_function_calling": False,
    }
    del role_head
    check_against_template(conv, template, bos, eos, clock, reply_prefix)
    if reply_prefix:
        conv[REPLY_PREFIX] = reply_prefix  # for differences() and build()'s note; not written
    return conv


def render(conv: dict[str, Any], messages: list[dict[str, str]]) -> str:
    """MLC's prompt for ``messages`` under ``conv`` (its ``Conversation.as_prompt`` rules: system prompt,
    then ``role + role_content_sep + content + sep`` per message, ``seps[1]`` after assistant messages when
    there are two, then the assistant role and ``role_empty_sep``)."""
    msgs = list(messages)
    system = conv["system_message"]
    if msgs and msgs[0]["role"] == "system":
        system = msgs.pop(0)["content"]
    out = conv["system_template"].replace("{system_message}", system)
    seps = conv["seps"]
    for m in msgs:
        role = conv["roles"][m["role"]]
        out += role + conv["role_content_sep"] + m["content"] + seps[(m["role"] == "assistant") % len(seps)]
    return out + conv["roles"]["assistant"] + conv["role_empty_sep"]


_CHAT = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello."},
         {"role": "user", "content": "What is 2+2?"}]
_SPACED = [{"role": "system", "content": "  Be brief. \n"}, {"role": "user", "content": "\tHi there  \n"},
           {"role": "assistant", "content": " Hello.\n"}, {"role": "user", "content": "  What is 2+2? "}]


def _as_written(messages: list[dict[str, str]], reply_prefix: str) -> list[dict[str, str]]:
    """The chat with each past reply as a reasoning model wrote it (``reply_prefix``: its think block)."""
    return [{**m, "content": reply_prefix + m["content"]} if m["role"] == "assistant" else m for m in messages]


def check_against_template(conv: dict[str, Any], template: str, bos: str = "", eos: str = "",
                           clock: Clock | None = None, reply_prefix: str = "") -> None:
    """Refuse a derived template whose prompts differ from the Jinja template's own."""
    msgs = _as_written([{"role": "system", "content": "You are terse."}, *_CHAT], reply_prefix)
    want = jinja_render(template, msgs, bos, eos, clock=clock)
    if render(conv, msgs) != want:
        raise InputError("the chat template has a structure MLC's conversation protocol cannot express "
                         "(the derived template renders differently); the artifact would prompt the model wrongly")


def differences(conv: dict[str, Any], template: str, bos: str = "", eos: str = "",
                clock: Clock | None = None) -> list[str]:
    """One warning for each kind of chat whose MLC prompt differs from the Jinja template's, where MLC's
    protocol has no way to say it: chats without a system message (its system turn is written whatever the
    message), messages with surrounding whitespace (no ``| trim``), and a date (``strftime_now``), fixed at
    ``clock``'s moment. :func:`derive` has already checked a chat with a system message."""
    clock = clock or Clock()
    notes = []
    prefix = conv.get(REPLY_PREFIX, "")
    chat, spaced = _as_written(_CHAT, prefix), _as_written(_SPACED, prefix)
    if prefix:
        notes.append(f"note: the chat template writes a think block ({prefix!r}) into past replies; MLC sends a "
                     "past reply as the model wrote it, the same prompt where the reply holds its think block (a "
                     "reasoning model's do), and without one where it does not")
    try:
        want: str | None = jinja_render(template, chat, bos, eos, clock=clock)
    except InputError:  # a template that demands a system message: no such chat to compare
        want = None
    got = render(conv, chat)
    if want is not None and got != want:
        head = conv["system_template"].replace("{system_message}", conv["system_message"])
        rest = got[len(head):]
        if want.endswith(rest):
            notes.append(f"warning: MLC's conversation protocol writes the system turn whatever the chat: in the "
                         f"MLC artifact, chats without a system message start {head!r} where the chat template "
                         f"writes {want[: len(want) - len(rest)]!r}; give a system message (run --system) for the "
                         "template's own prompt")
        else:
            notes.append("warning: in the MLC artifact, chats without a system message prompt differently from "
                         "the chat template (MLC's conversation protocol cannot express it); give a system message")
    try:
        want = jinja_render(template, spaced, bos, eos, clock=clock)
    except InputError:  # a template that refuses such messages: MLC's prompt is all there is
        want = None
    if want is not None and render(conv, spaced) != want:
        trimmed = [{**m, "content": m["content"].strip()} for m in spaced]
        notes.append("warning: the chat template trims whitespace around each message (| trim), which MLC's "
                     "conversation protocol cannot: in the MLC artifact, messages that start or end with whitespace "
                     "keep it" if render(conv, trimmed) == want else
                     "warning: in the MLC artifact, messages that start or end with whitespace prompt differently "
                     "from the chat template (MLC's conversation protocol cannot express it)")
    baked = [d for d in clock.dates if d in json.dumps(conv, ensure_ascii=False)]
    if baked:
        notes.append(f"warning: the chat template writes the current date (strftime_now); MLC's conversation "
                     f"template holds the date of this conversion, {', '.join(baked)}, in every chat")
    return notes


def plain_template(stop_ids: list[int]) -> dict[str, Any]:
    """For a checkpoint without a chat template: text in, text out (MLC's ``LM`` shape)."""
    return {"name": "LM", "system_template": "{system_message}", "system_message": "",
            "add_role_after_system_message": True, "roles": {"user": "", "assistant": "", "tool": ""},
            "role_templates": {"user": "{user_message}", "assistant": "{assistant_message}", "tool": "{tool_message}"},
            "messages": [], "seps": [""], "role_content_sep": "", "role_empty_sep": "", "stop_str": [],
            "stop_token_ids": list(stop_ids), "function_string": "", "use_function_calling": False}


def build(ckpt: Any, out_dir: Path, model_type: str, quant: str, model_config: dict[str, Any],
          notes: list[str] | None = None) -> dict[str, Any]:
    """Write mlc-chat-config.json and copy the tokenizer files into ``out_dir``; returns the config. What the
    conversation template cannot reproduce of the chat template is added to ``notes`` as warnings."""
    import shutil

    from edgekit.model import special_token
    from edgekit.model import stop_ids as read_stop_ids

    gen_file = ckpt.path / "generation_config.json"
    gen = json.loads(gen_file.read_text()) if gen_file.exists() else {}
    stop_ids = read_stop_ids(ckpt.path)
    tc = ckpt.tokenizer_config
    template = ckpt.chat_template()
    if template:
        bos, eos = (special_token(ckpt.path, k, tc) or "" for k in ("bos_token", "eos_token"))
        clock = Clock()
        conv = derive(template, bos, eos, stop_ids, clock)
        if notes is not None:
            notes.extend(differences(conv, template, bos, eos, clock))
        conv.pop(REPLY_PREFIX, None)
    else:
        conv = plain_template(stop_ids)
    files = []
    for name in TOKENIZER_FILES:
        if (ckpt.path / name).exists():
            shutil.copy2(ckpt.path / name, out_dir / name)
            files.append(name)
    for name in ("chat_template.jinja", "special_tokens_map.json"):  # transformers reads these too
        if (ckpt.path / name).exists():
            shutil.copy2(ckpt.path / name, out_dir / name)
    if "tokenizer.model" in files and "tokenizer.json" not in files:
        _write_tokenizer_json(ckpt.path, out_dir)
        files.insert(files.index("tokenizer.model") + 1, "tokenizer.json")
    cfg: dict[str, Any] = {
        "version": VERSION,
        "model_type": model_type,
        "quantization": quant,
        "model_config": model_config,
        "vocab_size": model_config["vocab_size"],
        "context_window_size": model_config["context_window_size"],
        "sliding_window_size": -1,
        "prefill_chunk_size": model_config["prefill_chunk_size"],
        "attention_sink_size": -1,
        "tensor_parallel_shards": 1,
        "pipeline_parallel_stages": 1,
        "active_vocab_size": _active_vocab(out_dir, model_config["vocab_size"]),
        "temperature": None, "presence_penalty": None, "frequency_penalty": None, "repetition_penalty": None,
        "top_p": None,
        "tokenizer_files": files,
        "tokenizer_info": _tokenizer_info(out_dir),
        "conv_template": conv,
        "pad_token_id": None, "bos_token_id": None, "eos_token_id": None,
        "model_task": "chat",
        "embedding_metadata": None,
    }
    for source in (gen, ckpt.config):  # generation_config.json first, then config.json, as mlc_llm does
        for key, value in source.items():
            if key in cfg and cfg[key] is None and key not in ("embedding_metadata",):
                cfg[key] = value
    for key, value in SYSTEM_DEFAULTS.items():
        if cfg[key] is None:
            cfg[key] = value
    (out_dir / "mlc-chat-config.json").write_text(json.dumps(cfg, indent=2))
    return cfg


def _write_tokenizer_json(src: Path, out_dir: Path) -> None:
    """A SentencePiece-only checkpoint's tokenizer.json, as mlc_llm's gen_config makes it: transformers'
    fast tokenizer of the folder, saved. Without it MLC's runtime falls back to the bare SentencePiece model,
    which knows no added tokens (chat markers) and normalizes text as the .model file says, not as
    transformers (and edgekit's own MLC backend) do."""
    from edgekit.errors import require

    transformers = require("transformers", "torch")
    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(src), trust_remote_code=False, local_files_only=True)
        backend = getattr(tok, "backend_tokenizer", None)
        if backend is None:
            raise ValueError("transformers has no fast tokenizer for it")
        tmp = out_dir / "tokenizer.json.part"
        backend.save(str(tmp))
        tmp.replace(out_dir / "tokenizer.json")
    except (OSError, ValueError, RuntimeError) as exc:
        raise InputError(f"{src / 'tokenizer.model'}: transformers could not make the tokenizer.json MLC reads "
                         f"({exc}); add a tokenizer.json to the checkpoint") from exc


def _active_vocab(folder: Path, vocab: int) -> int:
    """Tokens the tokenizer knows (base vocabulary plus added tokens), as len(tokenizer) counts them."""
    tj = folder / "tokenizer.json"
    if not tj.exists():
        return vocab
    data = json.loads(tj.read_text(encoding="utf-8"))
    ids = set((data.get("model") or {}).get("vocab", {}).values()) if isinstance((data.get("model") or {}).get("vocab"), dict) else set()
    ids |= {t["id"] for t in data.get("added_tokens", [])}
    return len(ids) or vocab


def _tokenizer_info(folder: Path) -> dict[str, Any]:
    """MLC's TokenizerInfo, by mlc_llm's rules (``Tokenizer::DetectTokenizerInfo``) on tokenizer.json: how
    token strings decode (a ByteLevel decoder, or one in a Sequence: ``byte_level``; else ``byte_fallback``),
    whether encoding prepends a space (a ``Prepend("▁")`` normalizer, or one in a Sequence: Llama 2, Mistral)
    and whether decoding strips the first one (a ``Strip(" ", 1, 0)`` decoder). Without tokenizer.json
    (:func:`build` makes one from tokenizer.model) mlc_llm uses its defaults, written here."""
    info: dict[str, Any] = {"token_postproc_method": "byte_fallback", "prepend_space_in_encode": False,
                            "strip_space_in_decode": False}
    from edgekit.model import prepends_space, tokenizer_steps

    tj = folder / "tokenizer.json"
    if not tj.exists():
        return info
    data = json.loads(tj.read_text(encoding="utf-8"))
    decoders = tokenizer_steps(data.get("decoder"))
    for d in decoders:  # the last ByteLevel/ByteFallback one decides, as in mlc_llm
        if d.get("type") in ("ByteLevel", "ByteFallback"):
            info["token_postproc_method"] = "byte_level" if d["type"] == "ByteLevel" else "byte_fallback"
    info["prepend_space_in_encode"] = prepends_space(data)
    info["strip_space_in_decode"] = any(d.get("type") == "Strip" and d.get("content") == " " and d.get("start") == 1
                                        and d.get("stop") == 0 for d in decoders)
    return info
