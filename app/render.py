"""How the chat shows a session's turns (the Chatbot's value): notes, picture thumbnails, replies with a tag for how
they ended. Text only: the turns themselves are what the model and the store see."""

from __future__ import annotations

from app.icons import glyph, replace_emoji

INTERRUPTED = "⚠️ *(interrupted: the app stopped while this reply was being written)*"


def chat_messages(session: dict, picture=None) -> list[dict]:
    """The Chatbot's value (messages format). ``picture(turn)`` gives a file to show for a picture change (the
    user's message, as a thumbnail) or None; without it the change is the note alone. The chat's emoji are drawn
    as SVG (app/icons.py); how a reply ended (stopped, cut at the length limit, regenerated differently) is a tag
    after its text, never part of the text itself (which is what the model and the history see)."""
    out = []
    for t in session["turns"]:
        if t["role"] == "note":
            path = picture(t) if picture is not None and t.get("image") else None
            if path:
                out.append({"role": "user", "content": {"path": path}})
            out.append({"role": "assistant", "content": f'<span class="note">{replace_emoji(t["text"])}</span>'})
        elif t["role"] == "user":
            out.append({"role": "user", "content": t["text"]})
        else:
            out.append({"role": "assistant", "content": _reply_view(t)})
    return out


TYPING = '<span class="typing" aria-label="writing"><i></i><i></i><i></i></span>'


def _tag(icon: str, text: str, cls: str) -> str:
    return f' <span class="tag {cls}">{glyph(icon)} {text}</span>'


def _reply_view(t: dict) -> str:
    text, status = replace_emoji(t["text"]), t.get("status")
    if status == "streaming":
        return f"{text} {TYPING}" if text else TYPING
    if status == "stopped":
        text += _tag("stop", "*(stopped)*", "stopped")
    elif status == "interrupted":
        text = (text + " " + replace_emoji(INTERRUPTED)).strip()
    if t.get("cut"):
        text += _tag("cut", f"… *(cut at the length limit of {t['cut']} tokens: raise Max new tokens in "
                            "Settings for longer answers)*", "cut")
    if t.get("varied"):
        text += _tag("refresh", f"*({t['varied']})*", "varied")
    return text.strip() or "…"
